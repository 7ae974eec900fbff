#!/usr/bin/env python
"""Latent consistency distillation of a Stable Diffusion teacher (LCM, Luo et al. 2023), in full or as an LCM-LoRA.

    accelerate launch training_scripts/distill_lcm.py --pretrained_teacher_model runs/sd-memorize \
        --output_dir runs/lcm --num_ddim_timesteps 50 --loss_type huber --ema_decay 0.95 --max_train_steps 4000
    ... --use_lora --lora_rank 64                                   # LCM-LoRA

A thin entry point: the script is `diffusers_memdistill.training.distill_lcm` (flags: --help).
"""

import sys

from diffusers_memdistill.training.distill_lcm import main, parse_args
from diffusers_memdistill.training.runner import run_cli

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
