"""Probability-flow ODE solver steps for the variance-exploding path x_sigma = x_0 + sigma * n (EDM).

All steps share one signature, ``step(denoiser, x, sigma, sigma_next, **cond) -> x_next``, where ``denoiser``
is any callable ``D(x, sigma, **cond)`` returning the denoised estimate (k-diffusion's model contract). They are
used by the samplers and by the distillation losses alike. ``sigma`` and ``sigma_next`` are scalars or per-sample
tensors of shape ``(B,)``.
"""

import torch


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))


def ode_derivative(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """dx/dsigma = (x - D(x; sigma)) / sigma of the EDM probability-flow ODE (EDM eq. 3 with s = 1)."""
    return (x - denoised) / _per_sample(sigma, x)


def euler_update(x: torch.Tensor, derivative: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """x + (sigma_next - sigma) * d."""
    return x + (_per_sample(sigma_next, x) - _per_sample(sigma, x)) * derivative


def heun_correction(x: torch.Tensor, derivative, derivative_next, sigma, sigma_next) -> torch.Tensor:
    """Second-order (trapezoidal) correction of EDM Alg. 1, line 8: x + (sigma_next - sigma) * (d + d') / 2."""
    return euler_update(x, 0.5 * (derivative + derivative_next), sigma, sigma_next)


def euler_step(denoiser, x: torch.Tensor, sigma, sigma_next, **cond) -> torch.Tensor:
    """One Euler step of the PF-ODE from ``sigma`` to ``sigma_next`` (1 network evaluation)."""
    d = ode_derivative(x, denoiser(x, sigma, **cond), sigma)
    return euler_update(x, d, sigma, sigma_next)


def heun_step(denoiser, x: torch.Tensor, sigma, sigma_next, **cond) -> torch.Tensor:
    """One Heun step of the PF-ODE (EDM Alg. 1): Euler, then the trapezoidal correction unless sigma_next = 0.

    The correction is skipped per sample where ``sigma_next == 0`` (2 network evaluations otherwise).
    """
    d = ode_derivative(x, denoiser(x, sigma, **cond), sigma)
    x_next = euler_update(x, d, sigma, sigma_next)
    sigma_next_t = _per_sample(sigma_next, x)
    if bool((sigma_next_t > 0).any()):
        safe_next = torch.where(sigma_next_t > 0, sigma_next_t, torch.ones_like(sigma_next_t)).flatten()
        d_next = ode_derivative(x_next, denoiser(x_next, safe_next, **cond), safe_next)
        x_next = torch.where(sigma_next_t > 0, heun_correction(x, d, d_next, sigma, sigma_next), x_next)
    return x_next
