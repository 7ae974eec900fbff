#!/usr/bin/env python
"""Distil an EDM teacher into a consistency student (consistency distillation, Song et al. 2023; 000 §3.2, App. B.1).

    accelerate launch training_scripts/distill_consistency.py --teacher runs/teacher --output_dir runs/cd \
        --max_train_steps 5000 --loss lpips

    python training_scripts/distill_consistency.py ...     # one process, same flags
    accelerate launch --multi_gpu --num_processes 2 training_scripts/distill_consistency.py ... --cpu   # CPU, gloo

The student starts from the teacher's weights (or, with --student_init random / --student_layers_per_block, from a
random or shallower network, 000 App. D.3) and is trained on the teacher's exact training set with the discrete CD
loss: one teacher Heun step between neighbouring Karras levels, a stop-gradient target network that is the
mu-EMA of the student. The saved folder loads with `ConsistencyStudentPipeline.from_pretrained(dir)` or, without
this package, `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`, and carries the teacher's
`training_set.json` for `memdistill evaluate`.
"""

import argparse
import os
import sys

import torch
from tqdm.auto import tqdm

from diffusers_memdistill.data import images_to_model_range
from diffusers_memdistill.losses.consistency import (
    LPIPS_NETS,
    WEIGHTINGS,
    ConsistencyDistillationLoss,
    build_lpips_distance,
)
from diffusers_memdistill.models.denoiser import ConsistencyDenoiser, EDMDenoiser
from diffusers_memdistill.pipelines.pipeline_consistency import ConsistencyStudentPipeline
from diffusers_memdistill.schedulers.scheduling_consistency import ConsistencyStudentScheduler
from diffusers_memdistill.training.arguments import add_common_training_args
from diffusers_memdistill.training.distillation import build_student_unet, file_sha256, load_edm_teacher
from diffusers_memdistill.training.utils import (
    batch_indices,
    ema_decay_at,
    init_trackers,
    jsonable,
    list_checkpoints,
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
    # CM recipe (SPEC §2): evaluation EMA 0.9999, no gradient clipping, warm-up, decay or weight decay.
    parser.set_defaults(ema_decay=0.9999, max_grad_norm=0.0)
    t = parser.add_argument_group("teacher and student")
    t.add_argument("--teacher", required=True, help="Output folder of train_edm_teacher.py (an EDMPipeline).")
    t.add_argument("--teacher_dataset", default=None,
                   help="Where the teacher's training data lives now, if it moved since the teacher was trained.")
    t.add_argument("--student_init", choices=["teacher", "random"], default="teacher",
                   help="Start from the teacher's weights (the papers' choice) or from a random network (000 D.3).")
    t.add_argument("--student_layers_per_block", type=int, default=None,
                   help="Residual blocks per level of the student (default: the teacher's); with --student_init "
                        "teacher the matching parameters are copied (000 D.3).")
    c = parser.add_argument_group("consistency distillation")
    c.add_argument("--num_scales", type=int, default=18,
                   help="N, Karras levels of the CD grid (18 CIFAR-10, 40 ImageNet).")
    c.add_argument("--loss", choices=["lpips", "l2", "pseudo_huber"], default="lpips",
                   help="Distance d of the CD loss (LPIPS as in 000 and CM).")
    c.add_argument("--lpips_net", choices=LPIPS_NETS, default="vgg", help="LPIPS backbone (vgg as in the CM code).")
    c.add_argument("--huber_c", type=float, default=None, help="Pseudo-Huber c (default 0.00054 * sqrt(d), iCT).")
    c.add_argument("--weighting", choices=WEIGHTINGS, default="uniform", help="Loss weight lambda(t_n).")
    c.add_argument("--target_ema", type=float, default=0.95, help="mu, EMA decay of the target network.")
    c.add_argument("--optimizer", choices=["radam", "adam"], default="radam")
    c.add_argument("--adam_beta1", type=float, default=0.9)
    c.add_argument("--adam_beta2", type=float, default=0.999)
    c.add_argument("--adam_epsilon", type=float, default=1e-8)
    c.add_argument("--validation_sigma", type=float, default=None,
                   help="Intermediate noise level of the 2-step validation samples (default: the scheduler's).")
    args = parser.parse_args(argv)
    if args.learning_rate is None:
        args.learning_rate = 4e-4  # CM, CIFAR-10
    for name in ("max_train_steps", "train_batch_size", "checkpointing_steps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive.")
    if args.num_scales < 2:
        parser.error("--num_scales must be at least 2.")
    if not 0 <= args.target_ema < 1:
        parser.error("--target_ema must lie in [0, 1).")
    return args


def fingerprint(args, unet, teacher_sha256, training_set, num_processes):
    """What a resumed run must share with the run that wrote the checkpoint."""
    keys = ("seed", "train_batch_size", "learning_rate", "lr_warmup_steps", "max_grad_norm", "num_scales", "loss",
            "lpips_net", "huber_c", "weighting", "target_ema", "ema_decay", "ema_warmup", "optimizer", "adam_beta1",
            "adam_beta2", "adam_epsilon", "student_init", "student_layers_per_block")
    return jsonable({
        **{k: getattr(args, k) for k in keys},
        "global_batch_size": args.train_batch_size * num_processes,
        "unet_config": {k: v for k, v in unet.config.items() if not k.startswith("_")},
        "teacher_sha256": teacher_sha256,
        "training_set_sha256": training_set.record["sha256"],
        "training_set_examples": training_set.record["num_examples"],
    })


@torch.no_grad()
def sample_grids(ema_unet, scheduler, args, num_classes, device, prefix):
    """Fixed-seed 1-step and 2-step samples of the EMA weights (same seeds at every checkpoint)."""
    pipeline = ConsistencyStudentPipeline(ema_unet, scheduler)
    pipeline.set_progress_bar_config(disable=True)
    n = args.num_validation_images
    labels = [i % num_classes for i in range(n)] if num_classes else None
    grids = {}
    for name, steps in (("1-step", 1), ("2-step", 2 if args.validation_sigma is None else [args.validation_sigma])):
        generators = [torch.Generator(device).manual_seed(args.seed + i) for i in range(n)]
        images = pipeline(batch_size=n, class_labels=labels, generator=generators, num_inference_steps=steps,
                          output_type="pt").images
        grids[name] = images
        save_image_grid(images, f"{prefix}-{name}.png")
    return grids


def diverged(step, output_dir, what):
    found = list_checkpoints(output_dir)
    kept = f"the last good checkpoint is {found[-1][1]}" if found else "no checkpoint had been written yet"
    return FloatingPointError(
        f"{what} at step {step}: the student diverged, so training stops; {kept}. Resume from it with a lower "
        "--learning_rate (or another --loss / --weighting)."
    )


def main(args):
    # 1. Accelerator, output folder (never silently overwritten), seeds.
    accelerator = make_accelerator(args)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # 2. The teacher and its exact training set (checked before anything is written).
    teacher_pipeline, training_set = load_edm_teacher(args.teacher, args.teacher_dataset)
    teacher_unet = teacher_pipeline.unet.to(device).eval().requires_grad_(False)
    sched_cfg = teacher_pipeline.scheduler.config
    num_classes = teacher_unet.config.num_class_embeds or 0
    if num_classes and training_set.labels is None:
        raise ValueError(f"The teacher in {args.teacher} is class-conditional but its training set has no labels.")
    images = images_to_model_range(training_set.images).to(device)
    labels = training_set.labels.to(device) if num_classes else None
    examples = training_set.expanded_indices().to(device)
    teacher_sha256 = file_sha256(os.path.join(args.teacher, "unet", "diffusion_pytorch_model.safetensors"))
    lpips = build_lpips_distance(args.lpips_net).to(device) if args.loss == "lpips" else None
    if accelerator.is_main_process:
        prepare_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    accelerator.wait_for_everyone()

    # 3. Student (from the teacher by default), target network (mu-EMA), evaluation EMA, RAdam.
    unet, copied = build_student_unet(teacher_unet, args.student_init, args.student_layers_per_block, args.seed)
    target_unet = make_ema(unet).train()  # train mode: sees the student's dropout masks, as in the CM code
    ema_unet = make_ema(unet)
    optimizer_class = torch.optim.RAdam if args.optimizer == "radam" else torch.optim.Adam
    optimizer = optimizer_class(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                eps=args.adam_epsilon)
    run_fingerprint = fingerprint(args, unet, teacher_sha256, training_set, world)

    # 4. Explicit resume: student, target, EMA, optimizer; data order and noise follow from the step alone.
    first_step = 0
    if args.resume_from_checkpoint:
        path = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        state = load_checkpoint(path, {"unet": unet, "target_unet": target_unet, "ema_unet": ema_unet},
                                {"optimizer": optimizer}, run_fingerprint)
        first_step = state["step"]
        accelerator.print(f"Resumed from {path} at step {first_step}.")
    lr_scheduler = warmup_lr_scheduler(optimizer, args.learning_rate, args.lr_warmup_steps, first_step)
    target_unet.to(device)
    ema_unet.to(device)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    train_unet = torch.compile(unet) if args.compile else unet
    student = ConsistencyDenoiser(train_unet, sched_cfg.sigma_data, sched_cfg.sigma_min)
    target = ConsistencyDenoiser(target_unet, sched_cfg.sigma_data, sched_cfg.sigma_min)
    teacher = EDMDenoiser(teacher_unet, sched_cfg.sigma_data)
    loss_fn = ConsistencyDistillationLoss(
        args.num_scales, sched_cfg.sigma_min, sched_cfg.sigma_max, sched_cfg.rho, sched_cfg.sigma_data,
        distance=args.loss, huber_c=args.huber_c, weighting=args.weighting, lpips=lpips,
    )
    student_scheduler = ConsistencyStudentScheduler(
        sigma_min=sched_cfg.sigma_min, sigma_max=sched_cfg.sigma_max, rho=sched_cfg.rho, sigma_data=sched_cfg.sigma_data
    )

    if accelerator.is_main_process:
        training_set.save(args.output_dir)
        init_trackers(accelerator, "consistency_distillation", args)
    n_params = sum(p.numel() for p in unet.parameters())
    accelerator.print(
        f"Distilling {args.teacher} on {len(training_set)} images "
        f"({training_set.record['num_examples']} with repeats): "
        f"student {n_params / 1e6:.2f}M parameters ({args.student_init} init, {copied} tensors copied from the "
        f"teacher), N = {args.num_scales}, loss {args.loss}, {world} process(es)."
    )

    # 5. Training loop (CD loss, target mu-EMA, evaluation EMA), with checkpoints and sample grids.
    progress = tqdm(range(first_step, args.max_train_steps), initial=first_step, total=args.max_train_steps,
                    disable=not accelerator.is_local_main_process, desc="Consistency distillation")
    for step in progress:
        idx = examples[batch_indices(step, args.train_batch_size, world, rank, len(examples), args.seed).to(device)]
        generator = step_generator(args.seed, step, rank, device)
        unet.train()
        with accelerator.autocast():  # the teacher and the target are not wrapped by accelerate
            loss, _ = loss_fn(student, target, teacher, images[idx], None if labels is None else labels[idx], generator)
        loss = loss.mean()
        # Every process stops together (a lone stop would hang the others in the gradient all-reduce).
        if not bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all()):
            raise diverged(step + 1, args.output_dir, "Non-finite consistency loss")
        accelerator.backward(loss)
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        online = accelerator.unwrap_model(unet)
        update_ema(target_unet, online, args.target_ema)  # theta- <- stopgrad(mu theta- + (1 - mu) theta)
        update_ema(ema_unet, online, ema_decay_at(step, args.ema_decay, args.ema_warmup))

        done = step + 1
        if done % args.logging_steps == 0 or done == args.max_train_steps:
            logged = accelerator.reduce(loss.detach(), reduction="mean").item()
            progress.set_postfix(loss=f"{logged:.4g}")
            accelerator.log({"loss": logged, "lr": lr_scheduler.get_last_lr()[0]}, step=done)
        if done % args.checkpointing_steps == 0 or done == args.max_train_steps:
            accelerator.wait_for_everyone()
            if not all(bool(torch.isfinite(p).all()) for p in online.parameters()):
                raise diverged(done, args.output_dir, "Non-finite student weights")
            if accelerator.is_main_process:
                save_checkpoint(args.output_dir, done,
                                {"unet": online, "target_unet": target_unet, "ema_unet": ema_unet},
                                {"optimizer": optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer},
                                run_fingerprint, total_limit=args.checkpoints_total_limit)
                if args.num_validation_images > 0:
                    grids = sample_grids(ema_unet, student_scheduler, args, num_classes, device,
                                         os.path.join(args.output_dir, "samples", f"step-{done:07d}"))
                    for name, grid_images in grids.items():
                        log_images(accelerator, f"samples/{name}", grid_images, done)
            accelerator.wait_for_everyone()

    # 6. Final student pipeline with the EMA weights, the teacher's training-set record and the resolved config.
    if accelerator.is_main_process:
        pipeline = ConsistencyStudentPipeline(ema_unet.to("cpu"), student_scheduler)
        save_pipeline_atomically(pipeline, args.output_dir, {
            "training_set.json": training_set.record,
            "training_config.json": jsonable({**vars(args), "script": "distill_consistency.py", "num_processes": world,
                                              "teacher_sha256": teacher_sha256}),
        })
        accelerator.print(f"Saved the consistency student pipeline to {args.output_dir}.")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
