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
