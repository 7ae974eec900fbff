"""The schedulers against diffusers' contract: config round trips, single steps with fixed seeds, full loops equal to
reference trajectories computed independently here, and swapping with the stock EDM / consistency schedulers."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    UNet2DModel,
)

from conftest import tiny_unet
from diffusers_memdistill.pipelines.pipeline_consistency import ConsistencyStudentPipeline
from diffusers_memdistill.schedulers.scheduling_consistency import ConsistencyStudentScheduler
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler

SD = 0.5


def public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def karras(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM eq. 5, written out here, with the final zero."""
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    levels = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return levels.tolist() + [0.0]


@torch.no_grad()
def edm_denoiser(unet, x, sigma, sd=SD, labels=None):
    """D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4) (EDM eq. 7 and Table 1), written out here."""
    c_skip, c_out, c_in = sd**2 / (sigma**2 + sd**2), sigma * sd / math.sqrt(sigma**2 + sd**2), 1 / math.sqrt(
        sigma**2 + sd**2)
    F = unet(c_in * x, torch.tensor(math.log(sigma) / 4), class_labels=labels).sample
    return c_skip * x + c_out * F


def run_loop(scheduler, unet, x, generator=None, labels=None, timestep_scale=1.0):
    """diffusers' denoising loop, as a pipeline writes it."""
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = unet(scheduler.scale_model_input(x, t), t / timestep_scale, class_labels=labels).sample
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


class ZeroNetwork(torch.nn.Module):
    """F = 0: the EDM denoiser is then c_skip x, the ideal denoiser of N(0, sd^2) data."""

    def forward(self, sample, timestep, class_labels=None):
        return SimpleNamespace(sample=torch.zeros_like(sample))


def noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- EDMHeunScheduler


def test_edm_heun_config_round_trip_and_schedule(tmp_path):
    scheduler = EDMHeunScheduler(sigma_max=40.0, s_churn=10.0, s_tmin=0.05, s_tmax=50.0, num_inference_steps=12)
    scheduler.save_pretrained(tmp_path)
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    assert public(loaded.config) == public(scheduler.config)
    torch.testing.assert_close(loaded.sigmas, scheduler.sigmas)
    torch.testing.assert_close(loaded.timesteps, scheduler.timesteps)
    # 2N - 1 evaluations, one timestep each (c_noise = ln(sigma) / 4), and the final sigma = 0.
    assert len(loaded.timesteps) == 23 and len(loaded.sigmas) == 24 and loaded.sigmas[-1] == 0
    torch.testing.assert_close(loaded.timesteps, loaded.sigmas[:-1].log() / 4)
    assert EDMHeunScheduler.from_config(loaded.config, s_churn=0.0).config.s_churn == 0.0
    assert scheduler.order == 2 and set(scheduler.compatibles) >= {EDMEulerScheduler, EDMDPMSolverMultistepScheduler}
    with pytest.raises(ValueError, match="parameterization"):
        EDMHeunScheduler(parameterization="epsilon")


def test_edm_heun_custom_sigmas_and_bad_input():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(sigmas=[10.0, 1.0, 0.1, 0.0])
    assert scheduler.num_inference_steps == 3
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([10.0, 1.0, 1.0, 0.1, 0.1, 0.0]))
    with pytest.raises(ValueError, match="decreasing"):
        scheduler.set_timesteps(sigmas=[1.0, 10.0])
    with pytest.raises(ValueError, match="positive"):
        scheduler.set_timesteps(sigmas=[1.0, -1.0])
    with pytest.raises(ValueError, match="not both"):
        scheduler.set_timesteps(4, sigmas=[1.0])
    with pytest.raises(ValueError, match="at least 2"):
        scheduler.set_timesteps(1)


def test_edm_heun_scale_model_input_and_add_noise():
    scheduler = EDMHeunScheduler(num_inference_steps=5)
    x = noise((2, 1, 4, 4))
    t = scheduler.timesteps[0]
    torch.testing.assert_close(scheduler.scale_model_input(x, t), x / math.sqrt(80.0**2 + SD**2))
    # add_noise reads sigma off each sample's timestep: x + sigma n.
    n = noise((2, 1, 4, 4), 1)
    timesteps = scheduler.timesteps[[0, 3]]
    expected = x + scheduler.sigmas[[0, 3]].reshape(2, 1, 1, 1) * n
    torch.testing.assert_close(scheduler.add_noise(x, n, timesteps), expected, rtol=1e-5, atol=1e-5)


def test_edm_heun_full_loop_equals_an_independent_heun_integration():
    unet = tiny_unet(num_classes=3)
    labels = torch.tensor([0, 2])
    z = noise((2, 1, 8, 8))
    scheduler = EDMHeunScheduler(num_inference_steps=6)
    x = run_loop(scheduler, unet, z, labels=labels)
    # EDM Alg. 1, written out.
    sigmas = karras(6)
    ref = z * sigmas[0]
    for i in range(6):
        d = (ref - edm_denoiser(unet, ref, sigmas[i], labels=labels)) / sigmas[i]
        euler = ref + (sigmas[i + 1] - sigmas[i]) * d
        if sigmas[i + 1] > 0:
            d_next = (euler - edm_denoiser(unet, euler, sigmas[i + 1], labels=labels)) / sigmas[i + 1]
            euler = ref + (sigmas[i + 1] - sigmas[i]) * (d + d_next) / 2
        ref = euler
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)
    assert scheduler.step_index == len(scheduler.timesteps)
    with pytest.raises(IndexError, match="set_timesteps"):
        scheduler.step(torch.zeros_like(z), scheduler.timesteps[-1], x)


def test_edm_heun_stochastic_step_with_a_fixed_seed():
    # One churning level: the first Heun step, then the noise that raises sigma_1 to sigma_hat_1 (EDM Alg. 2).
    scheduler = EDMHeunScheduler(num_inference_steps=4, s_churn=2.0, s_tmin=1.0, s_tmax=30.0, s_noise=1.01)
    levels = karras(4)
    gamma = min(2.0 / 4, 2**0.5 - 1)
    hats = [s * (1 + gamma) if 1.0 <= s <= 30.0 else s for s in levels[:4]]
    assert hats[0] == levels[0] and hats[1] > levels[1]  # sigma_max = 80 lies above s_tmax
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([hats[0], levels[1], hats[1], levels[2], hats[2],
                                                               levels[3], hats[3], 0.0]))
    x = noise((3, 1, 4, 4)) * 80.0
    out0, out1 = noise((3, 1, 4, 4), 1), noise((3, 1, 4, 4), 2)
    t = scheduler.timesteps
    euler = scheduler.step(out0, t[0], x).prev_sample
    result = scheduler.step(out1, t[1], euler, generator=torch.Generator().manual_seed(7))
    s0, s1 = levels[0], levels[1]
    D0 = SD**2 / (s0**2 + SD**2) * x + s0 * SD / math.sqrt(s0**2 + SD**2) * out0
    d0 = (x - D0) / s0
    torch.testing.assert_close(euler, x + (s1 - s0) * d0)
    D1 = SD**2 / (s1**2 + SD**2) * euler + s1 * SD / math.sqrt(s1**2 + SD**2) * out1
    corrected = x + (s1 - s0) * (d0 + (euler - D1) / s1) / 2
    z = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(7))
    churn = math.sqrt(hats[1] ** 2 - s1**2) * 1.01 * z
    torch.testing.assert_close(result.prev_sample, corrected + churn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.pred_original_sample, D1)
    # The starting noise carries the first level's churn: none here.
    assert scheduler.init_noise_sigma == pytest.approx(80.0)


def test_edm_heun_churn_adds_the_prescribed_noise_only_inside_its_range():
    scheduler = EDMHeunScheduler(s_churn=9.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.007, num_inference_steps=18)
    levels = karras(18)
    gamma = min(9.0 / 18, 2**0.5 - 1)
    x = torch.zeros(4096)
    zero = torch.zeros(4096)  # F = 0 and x = 0: the ODE stays at 0, only the churn noise moves it
    for k, t in enumerate(scheduler.timesteps):
        x = scheduler.step(zero, t, torch.zeros(4096), generator=torch.Generator().manual_seed(k)).prev_sample
        if k % 2 == 1:
            sigma = levels[(k + 1) // 2]
            if 0.05 <= sigma <= 50.0:
                assert float(scheduler.sigmas[k + 1]) == pytest.approx(sigma * (1 + gamma), rel=1e-6)
                assert x.std().item() == pytest.approx(((1 + gamma) ** 2 - 1) ** 0.5 * sigma * 1.007, rel=0.05)
            else:
                assert float(scheduler.sigmas[k + 1]) == pytest.approx(sigma) and torch.equal(x, zero)


def test_edm_heun_begin_index_and_timestep_lookup():
    scheduler = EDMHeunScheduler(num_inference_steps=5)
    # Without churn the timesteps repeat in pairs; a lookup lands on the first-order (even) index.
    assert scheduler.index_for_timestep(scheduler.timesteps[3]) == 4
    scheduler.set_begin_index(2)
    x = noise((1, 1, 4, 4))
    scheduler.scale_model_input(x, scheduler.timesteps[2])
    assert scheduler.step_index == 2 and scheduler.state_in_first_order
    with pytest.raises(ValueError, match="even"):
        scheduler.set_begin_index(3)


# ---------------------------------------------------------------- swapping with diffusers' EDM schedulers


def test_stock_euler_scheduler_from_the_teacher_config_samples_euler():
    unet = tiny_unet()
    teacher = EDMHeunScheduler(sigma_data=0.4, sigma_max=60.0, rho=6.0)
    euler = EDMEulerScheduler.from_config(teacher.config)
    assert (euler.config.sigma_data, euler.config.sigma_max, euler.config.rho) == (0.4, 60.0, 6.0)
    euler.set_timesteps(7)
    z = noise((2, 1, 8, 8))
    x = run_loop(euler, unet, z)
    sigmas = karras(7, sigma_max=60.0, rho=6.0)
    ref = z * math.sqrt(60.0**2 + 1)  # EDMEulerScheduler's init_noise_sigma
    for i in range(7):
        ref = ref + (sigmas[i + 1] - sigmas[i]) * (ref - edm_denoiser(unet, ref, sigmas[i], sd=0.4)) / sigmas[i]
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)


def test_stock_schedulers_and_heun_solve_the_same_ode_at_their_orders():
    # A zero network is the ideal denoiser of N(0, sd^2) data, whose PF-ODE maps x at sigma_0 to
    # x sd / sqrt(sigma_0^2 + sd^2) at sigma = 0. Each scheduler, loaded from the teacher's config, converges to that
    # solution at its order: refining the grid 4x divides Euler's error by ~4, Heun's and DPM-Solver++(2M)'s by ~16.
    unet = ZeroNetwork()
    heun = EDMHeunScheduler(sigma_data=0.2)
    z = noise((4, 1, 8, 8))
    for scheduler, order in ((heun, 2), (EDMEulerScheduler.from_config(heun.config), 1),
                             (EDMDPMSolverMultistepScheduler.from_config(heun.config), 2)):
        errors = []
        for steps in (20, 80):
            scheduler.set_timesteps(steps)
            exact = z * scheduler.init_noise_sigma * 0.2 / math.sqrt(80.0**2 + 0.2**2)
            errors.append(((run_loop(scheduler, unet, z) - exact).norm() / exact.norm()).item())
        assert 4**order * 0.7 < errors[0] / errors[1] < 4**order * 1.5, (type(scheduler).__name__, errors)
        assert errors[1] < (0.05 if order == 1 else 0.005)


def test_project_scheduler_loads_from_stock_configs(tmp_path):
    stock = EDMEulerScheduler(sigma_min=0.01, sigma_max=60.0, sigma_data=0.3, rho=5.0)
    stock.save_pretrained(tmp_path / "euler")
    for config in (stock.config, EDMHeunScheduler.load_config(tmp_path / "euler")):
        heun = EDMHeunScheduler.from_config(config)
        assert (heun.config.sigma_min, heun.config.sigma_max, heun.config.sigma_data, heun.config.rho) == (
            0.01, 60.0, 0.3, 5.0)
    loaded = EDMHeunScheduler.from_pretrained(tmp_path / "euler")
    assert isinstance(loaded, EDMHeunScheduler) and loaded.config.sigma_max == 60.0
    for wrong in ({"prediction_type": "v_prediction"}, {"sigma_schedule": "exponential"},
                  {"final_sigmas_type": "sigma_min"}):
        with pytest.raises(ValueError, match=next(iter(wrong))):
            EDMHeunScheduler.from_config(EDMEulerScheduler(**wrong).config)


# ---------------------------------------------------------------- ConsistencyStudentScheduler


def test_consistency_config_round_trip_and_levels(tmp_path):
    scheduler = ConsistencyStudentScheduler(sigma_min=0.01, sigma_max=40.0, rho=5.0, sigma_data=0.25,
                                            num_inference_steps=2, s_noise=1.003, clip_denoised=True)
    scheduler.save_pretrained(tmp_path)
    loaded = ConsistencyStudentScheduler.from_pretrained(tmp_path)
    assert public(loaded.config) == public(scheduler.config)
    assert loaded.config.c_noise_scale == 1.0  # a saved student keeps its own scale
    torch.testing.assert_close(loaded.sigmas, scheduler.sigmas)
    assert scheduler.compatibles == [CMStochasticIterativeScheduler]

    default = ConsistencyStudentScheduler()
    default.set_timesteps(1)
    assert default.sigmas.tolist() == pytest.approx([80.0, 0.002]) and default.init_noise_sigma == 80.0
    default.set_timesteps(2)
    torch.testing.assert_close(default.sigmas[:2], torch.tensor(karras(3)[:2], dtype=torch.float32))
    # EDM's c_noise = ln(sigma) / 4, not the 1000x scale of diffusers' CMStochasticIterativeScheduler.
    torch.testing.assert_close(default.timesteps, default.sigmas[:-1].log() / 4)
    default.set_timesteps(intermediate_sigmas=[5.0, 0.5])
    assert default.sigmas.tolist()[:3] == [80.0, 5.0, 0.5] and default.num_inference_steps == 3
    default.set_timesteps(sigmas=[20.0, 1.0])
    assert default.init_noise_sigma == 20.0 and default.num_inference_steps == 2
    for kwargs, match in (({"intermediate_sigmas": [0.5, 5.0]}, "decreasing"),
                          ({"intermediate_sigmas": [80.0]}, r"\(sigma_min, sigma_max\)"),
                          ({"intermediate_sigmas": [0.001]}, "sigma_min"), ({"sigmas": [81.0]}, "sigma_max"),
                          ({"num_inference_steps": 0}, "positive integer"),
                          ({"num_inference_steps": 2, "sigmas": [1.0]}, "only one")):
        with pytest.raises(ValueError, match=match):
            default.set_timesteps(**kwargs)
    with pytest.raises(ValueError, match="parameterization"):
        ConsistencyStudentScheduler(parameterization="epsilon")


def test_consistency_step_with_a_fixed_seed():
    scheduler = ConsistencyStudentScheduler(s_noise=1.01)
    scheduler.set_timesteps(sigmas=[80.0, 3.0])
    x, out = noise((3, 1, 4, 4)) * 80, noise((3, 1, 4, 4), 1)
    t = scheduler.timesteps
    torch.testing.assert_close(scheduler.scale_model_input(x, t[0]), x / math.sqrt(80.0**2 + SD**2))
    first = scheduler.step(out, t[0], x, generator=torch.Generator().manual_seed(3))
    eps = 0.002
    f = SD**2 / ((80 - eps) ** 2 + SD**2) * x + SD * (80 - eps) / math.sqrt(SD**2 + 80**2) * out  # CM App. C
    torch.testing.assert_close(first.pred_original_sample, f)
    z = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first.prev_sample, f + 1.01 * math.sqrt(3.0**2 - eps**2) * z)
    last = scheduler.step(out, t[1], first.prev_sample)
    assert torch.equal(last.prev_sample, last.pred_original_sample)  # no noise after the last level
    with pytest.raises(IndexError):
        scheduler.step(out, t[1], x)
    # add_noise at each sample's level.
    n = noise((2, 1, 4, 4), 4)
    torch.testing.assert_close(scheduler.add_noise(x[:2], n, t), x[:2] + scheduler.sigmas[:2].reshape(2, 1, 1, 1) * n,
                               rtol=1e-5, atol=1e-4)


def cm_unet():
    """A tiny 3-channel class-conditional UNet; the consistency checkpoints' timesteps are 1000 c_noise."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=4).eval()


def test_consistency_scheduler_loads_from_the_stock_config_and_samples_like_it(tmp_path):
    stock = CMStochasticIterativeScheduler(sigma_data=0.5, clip_denoised=True, num_train_timesteps=40)
    stock.save_pretrained(tmp_path)
    for ours in (ConsistencyStudentScheduler.from_config(stock.config),
                 ConsistencyStudentScheduler.from_pretrained(tmp_path)):
        assert ours.config.c_noise_scale == 1000.0 and ours.config.clip_denoised
    ours = ConsistencyStudentScheduler.from_pretrained(tmp_path)
    unet = cm_unet()
    z = noise((2, 3, 8, 8))
    labels = [1, 3]
    # 1 step, in diffusers' own ConsistencyModelPipeline: identical samples.
    pipe = ConsistencyModelPipeline(unet, stock)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, latents=z, class_labels=labels, num_inference_steps=1, output_type="pt").images
    pipe.scheduler = ours
    got = pipe(batch_size=2, latents=z, class_labels=labels, num_inference_steps=1, output_type="pt").images
    torch.testing.assert_close(got, expected)
    # 3 steps on the stock scheduler's levels, same per-sample noise: the same trajectory.
    stock.set_timesteps(3)
    ours.set_timesteps(sigmas=stock.sigmas[:-1])
    torch.testing.assert_close(ours.sigmas, stock.sigmas)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    a = run_loop(stock, unet, z, gens(), torch.tensor(labels))
    b = run_loop(ours, unet, z, gens(), torch.tensor(labels))
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_stock_consistency_scheduler_in_the_student_pipeline():
    # The student's UNet is fed c_noise = ln(sigma) / 4; the pipeline divides the stock scheduler's timesteps by 1000.
    unet = tiny_unet(num_classes=3)
    ours = ConsistencyStudentScheduler()
    pipe = ConsistencyStudentPipeline(unet, ours)
    pipe.set_progress_bar_config(disable=True)
    z = noise((2, 1, 8, 8))
    expected = pipe(batch_size=2, latents=z, class_labels=[0, 2], num_inference_steps=1, output_type="pt").images
    pipe.scheduler = CMStochasticIterativeScheduler.from_config(ours.config, clip_denoised=False)
    got = pipe(batch_size=2, latents=z, class_labels=[0, 2], num_inference_steps=1, output_type="pt").images
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
