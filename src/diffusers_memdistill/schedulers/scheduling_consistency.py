"""Scheduler for consistency students distilled from EDM teachers: 1-step and multistep sampling (CM Alg. 1)."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..scalings import (
    append_dims,
    consistency_scalings,
    edm_scalings,
    edm_sigma_from_c_noise,
    karras_sigmas,
    precondition_output,
)
from .scheduling_utils import SigmaIndexSchedulerMixin


@dataclass
class ConsistencyStudentSchedulerOutput(BaseOutput):
    """Output of [`ConsistencyStudentScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`): the input of the next step, x_tau = f + s_noise sqrt(tau^2 - eps^2) z, or the
            final sample f after the last step.
        pred_original_sample (`torch.Tensor`): the student's estimate f(x, sigma) the step used.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class ConsistencyStudentScheduler(SigmaIndexSchedulerMixin, SchedulerMixin, ConfigMixin):
    r"""Multistep consistency sampling (Song et al. 2023, Alg. 1) on EDM noise levels.

    Sampling starts from x = tau_1 z (tau_1 = sigma_max by default) and makes one network evaluation per noise level
    tau_1 > tau_2 > ... > tau_m: `step` forms the student's f(x, tau) = c_skip x + c_out F from the raw network output
    F with the boundary scalings of CM App. C (so that f(x, eps) = x, eps = sigma_min), then, unless tau was the last
    level, returns x_tau' = f + s_noise sqrt(tau'^2 - eps^2) z at the next level tau'. The contract is diffusers'
    `CMStochasticIterativeScheduler`'s: `scale_model_input` returns c_in(tau) x, and `timesteps` are what the UNet is
    fed, c_noise_scale * ln(tau) / 4.

    The two differ in the timestep scale: the package's students are initialised from EDM teachers and are fed EDM's
    c_noise = ln(tau) / 4 (`c_noise_scale=1`), while `CMStochasticIterativeScheduler` feeds 1000 times that, the
    scale of the original consistency-model checkpoints. Loading this scheduler from a `CMStochasticIterativeScheduler`
    config therefore sets `c_noise_scale=1000` (unless given), and the package's pipelines divide the stock scheduler's
    timesteps by 1000, so that either scheduler samples either kind of network. The levels also differ: these are any
    levels in (sigma_min, sigma_max], where the stock scheduler indexes its fixed training grid.

    Args:
        sigma_min (`float`, defaults to 0.002): eps, the boundary level where f(x, eps) = x.
        sigma_max (`float`, defaults to 80.0): the starting level tau_1 of the default levels.
        rho (`float`, defaults to 7.0): curvature of the default Karras levels.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data, for the preconditioning.
        num_inference_steps (`int`, defaults to 1): default number m of student evaluations.
        s_noise (`float`, defaults to 1.0): scale of the noise added between steps.
        clip_denoised (`bool`, defaults to `False`): clamp f to [-1, 1] after each evaluation.
        c_noise_scale (`float`, defaults to 1.0): the network is fed c_noise_scale * ln(tau) / 4.
        parameterization (`str`, defaults to `"consistency"`): the network's output is the F of the consistency
            parameterization with boundary scalings (CM App. C).
    """

    _compatibles = ["CMStochasticIterativeScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_data: float = 0.5,
        num_inference_steps: int = 1,
        s_noise: float = 1.0,
        clip_denoised: bool = False,
        c_noise_scale: float = 1.0,
        parameterization: str = "consistency",
    ):
        if parameterization != "consistency":
            raise ValueError(
                f"ConsistencyStudentScheduler supports parameterization='consistency' only, got {parameterization!r}."
            )
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        if not c_noise_scale > 0:
            raise ValueError(f"c_noise_scale must be positive, got {c_noise_scale}.")
        self.sigmas = None
        self.timesteps = None
        self.num_inference_steps = None
        self.set_timesteps(num_inference_steps)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As `ConfigMixin.from_config`; a `CMStochasticIterativeScheduler` config (recognised by its `_class_name`,
        or by its `clip_denoised` key without `c_noise_scale`) describes a network fed 1000 ln(sigma) / 4, so the
        loaded scheduler gets `c_noise_scale=1000` unless the keyword says otherwise."""
        if isinstance(config, Mapping) and "c_noise_scale" not in config and "c_noise_scale" not in kwargs:
            stock = config.get("_class_name") == "CMStochasticIterativeScheduler" or "clip_denoised" in config
            if stock:
                kwargs["c_noise_scale"] = 1000.0
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the starting sample: the first level tau_1."""
        return float(self.sigmas[0])

    def default_sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """The m default levels: the first m of an (m + 1)-point Karras grid from sigma_max to sigma_min (float64).

        For m = 2 this gives (80, 2.52) with the default grid; tuned levels can be passed to `set_timesteps`.
        """
        if num_inference_steps == 1:
            return torch.tensor([self.config.sigma_max], dtype=torch.float64)
        cfg = self.config
        return karras_sigmas(num_inference_steps + 1, cfg.sigma_min, cfg.sigma_max, cfg.rho, append_zero=False)[:-1]

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device] = None,
        sigmas: Optional[Union[Sequence[float], torch.Tensor]] = None,
        intermediate_sigmas: Optional[Sequence[float]] = None,
    ):
        """Set the noise levels tau_1 > tau_2 > ... > tau_m and the matching timesteps.

        `sigmas` then holds the m levels followed by sigma_min, the level of the final sample (f(x, eps) = x).

        Args:
            num_inference_steps (`int`, *optional*): m, with the levels of `default_sigmas`; defaults to the config's.
            device (`str` or `torch.device`, *optional*): where to put `timesteps` (`sigmas` stay on the CPU).
            sigmas (`Sequence[float]` or `torch.Tensor`, *optional*): all m levels, strictly decreasing, in
                (sigma_min, sigma_max].
            intermediate_sigmas (`Sequence[float]`, *optional*): tau_2 > ... > tau_m after tau_1 = sigma_max, strictly
                decreasing and in (sigma_min, sigma_max).
        """
        cfg = self.config
        if sum(arg is not None for arg in (num_inference_steps, sigmas, intermediate_sigmas)) > 1:
            raise ValueError("Pass only one of num_inference_steps, sigmas and intermediate_sigmas.")
        if intermediate_sigmas is not None:
            levels = torch.as_tensor(intermediate_sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
            if levels.numel() and not bool(((levels > cfg.sigma_min) & (levels < cfg.sigma_max)).all()):
                raise ValueError(
                    f"Intermediate sigmas must lie in (sigma_min, sigma_max) = ({cfg.sigma_min}, {cfg.sigma_max}), "
                    f"got {levels.tolist()}."
                )
            levels = torch.cat([torch.tensor([cfg.sigma_max], dtype=torch.float64), levels])
        elif sigmas is not None:
            levels = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
            # float32 copies of sigma_max (a scheduler's `sigmas`, say) count as sigma_max.
            in_range = (levels > cfg.sigma_min) & (levels <= cfg.sigma_max * (1 + 1e-6))
            if levels.numel() == 0 or not bool(in_range.all()):
                raise ValueError(
                    f"sigmas must lie in (sigma_min, sigma_max] = ({cfg.sigma_min}, {cfg.sigma_max}], got "
                    f"{levels.tolist()}."
                )
        else:
            n = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}.")
            levels = self.default_sigmas(n)
        if levels.numel() > 1 and not bool((levels[1:] < levels[:-1]).all()):
            raise ValueError(f"The noise levels must be strictly decreasing, got {levels.tolist()}.")
        self.num_inference_steps = levels.numel()
        self.sigmas = torch.cat([levels, torch.tensor([cfg.sigma_min], dtype=torch.float64)]).to(torch.float32)
        self.timesteps = (cfg.c_noise_scale * edm_scalings(self.sigmas[:-1], cfg.sigma_data)[3]).to(device)
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
        """Form f(x, tau_i) from the raw network output and return the input of the next step (CM Alg. 1).

        Args:
            model_output (`torch.Tensor`): the network's output F(c_in x; timestep).
            timestep (`float` or `torch.Tensor`): the current entry of `timesteps`.
            sample (`torch.Tensor`): x_{tau_i}, the sample the network saw.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): draws the noise of the next level;
                one generator per sample keeps each sample independent of the batch.
            return_dict (`bool`, defaults to `True`): return a [`ConsistencyStudentSchedulerOutput`] or a tuple
                `(prev_sample, pred_original_sample)`.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= len(self.timesteps):
            raise IndexError(f"All {len(self.timesteps)} steps were taken; call set_timesteps to sample again.")
        cfg = self.config
        c_skip, c_out = consistency_scalings(self.sigmas[k], cfg.sigma_data, cfg.sigma_min)
        denoised = precondition_output(sample, model_output, c_skip, c_out)
        if cfg.clip_denoised:
            denoised = denoised.clamp(-1, 1)
        prev_sample = denoised
        if k + 1 < len(self.timesteps):
            # x_tau = f + sqrt(tau^2 - eps^2) z (CM Alg. 1, line 5).
            tau = self.sigmas[k + 1]
            noise = randn_tensor(denoised.shape, generator=generator, device=denoised.device, dtype=denoised.dtype)
            prev_sample = denoised + cfg.s_noise * (tau**2 - cfg.sigma_min**2).sqrt() * noise
        self._step_index = k + 1
        if not return_dict:
            return (prev_sample, denoised)
        return ConsistencyStudentSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_sigma = x_0 + sigma n at the levels of ``timesteps`` (scalar or per-sample, in this scheduler's scale)."""
        c_noise = torch.as_tensor(timesteps, dtype=torch.float32) / self.config.c_noise_scale
        sigma = edm_sigma_from_c_noise(c_noise).to(original_samples.device).flatten()
        return original_samples + append_dims(sigma, original_samples.ndim).to(original_samples.dtype) * noise
