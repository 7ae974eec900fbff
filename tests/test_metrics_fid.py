import numpy as np
import pytest
import scipy.linalg
import torch

from diffusers_memdistill.metrics import (
    FeatureStats,
    cached_feature_stats,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_feature_stats,
    save_feature_stats,
    tensor_content_hash,
)


def test_frechet_distance_of_diagonal_gaussians_is_analytic():
    # Commuting covariances: FD = ‖μ₁ − μ₂‖² + Σ (σ₁ᵢ − σ₂ᵢ)².
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    fd = frechet_distance(FeatureStats(mu1, np.diag(var1), 10), FeatureStats(mu2, np.diag(var2), 10))
    expected = 1.0 + 4.0 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert fd == pytest.approx(expected, abs=1e-12)


def test_frechet_distance_matches_sqrtm_formula_for_general_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(FeatureStats(mu1, s1, 2), FeatureStats(mu2, s2, 2)) == pytest.approx(reference, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_even_when_singular():
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))  # N < D: singular covariance
    assert abs(fid_from_features(x, x)) < 1e-9
    y = x + 1.0
    assert fid_from_features(x, y) == pytest.approx(64.0, rel=1e-9)  # pure mean shift


def test_sample_statistics_estimate_the_analytic_distance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0]) + torch.tensor([1.0, 0.0])
    assert fid_from_features(x, y) == pytest.approx(1.0 + 1.0, abs=0.1)


def test_feature_statistics_rejects_nan():
    x = torch.randn(5, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        feature_statistics(x)


def test_stats_cache_round_trip(tmp_path):
    calls = []

    def extractor(images):
        calls.append(images.shape[0])
        return images.flatten(1).double()

    images = torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    first = cached_feature_stats(images, extractor, tmp_path, extractor_id="flat")
    second = cached_feature_stats(images, extractor, tmp_path, extractor_id="flat")
    assert calls == [8]
    np.testing.assert_array_equal(first.mean, second.mean)
    np.testing.assert_array_equal(first.cov, second.cov)
    assert second.num_samples == 8
    cached_feature_stats(images, extractor, tmp_path, extractor_id="other extractor")
    changed = images.clone()
    changed[0, 0, 0, 0] += 0.5
    cached_feature_stats(changed, extractor, tmp_path, extractor_id="flat")
    assert calls == [8, 8, 8]
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert tensor_content_hash(images) != tensor_content_hash(changed)


def test_load_rejects_other_files(tmp_path):
    from safetensors.numpy import save_file

    save_file({"mean": np.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a feature-statistics file"):
        load_feature_stats(tmp_path / "x.safetensors")
    stats = FeatureStats(np.ones(2), np.eye(2), 3)
    save_feature_stats(tmp_path / "s.safetensors", stats, {"dataset": "digits"})
    back = load_feature_stats(tmp_path / "s.safetensors")
    assert back.num_samples == 3 and np.array_equal(back.cov, np.eye(2))


class TinyPoolFeatures(torch.nn.Module):
    """Stands in for the Inception pool-feature graph: 299×299 input -> 2048 features."""

    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.proj = torch.nn.Linear(12, 2048)

    def forward(self, x):
        return self.proj(self.pool(x).flatten(1))


@pytest.fixture
def two_weight_files(tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"weights_{seed}" / "inception.pt"
        path.parent.mkdir()
        torch.jit.script(TinyPoolFeatures().eval()).save(str(path))
        paths.append(path)
    return paths


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_stats_cache_is_keyed_by_the_weights_hash(two_weight_files, tmp_path, monkeypatch):
    from diffusers_memdistill.metrics import InceptionFeatureExtractor

    calls = []
    original = InceptionFeatureExtractor.__call__
    monkeypatch.setattr(InceptionFeatureExtractor, "__call__", lambda self, x: calls.append(self.weights_path) or original(self, x))
    first, second = (InceptionFeatureExtractor.from_torchscript(p, device="cpu") for p in two_weight_files)
    assert first.cache_id != second.cache_id and first.weights_sha256 in first.cache_id
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cache = tmp_path / "cache"

    stats_first = cached_feature_stats(images, first, cache)  # extractor_id defaults to first.cache_id
    stats_second = cached_feature_stats(images, second, cache)  # other weights: computed, never read from the cache
    assert calls == [first.weights_path, second.weights_path]
    assert len(list(cache.glob("*.safetensors"))) == 2
    expected_second = feature_statistics(original(second, images))
    np.testing.assert_allclose(stats_second.mean, expected_second.mean, rtol=1e-12)
    assert not np.allclose(stats_first.mean, stats_second.mean)
    # A caller's own id (one that does not name the weights) still gets the weights' hash in the key.
    cached_feature_stats(images, first, cache, extractor_id="inception:default")
    cached_feature_stats(images, second, cache, extractor_id="inception:default")
    assert calls[2:] == [first.weights_path, second.weights_path]
    assert len(list(cache.glob("*.safetensors"))) == 4

    # The same weights under another file name hit the cache: the key is the content hash, not the path.
    copy = tmp_path / "elsewhere.pt"
    copy.write_bytes(two_weight_files[0].read_bytes())
    again = cached_feature_stats(images, InceptionFeatureExtractor.from_torchscript(copy, device="cpu"), cache)
    assert len(calls) == 4
    np.testing.assert_array_equal(again.mean, stats_first.mean)


def test_stats_cache_needs_an_id_for_extractors_without_one(tmp_path):
    with pytest.raises(ValueError, match="needs `extractor_id`"):
        cached_feature_stats(torch.rand(4, 1, 2, 2), lambda x: x.flatten(1).double(), tmp_path)
