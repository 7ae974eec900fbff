"""Helpers shared by the training scripts: EMA, deterministic per-step randomness, atomic checkpoints, and the
guards that keep a finished model from being overwritten.

Randomness is a pure function of ``(seed, step, process)``: batches and noise of step k are the same whether a run
went through step k in one go or was resumed, so a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------- accelerator


def use_cpu(requested: bool) -> bool:
    """Whether the Accelerator must run on the CPU: asked for, or several processes launched without a GPU
    (then accelerate's gloo backend connects them instead of leaving each process to train alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return requested or (world_size > 1 and not torch.cuda.is_available())


def make_accelerator(args):
    """The scripts' Accelerator: CPU when asked or when needed (`use_cpu`), mixed precision, trackers logging to
    ``output_dir/logs``; TF32 matmuls when ``args.allow_tf32``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(
        cpu=use_cpu(args.cpu),
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "logs")),
    )
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def init_trackers(accelerator, project_name: str, args) -> None:
    """Start the trackers with the run's scalar flags as its config (main process only)."""
    config = {k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(project_name, config=config)


def log_images(accelerator, tag: str, images: torch.Tensor, step: int) -> None:
    """Log images in [0, 1] of shape (N, C, H, W) to the trackers that take images (tensorboard)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, images, step)


def warmup_lr_scheduler(optimizer, learning_rate: float, warmup_steps: int, first_step: int = 0):
    """Linear warm-up over ``warmup_steps`` steps, positioned at ``first_step`` (0, or the step a run resumes at),
    so that a resumed run uses the learning rates of an uninterrupted one."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", learning_rate)
    warmup = max(warmup_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup),
                                             last_epoch=first_step - 1)


# ---------------------------------------------------------------- EMA


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` that `update_ema` moves towards it."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters and floating buffers."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach().to(q.dtype) for p, q in zip(model.parameters(), ema_params)]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay at optimizer step ``step`` (0-based); with warm-up, min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


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


# ---------------------------------------------------------------- output folder guards


def prepare_output_dir(output_dir: str, resume: str | None, overwrite: bool, finished_marker: str = "model_index.json"):
    """Refuse to silently overwrite: a finished model or existing checkpoints need ``resume`` or ``overwrite``."""
    finished = os.path.isfile(os.path.join(output_dir, finished_marker))
    checkpoints = list_checkpoints(output_dir)
    if overwrite:
        for entry in (CHECKPOINT_DIR, "samples", finished_marker, "unet", "scheduler", "logs"):
            path = os.path.join(output_dir, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.isfile(path):
                os.remove(path)
    elif resume is None and (finished or checkpoints):
        what = "a finished model" if finished else f"{len(checkpoints)} checkpoint(s)"
        raise FileExistsError(
            f"{output_dir} already holds {what}. Pass --resume_from_checkpoint latest to continue that run, "
            "or --overwrite_output_dir to start a new one there."
        )
    os.makedirs(output_dir, exist_ok=True)


# ---------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints, oldest first, as (step, path). Half-written ones (temporary names) are never listed."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isfile(os.path.join(root, name, "state.json")):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def resolve_checkpoint(output_dir: str, resume: str) -> str:
    """``"latest"`` or a path to a checkpoint folder -> the folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: {output_dir} has no complete checkpoint.")
        return found[-1][1]
    path = resume if os.path.isdir(resume) else os.path.join(output_dir, CHECKPOINT_DIR, resume)
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise FileNotFoundError(f"{resume} is not a complete checkpoint folder (no state.json).")
    return path


def save_checkpoint(
    output_dir: str, step: int, models: dict, optimizers: dict, fingerprint: dict, extra: dict | None = None,
    total_limit: int | None = None,
) -> str:
    """Write ``checkpoints/checkpoint-{step}`` atomically (main process only).

    ``models``: name -> module (unwrapped), saved as safetensors; ``optimizers``: name -> object with
    ``state_dict`` (optimizer, grad scaler), saved with ``torch.save`` and read back with ``weights_only=True``.
    The folder is written under a temporary name and renamed when complete, so a killed run never leaves a
    checkpoint that ``latest`` would pick up half-written.
    """
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"checkpoint-{step}")
    tmp = os.path.join(root, f".tmp-checkpoint-{step}-{os.getpid()}-{time.time_ns()}")
    os.makedirs(tmp)
    for name, model in models.items():
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, f"{name}.safetensors"))
    torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, os.path.join(tmp, "optimizers.pt"))
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
        json.dump({"step": step, "fingerprint": fingerprint, **(extra or {})}, f, indent=1)
    if os.path.exists(final):
        stale = final + f".old-{time.time_ns()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    if total_limit is not None:
        for _, path in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(path)
    return final


def load_checkpoint(path: str, models: dict, optimizers: dict, fingerprint: dict) -> dict:
    """Restore a checkpoint written by `save_checkpoint` into unwrapped ``models`` and ``optimizers``.

    Raises:
        ValueError: the checkpoint was written by a run of a different configuration (the differing keys are named).
    """
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    saved = state["fingerprint"]
    differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {fingerprint.get(k)!r}" for k in differing)
        raise ValueError(f"Cannot resume from {path}: it was written with a different configuration ({details}).")
    for name, model in models.items():
        model.load_state_dict(load_file(os.path.join(path, f"{name}.safetensors")))
    saved_opts = torch.load(os.path.join(path, "optimizers.pt"), map_location="cpu", weights_only=True)
    for name, opt in optimizers.items():
        opt.load_state_dict(saved_opts[name])
    return state


def jsonable(value):
    """Config values as JSON-comparable plain types (tuples -> lists)."""
    return json.loads(json.dumps(value, default=str))


def save_pipeline_atomically(pipeline, output_dir: str, records: dict) -> None:
    """``pipeline.save_pretrained(output_dir)`` plus JSON ``records`` (file name -> dict), all or nothing.

    Everything is written to a temporary folder first and moved into place with ``model_index.json`` last, the
    marker of a finished model; the old marker is removed before anything is replaced.
    """
    tmp = os.path.join(output_dir, f".tmp-final-{os.getpid()}-{time.time_ns()}")
    pipeline.save_pretrained(tmp)
    for name, data in records.items():
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
    marker = os.path.join(output_dir, "model_index.json")
    if os.path.exists(marker):
        os.remove(marker)
    for entry in sorted(os.listdir(tmp), key=lambda e: e == "model_index.json"):
        destination = os.path.join(output_dir, entry)
        if os.path.isdir(destination):
            shutil.rmtree(destination)
        os.replace(os.path.join(tmp, entry), destination)
    os.rmdir(tmp)


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
    save_image(images.float().nan_to_num(0.0).clamp(0, 1), tmp, nrow=nrow, padding=1, pad_value=1.0)
    os.replace(tmp, path)
    return path
