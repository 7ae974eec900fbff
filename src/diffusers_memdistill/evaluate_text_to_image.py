"""The text-to-image memorization audit of ``memdistill evaluate`` (000 §4.1, Table 3; SPEC §6).

Every distinct caption of the audited pairs (the memorized set of a model fine-tuned by ``finetune_sd_memorize.py``,
or any image–caption list a user gives with ``--train_data``) is a prompt, sampled with ``samples_per_prompt`` seeds;
so are the captions of held-out pairs of the same source, which no model saw. Per generation:

- CLIP score with its prompt (raw cosine, 000 reports ≈ 0.22 for SD v1.5);
- SSCD similarity to its own training image (the image of its caption; the largest when several share it) and to the
  nearest training image (the whole training set, extra pairs included), under each SSCD preprocessing;
- pixel L2 (``l2``, needs no weights): the own-image ratio ρ = ‖y − own‖ / ‖y − nearest other training image‖ (a copy
  of its own image when ρ < 1/3, `metrics.pixel_own_image_memorization`) and the nearest-neighbour ratio r of 000
  against the whole training set (`metrics.pixel_memorization`).

Per prompt and overall: mean, max, p95 and the fraction above the threshold. A held-out prompt row measures what the
same model gives for captions it never trained on, and the floor row scores the held-out real images themselves
against the training set (and their CLIP score with their own captions): an SSCD number means copying only above
them. Generation i of prompt p (i = p·S + j for seed j; held-out prompts follow) starts from the noise of sample i of
`evaluate.shared_noise` (shared by every model) and takes injected noise from stream 1, as in the pixel evaluation.
The 8-bit generations are saved in ``samples/`` with the prompts and the records of the sets; every number is computed
from them.
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import build_training_set, load_training_set
from .evaluate import (
    L2_THRESHOLD,
    SAMPLES_DIR,
    STREAM_INJECTED_NOISE,
    _fmt,
    _not_computed_if_missing,
    _slug,
    _sscd_extractor,
    _versions,
    _write_json,
    add_arguments,
    heldout_or_note,
    local_model_folder,
    save_samples,
    shared_noise,
    stream_generators,
    strict_json,
)

TEXT_TO_IMAGE_METRICS = ("clip", "sscd", "l2")
DEFAULT_TEXT_TO_IMAGE_METRICS = ("clip", "sscd")
DEFAULT_SAMPLES_PER_PROMPT = 4
DEFAULT_GUIDANCE_SCALE = 7.5
NUM_FIGURE_PROMPTS = 8
NUM_LISTED_PROMPTS = 10
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Prompts and pairs.


def distinct_prompts(pairs) -> tuple[list, list]:
    """The distinct captions of a `TrainingSet` of pairs, in order, and for each the indices of its images."""
    if pairs.captions is None:
        raise ValueError(f"The pairs of {pairs.record.get('dataset')} have no captions: the text-to-image audit needs "
                         "an image–caption list (e.g. an imagefolder with a metadata.jsonl giving each file's text).")
    owners: dict = {}
    for i, caption in enumerate(pairs.captions):
        owners.setdefault(caption, []).append(i)
    empty = owners.pop("", None) or owners.pop(" ", None)
    if empty:
        raise ValueError(f"{len(empty)} images of {pairs.record.get('dataset')} have no caption (e.g. "
                         f"{pairs.record['entries'][empty[0]]['source']}): every audited image needs one.")
    return list(owners), list(owners.values())


def _subset(prompts, owners, limit, seed):
    if limit is None or limit >= len(prompts):
        return prompts, owners
    keep = np.sort(np.random.default_rng([seed, 2]).choice(len(prompts), size=limit, replace=False))
    return [prompts[k] for k in keep], [owners[k] for k in keep]


# ----------------------------------------------------------------------------------------------------------------
# Measures of saved generations.


def _stats(scores: torch.Tensor, threshold: float) -> dict:
    from .metrics import summarize_scores

    return summarize_scores(scores, scores > threshold).to_dict()


def own_image_similarity(features: torch.Tensor, own_features: torch.Tensor, owners: list,
                         samples_per_prompt: int) -> torch.Tensor:
    r"""Per generation, the largest cosine similarity of its descriptor to those of its prompt's own images.

    Args:
        features (`torch.Tensor` of shape `(P·S, D)`): descriptors of the generations, prompt-major.
        own_features (`torch.Tensor` of shape `(M, D)`): descriptors of the prompts' images.
        owners (`list[list[int]]`): for each of the P prompts, its rows of ``own_features``.
        samples_per_prompt (`int`): S.

    Returns:
        `torch.Tensor` of shape `(P·S,)`; NaN where a descriptor is not finite.
    """
    g = torch.nn.functional.normalize(features.double(), dim=1)
    o = torch.nn.functional.normalize(own_features.double(), dim=1)
    sims = g @ o.T
    mask = torch.zeros_like(sims, dtype=torch.bool)
    for p, rows in enumerate(owners):
        mask[p * samples_per_prompt:(p + 1) * samples_per_prompt, rows] = True
    out = sims.masked_fill(~mask, float("-inf")).amax(1)
    out[~torch.isfinite(features).all(1)] = float("nan")
    return out.float()


def _per_prompt(prompts, s, own=None, nearest=None, nn_index=None, clip=None, threshold=0.5, l2=None):
    rows = []
    for p, prompt in enumerate(prompts):
        window = slice(p * s, (p + 1) * s)
        row = {"prompt": prompt}
        if l2 is not None:
            rho, r, r_index = (t[window] for t in l2)
            best = int(torch.nan_to_num(rho, nan=float("inf")).argmin())
            row.update({"l2_own_min": float(rho.min()), "l2_own_mean": float(rho.mean()),
                        "l2_fraction_copied": float((rho < L2_THRESHOLD).double().mean()),
                        "l2_copied": bool((rho < L2_THRESHOLD).any()), "l2_best_seed": best,
                        "l2_nearest_min": float(r.min()), "l2_nearest_index_of_best": int(r_index[best])})
        if own is not None:
            o = own[window]
            best = int(torch.nan_to_num(o, nan=-2.0).argmax())
            row.update({"own_mean": float(o.mean()), "own_max": float(o.max()),
                        "fraction_above": float((o > threshold).double().mean()), "copied": bool((o > threshold).any()),
                        "best_seed": best, "nearest_max": float(nearest[window].max()),
                        "nearest_index_of_best": int(nn_index[window][best])})
        if clip is not None:
            row["clip_mean"] = float(clip[window].mean())
        rows.append(row)
    return rows


def measure_generations(generated, prompts, owners, own_images, train_images, samples_per_prompt, *, threshold=0.5,
                        sscd_extractors=None, clip_extractor=None, pixel_l2=False):
    r"""
    CLIP, SSCD and pixel L2 measures of the generations of a set of prompts.

    Args:
        generated (`torch.Tensor` of shape `(P·S, C, H, W)`): generations in [0, 1], prompt-major.
        prompts (`list[str]`): the P prompts. owners (`list[list[int]]`): each prompt's rows of ``own_images``.
        own_images (`torch.Tensor` of shape `(M, C, H, W)`): the prompts' own images in [0, 1].
        train_images (`torch.Tensor` of shape `(T, C, H, W)`): the whole training set in [0, 1].
        samples_per_prompt (`int`): S.
        threshold (`float`): SSCD similarity above which a generation is a copy.
        sscd_extractors (`dict`, *optional*): preprocessing name -> SSCD feature extractor.
        clip_extractor (*optional*): a [`CLIPFeatureExtractor`] (or any object with ``encode_images`` and
            ``encode_text``).
        pixel_l2 (`bool`, defaults to `False`): also measure the pixel L2 ratios (own image ρ, nearest r), each a
            copy below 1/3.

    Returns:
        `dict`: ``clip`` (overall statistics of the per-generation CLIP score), ``sscd`` (per preprocessing: ``own``
        and ``nearest`` statistics), ``l2`` (``own`` and ``nearest`` ratio statistics) and ``prompts`` (one dict per
        prompt; with several preprocessings, the first one's SSCD columns), plus the per-generation tensors under
        ``_tensors`` (not written to JSON).
    """
    from .evaluate import _features
    from .metrics import compute_clip_score, pixel_memorization, pixel_own_image_memorization, sscd_memorization

    out, tensors = {}, {}
    if pixel_l2:
        own_l2 = pixel_own_image_memorization(generated, own_images, owners, samples_per_prompt, train_images,
                                              threshold=L2_THRESHOLD)
        nearest_l2 = pixel_memorization(generated, train_images, threshold=L2_THRESHOLD)
        out["l2"] = {"own": own_l2.to_dict(), "nearest": nearest_l2.to_dict()}
        tensors["l2"] = (own_l2.ratios, nearest_l2.ratios, nearest_l2.nn_indices[:, 0])
    clip = None
    if clip_extractor is not None:
        repeated = [p for p in prompts for _ in range(samples_per_prompt)]
        clip = compute_clip_score(generated, repeated, clip_extractor).float()
        out["clip"] = {"mean": float(clip.mean()), "min": float(clip.min()), "max": float(clip.max()),
                       "num_samples": int(clip.numel())}
        tensors["clip"] = clip
    first = None
    for name, extractor in (sscd_extractors or {}).items():
        train_features = extractor(train_images).float()
        features = _features(extractor, generated, train_features.shape[1])
        own = own_image_similarity(features, extractor(own_images).float(), owners, samples_per_prompt)
        nearest = sscd_memorization(features, train_features, threshold=threshold)
        out.setdefault("sscd", {})[name] = {"threshold": threshold, "own": _stats(own, threshold),
                                            "nearest": nearest.to_dict()}
        tensors[name] = (own, nearest.max_similarity, nearest.nn_indices)
        first = first or name
    own_t = tensors[first] if first else (None, None, None)
    out["prompts"] = _per_prompt(prompts, samples_per_prompt, *own_t, clip=clip, threshold=threshold,
                                 l2=tensors.get("l2"))
    out["_tensors"] = tensors
    return out


# ----------------------------------------------------------------------------------------------------------------
# Models and their data.


def load_text_to_image_model(path: str):
    """A registered text-to-image pipeline from a saved folder, or the base model with the LoRA weights of a LoRA
    folder (``pytorch_lora_weights.safetensors`` and the ``training_config.json`` that names the base model; an
    LCM-LoRA of ``distill_lcm.py`` gets diffusers' `LCMScheduler`).

    Returns: ``(pipeline, registration)``.
    """
    from .registry import load_pipeline, registration_for

    if not os.path.isfile(os.path.join(path, "model_index.json")) and os.path.isfile(os.path.join(path, LORA_WEIGHTS)):
        config_path = os.path.join(path, "training_config.json")
        config = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        base = config.get("pretrained_model_name_or_path") or config.get("pretrained_teacher_model")
        if not base:
            raise ValueError(f"{path} holds LoRA weights but no training_config.json naming its base model.")
        from diffusers import LCMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(local_model_folder(base))
        pipe.load_lora_weights(path)
        if config.get("script") == "distill_lcm.py":  # an LCM-LoRA samples with the LCMScheduler it was distilled for
            pipe.scheduler = LCMScheduler.from_config(
                pipe.scheduler.config, timestep_scaling=config.get("timestep_scaling_factor", 10.0),
                original_inference_steps=config.get("num_ddim_timesteps", 50), clip_sample=False)  # latents unclipped
        return pipe, registration_for(pipe)
    pipe, registration = load_pipeline(path)
    if not registration.takes_prompts:
        raise ValueError(f"{path} holds a {registration.name}, which takes no prompts.")
    return pipe, registration


def audit_sets(path: str, train_data: str | None, resolution: int, num_heldout: int | None, seed: int):
    """The audited pairs, the whole training set and the held-out pairs (or None, with a note) of a model folder: the
    memorized part of a memorization mix, a captioned ``training_set.json``, or the pairs of ``train_data``; as many
    held-out pairs as prompts (at most ``num_heldout``)."""
    from .captioned_data import is_memorization_mix, load_memorization_mix

    if train_data is not None:
        pairs = training = build_training_set(train_data, resolution, channels=3)
    elif is_memorization_mix(path):
        training = load_memorization_mix(path)
        pairs = training.parts["memorized"]
    else:
        pairs = training = load_training_set(path)
    # As many held-out pairs as prompts (only those are decoded).
    num_prompts = len(distinct_prompts(pairs)[0])
    num_heldout = num_prompts if num_heldout is None else min(num_heldout, num_prompts)
    held, note = heldout_or_note(pairs, num_heldout, seed)
    if held is not None and "extra" in getattr(training, "parts", {}):
        # Pairs of the extra part were trained on: never held out.
        extra = {(e["source"], e["sha256"]) for e in training.parts["extra"].record["entries"]}
        keep = [i for i, e in enumerate(held.record["entries"]) if (e["source"], e["sha256"]) not in extra]
        if len(keep) < len(held):
            from .data import TrainingSet

            record = {**held.record, "entries": [held.record["entries"][i] for i in keep], "num_images": len(keep)}
            held = TrainingSet(held.images[keep], None, held.repeats[keep], record, [held.captions[i] for i in keep])
    if held is not None and not len(held):
        held, note = None, "every held-out candidate is in the training set"
    return pairs, training, held, note


# ----------------------------------------------------------------------------------------------------------------
# The audit.


def _extractors(settings, device, results, sscd_extractors, clip_extractor):
    """The injected extractors, or those the settings name (a missing weights file goes to ``errors``)."""
    from .metrics import CLIPFeatureExtractor

    if "sscd" in settings["metrics"] and sscd_extractors is None:
        sscd_extractors = {}

        def build():
            for p in settings["sscd_preprocessing"]:
                sscd_extractors[p] = _sscd_extractor(settings, p, device)
        _not_computed_if_missing(results, "sscd", build)
        sscd_extractors = sscd_extractors if "sscd" not in results["errors"] else {}
    if "clip" in settings["metrics"] and clip_extractor is None:
        holder = {}
        _not_computed_if_missing(results, "clip", lambda: holder.setdefault("clip", CLIPFeatureExtractor.from_open_clip(
            settings["clip_model"], settings["clip_pretrained"], device=device)))
        clip_extractor = holder.get("clip")
    if "sscd" not in settings["metrics"]:
        sscd_extractors = {}
    if "clip" not in settings["metrics"]:
        clip_extractor = None
    for p, e in (sscd_extractors or {}).items():
        results["weights"].setdefault("sscd", {"backend": e.backend, "weights_path": e.weights_path,
                                               "sha256": e.weights_sha256, "preprocessings": []})["preprocessings"].append(p)
    if clip_extractor is not None:
        results["weights"]["clip"] = {"model": settings["clip_model"], "pretrained": settings["clip_pretrained"],
                                      "backend": getattr(clip_extractor, "backend", None),
                                      "sha256": getattr(clip_extractor, "weights_sha256", None)}
    return sscd_extractors, clip_extractor


def audit_text_to_image(
    pipelines: dict,
    output_dir: str,
    pairs,
    training_set,
    heldout=None,
    *,
    samples_per_prompt: int = DEFAULT_SAMPLES_PER_PROMPT,
    guidance_scale: float | None = DEFAULT_GUIDANCE_SCALE,
    num_inference_steps: int | dict | None = None,
    num_prompts: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device=None,
    metrics=DEFAULT_TEXT_TO_IMAGE_METRICS,
    sscd_preprocessing=("sscd", "dcr"),
    sscd_threshold: float = 0.5,
    sscd_weights: str | None = None,
    sscd_onnx: str | None = None,
    clip_model: str = "ViT-L-14",
    clip_pretrained: str = "openai",
    sscd_extractors: dict | None = None,
    clip_extractor=None,
    paths: dict | None = None,
    floor_note: str | None = None,
) -> dict:
    r"""
    Audit text-to-image pipelines, prompt by prompt, for copies of their training images; write ``metrics.json``,
    ``report.md``, ``figures/`` and the 8-bit generations in ``samples/``.

    Args:
        pipelines (`dict`): report name -> pipeline of a class registered with ``takes_prompts``.
        output_dir (`str`): where everything is written.
        pairs (`TrainingSet`): the audited image–caption pairs (their distinct captions are the prompts).
        training_set (`TrainingSet`): every training image (``pairs`` and, for a memorization mix, the extra pairs).
        heldout (`TrainingSet`, *optional*): pairs no model saw (held-out prompts and the floor row).
        samples_per_prompt (`int`, defaults to 4): seeds per prompt.
        guidance_scale (`float`, defaults to 7.5): classifier-free guidance scale (None: the pipeline's default).
        num_inference_steps (`int` or `dict`, *optional*): sampling steps, or report name -> steps (a model missing
            from the dict, or None: the registration's default).
        num_prompts (`int`, *optional*): a seeded subset of this many prompts (and at most as many held-out ones).
        seed (`int`), batch_size (`int`), device: as in [`~evaluate.evaluate`].
        metrics (`tuple`): among ``"clip"``, ``"sscd"`` and ``"l2"`` (pixel L2 ratios, no weights needed).
        sscd_preprocessing, sscd_threshold, sscd_weights, sscd_onnx: as in [`~evaluate.evaluate`].
        clip_model, clip_pretrained (`str`): the open_clip model name and pretrained tag (or checkpoint file).
        sscd_extractors (`dict`, *optional*), clip_extractor (*optional*): injected feature extractors (tests).
        paths (`dict`, *optional*): report name -> the model's folder, for the records.
        floor_note (`str`, *optional*): why there is no held-out set, for the report.

    Returns:
        `dict`: the results written to ``metrics.json``.
    """
    from .evaluate import _settings
    from .registry import registration_for, sample_images

    if samples_per_prompt < 1:
        raise ValueError(f"--samples_per_prompt must be at least 1, got {samples_per_prompt}.")
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"--num_prompts must be at least 1, got {num_prompts}.")
    unknown = [m for m in metrics if m not in TEXT_TO_IMAGE_METRICS]
    if unknown:
        raise ValueError(f"The text-to-image audit measures {', '.join(TEXT_TO_IMAGE_METRICS)}; not {unknown}.")
    if isinstance(num_inference_steps, dict) and set(num_inference_steps) - set(pipelines):
        raise ValueError(f"num_inference_steps names models that are not audited: "
                         f"{sorted(set(num_inference_steps) - set(pipelines))}.")
    settings = _settings(metrics, sscd_preprocessing, sscd_threshold, True, sscd_weights, sscd_onnx, None, None)
    settings.update(clip_model=clip_model, clip_pretrained=clip_pretrained)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prompts, owners = _subset(*distinct_prompts(pairs), num_prompts, seed)
    held_prompts, held_owners = ([], [])
    if heldout is not None:
        held_prompts, held_owners = _subset(*distinct_prompts(heldout), len(prompts), seed)
    s = samples_per_prompt
    all_prompts = [p for p in prompts + held_prompts for _ in range(s)]
    image_shape = tuple(training_set.images.shape[1:])

    # 1. Generations of every model from shared noise, saved as 8 bits before anything is measured.
    samples_dir = os.path.join(output_dir, SAMPLES_DIR)
    os.makedirs(samples_dir, exist_ok=True)
    generated, runs = {}, []
    noise = None
    for name, pipe in pipelines.items():
        registration = registration_for(pipe)
        if not registration.takes_prompts:
            raise ValueError(f"{name} ({registration.name}) takes no prompts: it cannot be audited with captions.")
        if tuple(registration.image_shape(pipe)) != image_shape:
            raise ValueError(f"{name} generates {registration.image_shape(pipe)} images but the audited pairs are "
                             f"{image_shape}: pass --train_data at the model's resolution.")
        shape = tuple(registration.noise_shape(pipe))
        if noise is None or tuple(noise.shape[1:]) != shape:
            noise = shared_noise(len(all_prompts), shape, seed)
        generators = stream_generators(seed, range(len(all_prompts)), STREAM_INJECTED_NOISE)
        steps = num_inference_steps.get(name) if isinstance(num_inference_steps, dict) else num_inference_steps
        steps = steps or registration.steps(pipe)
        raw = sample_images(pipe.to(device), noise, generators, prompts=all_prompts, num_inference_steps=steps,
                            batch_size=batch_size, guidance_scale=guidance_scale)
        file = f"{_slug(name)}.safetensors"
        generated[name] = save_samples(os.path.join(samples_dir, file), raw, seed, None,
                                       {"name": name, "steps": steps, "guidance_scale": guidance_scale})
        runs.append({"name": name, "kind": registration.kind, "pipeline_class": registration.name, "steps": steps,
                     "path": os.path.abspath((paths or {}).get(name, "")) or None, "file": file})
    for tid, ts in (("training_set", training_set), ("pairs", pairs), ("heldout", heldout)):
        if ts is not None:
            ts.save(os.path.join(samples_dir, tid))
    _write_json(os.path.join(samples_dir, "prompts.json"), {
        "samples_per_prompt": s, "prompts": prompts, "heldout_prompts": held_prompts, "seed": seed,
        "guidance_scale": guidance_scale, "runs": runs})

    # 2. Measures.
    results = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "kind": "text_to_image", "seed": seed, "samples_per_prompt": s,
        "num_prompts": len(prompts), "num_heldout_prompts": len(held_prompts), "guidance_scale": guidance_scale,
        "metrics": list(metrics), "settings": {k: settings[k] for k in ("sscd_preprocessing", "sscd_threshold",
                                                                        "clip_model", "clip_pretrained")},
        "samples_dir": os.path.abspath(samples_dir), "device": str(device), "weights": {}, "errors": {},
        "training_set": {"dataset": training_set.record.get("dataset"), "num_images": len(training_set),
                         "sha256": training_set.record["sha256"], "num_audited_pairs": len(pairs)},
        "models": {}, "floor": None, "floor_note": floor_note, "warnings": [],
    }
    sscd_extractors, clip_extractor = _extractors(settings, device, results, sscd_extractors, clip_extractor)
    threshold = settings["sscd_threshold"]
    unit = lambda ts: ts.images.float() / 255.0  # noqa: E731
    train_images, own_images = unit(training_set), unit(pairs)
    figures_dir = os.path.join(output_dir, "figures")
    os.makedirs(figures_dir, exist_ok=True)
    n = len(prompts) * s
    for run in tqdm(runs, desc="Audit"):
        name = run["name"]
        g = generated[name]
        pixel_l2 = "l2" in settings["metrics"]
        m = measure_generations(g[:n], prompts, owners, own_images, train_images, s, threshold=threshold,
                                sscd_extractors=sscd_extractors, clip_extractor=clip_extractor, pixel_l2=pixel_l2)
        tensors = m.pop("_tensors")
        entry = {**{k: run[k] for k in ("kind", "pipeline_class", "steps", "path", "file")}, "training": m}
        if held_prompts:
            h = measure_generations(g[n:], held_prompts, held_owners, unit(heldout), train_images, s,
                                    threshold=threshold, sscd_extractors=sscd_extractors,
                                    clip_extractor=clip_extractor, pixel_l2=pixel_l2)
            h.pop("_tensors")
            entry["heldout"] = h
        results["models"][name] = entry
        if sscd_extractors:
            _copied_figure(g[:n], own_images, prompts, owners, tensors[next(iter(sscd_extractors))][0], s,
                           os.path.join(figures_dir, f"most_copied_{_slug(name)}.png"))
        elif pixel_l2:  # the smallest own-image ratio is the closest copy
            _copied_figure(g[:n], own_images, prompts, owners, tensors["l2"][0], s,
                           os.path.join(figures_dir, f"most_copied_{_slug(name)}.png"), label="L2 ratio",
                           higher_is_closer=False)
    if heldout is not None:
        floor = {"num_images": len(heldout), "dataset": heldout.record.get("dataset"),
                 "how": heldout.record["heldout_from"]["how"], "sscd": {}}
        from .metrics import compute_clip_score, pixel_memorization, sscd_memorization

        if "l2" in settings["metrics"]:
            floor["l2"] = {"nearest": pixel_memorization(unit(heldout), train_images,
                                                         threshold=L2_THRESHOLD).to_dict()}
        for p, extractor in (sscd_extractors or {}).items():
            floor["sscd"][p] = {"nearest": sscd_memorization(extractor(unit(heldout)).float(),
                                                             extractor(train_images).float(),
                                                             threshold=threshold).to_dict()}
        if clip_extractor is not None:
            clip = compute_clip_score(unit(heldout), heldout.captions, clip_extractor)
            floor["clip"] = {"mean": float(clip.mean()), "num_samples": int(clip.numel())}
        results["floor"] = floor
    clean, reasons = strict_json(results)
    clean["null_values"] = reasons
    _write_json(os.path.join(output_dir, "metrics.json"), clean)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(render_text_to_image_report(clean))
    return clean


def _copied_figure(generated, own_images, prompts, owners, own, s, path, label="SSCD", higher_is_closer=True):
    """The most-copied prompts (by the closest own-image score over seeds: the largest SSCD similarity, or the
    smallest L2 ratio): best seed beside its image."""
    from .metrics.figures import plot_copied_prompts

    sign = 1.0 if higher_is_closer else -1.0
    closeness = torch.nan_to_num(sign * own.double(), nan=-float("inf"))
    per_prompt = torch.stack([closeness[p * s:(p + 1) * s].max() for p in range(len(prompts))])
    order = torch.argsort(per_prompt, descending=True)[:NUM_FIGURE_PROMPTS].tolist()
    rows_g, rows_t, scores = [], [], []
    for p in order:
        best = int(closeness[p * s:(p + 1) * s].argmax())
        rows_g.append(generated[p * s + best])
        rows_t.append(own_images[owners[p][0]])
        scores.append(float(own[p * s + best]))
    plot_copied_prompts(torch.stack(rows_g), torch.stack(rows_t), [prompts[p] for p in order], scores, path=path,
                        score_label=label)


# ----------------------------------------------------------------------------------------------------------------
# report.md


def _sscd_cells(stats: dict | None, threshold_key="fraction_memorized") -> str:
    if not stats:
        return "–"
    return f"{_fmt(stats.get('mean'))} / {_fmt(stats.get('p95'))} / {_fmt(stats.get(threshold_key), True)}"


def _prompt_cells(r: dict, sscd: bool, l2: bool) -> list:
    cells = [r["prompt"].replace("|", "\\|")]
    if sscd:
        cells += [_fmt(r["own_max"]), _fmt(r["own_mean"]), _fmt(r["fraction_above"], True), _fmt(r["nearest_max"])]
    if l2:
        cells += [_fmt(r["l2_own_min"]), _fmt(r["l2_fraction_copied"], True), _fmt(r["l2_nearest_min"])]
    return cells + [_fmt(r.get("clip_mean"))]


def render_text_to_image_report(results: dict) -> str:
    """``report.md`` of the audit: the 000 Table 3 layout (rows: models on training and held-out prompts, and the
    floor; columns: CLIP ↑, SSCD mean / p95 / > threshold to the own and to the nearest training image, and the pixel
    L2 ratios mean / p95 / < 1/3), then the most-copied prompts of each model."""
    preps = [p for p in results["settings"]["sscd_preprocessing"] if "sscd" in results["weights"]] \
        if "sscd" in results["metrics"] else []
    l2 = "l2" in results["metrics"]
    thr = results["settings"]["sscd_threshold"]
    s = results["samples_per_prompt"]
    measures = []
    if "clip" in results["metrics"]:
        measures.append(f"CLIP: raw cosine of open_clip {results['settings']['clip_model']} "
                        f"({results['settings']['clip_pretrained']}).")
    if "sscd" in results["metrics"]:
        measures.append("SSCD: similarity of each generation to its own training image (own) and to the nearest "
                        f"training image (nearest), mean / p95 / fraction above {thr:g}.")
    if l2:
        measures.append("L2 (pixels): own ρ = ‖y − own image‖ / ‖y − nearest other training image‖ and nearest "
                        "r = ‖y − NN₁‖ / ‖y − NN₂‖ over the training set, mean / p95 / fraction below 1/3 (lower is "
                        "closer to a copy).")
    lines = [
        "# Text-to-image memorization audit",
        "",
        f"{results['num_prompts']} prompts of the training set and {results['num_heldout_prompts']} held-out prompts, "
        f"{s} seeds each (seed {results['seed']}), guidance scale {results['guidance_scale']}; training set: "
        f"{results['training_set']['num_images']} images of {results['training_set']['dataset']} (sha256 "
        f"`{results['training_set']['sha256'][:16]}…`). " + " ".join(measures) + " Every number is computed from "
        f"the 8-bit generations in `{results['samples_dir']}`.",
        "",
    ]
    header = ["Model", "prompts", "CLIP ↑"]
    for p in preps:
        header += [f"SSCD `{p}` own: mean / p95 / > {thr:g}", f"SSCD `{p}` nearest: mean / p95 / > {thr:g}"]
    if l2:
        header += ["L2 own ρ: mean / p95 / < 1/3", "L2 nearest r: mean / p95 / < 1/3"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in results["models"].items():
        for which, label in (("training", "training"), ("heldout", "held-out")):
            if which not in m:
                continue
            r = m[which]
            cells = [name, label, _fmt(r.get("clip", {}).get("mean"))]
            for p in preps:
                sscd = r.get("sscd", {}).get(p, {})
                cells += [_sscd_cells(sscd.get("own")), _sscd_cells(sscd.get("nearest"))]
            if l2:
                cells += [_sscd_cells(r.get("l2", {}).get("own")), _sscd_cells(r.get("l2", {}).get("nearest"))]
            lines.append("| " + " | ".join(cells) + " |")
    floor = results.get("floor")
    if floor:
        cells = [f"*floor: {floor['num_images']} held-out real images*", "–", _fmt(floor.get("clip", {}).get("mean"))]
        for p in preps:
            cells += ["–", _sscd_cells(floor["sscd"].get(p, {}).get("nearest"))]
        if l2:
            cells += ["–", _sscd_cells(floor.get("l2", {}).get("nearest"))]
        lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Held-out pairs: {floor['how']} of {floor['dataset']}. The floor row scores those real images "
                  "against the training set (CLIP: with their own captions); a model's SSCD and L2 numbers mean "
                  "copying only beyond it and beyond its own held-out-prompt row."]
    elif results.get("floor_note"):
        lines += ["", f"No held-out prompts or floor row: {results['floor_note']}."]
    lines.append("")
    for name, m in results["models"].items():
        rows = m["training"]["prompts"]
        sscd, l2_rows = bool(rows) and "own_max" in rows[0], bool(rows) and "l2_own_min" in rows[0]
        if not (sscd or l2_rows):
            continue
        if sscd:
            ranked = sorted(rows, key=lambda r: -(r["own_max"] if r["own_max"] is not None else -2))
            copied = sum(r["copied"] for r in rows)
            criterion = f"above {thr:g} (SSCD `{preps[0]}` to their own image)"
        else:
            ranked = sorted(rows, key=lambda r: r["l2_own_min"] if r["l2_own_min"] is not None else float("inf"))
            copied = sum(r["l2_copied"] for r in rows)
            criterion = "with an own-image L2 ratio below 1/3"
        header = ["prompt"] + (["own max", "own mean", "seeds > thr", "nearest max"] if sscd else []) \
            + (["L2 own ρ min", "seeds < 1/3", "L2 nearest r min"] if l2_rows else []) + ["CLIP"]
        lines += [f"## {name}: most-copied prompts", "",
                  f"{copied} of {len(rows)} prompts have a generation {criterion}. "
                  f"[Figure](figures/most_copied_{_slug(name)}.png)", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_prompt_cells(r, sscd, l2_rows)) + " |" for r in ranked[:NUM_LISTED_PROMPTS]]
        held = m.get("heldout", {}).get("prompts", [])
        if held and l2_rows:
            lines += ["", f"Held-out prompts with an own-image L2 ratio below 1/3: "
                      f"{sum(r['l2_copied'] for r in held)} of {len(held)}."]
        lines.append("")
    if results["errors"]:
        lines += ["## Not computed", ""] + [f"- **{k}**: {v}" for k, v in results["errors"].items()] + [""]
    lines += ["## Weights behind the numbers", ""]
    w = results["weights"]
    if "sscd" in w:
        lines.append(f"- SSCD ({w['sscd']['backend']}): `{w['sscd']['weights_path']}`, sha256 `{w['sscd']['sha256']}`")
    if "clip" in w:
        lines.append(f"- CLIP {w['clip']['model']} ({w['clip']['pretrained']}): sha256 `{w['clip']['sha256']}`")
    if not w:
        lines.append("No metric of this report used pretrained weights.")
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}.", ""]
    return "\n".join(lines)


def evaluate_text_to_image(model_paths: list, output_dir: str, *, train_data: str | None = None,
                           names: list | None = None, seed: int = 0, **kwargs) -> dict:
    r"""
    `audit_text_to_image` of saved text-to-image models (folders or Hub ids; LoRA folders load on their base model),
    against the pairs their records name (the memorized set of ``finetune_sd_memorize.py``) or ``train_data`` (an
    image–caption list: an imagefolder with ``metadata.jsonl``, a saved or Hub dataset with image and text columns).
    Every model must share one training set. Keyword arguments go to `audit_text_to_image`.
    """
    if names is not None and len(names) != len(model_paths):
        raise ValueError(f"Got {len(names)} names for {len(model_paths)} models.")
    pipelines, paths, sets = {}, {}, None
    for k, model in enumerate(model_paths):
        path = local_model_folder(model)
        pipe, registration = load_text_to_image_model(path)
        name = names[k] if names else os.path.basename(os.path.normpath(model))
        if name in pipelines:
            raise ValueError(f"Two models share the report name {name!r}; pass distinct names.")
        resolution = registration.image_shape(pipe)[-1]
        found = audit_sets(path, train_data, resolution, kwargs.get("num_prompts"), seed)
        if sets is None:
            sets = found
        elif found[1].record["sha256"] != sets[1].record["sha256"]:
            raise ValueError(f"{model} was trained on another set than {model_paths[0]}: audit them separately.")
        pipelines[name], paths[name] = pipe, path
    pairs, training, held, note = sets
    return audit_text_to_image(pipelines, output_dir, pairs, training, held, seed=seed, paths=paths,
                               floor_note=note, **kwargs)


class EvaluateCommand:
    """``memdistill evaluate``: the text-to-image audit for models whose pipeline takes prompts (or LoRA folders of
    one), the evaluation of `diffusers_memdistill.evaluate` for every other model; the flags are those of
    `evaluate.add_arguments`."""

    add_arguments = staticmethod(add_arguments)

    @staticmethod
    def main(args) -> int:
        from .evaluate import _split, takes_prompts
        from .evaluate import main as evaluate_main

        if args.from_samples or not any(takes_prompts(model) for model in args.models):
            return evaluate_main(args)
        if args.output_dir is None:
            raise ValueError("--output_dir is required with --model.")
        pixel_only = [f"--{k}" for k in ("num_samples", "student_steps", "teacher_steps", "inception_weights",
                                         "cache_dir", "floor") if getattr(args, k, None) is not None]
        if pixel_only:
            raise ValueError(f"{', '.join(pixel_only)} do not apply to the text-to-image audit.")
        metrics = _split(args.metrics)
        results = evaluate_text_to_image(
            args.models, args.output_dir, train_data=args.train_data, seed=0 if args.seed is None else args.seed,
            batch_size=16 if args.batch_size is None else args.batch_size, device=args.device,
            metrics=metrics or DEFAULT_TEXT_TO_IMAGE_METRICS,
            sscd_preprocessing=_split(args.sscd_preprocessing) or ("sscd", "dcr"),
            sscd_threshold=0.5 if args.sscd_threshold is None else args.sscd_threshold,
            sscd_weights=args.sscd_weights, sscd_onnx=args.sscd_onnx,
            samples_per_prompt=DEFAULT_SAMPLES_PER_PROMPT if args.samples_per_prompt is None else args.samples_per_prompt,
            guidance_scale=DEFAULT_GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale,
            num_inference_steps=args.num_inference_steps, num_prompts=args.num_prompts,
            clip_model=args.clip_model or "ViT-L-14", clip_pretrained=args.clip_pretrained or "openai")
        print(render_text_to_image_report(results))
        print(f"Wrote {os.path.join(args.output_dir, 'report.md')}, metrics.json and the generations in "
              f"{os.path.join(args.output_dir, SAMPLES_DIR)}.")
        return 0
