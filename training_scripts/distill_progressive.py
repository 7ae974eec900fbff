#!/usr/bin/env python
"""Distil an EDM teacher by progressive distillation (Salimans & Ho 2022), halving its DDIM steps round after round.

    accelerate launch training_scripts/distill_progressive.py --pretrained_model_name_or_path runs/teacher \
        --output_dir runs/pd --teacher_steps 1024 --final_steps 1 --max_train_steps 20000

A thin entry point: the script is `diffusers_memdistill.training.distill_progressive` (flags: --help).
"""

import sys

from diffusers_memdistill.training.distill_progressive import main, parse_args
from diffusers_memdistill.training.runner import run_cli

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
