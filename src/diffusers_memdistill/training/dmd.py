"""Helpers of DMD / DMD2 distillation that do not depend on the training loop: the two time-scale update rule, the
checks of a run's settings against its teacher, and the pipeline a distilled generator is saved as."""

from __future__ import annotations

from typing import Optional, Sequence

from ..pipelines.pipeline_dmd import DMDGeneratorPipeline
from ..schedulers.scheduling_dmd import DMDGeneratorScheduler


def check_update_ratio(fake_updates_per_generator_update: int) -> int:
    """The two time-scale ratio must be a positive integer (003 App. D uses 5)."""
    ratio = fake_updates_per_generator_update
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"fake_updates_per_generator_update must be an integer >= 1, got {ratio!r}.")
    return ratio


def is_generator_update(step: int, fake_updates_per_generator_update: int) -> bool:
    """Whether iteration ``step`` (0-based) also updates the generator: the fake denoiser is updated first in every
    iteration and the generator in every ``ratio``-th, after ``ratio`` fake updates (two time-scale rule, 003 App. D).
    It is the runner's ``Phase(every=ratio, offset=ratio - 1)`` (``training/distill_dmd.py``)."""
    ratio = check_update_ratio(fake_updates_per_generator_update)
    return step % ratio == ratio - 1


def check_sigma_range(teacher_config, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                      generator_sigmas: Optional[Sequence[float]] = None) -> tuple:
    """The distillation's sigma range and generator levels, checked against the teacher scheduler's range.

    Returns:
        `(sigma_min, sigma_max, generator_sigmas)` with the teacher's values where none were given (the one-step
        generator starts at sigma_max).

    Raises:
        ValueError: a level outside [teacher sigma_min, teacher sigma_max], an empty range or non-decreasing levels.
    """
    lo, hi = float(teacher_config.sigma_min), float(teacher_config.sigma_max)
    sigma_min = lo if sigma_min is None else float(sigma_min)
    sigma_max = hi if sigma_max is None else float(sigma_max)
    if not lo * (1 - 1e-6) <= sigma_min < sigma_max <= hi * (1 + 1e-6):
        raise ValueError(f"The sigma range [{sigma_min}, {sigma_max}] must be a non-empty part of the teacher's "
                         f"[{lo}, {hi}].")
    levels = [sigma_max] if generator_sigmas is None else [float(s) for s in generator_sigmas]
    if not levels or any(not sigma_min <= s <= sigma_max for s in levels):
        raise ValueError(f"Generator levels {levels} must lie in the sigma range [{sigma_min}, {sigma_max}].")
    if any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"Generator levels must be strictly decreasing, got {levels}.")
    return sigma_min, sigma_max, levels


def generator_pipeline(generator_unet, teacher_config, generator_sigmas: Sequence[float]) -> DMDGeneratorPipeline:
    """The [`DMDGeneratorPipeline`] of a distilled generator, with the teacher's schedule and sigma_data and the
    generator's trained levels (sampled with as many steps by default)."""
    scheduler = DMDGeneratorScheduler(
        sigma_min=teacher_config.sigma_min,
        sigma_max=teacher_config.sigma_max,
        rho=teacher_config.rho,
        sigma_data=teacher_config.sigma_data,
        num_inference_steps=len(generator_sigmas),
        generator_sigmas=[float(s) for s in generator_sigmas],
    )
    return DMDGeneratorPipeline(unet=generator_unet, scheduler=scheduler)
