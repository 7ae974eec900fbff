"""Pairing inefficiency and copying diagnostics of few-step students (003, Def. 3.1 and §4.2).

For noises z₁…z_N, teacher outputs Φ_K(z_i) and student outputs G(z_i) (same noise, same index):

- E_DT = (1/N) Σᵢ ‖Φ_K(zᵢ) − G(zᵢ)‖²                     (Eq. 5, Monte Carlo)
- E_OT = min over permutations π of (1/N) Σᵢ ‖Φ_K(zᵢ) − G(z_π(i))‖²  (Eq. 4 for equal-size empirical measures,
  an assignment problem solved exactly by ``scipy.optimize.linear_sum_assignment``)
- ΔE = E_DT / E_OT − 1 ≥ 0                                  (Eq. 6); ΔE ≈ 0 means the student copies the
  teacher's noise–data pairing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def _as_rows(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu().double()
    t = t.reshape(t.shape[0], -1)
    bad = ~torch.isfinite(t).all(1)
    if bad.any():
        raise ValueError(
            f"`{name}` has {int(bad.sum())} non-finite rows (first at index {int(bad.nonzero()[0])}); "
            "the assignment is undefined with NaN samples."
        )
    return t


def squared_distance_matrix(a: torch.Tensor, b: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``(N, M)`` in float64, computed from differences in row chunks."""
    a, b = _as_rows(a, "a"), _as_rows(b, "b")
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
    step = max(1, min(chunk_size, 2**24 // max(1, b.shape[0] * a.shape[1])))
    for s in range(0, a.shape[0], step):
        out[s : s + step] = (a[s : s + step, None, :] - b[None]).square().sum(-1)
    return out


@dataclass
class PairingResult:
    r"""
    Output of [`pairing_inefficiency`].

    Args:
        delta_e (`float`): ΔE = E_DT/E_OT − 1 (0 when both energies are 0, inf when only E_OT is 0).
        e_dt (`float`): mean squared distance of the given pairing.
        e_ot (`float`): mean squared distance of the optimal pairing.
        assignment (`np.ndarray` of shape `(N,)`): the optimal pairing, teacher i ↔ student ``assignment[i]``.
        fraction_fixed (`float`): share of indices the optimal pairing leaves in place (``assignment[i] == i``).
        cost (`torch.Tensor` of shape `(N, N)`, *optional*): the squared distances, when requested.
    """

    delta_e: float
    e_dt: float
    e_ot: float
    assignment: np.ndarray
    fraction_fixed: float
    cost: torch.Tensor | None = None

    def to_dict(self) -> dict:
        return {
            "delta_e": self.delta_e,
            "e_dt": self.e_dt,
            "e_ot": self.e_ot,
            "fraction_fixed": self.fraction_fixed,
            "num_samples": int(self.assignment.shape[0]),
        }


def pairing_inefficiency(
    teacher: torch.Tensor, student: torch.Tensor, *, return_cost: bool = False
) -> PairingResult:
    r"""
    Pairing inefficiency ΔE of a student against the teacher (003 Def. 3.1), with the exact optimal assignment.

    Args:
        teacher (`torch.Tensor` of shape `(N, ...)`):
            Teacher outputs Φ_K(z_i) (003 uses K = 8 Heun-corrected steps, N = 1000).
        student (`torch.Tensor` of shape `(N, ...)`):
            Student outputs G(z_i) for the same noises, in the same order.
        return_cost (`bool`, defaults to `False`):
            Keep the ``(N, N)`` cost matrix in the result (for the heatmap figure).

    Returns:
        [`PairingResult`]. The assignment is O(N³); N of a few thousand takes seconds.
    """
    if teacher.shape != student.shape:
        raise ValueError(f"Teacher and student outputs differ in shape: {tuple(teacher.shape)} vs {tuple(student.shape)}.")
    cost = squared_distance_matrix(teacher, student)
    cost_np = cost.numpy()
    n = cost_np.shape[0]
    rows, cols = linear_sum_assignment(cost_np)
    assignment = np.empty(n, dtype=np.int64)
    assignment[rows] = cols
    # Both energies from the same cost matrix, so E_OT <= E_DT holds exactly (identity is a permutation).
    e_dt = float(np.trace(cost_np) / n)
    e_ot = float(cost_np[rows, cols].sum() / n)
    if e_ot > 0:
        delta = e_dt / e_ot - 1.0
    else:
        delta = 0.0 if e_dt == 0 else float("inf")
    return PairingResult(
        delta_e=delta,
        e_dt=e_dt,
        e_ot=e_ot,
        assignment=assignment,
        fraction_fixed=float((assignment == np.arange(n)).mean()),
        cost=cost if return_cost else None,
    )


@dataclass
class CopyingDiagnostics:
    r"""
    Output of [`copying_diagnostics`] (003 Fig. 5).

    Args:
        delta (`torch.Tensor` of shape `(N,)`): δ(z) = ‖G(z) − Φ_K(z)‖ − ‖Φ_1(z) − Φ_K(z)‖; negative means the
            student moved towards the teacher's target beyond the one-step teacher.
        mean_train_distance (`torch.Tensor` of shape `(N,)`): D(z) = mean over x in the training set of ‖Φ_K(z) − x‖.
    """

    delta: torch.Tensor
    mean_train_distance: torch.Tensor


def copying_diagnostics(
    teacher_multistep: torch.Tensor,
    teacher_onestep: torch.Tensor,
    student: torch.Tensor,
    train: torch.Tensor,
    *,
    chunk_size: int = 4096,
) -> CopyingDiagnostics:
    r"""
    Per-noise copying diagnostics δ(z) and D(z) of 003 §4.2.

    Args:
        teacher_multistep (`torch.Tensor` of shape `(N, ...)`): Φ_K(z).
        teacher_onestep (`torch.Tensor` of shape `(N, ...)`): Φ_1(z).
        student (`torch.Tensor` of shape `(N, ...)`): G(z).
        train (`torch.Tensor` of shape `(M, ...)`): the training set.
        chunk_size (`int`, defaults to 4096): training rows per distance block.

    Returns:
        [`CopyingDiagnostics`], float64.
    """
    phi_k = _as_rows(teacher_multistep, "teacher_multistep")
    phi_1 = _as_rows(teacher_onestep, "teacher_onestep")
    g = _as_rows(student, "student")
    if not (phi_k.shape == phi_1.shape == g.shape):
        raise ValueError(f"Shapes differ: {tuple(phi_k.shape)}, {tuple(phi_1.shape)}, {tuple(g.shape)}.")
    delta = (g - phi_k).norm(dim=1) - (phi_1 - phi_k).norm(dim=1)
    train_flat = torch.as_tensor(train).reshape(train.shape[0], -1)
    if train_flat.shape[1] != phi_k.shape[1]:
        raise ValueError(f"Training rows have {train_flat.shape[1]} values, samples {phi_k.shape[1]}.")
    total = torch.zeros(phi_k.shape[0], dtype=torch.float64)
    phi_sq = phi_k.square().sum(1, keepdim=True)
    for s in range(0, train_flat.shape[0], chunk_size):
        x = train_flat[s : s + chunk_size].double()
        # float64 expansion: relative error ~1e-16·‖·‖², negligible for an average of distances.
        sq = (phi_sq + x.square().sum(1)[None] - 2.0 * phi_k @ x.T).clamp_min(0)
        total += sq.sqrt().sum(1)
    return CopyingDiagnostics(delta=delta, mean_train_distance=total / train_flat.shape[0])
