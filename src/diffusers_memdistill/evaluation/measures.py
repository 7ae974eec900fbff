"""The measures of an audit, each declared once with the inputs it needs.

A measure has two stages. The per-sample stage runs shard by shard, on whichever process holds the shard, and writes
its per-sample outputs (nearest neighbours, descriptors, scores) beside the samples; the summary stage reads those
outputs for every sample and turns them into the statistics of ``metrics.json``. The per-sample outputs of a shard
depend only on the shard, never on how many processes shared the work, so an audit on N processes gives the numbers
of an audit on one.

| measure  | needs                           | per sample                              | tasks                |
|----------|---------------------------------|-----------------------------------------|----------------------|
| l2       | the training set's pixels       | NN₁, NN₂ and their distances (000)      | image, text-to-image |
| sscd     | SSCD weights, per preprocessing | descriptor, most similar training image | image, text-to-image |
| fid      | Inception weights               | Inception features                      | image                |
| fd_pixel | the training set's pixels       | the pixels                              | image                |
| clip     | CLIP weights, the prompts       | CLIP score with the prompt              | text-to-image        |
| pairing  | a teacher's Φ_K and Φ_1 targets | the samples themselves (003 Def. 3.1)   | image                |

Text-to-image audits add, from the same per-sample outputs, the own-image variants (``l2_own``: ρ, ``sscd_own``:
similarity to the prompt's own image) and the per-prompt rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

L2_THRESHOLD = 1.0 / 3.0
PAIRING_TEACHER_STEPS = 8  # Phi_K of 003 Def. 3.1, K = 8
FID_MIN_SAMPLES = 2048  # fewer samples than Inception features: a rank-deficient covariance, FID biased upwards
NUM_LISTED_DUPLICATES = 10
NEAR_DUPLICATES_MAX_IMAGES = 100_000  # an all-pairs search of the training set beyond this is a job of its own


@dataclass(frozen=True)
class Measure:
    """One measure: its name in ``--metrics`` and ``metrics.json``, what it needs and which audits it applies to."""

    name: str
    needs: tuple
    tasks: tuple
    description: str


MEASURES = {m.name: m for m in (
    Measure("l2", ("training set",), ("image", "text-to-image"),
            "pixel L2 ratio ‖y − NN₁‖ / ‖y − NN₂‖ < 1/3 over the training set (000 §4.1); own-image ρ for prompts"),
    Measure("sscd", ("SSCD weights",), ("image", "text-to-image"),
            "SSCD cosine similarity to the most similar training image > threshold (000 §4.1); own image for prompts"),
    Measure("fid", ("Inception weights",), ("image",), "FID against the training set"),
    Measure("fd_pixel", ("training set",), ("image",), "Fréchet distance of raw pixels to the training set (not FID)"),
    Measure("clip", ("CLIP weights", "prompts"), ("text-to-image",), "CLIP score of each generation with its prompt"),
    Measure("pairing", ("a teacher's ODE map", "a student"), ("image",),
            "pairing inefficiency ΔE of students against the teacher's 8-step map Φ_8 (003 Def. 3.1), δ(z), D(z)"),
)}
METRICS = tuple(MEASURES)
DEFAULT_METRICS = {"image": ("l2", "sscd", "fid", "fd_pixel", "pairing"), "text-to-image": ("clip", "sscd")}


def check_metrics(metrics, task: str) -> tuple:
    """The metrics as a tuple; a clear error for unknown ones or ones that do not apply to the task."""
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in MEASURES]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose among {', '.join(METRICS)}.")
    if task == "text-to-image":
        wrong = [m for m in metrics if task not in MEASURES[m].tasks]
        if wrong:
            raise ValueError(f"The text-to-image audit measures "
                             f"{', '.join(m for m in METRICS if task in MEASURES[m].tasks)}; not {wrong}.")
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Text-to-image: own images and prompts.


def own_image_similarity(features: torch.Tensor, own_features: torch.Tensor, owners: list,
                         samples_per_prompt: int) -> torch.Tensor:
    r"""Per generation, the largest cosine similarity of its descriptor to those of its prompt's own images.

    Args:
        features (`torch.Tensor` of shape `(P·S, D)`): descriptors of the generations, prompt-major.
        own_features (`torch.Tensor` of shape `(M, D)`): descriptors of the prompts' images.
        owners (`list[list[int]]`): for each of the P prompts, its rows of ``own_features``.
        samples_per_prompt (`int`): S.

    Returns:
        `torch.Tensor` of shape `(P·S,)`; NaN where a descriptor is not finite.
    """
    g = torch.nn.functional.normalize(features.double(), dim=1)
    o = torch.nn.functional.normalize(own_features.double(), dim=1)
    sims = g @ o.T
    mask = torch.zeros_like(sims, dtype=torch.bool)
    for p, rows in enumerate(owners):
        mask[p * samples_per_prompt:(p + 1) * samples_per_prompt, rows] = True
    out = sims.masked_fill(~mask, float("-inf")).amax(1)
    out[~torch.isfinite(features).all(1)] = float("nan")
    return out.float()


def score_stats(scores: torch.Tensor, threshold: float) -> dict:
    """Statistics of a similarity (copies above the threshold)."""
    from ..metrics import summarize_scores

    return {"threshold": threshold, **summarize_scores(scores, scores > threshold).to_dict()}


def clip_stats(scores: torch.Tensor) -> dict:
    """Mean, min and max of the finite CLIP scores, and how many there are."""
    finite = scores[torch.isfinite(scores)].double()
    if not finite.numel():
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "num_samples": 0}
    return {"mean": float(finite.mean()), "min": float(finite.min()), "max": float(finite.max()),
            "num_samples": int(finite.numel())}


def per_prompt_rows(prompts, s, own=None, nearest=None, nn_index=None, clip=None, threshold=0.5, l2=None) -> list:
    """One row per prompt over its S seeds: own-image ρ and the nearest ratio (l2), own and nearest SSCD similarity
    (the first preprocessing), CLIP."""
    rows = []
    for p, prompt in enumerate(prompts):
        window = slice(p * s, (p + 1) * s)
        row = {"prompt": prompt}
        if l2 is not None:
            rho, r, r_index = (t[window] for t in l2)
            best = int(torch.nan_to_num(rho, nan=float("inf")).argmin())
            row.update({"l2_own_min": float(rho.min()), "l2_own_mean": float(rho.mean()),
                        "l2_fraction_copied": float((rho < L2_THRESHOLD).double().mean()),
                        "l2_copied": bool((rho < L2_THRESHOLD).any()), "l2_best_seed": best,
                        "l2_nearest_min": float(r.min()), "l2_nearest_index_of_best": int(r_index[best])})
        if own is not None:
            o = own[window]
            best = int(torch.nan_to_num(o, nan=-2.0).argmax())
            row.update({"own_mean": float(o.mean()), "own_max": float(o.max()),
                        "fraction_above": float((o > threshold).double().mean()), "copied": bool((o > threshold).any()),
                        "best_seed": best, "nearest_max": float(nearest[window].max()),
                        "nearest_index_of_best": int(nn_index[window][best])})
        if clip is not None:
            row["clip_mean"] = float(clip[window].mean())
        rows.append(row)
    return rows


__all__ = ["DEFAULT_METRICS", "FID_MIN_SAMPLES", "L2_THRESHOLD", "MEASURES", "METRICS", "Measure",
           "NEAR_DUPLICATES_MAX_IMAGES", "NUM_LISTED_DUPLICATES", "PAIRING_TEACHER_STEPS", "check_metrics",
           "clip_stats", "own_image_similarity", "per_prompt_rows", "score_stats"]
