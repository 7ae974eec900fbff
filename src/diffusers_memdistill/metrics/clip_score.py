"""CLIP score: cosine similarity of CLIP image and text embeddings (Hessel et al. 2021), reported raw as 000 does
(≈ 0.22 for Stable Diffusion v1.5; no ×100 scaling, no clipping at 0).

The default model is open_clip's ``ViT-L-14`` with the ``openai`` weights, the usual choice for Stable Diffusion
evaluation; both are configurable. Tensors go through the model's own preprocessing: antialiased bicubic resize of
the short edge, centre crop, normalisation with the model's mean and std.

The weights file of a pretrained tag is located here, in the Hugging Face cache (or open_clip's URL cache), before
open_clip is called with that file: a missing file is reported at once, with the repository and file names, and
under ``HF_HUB_OFFLINE=1`` nothing touches the network (open_clip alone would try every candidate file online).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._images import center_crop, normalize, resize, short_edge_size, to_float_rgb
from .weights import MissingWeightsError, WeightsProvenance, WeightsProvenanceMixin

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


def _hub_offline() -> bool:
    """Whether Hub downloads are disabled: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as huggingface_hub read it
    at import, or as the environment says now (huggingface_hub reads it only once)."""
    from huggingface_hub import constants

    now = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return bool(constants.HF_HUB_OFFLINE) or now in {"1", "ON", "YES", "TRUE"}


def _find_cached_weights(pretrained_cfg: dict, cache_dir: str | None) -> tuple[str | None, list[str], str]:
    """Looks for the weights of an open_clip pretrained tag in the local caches only (no network).

    Returns the cached file (or None), the candidate files in open_clip's order of preference, and a command that
    downloads the preferred one into the cache that is searched.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from open_clip import constants as open_clip_constants

    default_name = open_clip_constants.HF_WEIGHTS_NAME
    safe_name = getattr(open_clip_constants, "HF_SAFE_WEIGHTS_NAME", "open_clip_model.safetensors")
    hf_hub = pretrained_cfg.get("hf_hub", "")
    if hf_hub:
        # "org/repo/file" or "org/repo/" (open_clip's default file name); open_clip tries a .safetensors twin first.
        repo_id, filename = os.path.split(hf_hub)
        filename = filename or default_name
        names = [safe_name] if filename == default_name else []
        if filename != default_name and filename.endswith((".bin", ".pth")):
            names.append(filename[:-4] + ".safetensors")
        names.append(filename)
        where = str(cache_dir or constants.HF_HUB_CACHE)
        found = None
        for name in names:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(hit, str):  # neither None nor the "known not to exist" marker
                found = hit
                break
        return found, [f"{repo_id}/{name}" for name in names], f"hf download {repo_id} {filename} --cache-dir {where}"
    url = pretrained_cfg.get("url", "")  # a tag without a Hub copy: open_clip caches the URL's file here
    target = (Path(cache_dir) if cache_dir else Path("~/.cache/clip").expanduser()) / os.path.basename(url)
    return (str(target) if target.is_file() else None), [url], f"curl -L --create-dirs -o {target} {url}"


def resolve_open_clip_weights(model_name: str, pretrained: str, cache_dir: str | None = None) -> tuple[Path, dict]:
    r"""
    Local weights file of an open_clip model for a pretrained tag or checkpoint path, downloading it only when
    ``HF_HUB_OFFLINE`` is not set.

    Args:
        model_name (`str`): an ``open_clip.list_models()`` name.
        pretrained (`str`): a pretrained tag of that model, or a local checkpoint file.
        cache_dir (`str`, *optional*): open_clip's download cache (the Hugging Face cache by default).

    Returns:
        `tuple[pathlib.Path, dict]`: the file and the tag's open_clip config (empty for a checkpoint path).

    Raises:
        [`MissingWeightsError`]: the file is absent and cannot be downloaded (at once when offline).
        `ValueError`: an unknown model name or pretrained tag.
    """
    import open_clip

    if model_name not in open_clip.list_models():
        raise ValueError(f"Unknown open_clip model {model_name!r}; see open_clip.list_models().")
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        path = Path(pretrained).expanduser()
        if path.is_file():
            return path, {}
        if os.sep in pretrained or path.suffix:
            raise MissingWeightsError(f"CLIP checkpoint file {path} not found.")
        raise ValueError(
            f"{pretrained!r} is neither a pretrained tag of open_clip {model_name!r} "
            f"({open_clip.list_pretrained_tags_by_model(model_name)}) nor a checkpoint file."
        )
    if "file" in cfg:
        return Path(cfg["file"]), cfg
    found, names, fetch = _find_cached_weights(cfg, cache_dir)
    if found is not None:
        return Path(found), cfg
    how_to_get = f"Run `{fetch}` where the network is reachable, or pass a local checkpoint file as `pretrained`."
    if _hub_offline():
        raise MissingWeightsError(
            f"CLIP {model_name!r} weights (pretrained={pretrained!r}) are not cached and HF_HUB_OFFLINE forbids "
            f"downloading them: missing {' or '.join(names)}. {how_to_get}"
        )
    try:
        return Path(open_clip.download_pretrained(cfg, cache_dir=cache_dir)), cfg
    except Exception as exc:  # huggingface_hub and urllib raise many types; all mean "no file"
        raise MissingWeightsError(
            f"Could not download CLIP {model_name!r} weights (pretrained={pretrained!r}; {' or '.join(names)}): "
            f"{type(exc).__name__}: {exc}. {how_to_get}"
        ) from exc


class CLIPFeatureExtractor(WeightsProvenanceMixin):
    r"""
    Image and text embeddings from an open_clip model.

    Provenance for reports: ``backend`` (``"open_clip"`` when built with [`~CLIPFeatureExtractor.from_open_clip`],
    ``"module"`` for an injected model), ``weights_path`` and ``weights_sha256`` (None for injected models).

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

        The weights file is found (or, unless ``HF_HUB_OFFLINE`` is set, downloaded) by
        [`resolve_open_clip_weights`], hashed, and given to open_clip as a file, with the tag's QuickGELU setting
        and normalisation (the ``openai`` weights were trained with QuickGELU).

        Args:
            model_name (`str`, defaults to `"ViT-L-14"`): an ``open_clip.list_models()`` name.
            pretrained (`str`, defaults to `"openai"`): a pretrained tag of that model or a local weights file;
                None gives random weights (``weights_path`` None).
            cache_dir (`str`, *optional*): open_clip's download cache.
            device (`str` or `torch.device`, *optional*): where the model runs.
            **kwargs: passed to the constructor.

        Raises:
            [`MissingWeightsError`]: the weights cannot be found or downloaded; with ``HF_HUB_OFFLINE=1`` and no
            cached file this happens at once, before any model is built.
        """
        import open_clip

        path, cfg = (None, {}) if pretrained is None else resolve_open_clip_weights(model_name, pretrained, cache_dir)
        try:
            model = open_clip.create_model(
                model_name,
                pretrained=None if path is None else str(path),
                force_quick_gelu=bool(cfg.get("quick_gelu", False)),
                cache_dir=cache_dir,
            )
            tokenizer = open_clip.get_tokenizer(model_name)
        except (RuntimeError, OSError) as exc:  # a corrupt or mismatched checkpoint, a tokenizer not cached
            raise MissingWeightsError(
                f"Could not load CLIP {model_name!r} from {path} ({type(exc).__name__}: {exc}). Download the weights "
                "again, or pass a checkpoint file of that model as `pretrained`."
            ) from exc
        for key in ("mean", "std"):  # the tag's normalisation, which open_clip attaches only when given the tag
            if cfg.get(key) is not None:
                kwargs.setdefault(key, tuple(cfg[key]))
        extractor = cls(model, tokenizer, device=device, **kwargs)
        if path is not None:
            extractor.weights_provenance = WeightsProvenance.of_file("open_clip", path)
        else:
            extractor.weights_provenance = WeightsProvenance("open_clip")
        return extractor

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> resized (short edge), centre-cropped, normalised model input."""
        x = to_float_rgb(images)
        x = resize(x, short_edge_size(x.shape[-2], x.shape[-1], self.image_size), mode="bicubic").clamp(0, 1)
        return normalize(center_crop(x, self.image_size), self.mean, self.std)

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
