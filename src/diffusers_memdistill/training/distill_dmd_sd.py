"""``distill_dmd.py`` on a Stable Diffusion teacher: DMD2 in latent space (DMD2 §4 on SD v1.5; SPEC §5; 000 App. B).

    accelerate launch training_scripts/distill_dmd.py --pretrained_model_name_or_path runs/sd-memorize \\
        --output_dir runs/dmd-sd --real_guidance_scale 1.75 --train_batch_size 12 --mixed_precision bf16

    ... --generator_timesteps 999,749,499,249     # a 4-step generator (backward simulation)
    ... --fake_lora_rank 64                       # the fake score as a LoRA of the teacher's UNet

The generator and the fake score both start as copies of the teacher's UNet (the fake score, with --fake_lora_rank, as
a LoRA on a frozen copy). Each step: the fake score takes one AdamW step of the teacher's denoising loss on fresh,
detached generator latents; every --fake_updates_per_generator_update steps the generator takes one step of the
distribution-matching loss against the frozen teacher, guided by --real_guidance_scale (DMD2: 1.75 for SD v1.5) with
the empty prompt as its unconditional branch (`losses.dmd_latent.LatentDMDLoss`). Prompts are the captions of the pairs
(the teacher's own memorization mix by default), each encoded once; DMD needs no images, and none is decoded in
training.

The saved generator is the EMA of its weights as a diffusers `StableDiffusionPipeline` whose scheduler is an
`LCMScheduler` with ``original_inference_steps`` = the generator's step count, so that without this package

    pipe = StableDiffusionPipeline.from_pretrained(output_dir)
    images = pipe(prompt, num_inference_steps=1, guidance_scale=1.0).images   # 4 for a 4-step generator

samples exactly the trained generator (its timesteps 999 or 999, 749, 499, 249; guidance_scale <= 1: no
classifier-free guidance, it is distilled in). The teacher's pairs are recorded beside it for `memdistill evaluate`.
"""

from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel

from ..captioned_data import part_records
from ..losses.dmd_latent import LatentDMDLoss, check_generator_timesteps, generator_timesteps_grid
from .distill_lcm import lcm_lora_targets, lcm_scheduler
from .ema import ModelEMA
from .finetune_sd_memorize import add_lora
from .runner import Average, Phase, TrainingPlan, build_optimizer
from .text_to_image import (
    copy_unet,
    load_text_to_image_teacher,
    memorization_tracker,
    num_train_timesteps,
    pixel_memorization_track,
)
from .utils import sample_prompts, text_to_image_pipeline

DEFAULT_REAL_GUIDANCE_SCALE = 1.75  # DMD2's for SD v1.5


def resolved_generator_timesteps(args, folder: str) -> list:
    """The generator's timesteps (default: one step at T - 1), checked against the teacher's T."""
    total = num_train_timesteps(folder)
    if args.generator_timesteps is None:
        return generator_timesteps_grid(total, 1)
    return check_generator_timesteps(args.generator_timesteps, total)


def build_plan(args, teacher_model):
    """Generator and fake score (copies of the teacher's UNet), their two phases, the generator's EMA, the frozen
    teacher, K-step validation images and the export.

    Returns:
        `(TrainingPlan, track)` as `distill_lcm.build_plan`.
    """
    from diffusers import StableDiffusionPipeline

    components, training_set = teacher_model.components, teacher_model.training_set
    teacher = components["unet"]
    noise_scheduler = components["noise_scheduler"]
    device = teacher_model.latent_moments.device
    generator_timesteps = resolved_generator_timesteps(args, teacher_model.folder)
    real_guidance_scale = DEFAULT_REAL_GUIDANCE_SCALE if args.real_guidance_scale is None else args.real_guidance_scale
    torch.manual_seed(args.seed)
    teacher.requires_grad_(False).eval()
    generator_unet = copy_unet(teacher)
    fake_unet = copy_unet(teacher)
    if args.cast_teacher_unet and args.mixed_precision in ("fp16", "bf16"):  # after the copies, which stay float32
        teacher.to(torch.float16 if args.mixed_precision == "fp16" else torch.bfloat16)
    targets = None
    if args.fake_lora_rank:  # on LCM-LoRA's targets
        targets = lcm_lora_targets(fake_unet)
        fake_params = add_lora(fake_unet, args.fake_lora_rank, targets)
    else:
        fake_params = list(fake_unet.parameters())
    ema = ModelEMA(generator_unet, sigma_rel=args.ema_sigma_rel, decay=args.ema_decay, warmup=args.ema_warmup)
    loss_fn = LatentDMDLoss(noise_scheduler, generator_timesteps, args.min_step_percent, args.max_step_percent,
                            real_guidance_scale, args.timestep_scaling_factor)
    embeddings, caption_ids, uncond_embedding = teacher_model.text_embeddings(device)
    moments = teacher_model.latent_moments
    latent_shape = (moments.shape[1] // 2, *moments.shape[2:])

    def prompts_and_noise(batch, generator):
        cond = embeddings[caption_ids[batch["indices"]]]
        noise = torch.randn((cond.shape[0], *latent_shape), generator=generator, device=cond.device)
        return cond, noise

    def fake_step(nets, batch, generator):
        # 1. Fresh generator latents (no gradient to the generator), then the fake score's denoising loss on them.
        cond, noise = prompts_and_noise(batch, generator)
        with torch.no_grad():
            samples = loss_fn.generate(nets["generator"], noise, cond, generator, train=False)
        return loss_fn.fake_loss(nets["fake_score"], samples, cond, generator)

    def generator_step(nets, batch, generator):
        # 2. Distribution matching through the frozen teacher (guided) and the fake score (no parameter gradients).
        cond, noise = prompts_and_noise(batch, generator)
        x0 = loss_fn.generate(nets["generator"], noise, cond, generator, train=True)
        # The fake score outside DDP: it is not trained in this phase.
        return loss_fn.matching_loss(x0, nets["teacher"], extract_model_from_parallel(nets["fake_score"]), cond,
                                     uncond_embedding.expand_as(cond), generator)

    phases = [
        Phase("fake_score", build_optimizer("adamw", fake_params, args, args.fake_learning_rate), fake_step,
              learning_rate=args.fake_learning_rate),
        Phase("generator", build_optimizer("adamw", generator_unet.parameters(), args), generator_step,
              every=args.fake_updates_per_generator_update, offset=args.fake_updates_per_generator_update - 1),
    ]
    num_steps = len(generator_timesteps)
    scheduler = lcm_scheduler(noise_scheduler.config, args.timestep_scaling_factor, num_steps)
    captions = list(dict.fromkeys(training_set.captions))
    prompts = args.validation_prompts or captions[: max(1, min(4, args.num_validation_images))]

    def pipeline_of(unet):
        return text_to_image_pipeline(StableDiffusionPipeline, components, unet, scheduler)

    def sample(unet, some_prompts):
        return sample_prompts(pipeline_of, unet, components, some_prompts, args.seed, num_steps, 1.0)

    def validate(nets, _step):
        n = args.num_validation_images
        return {f"{num_steps}-step": sample(nets["ema_generator"], [prompts[i % len(prompts)] for i in range(n)])}

    def export(nets):
        return pipeline_of(nets["ema_generator"].to("cpu")), part_records(training_set)

    track = None
    if args.track_memorization_steps:
        track = pixel_memorization_track(lambda some: sample(ema.module, some), training_set,
                                         args.track_memorization_prompts)
    keys = ("fake_updates_per_generator_update", "min_step_percent", "max_step_percent", "fake_lora_rank",
            "timestep_scaling_factor", "resolution", "cast_teacher_unet")
    fingerprint = {**{k: getattr(args, k) for k in keys}, "teacher_sha256": teacher_model.unet_sha256,
                   "generator_timesteps": generator_timesteps, "real_guidance_scale": real_guidance_scale}
    n_params = sum(p.numel() for p in generator_unet.parameters())
    n_fake = sum(p.numel() for p in fake_params)
    plan = TrainingPlan(
        models={"generator": generator_unet, "fake_score": fake_unet},
        phases=phases,
        averages={"ema_generator": Average("generator", ema)},
        frozen={"teacher": teacher},
        fingerprint=fingerprint,
        validate=validate, export=export,
        config={"teacher": args.pretrained_model_name_or_path, "base_model": args.pretrained_model_name_or_path,
                "teacher_unet_sha256": teacher_model.unet_sha256, "generator_timesteps": generator_timesteps,
                "real_guidance_scale_used": real_guidance_scale, "timestep_range": list(loss_fn.timestep_range),
                "num_inference_steps": num_steps, "fake_trained_parameters": n_fake,
                "fake_lora_target_modules": targets if args.fake_lora_rank else None},
        description=(f"DMD of {args.pretrained_model_name_or_path} on the {len(captions)} prompts of "
                     f"{len(training_set)} pairs: generator {n_params / 1e6:.2f}M parameters, {num_steps} step(s) at "
                     f"t = {generator_timesteps}, real guidance {real_guidance_scale:g}, fake score "
                     f"{'LoRA rank ' + str(args.fake_lora_rank) if args.fake_lora_rank else 'a full copy'} "
                     f"({n_fake / 1e6:.2f}M trained), {args.fake_updates_per_generator_update} fake updates per "
                     "generator update"),
    )
    return plan, track


def main(args, runner) -> int:
    """Steps 2-4 of ``distill_dmd.py`` for a Stable Diffusion teacher (``runner``: its `TrainingRunner`)."""
    # 2. The teacher (text-to-image, with generator timesteps it can sample), the prompts' pairs and their latents.
    teacher = load_text_to_image_teacher(runner, args, args.pretrained_model_name_or_path, args.revision,
                                         args.variant, lambda folder: resolved_generator_timesteps(args, folder))
    # 3. Generator, fake score and their AdamW; 4. the runner distils and saves the generator's EMA as the pipeline.
    plan, track = build_plan(args, teacher)
    callback = memorization_tracker(runner, track, args.track_memorization_steps) if track is not None else None
    runner.train(plan, teacher.training_set, callback=callback)
    return 0
