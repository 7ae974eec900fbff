"""Figures of the memorization and pairing metrics, drawn with matplotlib's Agg canvas (no display needed).

Every function returns a ``matplotlib.figure.Figure`` and, when `path` is given, also saves it there.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .pairing import pairing_inefficiency


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    fig.tight_layout()
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path)
    return fig


def _finite(values) -> tuple[np.ndarray, int]:
    v = torch.as_tensor(values).detach().double().cpu().numpy().ravel()
    keep = np.isfinite(v)
    return v[keep], int((~keep).sum())


def _histograms(scores: Mapping[str, torch.Tensor], threshold: float, xlabel: str, title: str, bins, path) -> Figure:
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in scores.items():
        v, n_nan = _finite(values)
        label = f"{name} (n={v.size}" + (f", {n_nan} NaN)" if n_nan else ")")
        ax.hist(v, bins=bins, alpha=0.5, label=label)
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    return _finish(fig, path)


def plot_ratio_histograms(
    ratios: Mapping[str, torch.Tensor], threshold: float = 1.0 / 3.0, path: str | os.PathLike | None = None
) -> Figure:
    """Histograms of the nearest-neighbour ratio r(y) per model (003 Fig. 12), with the memorization threshold."""
    return _histograms(
        ratios, threshold, "r(y) = d(NN1) / d(NN2)", "Nearest-neighbour distance ratio", np.linspace(0, 1, 41), path
    )


def plot_similarity_histograms(
    similarities: Mapping[str, torch.Tensor], threshold: float = 0.5, path: str | os.PathLike | None = None
) -> Figure:
    """Histograms of the per-sample maximum SSCD similarity to the training set, per model."""
    return _histograms(
        similarities, threshold, "max cosine similarity to training set", "SSCD similarity", np.linspace(-0.2, 1, 49), path
    )


def _to_display(images: torch.Tensor) -> np.ndarray:
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 3:
        x = x[:, None]
    x = x.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def plot_memorized_grid(
    samples: torch.Tensor,
    train_images: torch.Tensor,
    nn_indices: torch.Tensor,
    scores: torch.Tensor,
    *,
    num: int = 8,
    most_memorized: str = "lowest",
    path: str | os.PathLike | None = None,
) -> Figure:
    r"""
    The most memorized samples beside their nearest and second-nearest training images.

    Args:
        samples (`torch.Tensor` of shape `(N, C, H, W)`): generated images in [0, 1].
        train_images (`torch.Tensor` of shape `(M, C, H, W)`): training images in [0, 1].
        nn_indices (`torch.Tensor` of shape `(N, 2)`): nearest and second-nearest training indices.
        scores (`torch.Tensor` of shape `(N,)`): r(y) (``most_memorized="lowest"``) or a similarity
            (``"highest"``); NaN samples are skipped.
        num (`int`, defaults to 8): rows to show.
        path (`str`, *optional*): where to save.
    """
    s = torch.as_tensor(scores).detach().double().cpu()
    valid = (~torch.isnan(s)).nonzero().squeeze(1)
    order = valid[torch.argsort(s[valid], descending=most_memorized == "highest")][:num]
    rows = max(1, len(order))
    fig = _new_figure(4.5, 1.6 * rows)
    cmap = "gray" if samples.shape[1] == 1 else None
    for r, i in enumerate(order.tolist()):
        nn1, nn2 = nn_indices[i, 0].item(), nn_indices[i, 1].item()
        panels = [(samples[i], f"sample {i}\nscore {s[i]:.3f}"), (train_images[nn1], f"NN1 #{nn1}"), (train_images[nn2], f"NN2 #{nn2}")]
        for c, (img, title) in enumerate(panels):
            ax = fig.add_subplot(rows, 3, 3 * r + c + 1)
            ax.imshow(_to_display(img[None])[0], cmap=cmap, vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    return _finish(fig, path)


def plot_near_duplicates(
    train_images: torch.Tensor,
    pairs: torch.Tensor,
    scores: torch.Tensor,
    *,
    num: int = 8,
    path: str | os.PathLike | None = None,
) -> Figure:
    r"""
    Near-duplicate pairs of a training set side by side (from [`pixel_near_duplicates`] or [`sscd_near_duplicates`]).

    Args:
        train_images (`torch.Tensor` of shape `(M, C, H, W)`): training images in [0, 1].
        pairs (`torch.Tensor` of shape `(P, 2)`): index pairs, most similar first.
        scores (`torch.Tensor` of shape `(P,)`): the pairs' ratios or similarities.
        num (`int`, defaults to 8): pairs to show.
        path (`str`, *optional*): where to save.
    """
    shown = torch.as_tensor(pairs)[:num].tolist()
    rows = max(1, len(shown))
    fig = _new_figure(3.2, 1.6 * rows)
    cmap = "gray" if train_images.shape[1] == 1 else None
    for r, ((i, j), score) in enumerate(zip(shown, torch.as_tensor(scores)[:num].tolist())):
        for c, k in enumerate((i, j)):
            ax = fig.add_subplot(rows, 2, 2 * r + c + 1)
            ax.imshow(_to_display(train_images[k][None])[0], cmap=cmap, vmin=0, vmax=1)
            ax.set_title(f"#{k}" + (f"  score {score:.3f}" if c == 0 else ""), fontsize=7)
            ax.axis("off")
    return _finish(fig, path)


def plot_pairing_pca(
    teacher_multistep: torch.Tensor,
    teacher_onestep: torch.Tensor,
    student: torch.Tensor,
    *,
    labels: Sequence[str] = ("teacher Φ_8(z)", "teacher Φ_1(z)", "student G(z)"),
    path: str | os.PathLike | None = None,
) -> Figure:
    """(Φ_8, Φ_1, G) triplets projected on the two leading principal components of Φ_8 (003 Fig. 1); one colour
    per noise seed, shared across panels."""
    sets = [torch.as_tensor(x).detach().double().cpu().reshape(x.shape[0], -1) for x in (teacher_multistep, teacher_onestep, student)]
    mean = sets[0].mean(0)
    # Leading right singular vectors of the centred Φ_8 outputs.
    _, _, vh = torch.linalg.svd(sets[0] - mean, full_matrices=False)
    basis = vh[:2].T
    colours = np.arange(sets[0].shape[0])
    fig = _new_figure(12.0, 4.0)
    for p, (x, label) in enumerate(zip(sets, labels)):
        proj = ((x - mean) @ basis).numpy()
        ax = fig.add_subplot(1, 3, p + 1)
        ax.scatter(proj[:, 0], proj[:, 1], c=colours, cmap="hsv", s=4)
        ax.set_title(label)
        ax.set_xlabel("PC1 of Φ_8")
        ax.set_ylabel("PC2 of Φ_8")
    return _finish(fig, path)


def plot_distance_heatmap(
    teacher: torch.Tensor, student: torch.Tensor, *, num: int = 100, path: str | os.PathLike | None = None
) -> Figure:
    """Squared L2 distances between the first `num` teacher and student outputs, with the optimal assignment of
    that subset boxed in red; the diagonal is the distillation pairing (003 Fig. 3)."""
    t, s = teacher[:num], student[:num]
    result = pairing_inefficiency(t, s, return_cost=True)
    cost = result.cost.numpy()
    fig = _new_figure(6.0, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(cost, cmap="viridis", origin="upper")
    fig.colorbar(im, ax=ax, label="‖Φ_K(z_i) − G(z_j)‖²")
    for i, j in enumerate(result.assignment):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=0.8))
    ax.set_xlabel("student index j")
    ax.set_ylabel("teacher index i")
    ax.set_title(f"ΔE = {result.delta_e:.4g} on these {cost.shape[0]} pairs")
    return _finish(fig, path)


def plot_copying_diagnostics(
    delta: torch.Tensor, mean_train_distance: torch.Tensor, *, path: str | os.PathLike | None = None
) -> Figure:
    """δ(z) against D(z) (003 Fig. 5); points below the dashed line are aligned with the teacher target."""
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(torch.as_tensor(mean_train_distance).cpu().numpy(), torch.as_tensor(delta).cpu().numpy(), s=4)
    ax.axhline(0.0, color="red", linestyle="--")
    ax.set_xlabel("D(z): mean distance of Φ_K(z) to the training set")
    ax.set_ylabel("δ(z) = ‖G − Φ_K‖ − ‖Φ_1 − Φ_K‖")
    return _finish(fig, path)


__all__ = [
    "plot_copying_diagnostics",
    "plot_distance_heatmap",
    "plot_memorized_grid",
    "plot_near_duplicates",
    "plot_pairing_pca",
    "plot_ratio_histograms",
    "plot_similarity_histograms",
]


def plot_copied_prompts(
    generated: torch.Tensor,
    training: torch.Tensor,
    prompts: Sequence[str],
    scores: Sequence[float],
    *,
    path: str | os.PathLike | None = None,
    score_label: str = "SSCD",
) -> Figure:
    r"""
    The most-copied prompts of a text-to-image model: each generation beside the training image of its prompt.

    Args:
        generated (`torch.Tensor` of shape `(K, C, H, W)`): one generation per row (the most similar seed), in [0, 1].
        training (`torch.Tensor` of shape `(K, C, H, W)`): the training image of each row's prompt, in [0, 1].
        prompts (`Sequence[str]`): each row's prompt.
        scores (`Sequence[float]`): each row's score of the generation against the training image (SSCD similarity,
            or the pixel own-image L2 ratio).
        path (`str`, *optional*): where to save.
        score_label (`str`, defaults to `"SSCD"`): the score's name in the titles.
    """
    rows = max(1, len(prompts))
    fig = _new_figure(5.0, 2.0 * rows)
    cmap = "gray" if generated.shape[1] == 1 else None
    for r, (prompt, score) in enumerate(zip(prompts, scores)):
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        for c, (img, title) in enumerate(((generated[r], f"generated ({score_label} {score:.3f})"),
                                          (training[r], "training image"))):
            ax = fig.add_subplot(rows, 2, 2 * r + c + 1)
            ax.imshow(_to_display(img[None])[0], cmap=cmap, vmin=0, vmax=1)
            ax.set_title(title if c else f"{short}\n{title}", fontsize=7)
            ax.axis("off")
    return _finish(fig, path)
