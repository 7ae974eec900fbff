"""Memory and time of an audit's search against a large reference set, on the CPU: reference features computed in
chunks and cached (`reference_features`), their distinct rows (`ReferenceFeatures.distinct`), then the exact k-NN
search (`knn_search`, k=2, L2) streamed from the memory map; and the references' Fréchet statistics (mean, covariance)
in two passes over row chunks read from the file (`ReferenceFeatures.statistics`), as an audit's pixel FD and FID take
them.

The references are synthetic 3x8x8 uint8 images, seeded, generated block by block through the callable form of
`reference_features` (never all in memory, never as floats); each block of 4096 repeats its first 16 images at its
end, so the distinct step has duplicates to find. A tenth of the queries are near-copies of references (a few
levels of noise), the rest random images; the near-copies' nearest distances are checked against float64.

    OMP_NUM_THREADS=1 python benchmarks/bench_evaluate_memory.py --json /tmp/bench_mem.json
    python benchmarks/bench_evaluate_memory.py --quick

Prints and writes (``--json``): the number of references, the feature size, seconds for the features (a first run
that computes them, then a second that hits the cache), for the distinct rows and for the search, seconds per million
references, and the peak resident memory of the process (``ru_maxrss``), the figure to keep under 2 GiB.
``--stored_features``: the features are computed (if not yet cached in ``--work_dir``) by a child process, so that
this process measures an audit that finds them stored: opening the cache, the distinct rows and the search, the
same steps as otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from diffusers_memdistill.evaluation.references import embed, pixel_space, reference_features
from diffusers_memdistill.metrics.nn_search import knn_search

BLOCK = 4096  # rows generated per seeded block
PLANTED = 16  # the last PLANTED rows of each block repeat its first ones
SHAPE = (3, 8, 8)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_references", type=int, default=1_000_000)
    parser.add_argument("--num_queries", type=int, default=1_000)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="10,000 references (for a test)")
    parser.add_argument("--work_dir", default=None, help="cache folder (default: a temporary one, removed after)")
    parser.add_argument("--stored_features", action="store_true",
                        help="compute the features in a child process; measure this one from the stored cache")
    parser.add_argument("--chunk_size", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--_build_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_references = 10_000
    if args.num_references < 1 or args.num_queries < 1:
        parser.error("--num_references and --num_queries must be positive")
    return args


def make_block(seed: int, block: int) -> np.ndarray:
    x = np.random.default_rng([seed, block]).integers(0, 256, size=(BLOCK, *SHAPE), dtype=np.uint8)
    x[BLOCK - PLANTED :] = x[:PLANTED]
    return x


def reference_rows(seed: int, num: int):
    """The callable ``(start, stop) -> uint8 images`` of the synthetic reference set (block by block)."""

    def rows(start: int, stop: int) -> torch.Tensor:
        if not 0 <= start <= stop <= num:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {num})")
        out = np.empty((stop - start, *SHAPE), dtype=np.uint8)
        for b in range(start // BLOCK, (stop - 1) // BLOCK + 1 if stop > start else start // BLOCK):
            lo, hi = max(start, b * BLOCK), min(stop, (b + 1) * BLOCK)
            out[lo - start : hi - start] = make_block(seed, b)[lo - b * BLOCK : hi - b * BLOCK]
        return torch.from_numpy(out)

    return rows


def images_id(args) -> str:
    """Identifies the synthetic set (hashing its bytes would need one more pass over it)."""
    text = f"bench_evaluate_memory synthetic uint8 {SHAPE} block={BLOCK} planted={PLANTED} seed={args.seed} "
    return hashlib.sha256(f"{text}n={args.num_references}".encode()).hexdigest()


def make_queries(args, rows) -> tuple[torch.Tensor, np.ndarray]:
    """Random images, a tenth of them near-copies of references; returns the queries and the copies' sources."""
    rng = np.random.default_rng([args.seed, 1])
    q = rng.integers(0, 256, size=(args.num_queries, *SHAPE), dtype=np.uint8)
    copies = max(1, args.num_queries // 10)
    sources = np.sort(rng.choice(args.num_references, size=min(copies, args.num_references), replace=False))
    for i, s in enumerate(sources):
        noise = rng.integers(-3, 4, size=SHAPE)
        q[i] = np.clip(rows(int(s), int(s) + 1)[0].numpy().astype(np.int64) + noise, 0, 255).astype(np.uint8)
    return torch.from_numpy(q), sources


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_features(args, cache_dir: str) -> float:
    start = time.perf_counter()
    reference_features(reference_rows(args.seed, args.num_references), args.num_references, images_id(args),
                       pixel_space(), cache_dir, chunk_size=args.chunk_size)
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    tmp = None
    cache_dir = args.work_dir
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_evaluate_memory-")
        cache_dir = tmp.name
    if args._build_only:
        print(json.dumps({"features_seconds_first": build_features(args, cache_dir)}))
        return {}
    try:
        return run(args, cache_dir)
    finally:
        if tmp is not None:
            tmp.cleanup()


def run(args: argparse.Namespace, cache_dir: str) -> dict:
    space = pixel_space()
    rows = reference_rows(args.seed, args.num_references)
    n = args.num_references
    first = None
    if args.stored_features:
        cmd = [sys.executable, os.path.abspath(__file__), "--_build_only", "--work_dir", cache_dir,
               "--num_references", str(n), "--seed", str(args.seed), "--chunk_size", str(args.chunk_size),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        first = json.loads(out.strip().splitlines()[-1])["features_seconds_first"]
    else:
        first = build_features(args, cache_dir)

    calls = [0]

    def counted(start, stop):
        calls[0] += 1
        return rows(start, stop)

    start = time.perf_counter()
    ref = reference_features(counted, n, images_id(args), space, cache_dir, chunk_size=args.chunk_size)
    cached = time.perf_counter() - start
    if calls[0]:
        raise RuntimeError(f"the second run read {calls[0]} chunks of images instead of hitting the cache")
    dim = ref.features.shape[1]

    start = time.perf_counter()
    distinct, keep = ref.distinct()
    distinct_seconds = time.perf_counter() - start

    # The training set's Fréchet statistics (pixel FD, FID) in two passes over row chunks of the memory map.
    start = time.perf_counter()
    stats = ref.statistics()
    statistics_seconds = time.perf_counter() - start
    if stats.num_samples != n or not np.isfinite(stats.cov).all():
        raise RuntimeError("the feature statistics of the references are wrong")

    queries, sources = make_queries(args, rows)
    q = embed(space, queries)
    start = time.perf_counter()
    result = knn_search(q, distinct, k=2, metric="l2")
    search_seconds = time.perf_counter() - start
    peak = peak_rss_mib()

    # Near-copies: the nearest distance is at most the distance to the source, in float64.
    src = ref.features[torch.from_numpy(sources)].double()
    to_source = (q[: len(sources)].double() - src).norm(dim=1)
    ok = int((result.values[: len(sources), 0].double() <= to_source * (1 + 1e-6)).sum())

    millions = n / 1e6
    results = {
        "num_references": n,
        "num_distinct": int(keep.shape[0]),
        "num_queries": args.num_queries,
        "dim": int(dim),
        "features_seconds_first": first,
        "features_seconds_cached": cached,
        "distinct_seconds": distinct_seconds,
        "statistics_seconds": statistics_seconds,
        "search_seconds": search_seconds,
        "features_seconds_per_million_references": None if first is None else first / millions,
        "distinct_seconds_per_million_references": distinct_seconds / millions,
        "search_seconds_per_million_references": search_seconds / millions,
        "peak_rss_mib": peak,
        "num_refined": result.num_refined,
        "near_copies_checked": len(sources),
        "near_copies_ok": ok,
        "threads": args.threads,
        "stored_features": args.stored_features,
        "torch": torch.__version__,
    }
    first_text = "n/a" if first is None else f"{first:.2f} s"
    print(
        f"references={n} distinct={results['num_distinct']} dim={dim} queries={args.num_queries} "
        f"threads={args.threads}{' (stored features)' if args.stored_features else ''}\n"
        f"features: first run {first_text}, cached {cached:.3f} s\n"
        f"distinct: {distinct_seconds:.2f} s\n"
        f"Fréchet statistics: {statistics_seconds:.2f} s\n"
        f"search:   {search_seconds:.2f} s ({results['search_seconds_per_million_references']:.2f} s per million "
        f"references, {result.num_refined} queries refined in float64)\n"
        f"near-copies found: {ok}/{len(sources)}\n"
        f"peak RSS: {peak:.0f} MiB"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(parse_args())
