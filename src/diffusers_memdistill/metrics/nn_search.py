r"""Exact k-nearest-neighbour search, fast on a GPU, in bounded memory whatever the size of the reference set.

Method
------
The reference set (e.g. 1M training images) is streamed in chunks whose sizes derive from a memory budget: no
``num_queries × num_reference`` matrix is ever formed. Three steps:

1. **Candidates from matrix products.** Both sets are shifted by ``c``, the queries' float32 mean (distances are
   translation invariant, any ``c`` would do; this one makes the norms, hence the error bound below, small). For
   ``metric="l2"`` the score ``s(q, r) = ‖r̂‖² − 2 q̂·r̂`` (that is ``‖q̂ − r̂‖² − ‖q̂‖²``) of a block of queries
   and a chunk of the reference is one float32 ``addmm``; for ``metric="cosine"`` it is ``−q̂·r̂`` of float32
   unit vectors. ``torch.topk`` keeps the ``m`` smallest scores of each query, merged chunk after chunk. Everything
   stays on the device and the loop never waits for the host (but to copy the chunks of a reference kept on the
   CPU); the host reads one flag after the pass and one mask after the certificate.
2. **Exact re-ranking.** The candidates' distances are recomputed from the differences ``q − r`` in float64
   (differences, squares, sum and square root fused in ``cdist`` without its matrix-product expansion; cosine: from
   float64 unit vectors) and sorted by (value, index), so ties go to the lower reference
   index and the reported float32 distance is the float64 value rounded once: correctly rounded but for values
   within ~D·1e-16 (relative) of a rounding boundary (for inputs exact in float64: any float dtype, integers
   below 2⁵³).
3. **Certificate.** A forward error bound of step 1 proves, for most queries, that no reference outside the ``m``
   candidates can come before the ``k``-th one. Queries it cannot certify are searched again by the float64
   threshold pass below, which is exact by construction.

Why the certificate is rigorous (``metric="l2"``)
-------------------------------------------------
Let ``u = 2⁻²⁴``, ``D`` the row length, ``a = q − c`` and ``b = r − c`` (exact), ``q̂ = fl(a)``, ``r̂ = fl(b)``
(one float32 rounding per entry, so ``‖q̂ − a‖ ≤ u₁‖a‖`` with ``u₁ = 1.01 (u + 2u₆₄)``), ``A = ‖q̂‖``,
``B = ‖r̂‖`` (A from a float64 sum) and ``R ≥ max_r ‖r̂‖`` (the largest ρ below, enlarged by θ). The float32
kernels compute:

* ``ρ(r) = fl(‖r̂‖²)`` from float32 partial norms of at most 128 entries summed in float64:
  ``|ρ − B²| ≤ θ B²`` with ``θ = 1.01 (128 + 4) u``;
* ``p̃ = fl(q̂·r̂)`` by the matrix product: ``|p̃ − q̂·r̂| ≤ γ_D A B`` with ``γ_D = D u / (1 − D u)``, whatever the
  summation order, blocking or FMA use of the BLAS (TF32 and reduced-precision products are switched off);
* ``s̃ = fl(ρ − 2 p̃)`` (the factor −2 is applied to the queries, exactly): ``|s̃ − (ρ − 2p̃)| ≤ u |ρ − 2p̃|``.

So ``|s̃ − t| ≤ E(A, B) = θB² + 2γ_D AB + u((1 + θ)B² + 2(1 + γ_D)AB)`` (plus slacks for the float64 evaluation of
all this and for gradual underflow, which the relative model misses), where ``t = ‖q̂ − r̂‖² − A²``. E grows
with B, so ``E_q = E(A, R)`` bounds the error for every reference. A reference left out of the ``m`` candidates has
``s̃(r) ≥ s̃_m``, the largest kept score (``topk`` and the merges only ever drop a value when ``m`` kept values are
no larger), hence ``‖q̂ − r̂‖² ≥ G = s̃_m + A² − E_q`` and, as
``‖(q̂ − r̂) − (a − b)‖ ≤ u₁(‖a‖ + ‖b‖)``, its true distance is at least ``ℓ_q = √max(G, 0) − u₁(A + R)/(1 − u₁)``.
The recomputed distances ``d̂`` are within ``ξ = 1.01 (D + 4) u₆₄`` (relative) of the true ones (float64
differences and squares, a float64 sum of non-negative terms, a square root). So when ``d̂_k < (1 − ξ) ℓ_q``, every
reference outside the candidates has a recomputed distance strictly above the ``k``-th candidate's: the candidates'
top ``k`` by (d̂, index) is the global one, ties and near-ties included. Queries failing this test are the only ones
searched again. Rows whose float32 squares overflow make ``R`` infinite, like NaN or infinite rows; when a rescan
finds no NaN or infinity in the reference, every query goes to the float64 pass instead.

Cosine: with ``n(x) = x / max(‖x‖, 1e-12)`` (``F.normalize``), the float32 unit vectors carry
``‖q̂ − n(q)‖ ≤ u₁ = 1.01 (u + (D + 4) u₆₄)``, so the computed score is within
``E = γ_D (1 + u₁)² + u₁ (2 + u₁)`` of ``−n(q)·n(r)``, the float64 recomputation within ``ξ = 1.01 (2D + 8) u₆₄``,
and the test reads ``κ̂_k < s̃_m − E − ξ`` with ``κ̂`` the recomputed negated similarities.

The float64 pass
----------------
For the uncertified queries (in batches sized to the budget) the reference is streamed again and scored by
float64 matrix products: the same bounds with ``u₆₄ = 2⁻⁵³`` for ``u`` and each reference's own norm for ``R``,
about 10⁻⁹ times tighter. Every reference whose lower bound on ``d̂`` does not exceed the running ``k``-th
recomputed value has its distance recomputed exactly and merged by (d̂, index). That value starts at the
candidates' ``d̂_k`` enlarged by ``2ξ`` (two evaluations of one distance differ by at most ``2ξ``), an upper bound of
the final one as this pass recomputes it, and only decreases. No reference that could belong to the answer is
skipped, so the result is exact whatever the ties; the cost is that of the candidates pass in float64 plus the
exact distances of the references inside the band (a handful, unless there are many exact ties).

Exact recomputations are always evaluated in blocks of one fixed shape (padded), so that a pair's value does not
depend on how the pairs happened to be batched (device reductions may order sums by shape): bitwise-equal
reference rows get bitwise-equal distances and tie by index.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

_U32 = 2.0**-24  # unit roundoff of float32
_U64 = 2.0**-53  # unit roundoff of float64
_NORM_BLOCK = 128  # float32 partial sums of squares hold at most this many terms (see the bound θ)
_NORMALIZE_EPS = 1e-12  # as F.normalize
# Accelerators want large products; on the CPU larger temporaries only add cache misses and page faults.
_DEFAULT_MEMORY_BUDGET = {"cpu": 2**27, "other": 2**30}
_DEFAULT_QUERY_CHUNK = 8192
_CPU_PAIR_BLOCK = 1024  # pairs recomputed at once on the CPU (blocks under ~32 MB avoid fresh page-mapped buffers)
_FALLBACK_PAIR_BLOCK = 512
# Dtypes whose values convert to float32 exactly: one rounding when the centre is subtracted.
_FLOAT32_EXACT = (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16, torch.bool)
# Working bytes per element, used to size the chunks (device copies, float32/float64 temporaries).
_PAIR_BYTES = {"l2": 40, "cosine": 64}
_SCORE_BYTES = 8  # float32 score block and topk/addmm workspace
_FALLBACK_SCORE_BYTES = 64  # float64 scores, bounds and masks of the float64 pass


@dataclass
class KNNResult:
    r"""
    Output of [`knn_search`].

    Args:
        values (`torch.Tensor` of shape `(num_queries, k)`, float32):
            Euclidean distances in increasing order (``metric="l2"``) or cosine similarities in decreasing order
            (``metric="cosine"``), recomputed in float64 and rounded once. NaN for queries with non-finite entries.
        indices (`torch.Tensor` of shape `(num_queries, k)`, int64):
            Reference indices of the neighbours, ties broken by the lower index; -1 for queries with non-finite
            entries.
        metric (`str`):
            ``"l2"`` or ``"cosine"``.
        num_refined (`int`):
            Queries whose float32 candidates could not be certified and were searched again in float64.
        num_exhaustive (`int`):
            Of those, queries whose float64 search recomputed more than ``num_candidates`` distances: ties or
            near-ties at the ``k``-th neighbour, or float32 candidates far from the answer.
    """

    values: torch.Tensor
    indices: torch.Tensor
    metric: str
    num_refined: int = 0
    num_exhaustive: int = 0


@dataclass(frozen=True)
class _ChunkPlan:
    query_chunk: int
    reference_chunk: int
    pair_block: int


@contextlib.contextmanager
def _ieee_fp32_matmul():
    """Float32 products in IEEE float32 (no TF32/bf16 shortcuts), so that they obey the error bound used here."""
    try:
        previous = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller mixed the legacy and per-backend precision APIs: use the latter
        previous = None
    if previous is not None:
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
        return
    backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value


def _flatten(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"`{name}` must hold at least one row, got shape {tuple(x.shape)}.")
    return x.reshape(x.shape[0], -1)


def _rows(x: torch.Tensor, start: int, stop: int, device) -> torch.Tensor:
    """Rows ``start:stop`` of `x`, flattened and on `device` (a view when possible: the whole set is never copied)."""
    return x[start:stop].reshape(min(stop, x.shape[0]) - start, -1).to(device)


def _gather_rows(x: torch.Tensor, index: torch.Tensor, device) -> torch.Tensor:
    return x[index.to(x.device)].reshape(index.shape[0], -1).to(device)


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u) if n * u < 0.5 else math.inf


def _centered_f32(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``fl32(x − c)``: one rounding for dtypes exact in float32, ``u + 2 u₆₄`` through float64 otherwise."""
    if x.dtype == torch.float32:
        return x - center
    if x.dtype in _FLOAT32_EXACT:
        return x.to(torch.float32) - center
    return (x.to(torch.float64) - center.to(torch.float64)).to(torch.float32)


def _unit64(x: torch.Tensor) -> torch.Tensor:
    """Rows (last dimension) divided by ``max(‖x‖, 1e-12)`` (``F.normalize``) in float64."""
    x = x.to(torch.float64)
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_NORMALIZE_EPS)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared row norms of a float32 matrix as float64: float32 norms of blocks of ≤ 128 entries, squared and summed
    in float64 (relative error ≤ (128 + 4) u) without a float64 copy of `x`."""
    n, d = x.shape
    full = d // _NORM_BLOCK
    parts = []
    if full:
        parts.append(torch.linalg.vector_norm(x[:, : full * _NORM_BLOCK].reshape(n, full, _NORM_BLOCK), dim=2))
    if d % _NORM_BLOCK:
        parts.append(torch.linalg.vector_norm(x[:, full * _NORM_BLOCK :], dim=1, keepdim=True))
    partial = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    return partial.to(torch.float64).square().sum(1)


def _l2_error_coefficients(dim: int, u: float, theta: float) -> tuple[float, float, float]:
    """``(c_bb, c_ab, c_aa)`` with ``E(A, B) = c_bb B² + c_ab A B + c_aa A²`` bounding |s̃ − t| (module docstring) for
    products with unit roundoff `u` and squared norms within `theta`; the ``16 u₆₄ (A + B)²`` part covers the float64
    evaluation of the bound and of G."""
    gamma = _gamma(dim, u)
    slack, scale = 16 * _U64, 1 + 1e-6
    return (
        (theta + u * (1 + theta)) * scale + slack,
        (2 * gamma + 2 * u * (1 + gamma)) * scale + 2 * slack,
        slack,
    )


def _recompute_error(dim: int, metric: str) -> float:
    """ξ: relative error of a recomputed distance (L2), absolute error of a recomputed similarity (cosine)."""
    return 1.01 * ((dim + 4) if metric == "l2" else (2 * dim + 8)) * _U64


def _underflow_slack(dim: int, smallest: float) -> float:
    """Absolute error that gradual underflow may add to a length-`dim` float product/sum beyond the relative model
    (each rounding to a subnormal errs by at most half the smallest spacing `smallest`)."""
    return 4 * (dim + 8) * smallest


def _certify_l2(d_k, s_m, a_sq, r_max_sq, dim: int) -> torch.Tensor:
    """True where no non-candidate can precede the k-th candidate: ``d̂_k < (1 − ξ) ℓ_q`` (module docstring).

    `d_k`: recomputed k-th distances; `s_m`: largest kept float32 scores; `a_sq`: ‖q̂‖²; `r_max_sq`: the
    largest float64 ‖r̂‖² of the pass.
    """
    u1 = 1.01 * (_U32 + 2 * _U64)
    theta = 1.01 * (_NORM_BLOCK + 4) * _U32
    a_norm = a_sq.sqrt()
    r_max = (r_max_sq * (1 + 2 * theta)).sqrt()  # ≥ max ‖r̂‖: r_max_sq is within θ of the largest ‖r̂‖²
    c_bb, c_ab, c_aa = _l2_error_coefficients(dim, _U32, theta)
    c_aa += 1.01 * (dim + 4) * _U64  # A² is itself a float64 sum
    err = c_bb * r_max.square() + c_ab * a_norm * r_max + c_aa * a_sq + _underflow_slack(dim, 2.0**-149)
    rho = u1 / (1 - u1) * (a_norm + r_max) * (1 + 1e-6) + 2 * math.sqrt(dim) * 2.0**-149
    low = (s_m + a_sq - err).clamp_min(0).sqrt() - rho
    return d_k < (1 - _recompute_error(dim, "l2")) * low


def _certify_cosine(k_k, s_m, dim: int) -> torch.Tensor:
    """True where ``κ̂_k < s̃_m − E − ξ`` (module docstring); `k_k`: recomputed k-th keys (negated similarities)."""
    u1 = 1.01 * (_U32 + (dim + 4) * _U64)
    bound = (_gamma(dim, _U32) * (1 + u1) ** 2 + u1 * (2 + u1)) * (1 + 1e-6) + _underflow_slack(dim, 2.0**-149)
    return k_k < s_m - bound - _recompute_error(dim, "cosine")


def _split_budget(
    budget: int, row_bytes: int, score_bytes: int, num_queries: int, num_rows: int, q_cap, r_cap, query_bytes: int = 0
):
    """Query and reference chunk sizes with ``qc·query_bytes + rc·row_bytes + qc·rc·score_bytes ≤ budget`` (at least
    one row each)."""
    qc = max(1, min(num_queries, q_cap))
    while True:
        rc = max(1, min(num_rows, r_cap, (budget - qc * query_bytes) // (row_bytes + score_bytes * qc)))
        if qc == 1 or rc >= min(num_rows, qc):  # keep the blocks roughly square when the budget is tight
            return qc, rc
        qc = (qc + 1) // 2


def _plan_chunks(
    num_queries: int,
    num_reference: int,
    dim: int,
    num_candidates: int,
    metric: str,
    memory_budget: int,
    reference_dtype: torch.dtype = torch.float32,
    query_chunk_size: int | None = None,
    reference_chunk_size: int | None = None,
    max_refine_elements: int | None = None,
) -> _ChunkPlan:
    """Chunk sizes of the candidates pass and of the exact recomputation, derived from `memory_budget` (bytes)."""
    # Per reference element: the device copy, then float32 rows (through float64 temporaries for the unit vectors
    # and for dtypes not exact in float32).
    if metric == "cosine":
        extra = 20
    else:
        extra = 4 if reference_dtype == torch.float32 else 8 if reference_dtype in _FLOAT32_EXACT else 20
    qc, rc = _split_budget(
        memory_budget,
        dim * (reference_dtype.itemsize + extra),
        _SCORE_BYTES,
        num_queries,
        num_reference,
        query_chunk_size or _DEFAULT_QUERY_CHUNK,
        reference_chunk_size or num_reference,
    )
    pairs = memory_budget // (_PAIR_BYTES[metric] * dim)
    if max_refine_elements is not None:
        pairs = min(pairs, max_refine_elements // dim)
    return _ChunkPlan(qc, rc, max(1, min(pairs, num_queries * num_candidates)))


def _keys(q: torch.Tensor, r: torch.Tensor, metric: str) -> torch.Tensor:
    """Recomputed keys of query rows `q` (B, D) and their references `r` (B, m, D), (B, m) float64: the L2 distance
    from float64 differences (``cdist`` without the matrix-product expansion: differences, squares and their sum in
    one kernel), or the negated cosine similarity of float64 unit vectors."""
    if metric == "l2":
        q, r = q.to(torch.float64)[:, None, :], r.to(torch.float64)
        return torch.cdist(q, r, compute_mode="donot_use_mm_for_euclid_dist")[:, 0, :]
    return (_unit64(q)[:, None, :] * _unit64(r)).sum(-1).neg_()


def _candidate_keys(q_rows, cand_i, reference, metric: str, block: int, device) -> torch.Tensor:
    """Keys of each query's candidates, ``(nq, m)``, evaluated in padded blocks of exactly `block` queries, so that a
    pair's value never depends on the batching (module docstring)."""
    nq, m = cand_i.shape
    out = torch.empty((nq, m), dtype=torch.float64, device=device)
    for s in range(0, nq, block):
        q, idx = q_rows[s : s + block], cand_i[s : s + block]
        used = idx.shape[0]
        if used < block:
            q = torch.cat([q, q.new_zeros(block - used, q.shape[1])])
            idx = torch.cat([idx, idx.new_zeros(block - used, m)])
        r = _gather_rows(reference, idx.reshape(-1), device).view(block, m, -1)
        out[s : s + used] = _keys(q, r, metric)[:used]
    return out


def _pair_keys(q_rows, q_index, reference, r_index, metric: str, block: int, device) -> torch.Tensor:
    """Keys of the pairs (q_rows[q_index[j]], reference[r_index[j]]), in padded blocks of exactly `block` pairs."""
    n = q_index.shape[0]
    out = torch.empty(n, dtype=torch.float64, device=device)
    for s in range(0, n, block):
        qi, ri = q_index[s : s + block], r_index[s : s + block]
        used = qi.shape[0]
        if used < block:
            pad = torch.zeros(block - used, dtype=torch.long, device=qi.device)
            qi, ri = torch.cat([qi, pad]), torch.cat([ri, pad])
        out[s : s + used] = _keys(q_rows[qi], _gather_rows(reference, ri, device)[:, None, :], metric)[:used, 0]
    return out


def _sort_by_key_then_index(keys: torch.Tensor, indices: torch.Tensor):
    """Sorts each row by key, ties broken by the smaller index."""
    order = torch.argsort(indices, dim=1, stable=True)
    keys, indices = keys.gather(1, order), indices.gather(1, order)
    order = torch.argsort(keys, dim=1, stable=True)
    return keys.gather(1, order), indices.gather(1, order)


def _candidate_pass(q_mat, reference, prepare, m: int, plan: _ChunkPlan, device, progress: bool):
    """m smallest float32 scores per query (unsorted), their indices, and the largest reference statistic returned by
    `prepare` (max ‖r̂‖² for L2), NaN or infinite when a reference row is."""
    nq, nr = q_mat.shape[0], reference.shape[0]
    best_v = torch.full((nq, m), math.inf, device=device)
    best_i = torch.zeros((nq, m), dtype=torch.long, device=device)
    stat = torch.zeros((), dtype=torch.float64, device=device)
    qc, rc = plan.query_chunk, plan.reference_chunk
    for start in tqdm(range(0, nr, rc), desc="knn candidates", disable=not progress, leave=False):
        r_mat, bias, row_stat = prepare(_rows(reference, start, start + rc, device))
        stat = torch.maximum(stat, row_stat.max())  # both propagate NaN
        take = min(m, r_mat.shape[0])
        for qs in range(0, nq, qc):
            q = q_mat[qs : qs + qc]
            block = q @ r_mat.T if bias is None else torch.addmm(bias[None, :], q, r_mat.T)
            v, pos = torch.topk(block, take, dim=1, largest=False, sorted=False)
            v = torch.cat([best_v[qs : qs + qc], v], 1)
            i = torch.cat([best_i[qs : qs + qc], pos + start], 1)
            v, pos = torch.topk(v, m, dim=1, largest=False, sorted=False)
            best_v[qs : qs + qc], best_i[qs : qs + qc] = v, i.gather(1, pos)
    return best_v, best_i, stat


def _first_bad_row(reference: torch.Tensor, chunk: int) -> int | None:
    for start in range(0, reference.shape[0], chunk):
        ok = torch.isfinite(_rows(reference, start, start + chunk, reference.device)).all(1)
        if not ok.all():
            return start + int((~ok).nonzero()[0, 0])
    return None


def _float64_batch(q, reference, metric, k, center, upper, rc, pair_block, device, progress):
    """Exact top-k of the query rows `q` by the float64 threshold search (module docstring).

    `upper` bounds each query's final k-th key from above, as recomputed here. Returns keys, indices and the number
    of exact recomputations per query.
    """
    nb, dim = q.shape
    nr = reference.shape[0]
    if metric == "l2":
        a = q.to(torch.float64) - center.to(torch.float64)
        a_norm = torch.linalg.vector_norm(a, dim=1)
        q_mat = -2.0 * a
        u1 = 2.02 * _U64  # conversion to float64 (inputs beyond 2**53) and the subtraction
        theta = 1.01 * (dim + 4) * _U64  # float64 sums of squares
        c_bb, c_ab, c_aa = _l2_error_coefficients(dim, _U64, theta)
        # G = t + A² − E (module docstring), with E split into per-query, per-reference and product terms.
        q_term = (1 - c_aa - theta) * a_norm.square() - _underflow_slack(dim, 2.0**-1074)
        rho = u1 / (1 - u1) * (1 + 1e-6)
    else:
        q_mat = -_unit64(q)
        u1 = 1.01 * (dim + 4) * _U64
        cos_bound = _gamma(dim, _U64) * (1 + u1) ** 2 + u1 * (2 + u1) + _recompute_error(dim, "cosine")
        cos_bound = cos_bound * (1 + 1e-6) + _underflow_slack(dim, 2.0**-1074)
    xi = _recompute_error(dim, metric)
    best_v = torch.full((nb, k), math.inf, dtype=torch.float64, device=device)
    best_i = torch.full((nb, k), torch.iinfo(torch.long).max, dtype=torch.long, device=device)
    evaluated = torch.zeros(nb, dtype=torch.long, device=device)
    for start in tqdm(range(0, nr, rc), desc="knn float64 pass", disable=not progress, leave=False):
        r = _rows(reference, start, start + rc, device)
        if metric == "l2":
            b = r.to(torch.float64) - center.to(torch.float64)
            b_sq = b.square().sum(1)
            b_norm = b_sq.sqrt()
            low = torch.addmm(b_sq[None, :], q_mat, b.T)  # t = ‖b‖² − 2 a·b, then in place: a lower bound of d̂
            low += q_term[:, None]
            low -= (c_bb * b_sq)[None, :]
            low.addr_(a_norm, b_norm, alpha=-c_ab)
            low.clamp_min_(0).sqrt_()
            low -= (rho * a_norm + 2 * math.sqrt(dim) * 2.0**-1074)[:, None]
            low -= (rho * b_norm)[None, :]
            low.clamp_min_(0).mul_(1 - xi)
        else:
            low = q_mat @ _unit64(r).T
            low -= cos_bound
        mask = low <= upper[:, None]
        del low
        rows, cols = mask.nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        keys = _pair_keys(q, rows, reference, cols + start, metric, pair_block, device)
        evaluated += mask.sum(1)
        # Each query's new pairs padded into a row in increasing index; a stable sort after the kept ones (all of
        # lower index) orders by (key, index).
        slot = (mask.cumsum(1) - 1)[rows, cols]
        width = int(slot.max()) + 1
        new_v = torch.full((nb, width), math.inf, dtype=torch.float64, device=device)
        new_i = torch.full((nb, width), torch.iinfo(torch.long).max, dtype=torch.long, device=device)
        new_v[rows, slot], new_i[rows, slot] = keys, cols + start
        v, i = torch.cat([best_v, new_v], 1), torch.cat([best_i, new_i], 1)
        order = torch.argsort(v, dim=1, stable=True)[:, :k]
        best_v, best_i = v.gather(1, order), i.gather(1, order)
        upper = torch.minimum(upper, best_v[:, -1])
    return best_v, best_i, evaluated


def _float64_pass(q_rows, q_sel, reference, metric, k, center, upper, budget, pair_block, device, progress):
    """[`_float64_batch`] over batches of the queries ``q_rows[q_sel]`` sized to the memory budget."""
    dim = q_rows.shape[1]
    qc, rc = _split_budget(
        budget, dim * 24, _FALLBACK_SCORE_BYTES, q_sel.shape[0], reference.shape[0], _DEFAULT_QUERY_CHUNK,
        reference.shape[0], query_bytes=dim * 32,  # float64 copies of the batch's queries
    )
    parts = [
        _float64_batch(q_rows[q_sel[s : s + qc]], reference, metric, k, center, upper[s : s + qc], rc, pair_block,
                       device, progress)
        for s in range(0, q_sel.shape[0], qc)
    ]
    return tuple(torch.cat(p) for p in zip(*parts))


@torch.no_grad()
def knn_search(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int = 2,
    *,
    metric: str = "l2",
    query_chunk_size: int | None = None,
    reference_chunk_size: int | None = None,
    num_candidates: int | None = None,
    max_refine_elements: int | None = None,
    memory_budget: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> KNNResult:
    r"""
    Exact k nearest neighbours of each query in a reference set, fast on GPUs, in bounded memory.

    Candidates come from float32 matrix products, are re-ranked from float64 differences and certified by a
    rigorous error bound; uncertified queries are searched again in float64 (see the module docstring).

    Args:
        queries (`torch.Tensor` of shape `(num_queries, ...)`):
            Query rows; trailing dimensions are flattened (images ``(N, C, H, W)`` are fine).
        reference (`torch.Tensor` of shape `(num_reference, ...)`):
            Reference rows with the same flattened size, e.g. the training set. May stay on the CPU while the
            search runs on a GPU: it is streamed chunk by chunk (keeping it on the device is faster when it fits).
        k (`int`, defaults to 2):
            Number of neighbours.
        metric (`str`, defaults to `"l2"`):
            ``"l2"``: Euclidean distance. ``"cosine"``: cosine similarity of the rows divided by their norms (as
            ``F.normalize``). Both exact: recomputed in float64 and rounded once to float32.
        query_chunk_size (`int`, *optional*):
            Upper limit on the queries per matrix product (default: 8192, or fewer to fit `memory_budget`).
        reference_chunk_size (`int`, *optional*):
            Upper limit on the reference rows moved to the device at a time (default: as many as fit
            `memory_budget`).
        num_candidates (`int`, *optional*):
            Candidates kept per query from the float32 products; defaults to ``k + 6``. More make the certificate
            succeed more often at the price of more exact recomputations.
        max_refine_elements (`int`, *optional*):
            Upper limit on the elements of the rows gathered at once for the exact recomputation.
        memory_budget (`int`, *optional*):
            Bytes of working memory on the device (default: 1 GiB on accelerators, 128 MiB on the CPU, where
            larger blocks are no faster): chunk sizes are derived from it, so that memory does not grow with the
            reference set. Not included: the queries' own device copies (about twice their float32 size)
            and the ``(num_queries, num_candidates)`` candidate lists. At least one row per chunk is always used.
        device (`str` or `torch.device`, *optional*):
            Compute device; defaults to the device of `queries`.
        progress (`bool`, defaults to `False`):
            Show a progress bar over reference chunks.

    Returns:
        [`KNNResult`]: neighbours sorted nearest first (cosine: most similar first), ties broken by the lower
        reference index.
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f"`metric` must be 'l2' or 'cosine', got {metric!r}.")
    q_all = _flatten(queries, "queries")
    if not isinstance(reference, torch.Tensor) or reference.ndim < 1 or reference.shape[0] == 0:
        _flatten(reference, "reference")  # raises the error
    nr = reference.shape[0]
    dim = math.prod(reference.shape[1:])
    if q_all.shape[1] != dim:
        raise ValueError(
            f"Queries have {q_all.shape[1]} values per row but the reference set has {dim} "
            f"(shapes {tuple(queries.shape)} and {tuple(reference.shape)})."
        )
    if not 1 <= k <= nr:
        raise ValueError(f"`k` must be between 1 and the reference size {nr}, got {k}.")
    for name, value in (("query_chunk_size", query_chunk_size), ("reference_chunk_size", reference_chunk_size)):
        if value is not None and value < 1:
            raise ValueError(f"`{name}` must be positive, got {value}.")
    m = min(nr, num_candidates if num_candidates is not None else k + 6)
    if m < k:
        raise ValueError(f"`num_candidates` ({num_candidates}) must be at least k ({k}).")
    device = torch.device(device) if device is not None else q_all.device
    if memory_budget is None:
        budget = _DEFAULT_MEMORY_BUDGET["cpu" if device.type == "cpu" else "other"]
    else:
        budget = int(memory_budget)
    if budget < 1:
        raise ValueError(f"`memory_budget` must be a positive number of bytes, got {memory_budget}.")
    out_device = q_all.device

    finite = torch.isfinite(q_all).all(1).to(device)
    q_rows = q_all.to(device)  # original dtype, for the exact recomputation
    if not finite.all():
        q_rows = q_rows[finite]
    nq_all, nq = q_all.shape[0], q_rows.shape[0]
    values = torch.full((nq_all, k), math.nan, dtype=torch.float32, device=device)
    indices = torch.full((nq_all, k), -1, dtype=torch.long, device=device)
    if nq == 0:
        return KNNResult(values.to(out_device), indices.to(out_device), metric)
    if max_refine_elements is None and device.type == "cpu":
        max_refine_elements = _CPU_PAIR_BLOCK * dim
    plan = _plan_chunks(
        nq, nr, dim, m, metric, budget, reference.dtype, query_chunk_size, reference_chunk_size, max_refine_elements
    )

    with _ieee_fp32_matmul():
        rows = max(1, budget // (24 * dim))  # queries prepared in blocks: no float64 copy of all of them
        if metric == "l2":
            center = (q_rows if q_rows.dtype == torch.float32 else q_rows.to(torch.float32)).mean(0)  # any c will do
            q_hat = _centered_f32(q_rows, center)
            a_sq = torch.cat([b.to(torch.float64).square_().sum(1) for b in q_hat.split(rows)])  # ‖q̂‖², float64
            q_mat = q_hat.mul_(-2.0)  # exact: the product then yields −2 q̂·r̂

            def prepare(r):
                r_hat = _centered_f32(r, center)
                r_sq = _sq_norms(r_hat)
                return r_hat, r_sq.to(torch.float32), r_sq

        else:
            center = None
            q_mat = torch.cat([_unit64(b).neg_().to(torch.float32) for b in q_rows.split(rows)])

            def prepare(r):
                r64 = r.to(torch.float64)
                norm = torch.linalg.vector_norm(r64, dim=1)
                return (r64 / norm[:, None].clamp_min(_NORMALIZE_EPS)).to(torch.float32), None, norm

        cand_v, cand_i, stat = _candidate_pass(q_mat, reference, prepare, m, plan, device, progress)
        del q_mat
        overflow = not bool(torch.isfinite(stat))  # the one host synchronisation of the candidates pass
        if overflow:
            row = _first_bad_row(reference, plan.reference_chunk)
            if row is not None:
                raise ValueError(
                    f"The reference set has non-finite values (first at row {row}); clean it before searching."
                )
            # Finite rows whose float32 squares overflow: the bound is void, every query takes the float64 pass.

        # Exact keys of the candidates, sorted by (key, index).
        keys = _candidate_keys(q_rows, cand_i, reference, metric, max(1, plan.pair_block // m), device)
        keys, idx = _sort_by_key_then_index(keys, cand_i)
        best_v, best_i = keys[:, :k], idx[:, :k]
        s_m = cand_v.max(1).values.to(torch.float64)
        del cand_v, cand_i, keys, idx

        if overflow:
            ok = torch.zeros(nq, dtype=torch.bool, device=device)
        elif m >= nr:
            ok = torch.ones(nq, dtype=torch.bool, device=device)
        elif metric == "l2":
            ok = _certify_l2(best_v[:, -1], s_m, a_sq, stat, dim)
        else:
            ok = _certify_cosine(best_v[:, -1], s_m, dim)

        todo = (~ok).nonzero().squeeze(1)
        num_refined = int(todo.numel())
        num_exhaustive = 0
        if num_refined:
            # Two evaluations of a key differ by at most 2ξ: the bound then holds for the float64 pass's own values.
            xi = _recompute_error(dim, metric)
            kth = best_v[todo, -1]
            upper = kth * (1 + 2 * xi) if metric == "l2" else kth + 2 * xi
            if overflow:  # the candidates may hold placeholders: start unbounded
                upper = torch.full_like(kth, math.inf)
            v2, i2, evaluated = _float64_pass(
                q_rows, todo, reference, metric, k, center, upper, budget,
                min(plan.pair_block, _FALLBACK_PAIR_BLOCK), device, progress,
            )
            best_v[todo], best_i[todo] = v2, i2
            num_exhaustive = int((evaluated > m).sum())

    values[finite] = (best_v if metric == "l2" else best_v.neg()).to(torch.float32)
    indices[finite] = best_i
    return KNNResult(values.to(out_device), indices.to(out_device), metric, num_refined, num_exhaustive)


def unique_rows(x: torch.Tensor, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Finds exact duplicate rows (bitwise-equal after flattening), by hashing each row's bytes.

    Args:
        x (`torch.Tensor` of shape `(N, ...)`):
            Rows, e.g. training images.
        chunk_size (`int`, defaults to 4096):
            Rows copied to host memory at a time.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``keep`` (int64 indices of the first occurrence of each distinct row,
        increasing) and ``inverse`` (int64, for every row the position in ``keep`` of its first occurrence).
    """
    flat = _flatten(x, "x")
    first: dict[bytes, int] = {}
    inverse = np.empty(flat.shape[0], dtype=np.int64)
    keep: list[int] = []
    for start in range(0, flat.shape[0], chunk_size):
        block = np.ascontiguousarray(flat[start : start + chunk_size].detach().cpu().numpy())
        for j, row in enumerate(block):
            digest = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
            pos = first.get(digest)
            if pos is None:
                pos = first[digest] = len(keep)
                keep.append(start + j)
            inverse[start + j] = pos
    return torch.tensor(keep, dtype=torch.long), torch.from_numpy(inverse)
