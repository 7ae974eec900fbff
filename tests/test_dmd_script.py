"""End to end: distil a tiny digits teacher with training_scripts/distill_dmd.py; the two time-scale rule in the
optimizers' step counts, reloading through both paths, DMD2's options, resume, bad input, two processes."""

import json

import numpy as np
import pytest
import torch

from conftest import launch_two_processes, run_script, run_without_package
from diffusers_memdistill.pipelines.pipeline_dmd import DMDGeneratorPipeline
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.registry import load_pipeline
from diffusers_memdistill.training.dmd import is_generator_update
from diffusers_memdistill.training.runner import load_checkpoint_weights, run_cli
from diffusers_memdistill.training.utils import list_checkpoints, resolve_checkpoint

pytestmark = pytest.mark.slow


def distill(argv):
    return run_script("distill_dmd", argv)


def _args(teacher_dir, out, *extra):
    return ["--pretrained_model_name_or_path", str(teacher_dir), "--output_dir", str(out), "--train_batch_size", "4",
            "--report_to", "none", "--num_validation_images", "2", "--learning_rate", "1e-3", "--lr_warmup_steps",
            "0", *extra]


@pytest.fixture(scope="module")
def generator_dir(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dmd")
    distill(_args(teacher_dir, out, "--max_train_steps", "6", "--checkpointing_steps", "3",
                  "--fake_updates_per_generator_update", "2"))
    return out


def _optimizer_steps(checkpoint):
    """The AdamW step count of each optimizer in an accelerate checkpoint (prepared order: fake, generator)."""
    steps = []
    for name in ("optimizer.bin", "optimizer_1.bin"):
        state = torch.load(checkpoint / name, map_location="cpu", weights_only=True)["state"]
        counts = {int(s["step"]) for s in state.values()}
        assert len(counts) == 1
        steps.append(counts.pop())
    return steps


def test_two_fake_updates_per_generator_update(generator_dir):
    config = json.loads((generator_dir / "training_config.json").read_text())
    expected = sum(is_generator_update(s, 2) for s in range(6))
    assert expected == 3
    assert config["optimizer_updates"] == {"fake_score": 6, "generator": 3}
    # After 3 steps: fake updated at steps 0, 1, 2, the generator at step 1 (after two fake updates).
    assert _optimizer_steps(generator_dir / "checkpoints" / "checkpoint-3") == [3, 1]
    assert _optimizer_steps(generator_dir / "checkpoints" / "checkpoint-6") == [6, 3]
    assert config["adam_weight_decay"] == 0.01 and config["fake_updates_per_generator_update"] == 2
    assert config["generator_sigmas"] == [80.0] and len(config["teacher_sha256"]) == 64


def test_generator_folder_reloads_through_both_paths(generator_dir, teacher_dir, tmp_path):
    assert (generator_dir / "samples" / "step-0000006-1-step.png").exists()
    assert json.loads((generator_dir / "training_set.json").read_text()) == json.loads(
        (teacher_dir / "training_set.json").read_text())
    pipe = DMDGeneratorPipeline.from_pretrained(generator_dir)
    pipe.set_progress_bar_config(disable=True)
    saved = load_checkpoint_weights(str(generator_dir / "checkpoints" / "checkpoint-6"))
    assert set(saved) == {"generator", "fake_score", "ema_generator"}
    assert all(torch.equal(v, saved["ema_generator"][k]) for k, v in pipe.unet.state_dict().items())
    # Both networks moved away from the teacher, the generator through the fake/real difference.
    teacher_state = EDMPipeline.from_pretrained(teacher_dir).unet.state_dict()
    assert not all(torch.equal(v, teacher_state[k]) for k, v in saved["generator"].items())
    assert not all(torch.equal(v, teacher_state[k.removeprefix("unet.")])
                   for k, v in saved["fake_score"].items())
    images = pipe(batch_size=3, generator=[torch.Generator().manual_seed(i) for i in range(3)],
                  output_type="np").images
    assert images.shape == (3, 8, 8, 1) and np.isfinite(images).all()
    assert load_pipeline(str(generator_dir))[1].kind == "generator"
    code = f"""
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(generator_dir)!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
x = pipe(batch_size=3, generator=[torch.Generator().manual_seed(i) for i in range(3)], output_type="np").images
np.save({str(tmp_path / "plain.npy")!r}, x)
"""
    result = run_without_package(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "plain.npy"), images)


def test_dmd2_options_gan_regression_and_two_steps(teacher_dir, tmp_path):
    out = tmp_path / "dmd2"
    distill(_args(teacher_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                  "--fake_updates_per_generator_update", "1", "--use_gan", "--regression_weight", "0.25",
                  "--regression_pairs", "8", "--regression_ode_steps", "2", "--generator_sigmas", "80,1.5"))
    config = json.loads((out / "training_config.json").read_text())
    assert config["optimizer_updates"] == {"fake_score": 2, "generator": 2} and config["use_gan"]
    first = load_checkpoint_weights(str(out / "checkpoints" / "checkpoint-1"))["fake_score"]
    second = load_checkpoint_weights(str(out / "checkpoints" / "checkpoint-2"))["fake_score"]
    head = [k for k in second if k.startswith("head.")]
    assert head and any(not torch.equal(first[k], second[k]) for k in head)  # the discriminator is trained
    pipe = DMDGeneratorPipeline.from_pretrained(out)
    assert pipe.scheduler.config.generator_sigmas == [80.0, 1.5] and pipe.scheduler.config.num_inference_steps == 2
    assert "unet" in pipe.components and "head" not in json.loads((out / "model_index.json").read_text())


def test_resume_reproduces_an_uninterrupted_run(teacher_dir, generator_dir, tmp_path):
    common = ("--checkpointing_steps", "3", "--fake_updates_per_generator_update", "2")
    distill(_args(teacher_dir, tmp_path, "--max_train_steps", "3", *common))
    with pytest.raises(ValueError, match="different configuration.*fake_updates_per_generator_update"):
        distill(_args(teacher_dir, tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "3",
                      "--fake_updates_per_generator_update", "3", "--resume_from_checkpoint", "latest"))
    distill(_args(teacher_dir, tmp_path, "--max_train_steps", "6", *common, "--resume_from_checkpoint", "latest"))
    resumed = load_checkpoint_weights(str(tmp_path / "checkpoints" / "checkpoint-6"))
    straight = load_checkpoint_weights(str(generator_dir / "checkpoints" / "checkpoint-6"))
    for name in resumed:
        assert all(torch.equal(v, straight[name][k]) for k, v in resumed[name].items()), name
    assert _optimizer_steps(tmp_path / "checkpoints" / "checkpoint-6") == [6, 3]


def test_bad_input_is_refused_before_anything_is_written(teacher_dir, generator_dir, tmp_path, capsys):
    out = tmp_path / "out"
    for flags, message in ((["--fake_updates_per_generator_update", "0"], "integer >= 1"),
                           (["--max_step_percent", "1.5"], "min < max <= 1")):
        with pytest.raises(SystemExit):
            distill(_args(teacher_dir, out, "--max_train_steps", "1", *flags))
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="--real_guidance_scale needs --unconditional_label"):
        distill(_args(teacher_dir, out, "--max_train_steps", "1", "--real_guidance_scale", "1.75"))
    with pytest.raises(ValueError, match="--generator_timesteps, --fake_lora_rank: for Stable Diffusion teachers only"):
        distill(_args(teacher_dir, out, "--max_train_steps", "1", "--generator_timesteps", "999", "--fake_lora_rank",
                      "4"))
    with pytest.raises(ValueError, match=r"must be a non-empty part of the teacher's \[0.002, 80.0\]"):
        distill(_args(teacher_dir, out, "--max_train_steps", "1", "--sigma_max", "200"))
    with pytest.raises(ValueError, match="must lie in the sigma range"):
        distill(_args(teacher_dir, out, "--max_train_steps", "1", "--generator_sigmas", "100"))
    with pytest.raises(ValueError, match="not an EDM teacher pipeline folder: it holds a DMDGeneratorPipeline"):
        distill(_args(generator_dir, out, "--max_train_steps", "1"))
    with pytest.raises(ValueError, match="--unconditional_label 3 is not a class of the teacher"):
        distill(_args(teacher_dir, out, "--max_train_steps", "1", "--unconditional_label", "3",
                      "--real_guidance_scale", "2"))
    assert not out.exists()


def test_divergence_stops_and_keeps_the_last_good_checkpoint(teacher_dir, tmp_path, capsys):
    # Step 1 runs at learning rate 0 (warm-up), then the fake denoiser blows up at 1e30.
    args = _args(teacher_dir, tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "1",
                 "--fake_updates_per_generator_update", "1", "--num_validation_images", "0")
    args[args.index("--learning_rate") + 1] = "1e30"
    args[args.index("--lr_warmup_steps") + 1] = "4"
    assert run_cli(lambda a: distill(args), lambda argv: None) == 1
    message = capsys.readouterr().err.splitlines()[-1]
    assert message.startswith("error: ") and "diverged" in message, message
    assert resolve_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoints" / "checkpoint-1")
    assert not (tmp_path / "model_index.json").exists()


def test_two_processes_under_accelerate_launch(teacher_dir, tmp_path):
    out = tmp_path / "ddp"
    result = launch_two_processes("distill_dmd", _args(teacher_dir, out, "--cpu", "--max_train_steps", "2",
                                                       "--checkpointing_steps", "1",
                                                       "--fake_updates_per_generator_update", "1", "--use_gan"))
    assert "2 process(es)" in result.stdout + result.stderr
    config = json.loads((out / "training_config.json").read_text())
    assert config["num_processes"] == 2 and config["optimizer_updates"] == {"fake_score": 2, "generator": 2}
    assert [step for step, _ in list_checkpoints(out)] == [1, 2]
    DMDGeneratorPipeline.from_pretrained(out)
