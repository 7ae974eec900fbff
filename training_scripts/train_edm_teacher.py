#!/usr/bin/env python
"""Train an EDM pixel-space teacher (Karras et al. 2022) on a small, exactly recorded training set.

    accelerate launch training_scripts/train_edm_teacher.py --dataset_name digits --resolution 16 \
        --num_train_images 200 --model_preset small --max_train_steps 5000 --output_dir runs/teacher

A thin entry point: the script is `diffusers_memdistill.training.train_edm_teacher` (flags: --help).
"""

import sys

from diffusers_memdistill.training.runner import run_cli
from diffusers_memdistill.training.train_edm_teacher import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
