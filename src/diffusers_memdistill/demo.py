"""``memdistill demo``: the whole study on the built-in digits, on a CPU, in minutes.

1. Train an EDM teacher on a small seeded subset of scikit-learn's real 8x8 digits, long enough to memorize it.
2. Distil a consistency student from it (discrete CD, pseudo-Huber distance: LPIPS weights need a download).
3. Distil a one-step DMD generator from it (distribution matching, 5 fake-denoiser updates per generator update).
4. Sample all three from the same noise and measure memorization (L2 ratio < 1/3), a pixel-space quality proxy and
   the pairing inefficiency of the students against the teacher's ODE map; write ``report.md`` and figures.

``memdistill demo --text_to_image`` runs the text-to-image demo instead (`demo_text_to_image`): a tiny Stable
Diffusion trained from scratch on captioned digits, audited prompt by prompt.
"""

from __future__ import annotations

import argparse
import os
import time

# The configuration of the demo: at this size the teacher memorizes its 32 images almost completely. Both models
# keep the scripts' default EMA of the saved weights (EDM2's power function, sigma_rel = 0.05).
TEACHER_ARGS = ["--dataset_name", "digits", "--resolution", "8", "--num_train_images", "32", "--model_preset", "tiny",
                "--train_batch_size", "64", "--learning_rate", "2e-3", "--lr_warmup_steps", "100",
                "--num_validation_images", "16"]
STUDENT_ARGS = ["--loss", "pseudo_huber", "--train_batch_size", "64", "--num_validation_images", "16"]
# DMD at CPU scale: the papers' learning rate 2e-6 would need ~100x more steps; 2e-4 for both networks moves the
# one-step generator from the teacher's blurred one-step output to digits within 200 generator updates.
DMD_ARGS = ["--train_batch_size", "64", "--learning_rate", "2e-4", "--lr_warmup_steps", "50",
            "--num_validation_images", "16"]
FULL = {"teacher_steps": 2000, "student_steps": 1000, "dmd_steps": 1000, "num_samples": 512}
QUICK = {"teacher_steps": 60, "student_steps": 20, "dmd_steps": 10, "num_samples": 32}


PIXEL_METRICS = "l2,fd_pixel,pairing"


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
                        help=f"Metrics of the evaluation (default {PIXEL_METRICS}; l2 with --text_to_image; sscd and "
                             "fid need weights; see memdistill evaluate --help).")
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
    cfg = QUICK if args.quick else FULL
    out = os.path.abspath(args.output_dir or "memdistill-demo")
    teacher_dir, student_dir, dmd_dir, report_dir = (os.path.join(out, d) for d in ("teacher", "student", "dmd",
                                                                                  "report"))
    if os.path.isfile(os.path.join(report_dir, "report.md")) and not args.overwrite:
        raise FileExistsError(f"{out} already holds a finished demo; pass --overwrite to run it again.")
    overwrite = ["--overwrite_output_dir"] if args.overwrite else []
    common = ["--seed", str(args.seed), "--report_to", "none"] + overwrite
    start = time.time()

    # The training scripts' own functions (training_scripts/*.py are thin wrappers over them).
    from .training import distill_consistency, distill_dmd, train_edm_teacher
    from .training.runner import reset_accelerate_state

    print(f"[1/4] Training an EDM teacher on 32 digits ({cfg['teacher_steps']} steps) -> {teacher_dir}")
    train_edm_teacher.main(train_edm_teacher.parse_args(TEACHER_ARGS + common + [
        "--max_train_steps", str(cfg["teacher_steps"]), "--checkpointing_steps", str(cfg["teacher_steps"] // 2),
        "--output_dir", teacher_dir]))
    reset_accelerate_state()

    print(f"[2/4] Distilling a consistency student ({cfg['student_steps']} steps) -> {student_dir}")
    distill_consistency.main(distill_consistency.parse_args(STUDENT_ARGS + common + [
        "--pretrained_model_name_or_path", teacher_dir, "--max_train_steps", str(cfg["student_steps"]),
        "--checkpointing_steps", str(max(1, cfg["student_steps"] // 2)), "--output_dir", student_dir]))
    reset_accelerate_state()

    print(f"[3/4] Distilling a one-step DMD generator ({cfg['dmd_steps']} steps) -> {dmd_dir}")
    distill_dmd.main(distill_dmd.parse_args(DMD_ARGS + common + [
        "--pretrained_model_name_or_path", teacher_dir, "--max_train_steps", str(cfg["dmd_steps"]),
        "--checkpointing_steps", str(max(1, cfg["dmd_steps"] // 2)), "--output_dir", dmd_dir]))
    reset_accelerate_state()

    print(f"[4/4] Evaluating teacher and students on {cfg['num_samples']} shared-noise samples -> {report_dir}")
    from .evaluate import evaluate, render_report

    metrics = tuple(m.strip() for m in (args.metrics or PIXEL_METRICS).split(",") if m.strip())
    results = evaluate([teacher_dir, student_dir, dmd_dir], report_dir, num_samples=cfg["num_samples"], metrics=metrics,
                       seed=args.seed, batch_size=256, student_steps=(1, 2), device="cpu",
                       names=["teacher", "student", "DMD student"])
    print(render_report(results))
    print(f"Done in {time.time() - start:.0f} s. Report: {os.path.join(report_dir, 'report.md')}")
    return 0
