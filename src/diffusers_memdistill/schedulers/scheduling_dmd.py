"""Scheduler for DMD generators distilled from EDM teachers: one step, or a few steps re-noised at fixed levels."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..scalings import edm_scalings, karras_sigmas, precondition_output
from .scheduling_utils import SigmaIndexSchedulerMixin


@dataclass
class DMDGeneratorSchedulerOutput(BaseOutput):
    """Output of [`DMDGeneratorScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`): the input of the next step, x = G + sigma_next n, or the final sample G after the
            last step.
        pred_original_sample (`torch.Tensor`): the generator's output G = D_theta(x; sigma) at this step.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class DMDGeneratorScheduler(SigmaIndexSchedulerMixin, SchedulerMixin, ConfigMixin):
    r"""Sampling of a DMD / DMD2 generator (Yin et al. 2024a/b; 003 §2.2): G(z) = D_theta(sigma_1 z; sigma_1) with
    sigma_1 = sigma_max, and for few-step generators x = D_theta(G + sigma_k n; sigma_k) at the fixed levels sigma_k
    the generator was trained on (DMD2's backward simulation).

    The generator is an EDM denoiser, D = c_skip x + c_out F(c_in x; c_noise) with EDM's scalings (EDM Table 1), so
    `scale_model_input` returns c_in(sigma) x and `timesteps` are what the UNet is fed, c_noise = ln(sigma) / 4.

    Args:
        sigma_min (`float`, defaults to 0.002), sigma_max (`float`, defaults to 80.0), rho (`float`, defaults to 7.0):
            the teacher's Karras schedule; levels must lie in [sigma_min, sigma_max].
        sigma_data (`float`, defaults to 0.5): standard deviation of the data, for the preconditioning.
        num_inference_steps (`int`, defaults to 1): default number of generator evaluations.
        generator_sigmas (`List[float]`, *optional*): the levels the generator was trained on (decreasing, the first
            is sigma_max); used when sampling with that many steps. Other step counts use Karras levels.
        parameterization (`str`, defaults to `"edm"`): the network's output is EDM's F.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_data: float = 0.5,
        num_inference_steps: int = 1,
        generator_sigmas: Optional[List[float]] = None,
        parameterization: str = "edm",
    ):
        if parameterization != "edm":
            raise ValueError(f"DMDGeneratorScheduler supports parameterization='edm' only, got {parameterization!r}.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        if generator_sigmas is not None:
            self._check_levels(torch.as_tensor(generator_sigmas, dtype=torch.float64).reshape(-1))
        self.sigmas = None
        self.timesteps = None
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self.set_timesteps(num_inference_steps)

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the starting sample: the first level sigma_1."""
        return float(self.sigmas[0])

    def _check_levels(self, levels: torch.Tensor) -> None:
        cfg = self.config
        in_range = (levels >= cfg.sigma_min * (1 - 1e-6)) & (levels <= cfg.sigma_max * (1 + 1e-6))
        if levels.numel() == 0 or not bool(in_range.all()):
            raise ValueError(f"Generator levels must lie in [sigma_min, sigma_max] = [{cfg.sigma_min}, "
                             f"{cfg.sigma_max}], got {levels.tolist()}.")
        if levels.numel() > 1 and not bool((levels[1:] < levels[:-1]).all()):
            raise ValueError(f"Generator levels must be strictly decreasing, got {levels.tolist()}.")

    def default_sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """The m levels: the trained ``generator_sigmas`` when there are m of them, else sigma_max followed by the
        first m - 1 inner levels of an (m + 1)-point Karras grid (float64)."""
        cfg = self.config
        if cfg.generator_sigmas is not None and len(cfg.generator_sigmas) == num_inference_steps:
            return torch.as_tensor(cfg.generator_sigmas, dtype=torch.float64)
        if num_inference_steps == 1:
            return torch.tensor([cfg.sigma_max], dtype=torch.float64)
        return karras_sigmas(num_inference_steps + 1, cfg.sigma_min, cfg.sigma_max, cfg.rho, append_zero=False)[:-1]

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device] = None,
        sigmas: Optional[Union[Sequence[float], torch.Tensor]] = None,
    ):
        """Set the levels sigma_1 > ... > sigma_m and the matching timesteps c_noise = ln(sigma) / 4.

        `sigmas` then holds the m levels followed by 0, the level of the final sample.

        Args:
            num_inference_steps (`int`, *optional*): m, with the levels of `default_sigmas`; defaults to the config's.
            device (`str` or `torch.device`, *optional*): where to put `timesteps` (`sigmas` stay on the CPU).
            sigmas (`Sequence[float]` or `torch.Tensor`, *optional*): all m levels, strictly decreasing, in
                [sigma_min, sigma_max].
        """
        if num_inference_steps is not None and sigmas is not None:
            raise ValueError("Pass only one of num_inference_steps and sigmas.")
        if sigmas is not None:
            levels = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
        else:
            n = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}.")
            levels = self.default_sigmas(n)
        self._check_levels(levels)
        self.num_inference_steps = levels.numel()
        self.sigmas = torch.cat([levels, levels.new_zeros(1)]).to(torch.float32)
        self.timesteps = edm_scalings(self.sigmas[:-1], self.config.sigma_data)[3].to(device)
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
        """Form the generator's output D_theta(x; sigma_k) from the raw network output and re-noise it to the next
        level (DMD2's multi-step generator).

        Args:
            model_output (`torch.Tensor`): the network's output F(c_in x; timestep).
            timestep (`float` or `torch.Tensor`): the current entry of `timesteps`.
            sample (`torch.Tensor`): x at level sigma_k, the sample the network saw.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): draws the re-noising; one generator
                per sample keeps each sample independent of the batch.
            return_dict (`bool`, defaults to `True`): return a [`DMDGeneratorSchedulerOutput`] or a tuple
                `(prev_sample, pred_original_sample)`.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= len(self.timesteps):
            raise IndexError(f"All {len(self.timesteps)} steps were taken; call set_timesteps to sample again.")
        c_skip, c_out, _, _ = edm_scalings(self.sigmas[k], self.config.sigma_data)
        denoised = precondition_output(sample, model_output, c_skip, c_out)
        prev_sample = denoised
        if k + 1 < len(self.timesteps):
            # Re-noise at the next fixed level: x = G + sigma_{k+1} n.
            noise = randn_tensor(denoised.shape, generator=generator, device=denoised.device, dtype=denoised.dtype)
            prev_sample = denoised + self.sigmas[k + 1].to(denoised.device) * noise
        self._step_index = k + 1
        if not return_dict:
            return (prev_sample, denoised)
        return DMDGeneratorSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
