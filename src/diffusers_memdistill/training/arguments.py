"""Command-line flags shared by the training scripts (diffusers-examples names)."""

import argparse


def add_common_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", required=True, help="Folder of the saved pipeline, checkpoints and samples.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start a new run in an output_dir that already holds a model or checkpoints (deletes them).")
    g.add_argument("--seed", type=int, default=0, help="Seed of data order, noise and initialisation.")
    g.add_argument("--max_train_steps", type=int, required=True, help="Number of optimizer steps.")
    g.add_argument("--train_batch_size", type=int, default=64, help="Batch size per process.")
    g.add_argument("--learning_rate", type=float, default=None, help="Learning rate (script-specific default).")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear learning-rate warm-up steps.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="Mixed precision; defaults to the accelerate config.")
    g.add_argument("--cpu", action="store_true",
                   help="Run on the CPU even where a GPU is present; several processes then talk through gloo "
                        "(e.g. `accelerate launch --multi_gpu --num_processes 2 SCRIPT --cpu`).")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--compile", action="store_true", help="torch.compile the network (GPU).")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help='Continue a run: "latest" or a checkpoint folder. Resuming is never implicit.')
    g.add_argument("--report_to", default="tensorboard",
                   help='Trackers for accelerate ("tensorboard", "wandb", "all" or "none").')
    g.add_argument("--logging_steps", type=int, default=10, help="Log the loss every N steps.")
    g.add_argument("--num_validation_images", type=int, default=16,
                   help="Fixed-seed samples saved as a grid at every checkpoint (0 disables).")
    e = parser.add_argument_group("EMA")
    e.add_argument("--ema_decay", type=float, default=0.999, help="Decay of the EMA weights that are saved.")
    e.add_argument("--ema_warmup", action="store_true", help="Use decay min(ema_decay, (1+k)/(10+k)) at step k.")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="digits",
                   help='"digits" (built in), an imagefolder / save_to_disk directory, or a Hugging Face dataset name.')
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
