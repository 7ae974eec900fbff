"""Scheduler for EDM's Heun sampler, deterministic (EDM Alg. 1) and stochastic (EDM Alg. 2)."""

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
    edm_scalings,
    edm_sigma_from_c_noise,
    karras_sigmas,
    precondition_output,
)
from ..solvers import euler_update, heun_correction, ode_derivative
from .scheduling_utils import SigmaIndexSchedulerMixin


@dataclass
class EDMHeunSchedulerOutput(BaseOutput):
    """Output of [`EDMHeunScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`): the input of the next network evaluation (float32): the Euler point at
            sigma_{i+1} after a first-order call, the corrected sample after a second-order call (raised to the next
            level's sigma_hat by fresh noise when the next level churns), the final sample after the last call.
        pred_original_sample (`torch.Tensor`): the denoised estimate D(x; sigma) of this network evaluation.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class EDMHeunScheduler(SigmaIndexSchedulerMixin, SchedulerMixin, ConfigMixin):
    r"""EDM's second-order Heun sampler on the Karras noise grid (Karras et al. 2022, Alg. 1 and 2).

    The network contract is EDM's and diffusers' `EDMEulerScheduler`'s: `timesteps` are the values
    c_noise = ln(sigma) / 4 that the UNet is fed, `scale_model_input` returns c_in(sigma) x, and `step` takes the raw
    network output F and forms the denoiser D(x; sigma) = c_skip x + c_out F itself (EDM eq. 7; diffusers calls this
    F-prediction `prediction_type="epsilon"`). The usual loop samples it:

    ```py
    scheduler.set_timesteps(18)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        F = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(F, t, x, generator=generator).prev_sample
    ```

    As diffusers' `HeunDiscreteScheduler`, the scheduler keeps state between the two network evaluations of a Heun
    step (`order = 2`): with N noise levels sigma_0 > ... > sigma_{N-1} > sigma_N = 0 there are 2N - 1 timesteps,
    one per evaluation, at sigma_hat_0, sigma_1, sigma_hat_1, ..., sigma_{N-1}, sigma_hat_{N-1}. A first-order call
    (even index) takes the Euler step from sigma_hat_i to sigma_{i+1} (EDM Alg. 1 line 5); the next call (odd index)
    applies the trapezoidal correction with the derivative at sigma_{i+1} (lines 6-8) and, when level i + 1 churns,
    adds the noise that raises it to sigma_hat_{i+1} = (1 + gamma) sigma_{i+1} (Alg. 2 lines 4-6). Without churn
    sigma_hat_i = sigma_i and the timesteps repeat in pairs, as in `HeunDiscreteScheduler`. The last level is an Euler
    step to sigma = 0.

    Stock schedulers of the same model contract load from this config and sample the same ODE:
    `EDMEulerScheduler.from_config(scheduler.config)` (first order) and `EDMDPMSolverMultistepScheduler`.

    Args:
        sigma_min (`float`, defaults to 0.002), sigma_max (`float`, defaults to 80.0), rho (`float`, defaults to 7.0):
            the Karras grid.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data, for the preconditioning.
        num_inference_steps (`int`, defaults to 18): default number N of noise levels (2N - 1 network evaluations).
        s_churn (`float`, defaults to 0.0), s_tmin (`float`, defaults to 0.0), s_tmax (`float`, *optional*),
        s_noise (`float`, defaults to 1.0): EDM Alg. 2's stochasticity; `s_tmax=None` means no upper limit.
        parameterization (`str`, defaults to `"edm"`): the network's output is EDM's F (preconditioned output).
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
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

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As `ConfigMixin.from_config`; a stock EDM scheduler's config is refused when it describes another network
        contract (a v-prediction, a non-Karras grid or a final sigma other than 0), which this sampler would misread."""
        if isinstance(config, Mapping):
            for key, expected in (("prediction_type", "epsilon"), ("sigma_schedule", "karras"),
                                  ("final_sigmas_type", "zero")):
                value = kwargs.get(key, config.get(key, expected))
                if value != expected:
                    raise ValueError(
                        f"EDMHeunScheduler samples EDM's F-prediction on the Karras grid down to sigma = 0 "
                        f"(diffusers' {key}={expected!r}); this config has {key}={value!r}."
                    )
            kwargs = {k: v for k, v in kwargs.items() if k not in ("prediction_type", "sigma_schedule",
                                                                   "final_sigmas_type")}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the starting sample: sigma_hat_0, whose churn noise is drawn with the initial noise
        (sigma_0 z + sqrt(sigma_hat_0^2 - sigma_0^2) s_noise n has std sqrt(sigma_0^2 + s_noise^2 (sigma_hat_0^2 -
        sigma_0^2))); sigma_0 = sigma_max without churn."""
        sigma, sigma_hat = float(self._levels[0]), float(self.sigmas[0])
        return (sigma**2 + self.config.s_noise**2 * (sigma_hat**2 - sigma**2)) ** 0.5

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next `step` is the Euler (first-order) half of a Heun step."""
        return self._step_index is None or self._step_index % 2 == 0

    def set_begin_index(self, begin_index: int = 0):
        """Start at timestep index ``begin_index`` (even: a level's first-order evaluation) instead of searching."""
        if begin_index % 2:
            raise ValueError(f"begin_index must index a first-order evaluation (an even index), got {begin_index}.")
        self._begin_index = begin_index

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device] = None,
        sigmas: Optional[Union[Sequence[float], torch.Tensor]] = None,
    ):
        """Set the N noise levels and the 2N - 1 evaluation timesteps.

        Args:
            num_inference_steps (`int`, *optional*): N >= 2 Karras levels from sigma_max to sigma_min; defaults to the
                config's.
            device (`str` or `torch.device`, *optional*): where to put `timesteps` (`sigmas` stay on the CPU, as in
                diffusers' schedulers).
            sigmas (`Sequence[float]` or `torch.Tensor`, *optional*): custom strictly decreasing positive levels
                sigma_0 > ... > sigma_{N-1} (an optional trailing 0 is dropped); replaces `num_inference_steps`.
        """
        cfg = self.config
        if sigmas is not None:
            if num_inference_steps is not None:
                raise ValueError("Pass either num_inference_steps or sigmas, not both.")
            levels = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
            if levels.numel() > 1 and levels[-1] == 0:
                levels = levels[:-1]
            if levels.numel() == 0 or not bool((levels > 0).all()):
                raise ValueError(f"sigmas must be positive noise levels, got {levels.tolist()}.")
            if levels.numel() > 1 and not bool((levels[1:] < levels[:-1]).all()):
                raise ValueError(f"sigmas must be strictly decreasing, got {levels.tolist()}.")
        else:
            n = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
            if isinstance(n, bool) or not isinstance(n, int):
                raise ValueError(f"num_inference_steps must be an integer, got {n!r}.")
            levels = karras_sigmas(n, cfg.sigma_min, cfg.sigma_max, cfg.rho, append_zero=False)
        n = levels.numel()
        # EDM Alg. 2 line 4: gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], else 0.
        s_tmax = float("inf") if cfg.s_tmax is None else cfg.s_tmax
        inside = (levels >= cfg.s_tmin) & (levels <= s_tmax)
        gamma = torch.where(inside, torch.tensor(min(cfg.s_churn / n, 2**0.5 - 1), dtype=torch.float64), 0.0)
        hats = levels * (1 + gamma)
        evaluations = [hats[0]]
        for i in range(1, n):
            evaluations += [levels[i], hats[i]]
        evaluations = torch.stack(evaluations)
        self.num_inference_steps = n
        self._levels = torch.cat([levels, levels.new_zeros(1)]).to(torch.float32)
        self.sigmas = torch.cat([evaluations, evaluations.new_zeros(1)]).to(torch.float32)
        self.timesteps = edm_scalings(self.sigmas[:-1], cfg.sigma_data)[3].to(device)
        self._step_index = None
        self._begin_index = None
        self._first_order = None  # (x_hat, d) of the pending Heun step

    def index_for_timestep(self, timestep) -> int:
        """The first first-order (even) index of ``timestep`` in `timesteps`."""
        matches = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero().flatten()
        matches = [int(m) for m in matches if int(m) % 2 == 0]
        if not matches:
            raise ValueError(f"Timestep {float(timestep)} is not a first-order timestep of this schedule.")
        return matches[0]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        return_dict: bool = True,
    ):
        """One network evaluation's share of a Heun step, from the raw network output.

        Args:
            model_output (`torch.Tensor`): the network's output F(c_in x; c_noise) at this timestep.
            timestep (`float` or `torch.Tensor`): the current entry of `timesteps`.
            sample (`torch.Tensor`): the sample x the network saw (through `scale_model_input`).
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): draws the churn noise; one generator
                per sample keeps each sample independent of the batch.
            return_dict (`bool`, defaults to `True`): return an [`EDMHeunSchedulerOutput`] or a tuple
                `(prev_sample, pred_original_sample)`.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= len(self.timesteps):
            raise IndexError(f"All {len(self.timesteps)} steps were taken; call set_timesteps to sample again.")
        sigma = self.sigmas[k]
        c_skip, c_out = edm_scalings(sigma, self.config.sigma_data)[:2]
        x = sample.float()
        denoised = precondition_output(x, model_output, c_skip, c_out)
        if k % 2 == 0:
            # Euler step from (x_hat, sigma_hat) to sigma_{i+1}.
            sigma_next = self.sigmas[k + 1]
            derivative = ode_derivative(x, denoised, sigma)
            prev_sample = euler_update(x, derivative, sigma, sigma_next)
            self._first_order = (x, derivative) if sigma_next > 0 else None
        else:
            if self._first_order is None:
                raise RuntimeError("A second-order step needs the first-order step before it in the same run.")
            # Apply 2nd order correction.
            x_hat, derivative = self._first_order
            prev_sample = heun_correction(x_hat, derivative, ode_derivative(x, denoised, sigma), self.sigmas[k - 1],
                                          sigma)
            self._first_order = None
            sigma_hat_next = self.sigmas[k + 1]
            if sigma_hat_next > sigma:
                # Increase noise temporarily (EDM Alg. 2 lines 4-6) for the next level.
                noise = randn_tensor(prev_sample.shape, generator=generator, device=prev_sample.device,
                                     dtype=prev_sample.dtype)
                prev_sample = prev_sample + (sigma_hat_next**2 - sigma**2).sqrt() * self.config.s_noise * noise
        self._step_index = k + 1
        if not return_dict:
            return (prev_sample, denoised)
        return EDMHeunSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_sigma = x_0 + sigma n at the levels of ``timesteps`` (scalar or per-sample c_noise values)."""
        sigma = edm_sigma_from_c_noise(timesteps).to(original_samples.device).flatten()
        return original_samples + append_dims(sigma, original_samples.ndim).to(original_samples.dtype) * noise
