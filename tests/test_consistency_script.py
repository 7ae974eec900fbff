"""End to end: distil a tiny digits teacher with training_scripts/distill_consistency.py, reload, sample, resume."""

import json

import numpy as np
import pytest
import torch

from conftest import launch_two_processes, run_script, run_without_package
from diffusers_memdistill.losses import consistency as cd
from diffusers_memdistill.pipelines.pipeline_consistency import ConsistencyStudentPipeline
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.training.runner import load_checkpoint_weights, run_cli
from diffusers_memdistill.training.utils import list_checkpoints, resolve_checkpoint

pytestmark = pytest.mark.slow


def distill(argv):
    return run_script("distill_consistency", argv)


def _args(teacher_dir, out, *extra, teacher_flag="--pretrained_model_name_or_path"):
    return [teacher_flag, str(teacher_dir), "--output_dir", str(out), "--loss", "l2", "--train_batch_size", "4",
            "--report_to", "none", "--num_validation_images", "4", *extra]


@pytest.fixture(scope="module")
def student_dir(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    distill(_args(teacher_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    return out


def _samples(pipe, steps):
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    return pipe(batch_size=3, generator=generators, num_inference_steps=steps, output_type="np").images


def test_student_folder_reloads_and_samples(student_dir, teacher_dir, tmp_path):
    for name in ("model_index.json", "pipeline_consistency.py", "training_config.json",
                 "samples/step-0000002-1-step.png", "samples/step-0000002-2-step.png", "checkpoints/checkpoint-1"):
        assert (student_dir / name).exists(), name
    # The student carries the teacher's exact training-set record for evaluation.
    assert json.loads((student_dir / "training_set.json").read_text()) == json.loads(
        (teacher_dir / "training_set.json").read_text())
    config = json.loads((student_dir / "training_config.json").read_text())
    assert config["pretrained_model_name_or_path"] == config["teacher"] == str(teacher_dir)
    assert config["num_scales"] == 18
    assert config["optimizer"] == "radam" and len(config["teacher_sha256"]) == 64
    # The saved EMA is the power function by default; the target network is the mu-EMA of the student.
    assert config["averages"]["ema_unet"]["kind"] == "power" and config["averages"]["ema_unet"]["num_updates"] == 2
    assert config["averages"]["target_unet"] == {**config["averages"]["target_unet"], "kind": "constant",
                                                 "decay": 0.95}

    pipe = ConsistencyStudentPipeline.from_pretrained(student_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.sigma_min == 0.002 and pipe.scheduler.config.parameterization == "consistency"
    # The saved weights are the evaluation EMA of the last checkpoint.
    saved = load_checkpoint_weights(str(student_dir / "checkpoints" / "checkpoint-2"))
    ema, online = saved["ema_unet"], saved["unet"]
    assert all(torch.equal(v, ema[k]) for k, v in pipe.unet.state_dict().items())
    assert not all(torch.equal(v, online[k]) for k, v in pipe.unet.state_dict().items())
    one, two = _samples(pipe, 1), _samples(pipe, 2)
    assert one.shape == two.shape == (3, 8, 8, 1) and np.isfinite(one).all() and not np.allclose(one, two)
    with pytest.raises(ValueError, match="holds a ConsistencyStudentPipeline, not a EDMPipeline"):
        EDMPipeline.from_pretrained(student_dir)

    # Without the package: the single-file pipeline shipped in the folder.
    np.save(tmp_path / "expected.npy", np.stack([one, two]))
    result = run_without_package(f"""
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(student_dir)!r}, trust_remote_code=True)
assert type(pipe).__name__ == "ConsistencyStudentPipeline", type(pipe)
assert type(pipe.scheduler).__name__ == "ConsistencyStudentScheduler", type(pipe.scheduler)
pipe.set_progress_bar_config(disable=True)
out = []
for steps in (1, 2):
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    out.append(pipe(batch_size=3, generator=generators, num_inference_steps=steps, output_type="np").images)
expected = np.load({str(tmp_path / "expected.npy")!r})
assert np.allclose(np.stack(out), expected, atol=1e-6), abs(np.stack(out) - expected).max()
print("OK")
""", tmp_path)
    assert "OK" in result.stdout


def test_resume_reproduces_an_uninterrupted_run(teacher_dir, student_dir, tmp_path):
    first = _args(teacher_dir, tmp_path, "--max_train_steps", "1", "--checkpointing_steps", "1",
                  teacher_flag="--teacher")  # the old flag name still works
    first[first.index("--num_validation_images") + 1] = "0"
    distill(first)
    with pytest.raises(FileExistsError, match="resume_from_checkpoint"):
        distill(_args(teacher_dir, tmp_path, "--max_train_steps", "2"))
    with pytest.raises(ValueError, match="different configuration.*target_ema"):
        distill(_args(teacher_dir, tmp_path, "--max_train_steps", "2", "--target_ema", "0.9",
                      "--resume_from_checkpoint", "latest"))
    distill(_args(teacher_dir, tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "1",
                  "--resume_from_checkpoint", "latest"))
    resumed = load_checkpoint_weights(str(tmp_path / "checkpoints" / "checkpoint-2"))
    straight = load_checkpoint_weights(str(student_dir / "checkpoints" / "checkpoint-2"))
    assert set(resumed) == {"unet", "target_unet", "ema_unet"}
    for name in resumed:
        assert all(torch.equal(v, straight[name][k]) for k, v in resumed[name].items()), name


def test_bad_teacher_folders_are_refused(teacher_dir, student_dir, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an EDM teacher pipeline folder: it has no model_index.json"):
        distill(_args(tmp_path / "empty", out, "--max_train_steps", "1"))
    with pytest.raises(ValueError, match="not an EDM teacher pipeline folder: it holds a ConsistencyStudentPipeline"):
        distill(_args(student_dir, out, "--max_train_steps", "1"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        distill(_args(tmp_path / "missing", out, "--max_train_steps", "1"))
    assert not out.exists()  # nothing written for a refused teacher


def test_lpips_without_weights_stops_before_training(teacher_dir, tmp_path, monkeypatch):
    def offline(name):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(cd, "_default_lpips_factory", offline)
    out = tmp_path / "out"
    args = _args(teacher_dir, out, "--max_train_steps", "1")
    args[args.index("l2")] = "lpips"
    with pytest.raises(cd.LPIPSUnavailableError, match="vgg16-397923af.pth.*--loss l2"):
        distill(args)
    assert not out.exists()


def test_divergence_stops_and_keeps_the_last_good_checkpoint(teacher_dir, tmp_path, capsys):
    # Warm-up: step 1 runs at learning rate 0 (checkpoint-1 is good), step 2 at 3e29 blows the student up.
    args = _args(teacher_dir, tmp_path, "--max_train_steps", "3", "--checkpointing_steps", "1",
                 "--learning_rate", "1e30", "--lr_warmup_steps", "3")
    args[args.index("--num_validation_images") + 1] = "0"
    assert run_cli(lambda a: distill(args), lambda argv: None) == 1  # the script's exit status, no traceback
    message = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert message.startswith("error: ") and "diverged" in message, message
    good = tmp_path / "checkpoints" / "checkpoint-1"
    assert f"the last good checkpoint is {good}" in message
    assert resolve_checkpoint(str(tmp_path), "latest") == str(good)
    weights = load_checkpoint_weights(str(good))
    assert all(bool(torch.isfinite(v).all()) for state in weights.values() for v in state.values())
    assert not (tmp_path / "model_index.json").exists()


def test_two_processes_under_accelerate_launch(teacher_dir, tmp_path):
    out = tmp_path / "ddp"
    result = launch_two_processes("distill_consistency", _args(teacher_dir, out, "--cpu", "--max_train_steps", "2",
                                                               "--checkpointing_steps", "1"))
    assert "2 process(es)" in result.stdout + result.stderr
    assert json.loads((out / "training_config.json").read_text())["num_processes"] == 2
    assert [step for step, _ in list_checkpoints(out)] == [1, 2]
    ConsistencyStudentPipeline.from_pretrained(out)
