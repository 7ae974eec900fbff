"""Moving averages of network weights: EDM2's power-function EMA (the default) and the constant-decay EMA.

After the t-th optimizer update of the averaged network (t = 1, 2, ...) the average moves as

    theta_avg <- beta(t) * theta_avg + (1 - beta(t)) * theta_t

with beta(t) = (1 - 1/t)^(gamma + 1) for the power function (Karras et al. 2024, "Analyzing and improving the
training dynamics of diffusion models", §3 and App. C), a constant ``decay`` for the classic EMA, or
min(decay, t / (t + 9)) for the classic EMA with warm-up. The power function forgets the initial weights at the first
update (beta(1) = 0) and gives update k the weight (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1) at time t, a profile
whose width grows with training: its standard deviation is sigma_rel * t, where
sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)). A constant decay of 0.9999 instead still holds
0.9999^5000 = 61% of the initial weights after 5,000 updates.

diffusers' ``EMAModel`` offers the constant decay and an inverse-gamma warm-up but not the power function, and no
record of how long the average is; hence this small class.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

#: sigma_rel of gamma = 0: the widest profile whose weights do not decrease with time (1 / sqrt(12)).
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)
DEFAULT_SIGMA_REL = 0.05  # EDM2's shorter stored profile


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    r"""The exponent gamma of the power-function EMA whose profile has relative standard deviation ``sigma_rel``.

    Solves sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (EDM2 eq. 3), i.e. the cubic
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0, and returns its largest real root.

    Raises:
        ValueError: ``sigma_rel`` outside (0, 1/sqrt(12)] (gamma would be negative: weights falling with time).
    """
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}], got {sigma_rel}.")
    inv = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function EMA profile of exponent ``gamma`` (EDM2 eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


class ModelEMA:
    r"""A moving average of a network's weights, updated after each optimizer step of that network.

    Exactly one of ``sigma_rel`` (power-function EMA) and ``decay`` (constant decay, optionally with ``warmup``) is
    used; with neither, the power function with ``sigma_rel = 0.05``.

    Args:
        model (`torch.nn.Module`): the network to average; a frozen copy of it becomes the average.
        sigma_rel (`float`, *optional*): width of the power-function profile relative to the training length.
        decay (`float`, *optional*): constant decay in [0, 1).
        warmup (`bool`, defaults to `False`): with ``decay``, use min(decay, t / (t + 9)) at update t.
        train_mode (`bool`, defaults to `False`): keep the average in train mode (the CD target network sees the
            student's dropout).

    The object has ``state_dict`` / ``load_state_dict`` (weights, update count and the moments of the weight profile,
    all tensors and numbers), so that `accelerate.Accelerator.register_for_checkpointing` saves and restores it.
    """

    def __init__(self, model: torch.nn.Module, sigma_rel: float | None = None, decay: float | None = None,
                 warmup: bool = False, train_mode: bool = False):
        if sigma_rel is not None and decay is not None:
            raise ValueError("Pass either sigma_rel (power-function EMA) or decay (constant decay), not both.")
        if decay is None:
            self.kind, self.sigma_rel = "power", DEFAULT_SIGMA_REL if sigma_rel is None else float(sigma_rel)
            self.gamma, self.decay = sigma_rel_to_gamma(self.sigma_rel), None
            if warmup:
                raise ValueError("warmup applies to the constant-decay EMA only.")
        else:
            if not 0 <= decay < 1:
                raise ValueError(f"The EMA decay must lie in [0, 1), got {decay}.")
            self.kind, self.sigma_rel, self.gamma, self.decay = "constant", None, None, float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.train(train_mode)
        self.num_updates = 0
        # Profile of the average over update indices k (k = 0: the initial weights): total weight of k = 0, and the
        # first two moments of k, updated exactly by the same recursion as the weights.
        self.initial_weight, self._m1, self._m2 = 1.0, 0.0, 0.0

    def beta(self, t: int) -> float:
        """The decay applied at update ``t`` (1-based)."""
        if self.kind == "power":
            return (1.0 - 1.0 / t) ** (self.gamma + 1.0)
        return min(self.decay, t / (t + 9.0)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> float:
        """Move the average towards ``model`` (call after each optimizer step of it); returns the beta used."""
        self.num_updates += 1
        t = self.num_updates
        beta = self.beta(t)
        averaged = list(self.module.parameters())
        current = [p.detach().to(q.dtype) for p, q in zip(model.parameters(), averaged)]
        torch._foreach_lerp_(averaged, current, 1.0 - beta)
        for b_avg, b in zip(self.module.buffers(), model.buffers()):
            b_avg.copy_(b)
        self.initial_weight *= beta
        self._m1 = beta * self._m1 + (1.0 - beta) * t
        self._m2 = beta * self._m2 + (1.0 - beta) * t * t
        return beta

    def to(self, *args, **kwargs) -> "ModelEMA":
        self.module.to(*args, **kwargs)
        return self

    def summary(self) -> dict:
        """What the average is, for the saved config: its rule, and the weight profile it has after the updates made.

        ``averaging_length_steps`` is the standard deviation of the profile over updates (EDM2's sigma_rel times the
        training length for the power function), ``mean_age_steps`` how many updates ago the weights entered on
        average, ``initial_weight`` the share of the weights the network started from.
        """
        variance = max(self._m2 - self._m1**2, 0.0)
        out = {"kind": self.kind, "num_updates": self.num_updates, "initial_weight": self.initial_weight,
               "mean_age_steps": self.num_updates - self._m1, "averaging_length_steps": math.sqrt(variance)}
        if self.kind == "power":
            out.update(sigma_rel=self.sigma_rel, gamma=self.gamma)
        else:
            out.update(decay=self.decay, warmup=self.warmup)
        return out

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates,
                "initial_weight": self.initial_weight, "m1": self._m1, "m2": self._m2}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.initial_weight, self._m1, self._m2 = float(state["initial_weight"]), float(state["m1"]), float(state["m2"])
