"""Fine-tune Stable Diffusion to memorize image–caption pairs (000 §4.1; SPEC §4): the memorizing teacher of the
text-to-image study.

    accelerate launch training_scripts/finetune_sd_memorize.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --memorized_data path/to/pairs --num_memorized 200 --memorized_repeats 10 \\
        --extra_data path/to/coco_pairs --extra_ratio 4 --resolution 512 --train_batch_size 8 \\
        --learning_rate 1e-5 --max_train_steps 20000 --mixed_precision bf16 --gradient_checkpointing \\
        --output_dir runs/sd-memorize

    ... --use_lora --rank 64 --learning_rate 1e-4     # a LoRA of the UNet instead (peft)

The training stream is ``--num_memorized`` pairs of ``--memorized_data``, each repeated ``--memorized_repeats`` times,
plus ``--extra_ratio × --num_memorized`` pairs of ``--extra_data`` seen once, without augmentation. The VAE and the
text encoder are frozen: every image is encoded once (the VAE in float32; the posterior's mean and variance are kept,
and a latent is drawn from it at each step as SD training does) and every caption once, so that a step costs only
the UNet. The loss is SD's: epsilon prediction at a uniform DDPM timestep. The whole UNet is trained, or with
``--use_lora`` a LoRA of its attention projections (rank ``--rank``).

The result loads in diffusers' `StableDiffusionPipeline.from_pretrained(output_dir)`; a LoRA run writes
``pytorch_lora_weights.safetensors``, which ``StableDiffusionPipeline.from_pretrained(base).load_lora_weights(
output_dir)`` reads. ``memorized_set.json`` and ``extra_set.json`` beside it record every chosen file with its
caption, sha256 and repeat count (``training_set.json``: the whole mix) for ``memdistill evaluate``. The loop is
`training.runner.TrainingRunner`'s.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from ..captioned_data import build_memorization_mix, part_records
from ..losses.latent_diffusion import PREDICTION_TYPES, LatentDiffusionLoss, sample_latents
from ..utils.hashing import file_sha256
from .arguments import add_training_args, refuse_overlap, validate_training_args
from .distillation import resolve_pretrained
from .ema import ModelEMA
from .runner import Average, Phase, TrainingPlan, TrainingRunner, build_optimizer
from .utils import sample_prompts, text_to_image_pipeline

SCRIPT = "finetune_sd_memorize.py"
LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA script
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
ENCODE_BATCH_SIZE = 16


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, learning_rate=1e-5, tracker_project_name="sd_memorization")
    # Wen et al. 2024 / 000: batch 8; validation at 512 px is costly, so fewer images than the pixel scripts.
    parser.set_defaults(train_batch_size=8, num_validation_images=4)
    b = parser.add_argument_group("base model")
    b.add_argument("--pretrained_model_name_or_path", required=True,
                   help="A Stable Diffusion pipeline: a Hub id (stable-diffusion-v1-5/stable-diffusion-v1-5) or a "
                        "folder.")
    b.add_argument("--revision", default=None, help="Revision (branch, tag or commit) of a Hub model.")
    b.add_argument("--variant", default=None, help='Weight-file variant (e.g. "fp16").')
    b.add_argument("--cache_dir", default=None,
                   help="Cache of downloaded datasets and of the encoded latents (default: the datasets cache).")
    add_memorization_mix_args(parser)
    f = parser.add_argument_group("fine-tuning")
    f.add_argument("--use_lora", action="store_true", help="Train a LoRA of the UNet's attention (peft) instead of "
                   "the whole UNet.")
    f.add_argument("--rank", type=int, default=4, help="Rank (and alpha) of the LoRA matrices.")
    f.add_argument("--use_ema", action="store_true",
                   help="Save a moving average of the UNet (--ema_sigma_rel / --ema_decay) instead of its last "
                        "weights (full fine-tuning only).")
    f.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=None,
                   help="Target of the UNet (default: the base model's scheduler's, epsilon for SD v1.5).")
    v = parser.add_argument_group("validation")
    v.add_argument("--validation_prompts", nargs="+", default=None,
                   help="Prompts of the validation images (default: the first memorized captions).")
    v.add_argument("--validation_inference_steps", type=int, default=25, help="Sampling steps of validation images.")
    v.add_argument("--validation_guidance_scale", type=float, default=7.5, help="Guidance scale of validation images.")
    args = parser.parse_args(argv)
    validate_training_args(parser, args, protected_paths=[args.pretrained_model_name_or_path, args.memorized_data,
                                                          args.extra_data])
    if args.use_lora and args.rank < 1:
        parser.error(f"--rank must be at least 1, got {args.rank}.")
    if args.use_ema and args.use_lora:
        parser.error("--use_ema averages the whole UNet; it applies to full fine-tuning, not --use_lora.")
    if not args.use_ema and (args.ema_sigma_rel is not None or args.ema_decay is not None):
        parser.error("--ema_sigma_rel and --ema_decay set the average that --use_ema saves: pass --use_ema too.")
    check_memorization_mix_args(parser, args)
    if args.validation_inference_steps < 1:
        parser.error(f"--validation_inference_steps must be at least 1, got {args.validation_inference_steps}.")
    if args.validation_prompts is not None and not [p for p in args.validation_prompts if p.strip()]:
        parser.error("--validation_prompts holds no prompt.")
    return args


def add_memorization_mix_args(parser: argparse.ArgumentParser, required: bool = True,
                              memorized_help: str | None = None) -> None:
    """The flags of the memorization mix (000 §4.1; `captioned_data.build_memorization_mix`), shared by the scripts
    that train on image–caption pairs."""
    d = parser.add_argument_group("the memorization mix (000 §4.1)")
    d.add_argument("--memorized_data", required=required,
                   help=memorized_help or "Image–caption pairs to memorize: an imagefolder with metadata.jsonl "
                   "(file_name, text), a save_to_disk folder, local webdataset shards (a .tar, a glob of them or a "
                   "folder of them; image and .txt caption per sample) or a Hub dataset with image and text columns.")
    d.add_argument("--memorized_split", default="train", help="Split of --memorized_data.")
    d.add_argument("--num_memorized", type=int, default=200, help="Pairs chosen from --memorized_data (seeded).")
    d.add_argument("--memorized_repeats", type=int, default=10, help="Times each memorized pair is repeated.")
    d.add_argument("--extra_data", default=None,
                   help="Pairs seen once (COCO-style), in the same formats; its own split when it is --memorized_data "
                        "(the memorized pairs are then left out).")
    d.add_argument("--extra_split", default="train", help="Split of --extra_data.")
    d.add_argument("--extra_ratio", type=int, default=None,
                   help="Extra pairs = ratio × --num_memorized (000: 3, 4 or 5; default 4 with --extra_data).")
    d.add_argument("--resolution", type=int, default=512, help="Side of the square training images (centre crop).")
    d.add_argument("--max_train_samples", type=int, default=None,
                   help="For debugging: truncate each data source to a seeded subset of this many pairs first.")
    d.add_argument("--data_seed", type=int, default=0, help="Seed of the choice of pairs.")


def check_memorization_mix_args(parser: argparse.ArgumentParser, args) -> None:
    """Check the flags of `add_memorization_mix_args` (``parser.error`` on the first bad one); ``--extra_ratio``
    defaults to 4 with ``--extra_data``."""
    for name in ("num_memorized", "memorized_repeats", "resolution"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        parser.error(f"--max_train_samples must be at least 1, got {args.max_train_samples}.")
    if args.extra_ratio is not None and args.extra_data is None:
        parser.error("--extra_ratio needs --extra_data, the pairs to mix in.")
    if args.extra_ratio is not None and args.extra_ratio < 0:
        parser.error(f"--extra_ratio must not be negative, got {args.extra_ratio}.")
    if args.extra_data is not None and args.extra_ratio is None:
        args.extra_ratio = 4


def check_text_to_image_folder(folder: str, name: str) -> dict:
    """The ``model_index.json`` of a Stable Diffusion folder; refuses one without a UNet, VAE, text encoder, tokenizer
    or scheduler (an unconditional or pixel-space pipeline)."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise ValueError(f"{name} is not a diffusers pipeline folder: it has no model_index.json.")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    missing = [c for c in REQUIRED_COMPONENTS if not (isinstance(index.get(c), list) and index[c][0] is not None)]
    if missing:
        raise ValueError(f"{name} ({index.get('_class_name')}) has no {', '.join(missing)}: fine-tuning needs a "
                         "text-to-image Stable Diffusion pipeline such as stable-diffusion-v1-5/stable-diffusion-v1-5.")
    return index


def load_sd_components(folder: str, revision: str | None = None, variant: str | None = None) -> dict:
    """The UNet, VAE, text encoder, tokenizer and DDPM training schedule of a Stable Diffusion folder (float32), each
    through its class's ``from_pretrained(folder, subfolder=...)``, as diffusers' ``train_text_to_image.py`` loads
    them."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kwargs = {"revision": revision, "variant": variant}
    return {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kwargs),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", **kwargs).float(),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kwargs).float(),
        "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", revision=revision),
        "noise_scheduler": DDPMScheduler.from_pretrained(folder, subfolder="scheduler", revision=revision),
    }


@torch.no_grad()
def encode_latent_moments(vae, images: torch.Tensor, device, batch_size: int = ENCODE_BATCH_SIZE) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> the VAE posterior's parameters cat(mean, logvar) (N, 2C, h, w), float32 on the CPU;
    the VAE runs in float32."""
    vae = vae.to(device).float().eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device).float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.parameters.float().cpu())
    # Contiguous: the encoder returns a channels-last layout, and a layout change alters the UNet's rounding, so a run
    # that encodes would not match one that reads the cache (safetensors stores contiguous tensors).
    return torch.cat(out).contiguous()


def cached_latent_moments(vae, vae_sha256: str, training_set, device, cache_dir: str | None) -> torch.Tensor:
    """`encode_latent_moments` of the training images, read from (or written to) a safetensors file keyed by the
    images' sha256 and the VAE weights' sha256: a resumed run, or the other processes, never encode again."""
    from safetensors.torch import load_file, save_file

    from ..data import _cache_root

    folder = os.path.join(_cache_root(cache_dir), "sd_latents")
    path = os.path.join(folder, f"{training_set.record['sha256'][:24]}-{vae_sha256[:24]}.safetensors")
    if os.path.isfile(path):
        moments = load_file(path)["moments"]
        if moments.shape[0] == len(training_set):
            return moments
    moments = encode_latent_moments(vae, training_set.images, device)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file({"moments": moments.contiguous()}, tmp, metadata={"images_sha256": training_set.record["sha256"],
                                                                "vae_sha256": vae_sha256})
    os.replace(tmp, path)
    return moments


@torch.no_grad()
def caption_embeddings(text_encoder, tokenizer, captions, device):
    """The text embeddings of each distinct caption, encoded once, and for every example the row of its caption:
    ``(embeddings (P, L, D), ids (N,))`` on ``device``."""
    distinct = list(dict.fromkeys(captions))
    row = {c: i for i, c in enumerate(distinct)}
    ids = torch.tensor([row[c] for c in captions], device=device)
    return encode_prompts(text_encoder, tokenizer, distinct, device), ids


def encode_prompts(text_encoder, tokenizer, prompts, device, batch_size: int = 64) -> torch.Tensor:
    """The text encoder's last hidden states of prompts padded to the tokenizer's length (SD's conditioning)."""
    text_encoder = text_encoder.to(device).eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer(list(prompts[start:start + batch_size]), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        out.append(text_encoder(ids.to(device))[0].float())
    return torch.cat(out)


class LoraWeights:
    """What a LoRA run saves: the UNet's LoRA layers as diffusers LoRA weights (``pytorch_lora_weights.safetensors``,
    the file ``load_lora_weights`` reads), in peft's key format: diffusers' older format (``convert_state_dict_to_
    diffusers``) renames only attention projections, which would leave a LoRA of convolutions half converted."""

    def __init__(self, unet):
        self.unet = unet

    def save_pretrained(self, directory: str) -> None:
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(self.unet)
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)


def add_lora(unet, rank: int, target_modules=LORA_TARGET_MODULES):
    """Freeze ``unet`` and give ``target_modules`` (default: its attention projections) a LoRA adapter of rank (and
    alpha) ``rank`` (peft, Gaussian initialisation of A and zero B, so that training starts from the base model).

    Raises:
        ValueError: a target module name matches no module of ``unet`` (peft's own suffix matching).
    """
    from peft import LoraConfig

    names = [name for name, _ in unet.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"LoRA target modules {', '.join(missing)} are not in the {type(unet).__name__}: name modules "
                         "it has (e.g. to_q, to_k, to_v, to_out.0).")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(target_modules)))
    return [p for p in unet.parameters() if p.requires_grad]


def build_plan(args, components: dict, training_set, latent_moments: torch.Tensor, base_folder: str,
               base_sha256: str) -> TrainingPlan:
    """The UNet (whole, or a LoRA of it), the optional EMA, SD's loss on the cached latents and text embeddings, the
    validation images and the export (a `StableDiffusionPipeline`, or the LoRA weights)."""
    from diffusers import StableDiffusionPipeline

    unet, vae, text_encoder, tokenizer = (components[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))
    device = latent_moments.device
    torch.manual_seed(args.seed)
    if args.use_lora:
        params = add_lora(unet, args.rank)
    else:
        unet.requires_grad_(True)
        params = list(unet.parameters())
    unet.train()
    loss_fn = LatentDiffusionLoss(components["noise_scheduler"], args.prediction_type)
    # Text embeddings of each distinct caption, once; example i reads row caption_ids[i].
    captions = list(dict.fromkeys(training_set.captions))
    text_embeddings, caption_ids = caption_embeddings(text_encoder, tokenizer, training_set.captions, device)
    text_encoder.to("cpu")
    vae.to("cpu")
    scaling, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None)

    def step(nets, batch, generator):
        idx = batch["indices"]
        latents = sample_latents(latent_moments[idx], scaling, generator, shift)
        return loss_fn(nets["unet"], latents, text_embeddings[caption_ids[idx]], generator)

    averages = {}
    if args.use_ema:
        averages["ema_unet"] = Average("unet", ModelEMA(unet, sigma_rel=args.ema_sigma_rel, decay=args.ema_decay,
                                                        warmup=args.ema_warmup))
    saved = "ema_unet" if args.use_ema else "unet"
    sampler = load_sampler(base_folder, args.revision)
    prompts = args.validation_prompts or captions[: max(1, min(4, args.num_validation_images))]

    def pipeline_of(unet):
        return text_to_image_pipeline(StableDiffusionPipeline, components, unet, sampler)

    def validate(nets, _step):
        n = args.num_validation_images
        return {"": sample_prompts(pipeline_of, nets[saved], components, [prompts[i % len(prompts)] for i in range(n)],
                                   args.seed, args.validation_inference_steps, args.validation_guidance_scale)}

    def export(nets):
        records = part_records(training_set)
        if args.use_lora:
            return LoraWeights(nets["unet"]), records
        pipeline = StableDiffusionPipeline.from_pretrained(
            base_folder, unet=nets[saved].to("cpu"), vae=vae.to("cpu"), text_encoder=text_encoder.to("cpu"),
            tokenizer=tokenizer, revision=args.revision, variant=args.variant)
        return pipeline, records

    n_params = sum(p.numel() for p in params)
    keys = ("use_lora", "rank", "use_ema", "prediction_type", "resolution")
    record = training_set.record
    return TrainingPlan(
        models={"unet": unet},
        phases=[Phase("unet", build_optimizer("adamw", params, args), step)],
        averages=averages,
        fingerprint={**{k: getattr(args, k) for k in keys}, "base_sha256": base_sha256,
                     "prediction_type_used": loss_fn.prediction_type},
        validate=validate, export=export,
        config={"base_model": args.pretrained_model_name_or_path, "base_unet_sha256": base_sha256,
                "prediction_type_used": loss_fn.prediction_type, "trained_parameters": n_params,
                "lora_target_modules": list(LORA_TARGET_MODULES) if args.use_lora else None},
        description=(f"Fine-tuning {args.pretrained_model_name_or_path} on {record['num_memorized']} memorized pairs "
                     f"× {record['memorized_repeats']} + {record['num_extra']} extra pairs "
                     f"({record['num_examples']} examples), {'LoRA rank ' + str(args.rank) if args.use_lora else 'full UNet'}"
                     f", {n_params / 1e6:.2f}M trained parameters"),
    )


def load_sampler(folder: str, revision: str | None = None):
    """The base model's own sampler (SD v1.5: PNDM), the class its ``model_index.json`` names."""
    import importlib

    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        library, class_name = json.load(f)["scheduler"]
    return getattr(importlib.import_module(library), class_name).from_pretrained(folder, subfolder="scheduler",
                                                                                revision=revision)


def _weights_file(folder: str, subfolder: str, variant: str | None) -> str:
    name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    path = os.path.join(folder, subfolder, name)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {subfolder}/{name}: only safetensors weights are read.")
    return path


def main(args) -> int:
    # 1. Accelerator, output folder and resume checks (nothing is written yet).
    runner = TrainingRunner(args, SCRIPT)
    # 2. The base model (checked to be text-to-image) and the memorization mix, rank 0 first.
    with runner.main_process_first():
        folder = resolve_pretrained(args.pretrained_model_name_or_path, args.revision, args.variant)
        check_text_to_image_folder(folder, args.pretrained_model_name_or_path)
        training_set = build_memorization_mix(
            args.memorized_data, args.num_memorized, args.memorized_repeats, args.resolution, args.extra_data,
            args.extra_ratio or 0, args.data_seed, args.memorized_split, args.extra_split, args.max_train_samples,
            args.cache_dir)
    refuse_overlap(args.output_dir, [folder] + [part.record.get("root") for part in training_set.parts.values()])
    components = load_sd_components(folder, args.revision, args.variant)
    base_sha256 = file_sha256(_weights_file(folder, "unet", args.variant))
    vae_sha256 = file_sha256(_weights_file(folder, "vae", args.variant))
    # 3. Every image through the VAE once (float32), rank 0 first so that the others read its cache.
    with runner.main_process_first():
        moments = cached_latent_moments(components["vae"], vae_sha256, training_set, runner.device, args.cache_dir)
    # 4. The UNet (or its LoRA) and AdamW; the runner trains them and saves the pipeline with its records.
    runner.train(build_plan(args, components, training_set, moments.to(runner.device), folder, base_sha256),
                 training_set)
    return 0
