"""The EDM teacher pipeline: sampling, diffusers' call conventions (callbacks, output types, generators), loading
with components and dtypes through both paths, and the single-file pipelines it ships."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import EDMEulerScheduler
from diffusers.callbacks import PipelineCallback

from conftest import REPO, run_without_package, tiny_unet
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.scalings import karras_sigmas
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler
from diffusers_memdistill.solvers import heun_step
from diffusers_memdistill.utils.bundle import BUNDLES, import_cycles, import_graph, render
from test_schedulers import edm_denoiser, karras


def zero_unet(**kwargs):
    unet = tiny_unet(**kwargs)
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    return unet


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


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


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "utils.bundle" in graph["pipelines.pipeline_io"]  # saving renders the single file...
    assert not graph["utils.bundle"]  # ...and the renderer imports nothing of the package
    assert import_cycles(graph) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# ---------------------------------------------------------------- diffusers' call conventions


def test_saved_teacher_samples_with_the_stock_euler_scheduler(tmp_path):
    EDMPipeline(tiny_unet(num_classes=3), EDMHeunScheduler(sigma_data=0.5)).save_pretrained(tmp_path / "teacher")
    pipe = EDMPipeline.from_pretrained(tmp_path / "teacher")
    pipe.scheduler = EDMEulerScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, 0])
    x = pipe(batch_size=2, latents=z, class_labels=labels, num_inference_steps=6, output_type="latent").images
    # Euler on the Karras grid from EDMEulerScheduler's starting std sqrt(sigma_max^2 + 1), written out.
    sigmas, ref = karras(6), z * math.sqrt(80.0**2 + 1)
    for i in range(6):
        d = (ref - edm_denoiser(pipe.unet, ref, sigmas[i], labels=labels)) / sigmas[i]
        ref = ref + (sigmas[i + 1] - sigmas[i]) * d
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)
    assert pipe.num_timesteps == 6


def _counting(unet):
    calls = []
    unet.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_callbacks_interrupt_and_edit_latents():
    pipe = EDMPipeline(tiny_unet(), EDMHeunScheduler(num_inference_steps=4))  # 7 network evaluations
    pipe.set_progress_bar_config(disable=True)
    calls = _counting(pipe.unet)
    z1, z2 = (torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    seen = []

    def record_and_stop(p, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        if i == 2:
            p._interrupt = True
        return kwargs

    stopped = pipe(latents=z1, output_type="latent", callback_on_step_end=record_and_stop).images
    assert len(calls) == 3 and len(seen) == 3 and pipe.interrupt
    torch.testing.assert_close(stopped, seen[-1])

    # Editing: after a whole Heun step (i = 1) the scheduler holds no state, so swapping in the latents of another
    # run at that point finishes that run.
    full = []
    reference = pipe(latents=z1, output_type="latent",
                     callback_on_step_end=lambda p, i, t, kw: full.append(kw["latents"].clone()) or kw).images
    assert not pipe.interrupt and pipe.num_timesteps == 7
    swapped = pipe(latents=z2, output_type="latent",
                   callback_on_step_end=lambda p, i, t, kw: {"latents": full[1]} if i == 1 else kw).images
    torch.testing.assert_close(swapped, reference)
    constant = pipe(latents=z2, output_type="pt", callback_on_step_end=lambda p, i, t, kw: {
        "latents": torch.zeros_like(kw["latents"])} if i == 6 else kw).images
    assert torch.equal(constant, torch.full_like(constant, 0.5))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(latents=z1, callback_on_step_end=record_and_stop, callback_on_step_end_tensor_inputs=["prompt_embeds"])


class ZeroLabels(PipelineCallback):
    """diffusers' callback classes work too: this one switches every sample to class 0 after the first step."""

    tensor_inputs = ["class_labels"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index != self.config.cutoff_step_index:
            return {}
        return {"class_labels": torch.zeros_like(callback_kwargs["class_labels"])}


def test_pipeline_callback_classes_and_label_edits():
    pipe = EDMPipeline(tiny_unet(num_classes=3), EDMHeunScheduler(num_inference_steps=3))
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels_seen = []
    pipe.unet.register_forward_hook(lambda m, args, kwargs, out: labels_seen.append(kwargs["class_labels"].tolist()),
                                    with_kwargs=True)
    callback = ZeroLabels(cutoff_step_ratio=None, cutoff_step_index=0)
    pipe(batch_size=2, latents=z, class_labels=[1, 2], callback_on_step_end=callback, output_type="pt")
    assert labels_seen == [[1, 2]] + [[0, 0]] * 4


def test_output_types_and_return_dict():
    pipe = EDMPipeline(tiny_unet(), EDMHeunScheduler(num_inference_steps=3))
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    latent = pipe(batch_size=2, latents=z, output_type="latent").images
    pt = pipe(batch_size=2, latents=z, output_type="pt").images
    (np_images,) = pipe(batch_size=2, latents=z, output_type="np", return_dict=False)
    pil = pipe(batch_size=2, latents=z).images
    torch.testing.assert_close(pt, ((latent + 1) / 2).clamp(0, 1))
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    assert latent.dtype == torch.float32 and len(pil) == 2 and pil[0].size == (8, 8)
    with pytest.raises(ValueError, match="output_type"):
        pipe(batch_size=2, latents=z, output_type="jpeg")


def test_generators_of_another_device_and_bad_lists_are_refused():
    pipe = EDMPipeline(tiny_unet(num_classes=3), EDMHeunScheduler(num_inference_steps=2))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        pipe(batch_size=3, generator=generators([0, 1]))
    # A CUDA generator cannot exist on a CPU-only machine; one of that device type is refused before any draw.
    cuda_generator = SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(ValueError, match="generator on cuda cannot draw for a pipeline running on cpu"):
        pipe(batch_size=1, generator=[cuda_generator])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_class_labels_are_drawn_on_the_generators_device():
    pipe = EDMPipeline(tiny_unet(num_classes=10), EDMHeunScheduler(num_inference_steps=2)).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    cuda = pipe(batch_size=2, generator=[torch.Generator("cuda").manual_seed(s) for s in (0, 1)], output_type="pt")
    cpu = pipe(batch_size=2, generator=generators([0, 1]), output_type="pt")  # CPU generators work on CUDA too
    assert cuda.images.shape == cpu.images.shape == (2, 1, 8, 8)
    expected = [int(torch.randint(10, (1,), generator=torch.Generator("cuda").manual_seed(s), device="cuda"))
                for s in (0, 1)]
    seen = []
    pipe.unet.register_forward_hook(lambda m, a, kw, out: seen.append(kw["class_labels"]), with_kwargs=True)
    pipe(batch_size=2, generator=[torch.Generator("cuda").manual_seed(s) for s in (0, 1)], output_type="pt")
    assert seen[0].device.type == "cuda" and seen[0].tolist() == expected


# ---------------------------------------------------------------- loading with components and dtypes


def test_from_pretrained_honours_components_and_dtypes(tmp_path):
    EDMPipeline(tiny_unet(num_classes=3), EDMHeunScheduler(sigma_data=0.4)).save_pretrained(tmp_path / "model")
    euler = EDMEulerScheduler(sigma_data=0.4)
    pipe = EDMPipeline.from_pretrained(tmp_path / "model", scheduler=euler, torch_dtype=torch.bfloat16)
    assert pipe.scheduler is euler and pipe.unet.dtype == torch.bfloat16
    assert EDMPipeline.from_pretrained(tmp_path / "model", torch_dtype={"unet": torch.float16}).unet.dtype == \
        torch.float16
    assert EDMPipeline.from_pretrained(tmp_path / "model", dtype={"default": torch.bfloat16}).unet.dtype == \
        torch.bfloat16
    assert EDMPipeline.from_pretrained(tmp_path / "model", torch_dtype={"scheduler": torch.float16}).unet.dtype == \
        torch.float32
    with pytest.raises(ValueError, match="torch_dtype"):
        EDMPipeline.from_pretrained(tmp_path / "model", torch_dtype="half")
    # Half-precision networks sample (in float32 latents) close to the float32 network.
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    full = EDMPipeline.from_pretrained(tmp_path / "model", scheduler=EDMEulerScheduler(sigma_data=0.4))
    full.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, latents=z, class_labels=[0, 1], num_inference_steps=3, output_type="pt")
    torch.testing.assert_close(pipe(**kwargs).images, full(**kwargs).images, atol=0.05, rtol=0)


def test_trust_remote_code_loading_honours_components_and_dtypes(tmp_path):
    EDMPipeline(tiny_unet(num_classes=3), EDMHeunScheduler(num_inference_steps=3)).save_pretrained(tmp_path / "model")
    code = f"""
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler
folder = {str(tmp_path / 'model')!r}
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, torch_dtype={{"unet": torch.bfloat16}},
                                         scheduler=EDMEulerScheduler())
assert type(pipe).__name__ == "EDMPipeline" and isinstance(pipe.scheduler, EDMEulerScheduler), type(pipe.scheduler)
assert pipe.unet.dtype == torch.bfloat16, pipe.unet.dtype
z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
images = pipe(batch_size=2, latents=z, class_labels=[0, 1], num_inference_steps=3, output_type="pt").images
torch.save(images, "bf16.pt")
half = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.float16)
assert half.unet.dtype == torch.float16 and type(half.scheduler).__name__ == "EDMHeunScheduler"
# The single file's own from_pretrained takes the same arguments.
again = type(pipe).from_pretrained(folder, scheduler=EDMEulerScheduler(), torch_dtype={{"default": torch.float16}})
assert again.unet.dtype == torch.float16 and isinstance(again.scheduler, EDMEulerScheduler)
"""
    run_without_package(code, tmp_path)
    pipe = EDMPipeline.from_pretrained(tmp_path / "model", scheduler=EDMEulerScheduler())
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = pipe(batch_size=2, latents=z, class_labels=[0, 1], num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(torch.load(tmp_path / "bf16.pt", weights_only=True), expected, atol=0.05, rtol=0)
