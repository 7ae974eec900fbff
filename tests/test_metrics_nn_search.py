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
