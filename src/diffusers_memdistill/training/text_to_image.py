"""What the text-to-image distillation scripts (``distill_lcm.py``, ``distill_dmd.py`` on a Stable Diffusion teacher)
share: their prompt-sampling flags; the teacher and the pairs it memorized, with every image encoded by the VAE once;
and the memorization tracked during distillation (`pixel_memorization_track`) and logged as a curve
(`memorization_tracker`). Sampling prompts through a pipeline around a trained UNet is `training.utils`'s
`sample_prompts`, which the fine-tuning script uses too."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..captioned_data import build_memorization_mix, is_memorization_mix, load_memorization_mix
from ..utils.hashing import file_sha256
from .arguments import refuse_overlap
from .distillation import resolve_pretrained
from .finetune_sd_memorize import (
    _weights_file,
    cached_latent_moments,
    caption_embeddings,
    check_text_to_image_folder,
    encode_prompts,
    load_sd_components,
)
from .utils import write_json_atomically


def add_prompt_sampling_args(group, what: str) -> None:
    """``--validation_prompts``, ``--track_memorization_steps`` and ``--track_memorization_prompts`` in ``group``;
    ``what`` names what is sampled ("the student in 4 steps")."""
    group.add_argument("--validation_prompts", nargs="+", default=None,
                       help="Prompts of the validation images (default: the first memorized captions).")
    group.add_argument("--track_memorization_steps", type=int, default=0,
                       help=f"Every N steps, sample {what} on the memorized prompts and log its pixel memorization "
                            "(L2 ratio < 1/3 against the training images, 000 §4.1) to the trackers and to "
                            "memorization_curve.json (0: never).")
    group.add_argument("--track_memorization_prompts", type=int, default=16,
                       help="How many memorized prompts (the first ones) the tracking samples, one seed each.")


def check_prompt_sampling_args(parser, args) -> None:
    """``parser.error`` on a bad flag of [`add_prompt_sampling_args`]."""
    if args.validation_prompts is not None and not [p for p in args.validation_prompts if p.strip()]:
        parser.error("--validation_prompts holds no prompt.")
    if args.track_memorization_steps < 0 or args.track_memorization_prompts < 1:
        parser.error("--track_memorization_steps must not be negative and --track_memorization_prompts must be at "
                     "least 1.")


@dataclass
class TextToImageTeacher:
    """A loaded Stable Diffusion teacher and the pairs to distil on.

    Attributes:
        folder (`str`): the teacher's local folder.
        components (`dict`): its ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``noise_scheduler``.
        training_set (`TrainingSet`): the image–caption pairs (a memorization mix).
        latent_moments (`torch.Tensor`): the VAE posterior parameters of every pair's image, on the run's device.
        unet_sha256 (`str`): of the teacher's UNet weights.
    """

    folder: str
    components: dict
    training_set: object
    latent_moments: torch.Tensor
    unet_sha256: str

    def text_embeddings(self, device):
        """``(embeddings (P, L, D), caption_ids (N,), uncond (1, L, D))``: each distinct caption and the empty prompt
        through the text encoder once; afterwards the VAE and text encoder are parked on the CPU (validation moves
        them)."""
        text_encoder, tokenizer = self.components["text_encoder"], self.components["tokenizer"]
        embeddings, caption_ids = caption_embeddings(text_encoder, tokenizer, self.training_set.captions, device)
        uncond = encode_prompts(text_encoder, tokenizer, [""], device)
        text_encoder.to("cpu")
        self.components["vae"].to("cpu")
        return embeddings, caption_ids, uncond


def is_text_to_image_folder(folder: str) -> bool:
    """Whether a pipeline folder's ``model_index.json`` names a text encoder (a Stable Diffusion teacher)."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        entry = json.load(f).get("text_encoder")
    return isinstance(entry, list) and entry[0] is not None


def num_train_timesteps(folder: str) -> int:
    """T of a Stable Diffusion folder's scheduler (1000 when its config does not say)."""
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        return int(json.load(f).get("num_train_timesteps", 1000))


def load_distillation_pairs(args, teacher_folder: str, teacher_name: str):
    """The pairs to distil on: the mix the memorization-mix flags name, or the teacher's own recorded mix."""
    if args.memorized_data is not None:
        return build_memorization_mix(
            args.memorized_data, args.num_memorized, args.memorized_repeats, args.resolution, args.extra_data,
            args.extra_ratio or 0, args.data_seed, args.memorized_split, args.extra_split, args.max_train_samples,
            args.cache_dir)
    if not is_memorization_mix(teacher_folder):
        raise ValueError(f"{teacher_name} records no training pairs (no memorized_set.json): pass --memorized_data, "
                         "the image–caption pairs to distil on.")
    mix = load_memorization_mix(teacher_folder, cache_dir=args.cache_dir)
    if mix.images.shape[-1] != args.resolution:
        raise ValueError(f"The teacher's pairs are {mix.images.shape[-1]} pixels wide but --resolution is "
                         f"{args.resolution}: pass --resolution {mix.images.shape[-1]}.")
    return mix


def load_text_to_image_teacher(runner, args, name: str, revision=None, variant=None,
                               check: Callable[[str], None] | None = None) -> TextToImageTeacher:
    """Steps 2-3 of a text-to-image distillation: resolve the teacher (rank 0 first), check that it is a Stable
    Diffusion pipeline (and ``check(folder)``, e.g. that a solver grid divides its timesteps) before anything is
    written, load the pairs, its components and every image's VAE posterior (cached, float32)."""
    with runner.main_process_first():
        folder = resolve_pretrained(name, revision, variant)
        check_text_to_image_folder(folder, name)
        if check is not None:
            check(folder)
        training_set = load_distillation_pairs(args, folder, name)
    refuse_overlap(args.output_dir, [folder] + [part.record.get("root") for part in training_set.parts.values()])
    components = load_sd_components(folder, revision, variant)
    unet_sha256 = file_sha256(_weights_file(folder, "unet", variant))
    vae_sha256 = file_sha256(_weights_file(folder, "vae", variant))
    with runner.main_process_first():
        moments = cached_latent_moments(components["vae"], vae_sha256, training_set, runner.device, args.cache_dir)
    return TextToImageTeacher(folder, components, training_set, moments.to(runner.device), unet_sha256)


def copy_unet(unet):
    """A float32 trainable copy of a `UNet2DConditionModel` (same configuration and weights)."""
    from diffusers import UNet2DConditionModel

    copy = UNet2DConditionModel.from_config(unet.config)
    copy.load_state_dict(unet.state_dict())
    return copy.float().train()


def pixel_memorization_track(sample: Callable, training_set, num_prompts: int) -> Callable:
    """``track(step) -> dict``: ``sample(prompts)`` (images in [0, 1]) on the first ``num_prompts`` memorized prompts,
    one seed each, and their pixel memorization (L2 ratio < 1/3 against every training image, 000 §4.1)."""
    from ..metrics.memorization import pixel_memorization

    prompts = list(dict.fromkeys(training_set.parts["memorized"].captions))[:num_prompts]
    reference = training_set.images  # every training image, extra pairs included

    def track(_step):
        images = sample(prompts)
        result = pixel_memorization(images.float().cpu().clamp(0, 1), reference)
        return {"memorization/l2_fraction": result.fraction_memorized,
                "memorization/l2_ratio_mean": result.overall.mean, "memorization/l2_ratio_min": result.overall.min}

    return track


def memorization_tracker(runner, track: Callable, every: int) -> Callable:
    """``callback(step)`` for `TrainingRunner.train`: every ``every`` steps the main process measures the student's
    memorization (``track(step)``), logs it to the trackers and appends it to ``memorization_curve.json`` in the
    output folder; the other processes wait."""
    path = os.path.join(runner.output_dir, "memorization_curve.json")

    def callback(step):
        if step % every:
            return
        acc = runner.accelerator
        if acc.is_main_process:
            values = track(step)
            acc.log(values, step=step)
            curve = []
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    curve = [entry for entry in json.load(f) if entry["step"] < step]  # a resumed run redoes later ones
            write_json_atomically(path, curve + [{"step": step, **values}])
        acc.wait_for_everyone()

    return callback
