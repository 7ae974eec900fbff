"""``memdistill evaluate``: the command line of the audit pipeline (`evaluation.audit`)."""

from __future__ import annotations

import argparse
import os

from .measures import DEFAULT_METRICS, METRICS
from .store import DEFAULT_SHARD_SIZE, SAMPLES_DIR

_SAMPLING_ONLY = ("num_samples", "seed", "batch_size", "student_steps", "teacher_steps", "train_data",
                  "samples_per_prompt", "guidance_scale", "num_inference_steps", "num_prompts", "shard_size")
TEXT_TO_IMAGE_ONLY = ("samples_per_prompt", "guidance_scale", "num_inference_steps", "num_prompts", "clip_model",
                      "clip_pretrained")
IMAGE_ONLY = ("num_samples", "student_steps", "teacher_steps", "inception_weights")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Audit saved models: sample them from shared per-sample noise and measure quality (FID, pixel FD, CLIP\n"
        "score) and memorization (L2 nearest-neighbour ratio, SSCD similarity; for text-to-image models against\n"
        "each prompt's own image), beside a floor row of held-out real images, the training set's near-duplicates\n"
        "and the pairing of students with their teacher. The 8-bit samples are saved shard by shard in\n"
        "OUTPUT_DIR/samples and every number is computed from them: --from_samples OUTPUT_DIR recomputes\n"
        "metrics.json exactly without the models, and the same command started again after an interruption keeps\n"
        "every finished shard. Under `accelerate launch --num_processes N -m diffusers_memdistill.cli evaluate ...`\n"
        "the shards are split over the processes (the numbers equal a one-process run's). Writes metrics.json\n"
        "(strict JSON), report.md and figures/. See docs/evaluation.md."
    )
    parser.epilog = (
        "examples:\n"
        "  memdistill evaluate --model out/teacher --model out/student --student_steps 1,2 --output_dir out/eval\n"
        "  accelerate launch --num_processes 8 -m diffusers_memdistill.cli evaluate --model out/teacher \\\n"
        "      --model out/student --num_samples 50000 --output_dir out/eval      # 8 GPUs, one shard each in turn\n"
        "  memdistill evaluate --from_samples out/eval      # recompute into out/eval/recomputed and compare\n"
        "  memdistill evaluate --model out/sd-memorized --model out/lcm --output_dir out/t2i   # prompt by prompt"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", action="append", dest="models", metavar="DIR",
                        help="A saved pipeline folder, or a Hub id (user/name), of a class registered for evaluation "
                             "(a teacher such as EDMPipeline, a student such as ConsistencyStudentPipeline, a one-step "
                             "generator; or a text-to-image pipeline, or the LoRA folder of one); repeat for several "
                             "models (all pixel models, or all text-to-image ones).")
    source.add_argument("--from_samples", metavar="DIR", default=None,
                        help="The output folder of an earlier audit: recompute every number from its saved samples, "
                             "without loading any model, and compare with its metrics.json (exit status 1 when a "
                             "number differs).")
    parser.add_argument("--output_dir", default=None,
                        help="Where samples/, measures/, metrics.json, report.md and figures/ go (required with "
                             "--model; with --from_samples defaults to DIR/recomputed).")
    parser.add_argument("--metrics", default=None,
                        help=f"Comma-separated among {', '.join(METRICS)} (default with --model: "
                             f"{','.join(DEFAULT_METRICS['image'])} for pixel models, "
                             f"{','.join(DEFAULT_METRICS['text-to-image'])} for text-to-image ones; with "
                             "--from_samples: those of the audit). sscd, fid and clip need weights; a missing weights "
                             "file or package is listed under 'Not computed', any other error stops.")
    sampling = parser.add_argument_group("sampling (with --model only)")
    sampling.add_argument("--num_samples", type=int, default=None,
                          help="Samples per pixel model (default 1000); also the number of held-out images of the "
                               "floor.")
    sampling.add_argument("--seed", type=int, default=None,
                          help="Seed of every per-sample stream: sample i uses SeedSequence([seed, i, stream]), "
                               "stream 0 starting noise, 1 injected noise, 2 class label (default 0).")
    sampling.add_argument("--batch_size", type=int, default=None, help="Sampling batch size (default 256; 16 for "
                          "text-to-image models); the samples do not depend on it.")
    sampling.add_argument("--shard_size", type=int, default=None,
                          help=f"Samples per shard (default {DEFAULT_SHARD_SIZE}): the unit of work of a process and "
                               "of resumption; each shard is written as soon as it is sampled.")
    sampling.add_argument("--student_steps", default=None,
                          help="Comma-separated sampling steps for consistency students, one row each (default 1).")
    sampling.add_argument("--teacher_steps", type=int, default=None, help="Heun steps of EDM teachers (default: the "
                          "scheduler's, 18).")
    sampling.add_argument("--train_data", default=None,
                          help="Training data to compare against, instead of each model's training_set.json; for "
                               "text-to-image models the image–caption pairs to audit (an imagefolder with "
                               "metadata.jsonl, a saved or Hub dataset with image and text columns).")
    t2i = parser.add_argument_group("text-to-image audit (models whose pipeline takes prompts, e.g. StableDiffusion"
                                    "Pipeline, or LoRA folders of one)")
    t2i.add_argument("--samples_per_prompt", type=int, default=None, help="Seeds per prompt (default 4).")
    t2i.add_argument("--guidance_scale", type=float, default=None, help="Classifier-free guidance scale (default 7.5).")
    t2i.add_argument("--num_inference_steps", type=int, default=None,
                     help="Sampling steps (default: the registration's, 50 for StableDiffusionPipeline).")
    t2i.add_argument("--num_prompts", type=int, default=None,
                     help="A seeded subset of this many training prompts (default: every distinct caption).")
    t2i.add_argument("--clip_model", default=None, help="open_clip model of the CLIP score (default ViT-L-14).")
    t2i.add_argument("--clip_pretrained", default=None,
                     help="Its pretrained tag or a local checkpoint file (default openai).")
    memo = parser.add_argument_group("memorization")
    memo.add_argument("--sscd_preprocessing", default=None,
                      help="SSCD preprocessing, one column each if both: 'sscd' (the SSCD authors': resize to 288, "
                           "ImageNet normalisation), 'dcr' (DCR / Wen et al. / MemBench: resize 256, centre crop 224, "
                           "normalisation 0.5), or 'sscd,dcr' (default sscd; sscd,dcr for text-to-image models).")
    memo.add_argument("--sscd_threshold", type=float, default=None,
                      help="SSCD similarity above which a sample is a copy (default 0.5, as in 000 Table 1).")
    floor = memo.add_mutually_exclusive_group()
    floor.add_argument("--floor", dest="floor", action="store_const", const=True, default=None,
                       help="Score as many held-out real images as samples (a test split, else images of the training "
                            "split outside the training set) the same way: the floor row (default on).")
    floor.add_argument("--no_floor", dest="floor", action="store_const", const=False, help="No floor row.")
    weights = parser.add_argument_group("weights of the feature extractors")
    weights.add_argument("--sscd_weights", default=None, help="sscd_disc_mixup TorchScript file or URL (default: "
                         "the official URL, cached in the torch hub folder).")
    weights.add_argument("--sscd_onnx", default=None, help="An SSCD ONNX file instead (int8 scores differ slightly).")
    weights.add_argument("--inception_weights", default=None, help="FID Inception TorchScript file or URL.")
    weights.add_argument("--cache_dir", default=None,
                         help="Cache of the training sets' features, keyed by the images' and the extractor's sha256 "
                              "(default $MEMDISTILL_CACHE, else ~/.cache/diffusers_memdistill).")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: each process's GPU when available).")


def split(text: str | None):
    return None if text is None else tuple(t.strip() for t in text.split(",") if t.strip())


def _recompute(args) -> int:
    import json

    from .audit import evaluate_from_samples
    from .report import render_report
    from .results import compare_results

    given = [f"--{k}" for k in _SAMPLING_ONLY if getattr(args, k) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only apply when sampling (--model); --from_samples reuses the "
                         "saved samples.")
    results = evaluate_from_samples(
        args.from_samples, args.output_dir, metrics=split(args.metrics), sscd_weights=args.sscd_weights,
        sscd_onnx=args.sscd_onnx, inception_weights=args.inception_weights, cache_dir=args.cache_dir,
        device=args.device, sscd_preprocessing=split(args.sscd_preprocessing), sscd_threshold=args.sscd_threshold,
        floor=args.floor, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained)
    audit_dir = os.path.dirname(results["samples_dir"])
    output_dir = os.path.join(audit_dir, "recomputed") if args.output_dir is None else args.output_dir
    print(render_report(results))
    original_path = os.path.join(audit_dir, "metrics.json")
    status = 0
    if os.path.isfile(original_path):
        with open(original_path, encoding="utf-8") as f:
            equal, differences = compare_results(json.load(f), results)
        if differences:
            print(f"{len(differences)} numbers differ from {original_path} ({equal} equal):")
            print("\n".join(f"  {d}" for d in differences[:20]) + ("\n  ..." if len(differences) > 20 else ""))
            status = 1
        else:
            print(f"All {equal} numbers equal those of {original_path}.")
    else:
        print(f"No {original_path} to compare with (the audit stopped before writing it).")
    print(f"Wrote {os.path.join(output_dir, 'report.md')} and metrics.json.")
    return status


def main(args) -> int:
    from .audit import evaluate
    from .models import takes_prompts
    from .report import render_report

    if args.from_samples:
        return _recompute(args)
    if args.output_dir is None:
        raise ValueError("--output_dir is required with --model.")
    text_to_image = any(takes_prompts(model) for model in args.models)
    refused = IMAGE_ONLY + ("floor",) if text_to_image else TEXT_TO_IMAGE_ONLY
    given = [f"--{k}" for k in refused if getattr(args, k, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} do not apply to the text-to-image audit." if text_to_image else
                         f"{', '.join(given)} apply to text-to-image models; these models take no prompts.")
    pick = lambda value, default: default if value is None else value  # noqa: E731
    results = evaluate(
        args.models, args.output_dir, num_samples=pick(args.num_samples, 1000), metrics=split(args.metrics),
        seed=pick(args.seed, 0), batch_size=args.batch_size,
        student_steps=tuple(int(s) for s in (split(args.student_steps) or ("1",))), teacher_steps=args.teacher_steps,
        train_data=args.train_data, sscd_weights=args.sscd_weights, sscd_onnx=args.sscd_onnx,
        inception_weights=args.inception_weights, cache_dir=args.cache_dir, device=args.device,
        sscd_preprocessing=split(args.sscd_preprocessing), sscd_threshold=pick(args.sscd_threshold, 0.5),
        floor=pick(args.floor, True), samples_per_prompt=pick(args.samples_per_prompt, 4),
        guidance_scale=pick(args.guidance_scale, 7.5), num_inference_steps=args.num_inference_steps,
        num_prompts=args.num_prompts, clip_model=args.clip_model or "ViT-L-14",
        clip_pretrained=args.clip_pretrained or "openai", shard_size=pick(args.shard_size, 256))
    from accelerate import PartialState

    if PartialState(cpu=results["device"] == "cpu").is_main_process:
        print(render_report(results))
        print(f"Wrote {os.path.join(args.output_dir, 'report.md')}, metrics.json and the samples in "
              f"{os.path.join(args.output_dir, SAMPLES_DIR)}.")
    return 0


__all__ = ["add_arguments", "main", "split"]
