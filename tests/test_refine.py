"""The "+refine" control (000 App. A): `solvers.refine` at its two limits, on an analytic case and on a tiny teacher,
and `RefinedPipeline` over the registry's generators, saved, reloaded and audited by `memdistill evaluate`."""

import json
import math

import pytest
import torch

from conftest import tiny_unet
from diffusers_memdistill.data import build_training_set
from diffusers_memdistill.models.denoiser import EDMDenoiser
from diffusers_memdistill.pipelines.pipeline_consistency import ConsistencyStudentPipeline
from diffusers_memdistill.pipelines.pipeline_dmd import DMDGeneratorPipeline
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.pipelines.pipeline_progressive import ProgressiveDistillationPipeline
from diffusers_memdistill.pipelines.pipeline_refined import RefinedPipeline
from diffusers_memdistill.registry import load_pipeline, registration_for, sample_images
from diffusers_memdistill.schedulers.scheduling_consistency import ConsistencyStudentScheduler
from diffusers_memdistill.schedulers.scheduling_dmd import DMDGeneratorScheduler
from diffusers_memdistill.schedulers.scheduling_edm_ddim import EDMDDIMScheduler
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler
from diffusers_memdistill.solvers import refine

SD = 0.5


def gaussian_denoiser(x, sigma, class_labels=None):
    """Exact denoiser of N(0, SD^2) data: c_skip(sigma) x."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return SD**2 / (sigma**2 + SD**2) * x


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- refine


def test_refine_at_sigma_zero_returns_its_input_and_tends_to_it_as_sigma_goes_to_zero():
    teacher = EDMDenoiser(tiny_unet().eval())
    x, n = randn(4, 1, 8, 8).clamp(-1, 1), randn(4, 1, 8, 8, seed=1)
    with torch.no_grad():
        assert torch.equal(refine(teacher, x, 0.0, n), x)
        errors = [(refine(teacher, x, sigma, n) - x).abs().max().item() for sigma in (1e-2, 1e-4, 1e-6)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5, errors


def test_refine_on_gaussian_data_follows_the_exact_flow_and_forgets_its_input_at_large_sigma():
    """For N(0, SD^2) data the PF-ODE from (x_sigma, sigma) ends at x_sigma * SD / sqrt(sigma^2 + SD^2); the teacher's
    own sample from the noise n is n * 80 SD / sqrt(80^2 + SD^2). Refinement tends to it as sigma grows."""
    x, n = randn(16, 1, 4, 4).clamp(-1, 1), randn(16, 1, 4, 4, seed=1)
    teacher_sample = n * 80 * SD / math.sqrt(80**2 + SD**2)
    distances = []
    for sigma in (0.5, 5.0, 80.0):
        out = refine(gaussian_denoiser, x, sigma, n, num_steps=160)
        exact = (x + sigma * n) * SD / math.sqrt(sigma**2 + SD**2)
        torch.testing.assert_close(out, exact, rtol=0, atol=2e-3)  # Heun's error only (~k^-2)
        distances.append((out - teacher_sample).square().mean().sqrt().item())
    assert distances[0] > distances[1] > distances[2] and distances[2] < 0.01, distances


def test_refine_at_sigma_max_is_the_teachers_sampler_from_the_added_noise():
    unet = tiny_unet().eval()
    pipe = EDMPipeline(unet, EDMHeunScheduler(num_inference_steps=6))
    pipe.set_progress_bar_config(disable=True)
    n = randn(3, 1, 8, 8, seed=2)
    teacher = pipe(batch_size=3, latents=n, output_type="latent").images
    with torch.no_grad():
        from_zero = refine(EDMDenoiser(unet), torch.zeros_like(n), 80.0, n, num_steps=6)
        from_x = [refine(EDMDenoiser(unet), randn(3, 1, 8, 8, seed=3).clamp(-1, 1), sigma, n, num_steps=6)
                  for sigma in (1.0, 80.0)]
    torch.testing.assert_close(from_zero, teacher, rtol=1e-4, atol=1e-4)
    far, near = ((out - teacher).abs().mean().item() for out in from_x)
    assert near < 0.1 * far, (near, far)


def test_refine_refuses_bad_input():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        refine(gaussian_denoiser, x, -1.0, x)
    with pytest.raises(ValueError, match="noise has shape"):
        refine(gaussian_denoiser, x, 1.0, torch.zeros(2, 1, 4, 5))


# ---------------------------------------------------------------- RefinedPipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    training_set = build_training_set("digits", 8, num_train_images=16)
    models = {
        "teacher": EDMPipeline(tiny_unet(seed=0), EDMHeunScheduler(num_inference_steps=4)),
        "pd": ProgressiveDistillationPipeline(tiny_unet(seed=1), EDMDDIMScheduler(num_inference_steps=1)),
        "dmd": DMDGeneratorPipeline(tiny_unet(seed=2), DMDGeneratorScheduler()),
        "cd": ConsistencyStudentPipeline(tiny_unet(seed=3), ConsistencyStudentScheduler()),
    }
    for name, pipe in models.items():
        pipe.save_pretrained(root / name)
        training_set.save(str(root / name))
    return root


def _generators(n, seed=100):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("generator", ["pd", "dmd"])
def test_refined_pipeline_saves_loads_and_samples_through_the_registry(folders, generator, tmp_path):
    z = randn(4, 1, 8, 8, seed=5)
    for sigma in (0.0, 80.0):
        RefinedPipeline.from_sources(str(folders / generator), str(folders / "teacher"), sigma).save_pretrained(
            tmp_path / f"refined-{sigma}")
    index = json.loads((tmp_path / "refined-0.0" / "model_index.json").read_text())
    assert index["_class_name"] == "RefinedPipeline" and index["num_steps"] == 4 and index["generator_steps"] == 1
    assert set(index["teacher_sha256"]) == {"unet/diffusion_pytorch_model.safetensors"}
    assert (tmp_path / "refined-0.0" / "training_set.json").read_text() == (
        folders / generator / "training_set.json").read_text()

    refined, registration = load_pipeline(str(tmp_path / "refined-0.0"))
    assert isinstance(refined, RefinedPipeline) and registration.kind == "generator"
    raw_pipe, _ = load_pipeline(str(folders / generator))
    raw = sample_images(raw_pipe, z, _generators(4))
    # sigma = 0: the generator's samples (to float rounding of the batch size).
    torch.testing.assert_close(sample_images(refined, z, _generators(4), batch_size=3), raw, rtol=0, atol=1e-4)

    # sigma = sigma_max: the teacher's own sampler started from the refinement noise (sample i's first draw of its
    # generator: these generators inject no noise of their own at one step).
    refined_max, _ = load_pipeline(str(tmp_path / "refined-80.0"))
    teacher, _ = load_pipeline(str(folders / "teacher"))
    noise = torch.stack([torch.randn(1, 8, 8, generator=g) for g in _generators(4)])
    expected = sample_images(teacher, noise, _generators(4), num_inference_steps=4)
    out = sample_images(refined_max, z, _generators(4))
    assert (out - expected).abs().mean() < 0.05 * (raw - expected).abs().mean()


def test_refined_rows_in_memdistill_evaluate(folders, tmp_path):
    from diffusers_memdistill.evaluation import evaluate

    RefinedPipeline.from_sources(str(folders / "pd"), str(folders / "teacher"), 2.0).save_pretrained(
        tmp_path / "pd-refine")
    results = evaluate([str(folders / "teacher"), str(folders / "pd"), str(tmp_path / "pd-refine")],
                       str(tmp_path / "eval"), num_samples=6, metrics=("l2",), batch_size=4, device="cpu",
                       names=["teacher", "PD", "PD+refine"], floor=False)
    text = (tmp_path / "eval" / "report.md").read_text()
    assert "PD+refine" in text and "| PD |" in text.replace("**", "")
    runs = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert results and runs
    kinds = {r["name"]: r["kind"] for r in json.loads(
        (tmp_path / "eval" / "samples" / "manifest.json").read_text())["runs"]}
    assert kinds == {"teacher": "teacher", "PD": "generator", "PD+refine": "generator"}


def test_refined_pipeline_refuses_changed_sources_and_wrong_roles(folders, tmp_path):
    gen = tmp_path / "pd"
    ProgressiveDistillationPipeline(tiny_unet(seed=1), EDMDDIMScheduler(num_inference_steps=1)).save_pretrained(gen)
    build_training_set("digits", 8, num_train_images=16).save(str(gen))
    RefinedPipeline.from_sources(str(gen), str(folders / "teacher"), 1.0).save_pretrained(tmp_path / "refined")
    ProgressiveDistillationPipeline(tiny_unet(seed=9), EDMDDIMScheduler(num_inference_steps=1)).save_pretrained(gen)
    with pytest.raises(ValueError, match="weights of the generator .* changed since"):
        load_pipeline(str(tmp_path / "refined"))
    with pytest.raises(ValueError, match="not an EDM teacher pipeline"):
        RefinedPipeline.from_sources(str(folders / "pd"), str(folders / "cd"), 1.0)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        RefinedPipeline.from_sources(str(folders / "pd"), str(folders / "teacher"), -0.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RefinedPipeline.from_sources(str(tmp_path / "missing"), str(folders / "teacher"), 1.0)
    teacher = load_pipeline(str(folders / "teacher"))[0]
    with pytest.raises(ValueError, match="built from pipelines, not folders"):
        RefinedPipeline(load_pipeline(str(folders / "pd"))[0], teacher, 1.0).save_pretrained(tmp_path / "x")
    assert registration_for(RefinedPipeline).name == "RefinedPipeline"
