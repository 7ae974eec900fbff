"""``metrics.json``: one versioned schema for every audit, strict JSON, and the exact comparison of two of them.

Schema (``"schema": "memdistill-audit/2"``)::

    task            "image" or "text-to-image"
    seed, num_samples, noise, samples_dir, recomputed_from, created, versions, device
    metrics         the measures asked for; settings: thresholds, SSCD preprocessings, CLIP model
    models          name -> {path, kind, pipeline_class, steps, training_set, num_samples, num_nan_samples, ...,
                             l2, sscd: {preprocessing: ...}, fid, fd_pixel, clip, pairing,       (every task)
                             l2_own, sscd_own: {...}, prompts: [...], heldout_prompts: {...}}   (text-to-image)
    floor           training set id -> the same measures of held-out real images (the floor row)
    floor_notes     training set id -> why it has no floor row
    training_sets   id -> {dataset, num_images, sha256, models, near_duplicates}
    weights         the weight files behind the numbers, with their sha256
    warnings, errors, null_values

Each measure is the same dictionary wherever it appears (a model's row, its held-out prompts, the floor).
"""

from __future__ import annotations

import math
import platform

import numpy as np
import torch

SCHEMA = "memdistill-audit/2"
# Where and when a result was computed: expected to differ between an audit and its recomputation.
PROVENANCE_KEYS = ("created", "versions", "samples_dir", "recomputed_from", "device")


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


def compare_results(original: dict, recomputed: dict, rtol: float = 0.0) -> tuple[int, list]:
    """Numbers of two ``metrics.json`` compared (exactly, or within ``rtol`` relative for floats), provenance aside:
    ``(number of equal values, descriptions of the others)``. Counts and booleans are always compared exactly."""
    a, b = ({k: v for k, v in numeric_values(r).items() if k.split(".")[0] not in PROVENANCE_KEYS}
            for r in (original, recomputed))
    equal, differences = 0, []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            differences.append(f"{key}: {a[key]!r} only in the original")
        elif key not in a:
            differences.append(f"{key}: {b[key]!r} only in the recomputation")
        elif a[key] == b[key] and type(a[key]) is type(b[key]):
            equal += 1
        elif (rtol and isinstance(a[key], float) and isinstance(b[key], float)
              and abs(a[key] - b[key]) <= rtol * max(abs(a[key]), abs(b[key]))):
            equal += 1
        else:
            differences.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return equal, differences


def versions() -> dict:
    import diffusers

    from .. import __version__

    return {"diffusers_memdistill": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


def read_results(path: str) -> dict:
    """A ``metrics.json`` of this schema; a ValueError naming the problem otherwise."""
    import json

    def refuse(token):
        raise ValueError(f"{path} holds the non-standard JSON token {token}")

    with open(path, encoding="utf-8") as f:
        results = json.load(f, parse_constant=refuse)
    if not isinstance(results, dict) or results.get("schema") != SCHEMA:
        found = results.get("schema") if isinstance(results, dict) else type(results).__name__
        raise ValueError(f"{path} is not a metrics.json of schema {SCHEMA} (found {found!r}): audit the models again "
                         "with memdistill evaluate, or recompute it with --from_samples.")
    return results


__all__ = ["PROVENANCE_KEYS", "SCHEMA", "compare_results", "numeric_values", "read_results", "strict_json", "versions"]
