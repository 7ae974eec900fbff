"""Scheduler for consistency students distilled from EDM teachers: 1-step and multistep sampling (CM Alg. 1)."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..scalings import edm_scale_input, edm_scalings, karras_sigmas


@dataclass
class ConsistencyStudentSchedulerOutput(BaseOutput):
    """Output of [`ConsistencyStudentScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`): the input of the next step, x_tau = f + sqrt(tau^2 - eps^2) z, or the final
            sample f after the last step.
        pred_original_sample (`torch.Tensor`): the student's estimate f(x, sigma) the step used.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class ConsistencyStudentScheduler(SchedulerMixin, ConfigMixin):
    r"""Multistep consistency sampling (Song et al. 2023, Alg. 1) on EDM noise levels.

    Sampling starts from x = sigma_max * z and makes one student evaluation per noise level
    sigma_max = tau_1 > tau_2 > ... > tau_m: x = f(x_tau, tau), then, unless tau was the last level, a fresh
    x_tau' = x + sqrt(tau'^2 - eps^2) z at the next level tau' (eps = sigma_min). The student's
    f(x, sigma) = c_skip x + c_out F(c_in x; c_noise) is computed outside the scheduler by
    `diffusers_memdistill.models.denoiser.ConsistencyDenoiser`; `timesteps` are the values c_noise = ln(sigma) / 4
    that the UNet is fed, EDM's, since the student is initialised from an EDM teacher.

    diffusers' `CMStochasticIterativeScheduler` is not reused because it is not exactly right for these students:
    it feeds the UNet 1000 * ln(sigma) / 4 (the scale of the original consistency-model checkpoints), 1000 times
    the c_noise that a UNet trained as an EDM teacher expects, and its intermediate levels are integer indices into
    its own fixed training grid, so a level such as sigma = 2.5 cannot be requested.

    Args:
        sigma_min (`float`, defaults to 0.002): eps, the boundary level where f(x, eps) = x.
        sigma_max (`float`, defaults to 80.0): the starting level tau_1.
        rho (`float`, defaults to 7.0): curvature of the default Karras levels.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data, for the preconditioning.
        num_inference_steps (`int`, defaults to 1): default number m of student evaluations.
        parameterization (`str`, defaults to `"consistency"`): the network's output is the F of the consistency
            parameterization with boundary scalings (CM App. C).
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
        parameterization: str = "consistency",
    ):
        if parameterization != "consistency":
            raise ValueError(
                f"ConsistencyStudentScheduler supports parameterization='consistency' only, got {parameterization!r}."
            )
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        self.sigmas = None
        self.timesteps = None
        self.num_inference_steps = None
        self.set_timesteps(num_inference_steps)

    @property
    def init_noise_sigma(self) -> float:
        return float(self.config.sigma_max)

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
        intermediate_sigmas: Optional[Sequence[float]] = None,
    ):
        """Set the noise levels tau_1 = sigma_max > tau_2 > ... > tau_m and the matching c_noise timesteps.

        Args:
            num_inference_steps (`int`, *optional*): m, with the default levels of `default_sigmas`; defaults to
                the config's.
            device (`str` or `torch.device`, *optional*): where to put `sigmas` and `timesteps`.
            intermediate_sigmas (`Sequence[float]`, *optional*): tau_2 > ... > tau_m, strictly decreasing and in
                (sigma_min, sigma_max); replaces `num_inference_steps` (then m = 1 + len(intermediate_sigmas)).
        """
        cfg = self.config
        if intermediate_sigmas is not None:
            levels = torch.as_tensor(intermediate_sigmas, dtype=torch.float64).reshape(-1)
            if levels.numel() and not bool(((levels > cfg.sigma_min) & (levels < cfg.sigma_max)).all()):
                raise ValueError(
                    f"Intermediate sigmas must lie in (sigma_min, sigma_max) = ({cfg.sigma_min}, {cfg.sigma_max}), "
                    f"got {levels.tolist()}."
                )
            if levels.numel() > 1 and not bool((levels[1:] < levels[:-1]).all()):
                raise ValueError(f"Intermediate sigmas must be strictly decreasing, got {levels.tolist()}.")
            sigmas = torch.cat([torch.tensor([cfg.sigma_max], dtype=torch.float64), levels])
        else:
            n = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}.")
            sigmas = self.default_sigmas(n)
        self.num_inference_steps = len(sigmas)
        self.sigmas = sigmas.to(device=device, dtype=torch.float32)
        self.timesteps = edm_scalings(self.sigmas, cfg.sigma_data)[3]

    def scale_model_input(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        """The UNet's input c_in(sigma) * x (EDM's c_in)."""
        return edm_scale_input(sample, sigma, self.config.sigma_data)

    def step(
        self,
        denoised: torch.Tensor,
        step_index: int,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        return_dict: bool = True,
    ):
        """Given the student's f(x, tau_i) at step ``step_index``, return the input of the next step (CM Alg. 1).

        Args:
            denoised (`torch.Tensor`): f(x_{tau_i}, tau_i).
            step_index (`int`): i, the index of tau_i in `sigmas`.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): one generator per sample keeps
                each sample independent of the batch.
            return_dict (`bool`, defaults to `True`): return a [`ConsistencyStudentSchedulerOutput`] or a tuple.
        """
        if self.sigmas is None:
            raise RuntimeError("Call set_timesteps before step.")
        if not 0 <= step_index < len(self.sigmas):
            raise IndexError(f"step_index {step_index} is out of range for {len(self.sigmas)} noise levels.")
        prev_sample = denoised
        if step_index + 1 < len(self.sigmas):
            # x_tau = x + sqrt(tau^2 - eps^2) z (CM Alg. 1, line 5).
            tau = self.sigmas[step_index + 1]
            noise = randn_tensor(denoised.shape, generator=generator, device=denoised.device, dtype=denoised.dtype)
            prev_sample = denoised + (tau**2 - self.config.sigma_min**2).sqrt() * noise
        if not return_dict:
            return (prev_sample, denoised)
        return ConsistencyStudentSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def __len__(self):
        return self.config.num_inference_steps
