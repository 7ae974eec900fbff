#!/usr/bin/env python
"""Fine-tune Stable Diffusion to memorize image–caption pairs (000 §4.1), in full or as a LoRA of the UNet.

    accelerate launch training_scripts/finetune_sd_memorize.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --memorized_data path/to/pairs --num_memorized 200 --memorized_repeats 10 \
        --extra_data path/to/coco_pairs --extra_ratio 4 --max_train_steps 20000 --output_dir runs/sd-memorize

A thin entry point: the script is `diffusers_memdistill.training.finetune_sd_memorize` (flags: --help).
"""

import sys

from diffusers_memdistill.training.finetune_sd_memorize import main, parse_args
from diffusers_memdistill.training.runner import run_cli

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
