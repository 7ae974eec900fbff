import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch_two_processes, run_script, run_without_package
from diffusers_memdistill.data import load_training_set
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.training.runner import load_checkpoint_weights
from diffusers_memdistill.training.utils import list_checkpoints, resolve_checkpoint

BASE = ["--dataset", "digits", "--resolution", "8", "--num_train_images", "30", "--model_preset", "tiny",
        "--train_batch_size", "8", "--report_to", "none", "--num_validation_images", "0"]


def weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_end_to_end_and_both_loading_paths(tmp_path):
    out = tmp_path / "teacher"
    run_script("train_edm_teacher", BASE + ["--max_train_steps", "6", "--checkpointing_steps", "3",
                                            "--class_conditional", "--num_validation_images", "4",
                                            "--validation_inference_steps", "3", "--output_dir", out])
    for name in ("model_index.json", "pipeline_edm.py", "training_set.json", "training_config.json",
                 "samples/step-0000003.png", "samples/step-0000006.png"):
        assert (out / name).exists(), name
    assert [step for step, _ in list_checkpoints(out)] == [3, 6]
    record = load_training_set(str(out))
    assert len(record) == 30 and record.labels is not None
    pipe = EDMPipeline.from_pretrained(out)
    assert pipe.unet.config.num_class_embeds == 10
    g = [torch.Generator().manual_seed(i) for i in range(2)]
    expected = pipe(batch_size=2, class_labels=[3, 4], generator=g, num_inference_steps=4, output_type="pt").images
    assert torch.isfinite(expected).all()
    run_without_package(f"""
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
g = [torch.Generator().manual_seed(i) for i in range(2)]
torch.save(pipe(batch_size=2, class_labels=[3, 4], generator=g, num_inference_steps=4, output_type="pt").images, "x.pt")
""", tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "x.pt", weights_only=True), expected)


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    # Dropout > 0 (global-RNG draws), warm-up, the old constant-decay EMA with warm-up. The resumed run starts from
    # the uninterrupted run's checkpoint-2 in a folder of its own.
    args = BASE + ["--checkpointing_steps", "2", "--lr_warmup_steps", "3", "--ema_decay", "0.99", "--ema_warmup",
                   "--dropout", "0.2", "--max_train_steps", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script("train_edm_teacher", args + ["--output_dir", straight])
    with pytest.raises(FileExistsError, match="already holds a finished model"):
        run_script("train_edm_teacher", args + ["--output_dir", straight])
    run_script("train_edm_teacher", args + ["--output_dir", resumed, "--resume_from_checkpoint",
                                            straight / "checkpoints" / "checkpoint-2"])
    a, b = weights(straight), weights(resumed)  # EMA weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raw_a = load_checkpoint_weights(str(straight / "checkpoints" / "checkpoint-4"))
    raw_b = load_checkpoint_weights(str(resumed / "checkpoints" / "checkpoint-4"))
    assert set(raw_a) == {"unet", "ema_unet"}
    assert all(torch.equal(raw_a[n][k], raw_b[n][k]) for n in raw_a for k in raw_a[n])
    config = json.loads((resumed / "training_config.json").read_text())
    assert config["averages"]["ema_unet"]["kind"] == "constant" and config["averages"]["ema_unet"]["warmup"]
    assert [e["start_step"] for e in config["run_history"]] == [0, 2]


def test_the_saved_ema_is_the_power_function_by_default(tmp_path):
    out = tmp_path / "run"
    run_script("train_edm_teacher", BASE + ["--max_train_steps", "4", "--checkpointing_steps", "4",
                                            "--gradient_checkpointing", "--output_dir", out])
    ema = json.loads((out / "training_config.json").read_text())["averages"]["ema_unet"]
    assert ema["kind"] == "power" and ema["sigma_rel"] == 0.05 and ema["gamma"] == pytest.approx(16.97, abs=0.01)
    assert ema["num_updates"] == 4 and ema["initial_weight"] == 0.0 and ema["averaging_length_steps"] > 0


def test_resume_refuses_another_configuration_and_ignores_half_written_checkpoints(tmp_path):
    out = tmp_path / "run"
    run_script("train_edm_teacher", BASE + ["--max_train_steps", "4", "--checkpointing_steps", "2",
                                            "--output_dir", out])
    # A run killed while writing leaves only a temporary folder, which `latest` never picks.
    half = out / "checkpoints" / ".tmp-checkpoint-6"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert resolve_checkpoint(str(out), "latest").endswith("checkpoint-4")
    with pytest.raises(ValueError, match="different configuration.*P_mean"):
        run_script("train_edm_teacher", BASE + ["--max_train_steps", "6", "--output_dir", out,
                                                "--resume_from_checkpoint", "latest", "--P_mean", "-1.0"])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run_script("train_edm_teacher", BASE + ["--max_train_steps", "6", "--output_dir", tmp_path / "new",
                                                "--resume_from_checkpoint", "latest"])
    # Another learning rate is what one tries after a divergence: allowed, and recorded.
    run_script("train_edm_teacher", BASE + ["--max_train_steps", "6", "--output_dir", out,
                                            "--resume_from_checkpoint", "latest", "--learning_rate", "1e-3"])
    assert not half.exists()  # the killed run's temporary folder is cleaned up
    history = json.loads((out / "run_history.json").read_text())
    assert history[-2]["changed"] == {"learning_rate": [2e-4, 1e-3], "max_train_steps": [4, 6]}


@pytest.mark.parametrize("extra, error, match", [
    (["--num_train_images", "5000"], ValueError, "larger than the dataset"),
    (["--dataset", "/nonexistent/folder"], FileNotFoundError, "does not exist"),
])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, extra, error, match):
    out = tmp_path / "run"
    with pytest.raises(error, match=match):
        run_script("train_edm_teacher", BASE + ["--max_train_steps", "2", "--output_dir", out] + extra)
    assert not (out / "model_index.json").exists() and not list_checkpoints(out)


def _launch(out, *extra):
    return launch_two_processes("train_edm_teacher", [*BASE, "--cpu", "--train_batch_size", "4",
                                                      "--checkpointing_steps", "2", "--dropout", "0.2",
                                                      "--output_dir", str(out), *extra])


@pytest.mark.slow
def test_two_processes_resume_exactly_with_dropout(tmp_path):
    # gloo DDP on 2 CPU processes: each rank draws its own dropout masks, and a run resumed from the uninterrupted
    # run's checkpoint-2 ends with its weights.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = _launch(straight, "--max_train_steps", "4")
    assert "2 process(es)" in result.stdout + result.stderr
    _launch(resumed, "--max_train_steps", "4", "--resume_from_checkpoint",
                         str(straight / "checkpoints" / "checkpoint-2"))
    for out, steps in ((straight, [2, 4]), (resumed, [4])):
        assert json.loads((out / "training_config.json").read_text())["num_processes"] == 2
        assert [s for s, _ in list_checkpoints(out)] == steps
        EDMPipeline.from_pretrained(out)
    a = load_checkpoint_weights(str(straight / "checkpoints" / "checkpoint-4"))
    b = load_checkpoint_weights(str(resumed / "checkpoints" / "checkpoint-4"))
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
    final_a, final_b = weights(straight), weights(resumed)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_push_to_hub_uploads_the_finished_folder_and_never_writes_the_token(tmp_path, monkeypatch):
    """--push_to_hub audits the finished model for memorization, then hands the folder and the audit's metrics.json
    to the one-commit upload (faked at the Hub boundary); the token is redacted from the saved config and reaches
    nothing on disk."""
    import diffusers_memdistill.hub as hub

    pushed = []

    def fake_push(model_dir, repo_id, *, token=None, private=False, metrics_path=None, unaudited=None, **kwargs):
        assert os.path.isfile(os.path.join(model_dir, "model_index.json"))  # only once everything is written
        assert os.path.isfile(metrics_path)  # the audit is written before the push
        card, _ = hub.render_model_card(model_dir, metrics_path=metrics_path)
        assert "| **this model (teacher)** | 16 |" in card.content  # the card carries the audit's rows
        pushed.append((str(model_dir), repo_id, token, private, metrics_path, unaudited))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(hub, "push_to_hub_folder", fake_push)
    out = tmp_path / "teacher"
    secret = "hf_ThisIsNotARealToken123"
    argv = BASE + ["--max_train_steps", "2", "--checkpointing_steps", "2", "--output_dir", out, "--push_to_hub",
                   "--hub_model_id", "someone/tiny-teacher", "--hub_token", secret, "--hub_private_repo",
                   "--push_audit_num_samples", "16"]
    monkeypatch.setattr(sys, "argv", ["train_edm_teacher.py"] + [str(a) for a in argv])  # the recorded command
    run_script("train_edm_teacher", argv)
    audit = tmp_path / "teacher-audit"  # beside the model: not uploaded with it
    assert pushed == [(str(out), "someone/tiny-teacher", secret, True, str(audit / "metrics.json"), None)]
    assert json.loads((audit / "metrics.json").read_text())["metrics"] == ["l2", "fd_pixel"]
    config = json.loads((out / "training_config.json").read_text())
    assert config["hub_token"] != secret and "--hub_token" in config["command"]
    for folder in (out, audit):
        for root, _, files in os.walk(folder):
            for name in files:
                assert secret.encode() not in open(os.path.join(root, name), "rb").read(), name


@pytest.mark.parametrize("extra, match", [
    (["--push_to_hub"], "needs --hub_model_id"),
    (["--push_to_hub", "--hub_model_id", "not a repo id", "--hub_token", "x"], "--hub_model_id"),
    (["--hub_model_id", "someone/model"], "used with --push_to_hub"),
])
def test_hub_flags_are_checked_before_training(tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as exc:
        run_script("train_edm_teacher", BASE + ["--max_train_steps", "2", "--output_dir", tmp_path / "run"] + extra)
    assert exc.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
