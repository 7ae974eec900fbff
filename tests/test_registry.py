"""The evaluation registry: loading and sampling registered pipelines from given noise, the teacher's pairing maps,
lookups, and a latent pipeline registered from outside the package."""

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    UNet2DModel,
)

from conftest import tiny_unet
from diffusers_memdistill import registry
from diffusers_memdistill.data import build_training_set, images_to_model_range
from diffusers_memdistill.pipelines.pipeline_consistency import ConsistencyStudentPipeline
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.registry import (
    UnregisteredPipelineError,
    load_pipeline,
    pipeline_class_name,
    register_pipeline,
    registered_pipelines,
    registration_for,
    sample_images,
    teacher_pairing_maps,
    unregister_pipeline,
)
from diffusers_memdistill.schedulers.scheduling_consistency import ConsistencyStudentScheduler
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler
from test_schedulers import edm_denoiser


def seeded(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def noise_from(generators, shape):
    """The starting noise a stock pipeline draws from per-sample generators (which it then goes on using)."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """A stock DDPMPipeline with a tiny UNet trained a few Adam steps on 16 digits, saved offline."""
    training_set = build_training_set("digits", 8, num_train_images=16)
    images = images_to_model_range(training_set.images)
    unet, scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=20)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.randint(20, (len(images),), generator=generator)
    noisy = scheduler.add_noise(images, noise, timesteps)
    optimizer = torch.optim.Adam(unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it learned something of its 16 digits
    folder = tmp_path_factory.mktemp("ddpm") / "model"
    DDPMPipeline(unet.eval(), scheduler).save_pretrained(folder)
    return folder


def test_a_trained_ddpm_samples_through_the_registry_from_given_noise(ddpm_folder):
    assert pipeline_class_name(str(ddpm_folder)) == "DDPMPipeline"
    pipe, registration = load_pipeline(str(ddpm_folder))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, DDPMPipeline) and registration is registration_for(pipe)
    assert registration.kind == "teacher" and registration.space == "pixel" and not registration.has_pairing_maps
    assert registration.noise_shape(pipe) == (1, 8, 8) and registration.num_classes(pipe) == 0
    assert registration.steps(pipe) == 20 and registration.image_shape(pipe) == (1, 8, 8)

    # Given the noise that DDPMPipeline itself draws from per-sample generators (and the same generators for the noise
    # injected at every step), the registry reproduces the stock pipeline's samples.
    generators = seeded(range(100, 104))
    z = noise_from(generators, (1, 8, 8))
    images = sample_images(pipe, z, generators)
    stock = pipe(batch_size=4, generator=seeded(range(100, 104)), num_inference_steps=20, output_type="np").images
    assert images.dtype == torch.float32 and images.shape == (4, 1, 8, 8) and images.device.type == "cpu"
    torch.testing.assert_close(images.permute(0, 2, 3, 1), torch.from_numpy(stock), atol=1e-5, rtol=0)

    # Two batch sizes, the same samples.
    small = sample_images(pipe, z, seeded(range(4)), batch_size=3)
    whole = sample_images(pipe, z, seeded(range(4)))
    torch.testing.assert_close(small, whole, atol=1e-5, rtol=0)
    assert not torch.allclose(small, images)  # the injected noise comes from the generators

    # Loading options reach diffusers' loader.
    half, _ = load_pipeline(str(ddpm_folder), torch_dtype=torch.float16)
    assert half.unet.dtype == torch.float16


def test_ddim_and_consistency_model_pipelines_sample_like_the_stock_ones():
    ddim = DDIMPipeline(tiny_unet(), DDIMScheduler(num_train_timesteps=20))
    ddim.set_progress_bar_config(disable=True)
    generators = seeded([3, 4])
    z = noise_from(generators, (1, 8, 8))
    stock = ddim(batch_size=2, generator=seeded([3, 4]), num_inference_steps=5, output_type="np").images
    got = sample_images(ddim, z, generators, num_inference_steps=5)
    torch.testing.assert_close(got.permute(0, 2, 3, 1), torch.from_numpy(stock), atol=1e-5, rtol=0)
    assert registration_for(ddim).steps(ddim) == 50

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=5).eval()
    cm = ConsistencyModelPipeline(unet, CMStochasticIterativeScheduler())
    cm.set_progress_bar_config(disable=True)
    registration = registration_for(cm)
    assert registration.kind == "student" and registration.num_classes(cm) == 5 and registration.steps(cm) == 1
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2):
        stock = cm(batch_size=2, latents=z, class_labels=[4, 1], generator=seeded([8, 9]), num_inference_steps=steps,
                   output_type="pt").images
        got = sample_images(cm, z, seeded([8, 9]), class_labels=[4, 1], num_inference_steps=steps)
        torch.testing.assert_close(got, stock.cpu(), atol=1e-5, rtol=0)
    # Without labels, they are drawn from the per-sample generators: the same with any batch size.
    torch.testing.assert_close(sample_images(cm, z, seeded([8, 9]), batch_size=1), sample_images(cm, z, seeded([8, 9])),
                               atol=1e-5, rtol=0)


def test_the_package_pipelines_and_the_teachers_pairing_maps(tmp_path):
    unet = tiny_unet(num_classes=3)
    churning = EDMHeunScheduler(num_inference_steps=3, s_churn=5.0, s_tmin=0.5, s_tmax=20.0)
    EDMPipeline(unet, churning).save_pretrained(tmp_path / "teacher")
    assert pipeline_class_name(str(tmp_path / "teacher")) == "EDMPipeline"  # the [module, class] form
    teacher, registration = load_pipeline(str(tmp_path / "teacher"))
    assert registration.kind == "teacher" and registration.steps(teacher) == 3
    assert registration.num_classes(teacher) == 3
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = [2, 0, 1]
    images = sample_images(teacher, z, seeded([5, 6, 7]), class_labels=labels)
    direct = teacher(batch_size=3, latents=z, class_labels=labels, generator=seeded([5, 6, 7]), output_type="pt")
    torch.testing.assert_close(images, direct.images)
    # Another batch size changes the convolution kernels' rounding only (amplified by the churn's 3 levels).
    torch.testing.assert_close(sample_images(teacher, z, seeded([5, 6, 7]), class_labels=labels, batch_size=2), images,
                               atol=1e-4, rtol=0)

    # Phi_K is the deterministic Heun map (whatever the teacher's churn), Phi_1 = D(sigma_max z; sigma_max).
    phi_k, phi_1 = teacher_pairing_maps(teacher, z, torch.tensor(labels), num_steps=4, batch_size=2)
    deterministic = EDMPipeline(unet, EDMHeunScheduler(num_inference_steps=4))
    deterministic.set_progress_bar_config(disable=True)
    expected = deterministic(batch_size=3, latents=z, class_labels=labels, output_type="pt").images
    torch.testing.assert_close(phi_k, expected, atol=1e-5, rtol=0)
    one_step = ((edm_denoiser(unet, z * 80.0, 80.0, labels=torch.tensor(labels)) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(phi_1, one_step, atol=1e-5, rtol=0)

    student = ConsistencyStudentPipeline(tiny_unet(num_classes=3, seed=1), ConsistencyStudentScheduler())
    registration = registration_for(student)
    assert registration.kind == "student" and registration.steps(student) == 1
    for steps in (1, 2, [3.0]):
        got = sample_images(student, z, seeded([1, 2, 3]), class_labels=labels, num_inference_steps=steps)
        direct = student(batch_size=3, latents=z, class_labels=labels, generator=seeded([1, 2, 3]),
                         num_inference_steps=steps, output_type="pt").images
        torch.testing.assert_close(got, direct)
    with pytest.raises(ValueError, match="no registered ODE map.*EDMPipeline"):
        teacher_pairing_maps(student, z)
    with pytest.raises(ValueError, match=r"noise of shape \(1, 8, 8\)"):
        sample_images(student, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="2 generators for 3 samples"):
        sample_images(student, z, seeded([1, 2]))
    with pytest.raises(ValueError, match="takes no prompts"):
        sample_images(student, z, prompts=["a", "b", "c"])


def test_lookups_and_errors(tmp_path):
    assert set(registered_pipelines()) >= {"EDMPipeline", "ConsistencyStudentPipeline", "DDPMPipeline", "DDIMPipeline",
                                           "ConsistencyModelPipeline"}
    assert registration_for(EDMPipeline) is registration_for("EDMPipeline")
    with pytest.raises(UnregisteredPipelineError, match="KandinskyPipeline is not registered.*DDIMPipeline, "
                                                        "DDPMPipeline, (.*, )?EDMPipeline"):
        registration_for("KandinskyPipeline")
    sd = registration_for("StableDiffusionPipeline")
    assert sd.takes_prompts and sd.space == "latent" and sd.kind == "teacher"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": ["pipeline_x", "OtherPipeline"]}')
    assert pipeline_class_name(str(tmp_path / "other")) == "OtherPipeline"
    with pytest.raises(UnregisteredPipelineError, match="OtherPipeline is not registered"):
        load_pipeline(str(tmp_path / "other"))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        pipeline_class_name(str(tmp_path))
    for kwargs, match in (({"kind": "oracle"}, "kind"), ({"kind": "teacher", "space": "fourier"}, "space"),
                          ({"kind": "teacher", "ode_map": len}, "both ode_map and one_step_map"),
                          ({"kind": "teacher"}, "already registered")):
        with pytest.raises(ValueError, match=match):
            register_pipeline("EDMPipeline", sample=len, **kwargs)
    with pytest.raises(ValueError, match="not a diffusers class"):
        register_pipeline("NoSuchPipeline", kind="generator", sample=len)


class TinyLatentPipeline(DiffusionPipeline):
    """A one-step latent generator (a stand-in for the latent pipelines to come): the UNet maps noise to latents."""

    def __init__(self, unet: UNet2DModel, vae: AutoencoderKL):
        super().__init__()
        self.register_modules(unet=unet, vae=vae)

    @torch.no_grad()
    def __call__(self, latents, output_type="latent"):
        assert output_type == "latent"
        return ImagePipelineOutput(images=self.unet(latents, 0).sample)


def test_a_latent_pipeline_registered_from_outside_decodes_through_its_vae():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16, layers_per_block=1, scaling_factor=0.3).eval()
    pipe = TinyLatentPipeline(unet, vae)

    def sample(pipe, latents, generators, class_labels=None, prompts=None, num_inference_steps=None):
        return pipe(latents, output_type="latent").images

    registration = register_pipeline(TinyLatentPipeline, kind="generator", sample=sample, space="latent",
                                     default_steps=1, load=lambda path, **kwargs: pipe)
    try:
        assert registration.noise_shape(pipe) == (4, 8, 8) and registration.image_shape(pipe) == (3, 16, 16)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        images = sample_images(pipe, z, batch_size=1)
        with torch.no_grad():
            expected = ((vae.decode(unet(z, 0).sample / 0.3).sample + 1) / 2).clamp(0, 1)
        assert images.shape == (2, 3, 16, 16)
        torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
        assert registry.decode_latents(vae, unet(z, 0).sample).shape == (2, 3, 16, 16)
    finally:
        unregister_pipeline(TinyLatentPipeline)
    assert "TinyLatentPipeline" not in registered_pipelines()


def test_the_denoiser_wrappers_take_latents_and_text_conditioning():
    from diffusers import UNet2DConditionModel

    from diffusers_memdistill.models.denoiser import ConsistencyDenoiser, EDMDenoiser

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2).eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    text = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    sigma, sd = torch.tensor([3.0, 0.5]), 0.5
    with torch.no_grad():
        denoised = EDMDenoiser(unet, sd)(x, sigma, encoder_hidden_states=text)
        c_in = (1 / (sigma**2 + sd**2).sqrt()).reshape(2, 1, 1, 1)
        F = unet(c_in * x, sigma.log() / 4, encoder_hidden_states=text).sample
        s = sigma.reshape(2, 1, 1, 1)
        torch.testing.assert_close(denoised, sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * F)
        assert torch.equal(ConsistencyDenoiser(unet, sd, 0.002)(x, 0.002, encoder_hidden_states=text), x)


def test_memdistill_evaluate_audits_a_stock_ddpm_against_its_training_set(ddpm_folder, tmp_path):
    """`memdistill evaluate` on a stock DDPMPipeline folder: sampled through its registration, scored against the 16
    digits it was trained on (their record beside the model, as the training scripts write it), with the floor row of
    held-out digits, and recomputed exactly from the saved samples."""
    import json
    import shutil

    from diffusers_memdistill.cli import main as cli_main

    model = tmp_path / "ddpm"
    shutil.copytree(ddpm_folder, model)
    build_training_set("digits", 8, num_train_images=16).save(str(model))  # the set the fixture trained on
    out = tmp_path / "ev"
    argv = ["evaluate", "--model", str(model), "--num_samples", "6", "--metrics", "l2,fd_pixel", "--device", "cpu",
            "--output_dir", str(out)]
    assert cli_main(argv) == 0
    results = json.loads((out / "metrics.json").read_text())
    (name, row), = results["models"].items()
    assert row["kind"] == "teacher"  # sampled with its registration's default steps
    assert row["l2"]["num_valid"] == 6 and 0.0 <= row["l2"]["fraction_memorized"] <= 1.0
    assert results["training_sets"][row["training_set"]]["num_images"] == 16
    assert any(entry["num_images"] == 6 for entry in results["floor"].values())
    assert cli_main(["evaluate", "--from_samples", str(out)]) == 0
