"""Locating and loading the pretrained weights of feature extractors.

Weights come from a local path or a URL. A URL is downloaded once into the torch hub cache
(``$TORCH_HOME/hub/checkpoints``) with ``torch.hub.download_url_to_file``. Anything that prevents getting usable
weights raises [`MissingWeightsError`], so a caller can report it and still compute the other metrics.
TorchScript files are read with ``torch.jit.load``; nothing here unpickles.

Every extractor records where its numbers come from ([`WeightsProvenanceMixin`]): the backend, the weights file and
its SHA-256, hashed once when the file is loaded, so that a report can name the exact weights behind each metric.
"""

from __future__ import annotations

import os
import urllib.error
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..utils.hashing import file_sha256


class MissingWeightsError(RuntimeError):
    """The weights of a feature extractor are missing or unusable; the message says how to get them."""


BACKENDS = ("torchscript", "onnx", "open_clip", "module")


@dataclass(frozen=True)
class WeightsProvenance:
    r"""
    Where the weights of a feature extractor come from.

    Args:
        backend (`str`):
            ``"torchscript"``, ``"onnx"``, ``"open_clip"``, or ``"module"`` for a module injected by the caller.
        path (`str`, *optional*):
            The weights file that was loaded; None for injected modules (and randomly initialised models).
        sha256 (`str`, *optional*):
            SHA-256 of that file (hex); None when there is no file.
    """

    backend: str = "module"
    path: str | None = None
    sha256: str | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}.")

    @classmethod
    def of_file(cls, backend: str, path: str | os.PathLike) -> "WeightsProvenance":
        """Provenance of a loaded weights file, hashing it (once, here)."""
        return cls(backend=backend, path=str(path), sha256=file_sha256(path))


class WeightsProvenanceMixin:
    """Gives an extractor ``backend``, ``weights_path`` and ``weights_sha256`` from its ``weights_provenance``."""

    weights_provenance: WeightsProvenance = WeightsProvenance()

    @property
    def backend(self) -> str:
        """``"torchscript"``, ``"onnx"``, ``"open_clip"`` or ``"module"`` (a module injected by the caller)."""
        return self.weights_provenance.backend

    @property
    def weights_path(self) -> str | None:
        """The weights file that was loaded, or None for an injected module."""
        return self.weights_provenance.path

    @property
    def weights_sha256(self) -> str | None:
        """SHA-256 (hex) of the weights file, or None for an injected module."""
        return self.weights_provenance.sha256

    @property
    def provenance(self) -> dict[str, str | None]:
        """``{"backend", "weights_path", "weights_sha256"}`` as a JSON-ready dict, e.g. for a report."""
        return {"backend": self.backend, "weights_path": self.weights_path, "weights_sha256": self.weights_sha256}


def is_url(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and urlparse(source).scheme in ("http", "https", "ftp")


def resolve_weights_file(
    source: str | os.PathLike,
    *,
    name: str,
    how_to_get: str,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool = True,
) -> Path:
    r"""
    Returns a local file holding the weights named by `source`.

    Args:
        source (`str` or `os.PathLike`):
            A local file, or an ``http(s)://`` URL whose file is cached under `cache_dir` after the first download.
        name (`str`):
            Human-readable name of the weights, used in error messages.
        how_to_get (`str`):
            Sentence appended to error messages telling the user how to obtain the weights.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Download folder; defaults to ``torch.hub.get_dir()/checkpoints``.
        download (`bool`, defaults to `True`):
            Whether a URL not yet in the cache may be downloaded.
        progress (`bool`, defaults to `True`):
            Show a download progress bar.

    Returns:
        `pathlib.Path`: an existing file.

    Raises:
        [`MissingWeightsError`]: the file does not exist, or the download is disabled or failed.
    """
    if is_url(source):
        filename = os.path.basename(urlparse(str(source)).path)
        if not filename:
            raise ValueError(f"Cannot derive a file name from the URL {source!r}.")
        folder = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
        target = folder / filename
        if target.is_file():
            return target
        if not download:
            raise MissingWeightsError(
                f"{name} weights are not in the cache ({target}) and downloading is disabled. {how_to_get}"
            )
        folder.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(str(source), str(target), progress=progress)
        except (urllib.error.URLError, OSError, ValueError) as exc:  # HTTPError is a URLError
            raise MissingWeightsError(
                f"Could not download {name} weights from {source} ({type(exc).__name__}: {exc}). {how_to_get}"
            ) from exc
        return target
    path = Path(source).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"{name} weights not found at {path}. {how_to_get}")
    return path


def load_torchscript(path: str | os.PathLike, *, name: str, how_to_get: str) -> torch.jit.ScriptModule:
    """Loads a TorchScript module on the CPU in eval mode; a file that is not TorchScript raises `MissingWeightsError`."""
    try:
        with warnings.catch_warnings():
            # torch>=2.9 flags torch.jit.load as deprecated; published metric weights only exist as TorchScript.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise MissingWeightsError(
            f"{path} is not a loadable TorchScript file for the {name} weights ({exc}). {how_to_get}"
        ) from exc
    return module.eval()
