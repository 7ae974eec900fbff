"""``memdistill demo --text_to_image``: a text-to-image model of Stable Diffusion's architecture that memorizes, trained
from scratch on the built-in digits and audited prompt by prompt, on a CPU, in minutes.

1. Write scikit-learn's 8×8 digits as captioned imagefolders: ``memorized/train`` (a class-balanced seeded subset,
   each with a caption of its own, "a handwritten digit 3, sample 12", so that the prompt names one training image),
   ``memorized/test`` (as many other digits, captioned the same way with numbers no training caption uses: the
   held-out prompts and the floor of the audit) and ``extra/train`` (``extra_ratio`` × as many digits, each
   captioned only with its class, "a handwritten digit 3": the COCO-style pairs seen once).
2. Build a tiny `StableDiffusionPipeline` (`models.tiny_sd`: `UNet2DConditionModel` with cross-attention,
   `AutoencoderKL`, `CLIPTextModel`, SD v1.5's noise schedule and PNDM sampler) and train its autoencoder first, as
   SD's was trained before and apart from the diffusion model: a few hundred AdamW steps of reconstruction plus a
   small KL term on the digits of none of the three folders, so that it never sees an audited image. The latents'
   ``scaling_factor`` is then set to one over their standard deviation (SD's convention). The text encoder stays at
   its seeded random initialisation: frozen random features of the tokens, which the UNet's cross-attention learns
   to read (SD's fine-tuning also keeps its text encoder frozen).
3. Train the UNet from scratch with ``finetune_sd_memorize.py`` on the memorization mix (the memorized pairs
   repeated, the extra pairs once; the VAE and text encoder frozen, latents cached).
4. Distil a full LCM student from it (``distill_lcm.py``, the teacher's own mix read from its ``memorized_set.json``;
   guidance w = 0, since the teacher has no meaningful unconditional prediction).
5. Distil a one-step DMD generator from it (``distill_dmd.py`` in latent space, on the captions of the same mix; real
   guidance 1 for the same reason).
6. Audit teacher and students together (one `evaluation.evaluate` call, the same prompts and seeds: the teacher
   with 25 PNDM steps, the LCM student with 4 LCM steps, the DMD generator in 1 step) on the memorized and the held-out
   prompts, a few seeds each. SSCD and
   CLIP need weights that are not bundled (pass ``--sscd_onnx`` or ``--sscd_weights`` to add SSCD); the offline
   measure is pixel L2: the ratio ρ of each generation's distance to its prompt's own image over that to the nearest
   other training image (a copy of its own image when ρ < 1/3, `metrics.pixel_own_image_memorization`), and the
   nearest-neighbour ratio r against the whole training set (000's criterion, `metrics.pixel_memorization`).

Why 16 px and a trained VAE. The 8×8 digits are upsampled (bilinearly) to 16×16 RGB: with SD's layout shortened to
two VAE levels (one downsampling, factor 2), the latents are 4×8×8 and the UNet's two levels run at 8×8 and 4×4.
A random VAE decodes to noise, so that nothing a model generates would be near a digit: the audit would say
nothing. Trained for 300 steps, this VAE reconstructs unseen digits at 16 px with a per-pixel RMSE of about 0.02 on
the [0, 1] scale, while different digits are about 0.3 apart: the round trip of a memorized digit keeps an own-image
ratio near 0.2, below the 1/3 of the criterion, so the L2 measures keep their meaning. At 8 px the same VAE (4×4
latents) reached only RMSE ≈ 0.05 in as many steps (measured while writing this demo): exact latent copies would then
sit around the threshold. The report states the VAE round trip of the memorized images themselves (their own-image
ratio is the best any model decoding through this VAE can reach).
Sampling uses a guidance scale of 1 (no classifier-free guidance): the UNet is never trained on empty prompts, so its
unconditional prediction would be meaningless.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from .evaluation.measures import MEASURES

TEXT_TO_IMAGE_METRICS = tuple(m for m, measure in MEASURES.items() if "text-to-image" in measure.tasks)

MEMORIZED_CAPTION = "a handwritten digit {label}, sample {number}"
CLASS_CAPTION = "a handwritten digit {label}"
TOKENIZER_WORDS = ("sample",)  # besides models.tiny_sd.DEFAULT_WORDS
RESOLUTION = 16
VAE_BLOCK_OUT_CHANNELS = (16, 32)
VAE_ARGS = {"batch_size": 64, "learning_rate": 2e-3, "kl_weight": 1e-4}
MODEL_NAME = "tiny SD (from scratch)"
LCM_NAME = "its LCM student"
DMD_NAME = "its DMD generator"
UNDISTILLED_NAME = "the model in 4 LCM steps, undistilled"
FULL = {"num_memorized": 32, "memorized_repeats": 10, "extra_ratio": 4, "vae_steps": 300, "unet_steps": 3000,
        "lcm_steps": 1000, "dmd_steps": 1000, "samples_per_prompt": 4, "inference_steps": 25,
        "lcm_inference_steps": 4, "dmd_inference_steps": 1}
QUICK = {"num_memorized": 4, "memorized_repeats": 2, "extra_ratio": 2, "vae_steps": 5, "unet_steps": 4,
         "lcm_steps": 2, "dmd_steps": 2, "samples_per_prompt": 2, "inference_steps": 2, "lcm_inference_steps": 4,
         "dmd_inference_steps": 1}
# The UNet's fine-tuning flags (finetune_sd_memorize.py) beyond those the configuration sets. The saved weights are the
# power-function EMA (sigma_rel 0.05): at 3,000 steps it copies the memorized digits more often than the last weights
# (69.5% of generations against 58.6%; 2,000 steps with EMA: 43.0%; measured, seed 0).
UNET_ARGS = ["--resolution", str(RESOLUTION), "--train_batch_size", "32", "--learning_rate", "1e-3",
             "--lr_warmup_steps", "100", "--use_ema", "--num_validation_images", "4",
             "--validation_inference_steps", "25", "--validation_guidance_scale", "1"]
# The full LCM student's flags (distill_lcm.py) beyond those the configuration sets. Guidance w = 0 only (w_min = w_max
# = 0: the teacher's own unguided step), since the teacher never saw an empty prompt; the student then samples at
# guidance scale 1 + w = 1, as the teacher does. 1,000 steps take about 2.5 min on one thread. Measured on the seed-0
# teacher (4 seeds per prompt, 4 LCM steps; docs/results.md): 80.5% of the generations for memorized prompts copy
# their image (the teacher with 25 PNDM steps: 69.5%; its own weights in 4 LCM steps, undistilled: 91.4%).
LCM_LEARNING_RATE = "1e-4"
LCM_ARGS = ["--resolution", str(RESOLUTION), "--train_batch_size", "32", "--learning_rate", LCM_LEARNING_RATE,
            "--lr_warmup_steps", "50", "--w_min", "0", "--w_max", "0", "--num_validation_images", "4"]
# The one-step DMD generator's flags (distill_dmd.py on the tiny SD teacher) beyond those the configuration sets: real
# guidance 1 (the teacher never saw an empty prompt), AdamW 1e-4 for generator and fake score, DMD2's 5 fake updates per
# generator update. 1,000 steps take about 2 min on one thread; measured on the seed-0 teacher (4 seeds per prompt):
# 2.3% of the generations for memorized prompts copy their image (500 steps: 1.6%, 2,000: 1.6%; docs/results.md).
DMD_ARGS = ["--resolution", str(RESOLUTION), "--train_batch_size", "32", "--learning_rate", "1e-4",
            "--lr_warmup_steps", "50", "--real_guidance_scale", "1", "--num_validation_images", "4"]


# ----------------------------------------------------------------------------------------------------------------
# 1. The captioned digits.


def _write_pairs(folder: str, digits, indices, captions) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for i, caption in zip(indices, captions):
            name = f"digit-{int(i):04d}.png"
            digits.read_item(int(i))[0].save(os.path.join(folder, name))
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")


def write_captioned_digits(root: str, num_memorized: int, extra_ratio: int, seed: int = 0) -> dict:
    r"""
    Write the built-in digits as the captioned imagefolders of the demo (8×8 grayscale PNGs with a ``metadata.jsonl``).

    Args:
        root (`str`): the folder that receives ``memorized/`` and ``extra/``.
        num_memorized (`int`): memorized pairs (``memorized/train``), and as many held-out pairs (``memorized/test``);
            class-balanced, seeded.
        extra_ratio (`int`): ``extra/train`` holds ``extra_ratio × num_memorized`` class-captioned digits.
        seed (`int`): seed of the choice.

    Returns:
        `dict`: ``memorized`` and ``extra`` (the two folders) and ``autoencoder`` (the indices of the digits in none
        of them, for the autoencoder).
    """
    from .data import _balanced_choice, _digits_index

    if num_memorized < 1 or extra_ratio < 0:
        raise ValueError(f"num_memorized must be at least 1 and extra_ratio not negative, got {num_memorized} and "
                         f"{extra_ratio}.")
    digits = _digits_index()
    labels = np.asarray(digits.labels)
    rng = np.random.default_rng([seed, 13])
    memorized = _balanced_choice(labels, num_memorized, rng)
    others = labels.copy()
    others[memorized] = -1  # never chosen twice
    heldout = _balanced_choice(others, num_memorized, rng, classes=np.unique(labels))
    rest = np.setdiff1d(np.arange(len(labels)), np.concatenate([memorized, heldout]))
    extra = np.sort(rng.choice(rest, size=extra_ratio * num_memorized, replace=False))
    unique = lambda idx, start: [MEMORIZED_CAPTION.format(label=labels[i], number=start + k)  # noqa: E731
                                 for k, i in enumerate(idx)]
    folders = {"memorized": os.path.join(root, "memorized"), "extra": os.path.join(root, "extra")}
    _write_pairs(os.path.join(folders["memorized"], "train"), digits, memorized, unique(memorized, 0))
    _write_pairs(os.path.join(folders["memorized"], "test"), digits, heldout, unique(heldout, num_memorized))
    if extra_ratio:
        _write_pairs(os.path.join(folders["extra"], "train"), digits, extra,
                     [CLASS_CAPTION.format(label=labels[i]) for i in extra])
    return {**folders, "autoencoder": np.setdiff1d(rest, extra)}


def digit_images(indices, resolution: int = RESOLUTION) -> torch.Tensor:
    """uint8 (N, 3, resolution, resolution) of the built-in digits, decoded as the training data is (the loader's own
    grayscale-to-RGB conversion and bilinear resize)."""
    from .data import _decode, _digits_index

    return _decode(_digits_index(), indices, resolution, 3)[0]


# ----------------------------------------------------------------------------------------------------------------
# 2. The autoencoder.


def train_autoencoder(vae, images: torch.Tensor, steps: int, batch_size: int = 64, learning_rate: float = 2e-3,
                      kl_weight: float = 1e-4, seed: int = 0) -> dict:
    r"""
    Train an `AutoencoderKL` in place on uint8 images: AdamW on the mean squared reconstruction error of a posterior
    draw plus ``kl_weight`` × the KL divergence to N(0, I) per image element (Rombach et al. 2022's first stage
    without its perceptual and adversarial terms, which need pretrained networks), then set its ``scaling_factor`` to
    one over the standard deviation of the posterior means, so that the diffusion model sees unit-variance latents.

    Returns:
        `dict`: ``loss`` (the last step's), ``scaling_factor``.
    """
    import torch.nn.functional as F

    x = images.float() / 127.5 - 1
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    vae.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = x[torch.randint(0, x.shape[0], (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean() / batch[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(x[s:s + 256]).latent_dist.mean for s in range(0, x.shape[0], 256)])
    scaling_factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return {"loss": float(loss.detach()), "scaling_factor": scaling_factor}


@torch.no_grad()
def autoencoder_round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> their reconstructions (posterior mean, decoded), quantized to uint8 as saved generations are."""
    x = images.float() / 127.5 - 1
    decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def build_base_model(output_dir: str, autoencoder_images: torch.Tensor, vae_steps: int, seed: int = 0) -> dict:
    """Save the tiny SD pipeline the UNet is trained in: seeded random UNet and text encoder, trained VAE."""
    from diffusers import StableDiffusionPipeline

    from .models.tiny_sd import DEFAULT_WORDS, tiny_sd_components

    components = tiny_sd_components(resolution=RESOLUTION, vae_block_out_channels=VAE_BLOCK_OUT_CHANNELS,
                                    words=DEFAULT_WORDS + TOKENIZER_WORDS, seed=seed)
    logs = train_autoencoder(components["vae"], autoencoder_images, vae_steps, seed=seed, **VAE_ARGS)
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(output_dir)
    return {**logs, "vae": components["vae"]}


# ----------------------------------------------------------------------------------------------------------------
# The demo.


def save_undistilled_lcm(model_dir: str, output_dir: str) -> None:
    """The control of the LCM row: the model's own UNet, given the student's guidance input with zero weights (so that it
    computes exactly the model), in a `LatentConsistencyModelPipeline` with the student's `LCMScheduler`, and the
    model's records; nothing is trained. It tells what 4-step LCM sampling alone does to the copies, apart from what
    distillation does."""
    import shutil

    from diffusers import LatentConsistencyModelPipeline

    from .training.distill_lcm import build_lcm_student, lcm_scheduler
    from .training.finetune_sd_memorize import load_sd_components
    from .training.utils import text_to_image_pipeline

    c = load_sd_components(model_dir)
    text_to_image_pipeline(LatentConsistencyModelPipeline, c, build_lcm_student(c["unet"]).eval(),
                           lcm_scheduler(c["noise_scheduler"].config)).save_pretrained(output_dir)
    for name in os.listdir(model_dir):
        if name.endswith("_set.json"):
            shutil.copy(os.path.join(model_dir, name), output_dir)


def autoencoder_check(vae, model_dir: str) -> dict:
    """The autoencoder's 8-bit round trip of the audited digits: RMSE (on [0, 1]) of the held-out and memorized ones,
    and the own-image L2 ratio of the memorized ones' reconstructions (the best a model decoding through it can do)."""
    from .captioned_data import load_memorization_mix
    from .data import load_heldout_set
    from .metrics import pixel_own_image_memorization

    mix = load_memorization_mix(model_dir)
    memorized = mix.parts["memorized"]
    heldout = load_heldout_set(memorized)
    trips = {k: autoencoder_round_trip(vae, ts.images) for k, ts in (("memorized", memorized), ("heldout", heldout))}
    own = pixel_own_image_memorization(trips["memorized"], memorized.images, [[i] for i in range(len(memorized))], 1,
                                       mix.images)
    rmse = lambda a, b: float(((a.float() - b.float()) / 255).square().mean().sqrt())  # noqa: E731
    return {"heldout_rmse": rmse(trips["heldout"], heldout.images),
            "memorized_rmse": rmse(trips["memorized"], memorized.images),
            "memorized_own_ratio": {k: own.overall.to_dict()[k] for k in ("mean", "max", "fraction_memorized")},
            "example_caption": memorized.captions[0], "num_memorized": len(memorized),
            "num_extra": mix.record["num_extra"], "num_heldout": len(heldout)}


def render_demo_section(record: dict) -> str:
    """The report's account of how the model was made (``demo.json``'s record)."""
    cfg, vae, check, t = record["config"], record["autoencoder"], record["autoencoder_check"], record["wall_seconds"]
    own = check["memorized_own_ratio"]
    return "\n".join([
        "## How this model was made (`memdistill demo --text_to_image`)", "",
        f"- Data: {check['num_memorized']} built-in digits with a caption each (\"{check['example_caption']}\"), "
        f"repeated {cfg['memorized_repeats']} times, and {check['num_extra']} digits captioned with their class only "
        f"(\"{CLASS_CAPTION.format(label=3)}\"), seen once per epoch; held-out prompts: {check['num_heldout']} other "
        f"digits captioned like the memorized ones. 8×8 digits upsampled to {RESOLUTION}×{RESOLUTION} RGB.",
        f"- Autoencoder (`AutoencoderKL`, levels {list(VAE_BLOCK_OUT_CHANNELS)}, latents 4×{RESOLUTION // 2}×"
        f"{RESOLUTION // 2}): {cfg['vae_steps']} AdamW steps (batch {VAE_ARGS['batch_size']}, learning rate "
        f"{VAE_ARGS['learning_rate']:g}, KL weight {VAE_ARGS['kl_weight']:g}) on the {vae['num_images']} digits of "
        f"none of the three sets; scaling factor {vae['scaling_factor']:.4f}. 8-bit round trip of the held-out digits: "
        f"RMSE {check['heldout_rmse']:.4f}; of the memorized digits: RMSE {check['memorized_rmse']:.4f}, own-image L2 "
        f"ratio mean {own['mean']:.3f}, max {own['max']:.3f}, {own['fraction_memorized']:.0%} below 1/3: the share "
        "of the memorized digits whose exact latent, decoded, the L2 criterion flags (the most any model decoding "
        "through this autoencoder can reach).",
        f"- UNet (`UNet2DConditionModel`, random init; text encoder frozen at its random init): {cfg['unet_steps']} "
        f"steps of `finetune_sd_memorize.py` ({' '.join(record['unet_args'])}).",
        "- LCM student (`LatentConsistencyModelPipeline`, the full UNet with a guidance embedding): "
        f"{cfg['lcm_steps']} steps of `distill_lcm.py` from the model above on the same mix "
        f"({' '.join(record['lcm_args'])}).",
        "- DMD generator (`StableDiffusionPipeline` with an `LCMScheduler`, one step at t = 999): "
        f"{cfg['dmd_steps']} steps of `distill_dmd.py` from the model above on the captions of the same mix "
        f"({' '.join(record['dmd_args'])}).",
        f"- Audit, from the same prompts and seeds: {cfg['samples_per_prompt']} seeds per prompt; the teacher with "
        f"{cfg['inference_steps']} PNDM steps, the LCM student with {cfg['lcm_inference_steps']} LCM steps, the DMD "
        f"generator in {cfg['dmd_inference_steps']} step; guidance scale 1 for all (the UNet never saw an empty "
        "prompt; w = 0 for the LCM student). The last row is a control, not a model: the model's own weights sampled "
        f"by the student's `LCMScheduler` in {cfg['lcm_inference_steps']} steps, without any distillation.",
        "- Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) + ".", "",
    ])


def main(args) -> int:
    cfg = QUICK if args.quick else FULL
    out = os.path.abspath(args.output_dir or "memdistill-demo-text-to-image")
    data_dir, base_dir, model_dir, lcm_dir, dmd_dir, undistilled_dir, report_dir = (
        os.path.join(out, d) for d in ("data", "base", "model", "lcm", "dmd", "undistilled_lcm", "report"))
    if os.path.isfile(os.path.join(report_dir, "report.md")) and not args.overwrite:
        raise FileExistsError(f"{out} already holds a finished demo; pass --overwrite to run it again.")
    if os.path.isdir(data_dir) or os.path.isdir(base_dir):
        if not args.overwrite:
            raise FileExistsError(f"{out} holds the data or base model of an unfinished demo; pass --overwrite to "
                                  "start again.")
        import shutil

        for folder in (data_dir, base_dir):
            shutil.rmtree(folder, ignore_errors=True)
    metrics = tuple(m.strip() for m in (args.metrics or "l2").split(",") if m.strip())
    unknown = [m for m in metrics if m not in TEXT_TO_IMAGE_METRICS]
    if unknown or not metrics:
        raise ValueError(f"--metrics of the text-to-image demo are among {', '.join(TEXT_TO_IMAGE_METRICS)}; got "
                         f"{args.metrics!r}.")
    timings, start = {}, time.time()

    print(f"[1/6] Writing {cfg['num_memorized']} memorized, {cfg['num_memorized']} held-out and "
          f"{cfg['extra_ratio'] * cfg['num_memorized']} class-captioned digits -> {data_dir}")
    folders = write_captioned_digits(data_dir, cfg["num_memorized"], cfg["extra_ratio"], args.seed)

    print(f"[2/6] Training the tiny SD's autoencoder ({cfg['vae_steps']} steps on "
          f"{len(folders['autoencoder'])} other digits) -> {base_dir}")
    t = time.time()
    logs = build_base_model(base_dir, digit_images(folders["autoencoder"]), cfg["vae_steps"], args.seed)
    logs["num_images"] = len(folders["autoencoder"])
    timings["autoencoder"] = time.time() - t

    from .training import distill_dmd, distill_lcm, finetune_sd_memorize
    from .training.runner import reset_accelerate_state

    def run(script, flags: list, steps: int, output_dir: str, timing: str) -> None:
        t = time.time()
        script.main(script.parse_args(flags + [
            "--max_train_steps", str(steps), "--checkpointing_steps", str(max(1, steps // 2)), "--seed", str(args.seed),
            "--report_to", "none", "--output_dir", output_dir, "--cache_dir", os.path.join(out, "cache")]
            + (["--overwrite_output_dir"] if args.overwrite else [])))
        reset_accelerate_state()
        timings[timing] = time.time() - t

    print(f"[3/6] Training its UNet from scratch on the memorization mix ({cfg['unet_steps']} steps) -> {model_dir}")
    run(finetune_sd_memorize, UNET_ARGS + [
        "--pretrained_model_name_or_path", base_dir, "--memorized_data", folders["memorized"],
        "--num_memorized", str(cfg["num_memorized"]), "--memorized_repeats", str(cfg["memorized_repeats"]),
        "--extra_data", folders["extra"], "--extra_ratio", str(cfg["extra_ratio"])], cfg["unet_steps"], model_dir, "UNet")
    print(f"[4/6] Distilling a full LCM student from it on the same mix ({cfg['lcm_steps']} steps) -> {lcm_dir}")
    run(distill_lcm, LCM_ARGS + ["--pretrained_teacher_model", model_dir], cfg["lcm_steps"], lcm_dir, "LCM")
    print(f"[5/6] Distilling a one-step DMD generator from it on the same prompts ({cfg['dmd_steps']} steps) -> "
          f"{dmd_dir}")
    run(distill_dmd, DMD_ARGS + ["--pretrained_model_name_or_path", model_dir], cfg["dmd_steps"], dmd_dir, "DMD")

    print(f"[6/6] Auditing the teacher and its students on the memorized and held-out prompts (beside them, the model "
          f"in 4 LCM steps without distillation) -> {report_dir}")
    from .evaluation import evaluate, render_report

    t = time.time()
    save_undistilled_lcm(model_dir, undistilled_dir)
    results = evaluate(
        [model_dir, lcm_dir, dmd_dir, undistilled_dir], report_dir,
        names=[MODEL_NAME, LCM_NAME, DMD_NAME, UNDISTILLED_NAME], seed=args.seed, metrics=metrics,
        samples_per_prompt=cfg["samples_per_prompt"], guidance_scale=1.0,
        num_inference_steps={MODEL_NAME: cfg["inference_steps"], LCM_NAME: cfg["lcm_inference_steps"],
                             DMD_NAME: cfg["dmd_inference_steps"], UNDISTILLED_NAME: cfg["lcm_inference_steps"]},
        batch_size=64, device="cpu", sscd_onnx=args.sscd_onnx, sscd_weights=args.sscd_weights,
        sscd_preprocessing=("sscd",))
    timings["audit"] = time.time() - t
    timings["total"] = time.time() - start
    record = {"config": cfg, "seed": args.seed, "unet_args": UNET_ARGS, "lcm_args": LCM_ARGS, "dmd_args": DMD_ARGS,
              "wall_seconds": timings,
              "autoencoder": {k: logs[k] for k in ("loss", "scaling_factor", "num_images")},
              "autoencoder_check": autoencoder_check(logs["vae"], model_dir)}
    with open(os.path.join(report_dir, "demo.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(report_dir, "report.md"), "a", encoding="utf-8") as f:
        f.write("\n" + render_demo_section(record))
    print(render_report(results))
    print(f"Done in {timings['total']:.0f} s. Report: {os.path.join(report_dir, 'report.md')}")
    return 0
