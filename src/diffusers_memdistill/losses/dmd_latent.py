"""Distribution matching distillation of a latent DDPM teacher (Stable Diffusion; DMD2 on SD v1.5; SPEC §5).

The same objective as `losses.dmd` on the teacher's discrete schedule z_t = sqrt(alpha_bar_t) x_0 + sqrt(1 -
alpha_bar_t) n instead of EDM's x_0 + sigma n (the two are the same process, sigma_t = sqrt((1 - alpha_bar_t) /
alpha_bar_t), Karras et al. 2022 Tab. 1):

- the generator G_theta(z, c) takes K fixed timesteps t_0 > ... > t_{K-1} (``generator_timesteps``; one step: 999);
  its first input is pure noise z and each later one its previous output re-noised to t_k with fresh noise, and each
  output is the consistency parameterisation c_skip(t) z_t + c_out(t) x0_hat(z_t, t) of `lcm.lcm_consistency_output`,
  so that diffusers' `LCMScheduler` (``original_inference_steps = K``) samples exactly the trained generator;
- the generator loss draws t ~ U{t_min, ..., t_max} (the [2%, 98%] part of the T training timesteps), noises the
  generator's latents to z_t and takes DMD2's normalised surrogate (`dmd.normalised_matching_loss`) of the fake
  UNet's x_0 prediction against the teacher's, guided: x0_u + g (x0_c - x0_u) with the empty prompt's embedding as
  the unconditional branch (DMD2: g = 1.75 for SD v1.5), both branches in one fused teacher call;
- the fake UNet tracks the generator's law by the teacher's own denoising loss (`latent_diffusion.LatentDiffusionLoss`)
  on detached generator latents, at timesteps of the same range.

Every function takes networks and tensors; every loss is returned per sample.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .dmd import normalised_matching_loss
from .latent_diffusion import LatentDiffusionLoss
from .lcm import guided, lcm_consistency_output, predicted_original_and_noise


def generator_timesteps_grid(num_train_timesteps: int, num_steps: int) -> list:
    """The K-step generator's timesteps T - 1, T - 1 - c, ..., c - 1 (c = T / K): those diffusers' `LCMScheduler`
    samples with ``original_inference_steps = num_inference_steps = K`` (K = 1: [999]; K = 4: [999, 749, 499, 249]).

    Raises:
        ValueError: K does not divide T.
    """
    if num_steps < 1 or num_train_timesteps % num_steps:
        raise ValueError(f"A {num_steps}-step generator needs a step count that divides the teacher's "
                         f"{num_train_timesteps} training timesteps.")
    skip = num_train_timesteps // num_steps
    return [num_train_timesteps - 1 - k * skip for k in range(num_steps)]


def check_generator_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> list:
    """``timesteps`` as ints, checked to be the grid of [`generator_timesteps_grid`] for their count (what a stock
    `LCMScheduler` can sample); a clear error naming the grid otherwise."""
    timesteps = [int(t) for t in timesteps]
    expected = generator_timesteps_grid(num_train_timesteps, len(timesteps)) if timesteps else None
    if timesteps != expected:
        raise ValueError(f"--generator_timesteps {','.join(map(str, timesteps))}: a {len(timesteps)}-step generator "
                         f"samples with LCMScheduler at {','.join(map(str, expected or []))}; pass those.")
    return timesteps


class LatentDMDLoss:
    r"""
    The losses of DMD / DMD2 around a Stable Diffusion teacher (see the module docstring).

    Args:
        noise_scheduler (`DDPMScheduler`): the teacher's training schedule.
        generator_timesteps (sequence of `int`, defaults to `(999,)`): the generator's K timesteps.
        min_step_percent, max_step_percent (`float`): the drawn part [t_min, t_max] of the T timesteps (2%-98%).
        real_guidance_scale (`float`, defaults to 1.75): classifier-free guidance g of the real score (1: none).
        timestep_scaling (`float`, defaults to 10): of the generator's boundary scalings (`LCMScheduler`'s).
    """

    def __init__(self, noise_scheduler, generator_timesteps: Sequence[int] = (999,), min_step_percent: float = 0.02,
                 max_step_percent: float = 0.98, real_guidance_scale: float = 1.75, timestep_scaling: float = 10.0):
        if not 0 <= min_step_percent < max_step_percent <= 1:
            raise ValueError(f"Need 0 <= min_step_percent < max_step_percent <= 1, got {min_step_percent}, "
                             f"{max_step_percent}.")
        config = noise_scheduler.config
        self.scheduler = noise_scheduler
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.float()
        self.prediction_type = config.prediction_type
        self.generator_timesteps = check_generator_timesteps(generator_timesteps, config.num_train_timesteps)
        num_train_timesteps = config.num_train_timesteps  # DMD2's min_step / max_step: int(percent * T)
        self.timestep_range = (int(min_step_percent * num_train_timesteps),
                               min(int(max_step_percent * num_train_timesteps), num_train_timesteps - 1))
        self.real_guidance_scale = float(real_guidance_scale)
        self.timestep_scaling = float(timestep_scaling)
        self.fake_denoising_loss = LatentDiffusionLoss(noise_scheduler, timestep_range=self.timestep_range)

    def _t(self, value, batch: int, device) -> torch.Tensor:
        return torch.full((batch,), int(value), device=device, dtype=torch.long)

    def _noised(self, x0: torch.Tensor, timesteps: torch.Tensor, generator=None) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        return self.scheduler.add_noise(x0.float(), noise, timesteps)

    def predicted_original(self, unet, sample: torch.Tensor, timesteps: torch.Tensor,
                           encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """x0_hat(z_t, t, c) of a UNet on the teacher's schedule, float32."""
        dtype = next(unet.parameters()).dtype
        output = unet(sample.to(dtype), timesteps, encoder_hidden_states.to(dtype), return_dict=False)[0]
        alpha_bar = self.alphas_cumprod.to(sample.device)[timesteps]
        return predicted_original_and_noise(output, sample, alpha_bar.sqrt(), (1 - alpha_bar).sqrt(),
                                            self.prediction_type)[0]

    def generate(self, generator_unet, noise: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 generator: Optional[torch.Generator] = None, train: bool = True) -> torch.Tensor:
        """The generator's latents from z ~ N(0, I). In training, a step k is drawn uniformly and the steps before it
        run without gradient from pure noise (DMD2's backward simulation); otherwise all K steps run in the caller's
        grad mode, as `LCMScheduler` samples them."""
        steps = self.generator_timesteps
        last = len(steps) - 1
        if train and len(steps) > 1:
            last = int(torch.randint(0, len(steps), (1,), generator=generator, device=noise.device))
        batch, device = noise.shape[0], noise.device
        dtype = next(generator_unet.parameters()).dtype
        x0 = None
        for k in range(last + 1):
            t = self._t(steps[k], batch, device)
            sample = noise.float() if k == 0 else self._noised(x0, t, generator)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not (train and k < last)):
                output = generator_unet(sample.to(dtype), t, encoder_hidden_states.to(dtype), return_dict=False)[0]
                x0 = lcm_consistency_output(output, sample, t, self.alphas_cumprod, self.prediction_type,
                                            self.timestep_scaling)
        return x0

    @torch.no_grad()
    def real_prediction(self, teacher, sample: torch.Tensor, timesteps: torch.Tensor,
                        encoder_hidden_states: torch.Tensor, uncond_hidden_states: torch.Tensor) -> torch.Tensor:
        """The guided teacher's x_0 prediction x0_u + g (x0_c - x0_u): both branches in one call of batch 2B (one
        conditional call when g = 1)."""
        if self.real_guidance_scale == 1.0:
            return self.predicted_original(teacher, sample, timesteps, encoder_hidden_states)
        both = self.predicted_original(teacher, torch.cat([sample, sample]), torch.cat([timesteps, timesteps]),
                                       torch.cat([encoder_hidden_states, uncond_hidden_states]))
        cond, uncond = both.chunk(2)
        w = torch.full((sample.shape[0],), self.real_guidance_scale - 1.0, device=sample.device)
        return guided(cond, uncond, w)  # LCM's convention: cond + w (cond - uncond), w = g - 1

    def matching_loss(self, x0: torch.Tensor, teacher, fake_unet, encoder_hidden_states: torch.Tensor,
                      uncond_hidden_states: torch.Tensor, generator: Optional[torch.Generator] = None):
        """The distribution-matching loss of generator latents ``x0`` (differentiable) at t ~ U{t_min, ..., t_max}.

        Returns: ``(loss, logs)``: the per-sample loss (B,) and ``timesteps``, ``grad_norm``.
        """
        batch, device = x0.shape[0], x0.device
        low, high = self.timestep_range
        timesteps = torch.randint(low, high + 1, (batch,), generator=generator, device=device)
        with torch.no_grad():
            noisy = self._noised(x0.detach(), timesteps, generator)
            denoised_fake = self.predicted_original(fake_unet, noisy, timesteps, encoder_hidden_states)
            denoised_real = self.real_prediction(teacher, noisy, timesteps, encoder_hidden_states,
                                                 uncond_hidden_states)
        loss, grad = normalised_matching_loss(x0, denoised_real, denoised_fake)
        return loss, {"timesteps": timesteps, "grad_norm": grad.flatten(1).norm(dim=1)}

    def fake_loss(self, fake_unet, samples: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  generator: Optional[torch.Generator] = None):
        """The fake UNet's denoising loss on detached generator latents (the teacher's objective, t in the range)."""
        return self.fake_denoising_loss(fake_unet, samples.detach().float(), encoder_hidden_states, generator)


__all__ = ["LatentDMDLoss", "check_generator_timesteps", "generator_timesteps_grid"]
