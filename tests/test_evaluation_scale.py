"""The audit at scale: split over two processes (gloo) it gives the numbers of one process, an audit killed mid-run
continues from its shards (here on two processes) to the numbers of an uninterrupted one, and another audit's folder
is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import save_teacher_and_student, write_pairs
from diffusers_memdistill.evaluation import compare_results, evaluate

# One thread per process in every run, so that the float sums of the networks are the same in every process.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def pixel_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_teacher_and_student(root)
    return root


def _evaluate_command(processes: int, argv: list) -> list:
    if processes == 1:
        return [sys.executable, "-m", "diffusers_memdistill.cli", "evaluate", *argv]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "diffusers_memdistill.cli", "evaluate", *argv]


def _run(processes: int, argv: list, cwd) -> dict:
    result = subprocess.run(_evaluate_command(processes, [str(a) for a in argv]), capture_output=True, text=True,
                            timeout=400, env=ENV, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    out = Path(str(argv[argv.index("--output_dir") + 1]))
    return json.loads((out / "metrics.json").read_text())


def _assert_equal_numbers(a: dict, b: dict):
    # Counts and memorized fractions exactly, every other statistic within 1e-9 (relative); the comparison is exact.
    equal, differences = compare_results(a, b, rtol=1e-9)
    assert differences == [] and equal > 40
    for name, m in a["models"].items():
        assert m["l2"]["num_memorized"] == b["models"][name]["l2"]["num_memorized"]
        assert m["l2"]["fraction_memorized"] == b["models"][name]["l2"]["fraction_memorized"]


def _pixel_argv(pixel_models, cache) -> list:
    # 9 shards of 2 samples per row: enough to kill an audit between two of them.
    return ["--model", pixel_models / "teacher", "--model", pixel_models / "student", "--num_samples", 18,
            "--shard_size", 2, "--batch_size", 2, "--student_steps", "1,2", "--metrics", "l2,fd_pixel,pairing",
            "--device", "cpu", "--cache_dir", cache]


@pytest.fixture(scope="module")
def one_process_audit(pixel_models, tmp_path_factory):
    """The pixel audit on one process, uninterrupted: what the other runs must equal."""
    root = tmp_path_factory.mktemp("one")
    return _run(1, _pixel_argv(pixel_models, root / "cache") + ["--output_dir", root / "audit"], root)


def _writer(path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["process"])


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one_text_to_image(tmp_path):
    from diffusers_memdistill.models.tiny_sd import save_tiny_sd_pipeline

    model = save_tiny_sd_pipeline(str(tmp_path / "sd"), resolution=16)
    pairs = write_pairs(tmp_path / "pairs", 6, "a photo number", 0)
    argv = ["--model", model, "--train_data", pairs, "--metrics", "l2", "--samples_per_prompt", 2,
            "--num_inference_steps", 2, "--guidance_scale", 2, "--shard_size", 3, "--device", "cpu",
            "--cache_dir", tmp_path / "cache"]
    one = _run(1, argv + ["--output_dir", tmp_path / "one"], tmp_path)
    two = _run(2, argv + ["--output_dir", tmp_path / "two"], tmp_path)
    assert one["task"] == "text-to-image" and len(one["models"]["sd"]["prompts"]) == 6
    _assert_equal_numbers(one, two)
    assert one["models"]["sd"]["l2_own"] == two["models"]["sd"]["l2_own"]


@pytest.mark.slow
def test_an_audit_killed_mid_run_continues_on_two_processes_to_the_numbers_of_one(pixel_models, one_process_audit,
                                                                                  tmp_path):
    """Killed (SIGKILL) after a few shards on one process, the same audit continued under accelerate launch with two
    processes keeps those shards, samples the others shard k on process k mod 2, and ends with the numbers of the
    uninterrupted one-process audit."""
    out = tmp_path / "killed"
    argv = [str(a) for a in _pixel_argv(pixel_models, tmp_path / "cache") + ["--output_dir", out]]
    process = subprocess.Popen(_evaluate_command(1, argv), env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    teacher_shards = out / "samples" / "teacher"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if teacher_shards.is_dir() and len([f for f in os.listdir(teacher_shards) if f.endswith(".safetensors")]) >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the audit ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "metrics.json").exists()
    kept = {f: os.stat(teacher_shards / f).st_mtime_ns for f in os.listdir(teacher_shards)
            if f.endswith(".safetensors")}
    assert 3 <= len(kept) < 9
    resumed = _run(2, argv, tmp_path)
    assert set(resumed["models"]) == {"teacher", "student (1-step)", "student (2-step)"} and resumed["floor"]
    _assert_equal_numbers(one_process_audit, resumed)
    # The shards already written are kept, not sampled again; the others were sampled by process k mod 2; no
    # temporary file of the write the kill interrupted is left.
    assert all(os.stat(teacher_shards / f).st_mtime_ns == t for f, t in kept.items())
    shards = [f"shard-{k:05d}.safetensors" for k in range(9)]
    assert sorted(os.listdir(teacher_shards)) == shards
    assert [_writer(teacher_shards / f) for f in shards if f not in kept] == [
        k % 2 for k, f in enumerate(shards) if f not in kept]
    student = out / "samples" / "student__2-step"
    assert [_writer(student / f) for f in shards] == [k % 2 for k in range(9)]


def test_an_audit_of_other_models_data_or_flags_is_refused(pixel_models, tmp_path):
    common = dict(num_samples=4, metrics=("l2",), device="cpu", floor=False, cache_dir=str(tmp_path / "cache"),
                  progress=False)
    out = str(tmp_path / "audit")
    first = evaluate([str(pixel_models / "teacher")], out, seed=0, **common)
    # The same command again: everything is on disk, the numbers are those of the first run.
    again = evaluate([str(pixel_models / "teacher")], out, seed=0, **common)
    assert compare_results(first, again)[1] == []
    with pytest.raises(ValueError, match=r"holds an audit of other models, data or flags \(seed: 0 on disk, 1 now"):
        evaluate([str(pixel_models / "teacher")], out, seed=1, **common)
    with pytest.raises(ValueError, match=r"models"):
        evaluate([str(pixel_models / "student")], out, seed=0, **common)
    with pytest.raises(ValueError, match=r"settings.metrics"):
        evaluate([str(pixel_models / "teacher")], out, seed=0, **{**common, "metrics": ("l2", "fd_pixel")})


def test_an_audit_never_writes_into_a_saved_model_or_over_a_file(pixel_models, tmp_path):
    teacher = str(pixel_models / "teacher")
    with pytest.raises(ValueError, match="is a saved model; audit into a folder of its own"):
        evaluate([teacher], teacher, num_samples=4, metrics=("l2",), device="cpu", progress=False)
    assert not (pixel_models / "teacher" / "samples").exists()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match="is a file"):
        evaluate([teacher], str(tmp_path / "file"), num_samples=4, metrics=("l2",), device="cpu", progress=False)
