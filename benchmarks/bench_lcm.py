#!/usr/bin/env python
"""The latent consistency distillation step of ``training_scripts/distill_lcm.py`` beside diffusers' own example
``train_lcm_distill_sd_wds.py``, on the same teacher and the same image–caption pairs, in one command.

Builds once, in a temporary folder: a Stable Diffusion pipeline folder with random weights (SD v1.5's UNet, VAE and
CLIP text encoder configurations, a small CLIP vocabulary; ``--quick``: `models.tiny_sd`'s tiny components), which
both tools take as their teacher, and ``--num_images`` synthetic image–caption pairs written twice: as webdataset tar
shards for diffusers' script and as an imagefolder with ``metadata.jsonl`` for ours (``--memorized_data``). Each tool
then runs as itself, in a subprocess, through its own command line: diffusers' script is read from
``--diffusers_script`` (never part of this repository) and run unchanged under ``__main__``.

Measurement, the same for both: a global optimizer-step hook (`torch.optim.optimizer.register_optimizer_step_post_hook`)
marks the end of every optimizer step (after a device synchronisation); the time per step is the mean period over
the ``--steps`` steps after ``--warmup`` ones (start-up, model loading, latent caching and compilation fall before the
window), the process stops right after the last timed step (neither tool's final save is timed). Peak GPU memory
(`torch.cuda.max_memory_allocated`) is read for the whole run up to the last timed step and for the timed steps alone.
FLOPs per step are counted with `torch.utils.flop_counter` on the last warm-up step of the eager runs (everything from
the previous optimizer step to this one: VAE and text encoding where a tool does them per step, every UNet pass,
the backward), and, beside, composed from per-pass counts of the same networks on the meta device.

    python benchmarks/bench_lcm.py --json lcm.json [--compile]          # SD v1.5 size, batch 12, bf16, 512 px
    python benchmarks/bench_lcm.py --quick                              # tiny, 16 px, CPU, 2 steps: a smoke run
    python benchmarks/bench_lcm.py --flops_only                         # composed FLOPs per sample, no run

diffusers' script needs ``webdataset`` and ``braceexpand`` (pip wheels, not dependencies of this package); without
the script file or those modules its side is skipped with a message.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import _sync, count_flops  # noqa: E402  (the throughput benchmark's FLOP counting and sync)

REPO = Path(__file__).resolve().parent.parent
OUR_SCRIPT = REPO / "training_scripts" / "distill_lcm.py"
DEFAULT_DIFFUSERS_SCRIPT = REPO / ".ref" / "train_lcm_distill_sd_wds.py"
TOOLS = ("diffusers", "ours")

# Stable Diffusion v1.5's component configurations (stable-diffusion-v1-5/stable-diffusion-v1-5, unet/, vae/ and
# text_encoder/ config.json); weights are random here.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
# The settings both tools share (the issue's: diffusers' defaults for LCM on SD v1.5, Huber loss).
LCM_FLAGS = ["--num_ddim_timesteps", "50", "--w_min", "5", "--w_max", "15", "--loss_type", "huber", "--huber_c",
             "0.001", "--ema_decay", "0.95", "--learning_rate", "1e-6", "--seed", "0"]
NEVER = str(10**9)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers_script", default=str(DEFAULT_DIFFUSERS_SCRIPT),
                   help="diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py (read and run, not "
                        "part of this repository).")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--num_images", type=int, default=48, help="Synthetic image–caption pairs (both tools).")
    p.add_argument("--steps", type=int, default=10, help="Timed optimizer steps per tool (after --warmup).")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps first (at least 2: the last is counted).")
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--compile", action="store_true", help="Also run ours with --compile (a third row).")
    p.add_argument("--cast_teacher_unet", action="store_true", help="Pass --cast_teacher_unet to both tools.")
    p.add_argument("--dataloader_num_workers", type=int, default=4,
                   help="diffusers' webdataset loader workers (its script needs at least 1); ours reads its cached "
                        "latents in the main process.")
    p.add_argument("--peak_tflops", type=float, default=798.0, help="Peak for the share column (bf16 dense).")
    p.add_argument("--only", default=",".join(TOOLS), help="Comma-separated tools: diffusers, ours.")
    p.add_argument("--work_dir", default=None, help="Folder for the teacher, data and runs (default: a temporary one, "
                                                    "removed at the end).")
    p.add_argument("--timeout", type=float, default=900, help="Seconds allowed to each tool's run.")
    p.add_argument("--json", default=None, help="Write the results to this file.")
    p.add_argument("--in_process", action="store_true",
                   help="Run ours in this process instead of a subprocess (CPU smoke tests: saves the start-up).")
    p.add_argument("--quick", action="store_true", help="Tiny components, 16 px, batch 2, no mixed precision, 2 timed steps: a smoke run.")
    p.add_argument("--flops_only", action="store_true",
                   help="Only print the FLOPs per sample composed from per-pass counts (meta device, no run).")
    args = p.parse_args(argv)
    if args.quick:
        args.resolution, args.batch_size, args.num_images, args.steps, args.warmup = 16, 2, 4, 2, 2
        args.mixed_precision, args.dataloader_num_workers = "no", 1
    unknown = set(args.only.split(",")) - set(TOOLS)
    if unknown:
        p.error(f"--only: unknown tool(s) {sorted(unknown)}; choose among {list(TOOLS)}.")
    if args.warmup < 2 or args.steps < 1:
        p.error("--warmup must be at least 2 (its last step is the one counted) and --steps at least 1.")
    if args.dataloader_num_workers < 1:
        p.error("--dataloader_num_workers must be at least 1 (diffusers' webdataset loader divides by it).")
    if args.resolution % 8 and not args.quick:
        p.error(f"--resolution must be a multiple of 8 (the VAE's factor), got {args.resolution}.")
    return args


# ---------------------------------------------------------------------------------------------------------------
# The measured run (a subprocess per tool)


class _TimedStepsDone(BaseException):
    """Raised by the step hook after the last timed step: the tool stops there (a BaseException, so that no
    ``except Exception`` in a script swallows it)."""


def measure_script(script, argv, warmup, steps, result_path, count=True, exit_process=True):
    """Run ``script`` (a Python file) under ``__main__`` with ``argv`` and time its optimizer steps (see the module
    docstring); writes ``result_path`` (JSON) after step ``warmup + steps`` and stops the run there."""
    import runpy

    from torch.optim.optimizer import register_optimizer_step_post_hook

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    marks, counting, result = [], [], {}

    def hook(optimizer, *_):
        _sync(device)
        marks.append(time.perf_counter())
        done = len(marks)
        if counting:  # the counted step ends here
            mode, kernel = counting.pop(), counting.pop()
            mode.__exit__(None, None, None)
            kernel.__exit__(None, None, None)
            result["flops_per_step"] = mode.get_total_flops()
        if done == warmup - 1 and count:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            from torch.utils.flop_counter import FlopCounterMode

            # The CPU's fused attention kernel is not among the counter's operators; its math path (two matmuls) is.
            kernel = sdpa_kernel([SDPBackend.MATH]) if device.type != "cuda" else contextlib.nullcontext()
            kernel.__enter__()
            mode = FlopCounterMode(display=False)
            mode.__enter__()
            counting.extend([kernel, mode])
        if done == warmup and device.type == "cuda":
            result["run_peak_before_steps_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        if done == warmup + steps:
            window = marks[warmup:]
            periods = [b - a for a, b in zip(marks[warmup - 1:], window)]
            result.update(seconds_per_step=(marks[-1] - marks[warmup - 1]) / steps, step_seconds=periods,
                          device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
            if device.type == "cuda":
                steps_peak = torch.cuda.max_memory_allocated() / 2**30
                result["steps_peak_memory_gib"] = steps_peak
                result["peak_memory_gib"] = max(steps_peak, result["run_peak_before_steps_gib"])
                result["steps_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            with open(result_path, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
            if exit_process:  # nothing after the timed steps is measured: skip the tool's saves and teardown
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            raise _TimedStepsDone

    handle = register_optimizer_step_post_hook(hook)
    saved_argv = sys.argv
    sys.argv = [str(script), *map(str, argv)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _TimedStepsDone:
        pass
    finally:
        sys.argv = saved_argv
        handle.remove()
    if not os.path.isfile(result_path):
        raise RuntimeError(f"{script} ended after {len(marks)} optimizer steps, before the {warmup + steps} measured.")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Inputs shared by both tools


def teacher_components(quick: bool, device="cpu"):
    """The teacher's `StableDiffusionPipeline` components: SD v1.5's configurations (random weights, seeded) or, for
    ``quick``, `tiny_sd_components` at 16 px. The tokenizer is `tiny_sd`'s small CLIP vocabulary (the real one is a
    download): prompts are padded to 77 tokens either way, so the text encoder's cost is SD's."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_memdistill.models.tiny_sd import SD15_SCHEDULER_CONFIG, build_clip_tokenizer, tiny_sd_components

    if quick:
        return tiny_sd_components(resolution=16)
    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **SD15_TEXT_ENCODER, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": PNDMScheduler(**SD15_SCHEDULER_CONFIG), "safety_checker": None, "feature_extractor": None}


def write_teacher(folder: str, quick: bool) -> str:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**teacher_components(quick), requires_safety_checker=False).save_pretrained(folder)
    return folder


def synthetic_pairs(num_images: int, resolution: int):
    """Smooth random RGB images (PNG bytes) and captions, seeded."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(num_images):
        coarse = torch.rand(1, 3, 8, 8, generator=g)
        image = torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bilinear")[0]
        array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        pairs.append((f"{i:05d}", buffer.getvalue(), f"a photo of the image number {i}"))
    return pairs


def write_imagefolder(folder: Path, pairs) -> Path:
    """``folder/train/*.png`` with ``metadata.jsonl`` (file_name, text): the format of ``--memorized_data``."""
    train = folder / "train"
    train.mkdir(parents=True)
    with open(train / "metadata.jsonl", "w", encoding="utf-8") as f:
        for key, png, text in pairs:
            (train / f"{key}.png").write_bytes(png)
            f.write(json.dumps({"file_name": f"{key}.png", "text": text}) + "\n")
    return folder


def write_shards(folder: Path, pairs, per_shard: int = 16) -> str:
    """webdataset tar shards (``KEY.png`` and ``KEY.txt`` per pair); returns the brace pattern of their paths."""
    folder.mkdir(parents=True)
    count = (len(pairs) + per_shard - 1) // per_shard
    for s in range(count):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for key, png, text in pairs[s * per_shard:(s + 1) * per_shard]:
                for name, data in ((f"{key}.png", png), (f"{key}.txt", text.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{count - 1:05d}}}.tar") if count > 1 else str(folder / "00000.tar")


# ---------------------------------------------------------------------------------------------------------------
# The two command lines


def diffusers_argv(args, teacher, shards, output_dir):
    argv = ["--pretrained_teacher_model", teacher, "--train_shards_path_or_url", shards, "--output_dir", output_dir,
            "--resolution", args.resolution, "--train_batch_size", args.batch_size,
            "--mixed_precision", args.mixed_precision, "--max_train_steps", args.warmup + args.steps,
            # The loader's epoch: max_train_samples / (batch × workers) batches per worker; one epoch covers the run.
            "--max_train_samples", args.batch_size * args.dataloader_num_workers * (args.warmup + args.steps),
            "--dataloader_num_workers", args.dataloader_num_workers, "--lr_warmup_steps", 0,
            "--checkpointing_steps", NEVER, "--validation_steps", NEVER, "--allow_tf32", *LCM_FLAGS]
    return [str(a) for a in argv + (["--cast_teacher_unet"] if args.cast_teacher_unet else [])]


def ours_argv(args, teacher, imagefolder, output_dir, cache_dir, compile_=False):
    argv = ["--pretrained_teacher_model", teacher, "--memorized_data", imagefolder, "--num_memorized",
            args.num_images, "--memorized_repeats", 1, "--output_dir", output_dir, "--cache_dir", cache_dir,
            "--resolution", args.resolution, "--train_batch_size", args.batch_size,
            "--mixed_precision", args.mixed_precision, "--max_train_steps", args.warmup + args.steps,
            "--lr_warmup_steps", 0, "--checkpointing_steps", NEVER, "--num_validation_images", 0, "--allow_tf32",
            *LCM_FLAGS]
    extra = (["--cast_teacher_unet"] if args.cast_teacher_unet else []) + (["--compile"] if compile_ else [])
    return [str(a) for a in argv + extra]


def run_tool(name, script, argv, args, work: Path, count=True, in_process=False):
    """One tool's measured run in a subprocess (`measure_script`), its output in ``work/NAME.log``; or, with
    ``in_process``, in this process."""
    result_path, log_path = work / f"{name}.json", work / f"{name}.log"
    result_path.unlink(missing_ok=True)
    if in_process:
        from diffusers_memdistill.training.runner import reset_accelerate_state

        start = time.perf_counter()
        reset_accelerate_state()
        try:
            result = measure_script(script, argv, args.warmup, args.steps, str(result_path), count, exit_process=False)
        finally:
            reset_accelerate_state()
        return {**result, "wall_seconds_to_last_timed_step": time.perf_counter() - start}
    command = [sys.executable, str(Path(__file__).resolve()), "--_measure", str(script), "--_result", str(result_path),
               "--_warmup", str(args.warmup), "--_steps", str(args.steps), *([] if count else ["--_no_count"]),
               "--", *argv]
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(work),
                                  timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - start
    if code != 0 or not result_path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        print(f"{name}: the run failed ({code}) after {wall:.0f} s; the end of {log_path}:\n{tail}", file=sys.stderr)
        return None
    with open(result_path, encoding="utf-8") as f:
        result = json.load(f)
    result["wall_seconds_to_last_timed_step"] = wall
    return result


# ---------------------------------------------------------------------------------------------------------------
# FLOPs composed from per-pass counts


def composed_flops(teacher: str, resolution: int, batch_size: int, time_cond_proj_dim: int = 256) -> dict:
    """FLOPs per sample of each network pass of an LCM step, counted on the meta device (no memory, no time) with the
    teacher folder's configurations, and the two tools' steps composed from them: ours = student forward and backward
    + the teacher on cond and uncond (one fused batch of 2B, the same FLOPs as two passes of B) + the target forward;
    diffusers' = the same + the VAE encoder on the batch's images + the text encoder on its captions (both every step).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    b = batch_size
    with torch.device("meta"):
        teacher_unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(teacher, subfolder="unet"))
        cfg = teacher_unet.config
        student = UNet2DConditionModel.from_config(cfg, time_cond_proj_dim=cfg.time_cond_proj_dim or time_cond_proj_dim)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(teacher, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(teacher, subfolder="text_encoder"))
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        z = torch.empty(b, cfg.in_channels, resolution // factor, resolution // factor)
        hidden = torch.empty(b, 77, cfg.cross_attention_dim)
        t = torch.zeros(b, dtype=torch.long)
        w = torch.empty(b, student.config.time_cond_proj_dim)
        images = torch.empty(b, 3, resolution, resolution)
        ids = torch.zeros(b, 77, dtype=torch.long)
    student.train()
    passes = {
        "unet_forward": count_flops(lambda: teacher_unet(torch.cat([z, z]), torch.cat([t, t]),
                                                        torch.cat([hidden, hidden]))) / (2 * b),
        "student_forward_backward": count_flops(
            lambda: student(z, t, hidden, timestep_cond=w).sample.float().mean().backward()) / b,
        "target_forward": count_flops(lambda: student(z, t, hidden, timestep_cond=w)) / b,
        "vae_encode": count_flops(lambda: vae.encode(images)) / b,
        "text_encode": count_flops(lambda: text_encoder(ids)) / b,
    }
    ours = passes["student_forward_backward"] + 2 * passes["unet_forward"] + passes["target_forward"]
    params = {name: sum(p.numel() for p in net.parameters()) / 1e6
              for name, net in (("unet", teacher_unet), ("vae", vae), ("text_encoder", text_encoder))}
    return {"parameters_millions": params, "passes_gflop_per_sample": {k: v / 1e9 for k, v in passes.items()},
            "ours_gflop_per_sample": ours / 1e9,
            "diffusers_gflop_per_sample": (ours + passes["vae_encode"] + passes["text_encode"]) / 1e9}


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


def _row(result, batch_size, flops_per_step, args):
    seconds = result["seconds_per_step"]
    row = {"steps_per_s": 1 / seconds, "samples_per_s": batch_size / seconds, "seconds_per_step": seconds,
           "median_seconds_per_step": sorted(result["step_seconds"])[len(result["step_seconds"]) // 2],
           "peak_memory_gib": result.get("peak_memory_gib", float("nan")),
           "steps_peak_memory_gib": result.get("steps_peak_memory_gib", float("nan")),
           "steps_peak_reserved_gib": result.get("steps_peak_reserved_gib", float("nan")),
           "wall_seconds_to_last_timed_step": result["wall_seconds_to_last_timed_step"], "device": result["device"]}
    if flops_per_step is not None:
        row.update(gflop_per_sample=flops_per_step / batch_size / 1e9,
                   achieved_tflops=flops_per_step / seconds / 1e12,
                   share_of_peak=flops_per_step / seconds / 1e12 / args.peak_tflops)
    return row


def main(args):
    only = set(args.only.split(","))
    results, notes = {}, []
    skip_diffusers = None
    if "diffusers" in only:
        if not os.path.isfile(args.diffusers_script):
            skip_diffusers = (f"diffusers' script not found at {args.diffusers_script} (examples/"
                              "consistency_distillation/train_lcm_distill_sd_wds.py of the diffusers repository; not "
                              "part of this one): its side is skipped.")
        else:
            missing = [m for m in ("webdataset", "braceexpand", "torchvision") if importlib.util.find_spec(m) is None]
            if missing:
                skip_diffusers = (f"diffusers' script needs {', '.join(missing)} (pip wheels; not installed here): its "
                                  "side is skipped.")
        if skip_diffusers:
            print(skip_diffusers)
            notes.append(skip_diffusers)
    with contextlib.ExitStack() as stack:
        if args.work_dir:
            work = Path(args.work_dir).resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_lcm_")))
        teacher = work / "teacher"
        if not (teacher / "model_index.json").is_file():
            start = time.perf_counter()
            write_teacher(str(teacher), args.quick)
            print(f"teacher written to {teacher} in {time.perf_counter() - start:.0f} s")
        composed = composed_flops(str(teacher), args.resolution, args.batch_size)
        imagefolder, shard_dir = work / "pairs", work / "shards"
        shutil.rmtree(imagefolder, ignore_errors=True)  # the pairs of this command's --num_images and --resolution
        shutil.rmtree(shard_dir, ignore_errors=True)
        pairs = synthetic_pairs(args.num_images, args.resolution)
        write_imagefolder(imagefolder, pairs)
        shards = write_shards(shard_dir, pairs)
        runs = []
        if "diffusers" in only and not skip_diffusers:
            runs.append(("diffusers train_lcm_distill_sd_wds.py", "diffusers", args.diffusers_script,
                         diffusers_argv(args, str(teacher), shards, str(work / "out_diffusers")), True))
        if "ours" in only:
            runs.append(("ours distill_lcm.py", "ours", OUR_SCRIPT,
                         ours_argv(args, str(teacher), str(imagefolder), str(work / "out_ours"), str(work / "cache")),
                         True))
            if args.compile:
                runs.append(("ours distill_lcm.py --compile", "ours_compile", OUR_SCRIPT,
                             ours_argv(args, str(teacher), str(imagefolder), str(work / "out_ours_compile"),
                                       str(work / "cache"), compile_=True), False))
        measured = {}
        for label, key, script, argv, count in runs:
            print(f"running {label} ...", flush=True)
            shutil.rmtree(argv[argv.index("--output_dir") + 1], ignore_errors=True)  # a fresh run, never a resume
            measured[key] = run_tool(key, script, argv, args, work, count=count,
                                     in_process=args.in_process and key.startswith("ours"))
            if measured[key] is None:
                notes.append(f"{label}: the run failed (see the log above).")
        for label, key, *_ in runs:
            result = measured[key]
            if result is None:
                continue
            flops = result.get("flops_per_step")
            if flops is None and key == "ours_compile" and measured.get("ours"):
                flops = measured["ours"].get("flops_per_step")  # the same work, counted on the eager run
            results[label] = _row(result, args.batch_size, flops, args)

    derived = {}
    theirs = results.get("diffusers train_lcm_distill_sd_wds.py")
    for label in ("ours distill_lcm.py", "ours distill_lcm.py --compile"):
        if theirs and label in results:
            suffix = "_compile" if "compile" in label else ""
            derived[f"steps_per_s_ratio{suffix}"] = results[label]["steps_per_s"] / theirs["steps_per_s"]
            derived[f"peak_memory_ratio{suffix}"] = results[label]["peak_memory_gib"] / theirs["peak_memory_gib"]

    device = next(iter(results.values()))["device"] if results else "none"
    sizes = ", ".join(f"{k} {v:.4g}M" for k, v in composed["parameters_millions"].items())
    header = (f"device: {device}; {'tiny' if args.quick else 'SD v1.5-sized'} components ({sizes} parameters, random "
              f"weights), {args.resolution}x{args.resolution} px, batch {args.batch_size}, "
              f"{args.mixed_precision}, {args.steps} timed steps after {args.warmup}, "
              f"cast_teacher_unet={args.cast_teacher_unet}")
    print(header)
    print("| tool | steps/s | samples/s | peak GiB (run) | peak GiB (steps) | GFLOP/sample | TFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        flops = (f"{r['gflop_per_sample']:.4g} | {r['achieved_tflops']:.4g} | {100 * r['share_of_peak']:.3g}%"
                 if "gflop_per_sample" in r else "n/a | n/a | n/a")
        print(f"| {name} | {r['steps_per_s']:.3f} | {r['samples_per_s']:.2f} | {r['peak_memory_gib']:.2f} | "
              f"{r['steps_peak_memory_gib']:.2f} | {flops} |")
    print(f"composed GFLOP/sample (meta device): ours {composed['ours_gflop_per_sample']:.4g}, diffusers "
          f"{composed['diffusers_gflop_per_sample']:.4g}; per pass: "
          + ", ".join(f"{k} {v:.4g}" for k, v in composed["passes_gflop_per_sample"].items()))
    for suffix, what in (("", "ours"), ("_compile", "ours --compile")):
        if f"steps_per_s_ratio{suffix}" in derived:
            memory = derived["peak_memory_ratio" + suffix]
            memory = f"{memory:.2f}x the peak memory" if memory == memory else "peak memory not measured (no GPU)"
            print(f"{what} / diffusers: {derived['steps_per_s_ratio' + suffix]:.2f}x the steps/s (goal >= 1.5), "
                  f"{memory} (goal <= 1)")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": vars(args), "header": header, "results": results, "composed": composed,
                       "derived": derived, "notes": notes}, f, indent=1)
    return {"results": results, "composed": composed, "derived": derived, "notes": notes}


def flops_only(args):
    """The composed FLOPs per sample at the requested size, from a teacher folder of configurations only (no weights
    are materialised: the networks live on the meta device)."""
    with tempfile.TemporaryDirectory(prefix="bench_lcm_cfg_") as tmp:
        parts = teacher_components(args.quick, device="meta")
        parts["unet"].save_config(os.path.join(tmp, "unet"))
        parts["vae"].save_config(os.path.join(tmp, "vae"))
        parts["text_encoder"].config.save_pretrained(os.path.join(tmp, "text_encoder"))
        composed = composed_flops(tmp, args.resolution, args.batch_size)
    print(json.dumps(composed, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": vars(args), "composed": composed}, f, indent=1)
    return composed


def _measure_main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--_measure", required=True)
    p.add_argument("--_result", required=True)
    p.add_argument("--_warmup", type=int, required=True)
    p.add_argument("--_steps", type=int, required=True)
    p.add_argument("--_no_count", action="store_true")
    p.add_argument("script_argv", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    script_argv = a.script_argv[1:] if a.script_argv[:1] == ["--"] else a.script_argv
    measure_script(a._measure, script_argv, a._warmup, a._steps, a._result, count=not a._no_count)


if __name__ == "__main__":
    if "--_measure" in sys.argv[1:2]:
        _measure_main(sys.argv[1:])
    else:
        parsed = parse_args()
        flops_only(parsed) if parsed.flops_only else main(parsed)
