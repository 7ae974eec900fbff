"""Random-feature (RFNN) model of one-step consistency distillation (000 §5, App. B.3 and C).

The teacher score and the student share frozen random features; only their top layers differ:

    φ(x) = σ(F x) / √p,      F = W / √d,   W ∈ R^{p×d} with i.i.d. N(0, 1) entries,
    teacher score s(x) = A φ(x),   student f(x) = B φ(x).

The teacher is trained by denoising score matching at one OU time t on n samples (000 Lemma 5.2, after Bonnaire
et al. 2025). One consistency-distillation step compares the student at x and at the teacher's Euler step of the
OU probability-flow ODE, x̂ = x + h·v(x) with v(x) = x + s(x); the loss is quadratic in B with curvature
M = E[Δφ Δφᵀ], Δφ = φ(x̂) − φ(x) (000 eqs. 5.2-5.3). Its Gaussian-equivalent form (000 Lemma 5.1, Theorem 5.3) is

    M ≈ (h²/p) · (ν̄² I + κ̄² K),   K = G − (μ₁²/p) · G U⁻¹ G,   G = F Fᵀ,

an isotropic atom at h²ν̄²/p plus a structured part living in range(G), which has dimension at most d.

Conventions (the extracted text of 000 lost its equations; these are our reconstruction):

- Samples are rows: ``X`` has shape ``(n, d)``, ``F`` has shape ``(p, d)``, features have shape ``(N, p)``.
- OU forward process x_t = e^{-t} x₀ + √Δ_t ξ, Δ_t = 1 − e^{-2t}. Data are isotropic, x₀ ~ N(0, I_d), so every
  OU marginal is N(0, I_d).
- Expectations in U, V and M are over the *empirical* OU marginal: a training point x₀ = X[ν], ν uniform, plus
  fresh noise ξ (infinitely many noise draws per point; ``m = ∞`` in George et al. 2025). This makes
  E[φφᵀ] = U exactly, the identity 000 uses in App. C.3. The closed form of Theorem 5.3 also uses the population
  identities E[xxᵀ] = I and E[xφᵀ] = μ₁Fᵀ/√p; at finite ψ_n these fail exactly in the directions that U⁻¹
  amplifies, which is what the ridge of 000 eq. B.11 controls. [`cd_curvature_ge`] therefore also accepts a
  sampled E[vvᵀ] (Lemma 5.1 alone).
- The DSM loss is normalised as L(A) = (1/d)·E‖√Δ_t·A φ(x_t) + ξ‖², so gradient flow from A = 0 reads
  A(τ) = A*·(I − exp(−(2Δ_t τ/d)(U + λI))).
- Activations are odd (tanh by default), so the mean feature μ₀ vanishes and no rank-one 11ᵀ terms appear.
- Everything is float64 numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "CurvatureCoefficients",
    "ModeResponses",
    "PFODEConstants",
    "TeacherConstants",
    "atom_multiplicity",
    "auto_threshold",
    "cd_curvature_ge",
    "cd_curvature_mc",
    "curvature_atom",
    "eigh",
    "euler_step",
    "feature_increment",
    "features",
    "increment_coefficients",
    "increment_coefficients_exact",
    "leakage",
    "median_leakage",
    "mode_responses",
    "ou_variance",
    "pfode_constants",
    "pfode_second_moment",
    "pfode_velocity",
    "positive_allocation",
    "random_features",
    "response_operator",
    "sample_ou_marginal",
    "select_ridge",
    "spectral_split",
    "teacher_constants",
    "teacher_gram_ge",
    "teacher_gram_mc",
    "teacher_score",
    "teacher_top_layer",
    "two_bulk_summary",
]


# ---------------------------------------------------------------------------------------------------------------
# Activations and Gaussian quadrature
# ---------------------------------------------------------------------------------------------------------------


def _tanh_prime(z):
    return 1.0 / np.cosh(z) ** 2


def _erf(z):
    from scipy.special import erf

    return erf(z)


def _erf_prime(z):
    return 2.0 / math.sqrt(math.pi) * np.exp(-(z**2))


# name -> (σ, σ'); only odd activations, so that E[σ(z)] = 0 for centred Gaussian z.
ACTIVATIONS = {
    "tanh": (np.tanh, _tanh_prime),
    "erf": (_erf, _erf_prime),
    "linear": (lambda z: np.asarray(z, dtype=np.float64), lambda z: np.ones_like(np.asarray(z, dtype=np.float64))),
}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)} (odd activations only).")
    return ACTIVATIONS[name]


def _gauss_hermite(order: int = 101):
    """Nodes and weights of E[f(g)], g ~ N(0, 1) (probabilists' Gauss–Hermite)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(order)
    return nodes, weights / math.sqrt(2.0 * math.pi)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def ou_variance(t: float) -> float:
    """Forward variance Δ_t = 1 − e^{-2t} of the OU process dx = −x dt + √2 dB (000 eq. 3.1)."""
    if not t > 0:
        raise ValueError(f"The OU time t must be positive, got {t!r}.")
    return -math.expm1(-2.0 * t)


# ---------------------------------------------------------------------------------------------------------------
# Random features and the teacher (000 §5.2, Lemma 5.2)
# ---------------------------------------------------------------------------------------------------------------


def random_features(d: int, p: int, generator: np.random.Generator, normalize_rows: bool = False) -> np.ndarray:
    """
    Frozen first layer ``F = W/√d`` of shape ``(p, d)``, W with i.i.d. N(0, 1) entries (000 §5.2).

    Args:
        d (`int`): input dimension.
        p (`int`): number of random features.
        generator (`np.random.Generator`): source of randomness.
        normalize_rows (`bool`, *optional*, defaults to `False`):
            rescale each row to unit norm (‖f_i‖ = 1 exactly instead of ≈ 1). Our option, not 000's: it removes the
            O(1/√d) spread of the per-feature constants at small d.

    Returns:
        `np.ndarray`: ``F`` of shape ``(p, d)``; the random-feature metric of 000 B.3.3 is ``G = F @ F.T``.
    """
    d = _check_positive_int("d", d)
    p = _check_positive_int("p", p)
    F = generator.standard_normal((p, d)) / math.sqrt(d)
    if normalize_rows:
        F /= np.linalg.norm(F, axis=1, keepdims=True)
    return F


def features(x: np.ndarray, F: np.ndarray, activation: str = "tanh") -> np.ndarray:
    """φ(x) = σ(F x)/√p for the rows of ``x`` (shape ``(N, d)``); returns ``(N, p)``."""
    sigma, _ = _activation(activation)
    return sigma(x @ F.T) / math.sqrt(F.shape[0])


@dataclass
class TeacherConstants:
    """
    Gaussian-equivalence constants of the noisy features at OU time t (the scalars of 000 eqs. 5.6-5.7).

    With u = f·x₀ (fixed per training point) and g = f·ξ (fresh noise), the pre-activation is h = e^{-t}u + √Δ_t g,
    h ~ N(0, 1). σ̄(u) = E_g σ(h) is the noise-averaged feature of one training point.

    Attributes:
        t (`float`): OU time.
        delta_t (`float`): Δ_t = 1 − e^{-2t}.
        mu1 (`float`): μ₁ = E[σ'(h)], the linear coefficient (Stein's lemma).
        c1 (`float`): E[u σ̄(u)] = e^{-t} μ₁, linear part of the per-sample feature.
        s2 (`float`): E[σ̄(u)²] − c₁², the per-sample nonlinear part; it drives the memorization bulk of U.
        v2 (`float`): E[σ(h)²] − E[σ̄(u)²] − Δ_t μ₁², the noise nonlinear part; it sets the isotropic floor of U.
        mu_star2 (`float`): E[σ(h)²] − μ₁² = s2 + v2, the nonlinear part of the population feature.
    """

    t: float
    delta_t: float
    mu1: float
    c1: float
    s2: float
    v2: float
    mu_star2: float


def teacher_constants(t: float, activation: str = "tanh", order: int = 101) -> TeacherConstants:
    """
    The scalars of the Gaussian-equivalent teacher Gram (000 eq. 5.6) by two-dimensional Gauss–Hermite
    quadrature. 000 B.3.2 estimates them by Monte Carlo; quadrature is our choice (deterministic, ~1e-12 accurate).
    """
    sigma, sigma_prime = _activation(activation)
    delta = ou_variance(t)
    a, b = math.exp(-t), math.sqrt(delta)
    nodes, weights = _gauss_hermite(order)
    h = a * nodes[:, None] + b * nodes[None, :]  # (u, g) grid
    sig = sigma(h)
    sig_bar = sig @ weights  # E_g σ(h) per node of u
    mu1 = float(weights @ sigma_prime(h) @ weights)
    m2 = float(weights @ sig**2 @ weights)
    bar2 = float(weights @ sig_bar**2)
    c1 = float(weights @ (nodes * sig_bar))
    s2 = max(bar2 - c1**2, 0.0)
    v2 = max(m2 - bar2 - delta * mu1**2, 0.0)
    return TeacherConstants(t=t, delta_t=delta, mu1=mu1, c1=c1, s2=s2, v2=v2, mu_star2=max(m2 - mu1**2, 0.0))


def sample_ou_marginal(X: np.ndarray, t: float, num_samples: int, generator: np.random.Generator) -> np.ndarray:
    """``num_samples`` draws of the empirical OU marginal at time t: x = e^{-t} X[ν] + √Δ_t ξ, ν uniform."""
    num_samples = _check_positive_int("num_samples", num_samples)
    idx = generator.integers(0, X.shape[0], size=num_samples)
    xi = generator.standard_normal((num_samples, X.shape[1]))
    return math.exp(-t) * X[idx] + math.sqrt(ou_variance(t)) * xi


def teacher_gram_mc(
    F: np.ndarray,
    X: np.ndarray,
    t: float,
    generator: np.random.Generator,
    noise_per_sample: int = 64,
    activation: str = "tanh",
    batch_size: int = 8192,
):
    """
    Monte-Carlo teacher Gram U = E[φ(x_t) φ(x_t)ᵀ] and cross-covariance V = E[φ(x_t) ξᵀ] over the training set
    (000 Lemma 5.2), with ``noise_per_sample`` noise draws per training point. The noise draws come in antithetic
    pairs (ξ, −ξ), our choice, which halves the variance of V.

    Args:
        F (`np.ndarray`): random features, shape ``(p, d)``.
        X (`np.ndarray`): training set, shape ``(n, d)``.
        t (`float`): OU time.
        generator (`np.random.Generator`): source of the noise.
        noise_per_sample (`int`, *optional*, defaults to 64): noise draws per training point (rounded up to even).
        activation (`str`, *optional*, defaults to `"tanh"`): σ.
        batch_size (`int`, *optional*, defaults to 8192): rows per feature batch.

    Returns:
        `Tuple[np.ndarray, np.ndarray]`: ``U`` of shape ``(p, p)`` and ``V`` of shape ``(p, d)``.
    """
    m = _check_positive_int("noise_per_sample", noise_per_sample)
    half = (m + 1) // 2
    n, d = X.shape
    p = F.shape[0]
    a, b = math.exp(-t), math.sqrt(ou_variance(t))
    U = np.zeros((p, p))
    V = np.zeros((p, d))
    rows = np.repeat(np.arange(n), half)
    for start in range(0, rows.size, max(1, batch_size // 2)):
        idx = rows[start : start + max(1, batch_size // 2)]
        xi = generator.standard_normal((idx.size, d))
        xi = np.concatenate([xi, -xi])
        phi = features(a * X[np.concatenate([idx, idx])] + b * xi, F, activation)
        U += phi.T @ phi
        V += phi.T @ xi
    count = 2 * rows.size
    return U / count, V / count


def teacher_gram_ge(
    F: np.ndarray,
    X: np.ndarray,
    t: float,
    generator: np.random.Generator,
    activation: str = "tanh",
    constants: TeacherConstants | None = None,
):
    """
    Gaussian-equivalent teacher Gram and cross-covariance (000 eqs. 5.6-5.7, after Bonnaire et al. 2025 Lemmas
    C.1 and C.4), in our reconstruction:

        U = (1/p) · [ (1/n)(c₁ F Xᵀ + s Ω)(c₁ F Xᵀ + s Ω)ᵀ + Δ_t μ₁² F Fᵀ + v² I_p ],
        V = √Δ_t μ₁ F / √p,

    with Ω ∈ R^{p×n} i.i.d. N(0, 1) independent of X. The first term (rank ≤ n) is the noise-averaged feature of each
    training point, the second the linear response to the noise, the third the nonlinear noise part. For p > n the
    n directions of Ω form the small-eigenvalue (memorization) bulk, range(F) the large-eigenvalue (generalization)
    bulk, and the remaining p − n − d directions sit at the floor v²/p.

    Returns:
        `Tuple[np.ndarray, np.ndarray]`: ``U`` of shape ``(p, p)`` and ``V`` of shape ``(p, d)``.
    """
    c = constants if constants is not None else teacher_constants(t, activation)
    n = X.shape[0]
    p = F.shape[0]
    omega = generator.standard_normal((p, n))
    Z = c.c1 * (F @ X.T) + math.sqrt(c.s2) * omega  # (p, n)
    U = (Z @ Z.T / n + c.delta_t * c.mu1**2 * (F @ F.T)) / p
    U[np.diag_indices_from(U)] += c.v2 / p
    V = math.sqrt(c.delta_t) * c.mu1 * F / math.sqrt(p)
    return U, V


def eigh(matrix: np.ndarray):
    """Eigenvalues (ascending) and eigenvectors (columns) of the symmetric part of ``matrix`` (LAPACK ``evr``)."""
    from scipy.linalg import eigh as _eigh

    return _eigh((matrix + matrix.T) / 2, driver="evr")


def teacher_top_layer(
    U: np.ndarray,
    V: np.ndarray,
    t: float,
    ridge: float = 0.0,
    train_time: float | None = None,
    rcond: float = 1e-12,
) -> np.ndarray:
    """
    Teacher top layer A trained by gradient flow from A = 0 on the DSM loss at time t (000 Lemma 5.2, eq. 5.5):

        A(τ) = −(1/√Δ_t) Vᵀ (U + λI)⁻¹ (I − exp(−(2Δ_t τ/d)(U + λI))),
        A(∞) = −(1/√Δ_t) Vᵀ (U + λI)⁻¹.

    Directions with U + λI ≈ 0 (below ``rcond`` times the largest eigenvalue) never move under gradient flow
    from zero, so they are dropped (the pseudo-inverse).

    Args:
        U (`np.ndarray`): teacher Gram, ``(p, p)``.
        V (`np.ndarray`): cross-covariance E[φ ξᵀ], ``(p, d)``.
        t (`float`): OU time.
        ridge (`float`, *optional*, defaults to 0): λ ≥ 0 added to U (a ridge on the DSM loss).
        train_time (`float`, *optional*): gradient-flow time τ; `None` means converged (τ = ∞).
        rcond (`float`, *optional*, defaults to 1e-12): relative cut-off of the pseudo-inverse.

    Returns:
        `np.ndarray`: A of shape ``(d, p)``.
    """
    if ridge < 0:
        raise ValueError(f"The ridge must be non-negative, got {ridge!r}.")
    if train_time is not None and train_time < 0:
        raise ValueError(f"The training time must be non-negative, got {train_time!r}.")
    delta = ou_variance(t)
    if train_time is None:
        solved = _spd_solve(U, V, ridge)  # (U + λI)⁻¹ V
        if solved is not None:
            return -solved.T / math.sqrt(delta)
    lam, vec = eigh(U)
    lam = lam + ridge
    keep = lam > rcond * max(lam.max(), 0.0)
    inv = np.zeros_like(lam)
    inv[keep] = 1.0 / lam[keep]
    if train_time is not None:
        d = V.shape[1]
        inv = inv * -np.expm1(-2.0 * delta * train_time / d * np.clip(lam, 0.0, None))
    return -(V.T @ vec) * inv @ vec.T / math.sqrt(delta)


def _spd_solve(U: np.ndarray, rhs: np.ndarray, ridge: float = 0.0, max_condition: float = 1e12):
    """(U + λI)⁻¹ rhs by Cholesky when U + λI is well-conditioned positive definite, else `None`."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve

    mat = (U + U.T) / 2 + ridge * np.eye(U.shape[0])
    try:
        factor = cho_factor(mat, lower=True)
    except LinAlgError:
        return None
    diag = np.diag(factor[0]) ** 2
    if diag.min() <= 0 or diag.max() / diag.min() > max_condition:
        return None
    return cho_solve(factor, rhs)


def teacher_score(x: np.ndarray, A: np.ndarray, F: np.ndarray, activation: str = "tanh") -> np.ndarray:
    """Teacher score s(x) = A φ(x) for the rows of ``x``; returns ``(N, d)``."""
    return features(x, F, activation) @ A.T


def pfode_velocity(x: np.ndarray, A: np.ndarray, F: np.ndarray, activation: str = "tanh") -> np.ndarray:
    """
    Reverse-time velocity of the OU probability-flow ODE dx/dt = −x − s(x) (000 eq. 3.5): v(x) = x + s(x), so that
    one Euler step from t to t − h is x̂ = x + h·v(x) (000 eq. 3.6).
    """
    return x + teacher_score(x, A, F, activation)


def euler_step(x: np.ndarray, A: np.ndarray, F: np.ndarray, h: float, activation: str = "tanh") -> np.ndarray:
    """Teacher-induced one-step target x̂ = x + h·v(x) (000 eq. 3.6) for the rows of ``x``."""
    return x + h * pfode_velocity(x, A, F, activation)


def feature_increment(x: np.ndarray, v: np.ndarray, F: np.ndarray, h: float, activation: str = "tanh") -> np.ndarray:
    """
    Feature increment Δφ = φ(x + h·v) − φ(x) of one Euler step (000 §5.2), shape ``(N, p)``. ``v`` holds the
    velocities at the rows of ``x`` (e.g. [`pfode_velocity`] of the teacher, or any other field).
    """
    return features(x + h * v, F, activation) - features(x, F, activation)


# ---------------------------------------------------------------------------------------------------------------
# The consistency-distillation curvature (000 eq. 5.3, Lemma 5.1, Theorem 5.3)
# ---------------------------------------------------------------------------------------------------------------


def cd_curvature_mc(
    x: np.ndarray, v: np.ndarray, F: np.ndarray, h: float, activation: str = "tanh", batch_size: int = 8192
) -> np.ndarray:
    """
    Monte-Carlo curvature M = E[Δφ Δφᵀ] of the one-step consistency loss (000 eq. 5.3).

    Args:
        x (`np.ndarray`): draws of the OU marginal at time t, ``(N, d)`` (e.g. from [`sample_ou_marginal`]).
        v (`np.ndarray`): the PF-ODE velocity at those draws, ``(N, d)`` (e.g. [`pfode_velocity`]).
        F (`np.ndarray`): random features, ``(p, d)``.
        h (`float`): Euler step.
        activation (`str`, *optional*, defaults to `"tanh"`): σ.
        batch_size (`int`, *optional*, defaults to 8192): rows per batch.

    Returns:
        `np.ndarray`: M of shape ``(p, p)``.
    """
    if x.shape != v.shape:
        raise ValueError(f"x and v must have the same shape, got {x.shape} and {v.shape}.")
    p = F.shape[0]
    M = np.zeros((p, p))
    for start in range(0, x.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        dphi = feature_increment(x[sl], v[sl], F, h, activation)
        M += dphi.T @ dphi
    return M / x.shape[0]


@dataclass
class PFODEConstants:
    """
    Concentrating scalars of the one-step PF-ODE perturbation (000 Assumption 3), estimated by sampling as in
    000 B.3.2: q = E‖x‖²/d, r = E‖v‖²/d and c = E[x·v]/d, with δ = h·v the Euler increment. Also carries the
    second moment ``S = E[v vᵀ]`` of the same samples, ``(d, d)``.
    """

    q: float
    r: float
    c: float
    second_moment: np.ndarray = field(repr=False)


def pfode_constants(x: np.ndarray, v: np.ndarray) -> PFODEConstants:
    """Estimates q, r, c and E[v vᵀ] from draws ``x`` and their velocities ``v``, both ``(N, d)`` (000 B.3.2)."""
    d = x.shape[1]
    return PFODEConstants(
        q=float(np.mean(np.sum(x * x, axis=1)) / d),
        r=float(np.mean(np.sum(v * v, axis=1)) / d),
        c=float(np.mean(np.sum(x * v, axis=1)) / d),
        second_moment=v.T @ v / x.shape[0],
    )


@dataclass
class CurvatureCoefficients:
    """
    Scalars of 000 Lemma 5.1 per unit step: κ is the L²-projection coefficient of the feature increment
    D = σ(z + Δ) − σ(z) onto the pre-activation increment Δ (000 eq. C.1), and ν² the variance of the residual
    R = D − κΔ divided by h² (000 eq. C.2). ``exact`` tells whether they are the finite-h values or the small-step
    limits κ̄, ν̄² (000 eqs. C.7, C.10).
    """

    kappa: float
    nu2: float
    exact: bool


def increment_coefficients(q: float, r: float, c: float, activation: str = "tanh", order: int = 101):
    """
    Small-step limits of 000 Lemma 5.1 (our reconstruction of eqs. C.7 and C.10). With z ~ N(0, q) and the
    normalised increment Δ̃ = Δ/h jointly Gaussian, Var Δ̃ = r, Cov(z, Δ̃) = c:

        κ̄  = E[σ'(z)] + c²/(q² r) · E[σ'(z)(z² − q)],
        ν̄² = E[σ'(z)²](r − c²/q) + (c²/q²) E[σ'(z)² z²] − κ̄² r.

    Returns:
        [`CurvatureCoefficients`] with ``exact=False``.
    """
    if q <= 0 or r <= 0:
        raise ValueError(f"q and r must be positive, got q={q!r}, r={r!r}.")
    _, sigma_prime = _activation(activation)
    nodes, weights = _gauss_hermite(order)
    z = math.sqrt(q) * nodes
    sp = sigma_prime(z)
    e1 = float(weights @ sp)
    e1z = float(weights @ (sp * (z**2 - q)))
    e2 = float(weights @ sp**2)
    e2z = float(weights @ (sp**2 * z**2))
    kappa = e1 + c**2 / (q**2 * r) * e1z
    nu2 = e2 * (r - c**2 / q) + c**2 / q**2 * e2z - kappa**2 * r
    return CurvatureCoefficients(kappa=kappa, nu2=max(nu2, 0.0), exact=False)


def increment_coefficients_exact(
    q: float, r: float, c: float, h: float, activation: str = "tanh", order: int = 101
) -> CurvatureCoefficients:
    """
    Finite-step values of 000 Lemma 5.1 for the increment Δ = h·Δ̃ (Var Δ = h²r, Cov(z, Δ) = h c):
    κ_h = E[DΔ]/E[Δ²] = ((hc + h²r)·E σ'(z+Δ) − hc·E σ'(z)) / (h²r) by Stein's lemma, and
    ν_h² = (E[D²] − κ_h² h² r)/h² by two-dimensional quadrature. They tend to [`increment_coefficients`] as h → 0.
    """
    if q <= 0 or r <= 0 or h <= 0:
        raise ValueError(f"q, r and h must be positive, got q={q!r}, r={r!r}, h={h!r}.")
    sigma, sigma_prime = _activation(activation)
    nodes, weights = _gauss_hermite(order)
    cz, rz = h * c, h * h * r
    var_y = q + 2 * cz + rz
    if var_y <= 0:
        raise ValueError("The step makes Var(z + Δ) non-positive; decrease h.")
    e_sp_y = float(weights @ sigma_prime(math.sqrt(var_y) * nodes))
    e_sp_z = float(weights @ sigma_prime(math.sqrt(q) * nodes))
    kappa = ((cz + rz) * e_sp_y - cz * e_sp_z) / rz
    # (z, Δ) = (√q g₁, (cz/√q) g₁ + √(rz − cz²/q) g₂).
    g1, g2 = nodes[:, None], nodes[None, :]
    z = math.sqrt(q) * g1
    delta = cz / math.sqrt(q) * g1 + math.sqrt(max(rz - cz**2 / q, 0.0)) * g2
    D = sigma(z + delta) - sigma(z)
    ed2 = float(weights @ D**2 @ weights)
    ed = float(weights @ D @ weights)
    nu2 = (ed2 - ed**2 - kappa**2 * rz) / h**2
    return CurvatureCoefficients(kappa=kappa, nu2=max(nu2, 0.0), exact=True)


def pfode_second_moment(F: np.ndarray, U: np.ndarray, mu1: float, ridge: float = 0.0) -> np.ndarray:
    """
    Closed-form second moment of the PF-ODE velocity under the converged teacher (our reconstruction of 000
    eqs. C.15-C.18): with E[x xᵀ] = I, E[x φᵀ] = μ₁ Fᵀ/√p (Stein) and E[φ φᵀ] = U,

        E[v vᵀ] = I − (μ₁²/p) Fᵀ (U + λI)⁻¹ F.

    For λ > 0 this is the ridge form 000 uses in eq. B.11 (the exact second moment of a ridge teacher would add
    −(μ₁²/p) λ Fᵀ(U + λI)⁻²F). Returns ``(d, d)``.
    """
    p, d = F.shape
    S = np.eye(d) - mu1**2 / p * F.T @ _resolvent_times(U, F, ridge)
    return (S + S.T) / 2


def response_operator(F: np.ndarray, U: np.ndarray, mu1: float, ridge: float = 0.0) -> np.ndarray:
    """
    Non-isotropic response operator of 000 eq. B.11: K_λ = G − (μ₁²/p) G (U + λI)⁻¹ G with G = F Fᵀ, i.e.
    F·E[v vᵀ]·Fᵀ for the closed-form second moment of [`pfode_second_moment`]. Returns ``(p, p)``.
    """
    p = F.shape[0]
    # G (U + λI)⁻¹ G = F [Fᵀ (U + λI)⁻¹ F] Fᵀ: one solve with d right-hand sides.
    inner = F.T @ _resolvent_times(U, F, ridge)
    K = F @ (np.eye(F.shape[1]) - mu1**2 / p * inner) @ F.T
    return (K + K.T) / 2


def _resolvent_times(U: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    solved = _spd_solve(U, rhs, ridge, max_condition=np.inf)
    if solved is None:
        solved = np.linalg.solve(U + ridge * np.eye(U.shape[0]), rhs)
    return solved


def cd_curvature_ge(
    F: np.ndarray,
    coefficients: CurvatureCoefficients,
    h: float,
    second_moment: np.ndarray | None = None,
    U: np.ndarray | None = None,
    mu1: float | None = None,
    ridge: float = 0.0,
) -> np.ndarray:
    """
    Gaussian-equivalent curvature of the one-step consistency loss (000 Lemma 5.1 and Theorem 5.3):

        M = (h²/p) · (ν² I + κ² F S Fᵀ),

    an isotropic atom plus a structured part in range(G). With ``second_moment`` S given (e.g. a Monte-Carlo
    E[v vᵀ] from [`pfode_constants`]) this is Lemma 5.1 alone; otherwise S is the closed form of
    [`pfode_second_moment`] (needs ``U`` and ``mu1``), and F S Fᵀ is the operator K_λ of 000 eq. B.11.

    Returns:
        `np.ndarray`: M of shape ``(p, p)``.
    """
    p = F.shape[0]
    if second_moment is not None:
        K = F @ second_moment @ F.T
        K = (K + K.T) / 2
    else:
        if U is None or mu1 is None:
            raise ValueError("Pass either `second_moment` or both `U` and `mu1`.")
        K = response_operator(F, U, mu1, ridge)
    M = coefficients.kappa**2 * h**2 / p * K
    M[np.diag_indices_from(M)] += h**2 * coefficients.nu2 / p
    return M


def curvature_atom(coefficients: CurvatureCoefficients, h: float, F: np.ndarray, rtol: float = 1e-10):
    """
    The isotropic atom of M (000 §5.3): every u ∈ ker G has K u = 0, hence M u = (h²ν²/p) u. Since rank G ≤ d, the
    atom has multiplicity at least p − rank(F) (= p − d for p > d, generic F), and at most rank(F) eigenvalues of M
    lie off it.

    Returns:
        `Tuple[float, int]`: the atom h²ν²/p and its predicted multiplicity p − rank(F).
    """
    p = F.shape[0]
    s = np.linalg.svd(F, compute_uv=False)
    rank = int(np.sum(s > rtol * s.max()))
    return h**2 * coefficients.nu2 / p, p - rank


def atom_multiplicity(eigenvalues: np.ndarray, atom: float, rtol: float = 1e-6) -> int:
    """Number of eigenvalues within ``rtol·|atom|`` of the atom: the measured side of 000 §5.3's rank argument."""
    return int(np.sum(np.abs(np.asarray(eigenvalues) - atom) <= rtol * abs(atom)))


# ---------------------------------------------------------------------------------------------------------------
# Spectral split and per-mode diagnostics (000 §5.4, App. B.3.1, D.4)
# ---------------------------------------------------------------------------------------------------------------


def auto_threshold(eigenvalues: np.ndarray, max_generalization: int | None = None) -> float:
    """
    A Mem/Gen threshold for the spectrum of U. 000 uses a fixed threshold whose value was lost in extraction; our
    rule puts it at the geometric midpoint of the widest gap in log-eigenvalue among the ``max_generalization``
    largest eigenvalues (all of them when `None`). Passing ``max_generalization = n + d`` keeps the gap between the
    memorization bulk and the isotropic floor of U (the p − n − d smallest eigenvalues) out of the search.
    """
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    lam = lam[lam > 0]
    if lam.size < 2:
        raise ValueError("Need at least two positive eigenvalues to place a threshold.")
    top = lam if max_generalization is None else lam[: max(2, min(lam.size, max_generalization))]
    gaps = np.log(top[:-1]) - np.log(top[1:])
    k = int(np.argmax(gaps))
    return float(math.sqrt(top[k] * top[k + 1]))


def spectral_split(eigenvalues: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of memorization modes, λ_k < threshold (000 §5.4 "Mem/Gen partition"); Gen is its complement."""
    return np.asarray(eigenvalues) < threshold


def two_bulk_summary(eigenvalues: np.ndarray, threshold: float, floor_rtol: float = 1e-6) -> dict:
    """
    Counts and edges of the two bulks of the teacher Gram spectrum (000 Fig. 2a), plus the size of the atom at the
    smallest eigenvalue (the isotropic floor of U, present when p > n + d).
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    mem = lam < threshold
    floor = lam.min()
    at_floor = np.abs(lam - floor) <= floor_rtol * max(abs(floor), 1e-300)
    return {
        "threshold": float(threshold),
        "num_mem": int(mem.sum()),
        "num_gen": int((~mem).sum()),
        "mem_edges": [float(lam[mem].min()), float(lam[mem].max())] if mem.any() else None,
        "gen_edges": [float(lam[~mem].min()), float(lam[~mem].max())] if (~mem).any() else None,
        "gap_ratio": float(lam[~mem].min() / lam[mem].max()) if mem.any() and (~mem).any() else None,
        "floor": float(floor),
        "num_at_floor": int(at_floor.sum()),
    }


@dataclass
class ModeResponses:
    """
    Per-teacher-mode diagnostics (000 eqs. 5.9-5.10) along the eigenvectors u_k of U (eigenvalues ascending):
    visibility a_k = u_kᵀ G u_k, resolvent subtraction b_k = u_kᵀ G (U + λI)⁻¹ G u_k, signed response
    r_k = a_k − (μ₁²/p) b_k = u_kᵀ K_λ u_k. r_k < 0 is suppression, r_k > 0 retention. The positive
    factor κ̄²h²/p of M is left out. ``mem`` marks the memorization modes.
    """

    eigenvalues: np.ndarray
    visibility: np.ndarray
    subtraction: np.ndarray
    response: np.ndarray
    mem: np.ndarray
    ridge: float
    coupling: float


def _g_in_eigenbasis(F: np.ndarray, eigenvectors: np.ndarray) -> np.ndarray:
    """The matrix of G in the eigenbasis of U: C[k', k] = u_k'ᵀ G u_k."""
    P = eigenvectors.T @ F  # (p, d)
    return P @ P.T


def mode_responses(
    eigenvalues: np.ndarray,
    eigenvectors: np.ndarray,
    F: np.ndarray,
    mu1: float,
    threshold: float,
    ridge: float = 0.0,
) -> ModeResponses:
    """
    Visibility, resolvent subtraction and signed response of every eigenmode of U (000 eqs. 5.9-5.10).

    Args:
        eigenvalues (`np.ndarray`): eigenvalues λ_k of U, shape ``(p,)``.
        eigenvectors (`np.ndarray`): matching eigenvectors as columns, ``(p, p)``.
        F (`np.ndarray`): random features, ``(p, d)``.
        mu1 (`float`): μ₁ of [`TeacherConstants`]; the subtraction enters with weight μ₁²/p.
        threshold (`float`): Mem/Gen threshold on λ_k.
        ridge (`float`, *optional*, defaults to 0): λ in (U + λI)⁻¹ (000 B.3.3 uses λ*).

    Returns:
        [`ModeResponses`].
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    C = _g_in_eigenbasis(F, eigenvectors)
    visibility = np.diag(C).copy()
    subtraction = (C**2 / (lam + ridge)[:, None]).sum(axis=0)  # Σ_k' (u_k'ᵀGu_k)² / (λ_k' + λ)  (000 eq. B.14)
    coupling = mu1**2 / F.shape[0]
    return ModeResponses(
        eigenvalues=lam,
        visibility=visibility,
        subtraction=subtraction,
        response=visibility - coupling * subtraction,
        mem=spectral_split(lam, threshold),
        ridge=float(ridge),
        coupling=coupling,
    )


def leakage(
    eigenvalues: np.ndarray,
    eigenvectors: np.ndarray,
    F: np.ndarray,
    mem: np.ndarray,
    ridges,
    modes: np.ndarray | None = None,
) -> np.ndarray:
    """
    Inverse-weighted memorization leakage of 000 eq. B.15, for each mode j and ridge λ:

        L_j(λ) = Σ_{k ∈ Mem} (u_kᵀ G u_j)² / (λ_k + λ)  /  Σ_k (u_kᵀ G u_j)² / (λ_k + λ),

    the share of the resolvent energy b_j = ‖(U + λI)^{-1/2} G u_j‖² (000 eqs. B.13-B.14) that comes from Mem
    directions. When every Mem eigenvalue lies below every Gen eigenvalue, L_j(λ) is non-increasing in λ.

    Args:
        eigenvalues (`np.ndarray`): λ_k of U, ``(p,)``.
        eigenvectors (`np.ndarray`): eigenvectors of U as columns, ``(p, p)``.
        F (`np.ndarray`): random features, ``(p, d)``.
        mem (`np.ndarray`): boolean Mem mask, ``(p,)``.
        ridges (`Sequence[float]`): ridge values λ ≥ 0.
        modes (`np.ndarray`, *optional*): indices (or mask) of the modes j; defaults to the Gen modes.

    Returns:
        `np.ndarray`: leakage of shape ``(len(modes), len(ridges))``, NaN where G u_j = 0.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    ridges = np.atleast_1d(np.asarray(ridges, dtype=np.float64))
    if np.any(ridges < 0):
        raise ValueError("Ridges must be non-negative.")
    mem = np.asarray(mem, dtype=bool)
    cols = np.flatnonzero(~mem) if modes is None else np.asarray(modes)
    P = eigenvectors.T @ F
    W2 = (P @ P[cols].T) ** 2  # (p, |modes|): (u_kᵀ G u_j)²
    out = np.empty((W2.shape[1], ridges.size))
    for i, ridge in enumerate(ridges):
        inv = 1.0 / (lam + ridge)
        if not np.all(np.isfinite(inv)) or np.any(inv < 0):
            raise ValueError("U + λI must be positive definite; increase the ridge.")
        num = (W2[mem] * inv[mem, None]).sum(axis=0)
        den = (W2 * inv[:, None]).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, i] = num / den
    return out


def median_leakage(leak: np.ndarray) -> np.ndarray:
    """Median over modes (rows) of [`leakage`], one value per ridge: the GEN median leakage of 000 Fig. 6."""
    return np.nanmedian(leak, axis=0)


def select_ridge(ridges, median_leak, epsilon: float) -> float | None:
    """
    Minimal sufficient ridge of 000 eq. B.17: λ* = min{λ : median_{j ∈ Gen} L_j(λ) ≤ ε} over the given grid;
    `None` when no ridge on the grid reaches the tolerance.
    """
    if not 0 < epsilon < 1:
        raise ValueError(f"The leakage tolerance must lie in (0, 1), got {epsilon!r}.")
    ridges = np.asarray(ridges, dtype=np.float64)
    order = np.argsort(ridges)
    ok = np.asarray(median_leak)[order] <= epsilon
    return float(ridges[order][np.argmax(ok)]) if ok.any() else None


def positive_allocation(response: np.ndarray, mem: np.ndarray) -> float:
    """
    Global allocation of positive non-isotropic updates (000 §5.4 (III)): Π_Gen = R⁺_Gen / (R⁺_Gen + R⁺_Mem) with
    R⁺_S = Σ_{k ∈ S} max(r_k, 0). NaN when no mode has a positive response.
    """
    pos = np.clip(np.asarray(response, dtype=np.float64), 0.0, None)
    mem = np.asarray(mem, dtype=bool)
    total = pos.sum()
    return float(pos[~mem].sum() / total) if total > 0 else float("nan")
