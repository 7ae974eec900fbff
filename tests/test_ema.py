"""The moving averages of the saved weights, checked against their closed forms (EDM2 §3 and App. C)."""

import math

import numpy as np
import pytest
import torch

from diffusers_memdistill.training.ema import (
    MAX_SIGMA_REL,
    ModelEMA,
    gamma_to_sigma_rel,
    sigma_rel_to_gamma,
)


class Scalar(torch.nn.Module):
    def __init__(self, value=0.0):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(value, dtype=torch.float64))


def run(ema, values):
    model = Scalar()
    for v in values:
        model.theta.data.fill_(v)
        ema.update(model)
    return float(ema.module.theta)


def test_gamma_of_sigma_rel_matches_edm2():
    # EDM2's stored profiles: sigma_rel 0.05 and 0.10 <-> gamma 16.97 and 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    for sigma_rel in (0.01, 0.05, 0.1, 0.2, MAX_SIGMA_REL):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-6)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="sigma_rel must lie in"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.15])
def test_power_ema_of_a_linear_trajectory_is_the_closed_form(sigma_rel):
    # theta_k = a + b k for update k = 1..t. Update k has weight (k^p - (k-1)^p) / t^p (p = gamma + 1), so the
    # average is a + b (t - sum_{j<t} j^p / t^p) exactly, -> a + b t (gamma + 1) / (gamma + 2) for large t.
    a, b, t = 0.7, -0.003, 400
    ema = ModelEMA(Scalar(123.0), sigma_rel=sigma_rel)  # the initial 123 must be forgotten at once
    value = run(ema, [a + b * k for k in range(1, t + 1)])
    p = ema.gamma + 1
    j = np.arange(1, t, dtype=np.float64)
    assert value == pytest.approx(a + b * (t - np.sum((j / t) ** p)), rel=1e-12, abs=1e-12)
    assert (value - a) / (b * t) == pytest.approx(p / (p + 1), abs=1 / t)  # the continuous profile, to O(1/t)
    summary = ema.summary()
    assert summary["initial_weight"] == 0.0 and summary["num_updates"] == t
    assert summary["sigma_rel"] == sigma_rel and summary["gamma"] == ema.gamma
    # The profile's width is sigma_rel * t (EDM2's definition of sigma_rel); its mean age is t - E[k], exactly
    # sum_{j<t} (j/t)^p (the same sum as above), about t / (gamma + 2) - 1/2.
    assert summary["averaging_length_steps"] == pytest.approx(sigma_rel * t, rel=2e-2)
    assert summary["mean_age_steps"] == pytest.approx(np.sum((j / t) ** p), rel=1e-9)
    assert summary["mean_age_steps"] == pytest.approx(t / (ema.gamma + 2) - 0.5, rel=1e-2)


def test_power_ema_weights_of_each_update():
    # The average of a one-hot trajectory (1 at update k, 0 elsewhere) is the weight of update k.
    t, ema_gamma = 30, sigma_rel_to_gamma(0.1)
    p = ema_gamma + 1
    for k in (1, 2, 15, 30):
        value = run(ModelEMA(Scalar(), sigma_rel=0.1), [1.0 if i == k else 0.0 for i in range(1, t + 1)])
        assert value == pytest.approx((k**p - (k - 1) ** p) / t**p, rel=1e-10)


def test_constant_decay_keeps_the_initial_weights_as_the_formula_says():
    # The old default: 0.9999 without warm-up still holds 0.9999^5000 = 61% of the initial weights at step 5000.
    ema = ModelEMA(Scalar(1.0), decay=0.9999)
    value = run(ema, [0.0] * 5000)
    assert value == pytest.approx(0.9999**5000, rel=1e-9) and value == pytest.approx(0.6065, abs=1e-4)
    summary = ema.summary()
    assert summary["initial_weight"] == pytest.approx(0.9999**5000, rel=1e-9)
    assert summary["kind"] == "constant" and summary["decay"] == 0.9999
    # Warm-up: min(decay, t / (t + 9)) at update t (the old --ema_warmup rule, 1-based).
    warm = ModelEMA(Scalar(1.0), decay=0.9999, warmup=True)
    assert run(warm, [0.0] * 50) == pytest.approx(math.prod(t / (t + 9) for t in range(1, 51)), rel=1e-9)


def test_state_dict_round_trip_and_bad_arguments():
    ema = ModelEMA(Scalar(2.0), sigma_rel=0.05)
    run(ema, [1.0, 3.0, 5.0])
    other = ModelEMA(Scalar(0.0), sigma_rel=0.05)
    state = ema.state_dict()
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))  # plain tensors and numbers
    assert other.summary() == ema.summary() and float(other.module.theta) == float(ema.module.theta)
    with pytest.raises(ValueError, match="either sigma_rel"):
        ModelEMA(Scalar(), sigma_rel=0.05, decay=0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ModelEMA(Scalar(), decay=1.0)
    with pytest.raises(ValueError, match="warmup applies"):
        ModelEMA(Scalar(), warmup=True)
