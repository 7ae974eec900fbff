#!/usr/bin/env python
"""Training and sampling throughput of the package beside plain diffusers, in one command.

Measures, for a `build_unet` preset at a resolution and batch size:
- ``baseline``: a plain diffusers training step (`UNet2DModel`, epsilon-prediction MSE, Adam) — the reference;
- ``bare``: the teacher script's own step (its `build_plan`: EDM denoiser + EDM loss, clipping, Adam) in a bare loop
  over one batch on the device — the reference for the runner's overhead;
- ``teacher``: the same step through `TrainingRunner` (DataLoader, EMA, logging, divergence checks), as
  ``train_edm_teacher.py`` runs it; ``accum``: the same with 4-fold gradient accumulation at a quarter of the batch;
- ``cd``: the ``distill_consistency.py`` step through the runner (student forward/backward, target forward, two
  teacher forwards, target and EMA updates);
- ``dmd``: the ``distill_dmd.py`` iteration through the runner at its default two time-scale ratio 5 (every step: a
  generator forward and the fake denoiser's forward/backward; every fifth: the generator's forward/backward with a
  fake and a teacher forward), averaged over the steps;
- ``sample``: sampling throughput of the 35-NFE EDM teacher (18 Heun steps) and of the 1-step student.

For each: samples/s, peak GPU memory, FLOPs per sample (counted once with `torch.utils.flop_counter` on the eager
step) and the achieved share of a peak (default 798 TFLOP/s, the H100's dense bf16 figure). Prints a markdown table,
the runner's overhead over the bare step and the accumulation's per-sample cost, and, with ``--json``, writes it all.

    python benchmarks/bench_throughput.py --preset ddpmpp --resolution 32 --batch_size 512 \\
        --mixed_precision bf16 --channels_last --steps 30 [--compile]
    python benchmarks/bench_throughput.py --quick          # tiny sizes, CPU: checks that it runs
"""

import argparse
import contextlib
import json
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffusers_memdistill.data import TrainingSet, images_sha256, images_to_model_range
from diffusers_memdistill.models.presets import build_unet
from diffusers_memdistill.pipelines.pipeline_consistency import ConsistencyStudentPipeline
from diffusers_memdistill.pipelines.pipeline_edm import EDMPipeline
from diffusers_memdistill.schedulers.scheduling_consistency import ConsistencyStudentScheduler
from diffusers_memdistill.schedulers.scheduling_edm_heun import EDMHeunScheduler
from diffusers_memdistill.training import distill_consistency, distill_dmd, train_edm_teacher
from diffusers_memdistill.training.runner import TrainingRunner, reset_accelerate_state

BENCHMARKS = ("baseline", "bare", "teacher", "accum", "cd", "dmd", "sample")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ddpmpp")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--num_images", type=int, default=5000, help="Size of the synthetic training set of the runner.")
    p.add_argument("--sample_batch_size", type=int, default=None, help="Defaults to --batch_size.")
    p.add_argument("--steps", type=int, default=20, help="Timed steps per benchmark (after --warmup).")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (--compile of the scripts).")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--peak_tflops", type=float, default=798.0, help="Peak for the share column (H100 bf16 dense).")
    p.add_argument("--only", default=",".join(BENCHMARKS), help="Comma-separated benchmarks to run.")
    p.add_argument("--json", default=None, help="Write the results to this file.")
    p.add_argument("--quick", action="store_true", help="tiny preset, 8x8, batch 8, 2 steps (a smoke run).")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.resolution, args.channels, args.batch_size, args.num_images = "tiny", 8, 1, 8, 64
        args.steps, args.warmup, args.mixed_precision = 2, 1, "no"
    if args.warmup < 1 or args.steps < 1 or args.batch_size % 4:
        p.error("--warmup and --steps must be at least 1, --batch_size a multiple of 4 (accumulation 4x).")
    args.sample_batch_size = args.sample_batch_size or args.batch_size
    return args


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device, mixed_precision):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def _result(flops, seconds, num_samples, args, device):
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "samples_per_s": num_samples / seconds,
        "seconds_per_step": seconds,
        "gflop_per_sample": flops / num_samples / 1e9,
        "achieved_tflops": flops / seconds / 1e12,
        "share_of_peak": flops / seconds / 1e12 / args.peak_tflops,
        "peak_memory_gib": peak,
    }


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(step_fn, flops_fn, num_samples, args, device):
    """Time ``step_fn`` in a bare loop and count the FLOPs of ``flops_fn`` (the eager twin of one step)."""
    flops = count_flops(flops_fn)
    for _ in range(args.warmup):
        step_fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step_fn()
    _sync(device)
    return _result(flops, (time.perf_counter() - start) / args.steps, num_samples, args, device)


def synthetic_training_set(args):
    """Random uint8 images standing in for a dataset (throughput does not depend on the pixels)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num_images, args.channels, args.resolution, args.resolution), generator=g,
                           dtype=torch.uint8)
    record = {"format": 1, "dataset": "synthetic", "sha256": images_sha256(images), "num_images": args.num_images,
              "num_examples": args.num_images}
    return TrainingSet(images, None, torch.ones(args.num_images, dtype=torch.long), record)


def script_argv(args, batch_size, accumulation, output_dir):
    argv = ["--output_dir", output_dir, "--max_train_steps", str(args.warmup + args.steps), "--report_to", "none",
            "--train_batch_size", str(batch_size), "--gradient_accumulation_steps", str(accumulation),
            "--mixed_precision", args.mixed_precision, "--num_validation_images", "0",
            "--checkpointing_steps", str(10**9), "--dataloader_num_workers", str(args.dataloader_num_workers)]
    return argv + (["--compile"] if args.compile else [])


def teacher_script_args(args, batch_size, accumulation, output_dir):
    return train_edm_teacher.parse_args(script_argv(args, batch_size, accumulation, output_dir) + [
        "--model_preset", args.preset, "--resolution", str(args.resolution), "--channels", str(args.channels)])


def cd_script_args(args, batch_size, output_dir):
    return distill_consistency.parse_args(script_argv(args, batch_size, 1, output_dir) + [
        "--pretrained_model_name_or_path", "benchmark-teacher", "--loss", "l2"])


def dmd_script_args(args, batch_size, output_dir):
    return distill_dmd.parse_args(script_argv(args, batch_size, 1, output_dir) + [
        "--pretrained_model_name_or_path", "benchmark-teacher"])


def teacher_pipeline(args):
    torch.manual_seed(0)
    return EDMPipeline(build_unet(args.preset, args.resolution, args.channels), EDMHeunScheduler())


def _channels_last(plan, args):
    if args.channels_last:
        for module in [*plan.models.values(), *(a.ema.module for a in plan.averages.values()), *plan.frozen.values()]:
            module.to(memory_format=torch.channels_last)
    return plan


def eager_step_flops(plan, training_set, batch_size, device, mixed_precision):
    """FLOPs of one optimizer step of ``plan`` averaged over its phases' update ratios (a phase run every k steps
    counts 1/k), each phase run eagerly on the first ``batch_size`` images."""
    nets = {**plan.models, **{n: a.ema.module for n, a in plan.averages.items()}, **plan.frozen}
    for module in nets.values():
        module.to(device)
    batch = {"pixel_values": images_to_model_range(training_set.images[:batch_size].to(device))}
    total = 0.0
    for phase in plan.phases:
        generator = torch.Generator(device).manual_seed(0)

        def step(phase=phase, generator=generator):
            with _autocast(device, mixed_precision):
                out = phase.step(nets, batch, generator)
            out[0].float().mean().backward()

        total += count_flops(step) / phase.every
        for p in plan.phases:
            p.optimizer.zero_grad(set_to_none=True)
    return total


def measure_runner(make_args, make_plan, training_set, args, device, samples_per_step):
    """One script's step through `TrainingRunner.train` (no checkpoints, validation or final save): the time per
    step between the end of step ``warmup`` and the end of step ``warmup + steps``."""
    reset_accelerate_state()
    with tempfile.TemporaryDirectory() as tmp:
        script_args = make_args(tmp)
        runner = TrainingRunner(script_args, "benchmark")
        flops = eager_step_flops(make_plan(script_args), training_set, script_args.train_batch_size, device,
                                 args.mixed_precision) * script_args.gradient_accumulation_steps
        plan = _channels_last(make_plan(script_args), args)
        marks = {}

        def callback(done):
            if done in (args.warmup, args.warmup + args.steps):
                _sync(device)
                marks[done] = time.perf_counter()
                if done == args.warmup and device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()

        runner.train(plan, training_set, finalize=False, callback=callback)
    reset_accelerate_state()
    seconds = (marks[args.warmup + args.steps] - marks[args.warmup]) / args.steps
    return _result(flops, seconds, samples_per_step, args, device)


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    shape = (args.batch_size, args.channels, args.resolution, args.resolution)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    generator = torch.Generator(device).manual_seed(0)
    only = set(args.only.split(","))
    maybe_compile = torch.compile if args.compile else (lambda m: m)
    training_set = synthetic_training_set(args)
    results = {}

    if "baseline" in only:  # plain diffusers: epsilon prediction on integer timesteps, MSE, Adam
        torch.manual_seed(0)
        unet = build_unet(args.preset, args.resolution, args.channels).to(device, memory_format=fmt)
        net, opt = maybe_compile(unet), torch.optim.Adam(unet.parameters(), lr=1e-4)
        images = images_to_model_range(training_set.images[: args.batch_size].to(device)).contiguous(memory_format=fmt)

        def baseline_step(model):
            def step():
                noise = torch.randn(shape, device=device, generator=generator)
                t = torch.randint(0, 1000, (shape[0],), device=device, generator=generator)
                with _autocast(device, args.mixed_precision):
                    loss = F.mse_loss(model(images + noise, t).sample.float(), noise)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        results["baseline (diffusers UNet2DModel, eps MSE)"] = measure(
            baseline_step(net), baseline_step(unet), shape[0], args, device)
        del unet, net, opt

    with tempfile.TemporaryDirectory() as tmp:
        teacher_args = teacher_script_args(args, args.batch_size, 1, tmp)

    if "bare" in only:  # the teacher script's step, without the runner
        plan = _channels_last(train_edm_teacher.build_plan(teacher_args, training_set), args)
        unet = plan.models["unet"].to(device)
        opt = plan.phases[0].optimizer
        nets = {"unet": maybe_compile(unet)}
        batch = {"pixel_values": images_to_model_range(training_set.images[: args.batch_size].to(device))}

        def bare_step(networks):
            def step():
                with _autocast(device, args.mixed_precision):
                    loss = plan.phases[0].step(networks, batch, generator)[0].float().mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(unet.parameters(), teacher_args.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        results["teacher step (EDM loss), bare loop"] = measure(
            bare_step(nets), bare_step({"unet": unet}), shape[0], args, device)
        del plan, unet, opt, nets

    if "teacher" in only:
        results["teacher step (EDM loss)"] = measure_runner(
            lambda out: teacher_script_args(args, args.batch_size, 1, out),
            lambda a: train_edm_teacher.build_plan(a, training_set), training_set, args, device, args.batch_size)

    if "accum" in only:
        results["teacher step, accumulation 4 x batch/4"] = measure_runner(
            lambda out: teacher_script_args(args, args.batch_size // 4, 4, out),
            lambda a: train_edm_teacher.build_plan(a, training_set), training_set, args, device, args.batch_size)

    if "cd" in only:
        results["CD step (N=18, Heun teacher, l2)"] = measure_runner(
            lambda out: cd_script_args(args, args.batch_size, out),
            lambda a: distill_consistency.build_plan(a, teacher_pipeline(args), training_set, "0" * 64),
            training_set, args, device, args.batch_size)

    if "dmd" in only:
        results["DMD step (ratio 5, one-step generator)"] = measure_runner(
            lambda out: dmd_script_args(args, args.batch_size, out),
            lambda a: distill_dmd.build_plan(a, teacher_pipeline(args), training_set, "0" * 64, device),
            training_set, args, device, args.batch_size)

    if "sample" in only:
        torch.manual_seed(0)
        unet = build_unet(args.preset, args.resolution, args.channels).to(device, memory_format=fmt).eval()
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

    derived = {}
    bare, runner = results.get("teacher step (EDM loss), bare loop"), results.get("teacher step (EDM loss)")
    if bare and runner:
        derived["runner_overhead"] = runner["seconds_per_step"] / bare["seconds_per_step"] - 1
    accum = results.get("teacher step, accumulation 4 x batch/4")
    if accum and runner:
        derived["accumulation_per_sample_ratio"] = accum["samples_per_s"] / runner["samples_per_s"]
    base = results.get("baseline (diffusers UNet2DModel, eps MSE)")
    if base and runner:
        derived["teacher_vs_baseline"] = runner["samples_per_s"] / base["samples_per_s"]

    n_params = sum(p.numel() for p in build_unet(args.preset, args.resolution, args.channels).parameters())
    header = (f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; preset {args.preset} "
              f"({n_params / 1e6:.1f}M parameters), {args.resolution}x{args.resolution}x{args.channels}, batch "
              f"{args.batch_size}, {args.mixed_precision}, compile={args.compile}, channels_last={args.channels_last}")
    print(header)
    print("| benchmark | samples/s | GFLOP/sample | TFLOP/s | share of peak | peak memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['samples_per_s']:.1f} | {r['gflop_per_sample']:.2f} | {r['achieved_tflops']:.2f} | "
              f"{100 * r['share_of_peak']:.2f}% | {r['peak_memory_gib']:.2f} |")
    if "runner_overhead" in derived:
        print(f"runner overhead over the bare teacher step: {100 * derived['runner_overhead']:+.1f}% of step time")
    if "accumulation_per_sample_ratio" in derived:
        print(f"accumulation 4 x batch/4: {derived['accumulation_per_sample_ratio']:.3f} x the per-sample throughput")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": vars(args), "header": header, "results": results, "derived": derived}, f, indent=1)
    return results


if __name__ == "__main__":
    main(parse_args())
