#!/usr/bin/env python
"""Training and sampling throughput of the package beside plain diffusers, in one command.

Measures, for a `build_unet` preset at a resolution and batch size:
- ``baseline``: a plain diffusers training step (`UNet2DModel`, epsilon-prediction MSE, Adam) — the reference;
- ``teacher``: a training step of `train_edm_teacher.py` (EDM denoiser + EDM loss + Adam);
- ``cd``: a consistency-distillation step (student forward/backward, target forward, two teacher forwards);
- ``sample``: sampling throughput of the 35-NFE EDM teacher (18 Heun steps) and of the 1-step student.

For each: samples/s, peak GPU memory, FLOPs per sample (counted once with `torch.utils.flop_counter`, on the eager
network) and the achieved share of a peak (default 798 TFLOP/s, the H100's dense bf16 figure). Prints a markdown
table and, with ``--json``, writes the numbers.

    python benchmarks/bench_throughput.py --preset ddpmpp --resolution 32 --batch_size 512 \
        --mixed_precision bf16 --compile --channels_last --steps 30
    python benchmarks/bench_throughput.py --quick          # tiny sizes, CPU: checks that it runs
"""

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffusers_memdistill.losses.consistency import ConsistencyDistillationLoss
from diffusers_memdistill.losses.edm import EDMLoss
from diffusers_memdistill.models.denoiser import ConsistencyDenoiser, EDMDenoiser
from diffusers_memdistill.models.presets import build_unet
from diffusers_memdistill.pipelines.pipeline_consistency import ConsistencyStudentPipeline
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.schedulers.scheduling_consistency import ConsistencyStudentScheduler
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler
from diffusers_memdistill.training.utils import make_ema, update_ema


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ddpmpp")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--sample_batch_size", type=int, default=None, help="Defaults to --batch_size.")
    p.add_argument("--steps", type=int, default=20, help="Timed steps per benchmark (after --warmup).")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks.")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--peak_tflops", type=float, default=798.0, help="Peak for the share column (H100 bf16 dense).")
    p.add_argument("--only", default="baseline,teacher,cd,sample", help="Comma-separated benchmarks to run.")
    p.add_argument("--json", default=None, help="Write the results to this file.")
    p.add_argument("--quick", action="store_true", help="tiny preset, 8x8, batch 8, 2 steps (a smoke run).")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.resolution, args.channels, args.batch_size = "tiny", 8, 1, 8
        args.steps, args.warmup, args.mixed_precision = 2, 1, "no"
    args.sample_batch_size = args.sample_batch_size or args.batch_size
    return args


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device, mixed_precision):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def _prepare(unet, args, device):
    unet = unet.to(device)
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def measure(step_fn, flops_fn, num_samples, args, device):
    """Time ``step_fn`` and count the FLOPs of ``flops_fn`` (the eager twin of one step)."""
    with FlopCounterMode(display=False) as counter:
        flops_fn()
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step_fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step_fn()
    _sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "samples_per_s": num_samples / seconds,
        "seconds_per_step": seconds,
        "gflop_per_sample": flops / num_samples / 1e9,
        "achieved_tflops": flops / seconds / 1e12,
        "share_of_peak": flops / seconds / 1e12 / args.peak_tflops,
        "peak_memory_gib": peak,
    }


def training_step(unet, loss_of, optimizer, args, device):
    def step():
        with _autocast(device, args.mixed_precision):
            loss = loss_of(unet)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    shape = (args.batch_size, args.channels, args.resolution, args.resolution)
    images = torch.randn(shape, device=device).clamp(-1, 1)
    generator = torch.Generator(device).manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    images = images.contiguous(memory_format=fmt)
    only = set(args.only.split(","))
    results = {}

    def build():
        torch.manual_seed(0)
        return _prepare(build_unet(args.preset, args.resolution, args.channels), args, device)

    maybe_compile = torch.compile if args.compile else (lambda m: m)

    if "baseline" in only:  # plain diffusers: epsilon prediction on integer timesteps, MSE, Adam
        unet = build()
        net = maybe_compile(unet)
        opt = torch.optim.Adam(unet.parameters(), lr=1e-4)

        def baseline_loss(model):
            noise = torch.randn(shape, device=device, generator=generator)
            t = torch.randint(0, 1000, (shape[0],), device=device, generator=generator)
            return F.mse_loss(model(images + noise, t).sample.float(), noise)

        results["baseline (diffusers UNet2DModel, eps MSE)"] = measure(
            training_step(net, baseline_loss, opt, args, device),
            training_step(unet, baseline_loss, opt, args, device), shape[0], args, device)
        del unet, net, opt

    if "teacher" in only:
        unet = build()
        net = maybe_compile(unet)
        opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
        loss_fn = EDMLoss()

        def teacher_loss(model):
            return loss_fn(EDMDenoiser(model), images, generator=generator)[0].mean()

        results["teacher step (EDM loss)"] = measure(
            training_step(net, teacher_loss, opt, args, device),
            training_step(unet, teacher_loss, opt, args, device), shape[0], args, device)
        del unet, net, opt

    if "cd" in only:
        teacher_unet, student_unet = build().eval().requires_grad_(False), build()
        target_unet = make_ema(student_unet)
        nets = [maybe_compile(m) for m in (teacher_unet, student_unet, target_unet)]
        opt = torch.optim.RAdam(student_unet.parameters(), lr=4e-4)
        loss_fn = ConsistencyDistillationLoss(distance="l2")

        def cd_step_of(teacher, student, target):
            def step():
                with _autocast(device, args.mixed_precision):
                    loss = loss_fn(ConsistencyDenoiser(student), ConsistencyDenoiser(target), EDMDenoiser(teacher),
                                   images, generator=generator)[0].mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                update_ema(target_unet, student_unet, 0.95)
            return step

        results["CD step (N=18, Heun teacher, l2)"] = measure(
            cd_step_of(*nets), cd_step_of(teacher_unet, student_unet, target_unet), shape[0], args, device)
        del teacher_unet, student_unet, target_unet, nets, opt

    if "sample" in only:
        unet = build().eval()
        n = args.sample_batch_size
        for name, pipe, kwargs in [
            ("sampling, EDM teacher (18 Heun steps, 35 NFE)", EDMPipeline(unet, EDMHeunScheduler()), {}),
            ("sampling, consistency student (1 step)",
             ConsistencyStudentPipeline(unet, ConsistencyStudentScheduler()), {"num_inference_steps": 1}),
        ]:
            pipe.set_progress_bar_config(disable=True)
            eager_unet = pipe.unet
            compiled = maybe_compile(eager_unet)

            def run(model=compiled, pipe=pipe, kwargs=kwargs):
                pipe.unet = model
                with torch.no_grad(), _autocast(device, args.mixed_precision):
                    pipe(batch_size=n, output_type="pt", **kwargs)
                pipe.unet = eager_unet

            results[name] = measure(run, lambda: run(eager_unet), n, args, device)

    header = (f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; preset {args.preset} "
              f"({sum(p.numel() for p in build_unet(args.preset, args.resolution, args.channels).parameters()) / 1e6:.1f}M "
              f"parameters), {args.resolution}x{args.resolution}x{args.channels}, batch {args.batch_size}, "
              f"{args.mixed_precision}, compile={args.compile}, channels_last={args.channels_last}")
    print(header)
    print("| benchmark | samples/s | GFLOP/sample | TFLOP/s | share of peak | peak memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['samples_per_s']:.1f} | {r['gflop_per_sample']:.2f} | {r['achieved_tflops']:.2f} | "
              f"{100 * r['share_of_peak']:.2f}% | {r['peak_memory_gib']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": vars(args), "header": header, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main(parse_args())
