"""Command-line flags of the training scripts, named as in diffusers' examples (``train_text_to_image.py``,
``train_lcm_distill_sd_wds.py``), and their validation: every flag is checked before any work starts, and a bad one
ends the script with argparse's one-line error naming it."""

from __future__ import annotations

import argparse
import os

from .ema import MAX_SIGMA_REL

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def add_training_args(parser: argparse.ArgumentParser, learning_rate: float, tracker_project_name: str,
                      max_grad_norm: float = 1.0) -> None:
    """The runner's flags (`training.runner.TrainingRunner`), with the script's default learning rate, tracker
    project and clipping."""
    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", required=True, help="Folder of the saved pipeline, checkpoints and samples.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start a new run in an output_dir that already holds a model or checkpoints (deletes them).")
    g.add_argument("--seed", type=int, default=0, help="Seed of data order, noise, dropout and initialisation.")
    g.add_argument("--max_train_steps", type=int, required=True, help="Number of optimizer steps.")
    g.add_argument("--train_batch_size", type=int, default=64, help="Batch size per process and micro-step.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches accumulated into each optimizer step.")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="DataLoader worker processes (0: batches are gathered in the training process).")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="Mixed precision; defaults to the accelerate config.")
    g.add_argument("--cpu", action="store_true",
                   help="Run on the CPU even where a GPU is present; several processes then talk through gloo "
                        "(e.g. `accelerate launch --multi_gpu --num_processes 2 SCRIPT --cpu`).")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls and convolutions on Ampere+ GPUs.")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile every network of the training step (trained, averaged and frozen).")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute activations in the backward pass (less memory, slower).")

    o = parser.add_argument_group("optimizer and learning rate")
    o.add_argument("--learning_rate", type=float, default=learning_rate, help="Learning rate after the warm-up.")
    o.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant_with_warmup",
                   help="Learning-rate schedule (diffusers.optimization.get_scheduler).")
    o.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear learning-rate warm-up steps.")
    o.add_argument("--lr_num_cycles", type=int, default=1, help="Cycles of cosine_with_restarts.")
    o.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    o.add_argument("--max_grad_norm", type=float, default=max_grad_norm, help="Gradient clipping norm (0 disables).")
    o.add_argument("--use_8bit_adam", action="store_true",
                   help="bitsandbytes' 8-bit Adam (pip install 'diffusers-memdistill[8bit]').")
    o.add_argument("--adam_beta1", type=float, default=0.9)
    o.add_argument("--adam_beta2", type=float, default=0.999)
    o.add_argument("--adam_epsilon", type=float, default=1e-8)
    o.add_argument("--adam_weight_decay", type=float, default=0.0)

    c = parser.add_argument_group("checkpoints, logging and validation")
    c.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    c.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    c.add_argument("--resume_from_checkpoint", default=None,
                   help='Continue a run: "latest" or a checkpoint folder. Resuming is never implicit; the learning '
                        "rate, its schedule, clipping and --max_train_steps may change (recorded in run_history.json).")
    c.add_argument("--report_to", default="tensorboard",
                   help='Trackers for accelerate ("tensorboard", "wandb", "all" or "none").')
    c.add_argument("--tracker_project_name", default=tracker_project_name, help="Project name of the trackers.")
    c.add_argument("--logging_dir", default="logs", help="Trackers' folder, inside output_dir.")
    c.add_argument("--logging_steps", type=int, default=10, help="Log the loss every N steps.")
    c.add_argument("--validation_steps", type=int, default=None,
                   help="Sample validation images every N steps (default: --checkpointing_steps).")
    c.add_argument("--num_validation_images", type=int, default=16,
                   help="Fixed-seed validation samples, saved as a grid and sent to the trackers (0 disables).")

    h = parser.add_argument_group("Hugging Face Hub")
    h.add_argument("--push_to_hub", action="store_true",
                   help="Upload the finished model (safetensors, single-file pipeline, card) in one commit at the end.")
    h.add_argument("--hub_model_id", default=None, help="The repository to push to, as USER/NAME.")
    h.add_argument("--hub_token", default=None,
                   help="A Hub token (default: huggingface_hub's login or HF_TOKEN); never logged or written.")
    h.add_argument("--hub_private_repo", action="store_true", help="Create the repository as private.")
    h.add_argument("--push_audit_num_samples", type=int, default=None,
                   help="Samples of the memorization audit that runs before the push (default 1000; for a "
                        "text-to-image model, generations for its training prompts, 4 per prompt). The audit is "
                        "written beside the model, to OUTPUT_DIR-audit.")
    h.add_argument("--push_audit_metrics", default=None,
                   help="Comma-separated metrics of that audit (default l2,fd_pixel; l2 for text-to-image models: "
                        "neither needs pretrained weights).")
    h.add_argument("--push_without_audit", action="store_true",
                   help="Push without the memorization audit; the card then says so plainly.")

    e = parser.add_argument_group("EMA of the saved weights")
    e.add_argument("--ema_sigma_rel", type=float, default=None,
                   help="Power-function EMA (EDM2) of this relative width, the default (0.05).")
    e.add_argument("--ema_decay", type=float, default=None,
                   help="Use a constant-decay EMA instead (the older behaviour, e.g. 0.9999).")
    e.add_argument("--ema_warmup", action="store_true",
                   help="With --ema_decay: decay min(ema_decay, t / (t + 9)) at update t.")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--train_data_dir", default=None,
                   help="A local folder of training images (imagefolder) or a datasets.save_to_disk folder.")
    g.add_argument("--dataset_name", "--dataset", dest="dataset_name", default=None,
                   help='A Hugging Face dataset name, "digits" (built in, the default) or a folder.')
    g.add_argument("--dataset_split", default="train", help="Split of a Hugging Face dataset.")
    g.add_argument("--resolution", type=int, default=32, help="Side of the square training images.")
    g.add_argument("--channels", type=int, choices=[1, 3], default=None, help="1 or 3 (default: 1 for digits).")
    g.add_argument("--num_train_images", type=int, default=None,
                   help="Seeded class-balanced subset of this many images (default: the whole dataset).")
    g.add_argument("--data_seed", type=int, default=0, help="Seed of the subset choice.")
    g.add_argument("--repeat_classes", type=lambda s: [int(c) for c in s.split(",") if c], default=None,
                   help="Localized memorization (000 §4.3): comma-separated classes whose images are repeated.")
    g.add_argument("--repeat_images_per_class", type=int, default=50, help="Repeated images per repeated class.")
    g.add_argument("--repeat_times", type=int, default=5, help="How many times each repeated image appears.")
    g.add_argument("--num_other_images", type=int, default=1000, help="Non-repeated images from the other classes.")


def resolve_dataset(parser: argparse.ArgumentParser, args) -> str:
    """``--train_data_dir`` or ``--dataset_name`` (alias ``--dataset``) -> ``args.dataset``."""
    if args.train_data_dir is not None and args.dataset_name is not None:
        parser.error("pass --train_data_dir or --dataset_name, not both.")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        parser.error(f"--train_data_dir {args.train_data_dir} is not a folder.")
    args.dataset = args.train_data_dir or args.dataset_name or "digits"
    return args.dataset


def _overlap(a: str, b: str) -> bool:
    """Whether folders ``a`` and ``b`` are the same, or one lies inside the other."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)



def add_teacher_args(parser: argparse.ArgumentParser, title: str = "teacher"):
    """The EDM teacher flags of the distillation scripts (``--pretrained_model_name_or_path`` / ``--teacher``,
    ``--revision``, ``--variant``, ``--teacher_dataset``), in a group titled ``title``; returns the group."""
    t = parser.add_argument_group(title)
    t.add_argument("--pretrained_model_name_or_path", "--teacher", dest="pretrained_model_name_or_path",
                   required=True, help="The EDM teacher: output folder of train_edm_teacher.py or a Hub id.")
    t.add_argument("--revision", default=None, help="Revision (branch, tag or commit) of a Hub teacher.")
    t.add_argument("--variant", default=None, help='Weight-file variant of the teacher (e.g. "fp16").')
    t.add_argument("--teacher_dataset", default=None,
                   help="Where the teacher's training data lives now, if it moved since the teacher was trained.")
    return t


def validate_training_args(parser: argparse.ArgumentParser, args, protected_paths=()) -> None:
    """Check the runner's flags; ``protected_paths`` (the run's teacher and data, where they are local folders) must
    not be, hold or lie inside ``--output_dir``. Exits with ``parser.error`` (one line, status 2) on the first bad
    flag."""
    positive = ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                "logging_steps", "lr_num_cycles")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.validation_steps is None:
        args.validation_steps = args.checkpointing_steps
    elif args.validation_steps < 1:
        parser.error(f"--validation_steps must be at least 1, got {args.validation_steps}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}.")
    if not args.learning_rate > 0:
        parser.error(f"--learning_rate must be positive, got {args.learning_rate}.")
    for name in ("lr_warmup_steps", "num_validation_images", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative, got {getattr(args, name)}.")
    if not args.max_grad_norm >= 0:
        parser.error(f"--max_grad_norm must not be negative (0 disables clipping), got {args.max_grad_norm}.")
    if args.lr_scheduler == "constant" and args.lr_warmup_steps > 0:
        parser.error("--lr_warmup_steps has no effect with --lr_scheduler constant; use constant_with_warmup.")
    if not (0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1) or not args.adam_epsilon > 0:
        parser.error("--adam_beta1 and --adam_beta2 must lie in [0, 1) and --adam_epsilon must be positive.")
    if args.adam_weight_decay < 0:
        parser.error(f"--adam_weight_decay must not be negative, got {args.adam_weight_decay}.")
    if args.ema_decay is not None and args.ema_sigma_rel is not None:
        parser.error("pass --ema_sigma_rel (power-function EMA) or --ema_decay (constant decay), not both.")
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        parser.error(f"--ema_decay must lie in [0, 1), got {args.ema_decay}.")
    if args.ema_sigma_rel is not None and not 0 < args.ema_sigma_rel <= MAX_SIGMA_REL:
        parser.error(f"--ema_sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}], got {args.ema_sigma_rel}.")
    if args.ema_warmup and args.ema_decay is None:
        parser.error("--ema_warmup applies to the constant-decay EMA: pass --ema_decay too.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            parser.error("--use_8bit_adam needs bitsandbytes: pip install 'diffusers-memdistill[8bit]'.")
    if args.push_to_hub:
        # Checked before training starts, so that hours of work never end in a refused upload.
        from ..hub import validate_hub_repo_id

        if not args.hub_model_id:
            parser.error("--push_to_hub needs --hub_model_id USER/NAME.")
        try:
            validate_hub_repo_id(args.hub_model_id)
        except ValueError as exc:
            parser.error(f"--hub_model_id: {exc}")
        from huggingface_hub import get_token

        if not (args.hub_token or get_token()):
            parser.error("--push_to_hub needs a Hugging Face token: log in with `hf auth login`, set HF_TOKEN or "
                         "pass --hub_token.")
        if args.push_without_audit and (args.push_audit_num_samples is not None
                                        or args.push_audit_metrics is not None):
            parser.error("--push_audit_num_samples and --push_audit_metrics set the audit that --push_without_audit "
                         "skips: pass one or the other.")
        if args.push_audit_num_samples is not None and args.push_audit_num_samples < 2:
            parser.error(f"--push_audit_num_samples must be at least 2, got {args.push_audit_num_samples}.")
        from ..hub_audit import parse_audit_metrics

        try:
            parse_audit_metrics(args.push_audit_metrics)
        except ValueError as exc:
            parser.error(f"--push_audit_metrics: {exc}")
    elif args.hub_model_id or args.hub_token or args.push_without_audit or args.push_audit_num_samples is not None \
            or args.push_audit_metrics is not None:
        parser.error("--hub_model_id, --hub_token, --push_audit_num_samples, --push_audit_metrics and "
                     "--push_without_audit are used with --push_to_hub.")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir deletes the run that --resume_from_checkpoint continues: pass one.")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} is a file, not a folder.")
    try:
        refuse_overlap(args.output_dir, protected_paths)
    except ValueError as exc:
        parser.error(str(exc))


def refuse_overlap(output_dir: str, inputs) -> None:
    """Raise `ValueError` if ``output_dir`` is, holds or lies inside one of the local folders ``inputs`` (the run's
    teacher and data): overwriting or pruning the output would then destroy them."""
    for path in inputs:
        if path and os.path.isdir(path) and _overlap(output_dir, path):
            raise ValueError(f"--output_dir {output_dir} is, holds or lies inside {path}, an input of this run.")
