import pytest

from conftest import tiny_unet
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler
from diffusers_memdistill.training.dmd import (
    check_sigma_range,
    check_update_ratio,
    generator_pipeline,
    is_generator_update,
)


def test_two_time_scale_rule():
    assert [is_generator_update(s, 2) for s in range(6)] == [False, True] * 3
    assert [is_generator_update(s, 5) for s in range(10)].count(True) == 2 and is_generator_update(4, 5)
    assert all(is_generator_update(s, 1) for s in range(3))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="integer >= 1"):
            check_update_ratio(bad)


def test_sigma_range_is_checked_against_the_teacher():
    teacher = EDMHeunScheduler(sigma_min=0.002, sigma_max=80.0).config
    assert check_sigma_range(teacher) == (0.002, 80.0, [80.0])
    assert check_sigma_range(teacher, generator_sigmas=[80.0, 2.5]) == (0.002, 80.0, [80.0, 2.5])
    with pytest.raises(ValueError, match="part of the teacher's"):
        check_sigma_range(teacher, sigma_max=100.0)
    with pytest.raises(ValueError, match="part of the teacher's"):
        check_sigma_range(teacher, sigma_min=0.001)
    with pytest.raises(ValueError, match="must lie in the sigma range"):
        check_sigma_range(teacher, sigma_max=40.0, generator_sigmas=[80.0])
    with pytest.raises(ValueError, match="decreasing"):
        check_sigma_range(teacher, generator_sigmas=[2.5, 80.0])


def test_generator_pipeline_carries_the_teachers_schedule():
    teacher = EDMHeunScheduler(sigma_data=0.3, sigma_max=40.0).config
    pipe = generator_pipeline(tiny_unet(), teacher, [40.0, 1.5])
    cfg = pipe.scheduler.config
    assert (cfg.sigma_data, cfg.sigma_max, cfg.num_inference_steps, cfg.generator_sigmas) == (0.3, 40.0, 2, [40.0, 1.5])
