import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_memdistill.metrics import memorization_ratio, pixel_memorization, sscd_memorization


@pytest.fixture
def train_images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, 1, 8, 8, generator=g)


def test_exact_copy_is_memorized_and_fresh_image_is_not(train_images):
    g = torch.Generator().manual_seed(1)
    fresh = torch.rand(1, 1, 8, 8, generator=g)
    samples = torch.cat([train_images[5:6], fresh])
    result = pixel_memorization(samples, train_images)
    assert result.memorized.tolist() == [True, False]
    assert result.ratios[0] == 0 and result.nn_indices[0, 0] == 5
    # For independent uniform images r is close to 1: far above the 1/3 threshold.
    assert result.ratios[1] > 0.5
    assert result.fraction_memorized == 0.5


def test_ratio_matches_definition_and_threshold(train_images):
    # A sample between training images a and b, at 1/5 of the way from a: r = 1/4 (memorized at 1/3, not at 0.2).
    a, b = train_images[0], train_images[1]
    sample = (a + 0.2 * (b - a))[None]
    d = torch.cdist(sample.flatten(1).double(), train_images.flatten(1).double()).squeeze(0)
    d1, d2 = d.sort().values[:2]
    result = pixel_memorization(sample, train_images)
    torch.testing.assert_close(result.ratios[0].double(), d1 / d2, rtol=1e-5, atol=0)
    assert result.memorized.item() == bool(d1 / d2 < 1 / 3)
    strict = pixel_memorization(sample, train_images, threshold=float(d1 / d2) - 1e-3)
    assert not strict.memorized.item()


def test_repeated_training_images_do_not_hide_a_copy(train_images):
    # 5 copies of image 3 (the repeated data of 000 §4.3): without merging, NN2 is another copy and r = 0/0.
    repeated = torch.cat([train_images, train_images[3:4].repeat(5, 1, 1, 1)])
    copy = train_images[3:4]
    result = pixel_memorization(copy, repeated)
    assert result.memorized.item() and result.num_duplicates_removed == 5
    assert result.nn_indices[0, 0] == 3 and result.nn_distances[0, 1] > 0
    raw = pixel_memorization(copy, repeated, deduplicate=False)
    assert raw.nn_distances[0, 1] == 0 and raw.memorized.item()  # d1 = 0 counts as a copy


def test_nan_samples_are_reported(train_images):
    samples = torch.cat([train_images[:2], torch.full((1, 1, 8, 8), math.nan), torch.rand(1, 1, 8, 8)])
    result = pixel_memorization(samples, train_images)
    assert result.num_nan == 1 and result.nan_mask.tolist() == [False, False, True, False]
    assert math.isnan(result.ratios[2]) and not result.memorized[2]
    assert result.overall.num_valid == 3
    assert result.fraction_memorized == pytest.approx(2 / 3)
    summary = result.to_dict()
    assert summary["num_nan"] == 1 and summary["nan_indices"] == [2] and summary["num_samples"] == 4


def test_groups_from_training_labels(train_images):
    groups = ["repeated" if i < 10 else "non-repeated" for i in range(64)]
    g = torch.Generator().manual_seed(2)
    samples = torch.cat([train_images[:4], torch.rand(3, 1, 8, 8, generator=g)])
    result = pixel_memorization(samples, train_images, train_groups=groups)
    assert result.groups["repeated"].num_memorized == 4
    assert result.groups["repeated"].num_samples + result.groups["non-repeated"].num_samples == 7
    per_sample = pixel_memorization(samples, train_images, sample_groups=[0, 0, 1, 1, 1, 1, 1])
    assert per_sample.groups["0"].fraction_memorized == 1.0
    assert per_sample.groups["1"].num_memorized == 2


def test_resolution_mismatch_is_rejected(train_images):
    with pytest.raises(ValueError, match="training resolution"):
        pixel_memorization(torch.rand(2, 1, 16, 16), train_images)


def test_memorization_ratio_edge_cases():
    d = torch.tensor([[0.0, 0.0], [1.0, 4.0], [math.nan, 1.0], [2.0, 2.0]])
    r = memorization_ratio(d)
    assert r[0] == 0 and r[1] == 0.25 and math.isnan(r[2]) and r[3] == 1


def test_sscd_similarity_statistics():
    g = torch.Generator().manual_seed(3)
    train = F.normalize(torch.randn(200, 64, generator=g), dim=1)
    samples = F.normalize(torch.randn(30, 64, generator=g), dim=1)
    samples[:3] = train[[7, 8, 9]]
    samples[3] = math.nan
    result = sscd_memorization(samples, train, train_groups=["a"] * 100 + ["b"] * 100)
    sims = samples.double() @ train.double().T
    expected = sims.max(1).values
    valid = ~torch.isnan(expected)
    torch.testing.assert_close(result.max_similarity[valid].double(), expected[valid], atol=1e-6, rtol=0)
    assert result.memorized[:3].all() and result.num_nan == 1
    assert result.nn_indices[:3].tolist() == [7, 8, 9] and result.nn_indices[3] == -1
    exp_valid = expected[valid].numpy()
    assert result.p95 == pytest.approx(np.percentile(exp_valid, 95), abs=1e-6)
    assert result.mean == pytest.approx(exp_valid.mean(), abs=1e-6)
    assert result.max == pytest.approx(1.0, abs=1e-6)
    assert result.fraction_memorized == pytest.approx((exp_valid > 0.5).sum() / 29)
    assert result.groups["a"].num_memorized == 3
    assert sum(s.num_samples for s in result.groups.values()) == 30
