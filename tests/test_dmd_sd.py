"""DMD of a Stable Diffusion teacher (``distill_dmd.py`` in latent space, `losses.dmd_latent`) on tiny offline SD
components: the generator's timesteps are those `LCMScheduler` samples and the trained generator is exactly what the
stock pipeline samples; the real score is the guided teacher in one fused call; the saved generator reloads in
diffusers' `StableDiffusionPipeline` without this package and samples in 1 or 4 steps; teacher, LCM student (full and
LoRA) and DMD generator are audited side by side in one report; bad input is refused before anything is written."""

import json

import pytest
import torch

from conftest import launch_two_processes, run_script, run_without_package
from diffusers_memdistill.losses.dmd_latent import LatentDMDLoss, check_generator_timesteps, generator_timesteps_grid
from diffusers_memdistill.models.tiny_sd import tiny_sd_components


@pytest.fixture(scope="module")
def parts():
    components = tiny_sd_components(resolution=16, seed=0)
    unet = components["unet"].eval()
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    return unet, scheduler


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 77, 32, generator=g)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_generator_timesteps_are_the_lcm_schedulers(steps):
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(original_inference_steps=steps)
    scheduler.set_timesteps(steps)
    assert generator_timesteps_grid(1000, steps) == scheduler.timesteps.tolist()
    assert generator_timesteps_grid(1000, 4) == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="a 2-step generator samples with LCMScheduler at 999,499; pass those"):
        check_generator_timesteps([999, 500], 1000)
    with pytest.raises(ValueError, match="divides the teacher's 1000 training timesteps"):
        generator_timesteps_grid(1000, 3)


@pytest.mark.parametrize("steps", [1, 4])
def test_the_trained_generator_is_what_lcm_scheduler_samples(parts, steps):
    """generate(train=False) from noise z equals diffusers' LCMScheduler loop on the same UNet, noise and generator
    (its re-noising draws included): the pipeline samples exactly the function that was trained."""
    from diffusers import LCMScheduler

    unet, noise_scheduler = parts
    loss = LatentDMDLoss(noise_scheduler, generator_timesteps_grid(1000, steps))
    z, hidden = _inputs()
    with torch.no_grad():
        ours = loss.generate(unet, z, hidden, torch.Generator().manual_seed(5), train=False)
        scheduler = LCMScheduler.from_config(noise_scheduler.config, original_inference_steps=steps)
        scheduler.set_timesteps(steps)
        x, g = z.clone(), torch.Generator().manual_seed(5)
        for t in scheduler.timesteps:
            x, denoised = scheduler.step(unet(x, t, hidden).sample, t, x, generator=g, return_dict=False)
    torch.testing.assert_close(ours, denoised, atol=1e-5, rtol=1e-5)


def test_backward_simulation_trains_one_drawn_step(parts):
    """A 4-step generator in training: the output is the no-gradient rollout up to a drawn step k, the gradient flows
    through step k only (the earlier steps' outputs are constants)."""
    unet, noise_scheduler = parts
    loss = LatentDMDLoss(noise_scheduler, [999, 749, 499, 249])
    z, hidden = _inputs(1)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        k = int(torch.randint(0, 4, (1,), generator=g))
        out = loss.generate(unet, z, hidden, torch.Generator().manual_seed(seed), train=True)
        assert out.requires_grad
        # The same draws without training: the first k + 1 steps of a (k + 1)-step rollout on the full grid.
        partial = LatentDMDLoss.__new__(LatentDMDLoss)
        partial.__dict__.update(loss.__dict__, generator_timesteps=loss.generator_timesteps[: k + 1])
        g = torch.Generator().manual_seed(seed)
        torch.randint(0, 4, (1,), generator=g)  # the step draw
        with torch.no_grad():
            expected = partial.generate(unet, z, hidden, g, train=False)
        torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-5)
    unet.zero_grad()
    out.sum().backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    unet.zero_grad()


def test_matching_loss_guides_the_teacher_in_one_fused_call_and_vanishes_when_fake_equals_real(parts):
    unet, noise_scheduler = parts
    z, hidden = _inputs(2)
    uncond = torch.zeros_like(hidden)
    guided = LatentDMDLoss(noise_scheduler, real_guidance_scale=1.75)
    calls = []
    handle = unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    t = torch.tensor([100, 700])
    real = guided.real_prediction(unet, z, t, hidden, uncond)
    handle.remove()
    assert calls == [4]  # cond and uncond, one batch of 2B
    x0_c = guided.predicted_original(unet, z, t, hidden)
    x0_u = guided.predicted_original(unet, z, t, uncond)
    torch.testing.assert_close(real, x0_u + 1.75 * (x0_c - x0_u), atol=1e-5, rtol=1e-5)
    # By hand: x0 = (z - sqrt(1 - a) eps) / sqrt(a) on the DDPM schedule.
    a = noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        eps = unet(z, t, hidden).sample
    torch.testing.assert_close(x0_c, (z - (1 - a).sqrt() * eps) / a.sqrt(), atol=1e-5, rtol=1e-5)
    # Without guidance and with the teacher as the fake score, the surrogate and its gradient are exactly zero.
    plain = LatentDMDLoss(noise_scheduler, real_guidance_scale=1.0)
    x0 = z.clone().requires_grad_(True)
    value, logs = plain.matching_loss(x0, unet, unet, hidden, uncond, torch.Generator().manual_seed(0))
    value.sum().backward()
    assert torch.all(value == 0) and torch.all(x0.grad == 0)
    assert all(plain.timestep_range[0] <= int(s) <= plain.timestep_range[1] for s in logs["timesteps"])
    assert plain.timestep_range == (20, 980)  # DMD2's int(0.02 T), int(0.98 T)
    _, fake_logs = plain.fake_loss(unet, z, hidden, torch.Generator().manual_seed(0))
    assert all(20 <= int(s) <= 980 for s in fake_logs["timesteps"])


def test_a_teacher_kept_in_bfloat16_takes_float32_latents(parts):
    """--cast_teacher_unet: the frozen teacher in bfloat16 reads float32 latents and gives float32 predictions close
    to the float32 teacher's."""
    import copy

    unet, noise_scheduler = parts
    loss = LatentDMDLoss(noise_scheduler, real_guidance_scale=1.75)
    z, hidden = _inputs(3)
    t = torch.tensor([100, 300])
    full = loss.real_prediction(unet, z, t, hidden, torch.zeros_like(hidden))
    half = loss.real_prediction(copy.deepcopy(unet).to(torch.bfloat16), z, t, hidden, torch.zeros_like(hidden))
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.05 * full.abs().max()


def _dmd_args(sd_teacher, out, *extra):
    return ["--pretrained_model_name_or_path", sd_teacher["teacher"], "--output_dir", out, "--resolution", 16,
            "--train_batch_size", 2, "--max_train_steps", 4, "--checkpointing_steps", 2, "--report_to", "none",
            "--cache_dir", sd_teacher["cache"], "--learning_rate", "1e-3", "--lr_warmup_steps", 0,
            "--num_validation_images", 0, "--fake_updates_per_generator_update", 2, *extra]


@pytest.mark.slow
def test_generators_reload_in_the_stock_pipeline_and_sit_beside_the_lcm_students_in_one_audit(sd_teacher, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffusers_memdistill.cli import main as cli_main
    from diffusers_memdistill.evaluation.models import load_model as load_text_to_image_model
    from diffusers_memdistill.hub import render_model_card
    from diffusers_memdistill.training.runner import load_checkpoint_weights

    one, four = tmp_path / "dmd1", tmp_path / "dmd4"
    run_script("distill_dmd", _dmd_args(sd_teacher, one, "--num_validation_images", 2))
    run_script("distill_dmd", _dmd_args(sd_teacher, four, "--generator_timesteps", "999,749,499,249",
                                        "--fake_lora_rank", 2, "--track_memorization_steps", 2,
                                        "--track_memorization_prompts", 2))
    assert (one / "samples" / "step-0000004-1-step.png").is_file()
    config = json.loads((four / "training_config.json").read_text())
    assert config["script"] == "distill_dmd.py" and config["generator_timesteps"] == [999, 749, 499, 249]
    assert config["real_guidance_scale_used"] == 1.75 and config["timestep_range"] == [20, 980]
    assert "to_q" in config["fake_lora_target_modules"]
    assert [e["step"] for e in json.loads((four / "memorization_curve.json").read_text())] == [2, 4]
    # The fake score of the LoRA run trains only its LoRA: its base weights are the teacher's in every checkpoint.
    weights = load_checkpoint_weights(str(four / "checkpoints" / "checkpoint-4"))
    teacher = UNet2DConditionModel.from_pretrained(sd_teacher["teacher"], subfolder="unet").state_dict()
    fake = weights["fake_score"]
    assert any("lora" in k for k in fake) and all(torch.equal(fake[k], teacher[k.replace(".base_layer", "")])
                                                  for k in fake if "lora" not in k)
    # The saved UNet is the generator's EMA.
    saved = StableDiffusionPipeline.from_pretrained(four).unet.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in weights["ema_generator"].items())
    for folder, steps in ((one, 1), (four, 4)):
        code = f"""
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(folder)!r})
assert isinstance(pipe.scheduler, LCMScheduler) and not pipe.scheduler.config.clip_sample, pipe.scheduler
pipe.set_progress_bar_config(disable=True)
images = pipe("a memorized photo number 1", num_inference_steps={steps}, guidance_scale=1.0, output_type="pt",
              generator=torch.Generator().manual_seed(0)).images
assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
print("timesteps", pipe.scheduler.timesteps.tolist())
"""
        expected = [999] if steps == 1 else [999, 749, 499, 249]
        assert f"timesteps {expected}" in run_without_package(code, tmp_path).stdout
        pipe, registration = load_text_to_image_model(str(folder))
        assert registration.steps(pipe) == steps
    # LCM students of the same teacher, full and LoRA, then all five in one `memdistill evaluate` report from the same
    # prompts and seeds, each with its own default step count.
    lcm = ["--pretrained_teacher_model", sd_teacher["teacher"], "--resolution", 16, "--train_batch_size", 2,
           "--max_train_steps", 2, "--checkpointing_steps", 2, "--report_to", "none",
           "--cache_dir", sd_teacher["cache"],
           "--num_validation_images", 0, "--w_min", 0, "--w_max", 0]
    run_script("distill_lcm", lcm + ["--output_dir", tmp_path / "lcm"])
    run_script("distill_lcm", lcm + ["--output_dir", tmp_path / "lcm_lora", "--use_lora", "--lora_rank", 2])
    models = {"teacher": sd_teacher["teacher"], "lcm": tmp_path / "lcm", "lcm_lora": tmp_path / "lcm_lora", "dmd1": one,
              "dmd4": four}
    flags = [a for path in models.values() for a in ("--model", str(path))]
    assert cli_main(["evaluate", *flags, "--metrics", "l2", "--samples_per_prompt", "2", "--guidance_scale", "1",
                     "--device", "cpu", "--output_dir", str(tmp_path / "audit")]) == 0
    results = json.loads((tmp_path / "audit" / "metrics.json").read_text())
    assert list(results["models"]) == ["teacher", "lcm", "lcm_lora", "dmd1", "dmd4"]
    steps = {r["name"]: r["steps"] for r in json.loads((tmp_path / "audit" / "samples" / "manifest.json").read_text())
             ["runs"]}
    assert steps == {"teacher": 50, "lcm": 4, "lcm_lora": 4, "dmd1": 1, "dmd4": 4}
    report = (tmp_path / "audit" / "report.md").read_text()
    assert all(f"| {name} | training |" in report and f"| {name} | held-out |" in report for name in models), report
    # The DMD generator's card reads that report: its rows for the training and held-out prompts beside its
    # teacher's, with the numbers of metrics.json (nearest-neighbour L2, as the floor row of held-out real images).
    card, _ = render_model_card(str(one), metrics_path=str(tmp_path / "audit" / "metrics.json"))
    card = str(card)
    nearest = results["models"]["dmd1"]["l2"]
    assert "pipeline_tag: text-to-image" in card
    assert f"| **this model, 1 step, training prompts** | {nearest['num_samples']} | " \
           f"{100 * nearest['fraction_memorized']:.2f}% |" in card
    assert "| **this model, 1 step, held-out prompts** |" in card
    assert "| teacher, 50 steps, training prompts |" in card
    floor = results["floor"]["train0"]
    assert f"held-out real images ({floor['dataset']} {floor['split']}, floor)" in card


@pytest.mark.slow
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(sd_teacher, tmp_path):
    from diffusers_memdistill.training.runner import load_checkpoint_weights

    steps = ("--generator_timesteps", "999,499", "--checkpointing_steps", 2)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_script("distill_dmd", _dmd_args(sd_teacher, whole, *steps, "--max_train_steps", 4))
    run_script("distill_dmd", _dmd_args(sd_teacher, parts, *steps, "--max_train_steps", 2))
    run_script("distill_dmd", _dmd_args(sd_teacher, parts, *steps, "--max_train_steps", 4,
                                        "--resume_from_checkpoint", "latest"))
    a = load_checkpoint_weights(str(whole / "checkpoints" / "checkpoint-4"))
    b = load_checkpoint_weights(str(parts / "checkpoints" / "checkpoint-4"))
    assert set(a) == {"generator", "fake_score", "ema_generator"}
    for name in a:  # generator (2 updates), fake score (4) and the generator's EMA
        assert all(torch.equal(v, b[name][k]) for k, v in a[name].items()), name


@pytest.mark.slow
def test_bad_input_is_refused_before_anything_is_written(sd_teacher, tmp_path, capsys):
    from diffusers_memdistill.training import distill_dmd as script

    out = tmp_path / "out"

    def run(*extra):
        return script.main(script.parse_args([str(a) for a in _dmd_args(sd_teacher, out, *extra)]))

    with pytest.raises(ValueError, match="a 2-step generator samples with LCMScheduler at 999,499; pass those"):
        run("--generator_timesteps", "999,500")
    with pytest.raises(ValueError, match="--generator_sigmas, --use_gan: not for a Stable Diffusion teacher"):
        run("--generator_sigmas", "80", "--use_gan")
    with pytest.raises(SystemExit):
        run("--fake_lora_rank", "-1")
    assert "--fake_lora_rank must not be negative" in capsys.readouterr().err
    with pytest.raises(ValueError, match="records no training pairs .* pass --memorized_data"):
        script.main(script.parse_args([str(a) for a in _dmd_args(sd_teacher, out)] + ["--pretrained_model_name_or_path",
                                                                              str(sd_teacher["base"])]))
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(sd_teacher, tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes("distill_dmd", _dmd_args(sd_teacher, out, "--cpu", "--fake_lora_rank", 2))
    config = json.loads((out / "training_config.json").read_text())
    assert config["num_processes"] == 2 and (out / "unet").is_dir()
