"""The sample store of an audit: 8-bit samples in shards, with their seeds and conditions, and one manifest.

Layout of ``OUTPUT_DIR/samples/``::

    manifest.json                      the audit's plan (models, data, flags: its fingerprint), runs, sets, conditions
    <run>/shard-00000.safetensors      uint8 images of samples [0, shard_size), their non-finite mask, indices, the
                                       seeds of their three streams and their condition (class label or prompt index)
    teacher_targets/shard-00000...     the teacher's pairing targets Phi_K and Phi_1 of the same samples
    training_sets/<id>/, heldout_sets/<id>/, pairs/ ...   the records of the data sets, to rebuild them exactly

A shard is written atomically (a temporary file renamed into place) as soon as it is sampled, so an audit killed at
any point keeps every finished shard, and the same command started again samples only the missing ones. Every number
of the audit is computed from these 8-bit files, so ``memdistill evaluate --from_samples`` recomputes them all.
"""

from __future__ import annotations

import json
import os

import torch

from ..utils.hashing import file_sha256
from .streams import STREAMS, stream_seeds

SAMPLES_DIR = "samples"
MANIFEST_NAME = "manifest.json"
SAMPLES_FORMAT = "memdistill-samples"
STORE_FORMAT = 2
DEFAULT_SHARD_SIZE = 256
TEACHER_TARGETS = "teacher_targets"


# ----------------------------------------------------------------------------------------------------------------
# Atomic files.


def write_json(path: str, obj) -> None:
    """Strict JSON (no NaN or Infinity tokens), written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    """Atomic write; through ``open`` so that the file gets the usual permissions (save_file makes it private)."""
    import glob

    from safetensors.torch import save

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".tmp*"):  # left by a process killed while writing this very file
        os.remove(stale)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# 8 bits.


def quantize_samples(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[0, 1] float samples -> (uint8 images, bool mask of samples with a non-finite value; their images are 0)."""
    from ..metrics import quantize_uint8

    nonfinite = ~torch.isfinite(samples).flatten(1).all(1)
    images = torch.where(nonfinite.view(-1, *[1] * (samples.ndim - 1)), torch.zeros_like(samples), samples)
    return (quantize_uint8(images) * 255).round().to(torch.uint8), nonfinite


def dequantize_samples(images: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
    """The float [0, 1] samples every measure reads: uint8 / 255, NaN for the samples that were not finite."""
    out = images.float() / 255.0
    out[nonfinite.bool()] = float("nan")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Shards.


def shard_ranges(num_samples: int, shard_size: int) -> list:
    """``[(start, stop), ...]`` of the shards of ``num_samples`` samples; shard k holds ``[k·size, (k+1)·size)``."""
    if shard_size < 1:
        raise ValueError(f"--shard_size must be positive, got {shard_size}.")
    return [(start, min(start + shard_size, num_samples)) for start in range(0, num_samples, shard_size)]


def shard_path(folder: str, k: int) -> str:
    return os.path.join(folder, f"shard-{k:05d}.safetensors")


def shard_is_complete(path: str, start: int, stop: int) -> bool:
    """Whether a shard file is there, was written by an audit and holds exactly samples ``start..stop`` (a file cut
    short by a crash never is: it is only ever renamed into place whole)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        return False
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            index = f.get_tensor("sample_index")
    except Exception:  # noqa: BLE001 - any unreadable file is simply sampled again
        return False
    return meta.get("format") == SAMPLES_FORMAT and index.tolist() == list(range(start, stop))


def save_shard(path: str, arrays: dict, start: int, seed: int, conditions: dict | None = None,
               metadata: dict | None = None) -> dict:
    r"""
    Write one shard: each float array of ``arrays`` (``{"images": samples}``, or the teacher's ``phi_k`` and
    ``phi_1``) as uint8 with its non-finite mask, beside the samples' indices, the seeds of their three streams and
    their conditions (``class_labels``, ``prompt_index``).

    Returns:
        `dict`: the float arrays as every measure reads them back (uint8 / 255, NaN rows where not finite).
    """
    n = next(iter(arrays.values())).shape[0]
    index = torch.arange(start, start + n)
    tensors = {"sample_index": index,
               "seeds": torch.stack([stream_seeds(seed, index.tolist(), s) for s in STREAMS], dim=1)}
    back = {}
    for key, value in arrays.items():
        images, nonfinite = quantize_samples(value.float().cpu())
        tensors[key], tensors[f"{key}_nonfinite"] = images, nonfinite.to(torch.uint8)
        back[key] = dequantize_samples(images, nonfinite)
    for key, value in (conditions or {}).items():
        if value is not None:
            tensors[key] = torch.as_tensor(value).long()
    write_safetensors(path, tensors, {"format": SAMPLES_FORMAT, "seed": str(seed),
                                      **{k: json.dumps(v) for k, v in (metadata or {}).items()}})
    return back


def read_shard(path: str) -> dict:
    """Every tensor of a shard (uint8 arrays as written)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"The samples shard {path} is missing: sample again with the same command.")
    with safe_open(path, framework="pt") as f:
        if (f.metadata() or {}).get("format") != SAMPLES_FORMAT:
            raise ValueError(f"{path} is not a samples shard written by memdistill evaluate.")
        return {k: f.get_tensor(k) for k in f.keys()}


def load_array(folder: str, num_samples: int, shard_size: int, key: str = "images") -> torch.Tensor:
    """The float samples (or teacher targets) of one run, all shards in order: uint8 / 255, NaN rows where not
    finite."""
    parts = []
    for k, (start, stop) in enumerate(shard_ranges(num_samples, shard_size)):
        shard = read_shard(shard_path(folder, k))
        if shard["sample_index"].tolist() != list(range(start, stop)):
            raise ValueError(f"{shard_path(folder, k)} holds other samples than {start}..{stop - 1}.")
        parts.append(dequantize_samples(shard[key], shard[f"{key}_nonfinite"]))
    return torch.cat(parts)


def load_uint8(folder: str, num_samples: int, shard_size: int, k: int, key: str = "images") -> tuple:
    """Shard k of a run as written: ``(uint8 images, bool non-finite mask)``."""
    shard = read_shard(shard_path(folder, k))
    return shard[key], shard[f"{key}_nonfinite"].bool()


# ----------------------------------------------------------------------------------------------------------------
# What identifies a model and an audit.


def model_fingerprint(path: str) -> str:
    """sha256 over a saved model folder's configuration and weight files (names and contents): a different model,
    or the same folder retrained, has another fingerprint."""
    import hashlib

    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.endswith((".safetensors", ".bin", ".json", ".txt", ".model")) and not name.startswith("."):
                full = os.path.join(root, name)
                digest.update(f"{os.path.relpath(full, path)}\0{file_sha256(full)}\n".encode())
    return digest.hexdigest()


def plan_differences(old: dict, new: dict, prefix: str = "") -> list:
    """The paths at which two audit plans differ, with both values."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, where = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += plan_differences(a, b, f"{where}.")
        elif a != b:
            out.append(f"{where}: {a!r} on disk, {b!r} now")
    return out


def check_plan(manifest_path: str, plan: dict) -> bool:
    """``True`` when an audit with this plan already started here (its shards are kept and the missing ones added);
    ``False`` when nothing was started; a ValueError naming the differences when another audit did."""
    if not os.path.isfile(manifest_path):
        return False
    old = read_json(manifest_path).get("plan")
    if old is None:
        raise ValueError(f"{manifest_path} was written by an earlier version of memdistill evaluate: audit into a new "
                         "--output_dir, or recompute it with --from_samples.")
    differences = plan_differences(old, plan)
    if differences:
        raise ValueError(
            f"{os.path.dirname(os.path.dirname(manifest_path))} holds an audit of other models, data or flags ("
            + "; ".join(differences[:6]) + (" ..." if len(differences) > 6 else "")
            + "): run the same command to continue it, or choose another --output_dir.")
    return True


__all__ = ["DEFAULT_SHARD_SIZE", "MANIFEST_NAME", "SAMPLES_DIR", "SAMPLES_FORMAT", "STORE_FORMAT", "TEACHER_TARGETS",
           "check_plan", "dequantize_samples", "load_array", "load_uint8", "model_fingerprint", "plan_differences",
           "quantize_samples", "read_json", "read_shard", "save_shard", "shard_is_complete", "shard_path",
           "shard_ranges", "write_json", "write_safetensors"]
