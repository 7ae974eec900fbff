"""Probability-flow ODE solver steps for the variance-exploding path x_sigma = x_0 + sigma * n (EDM).

All steps share one signature, ``step(denoiser, x, sigma, sigma_next, **cond) -> x_next``, where ``denoiser``
is any callable ``D(x, sigma, **cond)`` returning the denoised estimate (k-diffusion's model contract). They are
used by the samplers and by the distillation losses alike. ``sigma`` and ``sigma_next`` are scalars or per-sample
tensors of shape ``(B,)``. `sample_ode` chains steps over a grid of levels (k-diffusion's sampler contract), and
`refine` is the "+refine" control of 000 App. A: re-noise a sample to a level sigma and integrate the ODE back to 0.
"""

import torch

from .scalings import karras_sigmas


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


def sample_ode(denoiser, x: torch.Tensor, sigmas, step=heun_step, **cond) -> torch.Tensor:
    """Integrate the PF-ODE from ``sigmas[0]`` through the decreasing levels ``sigmas`` with ``step`` (one call per
    interval); with `heun_step` and the Karras grid plus a final 0 this is EDM's deterministic sampler (Alg. 1)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = step(denoiser, x, float(sigma), float(sigma_next), **cond)
    return x


def refine(
    denoiser,
    x: torch.Tensor,
    sigma: float,
    noise: torch.Tensor,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    rho: float = 7.0,
    step=heun_step,
    **cond,
) -> torch.Tensor:
    """Prior-guided refinement of samples ``x`` (000 App. A, the PD+refine and DMD+refine rows): perturb them to the
    level ``sigma``, x_sigma = x + sigma n, and reconstruct with the teacher's EDM PF-ODE (Heun, EDM Alg. 1) on the
    Karras grid of ``num_steps`` levels from ``sigma`` down to ``sigma_min``, then 0.

    At ``sigma = 0`` the input comes back unchanged; as ``sigma`` grows, x_sigma / sigma -> n and the result tends to
    the teacher's own sample from the noise n (at ``sigma = sigma_max`` with the teacher's grid it is the teacher's
    sampler started from sigma_max n + x). A level at or below ``sigma_min`` takes one step to 0,
    x -> D(x_sigma; sigma).

    Args:
        denoiser (`Callable`): the teacher's D(x, sigma, **cond) (e.g. `EDMDenoiser`).
        x (`torch.Tensor`): the samples to refine, (B, ...) in the teacher's data range ([-1, 1] for images).
        sigma (`float`): the level they are perturbed to (>= 0).
        noise (`torch.Tensor`): unit-variance noise n of the shape of ``x``.
        num_steps (`int`, defaults to 18): Karras levels of the reconstruction (2 * num_steps - 1 network
            evaluations with Heun).
        sigma_min (`float`, defaults to 0.002), rho (`float`, defaults to 7.0): the teacher's grid.
        step (`Callable`, defaults to `heun_step`): the ODE step.
        **cond: passed to the denoiser (``class_labels``).

    Returns:
        `torch.Tensor`: the refined samples, float32.
    """
    sigma = float(sigma)
    if not sigma >= 0:
        raise ValueError(f"The refinement level sigma must be >= 0, got {sigma}.")
    if noise.shape != x.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, the samples {tuple(x.shape)}.")
    x = x.float()
    if sigma == 0:
        return x.clone()
    if sigma <= sigma_min:
        sigmas = [sigma, 0.0]
    else:
        sigmas = karras_sigmas(num_steps, sigma_min, sigma, rho).tolist()
    # Perturb to sigma, then the PF-ODE back to 0.
    return sample_ode(denoiser, x + sigma * noise.to(x.device, torch.float32), sigmas, step, **cond)
