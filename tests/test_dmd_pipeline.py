import pytest
import torch

from conftest import run_without_package, tiny_unet
from diffusers_memdistill.losses.dmd import generate
from diffusers_memdistill.models.denoiser import EDMDenoiser
from diffusers_memdistill.pipelines.pipeline_dmd import DMDGeneratorPipeline
from diffusers_memdistill.registry import registration_for, sample_images
from diffusers_memdistill.schedulers.scheduling_dmd import DMDGeneratorScheduler


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_scheduler_config_round_trip_and_levels(tmp_path):
    scheduler = DMDGeneratorScheduler(sigma_data=0.4, num_inference_steps=2, generator_sigmas=[80.0, 2.5])
    scheduler.save_config(tmp_path)
    loaded = DMDGeneratorScheduler.from_pretrained(tmp_path)
    assert loaded.config.generator_sigmas == [80.0, 2.5] and loaded.config.sigma_data == 0.4
    torch.testing.assert_close(loaded.sigmas, torch.tensor([80.0, 2.5, 0.0]))
    torch.testing.assert_close(loaded.timesteps, torch.tensor([80.0, 2.5]).log() / 4)
    loaded.set_timesteps(1)
    torch.testing.assert_close(loaded.sigmas, torch.tensor([80.0, 0.0]))
    with pytest.raises(ValueError, match="lie in"):
        DMDGeneratorScheduler(generator_sigmas=[100.0])
    with pytest.raises(ValueError, match="decreasing"):
        DMDGeneratorScheduler().set_timesteps(sigmas=[2.0, 80.0])
    with pytest.raises(ValueError, match="positive integer"):
        DMDGeneratorScheduler().set_timesteps(0)


def test_pipeline_is_the_generator_of_the_losses():
    # One step: G(z) = D(sigma_max z; sigma_max); two steps re-noise at the fixed level with the sample's generator.
    unet = tiny_unet(seed=3)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    denoiser = EDMDenoiser(unet)
    pipe = DMDGeneratorPipeline(unet, DMDGeneratorScheduler(num_inference_steps=2, generator_sigmas=[80.0, 2.0]))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        one = pipe(batch_size=2, latents=z, num_inference_steps=1, output_type="latent").images
        torch.testing.assert_close(one, generate(denoiser, z, [80.0]), atol=1e-5, rtol=1e-5)
        two = pipe(batch_size=2, latents=z, generator=generators([4, 5]), output_type="latent").images
        first = generate(denoiser, z, [80.0])
        noise = torch.cat([torch.randn(1, 1, 8, 8, generator=g) for g in generators([4, 5])])
        torch.testing.assert_close(two, denoiser(first + 2.0 * noise, 2.0), atol=1e-5, rtol=1e-5)
    # The evaluation registry knows it as a generator and samples it from given noise.
    registration = registration_for(pipe)
    assert registration.kind == "generator" and registration.steps(pipe) == 2
    images = sample_images(pipe, z, generators([4, 5]), num_inference_steps=2)
    torch.testing.assert_close(images, ((two + 1) / 2).clamp(0, 1))


def test_save_and_load_through_both_paths(tmp_path):
    pipe = DMDGeneratorPipeline(tiny_unet(num_classes=10, seed=1),
                                DMDGeneratorScheduler(num_inference_steps=2, generator_sigmas=[80.0, 1.0]))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "model")
    expected = pipe(batch_size=2, class_labels=[1, 7], generator=generators([5, 6]), output_type="pt").images
    loaded = DMDGeneratorPipeline.from_pretrained(tmp_path / "model")
    assert isinstance(loaded.scheduler, DMDGeneratorScheduler) and loaded.scheduler.config.generator_sigmas == [80.0, 1.0]
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(
        loaded(batch_size=2, class_labels=[1, 7], generator=generators([5, 6]), output_type="pt").images, expected)
    code = f"""
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)
assert type(pipe).__name__ == "DMDGeneratorPipeline" and type(pipe.scheduler).__name__ == "DMDGeneratorScheduler"
g = [torch.Generator().manual_seed(s) for s in (5, 6)]
torch.save(pipe(batch_size=2, class_labels=[1, 7], generator=g, output_type="pt").images, "remote.pt")
"""
    run_without_package(code, tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "remote.pt", weights_only=True), expected)
