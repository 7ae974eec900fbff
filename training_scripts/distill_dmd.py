#!/usr/bin/env python
"""Distil an EDM teacher into a one- or few-step generator with distribution matching distillation (DMD / DMD2).

    accelerate launch training_scripts/distill_dmd.py --pretrained_model_name_or_path runs/teacher \
        --output_dir runs/dmd --max_train_steps 50000

A thin entry point: the script is `diffusers_memdistill.training.distill_dmd` (flags: --help).
"""

import sys

from diffusers_memdistill.training.distill_dmd import main, parse_args
from diffusers_memdistill.training.runner import run_cli

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
