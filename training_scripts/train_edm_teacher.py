#!/usr/bin/env python
"""Train an EDM pixel-space teacher (Karras et al. 2022) on a small, exactly recorded training set.

    accelerate launch training_scripts/train_edm_teacher.py --dataset digits --resolution 16 \
        --num_train_images 200 --model_preset small --max_train_steps 5000 --output_dir runs/teacher

    python training_scripts/train_edm_teacher.py ...      # one process, same flags

The saved folder loads with `EDMPipeline.from_pretrained(dir)` or, without this package,
`DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`; `training_set.json` beside it records the
exact training images for `memdistill evaluate`.
"""

import argparse
import os
import sys

import torch
from tqdm.auto import tqdm

from diffusers_memdistill.data import build_training_set, images_to_model_range
from diffusers_memdistill.losses.edm import EDMLoss
from diffusers_memdistill.models.denoiser import EDMDenoiser
from diffusers_memdistill.models.presets import UNET_PRESETS, build_unet
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler
from diffusers_memdistill.training.arguments import add_common_training_args, add_data_args
from diffusers_memdistill.training.utils import (
    batch_indices,
    ema_decay_at,
    init_trackers,
    jsonable,
    load_checkpoint,
    log_images,
    make_accelerator,
    make_ema,
    prepare_output_dir,
    resolve_checkpoint,
    save_checkpoint,
    save_image_grid,
    save_pipeline_atomically,
    step_generator,
    update_ema,
    warmup_lr_scheduler,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_training_args(parser)
    add_data_args(parser)
    m = parser.add_argument_group("model and loss")
    m.add_argument("--model_preset", choices=sorted(UNET_PRESETS), default="small",
                   help="UNet size: tiny (tests), small (digits), base (~9M), ddpmpp (~59M, the papers' scale).")
    m.add_argument("--class_conditional", action="store_true", help="Condition on class labels.")
    m.add_argument("--dropout", type=float, default=None, help="Override the preset's dropout.")
    m.add_argument("--sigma_data", type=float, default=0.5)
    m.add_argument("--P_mean", type=float, default=-1.2)
    m.add_argument("--P_std", type=float, default=1.2)
    m.add_argument("--adam_beta1", type=float, default=0.9)
    m.add_argument("--adam_beta2", type=float, default=0.999)
    m.add_argument("--adam_epsilon", type=float, default=1e-8)
    m.add_argument("--validation_inference_steps", type=int, default=18, help="Heun steps of the sample grids.")
    args = parser.parse_args(argv)
    if args.learning_rate is None:
        args.learning_rate = 2e-4
    for name in ("max_train_steps", "train_batch_size", "checkpointing_steps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive.")
    return args


def fingerprint(args, unet, training_set, num_processes):
    """What a resumed run must share with the run that wrote the checkpoint."""
    keys = ("seed", "train_batch_size", "learning_rate", "lr_warmup_steps", "max_grad_norm", "sigma_data", "P_mean",
            "P_std", "ema_decay", "ema_warmup", "adam_beta1", "adam_beta2", "adam_epsilon")
    return jsonable({
        **{k: getattr(args, k) for k in keys},
        "global_batch_size": args.train_batch_size * num_processes,
        "unet_config": {k: v for k, v in unet.config.items() if not k.startswith("_")},
        "training_set_sha256": training_set.record["sha256"],
        "training_set_examples": training_set.record["num_examples"],
    })


@torch.no_grad()
def sample_grid(ema_unet, args, num_classes, device, path):
    """Fixed-seed samples of the EMA weights (same seeds at every checkpoint)."""
    pipeline = EDMPipeline(ema_unet, EDMHeunScheduler(sigma_data=args.sigma_data))
    pipeline.set_progress_bar_config(disable=True)
    n = args.num_validation_images
    generators = [torch.Generator(device).manual_seed(args.seed + i) for i in range(n)]
    labels = [i % num_classes for i in range(n)] if num_classes else None
    images = pipeline(batch_size=n, class_labels=labels, generator=generators,
                      num_inference_steps=args.validation_inference_steps, output_type="pt").images
    return save_image_grid(images, path), images


def main(args):
    # 1. Accelerator, output folder (never silently overwritten), seeds.
    accelerator = make_accelerator(args)
    if accelerator.is_main_process:
        prepare_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    accelerator.wait_for_everyone()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # 2. The exact training set (subset / localized-memorization construction), recorded next to the model.
    training_set = build_training_set(
        args.dataset, args.resolution, args.dataset_split, args.channels, args.num_train_images, args.data_seed,
        args.repeat_classes, args.repeat_images_per_class, args.repeat_times, args.num_other_images,
    )
    if args.class_conditional and training_set.labels is None:
        raise ValueError(f"--class_conditional needs class labels, and {args.dataset} has none.")
    num_classes = training_set.num_classes if args.class_conditional else 0
    images = images_to_model_range(training_set.images).to(device)
    labels = training_set.labels.to(device) if num_classes else None
    examples = training_set.expanded_indices().to(device)

    # 3. Network F, its EMA, optimizer and warm-up schedule; the EDM denoiser D wraps F.
    torch.manual_seed(args.seed)
    unet = build_unet(args.model_preset, args.resolution, training_set.images.shape[1], num_classes, args.dropout)
    ema_unet = make_ema(unet)
    optimizer = torch.optim.Adam(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                 eps=args.adam_epsilon)
    run_fingerprint = fingerprint(args, unet, training_set, world)

    # 4. Explicit resume: weights, EMA, optimizer; data order and noise follow from the step alone.
    first_step = 0
    if args.resume_from_checkpoint:
        path = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        state = load_checkpoint(path, {"unet": unet, "ema_unet": ema_unet}, {"optimizer": optimizer}, run_fingerprint)
        first_step = state["step"]
        accelerator.print(f"Resumed from {path} at step {first_step}.")
    lr_scheduler = warmup_lr_scheduler(optimizer, args.learning_rate, args.lr_warmup_steps, first_step)
    ema_unet.to(device)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    train_unet = torch.compile(unet) if args.compile else unet
    denoiser = EDMDenoiser(train_unet, args.sigma_data)
    loss_fn = EDMLoss(args.P_mean, args.P_std, args.sigma_data)

    if accelerator.is_main_process:
        training_set.save(args.output_dir)
        init_trackers(accelerator, "edm_teacher", args)
    accelerator.print(
        f"Training on {len(training_set)} images ({training_set.record['num_examples']} with repeats), "
        f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, {world} process(es)."
    )

    # 5. Training loop (EDM loss, gradient clipping, EMA), with checkpoints and sample grids.
    progress = tqdm(range(first_step, args.max_train_steps), initial=first_step, total=args.max_train_steps,
                    disable=not accelerator.is_local_main_process, desc="EDM teacher")
    for step in progress:
        idx = examples[batch_indices(step, args.train_batch_size, world, rank, len(examples), args.seed).to(device)]
        generator = step_generator(args.seed, step, rank, device)
        unet.train()
        loss, _ = loss_fn(denoiser, images[idx], None if labels is None else labels[idx], generator)
        loss = loss.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Non-finite loss at step {step}; the last checkpoint is kept intact.")
        accelerator.backward(loss)
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema_unet, accelerator.unwrap_model(unet), ema_decay_at(step, args.ema_decay, args.ema_warmup))

        done = step + 1
        if done % args.logging_steps == 0 or done == args.max_train_steps:
            logged = accelerator.reduce(loss.detach(), reduction="mean").item()
            progress.set_postfix(loss=f"{logged:.4f}")
            accelerator.log({"loss": logged, "lr": lr_scheduler.get_last_lr()[0]}, step=done)
        if done % args.checkpointing_steps == 0 or done == args.max_train_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(args.output_dir, done, {"unet": accelerator.unwrap_model(unet), "ema_unet": ema_unet},
                                {"optimizer": optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer},
                                run_fingerprint, total_limit=args.checkpoints_total_limit)
                if args.num_validation_images > 0:
                    grid, grid_images = sample_grid(ema_unet, args, num_classes, device,
                                                    os.path.join(args.output_dir, "samples", f"step-{done:07d}.png"))
                    log_images(accelerator, "samples", grid_images, done)
            accelerator.wait_for_everyone()

    # 6. Final pipeline with the EMA weights, the training-set record and the resolved config, written atomically.
    if accelerator.is_main_process:
        pipeline = EDMPipeline(ema_unet.to("cpu"), EDMHeunScheduler(sigma_data=args.sigma_data))
        save_pipeline_atomically(pipeline, args.output_dir, {
            "training_set.json": training_set.record,
            "training_config.json": jsonable({**vars(args), "script": "train_edm_teacher.py", "num_processes": world}),
        })
        accelerator.print(f"Saved the teacher pipeline to {args.output_dir}.")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
