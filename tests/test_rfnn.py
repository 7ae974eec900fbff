"""Checks of the random-feature model of one-step consistency distillation (analysis/rfnn.py)."""

import math

import numpy as np
import pytest

from diffusers_memdistill.analysis import rfnn


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.05, 0.5, 2.0])
def test_teacher_constants_identities(t):
    c = rfnn.teacher_constants(t, "tanh")
    # Stein: the per-sample linear coefficient is e^{-t} μ₁, and the two nonlinear parts add up to μ*².
    assert c.c1 == pytest.approx(math.exp(-t) * c.mu1, rel=1e-10)
    assert c.s2 + c.v2 == pytest.approx(c.mu_star2, rel=1e-8)
    lin = rfnn.teacher_constants(t, "linear")
    assert (lin.mu1, lin.c1, lin.s2, lin.v2) == pytest.approx((1.0, math.exp(-t), 0.0, 0.0), abs=1e-12)


def test_teacher_constants_match_sampling():
    t = 0.3
    c = rfnn.teacher_constants(t, "tanh")
    g = _rng().standard_normal(400_000)
    h = g  # the pre-activation is N(0, 1) at every t for isotropic data
    assert np.mean(1 / np.cosh(h) ** 2) == pytest.approx(c.mu1, abs=4 * np.std(1 / np.cosh(h) ** 2) / 630)


def test_gram_ge_is_exact_for_linear_features():
    """σ(z) = z: U = (1/p) F (e^{-2t} XᵀX/n + Δ_t I) Fᵀ and V = √Δ_t F/√p exactly; Monte Carlo converges to it."""
    d, p, n, t = 6, 15, 9, 0.4
    rng = _rng(1)
    F = rfnn.random_features(d, p, rng)
    X = rng.standard_normal((n, d))
    delta = rfnn.ou_variance(t)
    U_exact = F @ (math.exp(-2 * t) * X.T @ X / n + delta * np.eye(d)) @ F.T / p
    U_ge, V_ge = rfnn.teacher_gram_ge(F, X, t, rng, activation="linear")
    np.testing.assert_allclose(U_ge, U_exact, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(V_ge, math.sqrt(delta) * F / math.sqrt(p), rtol=1e-12)
    U_mc, V_mc = rfnn.teacher_gram_mc(F, X, t, rng, noise_per_sample=4000, activation="linear")
    # Antithetic noise cancels the data-noise cross terms; what is left is the sampling error of E[ξξᵀ].
    assert np.abs(U_mc - U_exact).max() < 6 * delta * np.abs(F).max() ** 2 * d / p / math.sqrt(n * 4000)
    assert np.abs(V_mc - V_ge).max() < 6 * math.sqrt(delta) * np.abs(F).max() * d / math.sqrt(p * n * 4000)


def test_teacher_gradient_flow_solves_its_ode():
    d, p, n, t, ridge = 5, 12, 8, 0.2, 1e-3
    rng = _rng(2)
    F = rfnn.random_features(d, p, rng)
    X = rng.standard_normal((n, d))
    U, V = rfnn.teacher_gram_ge(F, X, t, rng)
    delta = rfnn.ou_variance(t)
    tau, eps = 3.0, 1e-4
    A = rfnn.teacher_top_layer(U, V, t, ridge=ridge, train_time=tau)
    dA = (rfnn.teacher_top_layer(U, V, t, ridge, tau + eps) - rfnn.teacher_top_layer(U, V, t, ridge, tau - eps)) / (
        2 * eps
    )
    # dA/dτ = −(2/d)(Δ_t A (U + λI) + √Δ_t Vᵀ), the gradient flow of (1/d)·E‖√Δ_t A φ + ξ‖² + ridge.
    rhs = -(2 / d) * (delta * A @ (U + ridge * np.eye(p)) + math.sqrt(delta) * V.T)
    np.testing.assert_allclose(dA, rhs, rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(rfnn.teacher_top_layer(U, V, t, ridge, 0.0), 0.0, atol=1e-15)
    A_inf = rfnn.teacher_top_layer(U, V, t, ridge)
    np.testing.assert_allclose(A_inf @ (U + ridge * np.eye(p)), -V.T / math.sqrt(delta), atol=1e-10)


def test_euler_step_is_the_ou_pf_ode():
    d, p = 4, 7
    rng = _rng(3)
    F = rfnn.random_features(d, p, rng)
    A = rng.standard_normal((d, p))
    x = rng.standard_normal((5, d))
    s = rfnn.teacher_score(x, A, F)
    np.testing.assert_allclose(rfnn.euler_step(x, A, F, 0.01), x + 0.01 * (x + s))
    np.testing.assert_allclose(rfnn.pfode_velocity(x, np.zeros((d, p)), F), x)


# ---------------------------------------------------------------------------------------------------------------
# Curvature: Gaussian equivalent vs Monte Carlo
# ---------------------------------------------------------------------------------------------------------------


def test_increment_coefficients_small_step_limit():
    q, r, c = 1.1, 0.7, -0.3
    limit = rfnn.increment_coefficients(q, r, c)
    exact = rfnn.increment_coefficients_exact(q, r, c, h=1e-4)
    assert exact.kappa == pytest.approx(limit.kappa, rel=1e-3)
    assert exact.nu2 == pytest.approx(limit.nu2, rel=1e-3)
    lin = rfnn.increment_coefficients(q, r, c, activation="linear")
    assert (lin.kappa, lin.nu2) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_ge_curvature_is_exact_for_linear_activation():
    d, p, h = 5, 11, 0.05
    rng = _rng(4)
    F = rfnn.random_features(d, p, rng)
    x = rng.standard_normal((300, d))
    v = x @ rng.standard_normal((d, d))
    M_mc = rfnn.cd_curvature_mc(x, v, F, h, activation="linear")
    pc = rfnn.pfode_constants(x, v)
    coeffs = rfnn.increment_coefficients_exact(pc.q, pc.r, pc.c, h, activation="linear")
    M_ge = rfnn.cd_curvature_ge(F, coeffs, h, second_moment=pc.second_moment)
    np.testing.assert_allclose(M_ge, M_mc, rtol=1e-9, atol=1e-18)


def test_ge_and_mc_curvature_agree_within_sampling_error():
    """
    tanh features, Gaussian inputs and the isotropic linear field v = βx (the setting where the pair
    (z_i, Δ_i) of 000 Assumption 1 is exactly Gaussian): trace and range(F) block of M agree within sampling error;
    the atom agrees up to the O(1/d) cubic-Hermite correction that the Gaussian equivalence drops.
    """
    d, p, h, beta, N = 24, 96, 0.05, -1.5, 20_000
    rng = _rng(5)
    F = rfnn.random_features(d, p, rng, normalize_rows=True)
    x = rng.standard_normal((N, d))
    v = beta * x
    dphi = rfnn.feature_increment(x, v, F, h)
    M_mc = dphi.T @ dphi / N
    pc = rfnn.pfode_constants(x, v)
    coeffs = rfnn.increment_coefficients_exact(pc.q, pc.r, pc.c, h)
    M_ge = rfnn.cd_curvature_ge(F, coeffs, h, second_moment=pc.second_moment)
    # Trace: per-sample ‖Δφ‖² has mean tr M; its standard error sets the tolerance.
    sq = np.sum(dphi**2, axis=1)
    assert abs(sq.mean() - np.trace(M_ge)) < 4 * sq.std() / math.sqrt(N)
    # range(F) block: compare with the spread between two independent halves of the samples.
    Q, _ = np.linalg.qr(F, mode="complete")
    rng_basis, ker_basis = Q[:, :d], Q[:, d:]
    block = lambda M: rng_basis.T @ M @ rng_basis  # noqa: E731
    a, b = dphi[: N // 2] @ rng_basis, dphi[N // 2 :] @ rng_basis
    noise = np.linalg.norm(a.T @ a - b.T @ b) / N  # ≈ the standard error of the full-sample block
    assert np.linalg.norm(block(M_mc) - block(M_ge)) < 3 * noise
    # Atom: M u = (h²ν²/p) u on ker G.
    atom, _ = rfnn.curvature_atom(coeffs, h, F)
    on_ker = np.trace(ker_basis.T @ M_mc @ ker_basis) / (p - d)
    assert on_ker == pytest.approx(atom, rel=0.1)


def test_ge_and_mc_curvature_of_a_trained_teacher():
    """The Lemma 5.1 form with the sampled E[vvᵀ] tracks the Monte-Carlo M of an RFNN teacher (finite-size error)."""
    d, p, n, t, h, N = 16, 128, 32, 0.1, 0.01, 8_000
    rng = _rng(6)
    F = rfnn.random_features(d, p, rng)
    X = rng.standard_normal((n, d))
    U, V = rfnn.teacher_gram_mc(F, X, t, rng, noise_per_sample=64)
    A = rfnn.teacher_top_layer(U, V, t)
    x = rfnn.sample_ou_marginal(X, t, N, rng)
    v = rfnn.pfode_velocity(x, A, F)
    M_mc = rfnn.cd_curvature_mc(x, v, F, h)
    pc = rfnn.pfode_constants(x, v)
    M_ge = rfnn.cd_curvature_ge(F, rfnn.increment_coefficients(pc.q, pc.r, pc.c), h, second_moment=pc.second_moment)
    assert np.linalg.norm(M_ge - M_mc) / np.linalg.norm(M_mc) < 0.3
    assert np.trace(M_ge) == pytest.approx(np.trace(M_mc), rel=0.15)
    # Dropping the atom or the structured part breaks the agreement.
    atom_only = rfnn.CurvatureCoefficients(0.0, rfnn.increment_coefficients(pc.q, pc.r, pc.c).nu2, exact=False)
    M_iso = rfnn.cd_curvature_ge(F, atom_only, h, second_moment=pc.second_moment)
    assert np.linalg.norm(M_iso - M_mc) / np.linalg.norm(M_mc) > 0.5


def test_curvature_atom_multiplicity_when_p_exceeds_n():
    """000 §5.3: K lives in range(G), rank G ≤ d, so M has the atom h²ν̄²/p at least p − d ≥ p − n times."""
    d, p, n, t, h = 8, 60, 20, 0.1, 0.01
    rng = _rng(7)
    F = rfnn.random_features(d, p, rng)
    X = rng.standard_normal((n, d))
    U, _ = rfnn.teacher_gram_ge(F, X, t, rng)
    mu1 = rfnn.teacher_constants(t).mu1
    coeffs = rfnn.increment_coefficients(1.0, 0.8, 0.1)
    M = rfnn.cd_curvature_ge(F, coeffs, h, U=U, mu1=mu1, ridge=1e-4)
    eig, vec = np.linalg.eigh(M)
    atom, predicted = rfnn.curvature_atom(coeffs, h, F)
    assert atom == pytest.approx(h**2 * coeffs.nu2 / p)
    assert predicted == p - d
    assert rfnn.atom_multiplicity(eig, atom) == p - d >= p - n
    # The off-atom eigenvectors lie in range(F).
    off = np.abs(eig - atom) > 1e-6 * atom
    P = F @ np.linalg.pinv(F)
    np.testing.assert_allclose(P @ vec[:, off], vec[:, off], atol=1e-8)
    # p ≤ d: G has full rank and no atom is predicted.
    _, none = rfnn.curvature_atom(coeffs, h, rfnn.random_features(8, 6, rng))
    assert none == 0


def test_closed_form_second_moment_matches_population_identities():
    """
    With E[φφᵀ] = U, E[xφᵀ] = μ₁Fᵀ/√p, E[xxᵀ] = I and A = −μ₁FᵀU⁻¹/√p, E[vvᵀ] expands to I − (μ₁²/p)FᵀU⁻¹F
    (000 eqs. C.15-C.18).
    """
    d, p = 5, 30
    rng = _rng(8)
    F = rfnn.random_features(d, p, rng)
    B = rng.standard_normal((p, p))
    U = B @ B.T / p + 0.1 * np.eye(p)
    mu1 = 0.6
    A = -mu1 * F.T @ np.linalg.inv(U) / math.sqrt(p)
    Exphi = mu1 * F.T / math.sqrt(p)
    S = np.eye(d) + Exphi @ A.T + A @ Exphi.T + A @ U @ A.T
    np.testing.assert_allclose(rfnn.pfode_second_moment(F, U, mu1), S, atol=1e-10)
    K = rfnn.response_operator(F, U, mu1)
    np.testing.assert_allclose(K, F @ S @ F.T, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Mem/Gen split, per-mode responses, leakage, ridge, allocation
# ---------------------------------------------------------------------------------------------------------------


def _small_teacher(seed=9, d=10, p=120, n=30, t=0.1):
    rng = _rng(seed)
    F = rfnn.random_features(d, p, rng)
    X = rng.standard_normal((n, d))
    U, _ = rfnn.teacher_gram_ge(F, X, t, rng)
    lam, vec = rfnn.eigh(U)
    threshold = rfnn.auto_threshold(lam, max_generalization=n + d)
    return F, U, lam, vec, threshold


def test_two_bulks_and_threshold():
    d, p, n = 10, 120, 30
    F, U, lam, vec, threshold = _small_teacher(d=d, p=p, n=n)
    summary = rfnn.two_bulk_summary(lam, threshold)
    # Gen bulk = range(F) (d modes); Mem = n sample modes + the p − n − d floor modes at v²/p.
    assert summary["num_gen"] == d
    assert summary["num_at_floor"] == p - n - d
    assert summary["gap_ratio"] > 3
    assert summary["floor"] == pytest.approx(rfnn.teacher_constants(0.1).v2 / p, rel=1e-8)
    synthetic = np.concatenate([np.full(5, 1e-6), np.linspace(1e-3, 2e-3, 20), np.linspace(1.0, 3.0, 4)])
    assert 2e-3 < rfnn.auto_threshold(synthetic, max_generalization=24) < 1.0


def test_mode_responses_are_quadratic_forms_of_k():
    F, U, lam, vec, threshold = _small_teacher()
    mu1, ridge = rfnn.teacher_constants(0.1).mu1, 3e-4
    resp = rfnn.mode_responses(lam, vec, F, mu1, threshold, ridge)
    K = rfnn.response_operator(F, U, mu1, ridge)
    G = F @ F.T
    np.testing.assert_allclose(resp.visibility, np.einsum("ik,ij,jk->k", vec, G, vec), atol=1e-10)
    np.testing.assert_allclose(resp.response, np.einsum("ik,ij,jk->k", vec, K, vec), atol=1e-7)
    np.testing.assert_array_equal(resp.mem, lam < threshold)
    # Modes in ker G (the floor of U) are invisible and get no response.
    floor = np.abs(lam - lam.min()) < 1e-9 * lam.min()
    assert np.abs(resp.response[floor]).max() < 1e-10


def test_leakage_decreases_with_the_ridge():
    F, U, lam, vec, threshold = _small_teacher()
    mem = rfnn.spectral_split(lam, threshold)
    ridges = np.concatenate([[0.0], np.geomspace(1e-9, 10.0, 60)])
    leak = rfnn.leakage(lam, vec, F, mem, ridges)
    assert leak.shape == ((~mem).sum(), ridges.size)
    assert np.all(np.diff(leak, axis=1) <= 1e-12)  # every Gen mode, not only the median
    med = rfnn.median_leakage(leak)
    assert np.all(np.diff(med) <= 1e-12) and med[0] > 0.3 and med[-1] < 0.1
    # λ = 0 cross-check by dense linear algebra: share of ‖U^{-1/2} G u_j‖² carried by Mem eigenvectors.
    G = F @ F.T
    j = np.flatnonzero(~mem)[0]
    y = vec.T @ (G @ vec[:, j]) / np.sqrt(lam)
    assert leak[0, 0] == pytest.approx(np.sum(y[mem] ** 2) / np.sum(y**2), rel=1e-8)
    # λ → ∞: the unweighted share Σ_Mem (u_kᵀGu_j)² / Σ (u_kᵀGu_j)².
    w = (vec.T @ G @ vec[:, j]) ** 2
    inf = rfnn.leakage(lam, vec, F, mem, [1e12], modes=[j])[0, 0]
    assert inf == pytest.approx(w[mem].sum() / w.sum(), rel=1e-6)


def test_select_ridge_and_allocation():
    ridges = [0.0, 1e-4, 1e-3, 1e-2]
    assert rfnn.select_ridge(ridges, [0.9, 0.3, 0.08, 0.01], 0.1) == 1e-3
    assert rfnn.select_ridge(ridges, [0.9, 0.3, 0.2, 0.15], 0.1) is None
    with pytest.raises(ValueError):
        rfnn.select_ridge(ridges, [0.9, 0.3, 0.2, 0.1], 1.5)
    r = np.array([3.0, -1.0, 1.0, 0.5, -2.0])
    mem = np.array([False, False, True, True, True])
    assert rfnn.positive_allocation(r, mem) == pytest.approx(3.0 / 4.5)
    assert math.isnan(rfnn.positive_allocation(-np.abs(r), mem))


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        rfnn.random_features(-3, 10, _rng())
    with pytest.raises(ValueError):
        rfnn.ou_variance(0.0)
    with pytest.raises(ValueError):
        rfnn.teacher_constants(0.1, activation="relu")
    with pytest.raises(ValueError):
        rfnn.teacher_top_layer(np.eye(3), np.ones((3, 2)), 0.1, ridge=-1.0)
