"""training_scripts/distill_lcm.py on tiny offline SD components: the full student and the LCM-LoRA reload in stock
diffusers pipelines (without this package) and sample in 4 steps, a resumed run ends where an uninterrupted one does,
the audit's registry samples both, and bad input is refused before anything is written."""

import json
import shutil

import pytest
import torch

from conftest import launch_two_processes, run_script, run_without_package
from diffusers_memdistill.models.tiny_sd import tiny_sd_components
from diffusers_memdistill.registry import registration_for, sample_images
from diffusers_memdistill.training.distill_lcm import build_lcm_student
from diffusers_memdistill.training.runner import load_checkpoint_weights


def _args(sd_teacher, out, *extra, teacher=None):
    return ["--pretrained_teacher_model", teacher or sd_teacher["base"], "--resolution", 16, "--train_batch_size", 2,
            "--max_train_steps", 3, "--checkpointing_steps", 3, "--report_to", "none",
            "--cache_dir", sd_teacher["cache"],
            "--learning_rate", "1e-3", "--num_validation_images", 0, "--output_dir", out,
            *([] if teacher else ["--memorized_data", sd_teacher["mem"], "--num_memorized", 3,
                                  "--memorized_repeats", 2]),
            *extra]


def _unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, hidden = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([19, 999]), hidden).sample


def test_full_student_starts_as_the_teacher():
    from diffusers_memdistill.losses.lcm import guidance_scale_embedding

    teacher = tiny_sd_components(resolution=16)["unet"]
    student = build_lcm_student(teacher, 256)
    assert student.config.time_cond_proj_dim == 256 and teacher.config.time_cond_proj_dim is None
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0
    g = torch.Generator().manual_seed(0)
    x, hidden = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([19, 999])
    with torch.no_grad():
        expected = teacher(x, t, hidden).sample
        got = student(x, t, hidden, timestep_cond=guidance_scale_embedding(torch.tensor([5.0, 12.0]), 256)).sample
    assert torch.equal(got, expected)  # the zero-initialised guidance embedding adds nothing yet
    # A teacher that has a guidance embedding keeps it, and its weights.
    again = build_lcm_student(student, 64)
    assert again.config.time_cond_proj_dim == 256
    assert torch.equal(again.time_embedding.cond_proj.weight, student.time_embedding.cond_proj.weight)


def test_lcm_students_are_sampled_through_the_registry():
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

    parts = tiny_sd_components(resolution=16)
    scheduler = LCMScheduler.from_config(parts["scheduler"].config)
    torch.manual_seed(0)
    unet = build_lcm_student(parts["unet"], 8)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.1)  # a student whose guidance input matters
    parts.update(unet=unet, scheduler=scheduler)
    pipe = LatentConsistencyModelPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert registration_for(pipe).steps(pipe) == 4 and registration_for(pipe).kind == "student"
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo", "a handwritten digit 3"]
    expected = pipe(prompts, latents=latents.clone(), num_inference_steps=4, guidance_scale=3.0, output_type="pt",
                    generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    got = sample_images(pipe, latents, prompts=prompts, guidance_scale=3.0, batch_size=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    other = sample_images(pipe, latents, prompts=prompts, guidance_scale=9.0, batch_size=2)
    assert not torch.allclose(other, got, atol=1e-4)  # guidance reaches the student through w = g - 1
    # An LCM-LoRA is a StableDiffusionPipeline with an LCMScheduler: 4 steps, no classifier-free guidance.
    sd = StableDiffusionPipeline(**{**tiny_sd_components(resolution=16), "scheduler": scheduler},
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    assert registration_for(sd).steps(sd) == 4
    expected = sd(prompts, latents=latents.clone(), num_inference_steps=4, guidance_scale=1.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    torch.testing.assert_close(sample_images(sd, latents, prompts=prompts, guidance_scale=7.5), expected,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_full_student_reloads_in_the_stock_lcm_pipeline(sd_teacher, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    out = tmp_path / "full"
    run_script("distill_lcm", _args(sd_teacher, out, "--num_validation_images", 2))
    assert (out / "samples" / "step-0000003-4-step.png").is_file()
    code = f"""
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler
pipe = LatentConsistencyModelPipeline.from_pretrained({str(out)!r})
assert isinstance(pipe.scheduler, LCMScheduler), type(pipe.scheduler)
assert pipe.scheduler.config.timestep_scaling == 10.0 and pipe.scheduler.config.original_inference_steps == 50
assert not pipe.scheduler.config.clip_sample  # latents are never clipped to [-1, 1]
assert pipe.unet.config.time_cond_proj_dim == 256
pipe.set_progress_bar_config(disable=True)
images = pipe("a memorized photo number 1", num_inference_steps=4, guidance_scale=8.0, output_type="pt",
              generator=torch.Generator().manual_seed(0)).images
assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
print("steps", len(pipe.scheduler.timesteps))
"""
    assert "steps 4" in run_without_package(code, tmp_path).stdout
    # The saved UNet is the online student of the last checkpoint; the target network (EMA 0.95) is checkpointed too.
    saved = LatentConsistencyModelPipeline.from_pretrained(out).unet.state_dict()
    weights = load_checkpoint_weights(str(out / "checkpoints" / "checkpoint-3"))
    assert all(torch.equal(saved[k], v) for k, v in weights["unet"].items())
    assert not all(torch.equal(weights["target_unet"][k], v) for k, v in weights["unet"].items())
    config = json.loads((out / "training_config.json").read_text())
    assert config["script"] == "distill_lcm.py" and config["pretrained_teacher_model"] == str(sd_teacher["base"])
    assert config["ddim_timesteps"] == list(range(19, 1000, 20)) and config["averages"]["target_unet"]["decay"] == 0.95


@pytest.mark.slow
def test_lcm_lora_loads_on_the_teacher_and_samples_in_four_steps(sd_teacher, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from diffusers_memdistill.evaluation.models import load_model as load_text_to_image_model
    from diffusers_memdistill.training.finetune_sd_memorize import add_lora

    out = tmp_path / "lora"
    run_script("distill_lcm", _args(sd_teacher, out, "--use_lora", "--lora_rank", 2, "--learning_rate", "1e-2"))
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "model_index.json").exists()
    code = f"""
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(sd_teacher["base"])!r})
pipe.load_lora_weights({str(out)!r})
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
images = pipe("a memorized photo number 1", num_inference_steps=4, guidance_scale=1.0, output_type="pt",
              generator=torch.Generator().manual_seed(0)).images
assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
print("steps", len(pipe.scheduler.timesteps))
"""
    assert "steps 4" in run_without_package(code, tmp_path).stdout
    # Teacher + load_lora_weights computes what the trained student (teacher + the LoRA of the last checkpoint) does.
    config = json.loads((out / "training_config.json").read_text())
    trained = UNet2DConditionModel.from_pretrained(sd_teacher["base"], subfolder="unet")
    add_lora(trained, 2, config["lora_target_modules_used"])
    trained.load_state_dict(load_checkpoint_weights(str(out / "checkpoints" / "checkpoint-3"))["unet"])
    assert "conv1" in config["lora_target_modules_used"] and "time_emb_proj" in config["lora_target_modules_used"]
    pipe = StableDiffusionPipeline.from_pretrained(sd_teacher["base"])
    before = _unet_output(pipe.unet)
    pipe.load_lora_weights(str(out))
    assert not torch.allclose(before, _unet_output(trained), atol=1e-4)
    torch.testing.assert_close(_unet_output(pipe.unet), _unet_output(trained), atol=1e-5, rtol=1e-4)
    # The audit loads it on its teacher with the LCMScheduler, sampled in 4 steps.
    audited, registration = load_text_to_image_model(str(out))
    assert isinstance(audited.scheduler, LCMScheduler) and registration.steps(audited) == 4


@pytest.mark.slow
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one_on_the_teachers_own_pairs(sd_teacher, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_script("distill_lcm", _args(sd_teacher, whole, "--max_train_steps", 4, "--checkpointing_steps", 2,
                                    teacher=sd_teacher["teacher"]))
    # The interrupted run also tracks memorization every step: measuring must not change what is trained.
    track = ["--track_memorization_steps", 1, "--track_memorization_prompts", 2]
    run_script("distill_lcm", _args(sd_teacher, parts, "--max_train_steps", 2, "--checkpointing_steps", 2, *track,
                                    teacher=sd_teacher["teacher"]))
    shutil.rmtree(parts / "unet")  # only the checkpoint is needed to continue
    (parts / "model_index.json").unlink()
    run_script("distill_lcm", _args(sd_teacher, parts, "--max_train_steps", 4, "--checkpointing_steps", 2,
                                    "--resume_from_checkpoint", "latest", *track, teacher=sd_teacher["teacher"]))
    curve = json.loads((parts / "memorization_curve.json").read_text())
    assert [entry["step"] for entry in curve] == [1, 2, 3, 4]
    assert all(0 <= entry["memorization/l2_fraction"] <= 1 and entry["memorization/l2_ratio_min"] > 0
               for entry in curve)
    a = LatentConsistencyModelPipeline.from_pretrained(whole).unet.state_dict()
    b = LatentConsistencyModelPipeline.from_pretrained(parts).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    # The pairs were the teacher's own mix (its memorized_set.json), recorded again beside the student.
    assert json.loads((whole / "memorized_set.json").read_text())["sha256"] == \
        json.loads((sd_teacher["teacher"] / "memorized_set.json").read_text())["sha256"]


@pytest.mark.slow
def test_bad_input_is_named_before_anything_is_written(sd_teacher, tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler

    from conftest import tiny_unet
    from diffusers_memdistill.training import distill_lcm as script

    out = tmp_path / "out"

    def parse(*extra, teacher=None):
        return script.parse_args([str(a) for a in _args(sd_teacher, out, *extra, teacher=teacher)])

    with pytest.raises(SystemExit):
        parse("--w_min", 9, "--w_max", 3)
    assert "--w_min 9.0 must not exceed --w_max 3.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--lora_target_modules", "to_q")
    assert "--lora_target_modules applies to --use_lora" in capsys.readouterr().err
    pixel = tmp_path / "ddpm"
    DDPMPipeline(tiny_unet(), DDPMScheduler()).save_pretrained(pixel)
    with pytest.raises(ValueError, match="has no vae, text_encoder, tokenizer: fine-tuning needs a text-to-image"):
        script.main(parse(teacher=pixel))
    with pytest.raises(ValueError, match="--num_ddim_timesteps 30 must divide the teacher's 1000 training timesteps"):
        script.main(parse("--num_ddim_timesteps", 30))
    with pytest.raises(ValueError, match="LoRA target modules not_a_module are not in the UNet2DConditionModel"):
        script.main(parse("--use_lora", "--lora_rank", 2, "--lora_target_modules", "to_q,not_a_module"))
    bare = script.parse_args(["--pretrained_teacher_model", str(sd_teacher["base"]), "--output_dir", str(out),
                              "--max_train_steps", "1", "--resolution", "16", "--report_to", "none"])
    with pytest.raises(ValueError, match="records no training pairs .* pass --memorized_data"):
        script.main(bare)
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(sd_teacher, tmp_path):
    out = tmp_path / "ddp"
    result = launch_two_processes("distill_lcm", _args(sd_teacher, out, "--cpu", "--max_train_steps", 2,
                                                       "--checkpointing_steps", 2))
    assert "2 process(es)" in result.stdout + result.stderr
    assert json.loads((out / "training_config.json").read_text())["num_processes"] == 2
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_compile_covers_student_target_and_teacher_and_trains_as_eager(sd_teacher, tmp_path):
    """--compile wraps every network of the step (the student, its EMA target and the frozen teacher); one step ends
    where the eager step does, up to compiled-kernel rounding (AdamW's first step moves each weight by about lr)."""
    import torch._dynamo
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_script("distill_lcm", _args(sd_teacher, eager, "--max_train_steps", 1, "--checkpointing_steps", 1))
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    run_script("distill_lcm", _args(sd_teacher, compiled, "--max_train_steps", 1, "--checkpointing_steps", 1,
                                    "--compile"))
    assert counts["stats"]["unique_graphs"] >= 3  # student, target and teacher each traced
    a = LatentConsistencyModelPipeline.from_pretrained(eager).unet.state_dict()
    b = LatentConsistencyModelPipeline.from_pretrained(compiled).unet.state_dict()
    teacher = UNet2DConditionModel.from_pretrained(sd_teacher["base"], subfolder="unet").state_dict()
    moved = torch.cat([(a[k] - teacher[k]).abs().flatten() for k in teacher])
    differ = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (moved > 5e-4).float().mean() > 0.5  # the step moved most weights by about lr = 1e-3...
    assert (differ > 1e-4).float().mean() < 0.01  # ...and the compiled step the same way, but for rounding flips
    torch._dynamo.reset()
