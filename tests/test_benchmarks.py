"""The throughput benchmark runs, and its FLOP accounting obeys the step structure (no timing is asserted)."""

import importlib.util

import pytest

from conftest import REPO


def test_throughput_benchmark_flop_accounting(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_throughput", REPO / "benchmarks" / "bench_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(bench.parse_args(["--quick", "--json", str(tmp_path / "r.json")]))
    teacher = results["teacher step (EDM loss)"]["gflop_per_sample"]
    # A training step is forward + backward (3 forward passes); a CD step adds the target's forward and the
    # teacher's two Heun evaluations: 6 forward passes, twice a teacher step (to 0.1%: small matmuls outside the
    # UNet, such as the time embedding of per-sample sigmas, differ slightly).
    assert results["CD step (N=18, Heun teacher, l2)"]["gflop_per_sample"] == pytest.approx(2 * teacher, rel=1e-3)
    assert results["baseline (diffusers UNet2DModel, eps MSE)"]["gflop_per_sample"] == pytest.approx(teacher, rel=1e-3)
    one = results["sampling, consistency student (1 step)"]["gflop_per_sample"]
    assert results["sampling, EDM teacher (18 Heun steps, 35 NFE)"]["gflop_per_sample"] == pytest.approx(35 * one, rel=1e-3)
    assert one == pytest.approx(teacher / 3, rel=1e-3)
    assert all(r["samples_per_s"] > 0 for r in results.values()) and (tmp_path / "r.json").is_file()
    assert len(results) == 5
