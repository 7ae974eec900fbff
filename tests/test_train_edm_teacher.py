import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_script, run_without_package
from diffusers_memdistill.data import load_training_set
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
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
    args = BASE + ["--checkpointing_steps", "4", "--lr_warmup_steps", "3", "--ema_warmup"]
    run_script("train_edm_teacher", args + ["--max_train_steps", "10", "--output_dir", tmp_path / "straight"])
    run_script("train_edm_teacher", args + ["--max_train_steps", "5", "--output_dir", tmp_path / "resumed"])
    with pytest.raises(FileExistsError, match="already holds a finished model"):
        run_script("train_edm_teacher", args + ["--max_train_steps", "10", "--output_dir", tmp_path / "resumed"])
    run_script("train_edm_teacher", args + ["--max_train_steps", "10", "--output_dir", tmp_path / "resumed",
                                            "--resume_from_checkpoint", "latest"])
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")  # EMA weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raw_a = load_file(tmp_path / "straight/checkpoints/checkpoint-10/unet.safetensors")
    raw_b = load_file(tmp_path / "resumed/checkpoints/checkpoint-10/unet.safetensors")
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)


def test_resume_refuses_another_configuration_and_ignores_half_written_checkpoints(tmp_path):
    out = tmp_path / "run"
    run_script("train_edm_teacher", BASE + ["--max_train_steps", "4", "--checkpointing_steps", "2",
                                            "--output_dir", out])
    # A run killed while writing leaves only a temporary folder, which `latest` never picks.
    half = out / "checkpoints" / ".tmp-checkpoint-6-123-456"
    half.mkdir()
    (half / "unet.safetensors").write_bytes(b"partial")
    assert resolve_checkpoint(str(out), "latest").endswith("checkpoint-4")
    with pytest.raises(ValueError, match="different configuration.*learning_rate"):
        run_script("train_edm_teacher", BASE + ["--max_train_steps", "6", "--output_dir", out,
                                                "--resume_from_checkpoint", "latest", "--learning_rate", "1e-3"])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run_script("train_edm_teacher", BASE + ["--max_train_steps", "6", "--output_dir", tmp_path / "new",
                                                "--resume_from_checkpoint", "latest"])


@pytest.mark.parametrize("extra, error, match", [
    (["--resolution", "7"], ValueError, "multiple of 2"),
    (["--num_train_images", "5000"], ValueError, "larger than the dataset"),
    (["--dataset", "/nonexistent/folder"], FileNotFoundError, "does not exist"),
])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, extra, error, match):
    out = tmp_path / "run"
    with pytest.raises(error, match=match):
        run_script("train_edm_teacher", BASE + ["--max_train_steps", "2", "--output_dir", out] + extra)
    assert not (out / "model_index.json").exists() and not list_checkpoints(out)


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "training_scripts" / "train_edm_teacher.py"),
           *BASE, "--cpu", "--train_batch_size", "4", "--max_train_steps", "4", "--checkpointing_steps", "2",
           "--output_dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es)" in result.stdout + result.stderr
    config = json.loads((out / "training_config.json").read_text())
    assert config["num_processes"] == 2
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    EDMPipeline.from_pretrained(out)
