r"""The audit pipeline: plan → samples → per-sample measures → results, for every kind of model, on any number of
processes.

1. **Plan.** The models (folders or Hub ids of registered pipelines, or LoRA folders of a text-to-image one), their
   training sets, the held-out real images of the floor, and each sample's condition: a class label drawn from its
   own stream, or a prompt (generation i of prompt p is sample ``p·S + j``; held-out prompts follow the training
   ones). The plan is the audit's fingerprint, written to ``samples/manifest.json`` before anything else: the same
   command started again continues the audit; another model, data or flag is refused.
2. **Samples**, shard by shard (``--shard_size``), each written atomically as 8 bits with its seeds and condition
   (`evaluation.store`); under ``accelerate launch --num_processes N`` process r takes shards r, r + N, ...; a shard
   already on disk is kept. The floor's held-out images are stored the same way, as a run of their own.
3. **Per-sample measures**, shard by shard, split the same way: the training set's features are computed once in
   chunks split over the processes and cached on disk by the images' and the extractor's sha256
   (`evaluation.references`), then each shard's nearest neighbours are searched exactly against them.
4. **Results** on the main process: statistics from every shard's per-sample outputs, figures, ``metrics.json``
   (`evaluation.results`) and ``report.md`` (`evaluation.report`).

``--from_samples`` runs 3 and 4 on the saved samples of an earlier audit, without any model.
"""

from __future__ import annotations

import os
import time

import torch
from tqdm.auto import tqdm

from . import measures as M
from .extractors import audit_settings, load_extractors
from .models import load_model, local_model_folder, slug, takes_prompts, training_config
from .per_sample import MEASURES_DIR, MeasureContext, measure_shards, prepare_references
from .processes import Processes, Timings, device_of
from .results import strict_json
from .sets import audit_sets, distinct_prompts, heldout_entry, heldout_sets, prompt_subset, training_set_of
from .store import (DEFAULT_SHARD_SIZE, MANIFEST_NAME, SAMPLES_DIR, STORE_FORMAT, TEACHER_TARGETS, check_plan,
                    load_array, model_fingerprint, read_json, read_shard, save_shard, shard_is_complete, shard_path,
                    shard_ranges, write_json)
from .streams import (STREAM_INJECTED_NOISE, check_seed, noise_description, shared_labels, shared_noise,
                      stream_generators)
from .summary import run_stages, summarize


# ----------------------------------------------------------------------------------------------------------------
# 1. The plan.


def _plan_image(folders, model_paths, names, student_steps, teacher_steps, train_data, num_samples, seed,
                floor: bool):
    """Runs, training sets and floor of an audit of pixel models (teachers, students, generators)."""
    runs, pipelines, train_sets, set_ids = [], {}, {}, {}
    for k, (model, path) in enumerate(zip(model_paths, folders)):
        pipeline, registration = load_model(path)
        base = names[k] if names else os.path.basename(os.path.normpath(model))
        ts = training_set_of(path, train_data, tuple(registration.image_shape(pipeline)))
        key = (ts.record["sha256"], len(ts))
        if key not in set_ids:
            set_ids[key] = f"train{len(set_ids)}"
            train_sets[set_ids[key]] = ts
        kind = registration.kind
        steps_list = list(student_steps) if kind == "student" else [teacher_steps if kind == "teacher" else None]
        for steps in steps_list:
            name = f"{base} ({steps}-step)" if kind == "student" else base
            conditional = bool(registration.num_classes(pipeline))
            runs.append({"name": name, "slug": slug(name), "path": os.path.abspath(path), "kind": kind,
                         "pipeline_class": registration.name, "steps": steps, "training_set": set_ids[key],
                         "class_conditional": conditional, "training_config": training_config(path),
                         "noise_shape": list(registration.noise_shape(pipeline)),
                         "image_shape": list(registration.image_shape(pipeline)),
                         "num_classes": registration.num_classes(pipeline),
                         "pairing_maps": bool(registration.has_pairing_maps)})
            pipelines[name] = (pipeline, registration)
    for r in runs:
        ts = train_sets[r["training_set"]]
        if tuple(ts.images.shape[1:]) != tuple(r["image_shape"]):
            raise ValueError(
                f"{r['path']} generates {'x'.join(map(str, r['image_shape']))} images but its training set has "
                f"{'x'.join(map(str, ts.images.shape[1:]))}: resolution/channels differ.")
    shapes = {tuple(r["noise_shape"]) for r in runs}
    if len(shapes) != 1:
        raise ValueError(f"All models must sample from noise of one shape to share it; got {sorted(shapes)}.")
    held, notes = heldout_sets(train_sets, num_samples, seed, floor)
    return runs, pipelines, train_sets, held, notes


def _plan_text_to_image(folders, model_paths, names, train_data, num_prompts, seed, samples_per_prompt,
                        num_inference_steps, guidance_scale):
    runs, pipelines, sets = [], {}, None
    for k, (model, path) in enumerate(zip(model_paths, folders)):
        pipe, registration = load_model(path)
        if not registration.takes_prompts:
            raise ValueError(f"{path} holds a {registration.name}, which takes no prompts.")
        name = names[k] if names else os.path.basename(os.path.normpath(model))
        found = audit_sets(path, train_data, registration.image_shape(pipe)[-1], num_prompts, seed)
        if sets is None:
            sets = found
        elif found[1].record["sha256"] != sets[1].record["sha256"]:
            raise ValueError(f"{model} was trained on another set than {model_paths[0]}: audit them separately.")
        steps = num_inference_steps.get(name) if isinstance(num_inference_steps, dict) else num_inference_steps
        runs.append({"name": name, "slug": slug(name), "path": os.path.abspath(path), "kind": registration.kind,
                     "pipeline_class": registration.name, "steps": steps or registration.steps(pipe),
                     "guidance_scale": guidance_scale, "training_set": "train0", "class_conditional": False,
                     "training_config": training_config(path), "noise_shape": list(registration.noise_shape(pipe)),
                     "image_shape": list(registration.image_shape(pipe)), "num_classes": 0, "pairing_maps": False})
        pipelines[name] = (pipe, registration)
    if isinstance(num_inference_steps, dict) and set(num_inference_steps) - set(pipelines):
        raise ValueError(f"num_inference_steps names models that are not audited: "
                         f"{sorted(set(num_inference_steps) - set(pipelines))}.")
    pairs, training, held, note = sets
    for r in runs:
        if tuple(r["image_shape"]) != tuple(training.images.shape[1:]):
            raise ValueError(f"{r['name']} generates {tuple(r['image_shape'])} images but the audited pairs are "
                             f"{tuple(training.images.shape[1:])}: pass --train_data at the model's resolution.")
    return runs, pipelines, pairs, training, held, note


def _conditions(pairs, held, num_prompts, seed, samples_per_prompt) -> dict:
    prompts, owners = prompt_subset(*distinct_prompts(pairs), num_prompts, seed)
    held_prompts, held_owners = ([], [])
    if held is not None:
        held_prompts, held_owners = prompt_subset(*distinct_prompts(held), len(prompts), seed)
    return {"kind": "prompt", "samples_per_prompt": samples_per_prompt, "prompts": prompts, "owners": owners,
            "heldout_prompts": held_prompts, "heldout_owners": held_owners}


# ----------------------------------------------------------------------------------------------------------------
# 2. Samples.


@torch.no_grad()
def generate(pipe, run, noise, generators, labels, prompts, batch_size) -> torch.Tensor:
    """Samples of one shard in [0, 1], NCHW float32 on the CPU (NaNs kept), through the pipeline's registration: row
    i starts from ``noise[i]``, takes its injected noise from ``generators[i]`` and its class label or prompt."""
    from ..registry import sample_images

    kwargs = {"guidance_scale": run["guidance_scale"]} if prompts is not None else {}
    return sample_images(pipe, noise, generators, class_labels=labels, prompts=prompts,
                         num_inference_steps=run["steps"], batch_size=batch_size, **kwargs).float().cpu()


def _sample_shards(run, pipeline, registration, manifest, samples_dir, procs, device, batch_size, progress):
    """This process's missing shards of one model's samples (and of the teacher's pairing targets)."""
    from ..registry import teacher_pairing_maps

    seed, n, size = manifest["seed"], manifest["num_samples"], manifest["shard_size"]
    conditions = manifest["conditions"]
    folder = os.path.join(samples_dir, run["slug"])
    ranges = shard_ranges(n, size)
    todo = [k for k in procs.mine(ranges) if not shard_is_complete(shard_path(folder, k), *ranges[k])]
    targets_folder = os.path.join(samples_dir, TEACHER_TARGETS)
    want_targets = manifest["teacher_targets"] is not None and manifest["teacher_targets"]["teacher"] == run["name"]
    targets_todo = [k for k in procs.mine(ranges)
                    if want_targets and not shard_is_complete(shard_path(targets_folder, k), *ranges[k])]
    if not todo and not targets_todo:
        return
    pipe = pipeline.to(device)
    for k in tqdm(sorted(set(todo) | set(targets_todo)), desc=f"Sampling {run['name']}", disable=not progress):
        start, stop = ranges[k]
        noise = shared_noise(stop - start, tuple(run["noise_shape"]), seed, first_index=start)
        labels = shared_labels(stop - start, manifest["num_classes"], seed, first_index=start) \
            if run["class_conditional"] else None
        cond = {"class_labels": labels}
        prompts = None
        if conditions["kind"] == "prompt":
            s = conditions["samples_per_prompt"]
            everything = conditions["prompts"] + conditions["heldout_prompts"]
            cond = {"prompt_index": torch.arange(start, stop) // s}
            prompts = [everything[i // s] for i in range(start, stop)]
        if k in todo:
            generators = stream_generators(seed, range(start, stop), STREAM_INJECTED_NOISE)
            raw = generate(pipe, run, noise, generators, labels, prompts, batch_size)
            save_shard(shard_path(folder, k), {"images": raw.float().cpu()}, start, seed, cond,
                       {"name": run["name"], "steps": run["steps"], "process": procs.index})
        if k in targets_todo:
            with torch.no_grad():
                phi_k, phi_1 = teacher_pairing_maps(pipe, noise, labels, num_steps=M.PAIRING_TEACHER_STEPS,
                                                    batch_size=batch_size)
            save_shard(shard_path(targets_folder, k), {"phi_k": phi_k.float().cpu(), "phi_1": phi_1.float().cpu()},
                       start, seed, cond, {"teacher": run["name"]})


def _store_floor(run, held, samples_dir, shard_size, seed, procs):
    """The floor's held-out real images, stored as a run of their own (exact: they are 8-bit already)."""
    folder = os.path.join(samples_dir, run["slug"])
    ranges = shard_ranges(len(held), shard_size)
    for k in procs.mine(ranges):
        start, stop = ranges[k]
        if not shard_is_complete(shard_path(folder, k), start, stop):
            save_shard(shard_path(folder, k), {"images": held.images[start:stop].float() / 255.0}, start, seed,
                       None, {"name": run["name"]})


# ----------------------------------------------------------------------------------------------------------------
# The entry points.


def _measure_and_write(ctx: MeasureContext, progress: bool, recomputed_from: str | None = None) -> dict:
    from .report import render_report

    os.makedirs(ctx.figures_dir, exist_ok=True)
    with ctx.timings("references"):
        prepare_references(ctx, progress)
    measure_shards(ctx, ctx.manifest["runs"] + ctx.manifest["floor_runs"], progress)
    ctx.procs.wait()
    with ctx.timings("run stages"):
        run_stages(ctx)
    ctx.procs.wait()
    path = os.path.join(ctx.output_dir, "metrics.json")
    if ctx.procs.is_main:
        with ctx.timings("summary"):
            results = summarize(ctx, recomputed_from, ctx.extractors.errors)
        clean, reasons = strict_json(results)
        clean["null_values"] = reasons
        write_json(path, clean)
        with open(os.path.join(ctx.output_dir, "report.md") + ".tmp", "w", encoding="utf-8") as f:
            f.write(render_report(clean))
        os.replace(os.path.join(ctx.output_dir, "report.md") + ".tmp", os.path.join(ctx.output_dir, "report.md"))
    ctx.timings.write(ctx.output_dir, ctx.procs)
    ctx.procs.wait()
    return read_json(path)


def check_output_dir(output_dir: str) -> None:
    """An audit never writes into a saved model (its samples and reports would be uploaded with it) nor over a file."""
    from .models import is_lora_folder

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir} is a file; give a folder for the audit.")
    if os.path.isfile(os.path.join(output_dir, "model_index.json")) or (
            os.path.isdir(output_dir) and is_lora_folder(output_dir)):
        raise ValueError(f"--output_dir {output_dir} is a saved model; audit into a folder of its own.")


def evaluate(
    model_paths: list,
    output_dir: str,
    num_samples: int = 1000,
    metrics: tuple | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    student_steps: tuple = (1,),
    teacher_steps: int | None = None,
    train_data: str | None = None,
    sscd_weights: str | None = None,
    sscd_onnx: str | None = None,
    inception_weights: str | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
    names: list | None = None,
    sscd_preprocessing: str | tuple | None = None,
    sscd_threshold: float = 0.5,
    floor: bool = True,
    samples_per_prompt: int = 4,
    guidance_scale: float | None = 7.5,
    num_inference_steps: int | dict | None = None,
    num_prompts: int | None = None,
    clip_model: str = "ViT-L-14",
    clip_pretrained: str = "openai",
    shard_size: int = DEFAULT_SHARD_SIZE,
    extractors: dict | None = None,
    progress: bool = True,
) -> dict:
    r"""
    Audit saved models: sample them from shared per-sample noise into the sample store, then measure quality and
    memorization from the 8-bit samples; write ``metrics.json``, ``report.md`` and ``figures/``. Runs on every
    process of ``accelerate launch`` (each samples and measures its shards) and continues an interrupted audit.

    Args:
        model_paths (`list[str]`): saved folders or Hub ids of registered pipelines: pixel models (EDM teachers,
            consistency students, DMD generators, PD students, +refine folders, DDPM / DDIM pipelines) or
            text-to-image ones (Stable Diffusion pipelines, LoRA folders of one); not both in one audit.
        output_dir (`str`): where ``samples/``, ``measures/``, ``metrics.json``, ``report.md`` and ``figures/`` go.
        num_samples (`int`, defaults to 1000): samples per pixel model, sample i from the noise streams of index i.
        metrics (`tuple[str]`, *optional*): among ``METRICS``; defaults to ``DEFAULT_METRICS`` of the task.
        seed (`int`, defaults to 0): the seed of every random stream.
        batch_size (`int`, *optional*): sampling batch size (256 for pixel models, 16 for text-to-image ones).
        student_steps (`tuple[int]`, defaults to `(1,)`): one row per number of consistency-student steps.
        teacher_steps (`int`, *optional*): Heun steps of EDM teachers (their scheduler's default when None).
        train_data (`str`, *optional*): data to compare against instead of each model's records.
        sscd_weights, sscd_onnx, inception_weights (`str`, *optional*): weight files (or URLs) of the extractors.
        cache_dir (`str`, *optional*): cache of the training sets' features (default: [`default_cache_dir`]).
        device (`str`, *optional*): ``"cuda"`` or ``"cpu"`` (each process's accelerator when available).
        names (`list[str]`, *optional*): report names of the models, in order.
        sscd_preprocessing (`str` or `tuple[str]`, *optional*): ``"sscd"``, ``"dcr"`` or both (default ``sscd`` for
            pixel models, both for text-to-image ones).
        sscd_threshold (`float`, defaults to 0.5): SSCD similarity above which a sample counts as a copy.
        floor (`bool`, defaults to `True`): also score held-out real images of the same distribution.
        samples_per_prompt, guidance_scale, num_inference_steps, num_prompts, clip_model, clip_pretrained:
            the text-to-image audit's seeds per prompt, guidance, steps (or report name -> steps), a seeded subset
            of prompts and the open_clip model of the CLIP score.
        shard_size (`int`, defaults to 256): samples per shard, the unit of work of a process and of resumption.
        extractors (`dict`, *optional*): injected extractors, ``{"sscd": {preprocessing: e}, "inception": e,
            "clip": e}`` (tests).
        progress (`bool`, defaults to `True`): progress bars.

    Returns:
        `dict`: the results written to ``metrics.json`` (on every process).
    """
    if not model_paths:
        raise ValueError("Give at least one --model.")
    if names is not None and len(names) != len(model_paths):
        raise ValueError(f"Got {len(names)} names for {len(model_paths)} models.")
    seed = check_seed(seed)
    folders = [local_model_folder(model) for model in model_paths]  # a Hub id is downloaded (or found) once
    prompted = [takes_prompts(folder) for folder in folders]
    if any(prompted) and not all(prompted):
        raise ValueError(f"{', '.join(m for m, p in zip(model_paths, prompted) if p)} generate from prompts: audit "
                         "text-to-image models separately from the others.")
    task = "text-to-image" if all(prompted) else "image"
    settings = audit_settings(task, metrics or M.DEFAULT_METRICS[task],
                              sscd_preprocessing or (("sscd", "dcr") if task == "text-to-image" else "sscd"),
                              sscd_threshold, floor, sscd_weights, sscd_onnx, inception_weights, cache_dir, clip_model,
                              clip_pretrained)
    batch_size = batch_size or (16 if task == "text-to-image" else 256)
    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}.")
    if task == "text-to-image":
        if samples_per_prompt < 1:
            raise ValueError(f"--samples_per_prompt must be at least 1, got {samples_per_prompt}.")
        if num_prompts is not None and num_prompts < 1:
            raise ValueError(f"--num_prompts must be at least 1, got {num_prompts}.")
    elif num_samples < 2:
        raise ValueError(f"--num_samples must be at least 2, got {num_samples}.")
    shard_ranges(1, shard_size)  # checks it
    device = device_of(device)
    procs = Processes.current(device)
    check_output_dir(output_dir)
    samples_dir = os.path.join(output_dir, SAMPLES_DIR)

    # 1. The plan.
    timings = Timings()
    plan_started = time.perf_counter()
    pairs = None
    if task == "image":
        runs, pipelines, train_sets, heldout, notes = _plan_image(
            folders, model_paths, names, student_steps, teacher_steps, train_data, num_samples, seed, settings["floor"])
        conditions = {"kind": "class" if any(r["class_conditional"] for r in runs) else None}
        num_classes = max(r["num_classes"] for r in runs)
    else:
        runs, pipelines, pairs, training, held, note = _plan_text_to_image(
            folders, model_paths, names, train_data, num_prompts, seed, samples_per_prompt, num_inference_steps,
            guidance_scale)
        conditions = _conditions(pairs, held, num_prompts, seed, samples_per_prompt)
        num_samples = (len(conditions["prompts"]) + len(conditions["heldout_prompts"])) * samples_per_prompt
        train_sets = {"train0": training}
        heldout = {"train0": held} if held is not None else {}
        notes = {} if held is not None else {"train0": note}
        num_classes = 0
    names_seen = [r["name"] for r in runs]
    if len(set(names_seen)) != len(names_seen) or len({r["slug"] for r in runs}) != len(runs):
        raise ValueError(f"Two models share a report name ({names_seen}); pass distinct names.")
    floor_runs = [{"name": f"floor ({tid})", "slug": f"floor-{tid}", "kind": "floor", "training_set": tid,
                   "num_samples": len(held_set)} for tid, held_set in heldout.items()]
    teachers = [r for r in runs if r["kind"] == "teacher" and r["pairing_maps"]]
    students = [r for r in runs if r["kind"] in ("student", "generator")]
    targets = None
    if "pairing" in settings["metrics"] and teachers and students:
        targets = {"teacher": teachers[0]["name"], "teacher_steps": M.PAIRING_TEACHER_STEPS,
                   "training_set": teachers[0]["training_set"]}
    plan = {
        "task": task, "seed": seed, "num_samples": num_samples, "shard_size": shard_size, "batch_size": batch_size,
        "models": [{"name": r["name"], "path": r["path"], "steps": r["steps"],
                    "fingerprint": model_fingerprint(r["path"])} for r in runs],
        "data": {tid: ts.record["sha256"] for tid, ts in train_sets.items()},
        "sampling": {"student_steps": list(student_steps), "teacher_steps": teacher_steps, "train_data": train_data,
                     "samples_per_prompt": samples_per_prompt if task == "text-to-image" else None,
                     "guidance_scale": guidance_scale if task == "text-to-image" else None,
                     "num_prompts": num_prompts if task == "text-to-image" else None},
        "settings": {k: v for k, v in settings.items() if k != "cache_dir"},
    }
    manifest = {
        "format": STORE_FORMAT, "plan": plan, "task": task, "seed": seed, "num_samples": num_samples,
        "shard_size": shard_size, "num_classes": num_classes, "noise": noise_description(seed), "runs": runs,
        "floor_runs": floor_runs, "conditions": conditions, "teacher_targets": targets,
        "training_sets": {tid: {"record": f"training_sets/{tid}/training_set.json", "sha256": ts.record["sha256"],
                                "num_images": len(ts)} for tid, ts in train_sets.items()},
        "pairs": {"record": "pairs/training_set.json"} if pairs is not None else None,
        "heldout_sets": {tid: {**heldout_entry(h, seed), "record": f"heldout_sets/{tid}/training_set.json"}
                         for tid, h in heldout.items()},
        "floor_notes": notes, "settings": settings,
        "sampling": {"batch_size": batch_size, "device": str(device)},
    }
    manifest_path = os.path.join(samples_dir, MANIFEST_NAME)
    check_plan(manifest_path, plan)
    procs.wait()
    if procs.is_main:
        for tid, ts in train_sets.items():
            ts.save(os.path.join(samples_dir, "training_sets", tid))
        for tid, h in heldout.items():
            h.save(os.path.join(samples_dir, "heldout_sets", tid))
        if pairs is not None:
            pairs.save(os.path.join(samples_dir, "pairs"))
        if not os.path.isfile(manifest_path):
            write_json(manifest_path, manifest)
    procs.wait()

    timings.seconds["plan"] = time.perf_counter() - plan_started

    # 2. Samples, shard by shard.
    with timings("sampling"):
        for run in runs:
            pipeline, registration = pipelines[run["name"]]
            _sample_shards(run, pipeline, registration, manifest, samples_dir, procs, device, batch_size, progress)
        for run in floor_runs:
            _store_floor(run, heldout[run["training_set"]], samples_dir, shard_size, seed, procs)
    procs.wait()

    # 3 and 4. Measures, then results.
    ctx = MeasureContext(manifest, settings, samples_dir, output_dir, os.path.join(output_dir, "figures"), device,
                         procs, load_extractors(settings, device, extractors), train_sets, heldout, pairs,
                         timings=timings)
    return _measure_and_write(ctx, progress)


def evaluate_from_samples(
    samples_dir: str,
    output_dir: str | None = None,
    metrics: tuple | None = None,
    sscd_weights: str | None = None,
    sscd_onnx: str | None = None,
    inception_weights: str | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
    sscd_preprocessing: str | tuple | None = None,
    sscd_threshold: float | None = None,
    floor: bool | None = None,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    extractors: dict | None = None,
    progress: bool = True,
) -> dict:
    r"""
    Recompute every number of an earlier audit from its saved samples, without loading any model.

    Args:
        samples_dir (`str`): the earlier audit's output folder (or its ``samples/`` folder).
        output_dir (`str`, *optional*): where to write; defaults to ``<audit>/recomputed``. Must not be the earlier
            audit's folder (its ``metrics.json`` is what the recomputation is checked against).
        metrics, sscd_*, inception_weights, cache_dir, floor, clip_*: as in [`evaluate`]; each defaults to the
            setting the samples were audited with.
        device (`str`, *optional*): where the measures run.

    Returns:
        `dict`: the recomputed results, also written to ``output_dir``.
    """
    from ..data import load_training_set

    folder = os.path.abspath(samples_dir)
    if not os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        folder = os.path.join(folder, SAMPLES_DIR)
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(
            f"{samples_dir} holds no saved samples ({SAMPLES_DIR}/{MANIFEST_NAME}): pass the output folder of "
            "memdistill evaluate --model ...")
    manifest = read_json(manifest_path)
    if manifest.get("format") != STORE_FORMAT:
        raise ValueError(f"{manifest_path} is a sample store of format {manifest.get('format')}, not "
                         f"{STORE_FORMAT}: audit the models again with this version of memdistill evaluate.")
    evaluation_dir = os.path.dirname(folder)
    output_dir = os.path.abspath(output_dir or os.path.join(evaluation_dir, "recomputed"))
    if output_dir in (evaluation_dir, folder):
        raise ValueError(f"--output_dir {output_dir} would overwrite the audit being recomputed; choose another.")
    old = manifest["settings"]
    pick = lambda new, key: old[key] if new is None else new  # noqa: E731
    weights_given = sscd_weights is not None or sscd_onnx is not None
    settings = audit_settings(
        manifest["task"], pick(metrics, "metrics"), pick(sscd_preprocessing, "sscd_preprocessing"),
        pick(sscd_threshold, "sscd_threshold"), pick(floor, "floor"),
        sscd_weights if weights_given else old["sscd_weights"], sscd_onnx if weights_given else old["sscd_onnx"],
        pick(inception_weights, "inception_weights"), pick(cache_dir, "cache_dir"),
        pick(clip_model, "clip_model"), pick(clip_pretrained, "clip_pretrained"))
    if "pairing" in settings["metrics"] and manifest["teacher_targets"] is None and metrics is not None:
        raise ValueError(
            f"{samples_dir} holds no pairing targets of a teacher (the audit ran without pairing, or without a "
            "teacher and a student); audit the models again with --metrics ...,pairing.")
    device = device_of(device)
    procs = Processes.current(device)
    train_sets = {}
    for tid, entry in manifest["training_sets"].items():
        ts = load_training_set(os.path.join(folder, entry["record"]))
        if ts.record["sha256"] != entry["sha256"]:
            raise ValueError(f"Training set {tid} rebuilt from {entry['record']} differs from the one audited.")
        train_sets[tid] = ts
    heldout = {}
    for tid, entry in manifest["heldout_sets"].items():
        held = load_training_set(os.path.join(folder, entry["record"]))
        if held.record["sha256"] != entry["sha256"]:
            raise ValueError(f"The held-out set of {tid} rebuilt now differs from the one recorded in {manifest_path}.")
        heldout[tid] = held
    if not settings["floor"]:
        manifest = {**manifest, "floor_runs": [], "heldout_sets": {},
                    "floor_notes": {tid: "not requested (--no_floor)" for tid in train_sets}}
        heldout = {} if manifest["task"] == "image" else heldout
    pairs = load_training_set(os.path.join(folder, manifest["pairs"]["record"])) if manifest["pairs"] else None
    check_output_dir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    ctx = MeasureContext(manifest, settings, folder, output_dir, os.path.join(output_dir, "figures"), device, procs,
                         load_extractors(settings, device, extractors), train_sets, heldout, pairs)
    if procs.is_main:
        # A recomputation with other settings must not reuse per-sample outputs measured with the earlier ones.
        settings_path = os.path.join(output_dir, MEASURES_DIR, "settings.json")
        current = {k: v for k, v in settings.items() if k != "cache_dir"}
        if os.path.isfile(settings_path) and read_json(settings_path) != current:
            import shutil

            shutil.rmtree(os.path.join(output_dir, MEASURES_DIR))
        write_json(settings_path, current)
    procs.wait()
    return _measure_and_write(ctx, progress, recomputed_from=evaluation_dir)


def read_samples(output_dir: str, name: str) -> torch.Tensor:
    """The float samples of one model of an audit (uint8 / 255, NaN rows where not finite), by report name."""
    folder = os.path.join(os.path.abspath(output_dir), SAMPLES_DIR)
    manifest = read_json(os.path.join(folder, MANIFEST_NAME))
    for run in manifest["runs"] + manifest["floor_runs"]:
        if run["name"] == name:
            return load_array(os.path.join(folder, run["slug"]), run.get("num_samples", manifest["num_samples"]),
                              manifest["shard_size"])
    raise KeyError(f"{output_dir} holds no samples of a model named {name!r}.")


def read_conditions(output_dir: str, name: str, key: str) -> torch.Tensor:
    """A per-sample tensor of one model's shards (``seeds``, ``sample_index``, ``class_labels``, ``prompt_index``)."""
    folder = os.path.join(os.path.abspath(output_dir), SAMPLES_DIR)
    manifest = read_json(os.path.join(folder, MANIFEST_NAME))
    run = next(r for r in manifest["runs"] if r["name"] == name)
    ranges = shard_ranges(manifest["num_samples"], manifest["shard_size"])
    return torch.cat([read_shard(shard_path(os.path.join(folder, run["slug"]), k))[key] for k in range(len(ranges))])


__all__ = ["evaluate", "evaluate_from_samples", "generate", "read_conditions", "read_samples"]
