"""Consistency distillation: boundary condition, CD loss on Gaussian data, distances, schedules, scheduler, pipeline."""

import math
import urllib.error

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from diffusers_memdistill.losses import consistency as cd
from diffusers_memdistill.losses.consistency import (
    ConsistencyDistillationLoss,
    LPIPSDistance,
    LPIPSUnavailableError,
    build_lpips_distance,
    consistency_loss_weight,
    ct_num_scales,
    ct_target_ema,
    default_huber_c,
    pseudo_huber_distance,
)
from diffusers_memdistill.models.denoiser import ConsistencyDenoiser
from diffusers_memdistill.pipelines.pipeline_consistency import ConsistencyStudentPipeline
from diffusers_memdistill.scalings import append_dims, consistency_scalings, edm_scalings, karras_sigmas
from diffusers_memdistill.schedulers.scheduling_consistency import ConsistencyStudentScheduler
from diffusers_memdistill.solvers import heun_step
from diffusers_memdistill.training.distillation import build_student_unet

SIGMA_DATA, SIGMA_MIN = 0.5, 0.002


def _per_sample(sigma, x):
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return append_dims(sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma, x.ndim)


# For x0 ~ N(0, sd^2 I) the PF-ODE trajectories are x_sigma = x0 * sqrt(sigma^2 + sd^2) / sd, so the consistency
# function with boundary f(x, eps) = x is x * sqrt(eps^2 + sd^2) / sqrt(sigma^2 + sd^2), i.e. ~ x * sd / sqrt(sigma^2 + sd^2).
def exact_consistency(x, sigma, class_labels=None):
    return x * math.sqrt(SIGMA_MIN**2 + SIGMA_DATA**2) / (_per_sample(sigma, x) ** 2 + SIGMA_DATA**2).sqrt()


def ideal_denoiser(x, sigma, class_labels=None):
    """E[x0 | x_sigma] = c_skip(sigma) * x for Gaussian data."""
    return edm_scalings(_per_sample(sigma, x), SIGMA_DATA)[0] * x


def exact_flow(denoiser, x, sigma, sigma_next, **cond):
    """The exact PF-ODE map from sigma to sigma_next for Gaussian data (a solver with no discretization error)."""
    return x * ((_per_sample(sigma_next, x) ** 2 + SIGMA_DATA**2) / (_per_sample(sigma, x) ** 2 + SIGMA_DATA**2)).sqrt()


def tiny_unet(num_class_embeds=None, layers_per_block=1, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=num_class_embeds,
    ).eval()


class ExactGaussianStudent(ModelMixin, ConfigMixin):
    """A 'UNet' whose output F makes `ConsistencyDenoiser` equal to the exact Gaussian consistency function."""

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 1, num_class_embeds=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the wrapper a dtype

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        timestep = torch.as_tensor(timestep).expand(sample.shape[0])
        sigma = (4 * timestep.double()).exp()  # timestep = c_noise = ln(sigma) / 4
        c_skip, c_out = (c.double() for c in consistency_scalings(sigma, SIGMA_DATA, SIGMA_MIN))
        c_in = 1 / (sigma**2 + SIGMA_DATA**2).sqrt()
        x = sample.double() / append_dims(c_in, sample.ndim)
        f = exact_consistency(x, sigma)
        return ((f - append_dims(c_skip, x.ndim) * x) / append_dims(c_out, x.ndim) + self.anchor).float(),


# ---------------------------------------------------------------- parameterization


def test_boundary_condition_is_exact():
    student = ConsistencyDenoiser(tiny_unet(), SIGMA_DATA, SIGMA_MIN)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        assert torch.equal(student(x, SIGMA_MIN), x)
        mixed = student(x, torch.tensor([SIGMA_MIN, 1.0, SIGMA_MIN]))
    assert torch.equal(mixed[[0, 2]], x[[0, 2]])
    assert not torch.allclose(mixed[1], x[1])


# ---------------------------------------------------------------- CD loss


def gaussian_images(n=256, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * SIGMA_DATA


@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_cd_loss_vanishes_for_the_exact_consistency_function(distance):
    images = gaussian_images()
    exact = ConsistencyDistillationLoss(18, distance=distance, solver=exact_flow)
    loss, _ = exact(exact_consistency, exact_consistency, ideal_denoiser, images,
                    generator=torch.Generator().manual_seed(1))
    assert loss.abs().max() < 1e-5  # float32 rounding only

    # With the Heun teacher step only the discretization error remains, and it vanishes as the grid is refined.
    coarse, fine = (
        ConsistencyDistillationLoss(n, distance=distance)(
            exact_consistency, exact_consistency, ideal_denoiser, images, generator=torch.Generator().manual_seed(1)
        )[0].mean()
        for n in (18, 80)
    )
    # A student that is not a consistency function (the EDM denoiser itself) is clearly penalised.
    wrong = ConsistencyDistillationLoss(18, distance=distance)(
        ideal_denoiser, ideal_denoiser, ideal_denoiser, images, generator=torch.Generator().manual_seed(1)
    )[0].mean()
    assert coarse < 0.05 * wrong
    assert fine < 0.01 * coarse


def test_cd_loss_draws_neighbouring_levels_and_stops_target_gradients():
    torch.manual_seed(0)
    num_scales = 6
    grid = karras_sigmas(num_scales, append_zero=False).float()
    seen = {}

    def recording(name, fn):
        def call(x, sigma, class_labels=None):
            seen.setdefault(name, []).append(class_labels)
            return fn(x, sigma)
        return call

    scale = torch.nn.Parameter(torch.tensor(1.3))
    target_scale = torch.nn.Parameter(torch.tensor(1.0))
    student = recording("student", lambda x, s: scale * exact_consistency(x, s))
    target = recording("target", lambda x, s: target_scale * ideal_denoiser(x, s))
    teacher = recording("teacher", ideal_denoiser)
    images, labels = gaussian_images(64), torch.arange(64) % 3
    loss_fn = ConsistencyDistillationLoss(num_scales, distance="l2")
    loss, logs = loss_fn(student, target, teacher, images, labels, generator=torch.Generator().manual_seed(5))

    assert loss.shape == (64,)
    assert set(logs["index"].tolist()) == set(range(num_scales - 1))  # n ~ U{1..N-1}: all N - 1 pairs drawn
    assert torch.equal(logs["sigma"], grid[logs["index"]])
    assert torch.equal(logs["sigma_next"], grid[logs["index"] + 1])
    assert all(seen_labels is labels for calls in seen.values() for seen_labels in calls)
    assert len(seen["teacher"]) == 2  # one Heun step: two teacher evaluations

    # Recompute by hand from the same generator: x_{n+1} = x + t_{n+1} z, Heun to t_n, target at (x_hat, t_n).
    g = torch.Generator().manual_seed(5)
    index = torch.randint(0, num_scales - 1, (64,), generator=g)
    x = images + append_dims(grid[index], 4) * torch.randn(images.shape, generator=g)
    x_hat = heun_step(ideal_denoiser, x, grid[index], grid[index + 1])
    expected = (scale * exact_consistency(x, grid[index]) - ideal_denoiser(x_hat, grid[index + 1])).square()
    torch.testing.assert_close(loss, expected.flatten(1).mean(1), rtol=1e-5, atol=1e-7)

    loss.mean().backward()
    assert scale.grad is not None and scale.grad != 0
    assert target_scale.grad is None  # stop-gradient target


def test_pseudo_huber_and_weightings():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.zeros(2, 3, 4, 4)
    b[0, 0, 0, 0], b[1] = 3.0, 4.0 / math.sqrt(48)  # ||a - b|| = 3 and 4
    assert default_huber_c((3, 4, 4)) == pytest.approx(0.00054 * math.sqrt(48))
    torch.testing.assert_close(pseudo_huber_distance(a, b, c=1.0), torch.tensor([math.sqrt(10) - 1, math.sqrt(17) - 1]))
    small = pseudo_huber_distance(a, b * 1e-4, c=1.0)  # ~ ||d||^2 / (2c) near 0
    torch.testing.assert_close(small, torch.tensor([9e-8, 16e-8]) / 2, rtol=1e-3, atol=0)

    sigma, sigma_next = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.25])
    expected = {
        "uniform": [1.0, 1.0],
        "snr": [1.0, 16.0],
        "snr+1": [2.0, 17.0],
        "karras": [1 + 1 / SIGMA_DATA**2, 16 + 1 / SIGMA_DATA**2],
        "truncated-snr": [1.0, 16.0],
        "ict": [1.0, 4.0],
    }
    for name, values in expected.items():
        torch.testing.assert_close(consistency_loss_weight(name, sigma, sigma_next, SIGMA_DATA), torch.tensor(values))
    assert consistency_loss_weight("truncated-snr", 4.0, 2.0) == 1.0
    with pytest.raises(ValueError, match="Unknown weighting"):
        ConsistencyDistillationLoss(weighting="snr2")
    with pytest.raises(ValueError, match="lpips"):
        ConsistencyDistillationLoss(distance="lpips")


# ---------------------------------------------------------------- LPIPS


class RecordingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.shapes = []

    def forward(self, a, b):
        self.shapes.append((tuple(a.shape), tuple(b.shape)))
        return (self.weight * (a - b).abs().mean((1, 2, 3))).reshape(-1, 1, 1, 1)


def test_lpips_distance_upsamples_and_repeats_grayscale():
    net = RecordingNet()
    distance = build_lpips_distance("alex", factory=lambda name: net)
    assert isinstance(distance, LPIPSDistance) and not net.weight.requires_grad
    distance.train()
    assert not net.training  # the metric stays in eval mode

    a, b = torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.5)
    out = distance(a, b)
    assert out.shape == (2,) and net.shapes[-1] == ((2, 3, 224, 224),) * 2
    torch.testing.assert_close(out, torch.full((2,), 0.5))  # bilinear upsampling of a constant image is exact
    distance(torch.zeros(1, 3, 256, 256), torch.zeros(1, 3, 256, 256))
    assert net.shapes[-1] == ((1, 3, 256, 256),) * 2  # large enough: not resized
    with pytest.raises(ValueError, match="1- or 3-channel"):
        distance(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))

    loss_fn = ConsistencyDistillationLoss(6, distance="lpips", lpips=distance)
    loss, _ = loss_fn(exact_consistency, ideal_denoiser, ideal_denoiser, gaussian_images(4),
                      generator=torch.Generator().manual_seed(0))
    assert loss.shape == (4,) and bool((loss > 0).all())


def test_lpips_unavailable_error_says_how_to_get_the_weights():
    def offline(name):
        raise urllib.error.URLError("Name or service not known")

    with pytest.raises(LPIPSUnavailableError) as info:
        build_lpips_distance("alex", factory=offline)
    message = str(info.value)
    for needle in ("alexnet-owt-7be5be79.pth", "torch hub cache", "network access", "--loss l2", "pseudo_huber",
                   "Name or service not known"):
        assert needle in message
    with pytest.raises(ValueError, match="Unknown LPIPS backbone"):
        build_lpips_distance("resnet")


def test_default_lpips_factory_failure_is_reported(monkeypatch):
    # Whatever the default factory raises (here: a missing package) becomes the same clear error.
    def missing(name):
        raise ImportError("No module named 'lpips'")

    monkeypatch.setattr(cd, "_default_lpips_factory", missing)
    with pytest.raises(LPIPSUnavailableError, match="pip install lpips"):
        build_lpips_distance()


# ---------------------------------------------------------------- consistency-training schedules


def test_consistency_training_schedules():
    s0, s1, mu0, total = 2, 150, 0.9, 1000
    assert ct_num_scales(0, total, s0, s1) == s0
    assert ct_num_scales(total, total, s0, s1) == s1 + 1
    values = [ct_num_scales(k, total, s0, s1) for k in range(0, total + 1, 50)]
    assert values == sorted(values)
    assert ct_target_ema(0, total, s0, s1, mu0) == pytest.approx(mu0)
    assert ct_target_ema(total, total, s0, s1, mu0) == pytest.approx(math.exp(s0 * math.log(mu0) / (s1 + 1)))


# The scheduler's own tests are in test_schedulers.py.


# ---------------------------------------------------------------- pipeline


def test_pipeline_samples_the_exact_gaussian_student():
    pipe = ConsistencyStudentPipeline(ExactGaussianStudent(), ConsistencyStudentScheduler())
    pipe.set_progress_bar_config(disable=True)
    latents = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 - 1.5
    scale = lambda sigma: math.sqrt(SIGMA_MIN**2 + SIGMA_DATA**2) / math.sqrt(sigma**2 + SIGMA_DATA**2)  # noqa: E731
    to_unit = lambda x: ((x + 1) / 2).clamp(0, 1)  # noqa: E731

    one = pipe(batch_size=3, latents=latents, num_inference_steps=1, output_type="pt").images
    x1 = 80.0 * latents * scale(80.0)  # x = f(sigma_max z, sigma_max)
    torch.testing.assert_close(one, to_unit(x1), atol=2e-5, rtol=0)

    generators = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    two = pipe(batch_size=3, latents=latents, num_inference_steps=[0.3], generator=generators, output_type="pt").images
    noise = torch.cat([torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(10 + i)) for i in range(3)])
    x2 = (x1 + math.sqrt(0.3**2 - SIGMA_MIN**2) * noise) * scale(0.3)
    torch.testing.assert_close(two, to_unit(x2), atol=2e-5, rtol=0)
    # The same levels given in full, diffusers-style; "latent" is the sample before the [0, 1] mapping.
    generators = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    latent = pipe(batch_size=3, latents=latents, sigmas=[80.0, 0.3], generator=generators, output_type="latent").images
    torch.testing.assert_close(latent, x2, atol=4e-5, rtol=0)
    assert pipe.num_timesteps == 2


def test_pipeline_samples_do_not_depend_on_the_batch():
    pipe = ConsistencyStudentPipeline(tiny_unet(num_class_embeds=3), ConsistencyStudentScheduler())
    pipe.set_progress_bar_config(disable=True)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    for steps in (1, 2, [10.0, 1.0]):
        batch = pipe(batch_size=3, generator=gens([0, 1, 2]), num_inference_steps=steps, output_type="np").images
        alone = pipe(batch_size=1, generator=gens([1]), num_inference_steps=steps, output_type="np").images
        assert batch.shape == (3, 8, 8, 1)
        torch.testing.assert_close(torch.from_numpy(batch[1:2]), torch.from_numpy(alone), atol=1e-6, rtol=0)
    a = pipe(batch_size=2, class_labels=[0, 0], generator=gens([0, 1]), output_type="pt").images
    b = pipe(batch_size=2, class_labels=[2, 2], generator=gens([0, 1]), output_type="pt").images
    assert not torch.allclose(a, b)  # class labels reach the UNet
    with pytest.raises(ValueError, match="class_labels must lie"):
        pipe(batch_size=1, class_labels=[3])
    assert len(pipe(batch_size=2, generator=gens([0, 1])).images) == 2  # PIL


# ---------------------------------------------------------------- student initialisation


def test_student_from_teacher_full_shallower_and_random():
    teacher = tiny_unet(layers_per_block=2, seed=1)
    same, copied = build_student_unet(teacher, "teacher")
    assert copied == len(teacher.state_dict())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in same.state_dict().items())

    shallow, copied = build_student_unet(teacher, "teacher", layers_per_block=1)
    assert shallow.config.layers_per_block == 1 and 0 < copied < len(shallow.state_dict())
    state = teacher.state_dict()
    matching = [k for k, v in shallow.state_dict().items() if k in state and state[k].shape == v.shape]
    assert len(matching) == copied and all(torch.equal(shallow.state_dict()[k], state[k]) for k in matching)

    random_a, copied = build_student_unet(teacher, "random", seed=3)
    random_b, _ = build_student_unet(teacher, "random", seed=3)
    assert copied == 0
    assert all(torch.equal(v, random_b.state_dict()[k]) for k, v in random_a.state_dict().items())  # seeded
    assert not torch.equal(random_a.conv_in.weight, teacher.conv_in.weight)
    with pytest.raises(ValueError, match="initialisation"):
        build_student_unet(teacher, "imagenet")


def test_single_file_pipeline_is_up_to_date():
    from pathlib import Path

    from diffusers_memdistill.utils.bundle import render

    shipped = Path(__file__).resolve().parent.parent / "pipelines" / "pipeline_consistency.py"
    assert shipped.read_text(encoding="utf-8") == render("pipeline_consistency"), "run `memdistill bundle --write`"
