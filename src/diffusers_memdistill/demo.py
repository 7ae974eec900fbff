"""``memdistill demo``: the study on the built-in digits, on a CPU, in minutes.

It is ``memdistill matched-quality --regime severe --pairing`` (`analysis.matched_quality_cli`):

1. Train an EDM teacher on 32 of scikit-learn's real 8x8 digits, long enough to memorize them.
2. Distil from it a consistency student (CD, 1 and 2 steps), a one-step DMD generator and a progressive-distillation
   student (PD, 16 DDIM steps halved to 1), each checkpointed four times, and build the "+refine" controls of 000
   App. A (the final PD / DMD samples re-noised and reconstructed by the teacher).
3. Audit all of them on the same 512 noises (L2 memorization, pixel FD, ΔE against the teacher's 8-step map) and
   select per method the checkpoint whose quality is closest to the teacher's; write ``matched.md``, the figures and
   the full audit in ``eval/``.

``memdistill demo --text_to_image`` runs the text-to-image demo instead (`demo_text_to_image`): a tiny Stable
Diffusion trained from scratch on captioned digits, audited prompt by prompt.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default=None,
                        help="Folder of the models and the report (default: memdistill-demo, or "
                             "memdistill-demo-text-to-image with --text_to_image).")
    parser.add_argument("--text_to_image", action="store_true",
                        help="The text-to-image demo: a tiny Stable Diffusion trained from scratch on captioned "
                             "digits (some with a caption of their own), audited prompt by prompt.")
    parser.add_argument("--quick", action="store_true", help="A few steps of each stage (a smoke test, seconds).")
    parser.add_argument("--overwrite", action="store_true", help="Replace the results of an earlier demo run.")
    parser.add_argument("--metrics", default=None,
                        help="Metrics of the text-to-image audit (default l2; sscd needs weights; see memdistill "
                             "evaluate --help). The pixel demo always measures l2, fd_pixel and pairing.")
    parser.add_argument("--sscd_onnx", default=None, help="With --text_to_image and --metrics l2,sscd: the SSCD "
                        "ONNX model (see memdistill evaluate --help).")
    parser.add_argument("--sscd_weights", default=None, help="With --text_to_image and --metrics l2,sscd: the SSCD "
                        "TorchScript weights.")
    parser.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    if getattr(args, "text_to_image", False):
        from .demo_text_to_image import main as text_to_image_main

        return text_to_image_main(args)
    if getattr(args, "sscd_onnx", None) or getattr(args, "sscd_weights", None):
        raise ValueError("--sscd_onnx and --sscd_weights apply to --text_to_image; the pixel demo takes no SSCD.")
    if getattr(args, "metrics", None):
        raise ValueError("--metrics applies to --text_to_image; the pixel demo measures l2, fd_pixel and pairing.")
    from .analysis import matched_quality_cli

    parser = argparse.ArgumentParser()
    matched_quality_cli.add_arguments(parser)
    argv = ["--output_dir", os.path.abspath(args.output_dir or "memdistill-demo"), "--regime", "severe", "--pairing",
            "--device", "cpu", "--seed", str(args.seed)]
    return matched_quality_cli.main(parser.parse_args(argv + ["--quick"] * args.quick + ["--overwrite"] * args.overwrite))
