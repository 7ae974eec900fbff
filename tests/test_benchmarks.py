"""The throughput benchmark runs the scripts' steps through the runner, and its FLOP accounting obeys the step
structure (no timing is asserted)."""

import importlib.util
import json

import pytest

from conftest import REPO


def test_throughput_benchmark_flop_accounting(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_throughput", REPO / "benchmarks" / "bench_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(bench.parse_args(["--quick", "--json", str(tmp_path / "r.json")]))
    teacher = results["teacher step (EDM loss)"]["gflop_per_sample"]  # through TrainingRunner
    # The runner runs the script's own step: the same FLOPs as that step in a bare loop and as the plain-diffusers
    # step on the same network; accumulation 4 x batch/4 does the same work per sample.
    assert results["teacher step (EDM loss), bare loop"]["gflop_per_sample"] == pytest.approx(teacher, rel=1e-9)
    assert results["teacher step, accumulation 4 x batch/4"]["gflop_per_sample"] == pytest.approx(teacher, rel=1e-3)
    assert results["baseline (diffusers UNet2DModel, eps MSE)"]["gflop_per_sample"] == pytest.approx(teacher, rel=1e-3)
    # A training step is forward + backward (3 forward passes); a CD step adds the target's forward and the
    # teacher's two Heun evaluations: 6 forward passes, twice a teacher step (to 0.1%: small matmuls outside the
    # UNet, such as the time embedding of per-sample sigmas, differ slightly).
    assert results["CD step (N=18, Heun teacher, l2)"]["gflop_per_sample"] == pytest.approx(2 * teacher, rel=1e-3)
    # A DMD iteration at ratio 5: every step a generator forward and the fake network's forward/backward (4
    # forwards), every fifth step the generator's forward/backward and a fake and a teacher forward (5 forwards).
    assert results["DMD step (ratio 5, one-step generator)"]["gflop_per_sample"] == pytest.approx(
        (4 + 5 / 5) / 3 * teacher, rel=1e-2)
    one = results["sampling, consistency student (1 step)"]["gflop_per_sample"]
    assert results["sampling, EDM teacher (18 Heun steps, 35 NFE)"]["gflop_per_sample"] == pytest.approx(35 * one, rel=1e-3)
    assert one == pytest.approx(teacher / 3, rel=1e-3)
    assert all(r["samples_per_s"] > 0 for r in results.values()) and len(results) == 8
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["derived"]) == {"runner_overhead", "accumulation_per_sample_ratio", "teacher_vs_baseline"}


def test_lcm_benchmark_counts_six_unet_passes_per_step(tmp_path):
    """Our side of benchmarks/bench_lcm.py --quick (diffusers' script is not part of the repository: its side is
    skipped with a note). The FLOPs counted through the real distill_lcm.py step equal the per-pass composition:
    the student's forward and backward, the teacher's cond and uncond branches (one fused batch) and the target's
    forward, about 6 UNet forwards, and no VAE or text encoder pass (the latents and embeddings are cached)."""
    spec = importlib.util.spec_from_file_location("bench_lcm", REPO / "benchmarks" / "bench_lcm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(bench.parse_args(["--quick", "--in_process", "--work_dir", str(tmp_path / "work"), "--json",
                                       str(tmp_path / "r.json"), "--diffusers_script", str(tmp_path / "absent.py")]))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert list(saved["results"]) == ["ours distill_lcm.py"] and "not found" in saved["notes"][0]
    row = saved["results"]["ours distill_lcm.py"]
    for key in ("steps_per_s", "samples_per_s", "seconds_per_step", "gflop_per_sample", "achieved_tflops",
                "share_of_peak"):
        assert row[key] > 0, key
    assert row["samples_per_s"] == pytest.approx(2 * row["steps_per_s"])  # batch 2
    composed = out["composed"]
    passes = composed["passes_gflop_per_sample"]
    assert row["gflop_per_sample"] == pytest.approx(composed["ours_gflop_per_sample"], rel=1e-9)
    assert composed["ours_gflop_per_sample"] == pytest.approx(6 * passes["unet_forward"], rel=0.02)
    assert composed["diffusers_gflop_per_sample"] == pytest.approx(
        composed["ours_gflop_per_sample"] + passes["vae_encode"] + passes["text_encode"], rel=1e-9)


@pytest.mark.slow
def test_audit_benchmark_runs_one_and_two_processes_with_equal_numbers(tmp_path):
    """benchmarks/bench_evaluate.py --quick: the whole audit on one process and on two (gloo), one thread each."""
    spec = importlib.util.spec_from_file_location("bench_evaluate", REPO / "benchmarks" / "bench_evaluate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(bench.parse_args(["--quick", "--json", str(tmp_path / "r.json")]))
    assert out["numbers_equal"] and out["numbers_compared"] > 50
    assert json.loads((tmp_path / "r.json").read_text())["speedup"] == out["speedup"]
    for run in ("one_process", "two_processes"):
        assert out[run]["processes"] == (1 if run == "one_process" else 2)
        assert out[run]["samples"] == 3 * 16 and out[run]["samples_per_second"] > 0
        assert {"sampling", "references", "run stages", "summary"} <= set(out[run]["phases_seconds"])
