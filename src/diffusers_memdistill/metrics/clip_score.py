"""CLIP score: cosine similarity of CLIP image and text embeddings (Hessel et al. 2021), reported raw as 000 does
(≈ 0.22 for Stable Diffusion v1.5; no ×100 scaling, no clipping at 0).

The default model is open_clip's ``ViT-L-14`` with the ``openai`` weights, the usual choice for Stable Diffusion
evaluation; both are configurable. Tensors go through the model's own preprocessing: antialiased bicubic resize of
the short edge, centre crop, normalisation with the model's mean and std.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._images import resize, short_edge_size, to_float_rgb
from .weights import MissingWeightsError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    r"""
    Per-pair cosine similarity of image and text embeddings.

    Args:
        image_features (`torch.Tensor` of shape `(N, D)`), text_features (`torch.Tensor` of shape `(N, D)`):
            Embeddings of each image and of its prompt (normalised here).

    Returns:
        `torch.Tensor` of shape `(N,)`: the raw cosine similarities, NaN where an embedding is not finite.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"Expected two (N, D) matrices of the same shape, got {tuple(image_features.shape)} and {tuple(text_features.shape)}."
        )
    return (F.normalize(image_features.float(), dim=1) * F.normalize(text_features.float(), dim=1)).sum(1)


class CLIPFeatureExtractor:
    r"""
    Image and text embeddings from an open_clip model.

    Args:
        model (`torch.nn.Module`):
            Any object with ``encode_image(pixels)`` and ``encode_text(tokens)``, e.g. an ``open_clip.CLIP``.
        tokenizer (`Callable[[list[str]], torch.Tensor]`):
            Prompts -> token ids, e.g. ``open_clip.get_tokenizer(name)``.
        image_size (`int`, *optional*):
            Input side; defaults to ``model.visual.image_size`` (or 224).
        mean (`tuple`, *optional*), std (`tuple`, *optional*):
            Normalisation; default to the model's preprocessing config, else OpenAI's values.
        batch_size (`int`, defaults to 32):
            Items per forward pass.
        device (`str` or `torch.device`, *optional*):
            Defaults to CUDA when available.
        progress (`bool`, defaults to `False`):
            Show progress bars.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        progress: bool = False,
    ):
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        visual = getattr(model, "visual", None)
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        if image_size is None:
            size = getattr(visual, "image_size", cfg.get("size", 224))
            image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.image_size = image_size
        self.mean = tuple(mean or cfg.get("mean", OPENAI_CLIP_MEAN))
        self.std = tuple(std or cfg.get("std", OPENAI_CLIP_STD))
        self.batch_size, self.progress = batch_size, progress

    @classmethod
    def from_open_clip(
        cls,
        model_name: str = "ViT-L-14",
        pretrained: str | None = "openai",
        *,
        cache_dir: str | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> "CLIPFeatureExtractor":
        r"""
        Builds the extractor from an open_clip model name and pretrained tag (or a local checkpoint path).

        Args:
            model_name (`str`, defaults to `"ViT-L-14"`): an ``open_clip.list_models()`` name.
            pretrained (`str`, defaults to `"openai"`): a pretrained tag of that model or a local weights file.
            cache_dir (`str`, *optional*): open_clip's download cache.
            device (`str` or `torch.device`, *optional*): where the model runs.
            **kwargs: passed to the constructor.

        Raises:
            [`MissingWeightsError`]: the weights cannot be found or downloaded.
        """
        import open_clip

        try:
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, cache_dir=cache_dir)
            tokenizer = open_clip.get_tokenizer(model_name)
        except (RuntimeError, OSError, ValueError) as exc:
            raise MissingWeightsError(
                f"Could not load CLIP {model_name!r} with pretrained={pretrained!r} ({type(exc).__name__}: {exc}). "
                "Download the weights on a machine with network access (open_clip caches them in the Hugging Face "
                "cache, or pass `cache_dir`), or pass a local checkpoint path as `pretrained`."
            ) from exc
        return cls(model, tokenizer, device=device, **kwargs)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> resized (short edge), centre-cropped, normalised model input."""
        x = to_float_rgb(images)
        h, w = short_edge_size(x.shape[-2], x.shape[-1], self.image_size)
        x = resize(x, (h, w), mode="bicubic").clamp(0, 1)
        top, left = (h - self.image_size) // 2, (w - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images in [0, 1] -> ``(N, D)`` unit-norm float32 embeddings on the CPU."""
        out = []
        for start in tqdm(range(0, images.shape[0], self.batch_size), desc="CLIP images", disable=not self.progress, leave=False):
            x = self.preprocess(images[start : start + self.batch_size].to(self.device))
            out.append(F.normalize(self.model.encode_image(x).float(), dim=1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> ``(N, D)`` unit-norm float32 embeddings on the CPU."""
        out = []
        for start in tqdm(range(0, len(prompts), self.batch_size), desc="CLIP text", disable=not self.progress, leave=False):
            tokens = self.tokenizer(list(prompts[start : start + self.batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=1).cpu())
        return torch.cat(out)


def compute_clip_score(images: torch.Tensor, prompts: Sequence[str], extractor: CLIPFeatureExtractor) -> torch.Tensor:
    r"""
    CLIP score of each image with its prompt.

    Args:
        images (`torch.Tensor` of shape `(N, C, H, W)`): images in [0, 1].
        prompts (`Sequence[str]` of length N): the prompt each image was generated from.
        extractor ([`CLIPFeatureExtractor`]): any object with ``encode_images`` and ``encode_text``.

    Returns:
        `torch.Tensor` of shape `(N,)`: raw cosine similarities; report their mean.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"Got {images.shape[0]} images but {len(prompts)} prompts.")
    return clip_score(extractor.encode_images(images), extractor.encode_text(prompts))
