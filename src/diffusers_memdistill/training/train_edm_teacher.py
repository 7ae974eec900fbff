"""Train an EDM pixel-space teacher (Karras et al. 2022) on a small, exactly recorded training set.

    accelerate launch training_scripts/train_edm_teacher.py --dataset_name digits --resolution 16 \\
        --num_train_images 200 --model_preset small --max_train_steps 5000 --output_dir runs/teacher

    python training_scripts/train_edm_teacher.py ...      # one process, same flags

The saved folder loads with `EDMPipeline.from_pretrained(dir)` or, without this package,
`DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`; `training_set.json` beside it records the
exact training images for `memdistill evaluate`. The loop is `training.runner.TrainingRunner`'s.
"""

from __future__ import annotations

import argparse

import torch

from ..data import build_training_set
from ..losses.edm import EDMLoss
from ..models.denoiser import EDMDenoiser
from ..models.presets import UNET_PRESETS, build_unet
from ..pipelines.pipeline_edm import EDMPipeline
from ..schedulers.scheduling_edm_heun import EDMHeunScheduler
from .arguments import add_data_args, add_training_args, resolve_dataset, validate_training_args
from .ema import ModelEMA
from .runner import Average, Phase, TrainingPlan, TrainingRunner, build_optimizer
from .utils import validation_images

SCRIPT = "train_edm_teacher.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, learning_rate=2e-4, tracker_project_name="edm_teacher")
    add_data_args(parser)
    m = parser.add_argument_group("model and loss")
    m.add_argument("--model_preset", choices=sorted(UNET_PRESETS), default="small",
                   help="UNet size: tiny (tests), small (digits), base (~9M), ddpmpp (~59M, the papers' scale).")
    m.add_argument("--class_conditional", action="store_true", help="Condition on class labels.")
    m.add_argument("--dropout", type=float, default=None, help="Override the preset's dropout.")
    m.add_argument("--sigma_data", type=float, default=0.5)
    m.add_argument("--P_mean", type=float, default=-1.2)
    m.add_argument("--P_std", type=float, default=1.2)
    m.add_argument("--validation_inference_steps", type=int, default=18, help="Heun steps of the sample grids.")
    args = parser.parse_args(argv)
    validate_training_args(parser, args, protected_paths=[resolve_dataset(parser, args)])
    if args.dropout is not None and not 0 <= args.dropout < 1:
        parser.error(f"--dropout must lie in [0, 1), got {args.dropout}.")
    if not args.sigma_data > 0 or not args.P_std > 0:
        parser.error("--sigma_data and --P_std must be positive.")
    if args.validation_inference_steps < 1:
        parser.error("--validation_inference_steps must be at least 1.")
    with torch.device("meta"):  # the preset's own rule, checked without allocating the network
        try:
            build_unet(args.model_preset, args.resolution, args.channels or 1)
        except ValueError as exc:
            parser.error(f"--resolution {args.resolution}: {exc}")
    return args


def build_plan(args, training_set) -> TrainingPlan:
    """The teacher's networks and step: F (a `UNet2DModel` of the preset) under the EDM denoiser and loss, Adam, and
    the EMA of F that is saved."""
    if args.class_conditional and training_set.labels is None:
        raise ValueError(f"--class_conditional needs class labels, and {training_set.record['dataset']} has none.")
    num_classes = training_set.num_classes if args.class_conditional else 0
    torch.manual_seed(args.seed)
    unet = build_unet(args.model_preset, args.resolution, training_set.images.shape[1], num_classes, args.dropout)
    ema = ModelEMA(unet, sigma_rel=args.ema_sigma_rel, decay=args.ema_decay, warmup=args.ema_warmup)
    loss_fn = EDMLoss(args.P_mean, args.P_std, args.sigma_data)

    def step(nets, batch, generator):
        labels = batch.get("class_labels") if num_classes else None
        return loss_fn(EDMDenoiser(nets["unet"], args.sigma_data), batch["pixel_values"], labels, generator)

    @torch.no_grad()
    def validate(nets, _step):
        pipeline = EDMPipeline(nets["ema_unet"], EDMHeunScheduler(sigma_data=args.sigma_data))
        return {"": validation_images(pipeline, args.num_validation_images, num_classes, args.seed,
                                      num_inference_steps=args.validation_inference_steps)}

    def export(nets):
        return EDMPipeline(nets["ema_unet"].to("cpu"), EDMHeunScheduler(sigma_data=args.sigma_data)), {}

    n_params = sum(p.numel() for p in unet.parameters())
    return TrainingPlan(
        models={"unet": unet},
        phases=[Phase("unet", build_optimizer("adam", unet.parameters(), args), step)],
        averages={"ema_unet": Average("unet", ema)},
        fingerprint={k: getattr(args, k) for k in ("sigma_data", "P_mean", "P_std", "class_conditional")},
        validate=validate, export=export,
        description=(f"Training on {len(training_set)} images ({training_set.record['num_examples']} with repeats), "
                     f"{n_params / 1e6:.2f}M parameters"),
    )


def main(args) -> int:
    # 1. Accelerator, output folder and resume checks (nothing is written yet).
    runner = TrainingRunner(args, SCRIPT)
    # 2. The exact training set (subset / localized-memorization construction), decoded by rank 0 first.
    with runner.main_process_first():
        training_set = build_training_set(
            args.dataset, args.resolution, args.dataset_split, args.channels, args.num_train_images, args.data_seed,
            args.repeat_classes, args.repeat_images_per_class, args.repeat_times, args.num_other_images,
        )
    # 3. Network F, its EMA and Adam; the runner trains them with the EDM loss and saves the EMA as the pipeline.
    runner.train(build_plan(args, training_set), training_set)
    return 0
