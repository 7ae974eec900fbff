"""``memdistill evaluate``: sample saved models from shared noise, save the samples, and measure their quality and
memorization from the saved samples.

Noise. Sample i of an evaluation with seed s draws from three independent random streams, each a CPU
``torch.Generator`` seeded from ``numpy.random.SeedSequence([s, i, stream])``: stream 0 is the starting noise z_i
(shared by every model, so that pairings and side-by-side grids are meaningful), stream 1 the noise a sampler
injects (multistep consistency sampling, EDM churn), stream 2 the class label. Streams are drawn per sample on the
CPU, so the samples depend neither on the batch size nor on the device, and the injected noise is independent of
the starting noise.

Samples. Every model's samples are rounded to 8 bits and written to ``samples/`` (safetensors, with the per-sample
seeds), beside the teacher's pairing targets and the records of the training and held-out sets. Every metric is
computed from these 8-bit samples, so ``memdistill evaluate --from_samples DIR`` recomputes ``metrics.json``
exactly, without any model.

Results go to ``metrics.json`` (strict JSON: a number that is not finite is written as null, with its reason under
``null_values``), ``report.md`` (the table of 000 Table 1, with a floor row of held-out real images and the training
set's near-duplicates) and ``figures/``. See ``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import build_training_set, load_heldout_set, load_training_set

METRICS = ("l2", "sscd", "fid", "fd_pixel", "clip", "pairing")
DEFAULT_METRICS = "l2,sscd,fid,fd_pixel,pairing"
L2_THRESHOLD = 1.0 / 3.0
PAIRING_TEACHER_STEPS = 8  # Phi_K of 003 Def. 3.1, K = 8
FID_MIN_SAMPLES = 2048  # fewer samples than Inception features: a rank-deficient covariance, FID biased upwards
NUM_LISTED_DUPLICATES = 10

# Random streams of sample i: numpy.random.SeedSequence([seed, i, stream]).
STREAM_STARTING_NOISE, STREAM_INJECTED_NOISE, STREAM_CLASS_LABEL = 0, 1, 2
NOISE_STREAMS = {
    str(STREAM_STARTING_NOISE): "starting noise z_i ~ N(0, I), shared by every model",
    str(STREAM_INJECTED_NOISE): "noise injected by the sampler (multistep consistency sampling, EDM churn)",
    str(STREAM_CLASS_LABEL): "class label of class-conditional models, shared by every model",
}
NOISE_SCHEME = (
    "sample i, stream s: torch.Generator() (CPU) seeded with SeedSequence([seed, i, s]).generate_state(1, uint64)[0] "
    ">> 1 (numpy); independent of batch size and device"
)

SAMPLES_DIR = "samples"
MANIFEST_NAME = "manifest.json"
SAMPLES_FORMAT = "memdistill-samples"
TEACHER_TARGETS_FILE = "teacher_targets.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Per-sample random streams.


def stream_seeds(seed: int, indices, stream: int) -> torch.Tensor:
    r"""
    The seeds of one random stream for the given sample indices, derived with ``numpy.random.SeedSequence``.

    Args:
        seed (`int`): the evaluation's seed, ≥ 0.
        indices (iterable of `int`): sample indices i.
        stream (`int`): 0 starting noise, 1 injected noise, 2 class label.

    Returns:
        `torch.Tensor` of int64: ``SeedSequence([seed, i, stream]).generate_state(1, uint64)[0] >> 1`` per index (63
        bits, so that the seeds fit a signed int64 file and ``torch.Generator.manual_seed``).
    """
    if int(seed) < 0:
        raise ValueError(f"The seed must be a non-negative integer, got {seed}.")
    values = [
        int(np.random.SeedSequence([int(seed), int(i), int(stream)]).generate_state(1, np.uint64)[0] >> np.uint64(1))
        for i in indices
    ]
    return torch.tensor(values, dtype=torch.long)


def stream_generators(seed: int, indices, stream: int) -> list:
    """CPU ``torch.Generator`` objects seeded with [`stream_seeds`], one per sample index."""
    return [torch.Generator().manual_seed(int(s)) for s in stream_seeds(seed, indices, stream)]


def shared_noise(num_samples: int, shape: tuple, seed: int, first_index: int = 0) -> torch.Tensor:
    """Unit-variance starting noise of samples ``first_index ...``, each from its own stream-0 generator."""
    generators = stream_generators(seed, range(first_index, first_index + num_samples), STREAM_STARTING_NOISE)
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def shared_labels(num_samples: int, num_classes: int, seed: int, first_index: int = 0) -> torch.Tensor | None:
    """Uniform class labels of samples ``first_index ...``, each from its own stream-2 generator (None if unconditional)."""
    if not num_classes:
        return None
    generators = stream_generators(seed, range(first_index, first_index + num_samples), STREAM_CLASS_LABEL)
    return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in generators])


# ----------------------------------------------------------------------------------------------------------------
# Models and sampling.


@dataclass
class ModelRun:
    """One row of the report: a saved model sampled with a given number of steps."""

    name: str
    path: str
    pipeline: object
    kind: str  # the registration's: "teacher", "student" or "generator"
    steps: int | None


@torch.no_grad()
def generate(run: ModelRun, noise: torch.Tensor, labels, batch_size: int, device, seed: int = 0) -> torch.Tensor:
    """Samples in [0, 1], NCHW float32, on the CPU; NaNs are kept (and reported later).

    Row i starts from ``noise[i]`` and takes the noise its sampler injects from stream 1 of sample i; the pipeline is
    sampled through its registration ([`~diffusers_memdistill.registry.sample_images`])."""
    from .registry import sample_images

    pipe = run.pipeline.to(device)
    # CPU generators: the pipelines draw on the CPU and move the noise to `device` (diffusers' randn_tensor).
    generators = stream_generators(seed, range(noise.shape[0]), STREAM_INJECTED_NOISE)
    return sample_images(pipe, noise, generators, class_labels=labels, num_inference_steps=run.steps,
                         batch_size=batch_size).float().cpu()


@torch.no_grad()
def teacher_pairing_targets(pipeline, noise, labels, batch_size, device, teacher_steps: int = PAIRING_TEACHER_STEPS):
    """Phi_K(z) (the deterministic K-step ODE map, 003 uses K = 8) and Phi_1(z) = D(sigma_max z; sigma_max), in [0, 1],
    from the teacher's registration ([`~diffusers_memdistill.registry.teacher_pairing_maps`])."""
    from .registry import teacher_pairing_maps

    phi_k, phi_1 = teacher_pairing_maps(pipeline.to(device), noise, labels, num_steps=teacher_steps,
                                        batch_size=batch_size)
    return phi_k.float().cpu(), phi_1.float().cpu()


# ----------------------------------------------------------------------------------------------------------------
# 8-bit samples on disk.


def quantize_samples(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[0, 1] float samples -> (uint8 images, bool mask of samples with a non-finite value; their images are 0)."""
    from .metrics._images import quantize_uint8

    nonfinite = ~torch.isfinite(samples).flatten(1).all(1)
    images = torch.where(nonfinite.view(-1, *[1] * (samples.ndim - 1)), torch.zeros_like(samples), samples)
    return (quantize_uint8(images) * 255).round().to(torch.uint8), nonfinite


def dequantize_samples(images: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
    """The float [0, 1] samples every metric reads: uint8 / 255, NaN for the samples that were not finite."""
    out = images.float() / 255.0
    out[nonfinite.bool()] = float("nan")
    return out


def save_samples(path: str, samples: torch.Tensor, seed: int, class_labels: torch.Tensor | None = None,
                 metadata: dict | None = None) -> torch.Tensor:
    """Write samples as uint8 (safetensors: ``images``, ``nonfinite``, ``sample_index``, ``seeds`` (N, 3) of the
    three streams, optional ``class_labels``); returns the float samples as the metrics will read them back."""
    images, nonfinite = quantize_samples(samples)
    index = torch.arange(samples.shape[0])
    seeds = torch.stack([stream_seeds(seed, index.tolist(), s) for s in
                         (STREAM_STARTING_NOISE, STREAM_INJECTED_NOISE, STREAM_CLASS_LABEL)], dim=1)
    tensors = {"images": images.contiguous(), "nonfinite": nonfinite.to(torch.uint8), "sample_index": index,
               "seeds": seeds}
    if class_labels is not None:
        tensors["class_labels"] = class_labels.long().contiguous()
    meta = {"format": SAMPLES_FORMAT, "seed": str(seed), "noise": NOISE_SCHEME,
            **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    _write_safetensors(path, tensors, meta)
    return dequantize_samples(images, nonfinite)


def _write_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    """Atomic write; through ``open`` so that the file gets the usual permissions (save_file makes it private)."""
    from safetensors.torch import save

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(save(tensors, metadata=metadata))
    os.replace(path + ".tmp", path)


def load_samples(path: str, key: str = "images") -> torch.Tensor:
    """Read back a samples file written by [`save_samples`] (or an image array of the teacher targets) as floats."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Saved samples {path} are missing.")
    with safe_open(path, framework="pt") as f:
        if (f.metadata() or {}).get("format") != SAMPLES_FORMAT:
            raise ValueError(f"{path} is not a samples file written by memdistill evaluate.")
        mask = "nonfinite" if key == "images" else f"{key}_nonfinite"
        return dequantize_samples(f.get_tensor(key), f.get_tensor(mask))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.


def finite_samples(samples: torch.Tensor) -> torch.Tensor:
    """The samples without NaN/inf values (those are counted in ``num_nan_samples``, never silently dropped)."""
    return samples[torch.isfinite(samples).flatten(1).all(1)]


def pixel_frechet_distance(samples: torch.Tensor, train: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to raw pixels: an always-available quality proxy, not FID.

    Computed over the finite samples only; images in [0, 1] or uint8 (see [`as_unit_range_images`])."""
    from .metrics import as_unit_range_images, fid_from_features

    samples, train = as_unit_range_images(samples, "samples"), as_unit_range_images(train, "train")
    return float(fid_from_features(finite_samples(samples).flatten(1).double(), train.flatten(1).double()))


def local_model_folder(model: str) -> str:
    """A saved folder as is; a Hub id (``user/name``) as its local snapshot (downloaded, or read from the Hub cache
    offline), so that its pipeline and its ``training_set.json`` / ``training_config.json`` records are read alike."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model) or os.path.isabs(model) or model.startswith("."):
        raise FileNotFoundError(f"--model {model} is neither a saved pipeline folder nor a Hub id (user/name).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(model)
    except HFValidationError as exc:
        raise FileNotFoundError(f"--model {model} is neither a saved pipeline folder nor a Hub id: {exc}") from exc


def takes_prompts(model: str) -> bool:
    """Whether a saved folder or Hub id holds a text-to-image pipeline (its registration takes prompts), or the LoRA
    weights of one (``pytorch_lora_weights.safetensors`` without ``model_index.json``); read from the folder's
    records, without loading weights."""
    from .registry import pipeline_class_name, registration_for

    path = local_model_folder(model)
    if not os.path.isfile(os.path.join(path, "model_index.json")) and os.path.isfile(
            os.path.join(path, "pytorch_lora_weights.safetensors")):
        return True
    return registration_for(pipeline_class_name(path)).takes_prompts


def _training_config(path: str) -> dict:
    config_path = os.path.join(path, "training_config.json")
    if not os.path.isfile(config_path):
        return {}
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    return {k: config[k] for k in ("script", "loss", "lpips_net", "lpips_sha256") if k in config}


def evaluate(
    model_paths: list,
    output_dir: str,
    num_samples: int = 1000,
    metrics: tuple = ("l2", "pairing"),
    seed: int = 0,
    batch_size: int = 256,
    student_steps: tuple = (1,),
    teacher_steps: int | None = None,
    train_data: str | None = None,
    sscd_weights: str | None = None,
    sscd_onnx: str | None = None,
    inception_weights: str | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
    names: list | None = None,
    sscd_preprocessing: str | tuple = "sscd",
    sscd_threshold: float = 0.5,
    floor: bool = True,
) -> dict:
    r"""
    Sample and measure every model; write the 8-bit samples, ``metrics.json``, ``report.md`` and figures.

    Text-to-image pipelines (registered with ``takes_prompts``, or LoRA folders of one) are audited prompt by prompt
    by [`~evaluate_text_to_image.evaluate_text_to_image`] instead (``memdistill evaluate`` chooses for you).

    Args:
        model_paths (`list[str]`): saved folders of pipelines registered in ``diffusers_memdistill.registry`` (teachers
            such as ``EDMPipeline``, students such as ``ConsistencyStudentPipeline``, one-step generators).
        output_dir (`str`): where ``samples/``, ``metrics.json``, ``report.md`` and ``figures/`` go.
        num_samples (`int`, defaults to 1000): samples per model, sample i from the noise streams of index i.
        metrics (`tuple[str]`): a subset of ``METRICS``.
        seed (`int`, defaults to 0): the seed of every random stream (see the module docstring).
        batch_size (`int`, defaults to 256): sampling batch size (the samples do not depend on it).
        student_steps (`tuple[int]`, defaults to `(1,)`): one row per number of student steps.
        teacher_steps (`int`, *optional*): Heun steps of teachers (their scheduler's default when None).
        train_data (`str`, *optional*): data to compare against instead of each model's ``training_set.json``.
        sscd_weights, sscd_onnx (`str`, *optional*): the SSCD TorchScript file or URL, or an ONNX file.
        inception_weights (`str`, *optional*): the FID Inception TorchScript file or URL.
        cache_dir (`str`, *optional*): cache of training-set feature statistics.
        device (`str`, *optional*): ``"cuda"`` or ``"cpu"`` (CUDA when available).
        names (`list[str]`, *optional*): report names of the models, in order.
        sscd_preprocessing (`str` or `tuple[str]`, defaults to `"sscd"`): ``"sscd"``, ``"dcr"`` or both; one SSCD
            column each.
        sscd_threshold (`float`, defaults to 0.5): SSCD similarity above which a sample counts as a copy.
        floor (`bool`, defaults to `True`): also score held-out real images of the same distribution (the floor
            row), when the data has images outside the training set.

    Returns:
        `dict`: the results written to ``metrics.json``.
    """
    folders = [local_model_folder(model) for model in model_paths]  # a Hub id is downloaded (or found) once
    prompted = [model for model, folder in zip(model_paths, folders) if takes_prompts(folder)]
    if prompted:
        raise ValueError(f"{', '.join(prompted)} generate from prompts: audit text-to-image models with "
                         "evaluate_text_to_image (memdistill evaluate does), and never together with others.")
    settings = _settings(metrics, sscd_preprocessing, sscd_threshold, floor, sscd_weights, sscd_onnx,
                         inception_weights, cache_dir)
    if num_samples < 2:
        raise ValueError(f"--num_samples must be at least 2, got {num_samples}.")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}.")
    if names is not None and len(names) != len(model_paths):
        raise ValueError(f"Got {len(names)} names for {len(model_paths)} models.")
    stream_seeds(seed, [], 0)  # validates the seed before any model is loaded
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples_dir = os.path.join(output_dir, SAMPLES_DIR)
    os.makedirs(samples_dir, exist_ok=True)

    # 1. Models and their training sets (one id per distinct set of images).
    from .pipelines import pipeline_refined  # noqa: F401 (registers RefinedPipeline, the +refine rows)
    from .registry import load_pipeline

    runs, run_sets, train_sets, set_ids, configs, registrations = [], {}, {}, {}, {}, {}
    for k, (model, path) in enumerate(zip(model_paths, folders)):
        pipeline, registration = load_pipeline(path)
        kind = registration.kind
        base = names[k] if names else os.path.basename(os.path.normpath(model))
        if train_data is not None:
            image_channels, image_size, _ = registration.image_shape(pipeline)
            ts = build_training_set(train_data, image_size, channels=image_channels)
        else:
            ts = load_training_set(path)
        key = (ts.record["sha256"], len(ts))
        if key not in set_ids:
            set_ids[key] = f"train{len(set_ids)}"
            train_sets[set_ids[key]] = ts
        configs[path] = _training_config(path)
        if kind == "student":
            new = [ModelRun(f"{base} ({steps}-step)", path, pipeline, kind, steps) for steps in student_steps]
        else:
            new = [ModelRun(base, path, pipeline, kind, teacher_steps if kind == "teacher" else None)]
        for r in new:
            run_sets[r.name] = set_ids[key]
            registrations[r.name] = registration
        runs += new
    run_names = [r.name for r in runs]
    if len(set(run_names)) != len(run_names) or len({_slug(n) for n in run_names}) != len(run_names):
        raise ValueError(f"Two models share a report name ({run_names}); pass distinct names.")
    noise_shapes = {tuple(registrations[r.name].noise_shape(r.pipeline)) for r in runs}
    if len(noise_shapes) != 1:
        raise ValueError(f"All models must sample from noise of one shape to share it; got {sorted(noise_shapes)}.")
    noise_shape = noise_shapes.pop()
    for r in runs:
        image_shape = tuple(registrations[r.name].image_shape(r.pipeline))
        ts = train_sets[run_sets[r.name]]
        if tuple(ts.images.shape[1:]) != image_shape:
            raise ValueError(
                f"{r.path} generates {'x'.join(map(str, image_shape))} images but its training set has "
                f"{'x'.join(map(str, ts.images.shape[1:]))}: resolution/channels differ."
            )
    num_classes = max(registrations[r.name].num_classes(r.pipeline) for r in runs)

    # 2. Shared noise and labels; the 8-bit samples of every model, written before any metric runs.
    noise = shared_noise(num_samples, noise_shape, seed)
    labels = shared_labels(num_samples, num_classes, seed)
    samples, manifest_runs = {}, []
    for r in tqdm(runs, desc="Models"):
        conditional = bool(registrations[r.name].num_classes(r.pipeline))
        run_labels = labels if conditional else None
        raw = generate(r, noise, run_labels, batch_size, device, seed)
        file = f"{_slug(r.name)}.safetensors"
        samples[r.name] = save_samples(os.path.join(samples_dir, file), raw, seed, run_labels,
                                       {"name": r.name, "path": os.path.abspath(r.path), "kind": r.kind,
                                        "steps": r.steps})
        manifest_runs.append({"name": r.name, "path": os.path.abspath(r.path), "kind": r.kind, "steps": r.steps,
                              "file": file, "training_set": run_sets[r.name], "class_conditional": conditional,
                              "training_config": configs[r.path]})

    # 3. What else only a model can give: the teacher's pairing targets.
    teachers = [r for r in runs if r.kind == "teacher" and registrations[r.name].has_pairing_maps]
    students = [r for r in runs if r.kind in ("student", "generator")]
    targets, targets_entry = None, None
    if "pairing" in settings["metrics"] and teachers and students:
        teacher = teachers[0]
        cond = labels if registrations[teacher.name].num_classes(teacher.pipeline) else None
        phi_k, phi_1 = teacher_pairing_targets(teacher.pipeline, noise, cond, batch_size, device,
                                               PAIRING_TEACHER_STEPS)
        targets = _save_teacher_targets(os.path.join(samples_dir, TEACHER_TARGETS_FILE), phi_k, phi_1, teacher.name)
        targets_entry = {"file": TEACHER_TARGETS_FILE, "teacher": teacher.name, "teacher_steps": PAIRING_TEACHER_STEPS,
                         "training_set": run_sets[teacher.name]}

    # 4. Records of the training and held-out sets, then the manifest that --from_samples reads.
    manifest_sets = {}
    for tid, ts in train_sets.items():
        ts.save(os.path.join(samples_dir, "training_sets", tid))
        manifest_sets[tid] = {"record": f"training_sets/{tid}/training_set.json", "sha256": ts.record["sha256"],
                              "num_images": len(ts)}
    heldout, heldout_entries, floor_notes = _heldout_sets(train_sets, num_samples, seed, settings["floor"])
    for tid, held in heldout.items():
        held.save(os.path.join(samples_dir, "heldout_sets", tid))
        heldout_entries[tid]["record"] = f"heldout_sets/{tid}/training_set.json"
    manifest = {
        "format": 1, "seed": seed, "num_samples": num_samples, "noise_shape": list(noise_shape),
        "num_classes": num_classes, "noise": _noise_description(seed), "runs": manifest_runs,
        "training_sets": manifest_sets, "heldout_sets": heldout_entries, "floor_notes": floor_notes,
        "teacher_targets": targets_entry,
        "sampling": {"batch_size": batch_size, "student_steps": list(student_steps), "teacher_steps": teacher_steps,
                     "train_data": train_data, "device": str(device)},
        "settings": settings,
    }
    _write_json(os.path.join(samples_dir, MANIFEST_NAME), manifest)

    # 5. Metrics, from the 8-bit samples only.
    inputs = EvaluationInputs(manifest, samples_dir, samples, train_sets, heldout, targets)
    return _measure_and_write(inputs, output_dir, settings, device)


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
) -> dict:
    r"""
    Recompute every metric of an earlier evaluation from its saved samples, without loading any model.

    Args:
        samples_dir (`str`): the earlier evaluation's output folder (or its ``samples/`` folder).
        output_dir (`str`, *optional*): where to write; defaults to ``<evaluation>/recomputed``. Must not be the
            earlier evaluation's folder (its ``metrics.json`` is what the recomputation is checked against).
        metrics, sscd_*, inception_weights, cache_dir, floor: as in [`evaluate`]; each defaults to the setting the
            samples were evaluated with.
        device (`str`, *optional*): where the metrics run.

    Returns:
        `dict`: the recomputed results, also written to ``output_dir``.
    """
    folder = os.path.abspath(samples_dir)
    if not os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        folder = os.path.join(folder, SAMPLES_DIR)
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(
            f"{samples_dir} holds no saved samples ({SAMPLES_DIR}/{MANIFEST_NAME}): pass the output folder of "
            "memdistill evaluate --model ..."
        )
    evaluation_dir = os.path.dirname(folder)
    output_dir = os.path.abspath(output_dir or os.path.join(evaluation_dir, "recomputed"))
    if output_dir in (evaluation_dir, folder):
        raise ValueError(f"--output_dir {output_dir} would overwrite the evaluation being recomputed; choose another.")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    old = manifest["settings"]
    settings = _settings(
        old["metrics"] if metrics is None else metrics,
        old["sscd_preprocessing"] if sscd_preprocessing is None else sscd_preprocessing,
        old["sscd_threshold"] if sscd_threshold is None else sscd_threshold,
        old["floor"] if floor is None else floor,
        old["sscd_weights"] if sscd_weights is None and sscd_onnx is None else sscd_weights,
        old["sscd_onnx"] if sscd_weights is None and sscd_onnx is None else sscd_onnx,
        old["inception_weights"] if inception_weights is None else inception_weights,
        old["cache_dir"] if cache_dir is None else cache_dir,
    )
    if "pairing" in settings["metrics"] and manifest["teacher_targets"] is None and metrics is not None:
        raise ValueError(
            f"{samples_dir} holds no pairing targets of a teacher (the evaluation ran without pairing, or without a "
            "teacher and a student); evaluate the models again with --metrics ...,pairing."
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples = {r["name"]: load_samples(os.path.join(folder, r["file"])) for r in manifest["runs"]}
    train_sets = {}
    for tid, entry in manifest["training_sets"].items():
        ts = load_training_set(os.path.join(folder, entry["record"]))
        if ts.record["sha256"] != entry["sha256"]:
            raise ValueError(f"Training set {tid} rebuilt from {entry['record']} differs from the one evaluated.")
        train_sets[tid] = ts
    heldout, heldout_entries, floor_notes = _heldout_sets(train_sets, manifest["num_samples"], manifest["seed"],
                                                          settings["floor"])
    for tid, held in heldout.items():
        saved = manifest["heldout_sets"].get(tid)
        if saved is not None and saved["sha256"] != held.record["sha256"]:
            raise ValueError(f"The held-out set of {tid} rebuilt now differs from the one recorded in {manifest_path}.")
    manifest = {**manifest, "heldout_sets": heldout_entries, "floor_notes": floor_notes}
    targets = None
    if manifest["teacher_targets"] is not None:
        path = os.path.join(folder, manifest["teacher_targets"]["file"])
        targets = (load_samples(path, "phi_k"), load_samples(path, "phi_1"))
    inputs = EvaluationInputs(manifest, folder, samples, train_sets, heldout, targets)
    return _measure_and_write(inputs, output_dir, settings, device, recomputed_from=evaluation_dir)


@dataclass
class EvaluationInputs:
    """Everything the metrics read: saved 8-bit samples (as floats), the teacher's targets and the data sets."""

    manifest: dict
    samples_dir: str
    samples: dict  # run name -> (N, C, H, W) float in [0, 1], NaN rows for non-finite samples
    train_sets: dict  # id -> TrainingSet
    heldout: dict  # id -> TrainingSet of held-out images
    targets: tuple | None  # (Phi_K, Phi_1), float like the samples


def _settings(metrics, sscd_preprocessing, sscd_threshold, floor, sscd_weights, sscd_onnx, inception_weights,
              cache_dir) -> dict:
    from .metrics import SSCD_PREPROCESSINGS

    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose among {', '.join(METRICS)}.")
    preps = (sscd_preprocessing,) if isinstance(sscd_preprocessing, str) else tuple(sscd_preprocessing)
    bad = [p for p in preps if p not in SSCD_PREPROCESSINGS]
    if bad or not preps or len(set(preps)) != len(preps):
        raise ValueError(f"--sscd_preprocessing must name one or both of {sorted(SSCD_PREPROCESSINGS)}, got {preps}.")
    if not 0 < float(sscd_threshold) < 1:
        raise ValueError(f"--sscd_threshold must lie in (0, 1), got {sscd_threshold}.")
    # Local files by absolute path, so that --from_samples finds them from any working directory.
    local = lambda p: os.path.abspath(p) if p is not None and os.path.exists(p) else p  # noqa: E731
    return {"metrics": list(metrics), "sscd_preprocessing": list(preps), "sscd_threshold": float(sscd_threshold),
            "l2_threshold": L2_THRESHOLD, "floor": bool(floor), "sscd_weights": local(sscd_weights),
            "sscd_onnx": local(sscd_onnx), "inception_weights": local(inception_weights), "cache_dir": local(cache_dir)}


def _noise_description(seed: int) -> dict:
    return {"seed": seed, "scheme": NOISE_SCHEME, "streams": dict(NOISE_STREAMS)}


def _save_teacher_targets(path, phi_k, phi_1, teacher_name):
    tensors = {}
    for key, value in (("phi_k", phi_k), ("phi_1", phi_1)):
        images, nonfinite = quantize_samples(value)
        tensors[key], tensors[f"{key}_nonfinite"] = images.contiguous(), nonfinite.to(torch.uint8)
    _write_safetensors(path, tensors, {"format": SAMPLES_FORMAT, "teacher": teacher_name,
                                       "teacher_steps": str(PAIRING_TEACHER_STEPS)})
    return tuple(dequantize_samples(tensors[k], tensors[f"{k}_nonfinite"]) for k in ("phi_k", "phi_1"))


def heldout_or_note(training_set, num_images, seed: int):
    """``(held, None)``: ``num_images`` held-out real images of ``training_set``'s distribution
    ([`load_heldout_set`]), or all there are when fewer; ``(None, note)`` where the data holds none, the note saying
    why."""
    try:
        return load_heldout_set(training_set, num_images=num_images, seed=seed), None
    except ValueError:
        # Fewer held-out images than asked for (checked before anything is decoded): take them all. Where there are
        # none, this raises again, and its message is the note.
        try:
            return load_heldout_set(training_set, num_images=None, seed=seed), None
        except ValueError as exc:
            return None, str(exc).rstrip(".")


def _heldout_sets(train_sets: dict, num_images: int, seed: int, floor: bool):
    """Held-out real images of each training set's distribution ([`load_heldout_set`]): as many as the samples, or
    all there are when fewer; a note instead where the data holds none."""
    heldout, entries, notes = {}, {}, {}
    if not floor:
        return heldout, entries, {tid: "not requested (--no_floor)" for tid in train_sets}
    for tid, ts in train_sets.items():
        held, note = heldout_or_note(ts, num_images, seed)
        if held is None:
            notes[tid] = note
            continue
        heldout[tid] = held
        entries[tid] = {"sha256": held.record["sha256"], "num_images": len(held), "seed": seed,
                        "dataset": held.record["dataset"], "split": held.record["split"],
                        "how": held.record["heldout_from"]["how"]}
    return heldout, entries, notes


def _measure_and_write(inputs: EvaluationInputs, output_dir: str, settings: dict, device,
                       recomputed_from: str | None = None) -> dict:
    os.makedirs(output_dir, exist_ok=True)
    figures_dir = os.path.join(output_dir, "figures")
    os.makedirs(figures_dir, exist_ok=True)
    manifest = inputs.manifest
    results = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "seed": manifest["seed"],
        "num_samples": manifest["num_samples"],
        "noise": manifest["noise"],
        "samples_dir": os.path.abspath(inputs.samples_dir),
        "recomputed_from": recomputed_from,
        "metrics": settings["metrics"],
        "settings": {k: settings[k] for k in ("sscd_preprocessing", "sscd_threshold", "l2_threshold", "floor")},
        "device": str(device),
        "weights": {},
        "training_sets": {},
        "floor": {},
        "floor_notes": manifest["floor_notes"],
        "models": {},
        "warnings": [],
        "errors": {},
    }
    runs = manifest["runs"]
    for tid, ts in inputs.train_sets.items():
        results["training_sets"][tid] = {
            "dataset": ts.record["dataset"], "split": ts.record["split"], "num_images": len(ts),
            "sha256": ts.record["sha256"], "models": [r["name"] for r in runs if r["training_set"] == tid],
            "near_duplicates": {},
        }
    for tid, held in inputs.heldout.items():
        results["floor"][tid] = {k: manifest["heldout_sets"][tid][k]
                                 for k in ("dataset", "split", "how", "num_images", "sha256", "seed")}
    for r in runs:
        s = inputs.samples[r["name"]]
        nan = ~torch.isfinite(s).flatten(1).all(1)
        results["models"][r["name"]] = {
            "path": r["path"], "kind": r["kind"], "steps": r["steps"], "training_set": r["training_set"],
            "samples_file": r["file"], "num_nan_samples": int(nan.sum()),
            "nan_sample_indices": nan.nonzero().flatten().tolist(),
        }
        if int(nan.sum()) == s.shape[0]:
            results["warnings"].append(f"{r['name']}: all {s.shape[0]} samples are NaN; its statistics are undefined.")
        elif int(nan.sum()):
            results["warnings"].append(f"{r['name']}: {int(nan.sum())} of {s.shape[0]} samples are NaN; statistics "
                                       "use the others (counts under num_nan).")
    from .training.utils import save_image_grid

    for r in runs:
        save_image_grid(inputs.samples[r["name"]][:64], os.path.join(figures_dir, f"samples_{_slug(r['name'])}.png"),
                        nrow=8)

    ctx = _Context(inputs, settings, device, results, figures_dir)
    if "l2" in settings["metrics"]:
        _l2(ctx)
    if "fd_pixel" in settings["metrics"]:
        _fd_pixel(ctx)
    if "sscd" in settings["metrics"]:
        _not_computed_if_missing(results, "sscd", lambda: _sscd(ctx))
    if "fid" in settings["metrics"]:
        _not_computed_if_missing(results, "fid", lambda: _fid(ctx))
    if "clip" in settings["metrics"]:
        results["errors"]["clip"] = "CLIP score needs text-to-image models; these pipelines take no prompts."
    if "pairing" in settings["metrics"]:
        _pairing(ctx)
    lpips = {r["name"]: r["training_config"].get("lpips_sha256") for r in runs
             if r["training_config"].get("loss") == "lpips"}
    if lpips:
        results["weights"]["lpips"] = {"role": "training loss of the students (from their training_config.json)",
                                       "sha256": lpips}

    clean, reasons = strict_json(results)
    clean["null_values"] = reasons
    _write_json(os.path.join(output_dir, "metrics.json"), clean)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(render_report(clean))
    return clean


@dataclass
class _Context:
    inputs: EvaluationInputs
    settings: dict
    device: object
    results: dict
    figures_dir: str

    def train(self, tid: str) -> torch.Tensor:
        return self.inputs.train_sets[tid].images.float() / 255.0

    def heldout(self, tid: str) -> torch.Tensor:
        return self.inputs.heldout[tid].images.float() / 255.0

    def groups(self, tid: str):
        ts = self.inputs.train_sets[tid]
        if ts.repeats is None or not bool((ts.repeats > 1).any()):
            return None
        return ["repeated" if int(k) > 1 else "non-repeated" for k in ts.repeats]

    def sources(self, tid: str) -> list:
        return [e["source"] for e in self.inputs.train_sets[tid].record["entries"]]


def _not_computed_if_missing(results, name, fn):
    """Runs a metric that needs weights or an optional package; only their absence is reported instead of failing."""
    from .metrics import MissingWeightsError

    try:
        fn()
    except (MissingWeightsError, ImportError) as exc:
        results["errors"][name] = f"{type(exc).__name__}: {exc}"
        tqdm.write(f"[memdistill evaluate] {name} not computed: {exc}")


def _l2(ctx: _Context):
    from .metrics import pixel_memorization, pixel_near_duplicates
    from .metrics.figures import plot_memorized_grid, plot_near_duplicates, plot_ratio_histograms

    ratios = {}
    for r in ctx.inputs.manifest["runs"]:
        name, tid = r["name"], r["training_set"]
        s = ctx.inputs.samples[name]
        res = pixel_memorization(s, ctx.train(tid), threshold=L2_THRESHOLD, train_groups=ctx.groups(tid),
                                 device=ctx.device)
        ctx.results["models"][name]["l2"] = res.to_dict()
        ratios[name] = res.ratios
        plot_memorized_grid(s, ctx.train(tid), res.nn_indices, res.ratios, num=8, most_memorized="lowest",
                            path=os.path.join(ctx.figures_dir, f"memorized_{_slug(name)}.png"))
    for tid in ctx.inputs.heldout:
        res = pixel_memorization(ctx.heldout(tid), ctx.train(tid), threshold=L2_THRESHOLD, device=ctx.device)
        ctx.results["floor"][tid]["l2"] = res.to_dict()
        ratios[f"held-out real ({tid}, floor)"] = res.ratios
    for tid in ctx.inputs.train_sets:
        if len(ctx.inputs.train_sets[tid]) < 3:
            continue
        dup = pixel_near_duplicates(ctx.train(tid), threshold=L2_THRESHOLD, device=ctx.device)
        ctx.results["training_sets"][tid]["near_duplicates"]["l2"] = dup.to_dict(NUM_LISTED_DUPLICATES,
                                                                                  ctx.sources(tid))
        if dup.num_pairs:
            plot_near_duplicates(ctx.train(tid), dup.pairs, dup.scores, num=8,
                                 path=os.path.join(ctx.figures_dir, f"near_duplicates_{tid}_l2.png"))
    plot_ratio_histograms(ratios, threshold=L2_THRESHOLD, path=os.path.join(ctx.figures_dir, "l2_ratio_histogram.png"))


def _fd_pixel(ctx: _Context):
    reasons = {}
    for r in ctx.inputs.manifest["runs"]:
        s = ctx.inputs.samples[r["name"]]
        n = finite_samples(s).shape[0]
        value = pixel_frechet_distance(s, ctx.train(r["training_set"])) if n >= 2 else None
        ctx.results["models"][r["name"]]["fd_pixel"] = value
        if value is None:
            reasons[r["name"]] = f"fewer than 2 finite samples ({n})"
    for tid in ctx.inputs.heldout:
        ctx.results["floor"][tid]["fd_pixel"] = pixel_frechet_distance(ctx.heldout(tid), ctx.train(tid))
    if reasons:
        ctx.results["errors"]["fd_pixel"] = "; ".join(f"{k}: {v}" for k, v in reasons.items())


def _features(extractor, samples: torch.Tensor, dim: int) -> torch.Tensor:
    """Descriptors of the finite samples; NaN rows for the others (reported as NaN samples by the metrics)."""
    finite = torch.isfinite(samples).flatten(1).all(1)
    out = torch.full((samples.shape[0], dim), float("nan"))
    if bool(finite.any()):
        out[finite] = extractor(samples[finite]).float()
    return out


def _sscd_extractor(settings, preprocessing, device):
    from .metrics import SSCDFeatureExtractor, SSCDOnnxFeatureExtractor

    if settings["sscd_onnx"]:
        return SSCDOnnxFeatureExtractor(settings["sscd_onnx"], preprocessing=preprocessing)
    source = settings["sscd_weights"]
    kwargs = {"download": True} if source is None else {}
    return SSCDFeatureExtractor.from_torchscript(*(() if source is None else (source,)), preprocessing=preprocessing,
                                                 device=device, **kwargs)


def _sscd(ctx: _Context):
    from .metrics import SSCD_PREPROCESSINGS, sscd_memorization, sscd_near_duplicates
    from .metrics.figures import plot_near_duplicates, plot_similarity_histograms

    threshold = ctx.settings["sscd_threshold"]
    runs = ctx.inputs.manifest["runs"]
    extractors = {p: _sscd_extractor(ctx.settings, p, ctx.device) for p in ctx.settings["sscd_preprocessing"]}
    first = next(iter(extractors.values()))
    ctx.results["weights"]["sscd"] = {
        "backend": first.backend, "weights_path": first.weights_path, "sha256": first.weights_sha256,
        "preprocessings": {p: SSCD_PREPROCESSINGS[p] for p in extractors},
    }
    for p, extractor in extractors.items():
        sims = {}
        train_features = {tid: extractor(ctx.train(tid)).float() for tid in ctx.inputs.train_sets}
        for r in tqdm(runs, desc=f"SSCD ({p})"):
            name, tid = r["name"], r["training_set"]
            feats = _features(extractor, ctx.inputs.samples[name], train_features[tid].shape[1])
            res = sscd_memorization(feats, train_features[tid], threshold=threshold, train_groups=ctx.groups(tid))
            ctx.results["models"][name].setdefault("sscd", {})[p] = res.to_dict()
            sims[name] = res.max_similarity
        for tid in ctx.inputs.heldout:
            res = sscd_memorization(extractor(ctx.heldout(tid)).float(), train_features[tid], threshold=threshold)
            ctx.results["floor"][tid].setdefault("sscd", {})[p] = res.to_dict()
            sims[f"held-out real ({tid}, floor)"] = res.max_similarity
        for tid, feats in train_features.items():
            if feats.shape[0] < 2:
                continue
            dup = sscd_near_duplicates(feats, threshold=threshold)
            ctx.results["training_sets"][tid]["near_duplicates"].setdefault("sscd", {})[p] = dup.to_dict(
                NUM_LISTED_DUPLICATES, ctx.sources(tid))
            if dup.num_pairs:
                plot_near_duplicates(ctx.train(tid), dup.pairs, dup.scores, num=8,
                                     path=os.path.join(ctx.figures_dir, f"near_duplicates_{tid}_sscd_{p}.png"))
        plot_similarity_histograms(sims, threshold=threshold,
                                   path=os.path.join(ctx.figures_dir, f"sscd_similarity_histogram_{p}.png"))


def _fid(ctx: _Context):
    from .metrics import InceptionFeatureExtractor, cached_feature_stats, fid_from_features

    extractor = InceptionFeatureExtractor.from_torchscript(ctx.settings["inception_weights"], device=ctx.device)
    ctx.results["weights"]["inception"] = {"backend": extractor.backend, "weights_path": extractor.weights_path,
                                           "sha256": extractor.weights_sha256}
    cache = os.path.join(ctx.settings["cache_dir"] or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "diffusers_memdistill"), "fid_stats")
    references = {tid: cached_feature_stats(ctx.train(tid), extractor, cache) for tid in ctx.inputs.train_sets}
    few, reasons = set(), {}
    for r in tqdm(ctx.inputs.manifest["runs"], desc="FID"):
        finite = finite_samples(ctx.inputs.samples[r["name"]])  # NaN samples are reported, not scored
        if finite.shape[0] < 2:
            ctx.results["models"][r["name"]]["fid"] = None
            reasons[r["name"]] = f"fewer than 2 finite samples ({finite.shape[0]})"
            continue
        ctx.results["models"][r["name"]]["fid"] = float(fid_from_features(extractor(finite),
                                                                          references[r["training_set"]]))
        if finite.shape[0] < FID_MIN_SAMPLES:
            few.add(finite.shape[0])
    for tid in ctx.inputs.heldout:
        held = ctx.heldout(tid)
        ctx.results["floor"][tid]["fid"] = float(fid_from_features(extractor(held), references[tid]))
        if held.shape[0] < FID_MIN_SAMPLES:
            few.add(held.shape[0])
    if reasons:
        ctx.results["errors"]["fid"] = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    if few:
        ctx.results["warnings"].append(
            f"FID from {', '.join(map(str, sorted(few)))} images, fewer than {FID_MIN_SAMPLES:,} (the Inception "
            "feature dimension): the covariance is rank-deficient and FID biased upwards; compare it only within "
            "this report, never with published FIDs (50,000 samples).")


def _pairing(ctx: _Context):
    from .metrics import copying_diagnostics, pairing_inefficiency
    from .metrics.figures import plot_copying_diagnostics, plot_distance_heatmap, plot_pairing_pca

    entry = ctx.inputs.manifest["teacher_targets"]
    if entry is None or ctx.inputs.targets is None:
        ctx.results["errors"]["pairing"] = ("pairing needs a teacher with an ODE map (e.g. an EDMPipeline) and at "
                                            "least one student or one-step generator among the models.")
        return
    phi_k, phi_1 = ctx.inputs.targets
    train = ctx.train(entry["training_set"]).flatten(1)
    finite_targets = torch.isfinite(phi_k).flatten(1).all(1) & torch.isfinite(phi_1).flatten(1).all(1)
    for r in ctx.inputs.manifest["runs"]:
        if r["kind"] not in ("student", "generator"):
            continue
        g = ctx.inputs.samples[r["name"]]
        # The pairing is undefined with NaN outputs: it is measured over the noises where all three are finite.
        keep = finite_targets & torch.isfinite(g).flatten(1).all(1)
        n = int(keep.sum())
        out = {"teacher": entry["teacher"], "teacher_steps": entry["teacher_steps"],
               "num_noises": n, "num_excluded_nonfinite": int(g.shape[0] - n)}
        if n < 2:
            out.update({"delta_e": None, "e_dt": None, "e_ot": None, "fraction_fixed": None, "delta_mean": None,
                        "delta_fraction_negative": None, "delta_distance_correlation": None})
            ctx.results["models"][r["name"]]["pairing"] = out
            ctx.results["warnings"].append(f"{r['name']}: pairing not measured, only {n} noises give finite teacher "
                                           "and student outputs.")
            continue
        t8, t1, s = phi_k[keep].flatten(1), phi_1[keep].flatten(1), g[keep].flatten(1)
        res = pairing_inefficiency(t8, s)
        diag = copying_diagnostics(t8, t1, s, train)
        # 003 Fig. 5: copying (negative δ) concentrates where D(z) is large, a negative Pearson correlation.
        correlation = torch.corrcoef(torch.stack([diag.delta.double(), diag.mean_train_distance.double()]))[0, 1]
        out.update({**res.to_dict(), "delta_mean": float(diag.delta.mean()),
                    "delta_fraction_negative": float((diag.delta < 0).double().mean()),
                    "delta_distance_correlation": float(correlation)})
        ctx.results["models"][r["name"]]["pairing"] = out
        slug = _slug(r["name"])
        plot_pairing_pca(t8, t1, s, path=os.path.join(ctx.figures_dir, f"pairing_pca_{slug}.png"))
        plot_distance_heatmap(t8, s, num=min(100, n), path=os.path.join(ctx.figures_dir, f"pairing_heatmap_{slug}.png"))
        plot_copying_diagnostics(diag.delta, diag.mean_train_distance,
                                 path=os.path.join(ctx.figures_dir, f"copying_{slug}.png"))


# ----------------------------------------------------------------------------------------------------------------
# metrics.json and report.md.


def strict_json(obj, path: str = "", reasons: dict | None = None):
    r"""
    A copy of `obj` that ``json.dump(..., allow_nan=False)`` accepts: every non-finite float becomes None, and
    ``reasons[path]`` says what it was (and why, where the statistics' own counts tell: no finite sample).

    Returns:
        `tuple`: ``(clean, reasons)``.
    """
    reasons = {} if reasons is None else reasons
    if isinstance(obj, dict):
        clean = {}
        for k, v in obj.items():
            clean[k] = strict_json(v, f"{path}.{k}" if path else str(k), reasons)[0]
            if isinstance(v, float) and not math.isfinite(v) and obj.get("num_valid") == 0:
                reasons[f"{path}.{k}" if path else str(k)] += ": no finite sample to compute it from"
        return clean, reasons
    if isinstance(obj, (list, tuple)):
        return [strict_json(v, f"{path}[{i}]", reasons)[0] for i, v in enumerate(obj)], reasons
    if isinstance(obj, torch.Tensor):
        return strict_json(obj.tolist(), path, reasons)
    if isinstance(obj, (np.floating, np.integer)):
        return strict_json(obj.item(), path, reasons)
    if isinstance(obj, float) and not math.isfinite(obj):
        reasons[path] = "NaN" if math.isnan(obj) else ("+Infinity" if obj > 0 else "-Infinity")
        return None, reasons
    return obj, reasons


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def numeric_values(obj, path: str = "") -> dict:
    """Every number (and null) of a JSON object by its path, e.g. ``models.teacher.l2.p95``."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(numeric_values(v, f"{path}.{k}" if path else str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(numeric_values(v, f"{path}[{i}]"))
    elif obj is None or isinstance(obj, (bool, int, float)):
        out[path] = obj
    return out


# Where and when a result was computed: expected to differ between an evaluation and its recomputation.
_PROVENANCE_KEYS = ("created", "versions", "samples_dir", "recomputed_from", "device")


def compare_results(original: dict, recomputed: dict) -> tuple[int, list]:
    """Numbers of two ``metrics.json`` compared exactly, provenance aside: ``(number of equal values, descriptions of
    the others)``."""
    a, b = ({k: v for k, v in numeric_values(r).items() if k.split(".")[0] not in _PROVENANCE_KEYS}
            for r in (original, recomputed))
    equal, differences = 0, []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            differences.append(f"{key}: {a[key]!r} only in the original")
        elif key not in a:
            differences.append(f"{key}: {b[key]!r} only in the recomputation")
        elif a[key] == b[key] and type(a[key]) is type(b[key]):
            equal += 1
        else:
            differences.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return equal, differences


def _fmt(value, percent=False, digits=4):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * value:.2f}%" if percent else f"{value:.{digits}g}"


def _threshold(value: float) -> str:
    return "1/3" if value == L2_THRESHOLD else f"{value:g}"


def _mem_cell(stats) -> str:
    if not stats:
        return "–"
    return f"{_fmt(stats.get('fraction_memorized'), True)} / {_fmt(stats.get('p95'))}"


def render_report(results: dict) -> str:
    """``report.md``: one row per model and a floor row per held-out set (000 Table 1 layout), then the details."""
    settings = results["settings"]
    preps = settings["sscd_preprocessing"] if "sscd" in results["metrics"] else []
    sscd_w = results["weights"].get("sscd")
    noise = results["noise"]
    samples_dir = results["samples_dir"]
    lines = [
        "# Memorization report",
        "",
        f"{results['num_samples']} samples per model, seed {noise['seed']}. Sample i draws its starting noise "
        "(shared by all models), the noise its sampler injects and its class label from three independent CPU "
        f"streams seeded from `numpy.random.SeedSequence([{noise['seed']}, i, stream])`, so the numbers depend "
        "neither on the batch size nor on the device. Every number below is computed from the 8-bit samples in "
        f"`{samples_dir}`; `memdistill evaluate --from_samples {os.path.dirname(samples_dir)}` recomputes them.",
        "",
        f"Memorized (L2): ‖y − NN₁‖ / ‖y − NN₂‖ < {_threshold(settings['l2_threshold'])} over the model's exact "
        "training set (p95: 95th percentile of the ratio, lower is closer)."
        + (f" Memorized (SSCD): max cosine similarity > {settings['sscd_threshold']:g} (p95 of the similarity)"
           + (f"; backend {sscd_w['backend']}, preprocessing "
              + "; ".join(f"`{p}` ({d})" for p, d in sscd_w["preprocessings"].items()) if sscd_w else "")
           + "." if preps else ""),
        "",
    ]
    header = ["Model", "FID", "FD (pixels)", "Mem (L2) / p95"] + [f"SSCD `{p}` Mem / p95" for p in preps] + ["NaN samples"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label, m, nan_cell):
        cells = [label, _fmt(m.get("fid")), _fmt(m.get("fd_pixel")), _mem_cell(m.get("l2"))]
        cells += [_mem_cell(m.get("sscd", {}).get(p)) for p in preps]
        return "| " + " | ".join(cells + [nan_cell]) + " |"

    for name, m in results["models"].items():
        lines.append(row(name, m, str(m["num_nan_samples"])))
    for tid, f in results["floor"].items():
        label = f"*floor: {f['num_images']} held-out real images of {f.get('dataset')} vs {tid}*"
        lines.append(row(label, f, "–"))
    lines.append("")
    if results["floor"]:
        lines.append("The floor rows score real images of the same distribution that no model was trained on, in "
                     "the same way: what the criteria flag without any memorization at this resolution. A model's "
                     "memorized fraction means something only above its floor. Held-out images: "
                     + "; ".join(f"{tid}: {f['how']} (seed {f['seed']})" for tid, f in results["floor"].items()) + ".")
    for tid, note in results["floor_notes"].items():
        lines.append(f"No floor row for {tid}: {note}.")
    lines.append("")
    if results["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in results["warnings"]] + [""]

    dup_lines = []
    for tid, t in results["training_sets"].items():
        dup_lines.append(f"**{tid}**: {t['num_images']} images of {t['dataset']} ({t.get('split')}), sha256 "
                         f"`{t['sha256']}`, used by {', '.join(t['models'])}.")
        found = [("L2 ratio", t["near_duplicates"]["l2"])] if "l2" in t["near_duplicates"] else []
        found += [(f"SSCD `{p}`", d) for p, d in t["near_duplicates"].get("sscd", {}).items()]
        for label, d in found:
            crit = (f"ratio to the nearest other training image < {_threshold(d['threshold'])}" if d["metric"] == "l2"
                    else f"similarity to the most similar other training image > {d['threshold']:g}")
            dup_lines.append(f"- {label} ({crit}): {d['num_images_flagged']} of {d['num_images']} images, "
                             f"{d['num_pairs']} pairs" + (":" if d["pairs"] else "."))
            for p in d["pairs"]:
                dup_lines.append(f"  - #{p['i']} `{p.get('source_i', '')}` ≈ #{p['j']} `{p.get('source_j', '')}` "
                                 f"(score {_fmt(p['score'])})")
    if dup_lines:
        lines += ["## Near-duplicates in the training sets", "",
                  "Training images whose nearest other training image is itself a copy by the criterion: a sample "
                  "copying one of them can match both.", ""] + dup_lines + [""]

    grouped = {n: m["l2"]["groups"] for n, m in results["models"].items() if m.get("l2", {}).get("groups")}
    if grouped:
        lines += ["## Localized memorization (L2 memorized / p95 ratio, by the group of the nearest image)", "",
                  "| Model | Repeated | Non-repeated | Overall |", "|---|---|---|---|"]
        for name, g in grouped.items():
            overall = results["models"][name]["l2"]
            lines.append(f"| {name} | {_mem_cell(g.get('repeated'))} | {_mem_cell(g.get('non-repeated'))} | "
                         f"{_mem_cell(overall)} |")
        lines.append("")
    paired = {n: m["pairing"] for n, m in results["models"].items() if "pairing" in m}
    if paired:
        lines += ["## Pairing with the teacher's 8-step ODE map (003 Def. 3.1)", "",
                  "| Student | ΔE = E_DT/E_OT − 1 | E_DT | E_OT | share of δ(z) < 0 | corr(δ, D) | noises |",
                  "|---|---|---|---|---|---|---|"]
        for name, p in paired.items():
            lines.append(f"| {name} | {_fmt(p['delta_e'])} | {_fmt(p['e_dt'])} | {_fmt(p['e_ot'])} | "
                         f"{_fmt(p['delta_fraction_negative'], True)} | {_fmt(p.get('delta_distance_correlation'))} | "
                         f"{p['num_noises']} |")
        lines.append("")
    if results["errors"]:
        lines += ["## Not computed", ""] + [f"- **{k}**: {v}" for k, v in results["errors"].items()] + [""]
    if results["null_values"]:
        lines += ["Numbers that are not finite are null in metrics.json, with their reason under `null_values` "
                  f"({len(results['null_values'])} of them).", ""]

    lines += ["## Weights behind the numbers", ""]
    weights = results["weights"]
    if not weights:
        lines.append("No metric of this report uses pretrained weights.")
    if "sscd" in weights:
        w = weights["sscd"]
        lines.append(f"- SSCD ({w['backend']}): `{w['weights_path']}`, sha256 `{w['sha256']}`; preprocessing "
                     + ", ".join(f"`{p}`" for p in w["preprocessings"]))
    if "inception" in weights:
        w = weights["inception"]
        lines.append(f"- FID Inception-v3 ({w['backend']}): `{w['weights_path']}`, sha256 `{w['sha256']}`")
    if "lpips" in weights:
        for name, sha in weights["lpips"]["sha256"].items():
            if isinstance(sha, dict):  # one hash per file (backbone, head)
                sha = ", ".join(f"{role} `{h}`" for role, h in sha.items())
            elif sha:
                sha = f"`{sha}`"
            lines.append(f"- LPIPS (training loss of {name}): sha256 {sha or 'not recorded in its training_config.json'}")
    lines += ["", "## Figures", ""]
    figures = ["l2_ratio_histogram.png"] if "l2" in results["metrics"] else []
    if "sscd" in weights:
        figures += [f"sscd_similarity_histogram_{p}.png" for p in preps]
    lines += [f"![{f}](figures/{f})" for f in figures]
    for name in results["models"]:
        slug = _slug(name)
        links = [f"[samples](figures/samples_{slug}.png)"]
        if "l2" in results["models"][name]:
            links.append(f"[most memorized vs NN₁/NN₂](figures/memorized_{slug}.png)")
        if results["models"][name].get("pairing", {}).get("delta_e") is not None:
            links += [f"[pairing PCA](figures/pairing_pca_{slug}.png)",
                      f"[distance heatmap](figures/pairing_heatmap_{slug}.png)",
                      f"[δ(z) vs D(z)](figures/copying_{slug}.png)"]
        lines.append(f"- {name}: " + ", ".join(links))
    for tid, t in results["training_sets"].items():
        nd = t["near_duplicates"]
        if nd.get("l2", {}).get("num_pairs"):
            lines.append(f"- {tid}: [near-duplicates (L2)](figures/near_duplicates_{tid}_l2.png)")
        for p, d in nd.get("sscd", {}).items():
            if d["num_pairs"]:
                lines.append(f"- {tid}: [near-duplicates (SSCD `{p}`)](figures/near_duplicates_{tid}_sscd_{p}.png)")
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}.", ""]
    return "\n".join(lines)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")


def _versions() -> dict:
    import diffusers

    from . import __version__

    return {"diffusers_memdistill": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------------------------
# Command line.

_SAMPLING_ONLY = ("num_samples", "seed", "batch_size", "student_steps", "teacher_steps", "train_data",
                  "samples_per_prompt", "guidance_scale", "num_inference_steps", "num_prompts")
# Flags of the text-to-image audit only (evaluate_text_to_image.EvaluateCommand runs it).
TEXT_TO_IMAGE_ONLY = ("samples_per_prompt", "guidance_scale", "num_inference_steps", "num_prompts", "clip_model",
                      "clip_pretrained")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Sample saved models from shared per-sample noise and measure quality (FID, pixel FD) and memorization\n"
        "(L2 nearest-neighbour ratio, SSCD similarity), beside a floor row of held-out real images, the training\n"
        "set's near-duplicates and the pairing of students with their teacher. The 8-bit samples are saved in\n"
        "OUTPUT_DIR/samples and every number is computed from them, so that --from_samples OUTPUT_DIR recomputes\n"
        "metrics.json exactly without the models. Writes metrics.json (strict JSON), report.md and figures/.\n"
        "See docs/evaluation.md."
    )
    parser.epilog = (
        "examples:\n"
        "  memdistill evaluate --model out/teacher --model out/student --student_steps 1,2 --output_dir out/eval\n"
        "  memdistill evaluate --from_samples out/eval      # recompute into out/eval/recomputed and compare\n"
        "  memdistill evaluate --from_samples out/eval --metrics sscd --sscd_preprocessing sscd,dcr \\\n"
        "      --output_dir out/eval_dcr                    # the same samples under both SSCD preprocessings"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", action="append", dest="models", metavar="DIR",
                        help="A saved pipeline folder, or a Hub id (user/name), of a class registered for evaluation "
                             "(a teacher such as EDMPipeline, a student such as ConsistencyStudentPipeline, a one-step "
                             "generator); repeat for several models. Samples them and saves the samples.")
    source.add_argument("--from_samples", metavar="DIR", default=None,
                        help="The output folder of an earlier evaluation: recompute every metric from its saved "
                             "samples, without loading any model, and compare with its metrics.json.")
    parser.add_argument("--output_dir", default=None,
                        help="Where samples/, metrics.json, report.md and figures/ go (required with --model; with "
                             "--from_samples defaults to DIR/recomputed).")
    parser.add_argument("--metrics", default=None,
                        help=f"Comma-separated among {', '.join(METRICS)} (default with --model: {DEFAULT_METRICS}; "
                             "with --from_samples: those of the evaluation). sscd and fid need weights; a missing "
                             "weights file or package is listed under 'Not computed', any other error stops.")
    sampling = parser.add_argument_group("sampling (with --model only)")
    sampling.add_argument("--num_samples", type=int, default=None,
                          help="Samples per model (default 1000); also the number of held-out images of the floor.")
    sampling.add_argument("--seed", type=int, default=None,
                          help="Seed of every per-sample stream: sample i uses SeedSequence([seed, i, stream]), "
                               "stream 0 starting noise, 1 injected noise, 2 class label (default 0).")
    sampling.add_argument("--batch_size", type=int, default=None, help="Sampling batch size (default 256); the "
                          "samples do not depend on it.")
    sampling.add_argument("--student_steps", default=None,
                          help="Comma-separated sampling steps for consistency students, one row each (default 1).")
    sampling.add_argument("--teacher_steps", type=int, default=None, help="Heun steps of EDM teachers (default: the "
                          "scheduler's, 18).")
    sampling.add_argument("--train_data", default=None,
                          help="Training data to compare against, instead of each model's training_set.json; for "
                               "text-to-image models the image–caption pairs to audit (an imagefolder with "
                               "metadata.jsonl, a saved or Hub dataset with image and text columns).")
    t2i = parser.add_argument_group("text-to-image audit (models whose pipeline takes prompts, e.g. StableDiffusion"
                                    "Pipeline, or LoRA folders of one)")
    t2i.add_argument("--samples_per_prompt", type=int, default=None, help="Seeds per prompt (default 4).")
    t2i.add_argument("--guidance_scale", type=float, default=None, help="Classifier-free guidance scale (default 7.5).")
    t2i.add_argument("--num_inference_steps", type=int, default=None,
                     help="Sampling steps (default: the registration's, 50 for StableDiffusionPipeline).")
    t2i.add_argument("--num_prompts", type=int, default=None,
                     help="A seeded subset of this many training prompts (default: every distinct caption).")
    t2i.add_argument("--clip_model", default=None, help="open_clip model of the CLIP score (default ViT-L-14).")
    t2i.add_argument("--clip_pretrained", default=None,
                     help="Its pretrained tag or a local checkpoint file (default openai).")
    memo = parser.add_argument_group("memorization")
    memo.add_argument("--sscd_preprocessing", default=None,
                      help="SSCD preprocessing, one column each if both: 'sscd' (the SSCD authors': resize to 288, "
                           "ImageNet normalisation), 'dcr' (DCR / Wen et al. / MemBench: resize 256, centre crop 224, "
                           "normalisation 0.5), or 'sscd,dcr' (default sscd).")
    memo.add_argument("--sscd_threshold", type=float, default=None,
                      help="SSCD similarity above which a sample is a copy (default 0.5, as in 000 Table 1).")
    floor = memo.add_mutually_exclusive_group()
    floor.add_argument("--floor", dest="floor", action="store_const", const=True, default=None,
                       help="Score as many held-out real images as samples (a test split, else images of the training "
                            "split outside the training set) the same way: the floor row (default on).")
    floor.add_argument("--no_floor", dest="floor", action="store_const", const=False, help="No floor row.")
    weights = parser.add_argument_group("weights of the feature extractors")
    weights.add_argument("--sscd_weights", default=None, help="sscd_disc_mixup TorchScript file or URL (default: "
                         "the official URL, cached in the torch hub folder).")
    weights.add_argument("--sscd_onnx", default=None, help="An SSCD ONNX file instead (int8 scores differ slightly).")
    weights.add_argument("--inception_weights", default=None, help="FID Inception TorchScript file or URL.")
    weights.add_argument("--cache_dir", default=None, help="Cache of training-set feature statistics.")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available).")


def _split(text: str | None):
    return None if text is None else tuple(t.strip() for t in text.split(",") if t.strip())


def main(args) -> int:
    metrics = _split(args.metrics)
    if args.from_samples:
        given = [f"--{k}" for k in _SAMPLING_ONLY if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply when sampling (--model); --from_samples reuses the "
                             "saved samples.")
        results = evaluate_from_samples(
            args.from_samples, args.output_dir, metrics=metrics, sscd_weights=args.sscd_weights,
            sscd_onnx=args.sscd_onnx, inception_weights=args.inception_weights, cache_dir=args.cache_dir,
            device=args.device, sscd_preprocessing=_split(args.sscd_preprocessing),
            sscd_threshold=args.sscd_threshold, floor=args.floor)
        output_dir = os.path.join(os.path.dirname(results["samples_dir"]), "recomputed") if args.output_dir is None \
            else args.output_dir
        print(render_report(results))
        original_path = os.path.join(os.path.dirname(results["samples_dir"]), "metrics.json")
        if os.path.isfile(original_path):
            with open(original_path, encoding="utf-8") as f:
                equal, differences = compare_results(json.load(f), results)
            if differences:
                print(f"{len(differences)} numbers differ from {original_path} ({equal} equal):")
                print("\n".join(f"  {d}" for d in differences[:20]) + ("\n  ..." if len(differences) > 20 else ""))
            else:
                print(f"All {equal} numbers equal those of {original_path}.")
        else:
            print(f"No {original_path} to compare with (the evaluation stopped before writing it).")
        print(f"Wrote {os.path.join(output_dir, 'report.md')} and metrics.json.")
        return 0
    if args.output_dir is None:
        raise ValueError("--output_dir is required with --model.")
    given = [f"--{k}" for k in TEXT_TO_IMAGE_ONLY if getattr(args, k, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to text-to-image models; these models take no prompts.")
    steps = _split(args.student_steps) or ("1",)
    results = evaluate(
        args.models, args.output_dir,
        num_samples=1000 if args.num_samples is None else args.num_samples,
        metrics=metrics or _split(DEFAULT_METRICS),
        seed=0 if args.seed is None else args.seed,
        batch_size=256 if args.batch_size is None else args.batch_size,
        student_steps=tuple(int(s) for s in steps), teacher_steps=args.teacher_steps, train_data=args.train_data,
        sscd_weights=args.sscd_weights, sscd_onnx=args.sscd_onnx, inception_weights=args.inception_weights,
        cache_dir=args.cache_dir, device=args.device,
        sscd_preprocessing=_split(args.sscd_preprocessing) or "sscd",
        sscd_threshold=0.5 if args.sscd_threshold is None else args.sscd_threshold,
        floor=True if args.floor is None else args.floor)
    print(render_report(results))
    print(f"Wrote {os.path.join(args.output_dir, 'report.md')}, metrics.json and the samples in "
          f"{os.path.join(args.output_dir, SAMPLES_DIR)}.")
    return 0
