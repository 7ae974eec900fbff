"""Image tensor conventions shared by the feature extractors.

Images enter every extractor as float tensors ``(N, C, H, W)`` with values in ``[0, 1]`` (``uint8`` tensors are
divided by 255); ``C`` is 1 (grayscale, repeated to RGB) or 3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float_rgb(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` or ``(N, H, W)`` images, uint8 or float in [0, 1] -> float32 ``(N, 3, H, W)`` in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"Expected a torch.Tensor of images, got {type(images).__name__}.")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"Expected images of shape (N, C, H, W), got {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    else:
        images = images.float()
    channels = images.shape[1]
    if channels == 1:
        images = images.expand(-1, 3, -1, -1)
    elif channels != 3:
        raise ValueError(f"Expected 1 or 3 image channels, got {channels}.")
    return images


def resize(images: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Antialiased resize of float images; torch's antialiased kernels follow PIL's (bicubic with a = -0.5)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode=mode, antialias=True, align_corners=False)


def short_edge_size(height: int, width: int, short_edge: int) -> tuple[int, int]:
    """Output size keeping the aspect ratio with the shorter edge set to `short_edge` (torchvision ``Resize(int)``)."""
    if height <= width:
        return short_edge, max(1, int(short_edge * width / height))
    return max(1, int(short_edge * height / width)), short_edge


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Rounds [0, 1] images to the 256 levels of an 8-bit file, as saved samples would be."""
    return images.clamp(0, 1).mul(255).round().div(255)
