"""Latent consistency distillation of a Stable Diffusion teacher (LCM, Luo et al. 2023; 000 App. B.2; SPEC §3), in
full or as an LCM-LoRA, with the flags of diffusers' ``train_lcm_distill_sd_wds.py`` and
``train_lcm_distill_lora_sd_wds.py``.

    accelerate launch training_scripts/distill_lcm.py --pretrained_teacher_model runs/sd-memorize \\
        --output_dir runs/lcm --num_ddim_timesteps 50 --w_min 5 --w_max 15 --loss_type huber --huber_c 0.001 \\
        --ema_decay 0.95 --learning_rate 1e-6 --train_batch_size 12 --max_train_steps 4000 --mixed_precision bf16

    ... --use_lora --lora_rank 64 --learning_rate 1e-4      # LCM-LoRA: a LoRA of the teacher's UNet

Per step (LCM Alg. 1, `losses.lcm.LatentConsistencyDistillationLoss`): a grid point t_{n+k} of the 50-step DDIM grid,
z_{t_{n+k}} from the cached latents, w ~ U[w_min, w_max]; the frozen teacher's conditional and unconditional
predictions in one fused batch give the guided DDIM step to t_n; the Huber (or l2) distance between the student's
consistency output at t_{n+k} and the target network's at t_n is minimised. The full student is the teacher's UNet with
a guidance embedding (``time_cond_proj_dim``, default 256, zero-initialised so that it starts as the teacher) and its
target network is the EMA (``--ema_decay``, 0.95) of it; the saved model is the online student, as diffusers saves it.
With ``--use_lora`` the student is a LoRA of the teacher's UNet without a guidance input (a single guidance range is
distilled in) and, as in diffusers' LCM-LoRA script, the target network is the student itself under stop-gradient.

Data: the pairs of the memorization mix (the fine-tuning script's flags ``--memorized_data``, ``--extra_data``,
``--extra_ratio``, ...; 000 distils with extra data), by default the teacher's own mix read from the
``memorized_set.json`` / ``extra_set.json`` beside it. As in fine-tuning, every image goes through the VAE once and
every caption through the text encoder once, so that a step costs only the UNets.

The full student is a `LatentConsistencyModelPipeline` with an `LCMScheduler` (diffusers' own classes: it loads without
this package); a LoRA run writes ``pytorch_lora_weights.safetensors``, which ``load_lora_weights`` reads on the teacher,
sampled with `LCMScheduler` in 4 steps at ``guidance_scale=1``. The loop is `training.runner.TrainingRunner`'s.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from ..captioned_data import part_records
from ..losses.latent_diffusion import sample_latents
from ..losses.lcm import LOSS_TYPES, LatentConsistencyDistillationLoss, ddim_timesteps
from .arguments import add_training_args, validate_training_args
from .ema import ModelEMA
from .finetune_sd_memorize import LoraWeights, add_lora, add_memorization_mix_args, check_memorization_mix_args
from .runner import Average, Phase, TrainingPlan, TrainingRunner, build_optimizer
from .text_to_image import (
    add_prompt_sampling_args,
    check_prompt_sampling_args,
    copy_unet,
    load_text_to_image_teacher,
    memorization_tracker,
    num_train_timesteps,
    pixel_memorization_track,
)
from .utils import sample_prompts, text_to_image_pipeline

SCRIPT = "distill_lcm.py"
# LCM-LoRA's targets (diffusers' train_lcm_distill_lora_sd_wds.py): attention, feed-forward, ResNet convolutions,
# resampling convolutions and the time-embedding projections.
LCM_LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                           "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                           "time_emb_proj")
NUM_INFERENCE_STEPS = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, learning_rate=1e-4, tracker_project_name="latent_consistency_distillation")
    # diffusers' LCM scripts: batch 16 per device, AdamW weight decay 0.01, target EMA 0.95.
    parser.set_defaults(train_batch_size=16, adam_weight_decay=1e-2, ema_decay=0.95, num_validation_images=4)
    for action in parser._actions:  # the EMA flag is the target network's here
        if action.dest == "ema_decay":
            action.help = "EMA decay mu of the target network theta- (0.95 as LCM; full student only)."
    t = parser.add_argument_group("teacher")
    t.add_argument("--pretrained_teacher_model", "--pretrained_model_name_or_path", dest="pretrained_teacher_model",
                   required=True, help="The Stable Diffusion teacher: a folder (e.g. finetune_sd_memorize.py's output) "
                                       "or a Hub id (stable-diffusion-v1-5/stable-diffusion-v1-5).")
    t.add_argument("--teacher_revision", "--revision", dest="teacher_revision", default=None,
                   help="Revision (branch, tag or commit) of a Hub teacher.")
    t.add_argument("--variant", default=None, help='Weight-file variant of the teacher (e.g. "fp16").')
    t.add_argument("--cache_dir", default=None,
                   help="Cache of downloaded datasets and of the encoded latents (default: the datasets cache).")
    t.add_argument("--cast_teacher_unet", action="store_true",
                   help="Keep the frozen teacher UNet in the --mixed_precision dtype (less memory).")
    add_memorization_mix_args(parser, required=False, memorized_help=(
        "Image–caption pairs to distil on, as for finetune_sd_memorize.py (default: the teacher's own mix, from the "
        "memorized_set.json and extra_set.json beside it)."))
    c = parser.add_argument_group("latent consistency distillation")
    c.add_argument("--num_ddim_timesteps", type=int, default=50, help="N, the DDIM solver grid (skip k = T / N).")
    c.add_argument("--w_min", type=float, default=5.0, help="Smallest guidance w (the teacher's scale is 1 + w).")
    c.add_argument("--w_max", type=float, default=15.0, help="Largest guidance w.")
    c.add_argument("--loss_type", choices=LOSS_TYPES, default="huber", help="Distance of the LCM loss.")
    c.add_argument("--huber_c", type=float, default=0.001, help="c of the Huber loss.")
    c.add_argument("--timestep_scaling_factor", type=float, default=10.0,
                   help="timestep_scaling of the boundary scalings c_skip, c_out (LCMScheduler's).")
    c.add_argument("--unet_time_cond_proj_dim", type=int, default=256,
                   help="Size of the student's guidance embedding when the teacher UNet has none.")
    c.add_argument("--use_lora", action="store_true", help="Distil an LCM-LoRA of the teacher's UNet (peft).")
    c.add_argument("--lora_rank", type=int, default=64, help="Rank (and alpha) of the LoRA matrices.")
    c.add_argument("--lora_target_modules", default=None,
                   help="Comma-separated module names the LoRA adapts (default: LCM-LoRA's, those of them the UNet "
                        "has).")
    v = parser.add_argument_group("validation")
    add_prompt_sampling_args(v, "the student in 4 steps")
    v.add_argument("--validation_guidance_scale", type=float, default=None,
                   help="guidance_scale of the 4-step validation images (default: 1 + (w_min + w_max) / 2 for the full "
                        "student, 1 for a LoRA).")
    args = parser.parse_args(argv)
    validate_training_args(parser, args, protected_paths=[args.pretrained_teacher_model, args.memorized_data,
                                                          args.extra_data])
    check_memorization_mix_args(parser, args)
    if args.w_min > args.w_max:
        parser.error(f"--w_min {args.w_min} must not exceed --w_max {args.w_max}.")
    if args.w_min < 0:
        parser.error(f"--w_min must not be negative (w = 0 is the unguided teacher), got {args.w_min}.")
    if args.num_ddim_timesteps < 1:
        parser.error(f"--num_ddim_timesteps must be at least 1, got {args.num_ddim_timesteps}.")
    if not args.huber_c > 0:
        parser.error(f"--huber_c must be positive, got {args.huber_c}.")
    if not args.timestep_scaling_factor > 0:
        parser.error(f"--timestep_scaling_factor must be positive, got {args.timestep_scaling_factor}.")
    if args.unet_time_cond_proj_dim < 2:
        parser.error(f"--unet_time_cond_proj_dim must be at least 2, got {args.unet_time_cond_proj_dim}.")
    if args.use_lora and args.lora_rank < 1:
        parser.error(f"--lora_rank must be at least 1, got {args.lora_rank}.")
    if args.lora_target_modules is not None and not args.use_lora:
        parser.error("--lora_target_modules applies to --use_lora.")
    if args.ema_sigma_rel is not None or args.ema_warmup:
        parser.error("--ema_sigma_rel and --ema_warmup do not apply: the target network is a constant --ema_decay EMA.")
    check_prompt_sampling_args(parser, args)
    return args


def lcm_lora_targets(unet) -> list:
    """LCM-LoRA's target modules, less those this UNet does not have (a small UNet may lack conv_shortcut)."""
    names = [n for n, _ in unet.named_modules()]
    return [t for t in LCM_LORA_TARGET_MODULES if any(n == t or n.endswith("." + t) for n in names)]


def build_lcm_student(teacher_unet, time_cond_proj_dim: int = 256):
    """The full LCM student: the teacher's `UNet2DConditionModel` with a guidance embedding (``time_cond_proj_dim``,
    kept from the teacher if it has one), every teacher weight copied and the new guidance projection
    (``time_embedding.cond_proj``) zero-initialised, so that the student computes exactly the teacher at the start.

    Returns:
        `UNet2DConditionModel` (float32, train mode).
    """
    from diffusers import UNet2DConditionModel

    existing = teacher_unet.config.time_cond_proj_dim
    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=existing or time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj.") for k in missing):
        raise ValueError(f"The teacher UNet does not fit its own configuration (missing {missing}, unexpected "
                         f"{unexpected}).")
    if existing is None:
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.float().train()


def lcm_scheduler(teacher_scheduler_config, timestep_scaling: float = 10.0, original_inference_steps: int = 50):
    """diffusers' `LCMScheduler` on the teacher's noise schedule, with the boundary scaling and the grid a student
    learned (an LCM student: its DDIM grid N; a K-step DMD generator: K)."""
    import inspect

    from diffusers import LCMScheduler

    accepted = inspect.signature(LCMScheduler.__init__).parameters  # the teacher's PNDM keys (skip_prk_steps) dropped
    config = {k: v for k, v in dict(teacher_scheduler_config).items() if k in accepted}
    # Never clip: denoised latents are not in [-1, 1] (a DDPMScheduler read from a config without clip_sample, as PNDM's
    # may be, carries DDPM's default True, which would clip every LCM step's latents).
    return LCMScheduler.from_config({**config, "timestep_scaling": timestep_scaling, "clip_sample": False,
                                     "original_inference_steps": original_inference_steps})


def build_plan(args, teacher_model):
    """The student (full, with its EMA target network, or a LoRA), the frozen teacher, the LCM step on the cached
    latents and text embeddings, 4-step validation images and the export.

    Args:
        teacher_model (`TextToImageTeacher`): the loaded teacher and pairs (`text_to_image.load_text_to_image_teacher`).

    Returns:
        `(TrainingPlan, track)`: ``track(step) -> dict`` measures the student's memorization on the memorized prompts
        (`None` without ``--track_memorization_steps``).
    """
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    components, training_set = teacher_model.components, teacher_model.training_set
    teacher, vae = components["unet"], components["vae"]
    noise_scheduler = components["noise_scheduler"]
    latent_moments = teacher_model.latent_moments
    device = latent_moments.device
    torch.manual_seed(args.seed)
    teacher.requires_grad_(False).eval()
    if args.use_lora:
        student = copy_unet(teacher)
        if args.lora_target_modules is not None:
            targets = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
        else:
            targets = lcm_lora_targets(student)
        params = add_lora(student, args.lora_rank, targets)
        time_cond_proj_dim = None
    else:
        student = build_lcm_student(teacher, args.unet_time_cond_proj_dim)
        params = list(student.parameters())
        time_cond_proj_dim = student.config.time_cond_proj_dim
        targets = None
    student.train()
    if args.cast_teacher_unet and args.mixed_precision in ("fp16", "bf16"):
        teacher.to(torch.float16 if args.mixed_precision == "fp16" else torch.bfloat16)
    loss_fn = LatentConsistencyDistillationLoss(
        noise_scheduler.alphas_cumprod, args.num_ddim_timesteps, args.w_min, args.w_max, args.loss_type, args.huber_c,
        args.timestep_scaling_factor, noise_scheduler.config.prediction_type, time_cond_proj_dim)
    captions = list(dict.fromkeys(training_set.captions))
    text_embeddings, caption_ids, uncond_embedding = teacher_model.text_embeddings(device)
    scaling, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None)
    target_name = "unet" if args.use_lora else "target_unet"

    def step(nets, batch, generator):
        idx = batch["indices"]
        latents = sample_latents(latent_moments[idx], scaling, generator, shift)
        cond = text_embeddings[caption_ids[idx]]
        uncond = uncond_embedding.expand_as(cond)
        return loss_fn(nets["unet"], nets[target_name], nets["teacher"], latents, cond, uncond, generator)

    averages = {}
    if not args.use_lora:
        averages["target_unet"] = Average("unet", ModelEMA(student, decay=args.ema_decay, train_mode=True))
    scheduler = lcm_scheduler(noise_scheduler.config, args.timestep_scaling_factor, args.num_ddim_timesteps)
    prompts = args.validation_prompts or captions[: max(1, min(4, args.num_validation_images))]
    guidance = args.validation_guidance_scale
    if guidance is None:
        guidance = 1.0 if args.use_lora else 1.0 + (args.w_min + args.w_max) / 2
    pipeline_class = StableDiffusionPipeline if args.use_lora else LatentConsistencyModelPipeline

    def pipeline_of(unet):
        return text_to_image_pipeline(pipeline_class, components, unet, scheduler)

    def sample(unet, some_prompts):
        return sample_prompts(pipeline_of, unet, components, some_prompts, args.seed, NUM_INFERENCE_STEPS, guidance)

    def validate(nets, _step):
        n = args.num_validation_images
        return {f"{NUM_INFERENCE_STEPS}-step": sample(nets["unet"], [prompts[i % len(prompts)] for i in range(n)])}

    def export(nets):
        records = part_records(training_set)
        if args.use_lora:
            return LoraWeights(nets["unet"]), records
        return pipeline_of(nets["unet"].to("cpu")), records

    plan_track = None
    if args.track_memorization_steps:
        plan_track = pixel_memorization_track(lambda some: sample(student, some), training_set,
                                              args.track_memorization_prompts)

    n_params = sum(p.numel() for p in params)
    keys = ("use_lora", "lora_rank", "lora_target_modules", "num_ddim_timesteps", "w_min", "w_max", "loss_type",
            "huber_c", "timestep_scaling_factor", "unet_time_cond_proj_dim", "resolution", "cast_teacher_unet")
    record = training_set.record
    plan = TrainingPlan(
        models={"unet": student},
        phases=[Phase("unet", build_optimizer("adamw", params, args), step)],
        averages=averages,
        frozen={"teacher": teacher},
        fingerprint={**{k: getattr(args, k) for k in keys}, "teacher_sha256": teacher_model.unet_sha256},
        validate=validate, export=export,
        config={"teacher": args.pretrained_teacher_model, "base_model": args.pretrained_teacher_model,
                "teacher_unet_sha256": teacher_model.unet_sha256, "prediction_type_used": loss_fn.prediction_type,
                "trained_parameters": n_params, "lora_target_modules_used": targets,
                "time_cond_proj_dim": time_cond_proj_dim, "num_inference_steps": NUM_INFERENCE_STEPS,
                "ddim_timesteps": loss_fn.timesteps.tolist()},
        description=(f"Latent consistency distillation of {args.pretrained_teacher_model} on {len(training_set)} pairs "
                     f"({record['num_examples']} examples), "
                     f"{'LoRA rank ' + str(args.lora_rank) if args.use_lora else 'full UNet'}, "
                     f"{n_params / 1e6:.2f}M trained parameters, N = {args.num_ddim_timesteps}, "
                     f"w in [{args.w_min:g}, {args.w_max:g}], {args.loss_type} loss"),
    )
    return plan, plan_track


def check_teacher_timesteps(num_ddim_timesteps: int) -> Callable[[str], None]:
    """``check(folder)``: the DDIM grid must divide the teacher's training timesteps (before anything is written)."""

    def check(folder):
        ddim_timesteps(num_train_timesteps(folder), num_ddim_timesteps)  # raises when N does not divide T

    return check


def main(args) -> int:
    # 1. Accelerator, output folder and resume checks (nothing is written yet).
    runner = TrainingRunner(args, SCRIPT)
    # 2-3. The teacher (text-to-image, with a grid that divides its timesteps), the pairs and their cached latents.
    teacher = load_text_to_image_teacher(runner, args, args.pretrained_teacher_model, args.teacher_revision,
                                         args.variant, check_teacher_timesteps(args.num_ddim_timesteps))
    # 4. Student (full or LoRA), target network and AdamW; the runner distils and saves the student.
    plan, track = build_plan(args, teacher)
    callback = memorization_tracker(runner, track, args.track_memorization_steps) if track is not None else None
    runner.train(plan, teacher.training_set, callback=callback)
    return 0
