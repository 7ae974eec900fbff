"""Distil an EDM teacher into a one- or few-step generator with distribution matching distillation (DMD / DMD2).

    accelerate launch training_scripts/distill_dmd.py --pretrained_model_name_or_path runs/teacher \\
        --output_dir runs/dmd --max_train_steps 50000

    python training_scripts/distill_dmd.py ...     # one process, same flags
    accelerate launch --multi_gpu --num_processes 2 training_scripts/distill_dmd.py ... --cpu   # CPU, gloo

The generator G and the fake denoiser both start from the teacher's weights (003 App. D; DMD2). Each step:

  1. the fake denoiser takes one AdamW step of denoising score matching on fresh, detached generator samples
     (plus, with --use_gan, DMD2's discriminator loss on its bottleneck features: generator samples vs the
     teacher's training images);
  2. every --fake_updates_per_generator_update steps (after that many fake updates), the generator takes one step
     of the distribution-matching loss (real score = the frozen teacher, optionally guided; DMD2's normalised
     surrogate), plus optionally DMD1's regression loss on teacher ODE pairs and DMD2's generator GAN loss.

Noise levels are drawn from the teacher's Karras grid restricted to [--min_step_percent, --max_step_percent] of its
range (2%-98%). With --generator_sigmas the generator takes several steps, re-noising its output at those fixed
levels (DMD2's multi-step generator, trained by backward simulation). The saved folder is a `DMDGeneratorPipeline`
(`DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` without this package) with the teacher's
`training_set.json`, ready for `memdistill evaluate`. The loop is `training.runner.TrainingRunner`'s.

A Stable Diffusion teacher (a text-to-image pipeline folder or Hub id) is distilled in latent space instead, with the
flags of the "Stable Diffusion teachers" group and real guidance 1.75 by default (`training.distill_dmd_sd`); its
generator is saved as a diffusers `StableDiffusionPipeline` with an `LCMScheduler`.
"""

from __future__ import annotations

import argparse

import torch

from ..losses.consistency import build_lpips_distance
from ..losses.dmd import FAKE_SIGMA_SAMPLINGS, DMDLoss, teacher_ode_pairs
from ..models.denoiser import EDMDenoiser
from ..models.fake_score import DMDFakeScore
from .arguments import add_teacher_args, add_training_args, validate_training_args
from .distillation import build_student_unet, load_teacher_for_distillation, resolve_pretrained
from .dmd import check_sigma_range, check_update_ratio, generator_pipeline
from .ema import ModelEMA
from .finetune_sd_memorize import add_memorization_mix_args, check_memorization_mix_args
from .runner import Average, Phase, TrainingPlan, TrainingRunner, build_optimizer
from .text_to_image import add_prompt_sampling_args, check_prompt_sampling_args, is_text_to_image_folder
from .utils import validation_images

SCRIPT = "distill_dmd.py"


def _int_list(text: str) -> list:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # DMD2's recipe (003 App. D): AdamW, learning rate 2e-6 for both networks, weight decay 0.01.
    add_training_args(parser, learning_rate=2e-6, tracker_project_name="dmd_distillation", max_grad_norm=10.0)
    parser.set_defaults(adam_weight_decay=0.01, lr_warmup_steps=500)
    teacher = add_teacher_args(parser)
    for action in teacher._group_actions:
        if action.dest == "pretrained_model_name_or_path":
            action.help = ("The teacher: an EDM teacher (train_edm_teacher.py's folder) or a Stable Diffusion "
                           "text-to-image pipeline (finetune_sd_memorize.py's folder, or a Hub id), folder or Hub id.")
    d = parser.add_argument_group("distribution matching")
    d.add_argument("--fake_updates_per_generator_update", "--dfake_gen_update_ratio", type=int, default=5,
                   dest="fake_updates_per_generator_update",
                   help="Two time-scale rule: fake-denoiser updates per generator update (5 in DMD2 and 003).")
    d.add_argument("--fake_learning_rate", "--guidance_lr", type=float, default=None, dest="fake_learning_rate",
                   help="Learning rate of the fake denoiser (default: --learning_rate, as DMD2).")
    d.add_argument("--generator_sigmas", type=_float_list, default=None,
                   help="EDM teachers: comma-separated, decreasing input noise levels of a few-step generator "
                        "(default: one step from the teacher's sigma_max).")
    d.add_argument("--sigma_min", type=float, default=None, help="Lower end of the distillation's sigma range "
                   "(default: the teacher's).")
    d.add_argument("--sigma_max", type=float, default=None, help="Upper end (default: the teacher's).")
    d.add_argument("--num_train_sigmas", type=int, default=1000, help="Levels of the Karras grid sigma is drawn on.")
    d.add_argument("--min_step_percent", type=float, default=0.02, help="Drawn part of that grid: lower end.")
    d.add_argument("--max_step_percent", type=float, default=0.98, help="Drawn part of that grid: upper end.")
    d.add_argument("--fake_sigma_sampling", choices=FAKE_SIGMA_SAMPLINGS, default="karras",
                   help="Noise levels of the fake denoiser's loss: the restricted grid (DMD2) or EDM's log-normal.")
    d.add_argument("--real_guidance_scale", type=float, default=None,
                   help="Classifier-free guidance of the real score (1 = none). EDM teachers: default 1, another "
                        "value needs --unconditional_label; Stable Diffusion teachers: default 1.75 (DMD2's for SD "
                        "v1.5), the empty prompt being the unconditional branch.")
    d.add_argument("--unconditional_label", type=int, default=None,
                   help="EDM teachers: class label of the unconditional branch, for --real_guidance_scale.")
    r = parser.add_argument_group("DMD1 regression loss (off by default)")
    r.add_argument("--regression_weight", type=float, default=0.0,
                   help="Weight of the regression loss d(G(z), Phi(z)) on teacher ODE pairs (DMD1: 0.25).")
    r.add_argument("--regression_pairs", type=int, default=1024,
                   help="Number of (noise, teacher ODE output) pairs, computed once before training.")
    r.add_argument("--regression_ode_steps", type=int, default=18, help="Heun steps of the teacher's ODE for the pairs.")
    r.add_argument("--regression_loss", choices=["l2", "lpips"], default="l2",
                   help="Distance of the regression loss (DMD1: LPIPS; its weights need a download).")
    g = parser.add_argument_group("DMD2 GAN loss (off by default)")
    g.add_argument("--use_gan", action="store_true",
                   help="Train a discriminator head on the fake denoiser's bottleneck (real: the training images).")
    g.add_argument("--gan_generator_weight", "--gen_cls_loss_weight", type=float, default=3e-3,
                   dest="gan_generator_weight", help="Weight of the generator's GAN loss (DMD2: 3e-3).")
    g.add_argument("--gan_discriminator_weight", "--cls_loss_weight", type=float, default=1e-2,
                   dest="gan_discriminator_weight", help="Weight of the discriminator's loss (DMD2: 1e-2).")
    sd = parser.add_argument_group("Stable Diffusion teachers (DMD2 in latent space)")
    sd.add_argument("--generator_timesteps", type=_int_list, default=None,
                    help="Comma-separated timesteps of a K-step generator, those LCMScheduler samples for K: 999 "
                         "(default, one step) or 999,749,499,249 (four).")
    sd.add_argument("--fake_lora_rank", type=int, default=0,
                    help="Train the fake score as a LoRA of this rank on a frozen copy of the teacher's UNet (0: a "
                         "full trainable copy, as DMD2).")
    sd.add_argument("--timestep_scaling_factor", type=float, default=10.0,
                    help="timestep_scaling of the generator's boundary scalings (LCMScheduler's).")
    sd.add_argument("--cast_teacher_unet", action="store_true",
                    help="Keep the frozen teacher UNet in the --mixed_precision dtype (less memory).")
    sd.add_argument("--cache_dir", default=None,
                    help="Cache of downloaded datasets and of the encoded latents (default: the datasets cache).")
    add_memorization_mix_args(parser, required=False, memorized_help=(
        "Stable Diffusion teachers: image–caption pairs whose captions are the prompts (default: the teacher's own "
        "mix, from the memorized_set.json beside it)."))
    add_prompt_sampling_args(sd, "the generator's EMA")
    args = parser.parse_args(argv)
    teacher = args.pretrained_model_name_or_path
    validate_training_args(parser, args, protected_paths=[teacher, args.teacher_dataset, args.memorized_data,
                                                          args.extra_data])
    check_memorization_mix_args(parser, args)
    check_prompt_sampling_args(parser, args)
    if args.fake_lora_rank < 0:
        parser.error(f"--fake_lora_rank must not be negative, got {args.fake_lora_rank}.")
    if not args.timestep_scaling_factor > 0:
        parser.error(f"--timestep_scaling_factor must be positive, got {args.timestep_scaling_factor}.")
    try:
        check_update_ratio(args.fake_updates_per_generator_update)
    except ValueError as exc:
        parser.error(f"--fake_updates_per_generator_update: {exc}")
    if not 0 <= args.min_step_percent < args.max_step_percent <= 1:
        parser.error("--min_step_percent and --max_step_percent must satisfy 0 <= min < max <= 1.")
    if args.num_train_sigmas < 2:
        parser.error("--num_train_sigmas must be at least 2.")
    for flag in ("regression_weight", "gan_generator_weight", "gan_discriminator_weight"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must be >= 0.")
    if args.regression_weight > 0 and (args.regression_pairs < 1 or args.regression_ode_steps < 1):
        parser.error("--regression_pairs and --regression_ode_steps must be at least 1.")
    if args.fake_learning_rate is not None and args.fake_learning_rate <= 0:
        parser.error("--fake_learning_rate must be positive.")
    return args


@torch.no_grad()
def regression_pairs(teacher_unet, sched_cfg, shape, num_pairs: int, num_steps: int, num_classes: int, seed: int,
                     device, batch_size: int = 256):
    """DMD1's paired dataset: seeded noises z and the teacher's Heun ODE outputs Phi(z), the same on every process."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_pairs, *shape), generator=generator)
    labels = torch.randint(0, num_classes, (num_pairs,), generator=generator) if num_classes else None
    teacher = EDMDenoiser(teacher_unet.to(device), sched_cfg.sigma_data)
    targets = []
    for start in range(0, num_pairs, batch_size):
        part = slice(start, start + batch_size)
        targets.append(teacher_ode_pairs(
            teacher, noise[part].to(device), num_steps, sched_cfg.sigma_min, sched_cfg.sigma_max, sched_cfg.rho,
            class_labels=None if labels is None else labels[part].to(device)).cpu())
    return noise, labels, torch.cat(targets)


def build_plan(args, teacher_pipeline, training_set, teacher_sha256: str, device, lpips=None) -> TrainingPlan:
    """Generator and fake denoiser (both from the teacher), their two phases, the generator's EMA, the frozen
    teacher."""
    if args.real_guidance_scale is None:  # an EDM teacher's default: no guidance
        args.real_guidance_scale = 1.0
    teacher_unet = teacher_pipeline.unet.eval().requires_grad_(False)
    sched_cfg = teacher_pipeline.scheduler.config
    sigma_min, sigma_max, generator_sigmas = check_sigma_range(sched_cfg, args.sigma_min, args.sigma_max,
                                                               args.generator_sigmas)
    num_classes = teacher_unet.config.num_class_embeds or 0
    if num_classes and training_set.labels is None:
        raise ValueError("The teacher is class-conditional but its training set has no labels.")
    if args.unconditional_label is not None and not (num_classes and 0 <= args.unconditional_label < num_classes):
        raise ValueError(f"--unconditional_label {args.unconditional_label} is not a class of the teacher "
                         f"({num_classes} classes).")
    generator_unet, _ = build_student_unet(teacher_unet, "teacher", None, args.seed)
    fake_unet, _ = build_student_unet(teacher_unet, "teacher", None, args.seed)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed + 1)
        fake_net = DMDFakeScore(fake_unet, gan_head=args.use_gan).train()
    ema = ModelEMA(generator_unet, sigma_rel=args.ema_sigma_rel, decay=args.ema_decay, warmup=args.ema_warmup)
    loss_fn = DMDLoss(
        sigma_min, sigma_max, sched_cfg.rho, sched_cfg.sigma_data, num_train_sigmas=args.num_train_sigmas,
        min_fraction=args.min_step_percent, max_fraction=args.max_step_percent, generator_sigmas=generator_sigmas,
        real_guidance_scale=args.real_guidance_scale, unconditional_label=args.unconditional_label,
        fake_sigma_sampling=args.fake_sigma_sampling)
    pairs = None
    if args.regression_weight > 0:
        pairs = regression_pairs(teacher_unet, sched_cfg, tuple(training_set.images.shape[1:]), args.regression_pairs,
                                 args.regression_ode_steps, num_classes, args.seed, device)
    regression_distance = lpips if args.regression_loss == "lpips" else None
    sigma_data = sched_cfg.sigma_data

    def labels_of(batch):
        return batch.get("class_labels") if num_classes else None

    def generator_noise(batch, generator):
        x = batch["pixel_values"]
        return torch.randn(x.shape, generator=generator, device=x.device)

    def fake_step(nets, batch, generator):
        # 1. Fresh generator samples (no gradient to the generator), then the fake denoiser's loss on them.
        gen = EDMDenoiser(nets["generator"], sigma_data)
        labels = labels_of(batch)
        with torch.no_grad():
            samples = loss_fn.generate(gen, generator_noise(batch, generator), labels, generator, train=False)
        fake = EDMDenoiser(nets["fake_score"], sigma_data)
        loss, logs = loss_fn.fake_loss(fake, samples, labels, generator, real=batch["pixel_values"],
                                       real_class_labels=labels,
                                       gan_weight=args.gan_discriminator_weight if args.use_gan else 0.0)
        return loss, logs

    def generator_step(nets, batch, generator):
        # 2. Distribution matching through the frozen teacher and the fake denoiser (both without parameter grads).
        labels = labels_of(batch)
        gen = EDMDenoiser(nets["generator"], sigma_data)
        fake_module = _unwrap(nets["fake_score"])  # outside DDP: the fake network is not trained in this phase
        fake = EDMDenoiser(fake_module, sigma_data)
        real = EDMDenoiser(nets["teacher"], sigma_data)
        x0 = loss_fn.generate(gen, generator_noise(batch, generator), labels, generator, train=True)
        loss, logs = loss_fn.matching_loss(x0, real, fake, labels, generator)
        if args.use_gan and args.gan_generator_weight > 0:
            fake_module.requires_grad_(False)  # gradients reach the generator's samples only
            try:
                loss = loss + args.gan_generator_weight * loss_fn.gan_generator_loss(fake, x0, labels, generator)
            finally:
                fake_module.requires_grad_(True)
        if pairs is not None:
            noise, pair_labels, targets = pairs
            index = torch.randint(0, noise.shape[0], (batch["pixel_values"].shape[0],), generator=generator,
                                  device=generator.device).cpu()
            device = batch["pixel_values"].device
            kwargs = {} if regression_distance is None else {"distance": regression_distance}
            regression, _ = loss_fn.regression_loss(
                gen, noise[index].to(device), targets[index].to(device),
                None if pair_labels is None else pair_labels[index].to(device), **kwargs)
            loss = loss + args.regression_weight * regression
        return loss, logs

    phases = [
        Phase("fake_score", build_optimizer("adamw", fake_net.parameters(), args, args.fake_learning_rate), fake_step,
              learning_rate=args.fake_learning_rate),
        Phase("generator", build_optimizer("adamw", generator_unet.parameters(), args), generator_step,
              every=args.fake_updates_per_generator_update, offset=args.fake_updates_per_generator_update - 1),
    ]

    @torch.no_grad()
    def validate(nets, _step):
        pipeline = generator_pipeline(nets["ema_generator"], sched_cfg, generator_sigmas)
        return {f"{len(generator_sigmas)}-step": validation_images(pipeline, args.num_validation_images, num_classes,
                                                                    args.seed)}

    def export(nets):
        return generator_pipeline(nets["ema_generator"].to("cpu"), sched_cfg, generator_sigmas), {}

    config = {"teacher": args.pretrained_model_name_or_path, "teacher_sha256": teacher_sha256,
              "generator_sigmas": generator_sigmas, "sigma_range": [sigma_min, sigma_max]}
    keys = ("fake_updates_per_generator_update", "num_train_sigmas", "min_step_percent", "max_step_percent",
            "fake_sigma_sampling", "real_guidance_scale", "unconditional_label", "regression_weight",
            "regression_pairs", "regression_ode_steps", "regression_loss", "use_gan", "gan_generator_weight",
            "gan_discriminator_weight")
    n_params = sum(p.numel() for p in generator_unet.parameters())
    extras = [name for name, on in (("regression", pairs is not None), ("GAN", args.use_gan)) if on]
    return TrainingPlan(
        models={"generator": generator_unet, "fake_score": fake_net},
        phases=phases,
        averages={"ema_generator": Average("generator", ema)},
        frozen={"teacher": teacher_unet, **({"lpips": lpips} if lpips is not None else {})},
        fingerprint={**{k: getattr(args, k) for k in keys}, "teacher_sha256": teacher_sha256,
                     "generator_sigmas": generator_sigmas, "sigma_range": [sigma_min, sigma_max]},
        validate=validate, export=export, config=config,
        description=(
            f"DMD of {args.pretrained_model_name_or_path} on {len(training_set)} images: generator "
            f"{n_params / 1e6:.2f}M parameters, {len(generator_sigmas)} step(s) at sigma {generator_sigmas}, "
            f"{args.fake_updates_per_generator_update} fake updates per generator update"
            f"{', with ' + ' and '.join(extras) if extras else ''}"),
    )


def _unwrap(module):
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module)


# Flags of one kind of teacher (their defaults) that the other kind refuses.
EDM_ONLY = {"generator_sigmas": None, "sigma_min": None, "sigma_max": None, "unconditional_label": None,
            "teacher_dataset": None, "use_gan": False, "regression_weight": 0.0, "fake_sigma_sampling": "karras",
            "num_train_sigmas": 1000}
LATENT_ONLY = {"generator_timesteps": None, "fake_lora_rank": 0, "memorized_data": None, "extra_data": None,
               "validation_prompts": None, "track_memorization_steps": 0, "cast_teacher_unet": False}


def check_flags_for_teacher(args, text_to_image: bool) -> None:
    """Refuse the flags that do not apply to this kind of teacher (a clear error naming them and why)."""
    others = EDM_ONLY if text_to_image else LATENT_ONLY
    given = [f"--{k}" for k, default in others.items() if getattr(args, k) != default]
    if given and text_to_image:
        raise ValueError(f"{', '.join(given)}: not for a Stable Diffusion teacher ({args.pretrained_model_name_or_path}"
                         "); its DMD has no GAN or regression loss and its steps are --generator_timesteps.")
    if given:
        raise ValueError(f"{', '.join(given)}: for Stable Diffusion teachers only; "
                         f"{args.pretrained_model_name_or_path} is an EDM teacher.")
    if not text_to_image:
        if args.real_guidance_scale is None:
            args.real_guidance_scale = 1.0
        if args.real_guidance_scale != 1.0 and args.unconditional_label is None:
            raise ValueError("--real_guidance_scale needs --unconditional_label (the teacher's unconditional class).")


def main(args) -> int:
    # 1. Accelerator, output folder and resume checks (nothing is written yet).
    runner = TrainingRunner(args, SCRIPT)
    with runner.main_process_first():
        text_to_image = is_text_to_image_folder(resolve_pretrained(args.pretrained_model_name_or_path, args.revision,
                                                                   args.variant))
    check_flags_for_teacher(args, text_to_image)
    if text_to_image:  # 2-4 in latent space
        from . import distill_dmd_sd

        return distill_dmd_sd.main(args, runner)
    # 2. The teacher and its exact training set (checked before anything is written), rank 0 first.
    folder, teacher_pipeline, training_set, teacher_sha256 = load_teacher_for_distillation(
        args, runner.main_process_first)
    lpips = None
    if args.regression_weight > 0 and args.regression_loss == "lpips":
        lpips = build_lpips_distance("vgg")
    # 3. Generator, fake denoiser, optimizers; the runner distils and saves the generator's EMA as the pipeline.
    plan = build_plan(args, teacher_pipeline, training_set, teacher_sha256, runner.device, lpips)
    runner.train(plan, training_set)
    return 0
