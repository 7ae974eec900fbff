"""Exact nearest-neighbour search (`knn_search`) beside ``torch.cdist`` + ``topk``, checked against float64.

Synthetic CIFAR-sized images (3×32×32, smooth random content, generated chunk by chunk on the device so that
1,000,000 of them fit), a tenth of the queries being near-copies of training images. Prints, for both methods:
queries/s (best of ``--repeats`` after a warm-up), peak working memory (``torch.cuda.max_memory_allocated`` above
the inputs on CUDA, peak RSS above the starting RSS on the CPU), agreement of the neighbours with a float64
reference and the largest distance difference from it.

    python benchmarks/bench_nn_search.py --quick
    python benchmarks/bench_nn_search.py --num-train 50000 --num-queries 5000 --device cuda
    python benchmarks/bench_nn_search.py --num-train 1000000 --num-queries 5000 --device cuda

The float64 reference: the first ``--check-queries`` queries scored against every training image by chunked
float64 products, their best ``k + 16`` re-ranked from float64 differences (ties to the lower index).
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch
import torch.nn.functional as F

from diffusers_memdistill.metrics import knn_search


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=50000)
    parser.add_argument("--num-queries", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="20000 training images, 1000 queries")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-budget", type=int, default=None, help="bytes; default: knn_search's own")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the best is kept")
    parser.add_argument("--check-queries", type=int, default=1000, help="queries checked against float64")
    parser.add_argument("--no-baseline", action="store_true", help="skip torch.cdist + topk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_train, args.num_queries = 20000, 1000
    return args


def make_images(n: int, size: int, generator: torch.Generator, device, chunk: int = 16384) -> torch.Tensor:
    """Smooth random images in [0, 1], written chunk by chunk into one preallocated tensor."""
    out = torch.empty(n, 3, size, size, device=device)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        low = torch.rand(rows, 3, max(1, size // 4), max(1, size // 4), generator=generator, device=device)
        x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        x += 0.05 * torch.randn(x.shape, generator=generator, device=device)
        out[start : start + rows] = x.clamp_(0, 1)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    try:  # Linux ≥ 4.0: writing 5 resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(fn, device: torch.device):
    """Runs `fn` once; returns its result and the peak working memory in bytes (None when not measurable)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        sync(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    base = _proc_status("VmRSS")
    if base is None or not _reset_peak_rss():
        return fn(), None
    result = fn()
    peak = _proc_status("VmHWM")
    return result, None if peak is None else peak - base


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return None


@torch.no_grad()
def float64_reference(queries: torch.Tensor, train: torch.Tensor, k: int, chunk: int = 8192):
    """Neighbours and distances of `queries` in float64 (see module docstring)."""
    q = queries.flatten(1).double()
    center = q.mean(0)
    q = q - center
    q_sq = q.square().sum(1)
    extra = min(train.shape[0], k + 16)
    best_v = torch.full((q.shape[0], extra), float("inf"), dtype=torch.float64, device=q.device)
    best_i = torch.zeros((q.shape[0], extra), dtype=torch.long, device=q.device)
    for start in range(0, train.shape[0], chunk):
        r = train[start : start + chunk].flatten(1).double() - center
        d = torch.addmm(r.square().sum(1)[None, :], q, r.T, alpha=-2) + q_sq[:, None]
        v, pos = torch.topk(d, min(extra, r.shape[0]), dim=1, largest=False)
        v, i = torch.cat([best_v, v], 1), torch.cat([best_i, pos + start], 1)
        best_v, pos = torch.topk(v, extra, dim=1, largest=False)
        best_i = i.gather(1, pos)
    exact = (queries.flatten(1).double()[:, None, :] - train.flatten(1)[best_i].double()).square().sum(-1)
    order = torch.argsort(best_i, dim=1, stable=True)
    exact, best_i = exact.gather(1, order), best_i.gather(1, order)
    order = torch.argsort(exact, dim=1, stable=True)[:, :k]
    return exact.gather(1, order).sqrt(), best_i.gather(1, order)


def compare(values, indices, queries, train, ref_values, ref_indices) -> dict:
    """Agreement with the float64 reference; disagreeing neighbours that are float64 ties count as agreeing."""
    n = ref_indices.shape[0]
    values, indices = values[:n].double(), indices[:n]
    own = (queries[:n].flatten(1).double()[:, None, :] - train.flatten(1)[indices].double()).square().sum(-1).sqrt()
    same = indices == ref_indices
    tie = (own - ref_values).abs() <= 1e-12 * ref_values.abs().clamp_min(1e-300)
    eps32 = torch.finfo(torch.float32).eps
    return {
        "queries_checked": n,
        "queries_with_other_neighbours": int((~(same | tie)).any(1).sum()),
        "max_abs_distance_error": (values - ref_values).abs().max().item(),
        "max_distance_error_in_float32_ulps": ((values - ref_values).abs() / (eps32 * ref_values).clamp_min(1e-300))
        .max()
        .item(),
    }


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("highest")  # both methods in IEEE float32
    g = torch.Generator(device=device).manual_seed(args.seed)
    train = make_images(args.num_train, args.image_size, g, device)
    queries = make_images(args.num_queries, args.image_size, g, device)
    copies = args.num_queries // 10
    queries[:copies] = train[:copies] + 1e-3 * torch.randn(queries[:copies].shape, generator=g, device=device)
    dim = train[0].numel()
    print(
        f"device={device} train={tuple(train.shape)} queries={tuple(queries.shape)} k={args.k} "
        f"torch={torch.__version__}" + (f" gpu={torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    )

    def ours():
        return knn_search(queries, train, k=args.k, memory_budget=args.memory_budget)

    def baseline():
        d = torch.cdist(queries.flatten(1), train.flatten(1))
        return torch.topk(d, args.k, dim=1, largest=False)

    methods = {"knn_search": ours}
    if not args.no_baseline:
        need = args.num_queries * args.num_train * 8 + 2 * args.num_train * (dim + 2) * 4
        free = available_bytes(device)
        if free is not None and need > 0.8 * free:
            print(f"cdist+topk: skipped (needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available)")
        else:
            methods["cdist+topk"] = baseline

    n_check = min(args.check_queries, args.num_queries)
    ref_values, ref_indices = float64_reference(queries[:n_check], train, args.k)
    results = {}
    for name, fn in methods.items():
        try:
            out, peak = measure_peak(fn, device)  # also the warm-up
            best = float("inf")
            for _ in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                out = fn()
                sync(device)
                best = min(best, time.perf_counter() - start)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:  # CPU allocators raise RuntimeError
            if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "memory" not in str(e):
                raise
            print(f"{name:>11}: out of memory ({str(e).splitlines()[0][:100]})")
            continue
        row = {"seconds": best, "queries_per_s": args.num_queries / best, "peak_working_bytes": peak}
        row.update(compare(out.values, out.indices, queries, train, ref_values, ref_indices))
        if name == "knn_search":
            row.update(num_refined=out.num_refined, num_exhaustive=out.num_exhaustive)
        results[name] = row
        peak_text = "n/a" if peak is None else f"{peak / 2**20:,.0f} MiB"
        print(
            f"{name:>11}: {best:8.3f} s {row['queries_per_s']:12,.0f} queries/s   peak working memory {peak_text:>10}  "
            f"neighbours differing from float64: {row['queries_with_other_neighbours']}/{n_check} queries   "
            f"max |distance - float64| {row['max_abs_distance_error']:.2e} "
            f"({row['max_distance_error_in_float32_ulps']:.2f} float32 ulp)"
        )
    if "knn_search" in results:
        r = results["knn_search"]
        print(f"knn_search: {r['num_refined']} queries searched again in float64, {r['num_exhaustive']} with ties")
    if len(results) == 2:
        ratio = results["cdist+topk"]["seconds"] / results["knn_search"]["seconds"]
        print(f"speed ratio knn_search / cdist+topk: {ratio:.2f}x")
    summary = {"args": vars(args), "device": str(device), "torch": torch.__version__, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main(parse_args())
