import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_memdistill.metrics import knn_search, unique_rows


def brute_force_l2(queries, reference, k):
    """float64 distances, stable sort: ties go to the lower index."""
    d = torch.cdist(queries.flatten(1).double(), reference.flatten(1).double(), compute_mode="donot_use_mm_for_euclid_dist")
    v, i = torch.sort(d, dim=1, stable=True)
    return v[:, :k], i[:, :k]


@pytest.mark.parametrize(
    "query_chunk, ref_chunk, k",
    [(1, 1, 1), (7, 13, 2), (64, 100, 3), (1000, 1000, 5), (16, 257, 2)],
)
def test_l2_matches_brute_force_across_chunk_boundaries(query_chunk, ref_chunk, k):
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(257, 3, 4, 4, generator=g)
    queries = torch.rand(40, 3, 4, 4, generator=g)
    queries[:5] = reference[[0, 99, 100, 255, 256]]  # copies at chunk edges
    res = knn_search(queries, reference, k=k, query_chunk_size=query_chunk, reference_chunk_size=ref_chunk)
    v, i = brute_force_l2(queries, reference, k)
    assert torch.equal(res.indices, i)
    torch.testing.assert_close(res.values.double(), v, atol=1e-5, rtol=1e-5)
    assert torch.all(res.values[:5, 0] == 0)
    assert torch.equal(res.indices[:5, 0], torch.tensor([0, 99, 100, 255, 256]))


def test_ties_go_to_the_lowest_index():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(10, 8, generator=g)
    # rows 10..19 duplicate rows 0..9; a query equal to row 3 has two neighbours at distance 0.
    reference = torch.cat([base, base])
    queries = torch.stack([base[3], base[7] + 0.01])
    for ref_chunk in (3, 11, 20):
        res = knn_search(queries, reference, k=3, reference_chunk_size=ref_chunk, num_candidates=3)
        assert res.indices[0].tolist()[:2] == [3, 13]
        assert res.values[0, 0] == 0 and res.values[0, 1] == 0
        assert res.indices[1].tolist()[:2] == [7, 17]
        assert res.values[1, 0] == res.values[1, 1]


def test_symmetric_ties_with_k_at_the_candidate_boundary():
    # 6 references at exactly the same distance from the query: the top-2 must be the two lowest indices even
    # when only k candidates are kept (the certificate fails and the exhaustive pass decides).
    q = torch.zeros(1, 3)
    eye = torch.eye(3)
    reference = torch.cat([torch.full((1, 3), 5.0), eye, -eye])  # row 0 far, rows 1..6 at distance 1
    res = knn_search(q, reference, k=2, num_candidates=2, reference_chunk_size=4)
    assert res.indices[0].tolist() == [1, 2]
    assert res.values[0].tolist() == [1.0, 1.0]
    assert res.num_refined == 1


def test_cancellation_is_guarded():
    # Images with a large common offset and tiny differences: the float32 expansion ‖a‖²+‖b‖²−2ab cannot rank
    # them, the exact recomputation can.
    g = torch.Generator().manual_seed(2)
    offset = 1000.0 * torch.sign(torch.randn(1, 512, generator=g))
    reference = offset + 1e-2 * torch.randn(300, 512, generator=g)
    queries = reference[:50] + 1e-3 * torch.randn(50, 512, generator=g)
    queries = torch.cat([queries, 5000 * torch.ones(1, 512)])  # a far query keeps the centre off the cluster
    res = knn_search(queries, reference, k=2, reference_chunk_size=64)
    v, i = brute_force_l2(queries, reference, 2)
    assert torch.equal(res.indices, i)
    torch.testing.assert_close(res.values.double(), v, rtol=1e-5, atol=0)
    assert res.num_refined > 0  # the bound noticed that candidates from the expansion were not trustworthy
    naive = torch.cdist(queries, reference, compute_mode="use_mm_for_euclid_dist").topk(2, largest=False).indices
    assert not torch.equal(naive[:50], i[:50])  # the naive float32 search is wrong here


def test_non_finite_queries_are_flagged_not_dropped():
    g = torch.Generator().manual_seed(3)
    reference = torch.rand(20, 6, generator=g)
    queries = torch.rand(4, 6, generator=g)
    queries[1, 2] = math.nan
    queries[3, 0] = math.inf
    res = knn_search(queries, reference, k=2)
    assert res.values.shape == (4, 2)
    assert torch.isnan(res.values[[1, 3]]).all() and (res.indices[[1, 3]] == -1).all()
    v, i = brute_force_l2(queries[[0, 2]], reference, 2)
    assert torch.equal(res.indices[[0, 2]], i)


def test_bad_inputs_raise():
    reference = torch.rand(5, 4)
    with pytest.raises(ValueError, match="between 1 and the reference size"):
        knn_search(torch.rand(2, 4), reference, k=6)
    with pytest.raises(ValueError, match="values per row"):
        knn_search(torch.rand(2, 5), reference, k=2)
    bad = reference.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        knn_search(torch.rand(2, 4), bad, k=2)


def test_k_equal_to_reference_size():
    g = torch.Generator().manual_seed(4)
    reference, queries = torch.rand(4, 3, generator=g), torch.rand(3, 3, generator=g)
    res = knn_search(queries, reference, k=4, reference_chunk_size=3)
    v, i = brute_force_l2(queries, reference, 4)
    assert torch.equal(res.indices, i)


def test_cosine_matches_brute_force():
    g = torch.Generator().manual_seed(5)
    reference = F.normalize(torch.randn(300, 32, generator=g), dim=1)
    queries = F.normalize(torch.randn(25, 32, generator=g), dim=1)
    queries[0] = reference[123]
    res = knn_search(queries, reference, k=3, metric="cosine", query_chunk_size=8, reference_chunk_size=41)
    sims = queries.double() @ reference.double().T
    v, i = sims.topk(3, dim=1)
    assert torch.equal(res.indices, i)
    torch.testing.assert_close(res.values.double(), v, atol=1e-6, rtol=0)
    assert res.indices[0, 0] == 123 and abs(res.values[0, 0] - 1) < 1e-6


def test_unique_rows():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [5.0, 6.0], [3.0, 4.0]])
    keep, inverse = unique_rows(x, chunk_size=2)
    assert keep.tolist() == [0, 1, 3]
    assert inverse.tolist() == [0, 1, 0, 2, 1]
    assert torch.equal(x[keep][inverse], x)


# --- Exactness, adversarial ties, memory bound -------------------------------------------------------------------


def brute_force_cosine(queries, reference, k):
    """float64 similarities of F.normalize'd rows, sorted most similar first, ties to the lower index."""
    q, r = F.normalize(queries.flatten(1).double(), dim=1), F.normalize(reference.flatten(1).double(), dim=1)
    sims = (q[:, None, :] * r[None]).sum(-1)  # elementwise: equal rows give equal values, whatever the tiling
    v, i = torch.sort(-sims, dim=1, stable=True)
    return -v[:, :k], i[:, :k]


def wide_range_rows(n, d, generator):
    """Entries spanning 20 binary orders of magnitude: their float32 differences are often inexact."""
    return torch.sign(torch.randn(n, d, generator=generator)) * 2.0 ** (-20 * torch.rand(n, d, generator=generator))


def test_distances_are_the_float64_value_rounded_once():
    # Every reported float32 distance is the float64 distance rounded to float32 (correctly rounded): the old
    # recomputation from float32 differences missed this on ~10% of these values.
    g = torch.Generator().manual_seed(10)
    reference, queries = wide_range_rows(400, 4, g), wide_range_rows(300, 4, g)
    res = knn_search(queries, reference, k=3)
    v, i = brute_force_l2(queries, reference, 3)
    assert torch.equal(res.indices, i)
    assert torch.equal(res.values, v.float())
    cos = knn_search(queries, reference, k=3, metric="cosine")
    cv, ci = brute_force_cosine(queries, reference, 3)
    assert torch.equal(cos.indices, ci)
    assert torch.equal(cos.values, cv.float())


def _ulp_variants(row: torch.Tensor, coords, steps) -> torch.Tensor:
    """Copies of `row` with coordinate c moved by s float32 ulps (s may be negative)."""
    out = []
    for c, s in zip(coords, steps):
        r = row.clone()
        for _ in range(abs(s)):
            r[c] = torch.nextafter(r[c], torch.tensor(math.inf if s > 0 else -math.inf))
        out.append(r)
    return torch.stack(out)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_adversarial_near_ties_and_duplicates(metric):
    # Rows one to three float32 ulps apart in one coordinate (distances or similarities differing by ~1e-10, far
    # below the float32 products' error bound) and bitwise duplicates (cosine: also exact multiples by 2, the same
    # unit vector), shuffled among unrelated rows: the certificate must refuse these queries and the float64 pass
    # must order them exactly, exact ties by index.
    g = torch.Generator().manual_seed(11)
    d = 24
    base = torch.rand(d, generator=g) + 0.5
    coords = torch.randint(0, d, (30,), generator=g).tolist()
    steps = [s if s else 1 for s in torch.randint(-3, 4, (30,), generator=g).tolist()]
    near = _ulp_variants(base, coords, steps)
    copies = base.repeat(4, 1) if metric == "l2" else torch.stack([base, 2 * base, base, 2 * base])
    reference = torch.cat([near, copies, near[:5], torch.rand(200, d, generator=g) * 3])
    reference = reference[torch.randperm(reference.shape[0], generator=g)]
    if metric == "l2":
        queries = torch.stack([base, base + 1e-3, base * 1.5, torch.rand(d, generator=g)])
    else:  # at an angle from `base`: similarities to its variants differ at first order
        angled = base + 1e-2 * torch.randn(d, generator=g)
        queries = torch.stack([angled, base * 1.5 - 1e-2, torch.rand(d, generator=g)])
    k = 12 if metric == "l2" else 36  # inside the cluster of 39 near-tied rows: no certificate possible
    for chunk in (7, 64, None):
        res = knn_search(queries, reference, k=k, metric=metric, reference_chunk_size=chunk)
        v, i = (brute_force_l2 if metric == "l2" else brute_force_cosine)(queries, reference, k)
        assert torch.equal(res.indices, i), chunk
        assert torch.equal(res.values, v.float())
        assert res.num_refined >= 1 and res.num_exhaustive >= 1
    exact = (reference == base).all(1) | (reference == 2 * base).all(1)
    tied = exact.nonzero().squeeze(1).tolist()
    assert len(tied) == 4
    # The exact copies hold consecutive ranks, lowest index first, with bitwise-equal values.
    ranks = [res.indices[0].tolist().index(j) for j in tied]
    assert ranks == list(range(ranks[0], ranks[0] + 4))
    assert (res.values[0, ranks] == res.values[0, ranks[0]]).all()
    if metric == "l2":
        assert ranks[0] == 0 and res.values[0, 0] == 0


def test_ordinary_data_is_certified_without_the_float64_pass():
    # The fast path must carry ordinary data: a bound too loose to certify would silently double the cost.
    g = torch.Generator().manual_seed(12)
    low = torch.rand(2100, 3, 4, 4, generator=g)
    images = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    images = images + 0.05 * torch.randn(images.shape, generator=g)
    reference, queries = images[:2000], images[2000:]
    queries[:10] = reference[:10] + 1e-3 * torch.randn(10, 3, 16, 16, generator=g)
    res = knn_search(queries, reference, k=2)
    assert res.num_refined == 0
    v, i = brute_force_l2(queries, reference, 2)
    assert torch.equal(res.indices, i) and torch.equal(res.values, v.float())


class _LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest storage any operator allocates (outputs that do not alias an input)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = torch.utils._pytree.tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("metric, dtype", [("l2", torch.float32), ("cosine", torch.float32), ("l2", torch.float64)])
def test_memory_budget_bounds_every_allocation(metric, dtype):
    # 12 queries × 1500 references: the full score matrix (72 KB) and the reference (96 KB) are far above the
    # 8 KB budget; no allocation of the search (candidates, exact recomputation, float64 pass) may exceed it.
    g = torch.Generator().manual_seed(13)
    reference = torch.rand(1500, 16, generator=g, dtype=dtype)
    reference[100:110] = reference[5]  # 11 tied copies: the float64 pass runs too
    queries = torch.rand(12, 16, generator=g, dtype=dtype)
    queries[0] = reference[5]
    budget = 8 * 1024
    with _LargestAllocation() as tracker:
        res = knn_search(queries, reference, k=3, metric=metric, num_candidates=3, memory_budget=budget)
    assert res.num_refined >= 1
    assert 0 < tracker.largest <= budget
    v, i = (brute_force_l2 if metric == "l2" else brute_force_cosine)(queries, reference, 3)
    assert torch.equal(res.indices, i)
    assert res.indices[0].tolist() == [5, 100, 101]


def test_chunk_plan_for_a_million_training_images():
    from diffusers_memdistill.metrics.nn_search import _PAIR_BYTES, _SCORE_BYTES, _plan_chunks

    budget, dim = 2**30, 3 * 32 * 32
    plan = _plan_chunks(5000, 1_000_000, dim, 8, "l2", budget, torch.float32)
    working = plan.reference_chunk * dim * (4 + 4) + plan.query_chunk * plan.reference_chunk * _SCORE_BYTES
    assert working <= budget and plan.pair_block * _PAIR_BYTES["l2"] * dim <= budget
    assert plan.query_chunk == 5000 and 8192 <= plan.reference_chunk < 1_000_000  # large products, never N × M
    tiny = _plan_chunks(5000, 1_000_000, dim, 8, "cosine", 2**20, torch.float64)
    assert tiny.reference_chunk * dim * (8 + 20) + tiny.query_chunk * tiny.reference_chunk * _SCORE_BYTES <= 2**20


def test_other_input_dtypes_are_exact():
    g = torch.Generator().manual_seed(14)
    # uint8 images, compared to a float64 search of the same values.
    reference = torch.randint(0, 256, (300, 3, 4, 4), generator=g, dtype=torch.uint8)
    queries = torch.randint(0, 256, (30, 3, 4, 4), generator=g, dtype=torch.uint8)
    queries[:3] = reference[[7, 8, 299]]
    res = knn_search(queries, reference, k=4)
    v, i = brute_force_l2(queries.double(), reference.double(), 4)
    assert torch.equal(res.indices, i) and torch.equal(res.values, v.float())
    # float64 rows whose differences are below float32 resolution: ranked by their float64 values.
    base = torch.rand(1, 8, generator=g, dtype=torch.float64)
    reference = base + 1e-12 * torch.randn(50, 8, generator=g, dtype=torch.float64)
    res = knn_search(base, reference, k=5)
    v, i = brute_force_l2(base, reference, 5)
    assert torch.equal(res.indices, i) and res.num_refined == 1


def test_matmul_precision_settings_are_restored():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        knn_search(torch.rand(3, 4), torch.rand(9, 4), k=2)
        assert torch.get_float32_matmul_precision() == "high"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # mixes the legacy and per-backend APIs
        knn_search(torch.rand(3, 4), torch.rand(9, 4), k=2)
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.set_float32_matmul_precision(previous)


def test_benchmark_reports_speed_memory_and_float64_agreement():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_nn_search", REPO / "benchmarks" / "bench_nn_search.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--num-train", "600", "--num-queries", "40", "--image-size", "8", "--repeats", "1"])
    results = bench.main(args)["results"]
    ours, base = results["knn_search"], results["cdist+topk"]
    assert ours["queries_per_s"] > 0 and base["queries_per_s"] > 0 and ours["queries_checked"] == 40
    assert ours["queries_with_other_neighbours"] == 0
    assert ours["max_distance_error_in_float32_ulps"] <= 0.5 + 1e-6  # correctly rounded
    assert base["max_distance_error_in_float32_ulps"] > 1  # the baseline's expansion is not


def test_rows_overflowing_float32_products_are_searched_in_float64():
    # Squares of 1e20 overflow float32: the float32 bound is void, so every query takes the float64 pass.
    g = torch.Generator().manual_seed(15)
    reference = 1e20 * torch.rand(100, 6, generator=g)
    queries = reference[:5] + 1e17 * torch.rand(5, 6, generator=g)
    res = knn_search(queries, reference, k=3)
    v, i = brute_force_l2(queries, reference, 3)
    assert res.num_refined == 5
    assert torch.equal(res.indices, i) and torch.equal(res.values, v.float())
