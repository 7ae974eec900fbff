"""The feature extractors an audit's measures need (SSCD, Inception, CLIP), loaded from the settings or injected, each
identified by the sha256 of its weights so that the training set's features can be cached by it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import measures as M


def audit_settings(task, metrics, sscd_preprocessing, sscd_threshold, floor, sscd_weights, sscd_onnx,
                   inception_weights, cache_dir, clip_model="ViT-L-14", clip_pretrained="openai") -> dict:
    from ..metrics import SSCD_PREPROCESSINGS

    metrics = M.check_metrics(metrics, task)
    preps = (sscd_preprocessing,) if isinstance(sscd_preprocessing, str) else tuple(sscd_preprocessing)
    bad = [p for p in preps if p not in SSCD_PREPROCESSINGS]
    if bad or not preps or len(set(preps)) != len(preps):
        raise ValueError(f"--sscd_preprocessing must name one or both of {sorted(SSCD_PREPROCESSINGS)}, got {preps}.")
    if not 0 < float(sscd_threshold) < 1:
        raise ValueError(f"--sscd_threshold must lie in (0, 1), got {sscd_threshold}.")
    # Local files by absolute path, so that --from_samples finds them from any working directory.
    local = lambda p: os.path.abspath(p) if p is not None and os.path.exists(p) else p  # noqa: E731
    return {"metrics": list(metrics), "sscd_preprocessing": list(preps), "sscd_threshold": float(sscd_threshold),
            "l2_threshold": M.L2_THRESHOLD, "floor": bool(floor), "sscd_weights": local(sscd_weights),
            "sscd_onnx": local(sscd_onnx), "inception_weights": local(inception_weights),
            "cache_dir": local(cache_dir), "clip_model": clip_model, "clip_pretrained": clip_pretrained}


def _module_hash(extractor) -> str | None:
    """sha256 of an injected module's weights (extractors loaded from files carry their file's sha256)."""
    from ..metrics import tensor_content_hash

    model = getattr(extractor, "model", None)
    if isinstance(model, torch.nn.Module):
        return tensor_content_hash(*[t.detach().cpu() for t in model.state_dict().values()])
    return None


def feature_space(name, extractor, extra: str, batch_size: int = 64):
    import hashlib

    from .references import FeatureSpace

    sha = getattr(extractor, "weights_sha256", None) or _module_hash(extractor)
    if sha is None:
        raise ValueError(f"The {name} extractor has neither a weights file nor module weights to identify it by.")
    fingerprint = hashlib.sha256(f"{name}|{extra}|{sha}".encode()).hexdigest()
    return FeatureSpace(name=name, fingerprint=fingerprint, extract=lambda x: extractor(x).float().cpu(),
                        batch_size=batch_size)


def sscd_extractor(settings, preprocessing, device):
    from ..metrics import SSCDFeatureExtractor, SSCDOnnxFeatureExtractor

    if settings["sscd_onnx"]:
        return SSCDOnnxFeatureExtractor(settings["sscd_onnx"], preprocessing=preprocessing)
    source = settings["sscd_weights"]
    kwargs = {"download": True} if source is None else {}
    return SSCDFeatureExtractor.from_torchscript(*(() if source is None else (source,)), preprocessing=preprocessing,
                                                 device=device, **kwargs)


@dataclass
class Extractors:
    """The feature spaces of the measures asked for, and what could not be loaded."""

    spaces: dict = field(default_factory=dict)  # name -> FeatureSpace ("pixels", "sscd-<p>", "inception")
    sscd: dict = field(default_factory=dict)  # preprocessing -> extractor
    inception: object = None
    clip: object = None
    weights: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)


def load_extractors(settings: dict, device, injected: dict | None = None) -> Extractors:
    """The extractors the settings name (or the injected ones, tests); a missing weights file or optional package
    is recorded under ``errors`` (the measure is "not computed"), any other error stops the audit."""
    from ..metrics import SSCD_PREPROCESSINGS, CLIPFeatureExtractor, InceptionFeatureExtractor, MissingWeightsError
    from .references import pixel_space

    injected = injected or {}
    ex = Extractors()
    metrics = settings["metrics"]
    if "l2" in metrics or "fd_pixel" in metrics:
        ex.spaces["pixels"] = pixel_space()

    def attempt(name, build):
        try:
            build()
        except (MissingWeightsError, ImportError) as exc:
            ex.errors[name] = f"{type(exc).__name__}: {exc}"
            tqdm.write(f"[memdistill evaluate] {name} not computed: {exc}")

    if "sscd" in metrics:
        def build_sscd():
            for p in settings["sscd_preprocessing"]:
                ex.sscd[p] = injected.get("sscd", {}).get(p) or sscd_extractor(settings, p, device)
        attempt("sscd", build_sscd)
        if "sscd" in ex.errors:
            ex.sscd = {}
        for p, e in ex.sscd.items():
            ex.spaces[f"sscd-{p}"] = feature_space(f"sscd-{p}", e, p)
        if ex.sscd:
            first = next(iter(ex.sscd.values()))
            ex.weights["sscd"] = {"backend": first.backend, "weights_path": first.weights_path,
                                  "sha256": first.weights_sha256,
                                  "preprocessings": {p: SSCD_PREPROCESSINGS[p] for p in ex.sscd}}
    if "fid" in metrics:
        def build_inception():
            ex.inception = injected.get("inception") or InceptionFeatureExtractor.from_torchscript(
                settings["inception_weights"], device=device)
        attempt("fid", build_inception)
        if ex.inception is not None:
            cache_id = getattr(ex.inception, "cache_id", "") or ""
            ex.spaces["inception"] = feature_space("inception", ex.inception, cache_id)
            ex.weights["inception"] = {"backend": ex.inception.backend, "weights_path": ex.inception.weights_path,
                                       "sha256": ex.inception.weights_sha256}
    if "clip" in metrics:
        def build_clip():
            ex.clip = injected.get("clip") or CLIPFeatureExtractor.from_open_clip(
                settings["clip_model"], settings["clip_pretrained"], device=device)
        attempt("clip", build_clip)
        if ex.clip is not None:
            ex.weights["clip"] = {"model": settings["clip_model"], "pretrained": settings["clip_pretrained"],
                                  "backend": getattr(ex.clip, "backend", None),
                                  "sha256": getattr(ex.clip, "weights_sha256", None)}
    return ex



__all__ = ["Extractors", "audit_settings", "feature_space", "load_extractors", "sscd_extractor"]
