"""Distribution matching distillation (DMD, Yin et al. 2024a; DMD2, Yin et al. 2024b; 003 §2.2 and App. D).

A few-step generator G_theta is trained so that its noised law p_theta,sigma = Law(G_theta(z) + sigma n) matches the
teacher's at every noise level (003 eq. 2). Its gradient (003 eq. 3) is the difference of two scores at
x_sigma = G_theta(z) + sigma n: the frozen teacher's ("real") and an online "fake" denoiser's, which tracks the
generator's own law by denoising score matching on detached generator samples. In denoiser form (SPEC §5):

    grad = (D_fake(x_sigma; sigma) - D_real(x_sigma; sigma)) / mean|x_0 - D_real(x_sigma; sigma)|   (per sample)
    loss = 1/2 * ||x_0 - stopgrad(x_0 - grad)||^2,

whose gradient with respect to x_0 is ``grad`` (DMD2's normalised surrogate). Every network here is a callable
``D(x, sigma, class_labels=None) -> denoised`` (e.g. [`~models.denoiser.EDMDenoiser`]); nothing takes an
Accelerator or parsed arguments, and every loss is returned unreduced, one value per sample.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..scalings import append_dims, edm_loss_weight, karras_sigmas
from ..solvers import heun_step
from .consistency import l2_distance
from .edm import EDMLoss

FAKE_SIGMA_SAMPLINGS = ("karras", "lognormal")


def restricted_karras_sigmas(
    num_sigmas: int = 1000,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    min_fraction: float = 0.02,
    max_fraction: float = 0.98,
) -> torch.Tensor:
    """The Karras grid of ``num_sigmas`` levels restricted to indices in [min_fraction, max_fraction] of its range
    (DMD2's ``min_step``/``max_step``; 003 App. D uses [2%, 98%]). Decreasing, float64.
    """
    if not 0.0 <= min_fraction < max_fraction <= 1.0:
        raise ValueError(f"Need 0 <= min_fraction < max_fraction <= 1, got {min_fraction}, {max_fraction}.")
    grid = karras_sigmas(num_sigmas, sigma_min, sigma_max, rho, append_zero=False)
    first = math.ceil(min_fraction * (num_sigmas - 1) - 1e-9)
    last = math.floor(max_fraction * (num_sigmas - 1) + 1e-9)
    return grid[first : last + 1]


def sample_sigmas(grid: torch.Tensor, batch_size: int, generator: Optional[torch.Generator] = None, device=None):
    """``batch_size`` noise levels drawn uniformly from ``grid``, float32 on ``device``."""
    index = torch.randint(0, grid.shape[0], (batch_size,), generator=generator, device=grid.device)
    return grid[index].to(device=device, dtype=torch.float32)


def generate(
    generator_denoiser: Callable,
    noise: torch.Tensor,
    sigmas: Sequence[float],
    class_labels: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    grad_step: Optional[int] = None,
) -> torch.Tensor:
    r"""Sample a few-step DMD generator: x = D(sigma_0 z; sigma_0), then x = D(x + sigma_k n_k; sigma_k) for k >= 1.

    With one sigma this is the one-step generator G(z) = D_theta(sigma_max z; sigma_max) (SPEC §5). With several it
    is DMD2's few-step generator, re-noising its own output at fixed levels; training with ``grad_step=k`` runs the
    earlier steps without gradient from pure noise and stops after step ``k`` (DMD2's backward simulation), so the
    generator learns on the inputs it meets at inference.

    Args:
        generator_denoiser (`Callable`): the generator D_theta(x, sigma, class_labels).
        noise (`torch.Tensor`): z ~ N(0, I), the first input is ``sigmas[0] * noise``.
        sigmas (sequence of `float`): the decreasing input noise levels of the steps.
        class_labels (`torch.Tensor`, *optional*): labels for conditional generators.
        generator (`torch.Generator`, *optional*): randomness of the re-noising.
        grad_step (`int`, *optional*): train step k (gradient only through it); `None` runs all steps with the
            caller's grad mode.

    Returns:
        `torch.Tensor`: the generator output x_0, float32.
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] <= 0:
        raise ValueError(f"Generator noise levels must be positive and strictly decreasing, got {sigmas}.")
    last = len(sigmas) - 1 if grad_step is None else grad_step
    if not 0 <= last < len(sigmas):
        raise ValueError(f"grad_step={grad_step} is outside the generator's {len(sigmas)} steps.")
    x = None
    for k in range(last + 1):
        if k == 0:
            x_in = sigmas[0] * noise.float()
        else:
            # Re-noise the previous output at the fixed level sigma_k (DMD2 multi-step generator).
            x_in = x + sigmas[k] * torch.randn(x.shape, generator=generator, device=x.device)
        if grad_step is not None and k < last:
            with torch.no_grad():
                x = generator_denoiser(x_in, sigmas[k], class_labels=class_labels).float()
        else:
            x = generator_denoiser(x_in, sigmas[k], class_labels=class_labels).float()
    return x


def guided_denoiser(real_denoiser: Callable, guidance_scale: float, unconditional_label) -> Callable:
    """Classifier-free guidance on the real score: D_uncond + w (D_cond - D_uncond) (DMD2 uses w = 1.75 on SD1.5).

    Guidance is linear in D and in the score s = (D - x) / sigma^2, so guiding either is the same.
    """

    def denoiser(x, sigma, class_labels=None):
        if class_labels is None:
            raise ValueError("Classifier-free guidance on the real score needs class labels.")
        uncond = unconditional_label
        if not torch.is_tensor(uncond) or uncond.ndim == 0:
            uncond = torch.full_like(class_labels, int(uncond))
        cond = real_denoiser(x, sigma, class_labels=class_labels)
        free = real_denoiser(x, sigma, class_labels=uncond)
        return free + guidance_scale * (cond - free)

    return denoiser


def distribution_matching_loss(
    x0: torch.Tensor,
    real_denoiser: Callable,
    fake_denoiser: Callable,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    class_labels: Optional[torch.Tensor] = None,
):
    r"""DMD2's normalised distribution-matching surrogate at x_sigma = x_0 + sigma n (003 eq. 3; SPEC §5).

    Args:
        x0 (`torch.Tensor`): generator samples, differentiable with respect to the generator.
        real_denoiser, fake_denoiser (`Callable`): D_real (frozen teacher, possibly guided) and D_fake.
        sigma (`torch.Tensor` of shape `(B,)`), noise (`torch.Tensor`): the noise level and n ~ N(0, I).

    Returns:
        `(loss, logs)`: the per-sample loss 1/2 mean((x_0 - stopgrad(x_0 - grad))^2) of shape (B,), whose gradient
        in x_0 is grad / numel, and logs with the per-sample ``grad_norm``. The loss is exactly 0 with exactly zero
        gradient when both denoisers agree.
    """
    x0 = x0.float()
    with torch.no_grad():
        noisy = x0 + append_dims(sigma, x0.ndim) * noise
        denoised_fake = fake_denoiser(noisy, sigma, class_labels=class_labels).float()
        denoised_real = real_denoiser(noisy, sigma, class_labels=class_labels).float()
    loss, grad = normalised_matching_loss(x0, denoised_real, denoised_fake)
    return loss, {"sigma": sigma, "grad_norm": grad.flatten(1).norm(dim=1)}


def normalised_matching_loss(x0: torch.Tensor, denoised_real: torch.Tensor, denoised_fake: torch.Tensor):
    r"""DMD2's normalised surrogate of given real and fake denoised predictions at a noised x_0 (any parameterisation
    whose denoisers predict x_0: EDM pixels or Stable Diffusion latents).

    grad = (denoised_fake - denoised_real) / mean|x_0 - denoised_real| per sample (NaN-free), and
    loss = 1/2 mean((x_0 - stopgrad(x_0 - grad))^2), whose gradient in x_0 is grad / numel.

    Returns:
        `(loss, grad)`: the per-sample loss (B,) and the detached ``grad``.
    """
    x0 = x0.float()
    with torch.no_grad():
        denoised_real, denoised_fake = denoised_real.float(), denoised_fake.float()
        normaliser = (x0 - denoised_real).abs().flatten(1).mean(1)
        grad = torch.nan_to_num((denoised_fake - denoised_real) / append_dims(normaliser, x0.ndim))
        target = x0 - grad
    return 0.5 * (x0 - target).square().flatten(1).mean(1), grad


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic GAN loss of a discriminator, per sample: softplus(-l_real) + softplus(l_fake)."""
    return torch.nn.functional.softplus(-logits_real.float()) + torch.nn.functional.softplus(logits_fake.float())


class DMDLoss:
    r"""The losses of DMD / DMD2 distillation around an EDM teacher.

    Args:
        sigma_min, sigma_max, rho (`float`): the teacher's Karras schedule.
        sigma_data (`float`): standard deviation of the data (EDM weighting of the fake loss).
        num_train_sigmas (`int`, defaults to 1000): levels of the Karras grid that sigma is drawn from.
        min_fraction, max_fraction (`float`): the drawn part of that grid, [2%, 98%] in 003 App. D.
        generator_sigmas (sequence of `float`, *optional*): input noise levels of the generator's steps; defaults
            to `(sigma_max,)`, the one-step generator.
        real_guidance_scale (`float`, defaults to 1.0): classifier-free guidance of the real score (1 = none).
        unconditional_label (`int`, *optional*): the label of the teacher's unconditional branch, needed when
            ``real_guidance_scale != 1``.
        fake_sigma_sampling (`str`, defaults to "karras"): sigma of the fake loss drawn from the restricted Karras
            grid (DMD2), or "lognormal", the teacher's EDM training law ([`EDMLoss`]).
    """

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_data: float = 0.5,
        num_train_sigmas: int = 1000,
        min_fraction: float = 0.02,
        max_fraction: float = 0.98,
        generator_sigmas: Optional[Sequence[float]] = None,
        real_guidance_scale: float = 1.0,
        unconditional_label: Optional[int] = None,
        fake_sigma_sampling: str = "karras",
    ):
        if fake_sigma_sampling not in FAKE_SIGMA_SAMPLINGS:
            raise ValueError(f"fake_sigma_sampling must be one of {FAKE_SIGMA_SAMPLINGS}, got {fake_sigma_sampling!r}.")
        if real_guidance_scale != 1.0 and unconditional_label is None:
            raise ValueError("real_guidance_scale != 1 needs the teacher's unconditional_label.")
        self.sigma_data = sigma_data
        self.sigma_grid = restricted_karras_sigmas(num_train_sigmas, sigma_min, sigma_max, rho, min_fraction, max_fraction)
        self.generator_sigmas = tuple(float(s) for s in (generator_sigmas or (sigma_max,)))
        if max(self.generator_sigmas) > sigma_max * (1 + 1e-6) or min(self.generator_sigmas) < sigma_min * (1 - 1e-6):
            raise ValueError(
                f"Generator noise levels {self.generator_sigmas} leave the teacher's range [{sigma_min}, {sigma_max}]."
            )
        self.real_guidance_scale = real_guidance_scale
        self.unconditional_label = unconditional_label
        self.fake_sigma_sampling = fake_sigma_sampling
        self._edm_loss = EDMLoss(sigma_data=sigma_data)

    def sample_sigmas(self, batch_size: int, generator=None, device=None) -> torch.Tensor:
        """Noise levels drawn uniformly on the restricted Karras grid."""
        return sample_sigmas(self.sigma_grid, batch_size, generator, device)

    def real(self, real_denoiser: Callable) -> Callable:
        """The real denoiser, guided when ``real_guidance_scale != 1``."""
        if self.real_guidance_scale == 1.0:
            return real_denoiser
        return guided_denoiser(real_denoiser, self.real_guidance_scale, self.unconditional_label)

    def generate(self, generator_denoiser, noise, class_labels=None, generator=None, train: bool = True):
        """Generator samples; in training, a step k is drawn uniformly and the earlier ones run without gradient."""
        grad_step = None
        if train and len(self.generator_sigmas) > 1:
            grad_step = int(torch.randint(0, len(self.generator_sigmas), (1,), generator=generator, device=noise.device))
        return generate(generator_denoiser, noise, self.generator_sigmas, class_labels, generator, grad_step)

    def generator_loss(
        self,
        generator_denoiser: Callable,
        real_denoiser: Callable,
        fake_denoiser: Callable,
        noise: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ):
        """Distribution-matching loss of the generator on noises ``noise`` (z ~ N(0, I)).

        Returns: ``(loss, logs)`` with the per-sample loss (B,) and logs holding ``sigma``, ``grad_norm`` and the
        detached generator samples ``x0`` (which the fake denoiser may be trained on).
        """
        x0 = self.generate(generator_denoiser, noise, class_labels, generator, train=True)
        return self.matching_loss(x0, real_denoiser, fake_denoiser, class_labels, generator)

    def matching_loss(
        self,
        x0: torch.Tensor,
        real_denoiser: Callable,
        fake_denoiser: Callable,
        class_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ):
        """The distribution-matching loss of given generator samples ``x0`` (differentiable): sigma drawn on the
        restricted grid, the real score guided if asked. Returns ``(loss, logs)`` as [`generator_loss`]."""
        sigma = self.sample_sigmas(x0.shape[0], generator, x0.device)
        dm_noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        loss, logs = distribution_matching_loss(x0, self.real(real_denoiser), fake_denoiser, sigma, dm_noise, class_labels)
        logs["x0"] = x0.detach()
        return loss, logs

    def sample_fake_sigmas(self, batch_size: int, generator=None, device=None) -> torch.Tensor:
        """Noise levels of the fake denoiser's loss: the restricted Karras grid, or EDM's log-normal law."""
        if self.fake_sigma_sampling == "lognormal":
            ln_sigma = torch.randn(batch_size, generator=generator, device=device)
            return (ln_sigma * self._edm_loss.P_std + self._edm_loss.P_mean).exp()
        return self.sample_sigmas(batch_size, generator, device)

    def fake_loss(
        self,
        fake_denoiser: Callable,
        samples: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        real: Optional[torch.Tensor] = None,
        real_class_labels: Optional[torch.Tensor] = None,
        gan_weight: float = 0.0,
    ):
        """Denoising score matching of the fake denoiser on detached generator samples, EDM-weighted; with ``real``
        images and ``gan_weight > 0``, plus DMD2's discriminator loss on the fake network's head.

        The discriminator sees the generator samples and the real images noised at levels of the restricted grid,
        in the same network call as the denoising loss (one forward, as DDP prefers); its loss is the
        non-saturating logistic loss softplus(l(fake)) + softplus(-l(real)), where l are the head's logits.

        Args:
            fake_denoiser: D_fake; with a GAN, a [`~models.denoiser.EDMDenoiser`] over a
                [`~models.fake_score.DMDFakeScore`] with a head (its ``denoise`` returns the logits).
            samples (`torch.Tensor`): generator samples (detached here).
            real (`torch.Tensor`, *optional*): training images, as many as ``samples``.
            gan_weight (`float`): weight of the discriminator loss (DMD2: 1e-2 on ImageNet 64).

        Returns: ``(loss, logs)``: the per-sample loss lambda(sigma) ||D_fake(x + sigma n; sigma) - x||^2 (pixel mean)
        [+ gan_weight * discriminator loss], and the drawn ``sigma`` (and ``discriminator_loss``).
        """
        samples = samples.detach().float()
        batch = samples.shape[0]
        sigma = self.sample_fake_sigmas(batch, generator, samples.device)
        noise = torch.randn(samples.shape, generator=generator, device=samples.device)
        noisy = samples + append_dims(sigma, samples.ndim) * noise
        if gan_weight <= 0 or real is None:
            denoised = fake_denoiser(noisy, sigma, class_labels=class_labels)
            loss = edm_loss_weight(sigma, self.sigma_data) * (denoised.float() - samples).square().flatten(1).mean(1)
            return loss, {"sigma": sigma}
        if real.shape != samples.shape:
            raise ValueError(f"The GAN needs as many real images as generator samples: {tuple(real.shape)} vs "
                             f"{tuple(samples.shape)}.")
        real = real.float()
        sigma_real = self.sample_sigmas(batch, generator, real.device)
        noisy_real = real + append_dims(sigma_real, real.ndim) * torch.randn(real.shape, generator=generator,
                                                                             device=real.device)
        labels = None if class_labels is None else torch.cat([class_labels, real_class_labels])
        denoised, out = fake_denoiser.denoise(torch.cat([noisy, noisy_real]), torch.cat([sigma, sigma_real]),
                                              class_labels=labels, return_logits=True)
        denoise_loss = edm_loss_weight(sigma, self.sigma_data) * (
            denoised[:batch].float() - samples).square().flatten(1).mean(1)
        disc = discriminator_loss(out.logits[batch:], out.logits[:batch])
        return denoise_loss + gan_weight * disc, {"sigma": sigma, "discriminator_loss": disc.detach()}

    def gan_generator_loss(
        self,
        fake_denoiser: Callable,
        x0: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """DMD2's generator GAN loss softplus(-l(x0 + sigma n)) per sample, through the fake network's head.

        Gradients reach ``x0`` (the generator); the caller freezes the fake network's parameters.
        """
        sigma = self.sample_sigmas(x0.shape[0], generator, x0.device)
        noisy = x0 + append_dims(sigma, x0.ndim) * torch.randn(x0.shape, generator=generator, device=x0.device)
        _, out = fake_denoiser.denoise(noisy, sigma, class_labels=class_labels, return_logits=True)
        return torch.nn.functional.softplus(-out.logits)

    def regression_loss(
        self,
        generator_denoiser: Callable,
        noise: torch.Tensor,
        targets: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        distance: Callable = l2_distance,
    ):
        """DMD1's regression loss d(G(z), Phi(z)) on precomputed teacher ODE pairs (see [`teacher_ode_pairs`]).

        DMD1 uses LPIPS for ``distance``; any per-sample distance of `losses.consistency` fits. Returns the
        per-sample loss and empty logs.
        """
        x0 = generate(generator_denoiser, noise, self.generator_sigmas[:1], class_labels)
        return distance(x0, targets), {}


@torch.no_grad()
def teacher_ode_pairs(
    teacher_denoiser: Callable,
    noise: torch.Tensor,
    num_steps: int = 8,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    class_labels: Optional[torch.Tensor] = None,
    step: Callable = heun_step,
) -> torch.Tensor:
    """Phi_K(z): the teacher's deterministic PF-ODE solution from sigma_max z over K Karras steps (Heun-corrected
    Euler steps by default, as 003's Phi_8), the targets of DMD1's regression loss and of the pairing study."""
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho) if num_steps > 1 else torch.tensor(
        [sigma_max, 0.0], dtype=torch.float64
    )
    x = noise.float() * float(sigmas[0])
    for i in range(len(sigmas) - 1):
        x = step(teacher_denoiser, x, float(sigmas[i]), float(sigmas[i + 1]), class_labels=class_labels)
    return x


__all__ = [
    "DMDLoss",
    "discriminator_loss",
    "distribution_matching_loss",
    "generate",
    "guided_denoiser",
    "normalised_matching_loss",
    "restricted_karras_sigmas",
    "sample_sigmas",
    "teacher_ode_pairs",
]
