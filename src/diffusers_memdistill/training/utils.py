"""Helpers of the training runner: the Accelerator, deterministic per-step randomness and batches, checkpoint
folders, and files written so that a crash never leaves a half-written one where a reader would take it.

Randomness is a pure function of ``(seed, step, process)``: batches and noise of step k are the same whether a run
went through step k in one go or was resumed, so a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

from typing import Callable

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_STATE = "state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------- accelerator


def use_cpu(requested: bool) -> bool:
    """Whether the Accelerator must run on the CPU: asked for, or several processes launched without a GPU
    (then accelerate's gloo backend connects them instead of leaving each process to train alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return requested or (world_size > 1 and not torch.cuda.is_available())


def make_accelerator(args, log_with=None):
    """The runner's Accelerator: CPU when asked or when needed (`use_cpu`), mixed precision, gradient accumulation,
    trackers (``--report_to``, or the tracker objects ``log_with``) logging to ``output_dir/logging_dir``; TF32
    matmuls and convolutions when ``args.allow_tf32``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if log_with is None:
        log_with = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        cpu=use_cpu(args.cpu),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def init_trackers(accelerator, project_name: str, args) -> None:
    """Start the trackers with the run's scalar flags as its config (main process only)."""
    from ..utils.redact import redact_config

    config = {k: v for k, v in redact_config(vars(args)).items() if v is None or isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(project_name, config=config)


def log_images(accelerator, images: dict, step: int) -> list:
    """Send images in [0, 1] of shape (N, C, H, W), by tag, to every tracker that takes images (tensorboard, wandb,
    and any other with accelerate's ``log_images``). Returns the names of the trackers that took them."""
    arrays = {tag: [np.ascontiguousarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
                    for image in (x.float().nan_to_num(0.0).clamp(0, 1) * 255).round().to(torch.uint8)
                    .permute(0, 2, 3, 1).cpu().numpy()]
              for tag, x in images.items()}
    took = []
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":  # add_images wants one (N, C, H, W) array per tag
            for tag, x in images.items():
                tracker.writer.add_images(tag, x.float().nan_to_num(0.0).clamp(0, 1).cpu(), step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images(arrays, step=step)
        else:
            continue
        took.append(tracker.name)
    return took


# ---------------------------------------------------------------- randomness and batches


def step_seed(seed: int, step: int, process_index: int = 0, stream: int = 0) -> int:
    """A 63-bit seed mixing the run seed, the step, the process and a stream id (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, step, process_index, stream]).generate_state(2, np.uint64)[0] >> 1)


def step_generator(seed: int, step: int, process_index: int, device, stream: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, process_index, stream))


def batch_indices(step: int, batch_size: int, num_processes: int, process_index: int, num_items: int, seed: int):
    """Indices of this process's share of step ``step``'s global batch, drawn epoch by epoch without replacement.

    The global batch is positions [step*G, (step+1)*G) of an endless sequence of seeded permutations of
    ``range(num_items)`` (G = batch_size * num_processes); process r takes its r-th slice. The result depends only
    on the arguments, so resuming reproduces it, and the global batch is the same for any number of processes.
    """
    global_batch = batch_size * num_processes
    start = step * global_batch + process_index * batch_size
    positions = np.arange(start, start + batch_size)
    epochs = positions // num_items
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng(step_seed(seed, int(epoch), stream=1)).permutation(num_items)
        mask = epochs == epoch
        out[mask] = perm[positions[mask] % num_items]
    return torch.from_numpy(out)


# ---------------------------------------------------------------- checkpoint folders


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints, oldest first, as (step, path). Half-written ones (temporary names) and checkpoints set
    aside after a divergence (``checkpoint-N.diverged``) are never listed."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isfile(os.path.join(root, name, CHECKPOINT_STATE)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def resolve_checkpoint(output_dir: str, resume: str) -> str:
    """``"latest"`` or a path to a checkpoint folder (or its name under ``output_dir/checkpoints``) -> the folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: {output_dir} has no complete checkpoint.")
        return found[-1][1]
    path = resume if os.path.isdir(resume) else os.path.join(output_dir, CHECKPOINT_DIR, resume)
    if not os.path.isfile(os.path.join(path, CHECKPOINT_STATE)):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume} is not a complete checkpoint folder (no "
                                f"{CHECKPOINT_STATE}).")
    return path


# ---------------------------------------------------------------- durable files


def fsync_tree(path: str) -> None:
    """Flush every file under ``path`` (or the file ``path``) and the folders holding them to the disk."""
    if os.path.isfile(path):
        _fsync_file(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_file(os.path.join(root, name))
        fsync_dir(root)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (a rename inside it) to the disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomically(path: str, data) -> str:
    """Write JSON to ``path`` through a flushed temporary file and a rename: readers see the old or the new file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return path


def jsonable(value):
    """Config values as JSON-comparable plain types (tuples -> lists)."""
    return json.loads(json.dumps(value, default=str))


def save_pipeline_atomically(pipeline, output_dir: str, records: dict) -> None:
    """``pipeline.save_pretrained(output_dir)`` plus JSON ``records`` (file name -> dict), all or nothing.

    Everything is written to a temporary folder and flushed to disk first, then moved into place with
    ``model_index.json`` last, the marker of a finished model; the old marker is removed before anything is
    replaced. The temporary folder is removed on every exit path.
    """
    tmp = os.path.join(output_dir, f".tmp-final-{os.getpid()}-{time.time_ns()}")
    try:
        pipeline.save_pretrained(tmp)
        for name, data in records.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
        fsync_tree(tmp)
        marker = os.path.join(output_dir, "model_index.json")
        if os.path.exists(marker):
            os.remove(marker)
            fsync_dir(output_dir)
        for entry in sorted(os.listdir(tmp), key=lambda e: e == "model_index.json"):
            destination = os.path.join(output_dir, entry)
            if os.path.isdir(destination):
                shutil.rmtree(destination)
            os.replace(os.path.join(tmp, entry), destination)
        fsync_dir(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def validation_images(pipeline, num_images: int, num_classes: int, seed: int, **kwargs) -> torch.Tensor:
    """The training scripts' validation grid: ``num_images`` samples of ``pipeline`` (on its UNet's device), sample i
    from a generator seeded ``seed + i`` and, for class-conditional models, with class ``i % num_classes``; extra
    keyword arguments (``num_inference_steps``) go to the pipeline. Returns NCHW images in [0, 1]."""
    pipeline.set_progress_bar_config(disable=True)
    device = next(pipeline.unet.parameters()).device
    labels = [i % num_classes for i in range(num_images)] if num_classes else None
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(num_images)]
    return pipeline(batch_size=num_images, class_labels=labels, generator=generators, output_type="pt",
                    **kwargs).images


def save_image_grid(images: torch.Tensor, path: str, nrow: int | None = None, min_size: int = 32) -> str:
    """Save images in [0, 1] of shape (N, C, H, W) as one PNG grid (written atomically); images smaller than
    ``min_size`` pixels are enlarged by an integer factor (nearest neighbour) so that the grid can be looked at."""
    from torchvision.utils import save_image

    nrow = nrow or max(1, int(round(images.shape[0] ** 0.5)))
    factor = -(-min_size // images.shape[-1])
    if factor > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=factor, mode="nearest")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    try:
        save_image(images.float().nan_to_num(0.0).clamp(0, 1), tmp, nrow=nrow, padding=1, pad_value=1.0)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def text_to_image_pipeline(pipeline_class, components: dict, unet, scheduler):
    """``pipeline_class`` (a diffusers text-to-image pipeline) around a trained UNet, with the teacher's VAE, text
    encoder and tokenizer and no safety checker."""
    return pipeline_class(vae=components["vae"], text_encoder=components["text_encoder"],
                          tokenizer=components["tokenizer"], unet=unet, scheduler=scheduler, safety_checker=None,
                          feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def sample_prompts(pipeline_of: Callable, unet, components: dict, prompts, seed: int, num_inference_steps: int,
                   guidance_scale: float) -> torch.Tensor:
    """Images in [0, 1] of ``pipeline_of(unet)`` (a text-to-image pipeline around the trained UNet) for ``prompts``,
    sample i seeded ``seed + i``; the VAE and text encoder visit the UNet's device and go back to the CPU."""
    where = next(unet.parameters()).device
    vae, text_encoder = components["vae"], components["text_encoder"]
    vae.to(where)
    text_encoder.to(where)
    try:
        pipe = pipeline_of(unet)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator(where).manual_seed(seed + i) for i in range(len(prompts))]
        return pipe(list(prompts), generator=generators, output_type="pt", num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale).images
    finally:
        vae.to("cpu")
        text_encoder.to("cpu")
