"""Samples per second through the whole audit (`memdistill evaluate`), on one process and on two, one thread each, in
one command; where the time goes (sampling, feature extraction, search, references, summary); and what the cache of
the training set's features saves a second audit.

    python benchmarks/bench_evaluate.py --json /tmp/bench_evaluate.json          # 2,048 samples per model
    python benchmarks/bench_evaluate.py --quick                                  # 16 samples (the test suite)

The audited models are seeded tiny networks of the test suite's size (1×8×8 digits): an EDM teacher sampled with 4
Heun steps (7 network evaluations) and a consistency student at 1 and 2 steps, 3 rows, with the teacher's Φ_8 pairing
targets, against 200 training digits and as many held-out ones as samples (the floor). Measures: L2 ratio, pixel FD,
pairing and SSCD with a stand-in extractor (a seeded random 3-layer convolutional network on the 288×288 SSCD
preprocessing, 512-d output: the shape of SSCD's work without its weights) or, with ``--sscd_onnx FILE``, the real
int8 SSCD. Each configuration runs as its own command (``python`` for one process, ``accelerate launch
--num_processes 2`` for two, ``OMP_NUM_THREADS=1`` for both) into a fresh folder with a fresh feature cache; the
third run repeats the one-process audit into a new folder with the cache of the first, warm. An untimed audit of 8
samples runs first (the libraries are then read from the disk cache in every timed run). The phases come from the
audit's own ``timings/process-<i>.json`` (the slowest process per phase); the rest of the wall time is the start of
the processes (importing torch and diffusers) and loading the models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=2048, help="samples per model row")
    parser.add_argument("--shard_size", type=int, default=128)
    parser.add_argument("--quick", action="store_true",
                        help="16 samples, shards of 8, no SSCD stand-in, no second audit, no measurement of the "
                             "machine's ceiling (for a test)")
    parser.add_argument("--sscd_onnx", default=None, help="the int8 SSCD ONNX model instead of the stand-in")
    parser.add_argument("--work_dir", default=None, help="where the models and audits go (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_ceiling", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.shard_size = 16, 8
    return args


class StandIn(object):
    """A seeded random convolutional network in SSCD's place (preprocessing ``sscd``: 288×288, 512-d)."""

    @staticmethod
    def extractor():
        import torch

        from diffusers_memdistill.metrics import SSCDFeatureExtractor

        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(256, 512)).eval()
        return SSCDFeatureExtractor(net, preprocessing="sscd", device="cpu", batch_size=64)


def make_models(root: str) -> list:
    import torch

    from diffusers_memdistill.data import build_training_set
    from diffusers_memdistill.models.presets import build_unet
    from diffusers_memdistill.pipelines.pipeline_consistency import ConsistencyStudentPipeline
    from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
    from diffusers_memdistill.schedulers.scheduling_consistency import ConsistencyStudentScheduler
    from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler

    training_set = build_training_set("digits", 8, num_train_images=200)
    torch.manual_seed(0)
    EDMPipeline(build_unet("tiny", 8, 1, 0), EDMHeunScheduler(num_inference_steps=4)).save_pretrained(
        os.path.join(root, "teacher"))
    torch.manual_seed(1)
    ConsistencyStudentPipeline(build_unet("tiny", 8, 1, 0), ConsistencyStudentScheduler()).save_pretrained(
        os.path.join(root, "student"))
    for name in ("teacher", "student"):
        training_set.save(os.path.join(root, name))
    return [os.path.join(root, "teacher"), os.path.join(root, "student")]


def worker(args) -> None:
    """One audit (run on every process of the launch)."""
    from diffusers_memdistill.evaluation import evaluate

    root = os.path.dirname(args._worker)
    models = [os.path.join(root, "models", "teacher"), os.path.join(root, "models", "student")]
    # --quick (the test suite) measures without SSCD: no feature network, the pipeline's stages all the same.
    extractors = None if args.sscd_onnx or args.quick else {"sscd": {"sscd": StandIn.extractor()}}
    metrics = ("l2", "fd_pixel", "pairing") + (() if args.quick else ("sscd",))
    evaluate(models, args._worker, num_samples=args.num_samples, metrics=metrics,
             student_steps=(1, 2), device="cpu", shard_size=args.shard_size, batch_size=args.shard_size,
             cache_dir=args._cache, sscd_onnx=args.sscd_onnx, extractors=extractors, progress=False)


def ceiling_worker(num_images: int) -> None:
    """Seconds of one feature-extraction workload (the stand-in on ``num_images`` images), one thread."""
    import torch

    torch.set_num_threads(1)
    extractor = StandIn.extractor()
    images = torch.rand(num_images, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    extractor(images[:8])
    start = time.perf_counter()
    extractor(images)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def machine_ceiling(num_images: int) -> dict:
    """What this machine gives two processes: the same workload alone, then two copies at once. Two copies taking
    longer each than one alone means two cores do not deliver twice the work (shared caches, memory bandwidth,
    SMT siblings): ``ceiling = 2 · alone / together`` is the speedup two processes can reach at best."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_ceiling", str(num_images)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    read = lambda p: json.loads(p.communicate()[0].strip().splitlines()[-1])["seconds"]  # noqa: E731
    alone = read(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
    pair = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    together = max(read(p) for p in pair)
    return {"alone_seconds": alone, "two_at_once_seconds": together, "ceiling": 2 * alone / together}


def run_audit(args, root: str, name: str, processes: int, cache: str) -> dict:
    out = os.path.join(root, name)
    script = [os.path.abspath(__file__), "--_worker", out, "--_cache", cache, "--num_samples", str(args.num_samples),
              "--shard_size", str(args.shard_size)] + (["--sscd_onnx", args.sscd_onnx] if args.sscd_onnx else []) \
        + (["--quick"] if args.quick else [])
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    phases: dict = {}
    for f in os.listdir(os.path.join(out, "timings")):
        with open(os.path.join(out, "timings", f)) as fh:
            for phase, seconds in json.load(fh)["seconds"].items():
                phases[phase] = max(phases.get(phase, 0.0), seconds)
    with open(os.path.join(out, "metrics.json")) as fh:
        results = json.load(fh)
    rows = len(results["models"])
    samples = rows * results["num_samples"]
    return {"processes": processes, "wall_seconds": wall, "samples": samples, "samples_per_second": samples / wall,
            "phases_seconds": phases, "phase_shares": {k: v / wall for k, v in phases.items()}, "metrics": results}


def main(args) -> dict:
    if args._worker:
        worker(args)
        return {}
    if args._ceiling:
        ceiling_worker(args._ceiling)
        return {}
    tmp = None
    root = args.work_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_evaluate-")
        root = tmp.name
    try:
        make_models(os.path.join(root, "models"))
        if not args.quick:  # an untimed audit of a few samples: the libraries are read from disk before any timing
            run_audit(argparse.Namespace(**{**vars(args), "num_samples": 8, "shard_size": 8}), root, "warm-up", 1,
                      os.path.join(root, "cache-warm-up"))
        one = run_audit(args, root, "one", 1, os.path.join(root, "cache-one"))
        two = run_audit(args, root, "two", 2, os.path.join(root, "cache-two"))
        # --quick (the test suite) leaves out the second audit; tests/test_evaluation_references.py checks the cache.
        warm = None if args.quick else run_audit(args, root, "one-warm-cache", 1, os.path.join(root, "cache-one"))
        ceiling = None if args.quick else machine_ceiling(512)  # --quick checks the audits, not the machine
    finally:
        if tmp is not None:
            tmp.cleanup()
    from diffusers_memdistill.evaluation import compare_results

    equal, differences = compare_results(one.pop("metrics"), two.pop("metrics"), rtol=1e-9)
    if warm is not None:
        warm.pop("metrics")
    out = {"num_samples_per_row": args.num_samples, "shard_size": args.shard_size,
           "sscd": "onnx int8" if args.sscd_onnx else "stand-in", "one_process": one, "two_processes": two,
           "speedup": one["wall_seconds"] / two["wall_seconds"], "second_audit_warm_cache": warm,
           "references_seconds_cold": one["phases_seconds"].get("references"),
           "references_seconds_warm": None if warm is None else warm["phases_seconds"].get("references"),
           "numbers_equal": not differences, "numbers_compared": equal, "cpu_count": os.cpu_count(),
           "machine": ceiling}
    for label, r in (("1 process ", one), ("2 processes", two), ("1 process, warm cache", warm)):
        if r is None:
            continue
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(r["phase_shares"].items()))
        print(f"{label}: {r['samples']} samples in {r['wall_seconds']:.1f} s = {r['samples_per_second']:.1f} "
              f"samples/s ({shares})")
    print(f"speedup of 2 processes: {out['speedup']:.2f}x; numbers equal to one process: {out['numbers_equal']} "
          f"({equal} compared); training-set features: {out['references_seconds_cold']:.2f} s cold"
          + ("" if warm is None else f", {out['references_seconds_warm']:.2f} s from the cache"))
    if ceiling is not None:
        print(f"this machine, the same feature work alone and two copies at once: {ceiling['alone_seconds']:.2f} s, "
              f"{ceiling['two_at_once_seconds']:.2f} s: two processes can reach {ceiling['ceiling']:.2f}x at best")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(parse_args())
