"""Scheduler for deterministic DDIM sampling of EDM denoisers on a nested Karras grid (progressive-distillation
students, Salimans & Ho 2022)."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..scalings import append_dims, edm_scalings, edm_sigma_from_c_noise, karras_sigmas, precondition_output
from ..solvers import euler_update, ode_derivative
from .scheduling_utils import SigmaIndexSchedulerMixin


@dataclass
class EDMDDIMSchedulerOutput(BaseOutput):
    """Output of [`EDMDDIMScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`): x at the next level, x' = D + (sigma' / sigma) (x - D); after the last step the
            final sample, at the grid's last level (sigma_min by default).
        pred_original_sample (`torch.Tensor`): the denoised estimate D(x; sigma) the step used.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def ddim_levels(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """The K + 1 levels of a K-step DDIM sampler: the Karras grid (EDM eq. 5) of K + 1 points from sigma_max to
    sigma_min, float64.

    The grids are nested: the K-step levels are every other level of the 2K-step ones (both are the rho-ramp at
    j / K = 2j / 2K), which is what lets a progressive-distillation student take one step where its teacher took two.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_steps!r}.")
    return karras_sigmas(num_steps + 1, sigma_min, sigma_max, rho, append_zero=False)


class EDMDDIMScheduler(SigmaIndexSchedulerMixin, SchedulerMixin, ConfigMixin):
    r"""Deterministic DDIM for EDM denoisers: K steps between the K + 1 Karras levels sigma_max = sigma_0 > ... >
    sigma_K = sigma_min, one network evaluation each.

    On the variance-exploding path x_sigma = x_0 + sigma n, DDIM's update (Song et al. 2021, eq. 12 with eta = 0) is
    x' = D + (sigma' / sigma) (x - D), which is the Euler step of EDM's probability-flow ODE,
    x' = x + (sigma' - sigma) (x - D) / sigma (EDM eq. 3); it is the sampler that progressive-distillation students are
    trained for (Salimans & Ho 2022, Alg. 2). The K-step levels are every other level of the 2K-step ones
    ([`ddim_levels`]). The final sample is x at the last level sigma_min (the CM convention: no step to 0; at the
    default sigma_min = 0.002 it differs from D(x; sigma_min) by far less than one 8-bit level).

    The network contract is EDM's, as in [`EDMHeunScheduler`]: `timesteps` are c_noise = ln(sigma) / 4,
    `scale_model_input` returns c_in(sigma) x, and `step` takes the raw network output F and forms
    D(x; sigma) = c_skip x + c_out F (EDM eq. 7).

    Args:
        sigma_min (`float`, defaults to 0.002), sigma_max (`float`, defaults to 80.0), rho (`float`, defaults to 7.0):
            the Karras grid.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data, for the preconditioning.
        num_inference_steps (`int`, defaults to 1): default number K of steps (a progressive-distillation student's
            round).
        parameterization (`str`, defaults to `"edm"`): the network's output is EDM's F.
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_data: float = 0.5,
        num_inference_steps: int = 1,
        parameterization: str = "edm",
    ):
        if parameterization != "edm":
            raise ValueError(f"EDMDDIMScheduler supports parameterization='edm' only, got {parameterization!r}.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        self.sigmas = None
        self.timesteps = None
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self.set_timesteps(num_inference_steps)

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the starting sample: the first level sigma_0."""
        return float(self.sigmas[0])

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device] = None,
        sigmas: Optional[Union[Sequence[float], torch.Tensor]] = None,
    ):
        """Set the K + 1 levels and the K timesteps c_noise = ln(sigma) / 4.

        `sigmas` then holds the K + 1 levels; the last one is the level of the final sample.

        Args:
            num_inference_steps (`int`, *optional*): K, with the levels of [`ddim_levels`]; defaults to the config's.
            device (`str` or `torch.device`, *optional*): where to put `timesteps` (`sigmas` stay on the CPU).
            sigmas (`Sequence[float]` or `torch.Tensor`, *optional*): all K + 1 >= 2 levels, strictly decreasing; all
                positive but the last, which may be 0 (the last step then returns D(x; sigma_{K-1})).
        """
        cfg = self.config
        if num_inference_steps is not None and sigmas is not None:
            raise ValueError("Pass either num_inference_steps or sigmas, not both.")
        if sigmas is not None:
            levels = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
            if levels.numel() < 2:
                raise ValueError(f"sigmas must hold at least 2 levels (one step), got {levels.tolist()}.")
            if not bool((levels[:-1] > 0).all()) or levels[-1] < 0:
                raise ValueError(f"sigmas must be positive noise levels (the last may be 0), got {levels.tolist()}.")
            if not bool((levels[1:] < levels[:-1]).all()):
                raise ValueError(f"sigmas must be strictly decreasing, got {levels.tolist()}.")
        else:
            n = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
            levels = ddim_levels(n, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        self.num_inference_steps = levels.numel() - 1
        self.sigmas = levels.to(torch.float32)
        self.timesteps = edm_scalings(self.sigmas[:-1], cfg.sigma_data)[3].to(device)
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        return_dict: bool = True,
    ):
        """One DDIM step from the raw network output (deterministic: ``generator`` is accepted and unused).

        Args:
            model_output (`torch.Tensor`): the network's output F(c_in x; c_noise) at this timestep.
            timestep (`float` or `torch.Tensor`): the current entry of `timesteps`.
            sample (`torch.Tensor`): x at the current level, the sample the network saw.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): unused (diffusers' signature).
            return_dict (`bool`, defaults to `True`): return an [`EDMDDIMSchedulerOutput`] or a tuple
                `(prev_sample, pred_original_sample)`.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= len(self.timesteps):
            raise IndexError(f"All {len(self.timesteps)} steps were taken; call set_timesteps to sample again.")
        sigma, sigma_next = self.sigmas[k], self.sigmas[k + 1]
        c_skip, c_out = edm_scalings(sigma, self.config.sigma_data)[:2]
        x = sample.float()
        denoised = precondition_output(x, model_output, c_skip, c_out)
        # DDIM (eta = 0) = Euler step of the PF-ODE: x' = x + (sigma' - sigma) (x - D) / sigma.
        prev_sample = euler_update(x, ode_derivative(x, denoised, sigma), sigma, sigma_next)
        self._step_index = k + 1
        if not return_dict:
            return (prev_sample, denoised)
        return EDMDDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_sigma = x_0 + sigma n at the levels of ``timesteps`` (scalar or per-sample c_noise values)."""
        sigma = edm_sigma_from_c_noise(timesteps).to(original_samples.device).flatten()
        return original_samples + append_dims(sigma, original_samples.ndim).to(original_samples.dtype) * noise
