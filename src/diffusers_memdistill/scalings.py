"""Noise schedules and network preconditionings: the single home of every scaling formula.

Every scheduler, denoiser wrapper and loss of the package takes its ``c_skip``/``c_out``/``c_in``/``c_noise``
from here. The module depends only on ``math`` and ``torch`` so that it can be inlined into the single-file
pipelines that saved models ship.

References: EDM = Karras et al. 2022, "Elucidating the design space of diffusion-based generative models";
CM = Song et al. 2023, "Consistency models"; LCM = Luo et al. 2023, "Latent consistency models".
"""

import torch


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, append_zero: bool = True
) -> torch.Tensor:
    """Karras noise levels, decreasing from ``sigma_max`` to ``sigma_min`` (EDM eq. 5), computed in float64.

    Args:
        num_steps (`int`): number N >= 2 of noise levels before the optional final zero.
        sigma_min, sigma_max, rho (`float`): the grid's ends and its curvature.
        append_zero (`bool`): append sigma_N = 0, as the samplers need.

    Returns:
        `torch.Tensor` of shape `(N,)` or `(N + 1,)`, dtype float64.
    """
    if num_steps < 2:
        raise ValueError(f"The Karras grid needs at least 2 noise levels, got num_steps={num_steps}.")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
    ramp = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def _as_float32(sigma) -> torch.Tensor:
    return torch.as_tensor(sigma).to(torch.float32)


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions so that a per-sample `(B,)` tensor broadcasts over `(B, ...)`."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def edm_scalings(sigma, sigma_data: float = 0.5):
    """EDM preconditioning (EDM Table 1): ``(c_skip, c_out, c_in, c_noise)`` in float32.

    D(x; sigma) = c_skip * x + c_out * F(c_in * x; c_noise), with
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma * sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
    c_noise = ln(sigma) / 4.
    """
    sigma = _as_float32(sigma)
    sd2 = sigma_data**2
    total = sigma**2 + sd2
    c_skip = sd2 / total
    c_out = sigma * sigma_data / total.sqrt()
    c_in = 1 / total.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_scale_input(sample: torch.Tensor, sigma, sigma_data: float = 0.5) -> torch.Tensor:
    """The UNet's input c_in(sigma) * x, for a scalar or per-sample ``sigma`` (a scheduler's ``scale_model_input``)."""
    sigma = torch.as_tensor(sigma, device=sample.device, dtype=torch.float32)
    return append_dims(edm_scalings(sigma, sigma_data)[2], sample.ndim) * sample


def edm_sigma_from_c_noise(c_noise) -> torch.Tensor:
    """The noise level of an EDM timestep, the inverse of c_noise = ln(sigma) / 4: sigma = exp(4 c_noise), float32."""
    return (4 * _as_float32(c_noise)).exp()


def precondition_output(sample: torch.Tensor, model_output: torch.Tensor, c_skip, c_out) -> torch.Tensor:
    """The preconditioned output c_skip * x + c_out * F (EDM eq. 7; CM eq. 5) in float32, for scalar or per-sample
    scalings of shape `(B,)`; `sample` and `model_output` may have any shape `(B, ...)` (pixels or latents)."""
    c_skip = torch.as_tensor(c_skip, device=sample.device, dtype=torch.float32)
    c_out = torch.as_tensor(c_out, device=sample.device, dtype=torch.float32)
    ndim = sample.ndim
    return append_dims(c_skip, ndim) * sample.float() + append_dims(c_out, ndim) * model_output.float()


def consistency_scalings(sigma, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """Consistency-model boundary scalings (CM App. C; 000 eq. B.2): ``(c_skip, c_out)`` in float32.

    c_skip = sd^2 / ((sigma - eps)^2 + sd^2), c_out = sd * (sigma - eps) / sqrt(sd^2 + sigma^2), eps = sigma_min,
    so that c_skip(eps) = 1 and c_out(eps) = 0: the student satisfies f(x, eps) = x exactly.
    """
    sigma = _as_float32(sigma)
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = sigma_data * shifted / (sigma_data**2 + sigma**2).sqrt()
    return c_skip, c_out


def lcm_scalings(timesteps, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM boundary scalings on integer DDPM timesteps (LCM eq. 9; SPEC §3): ``(c_skip, c_out)`` in float32.

    With scaled t = t * timestep_scaling (diffusers' ``timestep_scaling=10``, i.e. t / 0.1):
    c_skip = sd^2 / (scaled_t^2 + sd^2), c_out = scaled_t / sqrt(scaled_t^2 + sd^2), so f(z, 0) = z.
    """
    t = _as_float32(timesteps) * timestep_scaling
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t / (t**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def edm_loss_weight(sigma, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2 (EDM Table 1), float32."""
    sigma = _as_float32(sigma)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
