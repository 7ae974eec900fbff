"""Scheduler for EDM's Heun sampler, deterministic (EDM Alg. 1) and stochastic (EDM Alg. 2)."""

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..scalings import edm_scale_input, edm_scalings, karras_sigmas
from ..solvers import euler_update, heun_correction, ode_derivative


@dataclass
class EDMHeunSchedulerOutput(BaseOutput):
    """Output of [`EDMHeunScheduler.step`] and [`EDMHeunScheduler.step_correct`].

    Args:
        prev_sample (`torch.Tensor`): the sample at the next (lower) noise level.
        derivative (`torch.Tensor`): the ODE derivative dx/dsigma used for the step.
        pred_original_sample (`torch.Tensor`): the denoised estimate D(x; sigma) the step used.
    """

    prev_sample: torch.Tensor
    derivative: torch.Tensor
    pred_original_sample: torch.Tensor


class EDMHeunScheduler(SchedulerMixin, ConfigMixin):
    r"""EDM's second-order Heun sampler on the Karras noise grid (Karras et al. 2022, Alg. 1 and 2).

    The network contract is EDM's: the model is a denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with
    the scalings of `diffusers_memdistill.scalings.edm_scalings`; `timesteps` are the values c_noise = ln(sigma)/4
    that the UNet is fed. A sampling step is

    1. `churn` (Alg. 2 lines 4-6): raise sigma_i to sigma_hat = (1 + gamma) sigma_i by adding fresh noise
       (identity when `s_churn = 0`, the deterministic sampler);
    2. `step`: an Euler step from sigma_hat to sigma_{i+1} with the denoised estimate at (x_hat, sigma_hat);
    3. `step_correct`: unless sigma_{i+1} = 0, the trapezoidal correction with the denoised estimate at sigma_{i+1}.

    With N steps the sampler makes 2N - 1 network evaluations (35 for the default N = 18).

    Args:
        sigma_min (`float`, defaults to 0.002), sigma_max (`float`, defaults to 80.0), rho (`float`, defaults to 7.0):
            the Karras grid.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data, for the preconditioning.
        num_inference_steps (`int`, defaults to 18): default number N of noise levels.
        s_churn (`float`, defaults to 0.0), s_tmin (`float`, defaults to 0.0), s_tmax (`float`, *optional*),
        s_noise (`float`, defaults to 1.0): EDM Alg. 2's stochasticity; `s_tmax=None` means no upper limit.
        parameterization (`str`, defaults to `"edm"`): the network's output is EDM's F (preconditioned output).
    """

    order = 2

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_data: float = 0.5,
        num_inference_steps: int = 18,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: Optional[float] = None,
        s_noise: float = 1.0,
        parameterization: str = "edm",
    ):
        if parameterization != "edm":
            raise ValueError(f"EDMHeunScheduler supports parameterization='edm' only, got {parameterization!r}.")
        self.sigmas = None
        self.timesteps = None
        self.num_inference_steps = None
        self.set_timesteps(num_inference_steps)

    @property
    def init_noise_sigma(self) -> float:
        return float(self.config.sigma_max)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None):
        """Set the N noise levels (plus the final zero) and the matching c_noise timesteps."""
        n = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        sigmas = karras_sigmas(n, self.config.sigma_min, self.config.sigma_max, self.config.rho)
        self.num_inference_steps = n
        self.sigmas = sigmas.to(device=device, dtype=torch.float32)
        self.timesteps = edm_scalings(self.sigmas[:-1], self.config.sigma_data)[3]

    def scale_model_input(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        """The UNet's input c_in(sigma) * x."""
        return edm_scale_input(sample, sigma, self.config.sigma_data)

    def churn(
        self,
        sample: torch.Tensor,
        step_index: int,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """EDM Alg. 2 lines 4-6: return (x_hat, sigma_hat) with sigma_hat = (1 + gamma) * sigma_i."""
        cfg = self.config
        sigma = self.sigmas[step_index]
        s_tmax = float("inf") if cfg.s_tmax is None else cfg.s_tmax
        gamma = min(cfg.s_churn / self.num_inference_steps, 2**0.5 - 1) if cfg.s_tmin <= sigma <= s_tmax else 0.0
        if gamma == 0.0:
            return sample, sigma
        sigma_hat = sigma * (1 + gamma)
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return sample + (sigma_hat**2 - sigma**2).sqrt() * cfg.s_noise * noise, sigma_hat

    def step(
        self, denoised: torch.Tensor, sigma_hat, sample_hat: torch.Tensor, step_index: int, return_dict: bool = True
    ):
        """Euler step from (x_hat, sigma_hat) to sigma_{i+1} given the denoised estimate D(x_hat; sigma_hat)."""
        derivative = ode_derivative(sample_hat, denoised, sigma_hat)
        prev_sample = euler_update(sample_hat, derivative, sigma_hat, self.sigmas[step_index + 1])
        if not return_dict:
            return (prev_sample, derivative, denoised)
        return EDMHeunSchedulerOutput(prev_sample=prev_sample, derivative=derivative, pred_original_sample=denoised)

    def step_correct(
        self,
        denoised_next: torch.Tensor,
        sigma_hat,
        sample_hat: torch.Tensor,
        derivative: torch.Tensor,
        prev_sample: torch.Tensor,
        step_index: int,
        return_dict: bool = True,
    ):
        """Heun's correction (EDM Alg. 1 lines 6-8) given D(x_{i+1}; sigma_{i+1}) at the Euler point ``prev_sample``."""
        sigma_next = self.sigmas[step_index + 1]
        if not bool(sigma_next > 0):
            raise ValueError("No second-order correction is taken at sigma = 0 (the last step is an Euler step).")
        derivative_next = ode_derivative(prev_sample, denoised_next, sigma_next)
        corrected = heun_correction(sample_hat, derivative, derivative_next, sigma_hat, sigma_next)
        if not return_dict:
            return (corrected, derivative_next, denoised_next)
        return EDMHeunSchedulerOutput(prev_sample=corrected, derivative=derivative_next, pred_original_sample=denoised_next)

    def __len__(self):
        return self.config.num_inference_steps
