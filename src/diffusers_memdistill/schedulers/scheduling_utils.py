"""What the package's sigma-indexed schedulers share: the step index, its search, and EDM's input scaling."""

from typing import Optional, Union

import torch

from ..scalings import edm_scale_input


class SigmaIndexSchedulerMixin:
    """Step-index bookkeeping of diffusers' EDM schedulers, over ``self.timesteps`` (one per network evaluation) and
    ``self.sigmas`` (their noise levels); ``scale_model_input`` is EDM's c_in(sigma) x at the current index."""

    @property
    def step_index(self) -> Optional[int]:
        """Index of the next network evaluation in `timesteps`; `None` before the first call."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """The first index, set by a pipeline that starts inside the schedule (`set_begin_index`)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at timestep index ``begin_index`` instead of searching `timesteps` for the first timestep."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep) -> int:
        """The index of ``timestep`` in `timesteps`."""
        matches = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero().flatten()
        if not len(matches):
            raise ValueError(f"Timestep {float(timestep)} is not in this schedule.")
        return int(matches[0])

    def _init_step_index(self, timestep):
        if self.timesteps is None:
            raise RuntimeError("Call set_timesteps before sampling.")
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: Union[float, torch.Tensor]) -> torch.Tensor:
        """The UNet's input c_in(sigma) x (EDM's c_in) at the noise level of ``timestep``'s evaluation."""
        if self._step_index is None:
            self._init_step_index(timestep)
        return edm_scale_input(sample, self.sigmas[self._step_index], self.config.sigma_data)

    def __len__(self):
        return self.config.num_inference_steps
