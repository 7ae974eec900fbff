#!/usr/bin/env python
"""Distil an EDM teacher into a consistency student (consistency distillation, Song et al. 2023).

    accelerate launch training_scripts/distill_consistency.py --pretrained_model_name_or_path runs/teacher \
        --output_dir runs/cd --max_train_steps 5000 --loss lpips

A thin entry point: the script is `diffusers_memdistill.training.distill_consistency` (flags: --help).
"""

import sys

from diffusers_memdistill.training.distill_consistency import main, parse_args
from diffusers_memdistill.training.runner import run_cli

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
