"""Exact k-nearest-neighbour search over large training sets, in bounded memory.

The reference set (e.g. 1M training images) is streamed in chunks; each chunk is moved to the compute device once
and scored against all queries with one matrix product per query chunk, keeping a running top-``m`` list per
query. Memory is bounded by ``query_chunk_size * reference_chunk_size`` scores plus the running lists, whatever
the sizes of the two sets.

Squared Euclidean distances expanded as ``‖q‖² + ‖r‖² − 2 q·r`` suffer cancellation in float32 when the
distance is small next to the norms. The matrix product is therefore only used to select ``m > k`` candidates;
the candidates' distances are recomputed from the differences ``q − r`` (no cancellation: float32 relative
accuracy), and a forward error bound of the expansion certifies that no non-candidate can be closer than the ``k``-th neighbour. Queries the bound cannot
certify are searched again with more candidates, then exhaustively. Results are ordered by (distance, index), so
ties go to the lowest training index, like a stable sort of the brute-force distances.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Unit roundoff of float32.
_U32 = 2.0**-24


@dataclass
class KNNResult:
    r"""
    Output of [`knn_search`].

    Args:
        values (`torch.Tensor` of shape `(num_queries, k)`):
            Euclidean distances in increasing order (``metric="l2"``) or cosine similarities in decreasing order
            (``metric="cosine"``). NaN for queries with non-finite entries.
        indices (`torch.Tensor` of shape `(num_queries, k)`, int64):
            Reference indices of the neighbours; -1 for queries with non-finite entries.
        metric (`str`):
            ``"l2"`` or ``"cosine"``.
        num_refined (`int`):
            Queries whose first candidate list could not be certified and were searched again.
        num_exhaustive (`int`):
            Queries that needed the exhaustive exact search.
    """

    values: torch.Tensor
    indices: torch.Tensor
    metric: str
    num_refined: int = 0
    num_exhaustive: int = 0


@contextlib.contextmanager
def _full_fp32_matmul():
    """Disables TF32/bf16 shortcuts so float32 products obey the float32 error bound used below."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _flatten(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"`{name}` must hold at least one row, got shape {tuple(x.shape)}.")
    return x.reshape(x.shape[0], -1)


def _exact_sq_dist(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Squared distances from the differences: q (B, D), rows (B, m, D) -> (B, m) float64.

    Each float32 difference is correctly rounded and the squares are summed in float64: relative error about 3u,
    no cancellation, and bitwise-equal results for duplicate rows.
    """
    return torch.linalg.vector_norm(q[:, None, :] - rows, dim=-1, dtype=torch.float64).square()


def _sort_by_value_then_index(values: torch.Tensor, indices: torch.Tensor, descending: bool = False):
    """Sorts each row by value, ties broken by the smaller index."""
    order = torch.argsort(indices, dim=1, stable=True)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = torch.argsort(values, dim=1, stable=True, descending=descending)
    return values.gather(1, order), indices.gather(1, order)


def _merge_topk(best_v, best_i, new_v, new_i, m: int, largest: bool):
    v = torch.cat([best_v, new_v], dim=1)
    i = torch.cat([best_i, new_i], dim=1)
    v, pos = torch.topk(v, m, dim=1, largest=largest, sorted=True)
    return v, i.gather(1, pos)


def _candidate_pass(q, q_sq, reference, center, m, device, q_chunk, r_chunk, progress, desc):
    """Approximate squared distances by matrix products; returns the m smallest per query and max ‖r − c‖²."""
    nq, nr = q.shape[0], reference.shape[0]
    best_v = torch.full((nq, m), math.inf, device=device)
    best_i = torch.zeros((nq, m), dtype=torch.long, device=device)
    max_r_sq = torch.zeros((), dtype=torch.float64, device=device)
    starts = range(0, nr, r_chunk)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        r = reference[start : start + r_chunk].to(device=device, dtype=torch.float32) - center
        r_sq = torch.linalg.vector_norm(r, dim=1).square()
        if not torch.isfinite(r_sq).all():  # any NaN/inf entry makes its row's norm non-finite
            bad = (~torch.isfinite(r_sq)).nonzero()[0].item() + start
            raise ValueError(f"The reference set has non-finite values (first at row {bad}); clean it before searching.")
        max_r_sq = torch.maximum(max_r_sq, r_sq.max().double())
        take = min(m, r.shape[0])
        for qs in range(0, nq, q_chunk):
            # ‖q‖² + ‖r‖² − 2 q·r, one fused product per block.
            block = torch.addmm(r_sq[None, :], q[qs : qs + q_chunk], r.T, beta=1.0, alpha=-2.0)
            block += q_sq[qs : qs + q_chunk, None]
            v, pos = torch.topk(block, take, dim=1, largest=False, sorted=True)
            idx = pos + start
            best_v[qs : qs + q_chunk], best_i[qs : qs + q_chunk] = _merge_topk(
                best_v[qs : qs + q_chunk], best_i[qs : qs + q_chunk], v, idx, m, largest=False
            )
    return best_v, best_i, max_r_sq


def _refine(q_raw, q_norm, reference, cand_v, cand_i, max_r_sq, k, dim, nr, device, max_elements):
    """Exact distances of the candidates, sorted by (distance, index), and the certificate of each query.

    A non-candidate r has computed score ≥ the m-th candidate score a_m. The float32 expansion errs by at most
    B = (dim + 4)·u·(‖q‖ + ‖r‖)² (dot product bound γ_dim·‖q‖‖r‖ plus the norms and the two additions), so its true
    squared distance exceeds a_m − B. The recomputed k-th distance is accurate to ~3u·d_k ≪ B. So if it is below
    a_m − 2B (a factor 2 of margin), no non-candidate can be nearer and the top-k is exact.
    """
    nq, m = cand_i.shape
    out_v = torch.empty((nq, k), dtype=torch.float64, device=device)
    out_i = torch.empty((nq, k), dtype=torch.long, device=device)
    rows_per_step = max(1, max_elements // max(1, m * dim))
    for qs in range(0, nq, rows_per_step):
        idx = cand_i[qs : qs + rows_per_step]
        rows = reference[idx.reshape(-1).to(reference.device)].to(device=device, dtype=torch.float32)
        exact = _exact_sq_dist(q_raw[qs : qs + rows_per_step], rows.reshape(idx.shape[0], m, dim))
        v, i = _sort_by_value_then_index(exact, idx)
        out_v[qs : qs + rows_per_step], out_i[qs : qs + rows_per_step] = v[:, :k], i[:, :k]
    if m >= nr:
        certified = torch.ones(nq, dtype=torch.bool, device=device)
    else:
        bound = 2.0 * (dim + 4) * _U32 * (q_norm + max_r_sq.sqrt()).square()  # 2B, see above
        a_m = cand_v[:, -1].double()
        certified = out_v[:, -1] < a_m - bound
    return out_v, out_i, certified


def _exhaustive(q_raw, reference, k, device, r_chunk, max_elements):
    """Exact search by differences against every reference row; memory bounded by `max_elements`."""
    nq, dim = q_raw.shape
    best_v = torch.full((nq, k), math.inf, dtype=torch.float64, device=device)
    best_i = torch.full((nq, k), -1, dtype=torch.long, device=device)
    rows_per_step = max(1, max_elements // dim)
    for qi in range(nq):
        v_parts, i_parts = [best_v[qi : qi + 1]], [best_i[qi : qi + 1]]
        for start in range(0, reference.shape[0], min(r_chunk, rows_per_step)):
            r = reference[start : start + min(r_chunk, rows_per_step)].to(device=device, dtype=torch.float32)
            d = _exact_sq_dist(q_raw[qi : qi + 1], r[None])
            v, pos = torch.sort(d, dim=1, stable=True)  # ties -> lower index
            v_parts.append(v[:, :k])
            i_parts.append(pos[:, :k] + start)
        v, i = torch.cat(v_parts, 1), torch.cat(i_parts, 1)
        valid = i >= 0
        v = torch.where(valid, v, torch.full_like(v, math.inf))
        v, i = _sort_by_value_then_index(v, torch.where(valid, i, torch.full_like(i, torch.iinfo(torch.long).max)))
        best_v[qi], best_i[qi] = v[0, :k], i[0, :k]
    return best_v, best_i


@torch.no_grad()
def knn_search(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int = 2,
    *,
    metric: str = "l2",
    query_chunk_size: int = 1024,
    reference_chunk_size: int = 16384,
    num_candidates: int | None = None,
    max_refine_elements: int = 2**24,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> KNNResult:
    r"""
    Exact k nearest neighbours of each query in a reference set, in bounded memory.

    Args:
        queries (`torch.Tensor` of shape `(num_queries, ...)`):
            Query rows; trailing dimensions are flattened (images ``(N, C, H, W)`` are fine).
        reference (`torch.Tensor` of shape `(num_reference, ...)`):
            Reference rows with the same flattened size, e.g. the training set. May stay on the CPU while the
            search runs on a GPU: it is streamed chunk by chunk.
        k (`int`, defaults to 2):
            Number of neighbours.
        metric (`str`, defaults to `"l2"`):
            ``"l2"``: Euclidean distance, exact in float32 (candidates recomputed from differences and certified,
            see module docstring). ``"cosine"``: cosine similarity of L2-normalised rows (rows are normalised here),
            from float32 matrix products.
        query_chunk_size (`int`, defaults to 1024):
            Queries per matrix product.
        reference_chunk_size (`int`, defaults to 16384):
            Reference rows moved to the device at a time. Peak score memory is
            ``4 * query_chunk_size * reference_chunk_size`` bytes.
        num_candidates (`int`, *optional*):
            Candidates kept per query for the exact recomputation (``metric="l2"``); defaults to ``k + 6``.
        max_refine_elements (`int`, defaults to 2**24):
            Bound on the float32 elements gathered at once when recomputing exact distances.
        device (`str` or `torch.device`, *optional*):
            Compute device; defaults to the device of `queries`.
        progress (`bool`, defaults to `False`):
            Show a progress bar over reference chunks.

    Returns:
        [`KNNResult`]: neighbours sorted nearest first, ties broken by the lower reference index for ``"l2"``.
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f"`metric` must be 'l2' or 'cosine', got {metric!r}.")
    q_all = _flatten(queries, "queries")
    reference = _flatten(reference, "reference")
    if q_all.shape[1] != reference.shape[1]:
        raise ValueError(
            f"Queries have {q_all.shape[1]} values per row but the reference set has {reference.shape[1]} "
            f"(shapes {tuple(queries.shape)} and {tuple(reference.shape)})."
        )
    nr, dim = reference.shape
    if not 1 <= k <= nr:
        raise ValueError(f"`k` must be between 1 and the reference size {nr}, got {k}.")
    if query_chunk_size < 1 or reference_chunk_size < 1:
        raise ValueError("Chunk sizes must be positive.")
    device = torch.device(device) if device is not None else q_all.device
    out_device = q_all.device

    finite = torch.isfinite(q_all).all(1).to(device)
    q = q_all.to(device=device, dtype=torch.float32)[finite]
    nq_all = q_all.shape[0]
    values = torch.full((nq_all, k), math.nan, dtype=torch.float32, device=device)
    indices = torch.full((nq_all, k), -1, dtype=torch.long, device=device)
    num_refined = num_exhaustive = 0
    if q.shape[0] == 0:
        return KNNResult(values.to(out_device), indices.to(out_device), metric)

    with _full_fp32_matmul():
        if metric == "cosine":
            q = F.normalize(q, dim=1)
            best_v = torch.full((q.shape[0], k), -math.inf, device=device)
            best_i = torch.zeros((q.shape[0], k), dtype=torch.long, device=device)
            for start in tqdm(range(0, nr, reference_chunk_size), desc="knn (cosine)", disable=not progress, leave=False):
                r = reference[start : start + reference_chunk_size].to(device=device, dtype=torch.float32)
                if not torch.isfinite(r).all():
                    raise ValueError("The reference set has non-finite values; clean it before searching.")
                r = F.normalize(r, dim=1)
                take = min(k, r.shape[0])
                for qs in range(0, q.shape[0], query_chunk_size):
                    sims = q[qs : qs + query_chunk_size] @ r.T
                    v, pos = torch.topk(sims, take, dim=1, largest=True, sorted=True)
                    best_v[qs : qs + query_chunk_size], best_i[qs : qs + query_chunk_size] = _merge_topk(
                        best_v[qs : qs + query_chunk_size], best_i[qs : qs + query_chunk_size], v, pos + start, k, True
                    )
            values[finite], indices[finite] = best_v, best_i
            return KNNResult(values.to(out_device), indices.to(out_device), metric)

        # Centering shrinks the norms, hence the error bound (distances are translation invariant).
        center = q.mean(0, dtype=torch.float64).float()
        q_c = q - center
        q_sq = torch.linalg.vector_norm(q_c, dim=1).square()
        q_norm = q_sq.double().sqrt()
        m = min(nr, num_candidates if num_candidates is not None else k + 6)
        if m < k:
            raise ValueError(f"`num_candidates` ({m}) must be at least k ({k}).")
        cand_v, cand_i, max_r_sq = _candidate_pass(
            q_c, q_sq, reference, center, m, device, query_chunk_size, reference_chunk_size, progress, "knn (l2)"
        )
        best_v, best_i, ok = _refine(q, q_norm, reference, cand_v, cand_i, max_r_sq, k, dim, nr, device, max_refine_elements)
        del cand_v, cand_i

        # Second tier: more candidates for the queries the bound could not certify.
        todo = (~ok).nonzero().squeeze(1)
        num_refined = int(todo.numel())
        if todo.numel():
            m2 = min(nr, 16 * m)
            cv, ci, _ = _candidate_pass(
                q_c[todo], q_sq[todo], reference, center, m2, device, query_chunk_size, reference_chunk_size,
                progress, "knn (l2, more candidates)",
            )
            v2, i2, ok2 = _refine(q[todo], q_norm[todo], reference, cv, ci, max_r_sq, k, dim, nr, device, max_refine_elements)
            best_v[todo], best_i[todo] = v2, i2
            # Last tier: exhaustive exact search.
            last = todo[~ok2]
            num_exhaustive = int(last.numel())
            if last.numel():
                v3, i3 = _exhaustive(q[last], reference, k, device, reference_chunk_size, max_refine_elements)
                best_v[last], best_i[last] = v3, i3

    values[finite] = best_v.sqrt().float()
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
