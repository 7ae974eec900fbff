import itertools
import math

import numpy as np
import pytest
import torch

from diffusers_memdistill.metrics import copying_diagnostics, pairing_inefficiency


def brute_force_e_ot(teacher, student):
    n = teacher.shape[0]
    t, s = teacher.reshape(n, -1).double(), student.reshape(n, -1).double()
    cost = ((t[:, None] - s[None]) ** 2).sum(-1)
    return min(float(cost[torch.arange(n), list(p)].mean()) for p in itertools.permutations(range(n)))


def test_identical_pairing_has_zero_inefficiency():
    x = torch.randn(20, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    result = pairing_inefficiency(x, x.clone())
    assert result.delta_e == 0 and result.e_dt == 0
    # A perturbed copy is still optimally paired with itself.
    noisy = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    result = pairing_inefficiency(x, noisy)
    assert result.delta_e == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_array_equal(result.assignment, np.arange(20))
    assert result.fraction_fixed == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_permutation_search(seed):
    g = torch.Generator().manual_seed(seed)
    teacher, student = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    result = pairing_inefficiency(teacher, student)
    e_ot = brute_force_e_ot(teacher, student)
    e_dt = float(((teacher.double() - student.double()) ** 2).sum(1).mean())
    assert result.e_ot == pytest.approx(e_ot, rel=1e-12)
    assert result.e_dt == pytest.approx(e_dt, rel=1e-12)
    assert result.delta_e == pytest.approx(e_dt / e_ot - 1, rel=1e-12)
    assert result.delta_e >= 0


def test_scale_invariance_and_remapping():
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(30, 8, generator=g, dtype=torch.float64)
    student = torch.randn(30, 8, generator=g, dtype=torch.float64)
    a = pairing_inefficiency(teacher, student).delta_e
    b = pairing_inefficiency(1000 * teacher, 1000 * student).delta_e
    assert a == pytest.approx(b, rel=1e-9)
    # A student that outputs the teacher's samples under another pairing: E_OT = 0 < E_DT, so ΔE = inf.
    remapped = pairing_inefficiency(teacher, teacher[torch.randperm(30, generator=g)])
    assert remapped.e_ot == 0 and math.isinf(remapped.delta_e)


def test_nan_outputs_are_rejected():
    x = torch.randn(4, 3)
    y = x.clone()
    y[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        pairing_inefficiency(x, y)


def test_copying_diagnostics_definitions():
    g = torch.Generator().manual_seed(6)
    phi_k, phi_1, student = (torch.randn(6, 1, 3, 3, generator=g) for _ in range(3))
    train = torch.randn(11, 1, 3, 3, generator=g)
    out = copying_diagnostics(phi_k, phi_1, student, train, chunk_size=4)
    f = lambda t: t.reshape(t.shape[0], -1).double()
    delta = (f(student) - f(phi_k)).norm(dim=1) - (f(phi_1) - f(phi_k)).norm(dim=1)
    mean_dist = torch.cdist(f(phi_k), f(train), compute_mode="donot_use_mm_for_euclid_dist").mean(1)
    torch.testing.assert_close(out.delta, delta)
    torch.testing.assert_close(out.mean_train_distance, mean_dist)
    # A student equal to the multi-step teacher has δ = −‖Φ_1 − Φ_K‖ ≤ 0.
    assert (copying_diagnostics(phi_k, phi_1, phi_k, train).delta <= 0).all()
