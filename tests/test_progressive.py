"""Progressive distillation: the DDIM scheduler on nested Karras grids, the loss on an analytic case (Gaussian data,
exact denoiser), the round schedule and its bad inputs, and the pipeline through the registry."""

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_unet
from diffusers_memdistill.losses.progressive import (
    ProgressiveDistillationLoss,
    progressive_loss_weight,
    progressive_target,
)
from diffusers_memdistill.pipelines.pipeline_progressive import ProgressiveDistillationPipeline
from diffusers_memdistill.registry import registration_for, sample_images
from diffusers_memdistill.schedulers.scheduling_edm_ddim import EDMDDIMScheduler, ddim_levels
from diffusers_memdistill.solvers import euler_step
from diffusers_memdistill.training import distill_progressive
from diffusers_memdistill.training.distill_progressive import round_dirs, round_schedule

SD = 0.5


def c_skip(sigma):
    return SD**2 / (sigma**2 + SD**2)


def gaussian_denoiser(x, sigma, class_labels=None):
    """The exact denoiser of data x_0 ~ N(0, SD^2 I): E[x_0 | x_sigma] = c_skip(sigma) x."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return c_skip(sigma) * x


def ddim_factor(sigma, sigma_next):
    """A DDIM step of the Gaussian denoiser is linear: x' = (c + (sigma'/sigma)(1 - c)) x, c = c_skip(sigma)."""
    c = c_skip(sigma)
    return c + sigma_next / sigma * (1 - c)


def two_step_student_gain(levels, j):
    """b with b + R (1 - b) = a_1 a_2 (R = s_2j+2 / s_2j): the linear denoiser D = b x whose single DDIM step equals the
    teacher's two, solved here from the composition of the two linear teacher steps."""
    s0, s1, s2 = (float(levels[2 * j + k]) for k in range(3))
    a = ddim_factor(s0, s1) * ddim_factor(s1, s2)
    ratio = s2 / s0
    return (a - ratio) / (1 - ratio)


class LinearStudent:
    """D(x; sigma) = b(sigma) x at the student's levels (a lookup: it is defined only there)."""

    def __init__(self, levels, num_student_steps, scale=1.0):
        self.gains = {round(float(levels[2 * j]), 6): scale * two_step_student_gain(levels, j)
                      for j in range(num_student_steps)}

    def __call__(self, x, sigma, class_labels=None):
        gains = torch.tensor([self.gains[round(float(s), 6)] for s in sigma.reshape(-1)], dtype=torch.float32)
        return gains.reshape(-1, *([1] * (x.ndim - 1))) * x


class LinearNetwork(torch.nn.Module):
    """A 'UNet' whose EDM denoiser is D = b(sigma) x: F(c_in x; c_noise) = (b - c_skip) / (c_out c_in) * input."""

    def __init__(self, gain_of_sigma):
        super().__init__()
        self.gain_of_sigma = gain_of_sigma

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        sigma = math.exp(4 * float(timestep))
        b = self.gain_of_sigma(sigma)
        c_out, c_in = sigma * SD / math.sqrt(sigma**2 + SD**2), 1 / math.sqrt(sigma**2 + SD**2)
        out = (b - c_skip(sigma)) / (c_out * c_in) * sample
        return (out,) if not return_dict else SimpleNamespace(sample=out)


def ddim_loop(scheduler, network, z):
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(network(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


# ---------------------------------------------------------------- scheduler


def test_ddim_levels_are_nested_and_the_scheduler_round_trips(tmp_path):
    for k in (1, 2, 4, 8):
        torch.testing.assert_close(ddim_levels(2 * k)[::2], ddim_levels(k), rtol=1e-12, atol=0)
    scheduler = EDMDDIMScheduler(sigma_max=40.0, num_inference_steps=4)
    scheduler.save_pretrained(tmp_path)
    loaded = EDMDDIMScheduler.from_pretrained(tmp_path)
    assert loaded.config.num_inference_steps == 4 and len(loaded.timesteps) == 4 and len(loaded.sigmas) == 5
    assert float(loaded.sigmas[0]) == 40.0 and float(loaded.sigmas[-1]) == pytest.approx(0.002)
    torch.testing.assert_close(loaded.timesteps, loaded.sigmas[:-1].log() / 4)
    with pytest.raises(ValueError, match="positive integer"):
        loaded.set_timesteps(0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        loaded.set_timesteps(sigmas=[1.0, 2.0, 0.5])


def test_ddim_scheduler_is_the_euler_step_of_the_ode():
    """The scheduler's loop with the exact Gaussian denoiser equals the product of the analytic DDIM factors."""
    zero = LinearNetwork(c_skip)  # b = c_skip: F = 0
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    scheduler = EDMDDIMScheduler(num_inference_steps=5)
    levels = scheduler.sigmas.double()
    expected = z * 80.0 * math.prod(ddim_factor(float(a), float(b)) for a, b in zip(levels[:-1], levels[1:]))
    torch.testing.assert_close(ddim_loop(scheduler, zero, z), expected.float(), rtol=1e-5, atol=1e-6)
    # One step to a final 0 returns D itself.
    scheduler.set_timesteps(sigmas=[2.0, 0.0])
    torch.testing.assert_close(ddim_loop(scheduler, zero, z), z * 2.0 * c_skip(2.0))


# ---------------------------------------------------------------- loss


def test_target_is_what_one_student_step_must_denoise_to():
    g = torch.Generator().manual_seed(1)
    x, x_two = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    sigma, sigma_two = torch.tensor([80.0, 10.0, 1.0, 0.1]), torch.tensor([20.0, 2.0, 0.3, 0.002])
    target = progressive_target(x, x_two, sigma, sigma_two)
    # One DDIM step from (x, sigma) with D = target lands on x''.
    torch.testing.assert_close(euler_step(lambda *_: target, x, sigma, sigma_two), x_two, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_student_steps", [1, 2, 4])
def test_loss_is_zero_when_the_student_is_the_two_step_teacher_map(num_student_steps):
    """Gaussian data, exact teacher: the linear student whose one step equals two teacher steps has zero loss; the
    teacher itself used as a one-step student has not."""
    loss_fn = ProgressiveDistillationLoss(num_student_steps, distance="l2", weighting="uniform")
    levels = loss_fn.sigmas.double()
    images = 0.5 * torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    student = LinearStudent(levels, num_student_steps)
    loss, logs = loss_fn(student, gaussian_denoiser, images, generator=torch.Generator().manual_seed(2))
    assert loss.shape == (64,) and set(logs["index"].tolist()) == set(range(num_student_steps))
    scale = loss_fn(LinearStudent(levels, num_student_steps, scale=1.05), gaussian_denoiser, images,
                    generator=torch.Generator().manual_seed(2))[0]
    assert loss.max() < 1e-6 * scale.mean()
    wrong = loss_fn(gaussian_denoiser, gaussian_denoiser, images, generator=torch.Generator().manual_seed(2))[0]
    assert wrong.mean() > 1e3 * loss.mean() + 1e-6


def test_the_student_samples_in_k_steps_what_the_teacher_did_in_2k():
    """The zero-loss student of the analytic case, as a network, samples with the K-step scheduler what the exact
    teacher samples with the 2K-step one."""
    levels = ddim_levels(8)
    gains = {round(float(levels[2 * j]), 4): two_step_student_gain(levels, j) for j in range(4)}
    student = LinearNetwork(lambda s: gains[round(s, 4)])
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    out_student = ddim_loop(EDMDDIMScheduler(num_inference_steps=4), student, z)
    out_teacher = ddim_loop(EDMDDIMScheduler(num_inference_steps=8), LinearNetwork(c_skip), z)
    torch.testing.assert_close(out_student, out_teacher, rtol=1e-4, atol=1e-5)
    # ... and is not the teacher's own 4-step sampler.
    assert not torch.allclose(ddim_loop(EDMDDIMScheduler(num_inference_steps=4), LinearNetwork(c_skip), z),
                              out_teacher, rtol=1e-3, atol=1e-3)


def test_loss_weights_and_bad_options():
    sigma = torch.tensor([0.01, 1.0, 80.0])
    torch.testing.assert_close(progressive_loss_weight("karras", sigma), (sigma**2 + 0.25) / (sigma * 0.5) ** 2)
    torch.testing.assert_close(progressive_loss_weight("truncated-snr", sigma), torch.tensor([1e4, 1.0, 1.0]))
    with pytest.raises(ValueError, match="Unknown weighting"):
        ProgressiveDistillationLoss(2, weighting="ict")
    with pytest.raises(ValueError, match="Unknown distance"):
        ProgressiveDistillationLoss(2, distance="l1")


# ---------------------------------------------------------------- rounds and flags


def test_round_schedule_halves_the_steps_down_to_the_final_ones(tmp_path):
    assert round_schedule(8) == [4, 2, 1]
    assert round_schedule(4096) == [2**k for k in range(11, -1, -1)]
    assert round_schedule(12, 3) == [6, 3]
    assert round_schedule(2, 1) == [1]
    dirs = round_dirs(str(tmp_path), [4, 2, 1])
    assert dirs[-1] == str(tmp_path) and [d.split("/")[-1] for d in dirs[:-1]] == ["round-01-4-steps",
                                                                                    "round-02-2-steps"]
    with pytest.raises(ValueError, match=r"--final_steps 3 must be --teacher_steps 8 divided by a power of two.*"
                                         r"\[4, 2, 1\]"):
        round_schedule(8, 3)
    with pytest.raises(ValueError, match="divided by a power of two"):
        round_schedule(8, 8)  # no round at all
    with pytest.raises(ValueError, match="divided by a power of two"):
        round_schedule(24, 2)  # 12 is not a power of two
    with pytest.raises(ValueError, match="positive integer"):
        round_schedule(8, 0)


@pytest.mark.parametrize("flags, message", [
    (["--final_steps", "3"], "--final_steps 3 must be --teacher_steps 8 divided by a power of two"),
    (["--final_steps", "0"], "--final_steps must be a positive integer"),
    (["--teacher_steps", "6", "--final_steps", "4"], "--final_steps 4 must be --teacher_steps 6"),
    (["--weighting", "ict"], "invalid choice"),
])
def test_bad_flags_end_with_a_one_line_error(flags, message, tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "teacher"), "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "1", "--teacher_steps", "8", *flags]
    with pytest.raises(SystemExit) as exc:
        distill_progressive.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- pipeline and registry


def test_pipeline_saves_reloads_and_samples_through_the_registry(tmp_path):
    pipe = ProgressiveDistillationPipeline(tiny_unet(num_classes=3), EDMDDIMScheduler(num_inference_steps=2))
    pipe.save_pretrained(tmp_path)
    loaded = ProgressiveDistillationPipeline.from_pretrained(tmp_path)
    registration = registration_for(loaded)
    assert registration.kind == "generator" and registration.steps(loaded) == 2
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images = sample_images(loaded, z, class_labels=[0, 1, 2])
    again = sample_images(pipe, z, class_labels=[0, 1, 2], batch_size=1)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    torch.testing.assert_close(images, again)
    assert not torch.allclose(images, sample_images(loaded, z, class_labels=[0, 1, 2], num_inference_steps=1))
    assert (tmp_path / "pipeline_progressive.py").is_file()
