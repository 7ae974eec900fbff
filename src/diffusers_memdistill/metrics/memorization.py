"""Memorization metrics: the pixel nearest-neighbour ratio and the copy-detection (SSCD) similarity.

Both are functions of tensors: images for the pixel ratio, descriptors for the similarity. Samples with non-finite
values are never dropped silently: they get a NaN score, are flagged in ``nan_mask``, counted in ``num_nan`` and
excluded from the fractions and quantiles, whose denominator ``num_valid`` is reported beside them.

Images are float tensors in [0, 1] or uint8 tensors (divided by 255). Float images with values outside [0, 1]
(e.g. a model's [-1, 1] output) are refused: compared with [0, 1] training images they would silently score 0%.

The same criteria applied to the training set against itself list its near-duplicates
([`pixel_near_duplicates`], [`sscd_near_duplicates`]): the pairs that let one sample match two training images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ._images import check_image_range
from .nn_search import knn_search, unique_rows


@dataclass
class GroupStats:
    r"""
    Summary of a per-sample score over one group of samples (or all of them).

    Args:
        num_samples (`int`): samples in the group.
        num_nan (`int`): samples whose score is NaN (non-finite sample values).
        num_memorized (`int`): samples flagged as memorized.
        fraction_memorized (`float`): ``num_memorized / (num_samples - num_nan)``; NaN if no valid sample.
        mean (`float`): mean score over valid samples.
        p95 (`float`): 95th percentile (linear interpolation) of the score over valid samples.
        max (`float`): largest score over valid samples.
        min (`float`): smallest score over valid samples.
    """

    num_samples: int
    num_nan: int
    num_memorized: int
    fraction_memorized: float
    mean: float
    p95: float
    max: float
    min: float

    @property
    def num_valid(self) -> int:
        return self.num_samples - self.num_nan

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "num_valid": self.num_valid}


def summarize_scores(scores: torch.Tensor, memorized: torch.Tensor, percentile: float = 95.0) -> GroupStats:
    """[`GroupStats`] of one score vector; NaN scores are counted, not used in the statistics."""
    scores = scores.detach().double().cpu()
    memorized = memorized.detach().bool().cpu()
    valid = ~torch.isnan(scores)
    n_valid = int(valid.sum())
    vals = scores[valid].numpy()
    nan = float("nan")
    return GroupStats(
        num_samples=int(scores.numel()),
        num_nan=int(scores.numel() - n_valid),
        num_memorized=int((memorized & valid).sum()),
        fraction_memorized=float((memorized & valid).sum()) / n_valid if n_valid else nan,
        mean=float(vals.mean()) if n_valid else nan,
        p95=float(np.percentile(vals, percentile)) if n_valid else nan,
        max=float(vals.max()) if n_valid else nan,
        min=float(vals.min()) if n_valid else nan,
    )


def _group_stats(scores, memorized, labels, percentile) -> dict[str, GroupStats]:
    if labels is None:
        return {}
    labels = [str(label) for label in labels]
    if len(labels) != scores.numel():
        raise ValueError(f"Expected {scores.numel()} group labels, got {len(labels)}.")
    out = {}
    for name in sorted(set(labels)):
        sel = torch.tensor([label == name for label in labels])
        out[name] = summarize_scores(scores[sel], memorized[sel], percentile)
    return out


def _labels_of_neighbours(train_groups, nn_index: torch.Tensor, num_train: int) -> list[Any] | None:
    if train_groups is None:
        return None
    if len(train_groups) != num_train:
        raise ValueError(f"`train_groups` has {len(train_groups)} labels for {num_train} training items.")
    groups = train_groups.tolist() if isinstance(train_groups, torch.Tensor) else list(train_groups)
    return ["nan" if i < 0 else groups[i] for i in nn_index.tolist()]


def _resolve_groups(sample_groups, train_groups, nn_index, num_samples, num_train):
    if sample_groups is not None and train_groups is not None:
        raise ValueError("Pass either `sample_groups` or `train_groups`, not both.")
    if sample_groups is not None:
        labels = sample_groups.tolist() if isinstance(sample_groups, torch.Tensor) else list(sample_groups)
        if len(labels) != num_samples:
            raise ValueError(f"`sample_groups` has {len(labels)} labels for {num_samples} samples.")
        return labels
    return _labels_of_neighbours(train_groups, nn_index, num_train)


def as_unit_range_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    r"""
    Images on the [0, 1] scale the pixel metrics compare: uint8 is divided by 255, float is checked.

    Args:
        images (`torch.Tensor`): uint8 in [0, 255] or float in [0, 1]; NaN values are allowed (reported later).
        name (`str`): the argument's name, for the error message.

    Raises:
        `TypeError`: neither uint8 nor floating point. `ValueError`: float values outside [0, 1], e.g. [-1, 1].
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(images).__name__}.")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"`{name}` must be uint8 or floating point in [0, 1], got {images.dtype}.")
    check_image_range(images, consumer=f"The pixel memorization metrics (`{name}`)")
    return images


def memorization_ratio(nn_distances: torch.Tensor) -> torch.Tensor:
    r"""
    r(y) = ‖y − x¹(y)‖ / ‖y − x²(y)‖ from the distances to the first two neighbours (003 §4.1.2; Yoon et al. 2023).

    An exact copy (first distance 0) gets r = 0 even when the second distance is also 0. NaN distances give NaN.

    Args:
        nn_distances (`torch.Tensor` of shape `(N, >=2)`): distances sorted nearest first.

    Returns:
        `torch.Tensor` of shape `(N,)`.
    """
    d1, d2 = nn_distances[:, 0].double(), nn_distances[:, 1].double()
    ratio = d1 / d2
    return torch.where(d1 == 0, torch.zeros_like(ratio), ratio).to(nn_distances.dtype)


@dataclass
class PixelMemorizationResult:
    r"""
    Output of [`pixel_memorization`].

    Args:
        ratios (`torch.Tensor` of shape `(N,)`): r(y) per sample, NaN for non-finite samples.
        memorized (`torch.Tensor` of shape `(N,)`, bool): ``ratios < threshold``.
        nn_indices (`torch.Tensor` of shape `(N, 2)`): indices of the nearest and second-nearest training images
            in the training set as given (first occurrence when duplicates were merged); -1 for NaN samples.
        nn_distances (`torch.Tensor` of shape `(N, 2)`): the Euclidean distances to them.
        nan_mask (`torch.Tensor` of shape `(N,)`, bool): samples with non-finite values.
        threshold (`float`): the ratio threshold.
        overall ([`GroupStats`]): statistics of the ratio over all samples.
        groups (`dict[str, GroupStats]`): the same per group label, if labels were given.
        num_duplicates_removed (`int`): training images dropped as exact duplicates of earlier ones.
    """

    ratios: torch.Tensor
    memorized: torch.Tensor
    nn_indices: torch.Tensor
    nn_distances: torch.Tensor
    nan_mask: torch.Tensor
    threshold: float
    overall: GroupStats
    groups: dict[str, GroupStats] = field(default_factory=dict)
    num_duplicates_removed: int = 0

    @property
    def fraction_memorized(self) -> float:
        return self.overall.fraction_memorized

    @property
    def num_nan(self) -> int:
        return self.overall.num_nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-sample tensors)."""
        return {
            "threshold": self.threshold,
            **self.overall.to_dict(),
            "num_duplicates_removed": self.num_duplicates_removed,
            "nan_indices": self.nan_mask.nonzero().squeeze(1).tolist(),
            "groups": {name: stats.to_dict() for name, stats in self.groups.items()},
        }


def pixel_memorization(
    samples: torch.Tensor,
    train_images: torch.Tensor,
    *,
    threshold: float = 1.0 / 3.0,
    train_groups: Sequence[Any] | torch.Tensor | None = None,
    sample_groups: Sequence[Any] | torch.Tensor | None = None,
    deduplicate: bool = True,
    percentile: float = 95.0,
    **search_kwargs,
) -> PixelMemorizationResult:
    r"""
    Pixel-space memorization: y is memorized when ‖y − NN₁(y)‖₂ / ‖y − NN₂(y)‖₂ < 1/3 (000 §4.1; 003 §4.1.2).

    Args:
        samples (`torch.Tensor` of shape `(N, C, H, W)`):
            Generated images, float in [0, 1] or uint8 (see [`as_unit_range_images`]; [-1, 1] input is refused).
        train_images (`torch.Tensor` of shape `(M, C, H, W)`):
            The exact training set the model was trained on, M ≥ 2, float in [0, 1] or uint8.
        threshold (`float`, defaults to 1/3):
            Memorized when r(y) < threshold.
        train_groups (sequence of length M, *optional*):
            A label per training image (e.g. ``"repeated"`` / ``"non-repeated"`` classes, 000 Table 4); each
            sample is assigned the label of its nearest training image.
        sample_groups (sequence of length N, *optional*):
            A label per sample instead (e.g. the class a class-conditional sample was drawn for).
        deduplicate (`bool`, defaults to `True`):
            Merge exact duplicate training images first. With k copies of an image in the training set (repeated
            data), NN₂ of a copy of it would be another copy at distance 0; merging makes NN₂ the nearest *other*
            image, which is what the criterion means.
        percentile (`float`, defaults to 95):
            Percentile reported as ``p95``.
        **search_kwargs:
            Passed to [`knn_search`] (chunk sizes, device, progress).

    Returns:
        [`PixelMemorizationResult`]
    """
    samples = as_unit_range_images(samples, "samples")
    train_images = as_unit_range_images(train_images, "train_images")
    if samples.shape[1:] != train_images.shape[1:]:
        raise ValueError(
            f"Samples have shape {tuple(samples.shape[1:])} per image but the training images have "
            f"{tuple(train_images.shape[1:])}; generate at the training resolution."
        )
    num_train = train_images.shape[0]
    keep = None
    reference = train_images
    if deduplicate:
        keep, _ = unique_rows(train_images)
        if keep.numel() < num_train:
            reference = train_images[keep.to(train_images.device)]
    if reference.shape[0] < 2:
        raise ValueError("The memorization ratio needs at least 2 distinct training images.")
    knn = knn_search(samples, reference, k=2, metric="l2", **search_kwargs)
    nn_indices = knn.indices.cpu()
    if keep is not None and reference is not train_images:
        nn_indices = torch.where(nn_indices >= 0, keep[nn_indices.clamp_min(0)], nn_indices)
    return pixel_memorization_from_neighbours(
        nn_indices, knn.values.cpu(), num_train=num_train, threshold=threshold, train_groups=train_groups,
        sample_groups=sample_groups, percentile=percentile, num_duplicates_removed=num_train - reference.shape[0])


def pixel_memorization_from_neighbours(
    nn_indices: torch.Tensor,
    nn_distances: torch.Tensor,
    *,
    num_train: int,
    threshold: float = 1.0 / 3.0,
    train_groups: Sequence[Any] | torch.Tensor | None = None,
    sample_groups: Sequence[Any] | torch.Tensor | None = None,
    percentile: float = 95.0,
    num_duplicates_removed: int = 0,
) -> PixelMemorizationResult:
    r"""
    [`pixel_memorization`] from the two nearest distinct training images of each sample, found by any exact search
    (e.g. shard by shard over several processes, then concatenated).

    Args:
        nn_indices (`torch.Tensor` of shape `(N, 2)`): training indices of NN₁ and NN₂ (-1 for non-finite samples).
        nn_distances (`torch.Tensor` of shape `(N, 2)`): ‖y − NN₁‖, ‖y − NN₂‖ (NaN for non-finite samples).
        num_train (`int`): size of the training set the indices point into.
        threshold, train_groups, sample_groups, percentile: as in [`pixel_memorization`].
        num_duplicates_removed (`int`): training images merged as exact duplicates before the search.

    Returns:
        [`PixelMemorizationResult`]
    """
    ratios = memorization_ratio(nn_distances)
    nan_mask = torch.isnan(ratios)
    memorized = (ratios < threshold) & ~nan_mask
    labels = _resolve_groups(sample_groups, train_groups, nn_indices[:, 0], nn_indices.shape[0], num_train)
    return PixelMemorizationResult(
        ratios=ratios,
        memorized=memorized,
        nn_indices=nn_indices,
        nn_distances=nn_distances,
        nan_mask=nan_mask,
        threshold=threshold,
        overall=summarize_scores(ratios, memorized, percentile),
        groups=_group_stats(ratios, memorized, labels, percentile),
        num_duplicates_removed=num_duplicates_removed,
    )


@dataclass
class OwnImageMemorizationResult:
    r"""
    Output of [`pixel_own_image_memorization`].

    Args:
        ratios (`torch.Tensor` of shape `(N,)`): ρ(y) = ‖y − own(y)‖ / ‖y − other(y)‖ per sample; NaN for non-finite
            samples.
        own_distances (`torch.Tensor` of shape `(N,)`): ‖y − own(y)‖, the Euclidean distance to the nearest of its
            prompt's own images.
        other_distances (`torch.Tensor` of shape `(N,)`): ‖y − other(y)‖, the distance to the nearest training image
            that is not one of its prompt's own images.
        other_indices (`torch.Tensor` of shape `(N,)`): that image's index in the training set (first occurrence of
            duplicates); -1 for NaN samples.
        memorized (`torch.Tensor` of shape `(N,)`, bool): ``ratios < threshold``: the sample copies its own image.
        nan_mask (`torch.Tensor` of shape `(N,)`, bool): samples with non-finite values.
        threshold (`float`): the ratio threshold.
        overall ([`GroupStats`]): statistics of the ratio over all samples.
    """

    ratios: torch.Tensor
    own_distances: torch.Tensor
    other_distances: torch.Tensor
    other_indices: torch.Tensor
    memorized: torch.Tensor
    nan_mask: torch.Tensor
    threshold: float
    overall: GroupStats

    @property
    def fraction_memorized(self) -> float:
        return self.overall.fraction_memorized

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-sample tensors); ``own_distance_mean`` is the mean of ‖y − own(y)‖₂."""
        valid = ~self.nan_mask
        own = self.own_distances[valid].double()
        return {"threshold": self.threshold, **self.overall.to_dict(),
                "own_distance_mean": float(own.mean()) if own.numel() else float("nan"),
                "nan_indices": self.nan_mask.nonzero().squeeze(1).tolist()}


def pixel_own_image_memorization(
    samples: torch.Tensor,
    own_images: torch.Tensor,
    owners: Sequence[Sequence[int]],
    samples_per_prompt: int,
    train_images: torch.Tensor,
    *,
    threshold: float = 1.0 / 3.0,
    percentile: float = 95.0,
    **search_kwargs,
) -> OwnImageMemorizationResult:
    r"""
    Pixel-space copies of a prompt's own image: the L2 ratio criterion of [`pixel_memorization`] with the nearest
    neighbour fixed to the image(s) the prompt was captioned for, ρ(y) = ‖y − own(y)‖₂ / ‖y − other(y)‖₂, where own(y)
    is the nearest of the prompt's own images and other(y) the nearest training image that is not one of them
    (images are compared by content: a duplicate of an own image in the training set is an own image too). y copies
    its own image when ρ(y) < 1/3. For a trained prompt whose generation is a copy of its image ρ ≈ 0 (and then
    ρ = r(y) of [`pixel_memorization`]); a generation that copies another training image has ρ > 1 (∞ for an exact
    copy of it). For a held-out
    prompt (its own image was never trained on), ρ < 1/3 would mean a generation three times closer to an unseen
    image than to anything trained on: the held-out rows measure the floor of this criterion.

    Args:
        samples (`torch.Tensor` of shape `(P·S, C, H, W)`):
            Generations, prompt-major (sample ``p·S + j`` is seed j of prompt p), float in [0, 1] or uint8.
        own_images (`torch.Tensor` of shape `(M, C, H, W)`):
            The prompts' own images, float in [0, 1] or uint8.
        owners (`Sequence[Sequence[int]]`):
            For each of the P prompts, its rows of ``own_images`` (at least one).
        samples_per_prompt (`int`):
            S.
        train_images (`torch.Tensor` of shape `(T, C, H, W)`):
            Every training image (the own images of trained prompts among them), float in [0, 1] or uint8.
        threshold (`float`, defaults to 1/3):
            A copy when ρ(y) < threshold.
        percentile (`float`, defaults to 95):
            Percentile reported as ``p95``.
        **search_kwargs:
            Passed to [`knn_search`].

    Returns:
        [`OwnImageMemorizationResult`]

    Raises:
        ValueError: shapes that do not match, a prompt without own images, or a prompt that owns every training
            image (no other image to compare with).
    """
    samples = as_unit_range_images(samples, "samples")
    own_images = as_unit_range_images(own_images, "own_images")
    train_images = as_unit_range_images(train_images, "train_images")
    if not samples.shape[1:] == own_images.shape[1:] == train_images.shape[1:]:
        raise ValueError(f"Samples {tuple(samples.shape[1:])}, own images {tuple(own_images.shape[1:])} and training "
                         f"images {tuple(train_images.shape[1:])} must have one shape; generate at the training "
                         "resolution.")
    if samples_per_prompt < 1 or samples.shape[0] != len(owners) * samples_per_prompt:
        raise ValueError(f"Expected {len(owners)} prompts × {samples_per_prompt} samples, got {samples.shape[0]}.")
    if any(len(rows) == 0 for rows in owners):
        raise ValueError("Every prompt needs at least one own image.")
    from .pairing import squared_distance_matrix

    # Distinct training images; each own image's row among them (-1: never trained on), by content.
    keep, _ = unique_rows(train_images)
    reference = train_images[keep.to(train_images.device)]
    num_ref = reference.shape[0]
    _, inverse = unique_rows(torch.cat([reference.cpu().float(), own_images.cpu().float()]))
    own_ref = torch.where(inverse[num_ref:] < num_ref, inverse[num_ref:], torch.full_like(inverse[num_ref:], -1))
    own_sets = [{int(own_ref[j]) for j in rows if own_ref[j] >= 0} for rows in owners]
    k = max(len(rows) for rows in own_sets) + 1
    if k > num_ref:
        raise ValueError(f"A prompt owns all {num_ref} distinct training images: there is no other image to compare.")
    knn = knn_search(samples, reference, k=k, metric="l2", **search_kwargs)
    values, indices = knn.values.cpu().double(), knn.indices.cpu()
    n = samples.shape[0]
    own_d = torch.empty(n, dtype=torch.float64)
    other_d = torch.full((n,), float("nan"), dtype=torch.float64)
    other_i = torch.full((n,), -1, dtype=torch.long)
    for p, rows in enumerate(owners):
        window = slice(p * samples_per_prompt, (p + 1) * samples_per_prompt)
        finite = torch.nan_to_num(samples[window].cpu(), nan=0.0, posinf=0.0, neginf=0.0)  # NaN rows: masked below
        own_d[window] = squared_distance_matrix(finite, own_images[list(rows)].cpu()).amin(1).sqrt()
        for i in range(window.start, window.stop):
            for d, j in zip(values[i].tolist(), indices[i].tolist()):
                if j >= 0 and j not in own_sets[p]:  # the nearest image that is not the prompt's own
                    other_d[i], other_i[i] = d, int(keep[j])
                    break
    nan_mask = ~torch.isfinite(samples.reshape(n, -1)).all(1).cpu() | torch.isnan(other_d)
    own_d[nan_mask] = float("nan")
    ratios = torch.where(own_d == 0, torch.zeros_like(own_d), own_d / other_d)
    ratios[nan_mask] = float("nan")
    memorized = (ratios < threshold) & ~nan_mask
    return OwnImageMemorizationResult(
        ratios=ratios.float(), own_distances=own_d.float(), other_distances=other_d.float(), other_indices=other_i,
        memorized=memorized, nan_mask=nan_mask, threshold=threshold,
        overall=summarize_scores(ratios, memorized, percentile),
    )


@dataclass
class SimilarityMemorizationResult:
    r"""
    Output of [`sscd_memorization`].

    Args:
        max_similarity (`torch.Tensor` of shape `(N,)`): per sample the largest cosine similarity to the training
            set; NaN for samples with non-finite descriptors.
        nn_indices (`torch.Tensor` of shape `(N,)`): the most similar training item; -1 for NaN samples.
        memorized (`torch.Tensor` of shape `(N,)`, bool): ``max_similarity > threshold``.
        nan_mask (`torch.Tensor` of shape `(N,)`, bool): samples with non-finite descriptors.
        threshold (`float`): the similarity threshold.
        overall ([`GroupStats`]): fraction above the threshold, mean, p95 and max of the similarity.
        groups (`dict[str, GroupStats]`): the same per group label, if labels were given.
    """

    max_similarity: torch.Tensor
    nn_indices: torch.Tensor
    memorized: torch.Tensor
    nan_mask: torch.Tensor
    threshold: float
    overall: GroupStats
    groups: dict[str, GroupStats] = field(default_factory=dict)

    @property
    def fraction_memorized(self) -> float:
        return self.overall.fraction_memorized

    @property
    def p95(self) -> float:
        return self.overall.p95

    @property
    def mean(self) -> float:
        return self.overall.mean

    @property
    def max(self) -> float:
        return self.overall.max

    @property
    def num_nan(self) -> int:
        return self.overall.num_nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-sample tensors)."""
        return {
            "threshold": self.threshold,
            **self.overall.to_dict(),
            "nan_indices": self.nan_mask.nonzero().squeeze(1).tolist(),
            "groups": {name: stats.to_dict() for name, stats in self.groups.items()},
        }


def sscd_memorization(
    sample_features: torch.Tensor,
    train_features: torch.Tensor,
    *,
    threshold: float = 0.5,
    train_groups: Sequence[Any] | torch.Tensor | None = None,
    sample_groups: Sequence[Any] | torch.Tensor | None = None,
    percentile: float = 95.0,
    **search_kwargs,
) -> SimilarityMemorizationResult:
    r"""
    Copy-detection memorization: per sample the maximum cosine similarity of its SSCD descriptor to the training
    set; memorized when above 0.5; also mean, p95 and max (000 §4.1, Tables 1-4).

    Works with any descriptors (rows are L2-normalised before comparing).

    Args:
        sample_features (`torch.Tensor` of shape `(N, D)`):
            Descriptors of generated images, e.g. from [`SSCDFeatureExtractor`].
        train_features (`torch.Tensor` of shape `(M, D)`):
            Descriptors of the training images.
        threshold (`float`, defaults to 0.5):
            Memorized when the maximum similarity exceeds it.
        train_groups (sequence of length M, *optional*):
            A label per training image; each sample takes the label of its most similar training image.
        sample_groups (sequence of length N, *optional*):
            A label per sample instead.
        percentile (`float`, defaults to 95):
            Percentile reported as ``p95``.
        **search_kwargs:
            Passed to [`knn_search`].

    Returns:
        [`SimilarityMemorizationResult`]
    """
    if sample_features.ndim != 2 or train_features.ndim != 2:
        raise ValueError(
            f"Expected (N, D) descriptor matrices, got {tuple(sample_features.shape)} and {tuple(train_features.shape)}."
        )
    knn = knn_search(sample_features, train_features, k=1, metric="cosine", **search_kwargs)
    return sscd_memorization_from_neighbours(
        knn.indices[:, 0].cpu(), knn.values[:, 0].cpu(), num_train=train_features.shape[0], threshold=threshold,
        train_groups=train_groups, sample_groups=sample_groups, percentile=percentile)


def sscd_memorization_from_neighbours(
    nn_indices: torch.Tensor,
    max_similarity: torch.Tensor,
    *,
    num_train: int,
    threshold: float = 0.5,
    train_groups: Sequence[Any] | torch.Tensor | None = None,
    sample_groups: Sequence[Any] | torch.Tensor | None = None,
    percentile: float = 95.0,
) -> SimilarityMemorizationResult:
    r"""
    [`sscd_memorization`] from the most similar training descriptor of each sample, found by any exact search.

    Args:
        nn_indices (`torch.Tensor` of shape `(N,)`): index of the most similar training item (-1: non-finite).
        max_similarity (`torch.Tensor` of shape `(N,)`): its cosine similarity (NaN: non-finite).
        num_train (`int`): size of the training set the indices point into.
        threshold, train_groups, sample_groups, percentile: as in [`sscd_memorization`].

    Returns:
        [`SimilarityMemorizationResult`]
    """
    sims = max_similarity
    nan_mask = torch.isnan(sims)
    memorized = (sims > threshold) & ~nan_mask
    labels = _resolve_groups(sample_groups, train_groups, nn_indices, sims.shape[0], num_train)
    return SimilarityMemorizationResult(
        max_similarity=sims,
        nn_indices=nn_indices,
        memorized=memorized,
        nan_mask=nan_mask,
        threshold=threshold,
        overall=summarize_scores(sims, memorized, percentile),
        groups=_group_stats(sims, memorized, labels, percentile),
    )


@dataclass
class NearDuplicateResult:
    r"""
    Output of [`pixel_near_duplicates`] and [`sscd_near_duplicates`]: training images whose nearest *other*
    training image is a copy by the memorization criterion itself.

    Args:
        pairs (`torch.Tensor` of shape `(P, 2)`, int64): distinct unordered pairs ``(i, j)``, ``i < j``, where j is
            the nearest other image of i (or i of j) and the criterion holds; most similar first.
        scores (`torch.Tensor` of shape `(P,)`): the pair's score: the ratio r (``"l2"``, lower is closer; the
            smaller of the two directions) or the cosine similarity (``"sscd"``).
        flagged (`torch.Tensor` of shape `(M,)`, bool): images whose nearest other image meets the criterion.
        nearest (`torch.Tensor` of shape `(M,)`, int64): each image's nearest other image.
        image_scores (`torch.Tensor` of shape `(M,)`): each image's score against the rest of the set.
        metric (`str`): ``"l2"`` or ``"sscd"``.
        threshold (`float`): ratio below which (``"l2"``) or similarity above which (``"sscd"``) a pair is listed.
    """

    pairs: torch.Tensor
    scores: torch.Tensor
    flagged: torch.Tensor
    nearest: torch.Tensor
    image_scores: torch.Tensor
    metric: str
    threshold: float

    @property
    def num_pairs(self) -> int:
        return int(self.pairs.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.flagged.numel())

    @property
    def num_flagged(self) -> int:
        return int(self.flagged.sum())

    def to_dict(self, num_listed: int = 10, sources: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready summary: counts and the first `num_listed` pairs, with the images' `sources` when given."""
        listed = []
        for (i, j), score in zip(self.pairs[:num_listed].tolist(), self.scores[:num_listed].tolist()):
            entry = {"i": i, "j": j, "score": score}
            if sources is not None:
                entry["source_i"], entry["source_j"] = str(sources[i]), str(sources[j])
            listed.append(entry)
        return {
            "metric": self.metric,
            "threshold": self.threshold,
            "num_images": self.num_images,
            "num_images_flagged": self.num_flagged,
            "num_pairs": self.num_pairs,
            "pairs": listed,
        }


def _nearest_others(knn_values: torch.Tensor, knn_indices: torch.Tensor, count: int):
    """Drops each row's own index from a self-search (wherever ties put it) and keeps the first `count` others."""
    own = torch.arange(knn_indices.shape[0])[:, None]
    is_self = knn_indices == own
    # Stable sort on the "is self" flag moves the others to the front in their search order.
    order = torch.argsort(is_self.to(torch.int8), dim=1, stable=True)[:, :count]
    return knn_values.gather(1, order), knn_indices.gather(1, order)


def _pairs_of(nearest: torch.Tensor, image_scores: torch.Tensor, flagged: torch.Tensor, lower_is_closer: bool):
    best: dict[tuple[int, int], float] = {}
    for i in flagged.nonzero().squeeze(1).tolist():
        j = int(nearest[i])
        key, score = (min(i, j), max(i, j)), float(image_scores[i])
        if key not in best or (score < best[key] if lower_is_closer else score > best[key]):
            best[key] = score
    # Most similar first, then by indices (a deterministic order for the report).
    items = sorted(best.items(), key=lambda kv: ((kv[1] if lower_is_closer else -kv[1]), kv[0]))
    pairs = torch.tensor([k for k, _ in items], dtype=torch.long).reshape(-1, 2)
    scores = torch.tensor([v for _, v in items], dtype=torch.float64)
    return pairs, scores


def pixel_near_duplicates(
    train_images: torch.Tensor, *, threshold: float = 1.0 / 3.0, **search_kwargs
) -> NearDuplicateResult:
    r"""
    Near-duplicates of a training set under the pixel criterion of [`pixel_memorization`]: image x is flagged when
    ‖x − NN₁(x)‖ / ‖x − NN₂(x)‖ < `threshold`, its two nearest neighbours taken among the *other* training images.
    A sample copying x then lies close to NN₁(x) as well: this is why it can match two training images.

    Exact duplicates (distance 0) are listed too (ratio 0); [`pixel_memorization`] merges them before scoring.

    Args:
        train_images (`torch.Tensor` of shape `(M, C, H, W)`): M ≥ 3 images, float in [0, 1] or uint8.
        threshold (`float`, defaults to 1/3): the memorization threshold on the ratio.
        **search_kwargs: passed to [`knn_search`].

    Returns:
        [`NearDuplicateResult`] with ``metric="l2"``.
    """
    train_images = as_unit_range_images(train_images, "train_images")
    if train_images.shape[0] < 3:
        raise ValueError(f"Near-duplicates by the ratio need at least 3 training images, got {train_images.shape[0]}.")
    if not bool(torch.isfinite(train_images).all()):
        raise ValueError("The training images have non-finite values.")
    knn = knn_search(train_images, train_images, k=3, metric="l2", **search_kwargs)
    distances, indices = _nearest_others(knn.values.cpu(), knn.indices.cpu(), 2)
    ratios = memorization_ratio(distances).double()
    flagged = ratios < threshold
    pairs, scores = _pairs_of(indices[:, 0], ratios, flagged, lower_is_closer=True)
    return NearDuplicateResult(pairs, scores, flagged, indices[:, 0].clone(), ratios, "l2", float(threshold))


def sscd_near_duplicates(
    train_features: torch.Tensor, *, threshold: float = 0.5, **search_kwargs
) -> NearDuplicateResult:
    r"""
    Near-duplicates of a training set under the criterion of [`sscd_memorization`]: image x is flagged when the
    cosine similarity of its descriptor to the most similar *other* training image exceeds `threshold`.

    Args:
        train_features (`torch.Tensor` of shape `(M, D)`): M ≥ 2 descriptors of the training images.
        threshold (`float`, defaults to 0.5): the copy threshold on the similarity.
        **search_kwargs: passed to [`knn_search`].

    Returns:
        [`NearDuplicateResult`] with ``metric="sscd"``.
    """
    if train_features.ndim != 2 or train_features.shape[0] < 2:
        raise ValueError(f"Expected an (M, D) descriptor matrix with M >= 2, got {tuple(train_features.shape)}.")
    if not bool(torch.isfinite(train_features).all()):
        raise ValueError("The training descriptors have non-finite values.")
    knn = knn_search(train_features, train_features, k=2, metric="cosine", **search_kwargs)
    sims, indices = _nearest_others(knn.values.cpu(), knn.indices.cpu(), 1)
    sims = sims[:, 0].double()
    flagged = sims > threshold
    pairs, scores = _pairs_of(indices[:, 0], sims, flagged, lower_is_closer=False)
    return NearDuplicateResult(pairs, scores, flagged, indices[:, 0].clone(), sims, "sscd", float(threshold))
