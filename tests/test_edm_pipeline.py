import math

import numpy as np
import pytest
import torch

from conftest import REPO, run_without_package, tiny_unet
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler
from diffusers_memdistill.scalings import karras_sigmas
from diffusers_memdistill.solvers import heun_step
from diffusers_memdistill.utils.bundle import BUNDLES, render


def zero_unet(**kwargs):
    unet = tiny_unet(**kwargs)
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    return unet


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_scheduler_config_round_trip(tmp_path):
    scheduler = EDMHeunScheduler(sigma_max=40.0, s_churn=10.0, s_tmin=0.05, s_tmax=50.0, num_inference_steps=12)
    scheduler.save_pretrained(tmp_path)
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    assert public(loaded.config) == public(scheduler.config)
    torch.testing.assert_close(loaded.sigmas, scheduler.sigmas)
    assert len(loaded.timesteps) == 12 and loaded.sigmas[-1] == 0
    assert EDMHeunScheduler.from_config(loaded.config, s_churn=0.0).config.s_churn == 0.0
    with pytest.raises(ValueError, match="parameterization"):
        EDMHeunScheduler(parameterization="epsilon")


def test_zero_network_samples_the_gaussian_flow():
    # Data N(0, sd^2): the ideal denoiser c_skip x is what a zero network gives, and the PF-ODE maps
    # sigma_max * z to z * sigma_max * sd / sqrt(sigma_max^2 + sd^2): samples have std ~ sd.
    sd = 0.2  # small enough that nothing is clipped to [-1, 1]
    pipe = EDMPipeline(zero_unet(), EDMHeunScheduler(sigma_data=sd))
    latents = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = latents * 80.0 * sd / math.sqrt(80.0**2 + sd**2)
    # 18 Heun steps are the solver's own discretization of that flow...
    x, sigmas = latents * 80.0, karras_sigmas(18).float()
    for i in range(18):
        x = heun_step(lambda y, s, **_: _ideal(y, s, sd), x, sigmas[i], sigmas[i + 1])
    images = pipe(batch_size=8, latents=latents, output_type="pt").images * 2 - 1
    torch.testing.assert_close(images, x, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(images, exact, atol=0.0, rtol=0.1)
    # ...which converges to the exact flow as the grid is refined.
    fine = pipe(batch_size=8, latents=latents, num_inference_steps=100, output_type="pt").images * 2 - 1
    torch.testing.assert_close(fine, exact, atol=1e-4, rtol=5e-3)


def _ideal(x, sigma, sd):
    sigma = torch.as_tensor(sigma)
    sigma = sigma.reshape(-1, 1, 1, 1) if sigma.ndim else sigma
    return sd**2 / (sigma**2 + sd**2) * x


def test_stochastic_sampler_keeps_the_gaussian_marginal_and_per_sample_seeds():
    sd, steps, n = 0.2, 40, 24
    scheduler = EDMHeunScheduler(sigma_data=sd, s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.0)
    pipe = EDMPipeline(zero_unet(), scheduler)
    images = pipe(batch_size=n, generator=generators(range(n)), num_inference_steps=steps, output_type="pt").images
    images = images * 2 - 1
    # Discretization bias (+2-3% here, like the deterministic sampler's at 40 steps) plus 2% sampling error.
    assert images.std().item() == pytest.approx(sd, rel=0.1)
    deterministic = EDMPipeline(zero_unet(), EDMHeunScheduler(sigma_data=sd))
    det = deterministic(batch_size=4, generator=generators(range(4)), num_inference_steps=steps, output_type="pt")
    assert not torch.allclose(det.images * 2 - 1, images[:4], atol=1e-3)  # the churn noise changed the paths
    part = pipe(batch_size=2, generator=generators([2, 3]), num_inference_steps=steps, output_type="pt").images
    torch.testing.assert_close(part * 2 - 1, images[2:4], atol=1e-5, rtol=0)


def test_churn_adds_the_prescribed_noise_only_inside_its_range():
    scheduler = EDMHeunScheduler(s_churn=9.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.007, num_inference_steps=18)
    gamma = min(9.0 / 18, 2**0.5 - 1)
    x = torch.zeros(4096)
    for i, sigma in enumerate(scheduler.sigmas[:-1].tolist()):
        x_hat, sigma_hat = scheduler.churn(x, i, torch.Generator().manual_seed(i))
        if 0.05 <= sigma <= 50.0:
            assert float(sigma_hat) == pytest.approx(sigma * (1 + gamma), rel=1e-6)
            expected_std = ((sigma * (1 + gamma)) ** 2 - sigma**2) ** 0.5 * 1.007
            assert x_hat.std().item() == pytest.approx(expected_std, rel=0.05)
        else:
            assert float(sigma_hat) == pytest.approx(sigma) and torch.equal(x_hat, x)


def test_heun_sampler_makes_2n_minus_1_network_evaluations():
    unet = tiny_unet()
    calls = []
    unet.register_forward_hook(lambda *a: calls.append(1))
    EDMPipeline(unet, EDMHeunScheduler())(batch_size=1, output_type="pt")
    assert len(calls) == 35
    calls.clear()
    EDMPipeline(unet, EDMHeunScheduler())(batch_size=1, num_inference_steps=5, output_type="pt")
    assert len(calls) == 9


def test_outputs_labels_and_batch_independence():
    pipe = EDMPipeline(tiny_unet(num_classes=10), EDMHeunScheduler())
    out = pipe(batch_size=3, generator=generators([0, 1, 2]), num_inference_steps=4, output_type="np").images
    assert out.shape == (3, 8, 8, 1) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    pil = pipe(batch_size=2, class_labels=[3, 4], num_inference_steps=4).images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "L"
    alone = pipe(batch_size=1, generator=generators([2]), num_inference_steps=4, output_type="np").images
    np.testing.assert_allclose(alone[0], out[2], atol=1e-5)
    with pytest.raises(ValueError, match="class_labels must lie"):
        pipe(batch_size=1, class_labels=[10], num_inference_steps=2)
    with pytest.raises(ValueError, match="2 class labels for a batch of 3"):
        pipe(batch_size=3, class_labels=[1, 2], num_inference_steps=2)
    with pytest.raises(ValueError, match="unconditional"):
        EDMPipeline(tiny_unet(), EDMHeunScheduler())(batch_size=1, class_labels=[1], num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe(batch_size=1, num_inference_steps=2, output_type="jpeg")


def test_save_and_load_through_both_paths(tmp_path):
    pipe = EDMPipeline(tiny_unet(num_classes=10), EDMHeunScheduler(num_inference_steps=6))
    pipe.save_pretrained(tmp_path / "model")
    expected = pipe(batch_size=2, class_labels=[1, 7], generator=generators([5, 6]), output_type="pt").images
    loaded = EDMPipeline.from_pretrained(tmp_path / "model")
    assert isinstance(loaded.scheduler, EDMHeunScheduler)
    torch.testing.assert_close(
        loaded(batch_size=2, class_labels=[1, 7], generator=generators([5, 6]), output_type="pt").images, expected)
    code = f"""
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)
assert type(pipe).__name__ == "EDMPipeline" and type(pipe.scheduler).__name__ == "EDMHeunScheduler"
g = [torch.Generator().manual_seed(s) for s in (5, 6)]
torch.save(pipe(batch_size=2, class_labels=[1, 7], generator=g, output_type="pt").images, "remote.pt")
pipe.save_pretrained("resaved")  # a pipeline loaded from the single file saves itself again
"""
    run_without_package(code, tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "remote.pt", weights_only=True), expected)
    assert (tmp_path / "resaved" / "pipeline_edm.py").read_text() == (tmp_path / "model" / "pipeline_edm.py").read_text()


def test_loading_the_wrong_folder_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        EDMPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": ["pipeline_x", "OtherPipeline"]}')
    with pytest.raises(ValueError, match="holds a OtherPipeline, not a EDMPipeline"):
        EDMPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_single_file_pipelines_are_up_to_date_and_self_contained(name):
    text = render(name)
    assert (REPO / "pipelines" / f"{name}.py").read_text() == text, "run `memdistill bundle --write`"
    assert "diffusers_memdistill" not in "".join(l for l in text.splitlines(True) if "import" in l and "importlib" not in l)
    compile(text, name, "exec")
