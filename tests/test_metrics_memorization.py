import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_memdistill.metrics import (
    memorization_ratio,
    pixel_memorization,
    pixel_own_image_memorization,
    sscd_memorization,
)


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


def test_uint8_samples_are_converted_and_minus_one_to_one_is_refused(train_images):
    # Before: [-1, 1] samples against [0, 1] training images scored 0% memorized without a word.
    copies = train_images[:4]
    with pytest.raises(ValueError, match=r"pixel memorization metrics \(`samples`\) take float images in \[0, 1\].*\(x \+ 1\) / 2"):
        pixel_memorization(copies * 2 - 1, train_images)
    with pytest.raises(ValueError, match="divided by 255"):
        pixel_memorization(copies * 255, train_images)
    with pytest.raises(TypeError, match="uint8 or floating point"):
        pixel_memorization(copies.long(), train_images)
    as_uint8 = (train_images * 255).round().to(torch.uint8)
    from_uint8 = pixel_memorization(as_uint8[:4], as_uint8)
    from_float = pixel_memorization(as_uint8[:4].float() / 255, as_uint8.float() / 255)
    assert from_uint8.fraction_memorized == 1.0
    torch.testing.assert_close(from_uint8.ratios, from_float.ratios, rtol=0, atol=0)
    # NaN values are reported, not mistaken for an out-of-range scale.
    with_nan = torch.cat([copies, torch.full((1, 1, 8, 8), math.nan)])
    assert pixel_memorization(with_nan, train_images).num_nan == 1


def test_pixel_near_duplicates_finds_planted_pairs_and_none_in_random_images(train_images):
    from diffusers_memdistill.metrics import pixel_near_duplicates

    assert pixel_near_duplicates(train_images).num_pairs == 0  # independent uniform images: r close to 1
    g = torch.Generator().manual_seed(5)
    planted = train_images.clone()
    planted[40] = planted[3]  # an exact duplicate
    planted[50] = (planted[7] + 0.01 * torch.randn(1, 8, 8, generator=g)).clamp(0, 1)  # a near-duplicate
    result = pixel_near_duplicates(planted)
    assert result.pairs.tolist() == [[3, 40], [7, 50]]
    assert result.scores[0] == 0 and 0 < result.scores[1] < 1 / 3
    assert result.num_flagged == 4 and result.flagged[[3, 40, 7, 50]].all()
    # The ratio of image 50 is exactly the one a copy of it would get against the set without it.
    others = torch.cat([planted[:50], planted[51:]])
    alone = pixel_memorization(planted[50:51], others, deduplicate=False)
    assert float(result.image_scores[50]) == pytest.approx(float(alone.ratios[0]), rel=1e-6)
    summary = result.to_dict(num_listed=1, sources=[f"digits:{i}" for i in range(64)])
    assert summary["num_pairs"] == 2 and summary["pairs"] == [
        {"i": 3, "j": 40, "score": 0.0, "source_i": "digits:3", "source_j": "digits:40"}]
    # Three identical images: each is flagged (its two nearest others are the copies, wherever ties put itself);
    # a pair joins an image to its nearest other image, the lowest index among equals.
    triple = pixel_near_duplicates(torch.cat([train_images[:10], train_images[2:3].repeat(2, 1, 1, 1)]))
    assert triple.num_flagged == 3 and triple.pairs.tolist() == [[2, 10], [2, 11]]


def test_sscd_near_duplicates_finds_planted_pairs_and_none_in_random_descriptors():
    from diffusers_memdistill.metrics import sscd_near_duplicates

    g = torch.Generator().manual_seed(4)
    feats = F.normalize(torch.randn(100, 64, generator=g), dim=1)
    # Independent directions in 64 dimensions: cosine similarities of order 1/8, far below 0.5.
    assert sscd_near_duplicates(feats).num_pairs == 0
    feats[60] = F.normalize(feats[10] + 0.3 * F.normalize(torch.randn(64, generator=g), dim=0), dim=0)
    result = sscd_near_duplicates(feats)
    expected = float(feats[10] @ feats[60])
    assert result.pairs.tolist() == [[10, 60]] and result.scores[0] == pytest.approx(expected, abs=1e-6)
    assert sscd_near_duplicates(feats, threshold=expected + 1e-3).num_pairs == 0


def _pixels(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 1, 2, 2)


def test_own_image_ratio_is_the_distance_to_the_prompts_image_over_the_nearest_other():
    a, b, c, d, h = (0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 1), (0, 0, 0, 1)
    train = _pixels(a, b, c, d, a)  # A twice: its duplicate is A too
    own = _pixels(a, b, c, h)  # prompt 0 owns A, prompt 1 owns B and C, prompt 2 (held out) owns H, never trained on
    nan = (float("nan"),) * 4
    samples = _pixels(a, (0.5, 0, 0, 0), (0.9, 0, 0, 0), (0, 0, 0.5, 0.5), (0, 0, 0, 0.9), nan)
    result = pixel_own_image_memorization(samples, own, [[0], [1, 2], [3]], 2, train)
    expected = torch.tensor([0.0, 1.0, 0.1 / 0.9, math.sqrt(1.5) / math.sqrt(0.5), 0.1 / 0.9, float("nan")])
    torch.testing.assert_close(result.ratios, expected, equal_nan=True)
    # The copy of A; the 0.1-close copy of B (not of C, not of A's duplicate); the unseen image H copied: all < 1/3.
    assert result.memorized.tolist() == [True, False, True, False, True, False]
    torch.testing.assert_close(result.own_distances[:5], torch.tensor([0.0, 0.5, 0.1, math.sqrt(1.5), 0.1]))
    # Nearest images that are not the prompt's own (ties: the lower index; A's duplicate is reported as A).
    assert result.other_indices.tolist() == [1, 1, 0, 0, 0, -1]
    assert result.nan_mask.tolist() == [False] * 5 + [True] and result.overall.num_nan == 1
    assert result.fraction_memorized == pytest.approx(3 / 5)
    # A copy of its own trained image: the same ratio as the nearest-neighbour criterion r(y).
    r = pixel_memorization(samples[2:3], train).ratios
    torch.testing.assert_close(result.ratios[2:3], r)
    with pytest.raises(ValueError, match="owns all 4 distinct training images"):
        pixel_own_image_memorization(samples[:2], _pixels(a, b, c, d), [[0, 1, 2, 3]], 2, train)
    with pytest.raises(ValueError, match="Expected 3 prompts × 3 samples, got 6"):
        pixel_own_image_memorization(samples, own, [[0], [1, 2], [3]], 3, train)
