"""Image tensor conventions shared by the feature extractors.

Images enter every extractor as float tensors ``(N, C, H, W)`` with values in ``[0, 1]`` (``uint8`` tensors are
divided by 255); ``C`` is 1 (grayscale, repeated to RGB) or 3. Float images outside [0, 1] (a model's [-1, 1]
output, or 8-bit values stored as floats) are refused here, in the one conversion every extractor goes through:
fed on, they would give descriptors of a different image without any error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Float images may overshoot [0, 1] by this much (round-off of a [-1, 1] -> [0, 1] mapping) and still be accepted.
RANGE_TOLERANCE = 1e-3


def check_image_range(images: torch.Tensor, consumer: str = "Feature extractors") -> None:
    """Raises `ValueError` unless the finite values of float `images` lie in [0, 1] (within `RANGE_TOLERANCE`);
    the message names `consumer`, what takes the images."""
    finite = images[torch.isfinite(images)]  # NaN samples are reported by the metrics, not refused here
    if finite.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(finite))
    if low < -RANGE_TOLERANCE:
        raise ValueError(
            f"{consumer} take float images in [0, 1] (or uint8), got values down to {low:.4g}: images in "
            "[-1, 1] must be mapped with (x + 1) / 2 first."
        )
    if high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"{consumer} take float images in [0, 1] (or uint8), got values up to {high:.4g}: 8-bit values "
            "stored as floats must be divided by 255 (or passed as a uint8 tensor)."
        )


def to_float_rgb(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` or ``(N, H, W)`` images, uint8 or float in [0, 1] -> float32 ``(N, 3, H, W)`` in [0, 1].

    Raises `ValueError` for float images outside [0, 1] (see [`check_image_range`]) and for other integer dtypes.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"Expected a torch.Tensor of images, got {type(images).__name__}.")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"Expected images of shape (N, C, H, W), got {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif images.is_floating_point():
        images = images.float()
        check_image_range(images)
    else:
        raise TypeError(f"Expected uint8 or float images, got dtype {images.dtype}.")
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


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Central ``size × size`` window, offsets rounded as torchvision's ``CenterCrop`` rounds them."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"Cannot crop {size}×{size} from {height}×{width} images.")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` of ``(N, 3, H, W)`` images."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Rounds [0, 1] images to the 256 levels of an 8-bit file, as saved samples would be."""
    return images.clamp(0, 1).mul(255).round().div(255)
