r"""Progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast sampling of diffusion models";
000 App. A.1; SPEC §7) of EDM denoisers, in EDM's sigma parameterisation.

A round distils a teacher sampled with 2K deterministic DDIM steps into a student sampled with K. Both use the
nested Karras levels of `schedulers.scheduling_edm_ddim.ddim_levels`: the teacher's 2K + 1 levels
s_0 = sigma_max > s_1 > ... > s_2K = sigma_min, of which the student's are the even ones. On the variance-exploding
path x_sigma = x_0 + sigma z (alpha = 1), a DDIM step from sigma to sigma' with denoiser D is

    Phi(x, sigma -> sigma') = D(x; sigma) + (sigma' / sigma) (x - D(x; sigma))        (= Euler on EDM eq. 3)

Per example (S&H Alg. 2, with t -> sigma):

    j ~ U{0, ..., K - 1},   sigma = s_2j,  sigma' = s_2j+1,  sigma'' = s_2j+2,   x_sigma = x_0 + sigma z
    x'  = Phi(x_sigma, sigma -> sigma'; teacher),   x'' = Phi(x', sigma' -> sigma''; teacher)     (two teacher steps)

and the target x_tilde is the denoised value with which ONE student step from sigma lands on x'':
D + (sigma''/sigma)(x_sigma - D) = x'' gives

    x_tilde = (x'' - (sigma'' / sigma) x_sigma) / (1 - sigma'' / sigma)             (S&H Alg. 2, alpha = 1)

    loss = lambda(sigma) * d(D_theta(x_sigma; sigma), stopgrad x_tilde).

The student D_theta is an EDM denoiser (c_skip x + c_out F); with lambda = EDM's weight ("karras") and d = L2 the
loss is the EDM loss of the network output F against the F that would produce x_tilde. In the first round the
teacher is the EDM teacher (its step may also be Heun); later, the previous round's student, which samples with DDIM.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..scalings import append_dims, edm_loss_weight
from ..schedulers.scheduling_edm_ddim import ddim_levels
from ..solvers import euler_step
from .consistency import resolve_distance

WEIGHTINGS = ("karras", "uniform", "snr+1", "truncated-snr")


def progressive_target(x: torch.Tensor, x_two_steps: torch.Tensor, sigma, sigma_two_steps) -> torch.Tensor:
    """x_tilde = (x'' - (sigma''/sigma) x) / (1 - sigma''/sigma): the denoised value whose single DDIM step from
    (x, sigma) lands on x'' at sigma'' (S&H Alg. 2 on the VE path); per-sample or scalar levels, float32."""
    ratio = append_dims(torch.as_tensor(sigma_two_steps, device=x.device, dtype=torch.float32)
                        / torch.as_tensor(sigma, device=x.device, dtype=torch.float32), x.ndim)
    return (x_two_steps.float() - ratio * x.float()) / (1 - ratio)


def progressive_loss_weight(weighting: str, sigma, sigma_data: float = 0.5) -> torch.Tensor:
    """lambda(sigma) of the x-space loss (float32): ``"karras"`` EDM's (sigma^2 + sd^2) / (sigma sd)^2 (EDM Table 1),
    ``"uniform"`` 1, ``"snr+1"`` 1 / sigma^2 + 1 and ``"truncated-snr"`` max(1 / sigma^2, 1) (S&H Sec. 4, with
    SNR = alpha^2 / sigma^2 = 1 / sigma^2 on the VE path)."""
    sigma = torch.as_tensor(sigma).to(torch.float32)
    if weighting == "karras":
        return edm_loss_weight(sigma, sigma_data)
    if weighting == "uniform":
        return torch.ones_like(sigma)
    if weighting == "snr+1":
        return sigma**-2 + 1
    if weighting == "truncated-snr":
        return (sigma**-2).clamp(min=1.0)
    raise ValueError(f"Unknown weighting {weighting!r}; choose one of {WEIGHTINGS}.")


class ProgressiveDistillationLoss:
    r"""Per-sample progressive-distillation loss of one round: a K-step student against 2K teacher steps (see the
    module docstring for the equations). The loss is returned unreduced; the teacher runs without gradients.

    Args:
        num_student_steps (`int`): K, the student's number of DDIM steps in this round (the teacher takes 2K).
        sigma_min (`float`, defaults to 0.002), sigma_max (`float`, defaults to 80.0), rho (`float`, defaults to 7.0):
            the nested Karras grid, the teacher's.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data (for the ``"karras"`` weighting).
        distance (`str` or `Callable`, defaults to `"l2"`): `"l2"`, `"pseudo_huber"`, `"lpips"` (then pass ``lpips``)
            or a callable ``d(a, b) -> (B,)``.
        huber_c (`float`, *optional*): the pseudo-Huber constant; defaults to 0.00054 * sqrt(d).
        weighting (`str`, defaults to `"karras"`): see [`progressive_loss_weight`].
        lpips (`torch.nn.Module`, *optional*): the LPIPS distance.
        solver (`Callable`, defaults to `solvers.euler_step`, DDIM): the teacher's step ``step(denoiser, x, sigma,
            sigma_next, **cond)``.
    """

    def __init__(
        self,
        num_student_steps: int,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_data: float = 0.5,
        distance="l2",
        huber_c: Optional[float] = None,
        weighting: str = "karras",
        lpips: Optional[torch.nn.Module] = None,
        solver: Callable = euler_step,
    ):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown weighting {weighting!r}; choose one of {WEIGHTINGS}.")
        self.distance = resolve_distance(distance, huber_c, lpips)
        # The teacher's 2K + 1 levels; the student's are sigmas[0::2].
        self.sigmas = ddim_levels(2 * num_student_steps, sigma_min, sigma_max, rho).to(torch.float32)
        self.num_student_steps, self.sigma_data, self.weighting, self.solver = (
            num_student_steps, sigma_data, weighting, solver)

    def __call__(
        self,
        student: Callable,
        teacher: Callable,
        images: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ):
        """Args: ``student`` and ``teacher`` denoisers D(x, sigma, class_labels) (e.g. `EDMDenoiser`), ``images``
        clean data x_0 of shape (B, C, H, W), ``class_labels`` passed to both, ``generator`` the source of j and z.

        Returns: ``(loss, logs)``: the per-sample loss of shape (B,) and a dict with the student's ``sigma``, the
        level ``sigma_next`` = sigma'' it steps to and its step ``index`` j.
        """
        images = images.float()
        device = images.device
        index = torch.randint(0, self.num_student_steps, (images.shape[0],), generator=generator, device=device)
        sigmas = self.sigmas.to(device)
        sigma, sigma_mid, sigma_next = sigmas[2 * index], sigmas[2 * index + 1], sigmas[2 * index + 2]
        noise = torch.randn(images.shape, generator=generator, device=device)
        x = images + append_dims(sigma, images.ndim) * noise  # x_sigma = x_0 + sigma z
        with torch.no_grad():
            # Two teacher steps, sigma -> sigma' -> sigma''.
            x_mid = self.solver(teacher, x, sigma, sigma_mid, class_labels=class_labels)
            x_two = self.solver(teacher, x_mid, sigma_mid, sigma_next, class_labels=class_labels)
            target = progressive_target(x, x_two, sigma, sigma_next)
        denoised = student(x, sigma, class_labels=class_labels)
        loss = progressive_loss_weight(self.weighting, sigma, self.sigma_data) * self.distance(denoised, target)
        return loss, {"sigma": sigma, "sigma_next": sigma_next, "index": index}
