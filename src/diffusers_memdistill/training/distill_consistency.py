"""Distil an EDM teacher into a consistency student (consistency distillation, Song et al. 2023; 000 §3.2, App. B.1).

    accelerate launch training_scripts/distill_consistency.py --pretrained_model_name_or_path runs/teacher \\
        --output_dir runs/cd --max_train_steps 5000 --loss lpips

    python training_scripts/distill_consistency.py ...     # one process, same flags
    accelerate launch --multi_gpu --num_processes 2 training_scripts/distill_consistency.py ... --cpu   # CPU, gloo

The student starts from the teacher's weights (or, with --student_init random / --student_layers_per_block, from a
random or shallower network, 000 App. D.3) and is trained on the teacher's exact training set with the discrete CD
loss: one teacher Heun step between neighbouring Karras levels, a stop-gradient target network that is the
mu-EMA of the student. The saved folder loads with `ConsistencyStudentPipeline.from_pretrained(dir)` or, without
this package, `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`, and carries the teacher's
`training_set.json` for `memdistill evaluate`. The loop is `training.runner.TrainingRunner`'s.
"""

from __future__ import annotations

import argparse

import torch

from ..losses.consistency import LPIPS_NETS, WEIGHTINGS, ConsistencyDistillationLoss, build_lpips_distance
from ..models.denoiser import ConsistencyDenoiser, EDMDenoiser
from ..pipelines.pipeline_consistency import ConsistencyStudentPipeline
from ..schedulers.scheduling_consistency import ConsistencyStudentScheduler
from .arguments import add_teacher_args, add_training_args, validate_training_args
from .distillation import build_student_unet, load_teacher_for_distillation
from .ema import ModelEMA
from .runner import Average, Phase, TrainingPlan, TrainingRunner, build_optimizer
from .utils import validation_images

SCRIPT = "distill_consistency.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # CM recipe (SPEC §2): learning rate 4e-4 (CIFAR-10), no gradient clipping, warm-up, decay or weight decay.
    add_training_args(parser, learning_rate=4e-4, tracker_project_name="consistency_distillation", max_grad_norm=0.0)
    t = add_teacher_args(parser, "teacher and student")
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
    c.add_argument("--validation_sigma", type=float, default=None,
                   help="Intermediate noise level of the 2-step validation samples (default: the scheduler's).")
    args = parser.parse_args(argv)
    teacher = args.pretrained_model_name_or_path
    validate_training_args(parser, args, protected_paths=[teacher, args.teacher_dataset])
    if args.num_scales < 2:
        parser.error("--num_scales must be at least 2.")
    if not 0 <= args.target_ema < 1:
        parser.error("--target_ema must lie in [0, 1).")
    if args.student_layers_per_block is not None and args.student_layers_per_block < 1:
        parser.error("--student_layers_per_block must be at least 1.")
    if args.use_8bit_adam and args.optimizer == "radam":
        parser.error("--use_8bit_adam takes --optimizer adam (bitsandbytes has no 8-bit RAdam).")
    return args


def build_plan(args, teacher_pipeline, training_set, teacher_sha256: str, lpips=None) -> TrainingPlan:
    """The student, its target network (mu-EMA, in train mode: it sees the student's dropout masks, as in the CM
    code) and its saved EMA, the frozen teacher, and the CD step."""
    teacher_unet = teacher_pipeline.unet.eval().requires_grad_(False)
    sched_cfg = teacher_pipeline.scheduler.config
    num_classes = teacher_unet.config.num_class_embeds or 0
    if num_classes and training_set.labels is None:
        raise ValueError("The teacher is class-conditional but its training set has no labels.")
    unet, copied = build_student_unet(teacher_unet, args.student_init, args.student_layers_per_block, args.seed)
    target = ModelEMA(unet, decay=args.target_ema, train_mode=True)  # theta- <- stopgrad(mu theta- + (1 - mu) theta)
    ema = ModelEMA(unet, sigma_rel=args.ema_sigma_rel, decay=args.ema_decay, warmup=args.ema_warmup)
    loss_fn = ConsistencyDistillationLoss(
        args.num_scales, sched_cfg.sigma_min, sched_cfg.sigma_max, sched_cfg.rho, sched_cfg.sigma_data,
        distance=args.loss, huber_c=args.huber_c, weighting=args.weighting, lpips=lpips,
    )
    student_scheduler = ConsistencyStudentScheduler(
        sigma_min=sched_cfg.sigma_min, sigma_max=sched_cfg.sigma_max, rho=sched_cfg.rho, sigma_data=sched_cfg.sigma_data
    )

    def step(nets, batch, generator):
        student = ConsistencyDenoiser(nets["unet"], sched_cfg.sigma_data, sched_cfg.sigma_min)
        target_fn = ConsistencyDenoiser(nets["target_unet"], sched_cfg.sigma_data, sched_cfg.sigma_min)
        teacher = EDMDenoiser(nets["teacher"], sched_cfg.sigma_data)
        labels = batch.get("class_labels") if num_classes else None
        return loss_fn(student, target_fn, teacher, batch["pixel_values"], labels, generator)

    @torch.no_grad()
    def validate(nets, _step):
        pipeline = ConsistencyStudentPipeline(nets["ema_unet"], student_scheduler)
        two_step = 2 if args.validation_sigma is None else [args.validation_sigma]
        return {name: validation_images(pipeline, args.num_validation_images, num_classes, args.seed,
                                        num_inference_steps=steps)
                for name, steps in (("1-step", 1), ("2-step", two_step))}

    def export(nets):
        return ConsistencyStudentPipeline(nets["ema_unet"].to("cpu"), student_scheduler), {}

    config = {"teacher": args.pretrained_model_name_or_path, "teacher_sha256": teacher_sha256}
    lpips_sha256 = getattr(lpips, "weights_sha256", None)
    if lpips_sha256 is not None:
        config["lpips_sha256"] = lpips_sha256
    keys = ("num_scales", "loss", "lpips_net", "huber_c", "weighting", "target_ema", "optimizer", "student_init",
            "student_layers_per_block")
    n_params = sum(p.numel() for p in unet.parameters())
    return TrainingPlan(
        models={"unet": unet},
        phases=[Phase("unet", build_optimizer(args.optimizer, unet.parameters(), args), step)],
        averages={"target_unet": Average("unet", target), "ema_unet": Average("unet", ema)},
        frozen={"teacher": teacher_unet, **({"lpips": lpips} if lpips is not None else {})},
        fingerprint={**{k: getattr(args, k) for k in keys}, "teacher_sha256": teacher_sha256,
                     "lpips_sha256": lpips_sha256},
        validate=validate, export=export, config=config,
        description=(
            f"Distilling {args.pretrained_model_name_or_path} on {len(training_set)} images "
            f"({training_set.record['num_examples']} with repeats): student {n_params / 1e6:.2f}M parameters "
            f"({args.student_init} init, {copied} tensors copied from the teacher), N = {args.num_scales}, "
            f"loss {args.loss}"),
    )


def main(args) -> int:
    # 1. Accelerator, output folder and resume checks (nothing is written yet).
    runner = TrainingRunner(args, SCRIPT)
    # 2. The teacher and its exact training set (checked before anything is written), rank 0 first.
    folder, teacher_pipeline, training_set, teacher_sha256 = load_teacher_for_distillation(
        args, runner.main_process_first)
    lpips = build_lpips_distance(args.lpips_net) if args.loss == "lpips" else None
    # 3. Student, target, EMA and optimizer; the runner distils and saves the EMA as the pipeline.
    runner.train(build_plan(args, teacher_pipeline, training_set, teacher_sha256, lpips), training_set)
    return 0
