"""The denoising loss of Stable Diffusion (latent DDPM, Rombach et al. 2022; Ho et al. 2020 eq. 14): predict the noise
(or v) added to VAE latents at a uniformly drawn discrete timestep, conditioned on the prompt's text embedding."""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def sample_latents(moments: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None,
                   shift_factor: float | None = None) -> torch.Tensor:
    r"""A draw z = (mean + std * n - shift) * scaling_factor from the VAE posterior N(mean, std^2) whose parameters
    ``moments`` = cat(mean, logvar) along channels (what ``AutoencoderKL.encode(x).latent_dist.parameters`` holds):
    the latents of SD training, drawn anew at every step although the encoder ran once."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp of diffusers' DiagonalGaussianDistribution
    z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
    return (z - (shift_factor or 0.0)) * scaling_factor


class LatentDiffusionLoss:
    r"""Per-sample loss ||F(z_t, t, c) - target||^2 (mean over latent elements) with t ~ U{t_min, ..., t_max} (default
    U{0, ..., T-1}),
    z_t = sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) n, and target n (``"epsilon"``) or
    v = sqrt(alpha_bar_t) n - sqrt(1 - alpha_bar_t) z (``"v_prediction"``).

    Args:
        noise_scheduler (`DDPMScheduler`): the model's training schedule (its ``add_noise`` and ``get_velocity``).
        prediction_type (`str`, *optional*): defaults to the scheduler's.
        timestep_range (`tuple[int, int]`, *optional*): (t_min, t_max), inclusive, the drawn timesteps (DMD's fake
            score trains on the range its generator loss draws); defaults to every training timestep.
    """

    def __init__(self, noise_scheduler, prediction_type: str | None = None,
                 timestep_range: tuple[int, int] | None = None):
        self.scheduler = noise_scheduler
        self.prediction_type = prediction_type or noise_scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Unknown prediction type {self.prediction_type!r}; choose one of {PREDICTION_TYPES}.")
        num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.timestep_range = (0, num_train_timesteps - 1) if timestep_range is None else tuple(timestep_range)
        if not 0 <= self.timestep_range[0] <= self.timestep_range[1] < num_train_timesteps:
            raise ValueError(f"timestep_range {self.timestep_range} must lie in [0, {num_train_timesteps - 1}].")

    def __call__(self, unet, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 generator: torch.Generator | None = None):
        """Args: ``unet`` a `UNet2DConditionModel`; ``latents`` scaled latents z (B, C, h, w); ``encoder_hidden_states``
        the prompts' text embeddings (B, L, D).

        Returns: ``(loss, logs)``: the per-sample loss of shape (B,) and a dict with the drawn ``timesteps``.
        """
        batch, device = latents.shape[0], latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device)
        low, high = self.timestep_range
        timesteps = torch.randint(low, high + 1, (batch,), generator=generator, device=device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        model_output = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = (model_output.float() - target.float()).square().flatten(1).mean(1)
        return loss, {"timesteps": timesteps}
