"""Tiny Stable Diffusion components, built offline: the text-to-image path's tests and demo run on them through
exactly the loading code that ``stable-diffusion-v1-5/stable-diffusion-v1-5`` takes.

`save_tiny_sd_pipeline` writes a standard diffusers `StableDiffusionPipeline` folder (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; no safety checker) whose components have SD v1.5's
architecture at a small width: a `UNet2DConditionModel` with cross-attention, an `AutoencoderKL` with 4 latent
channels, a `CLIPTextModel` and a byte-level BPE `CLIPTokenizer` whose vocabulary and merges are written here (the
real CLIP vocabulary is a download), and SD v1.5's noise schedule (scaled-linear betas 0.00085 -> 0.012 over 1000
steps, epsilon prediction, a PNDM sampler as its ``scheduler_config.json`` names it).

    python -m diffusers_memdistill.models.tiny_sd --output_dir tiny-sd --resolution 32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Iterable, Sequence

import torch

# SD v1.5's scheduler_config.json (a PNDM sampler over the DDPM schedule it was trained with).
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}
# Words that get a token of their own (any other text is still tokenized, character by character).
DEFAULT_WORDS = ("a", "an", "the", "of", "photo", "picture", "handwritten", "digit", "number", "image", "drawing",
                 "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "memorized",
                 "unique", "white", "black", "on", "in", "with", "and")
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list:
    """The 256 symbols of byte-level BPE: printable bytes stand for themselves, the others are mapped to code points
    from 256 on, so that every byte has a visible, non-whitespace symbol (CLIP's and GPT-2's convention)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def write_clip_vocabulary(folder: str, words: Iterable[str] = DEFAULT_WORDS) -> tuple[str, str]:
    """Write a small CLIP BPE vocabulary: ``vocab.json`` (every byte symbol, alone and word-final, the merged words,
    the two special tokens) and ``merges.txt`` (merges that build each of ``words`` left to right).

    Returns:
        `tuple[str, str]`: the paths of ``vocab.json`` and ``merges.txt``.
    """
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    known, merges = set(vocab), []
    for word in dict.fromkeys(w.lower() for w in words):  # ordered, without repeats
        if not word or any(ch not in symbols for ch in word):
            raise ValueError(f"Tokenizer words must be non-empty printable ASCII without spaces, got {word!r}.")
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
    vocab += [BOS_TOKEN, EOS_TOKEN]
    os.makedirs(folder, exist_ok=True)
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_path, merges_path


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, max_length: int = 77):
    """A `transformers.CLIPTokenizer` over the vocabulary of `write_clip_vocabulary` (lower-cased, 77 tokens as SD)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_clip_vocabulary(folder, words)
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def tiny_sd_components(
    resolution: int = 32,
    unet_block_out_channels: Sequence[int] = (32, 64),
    vae_block_out_channels: Sequence[int] = (32, 64),
    cross_attention_dim: int = 32,
    text_layers: int = 2,
    words: Iterable[str] = DEFAULT_WORDS,
    seed: int = 0,
) -> dict:
    r"""
    The components of a tiny `StableDiffusionPipeline`, seeded.

    Args:
        resolution (`int`, defaults to 32): image side; the latents are ``resolution / 2^(len(vae_block_out_channels)
            - 1)`` on a side (SD v1.5: 512 -> 64 with four VAE levels).
        unet_block_out_channels (`Sequence[int]`, defaults to `(32, 64)`): widths of the UNet's levels; the first is a
            plain down block, the others cross-attention blocks (SD's layout, shortened).
        vae_block_out_channels (`Sequence[int]`, defaults to `(32, 64)`): widths of the VAE's levels.
        cross_attention_dim (`int`, defaults to 32): the text encoder's hidden size, which the UNet attends to.
        text_layers (`int`, defaults to 2): transformer layers of the text encoder.
        words (`Iterable[str]`): words with a token of their own (see `write_clip_vocabulary`).
        seed (`int`, defaults to 0): seed of every initialisation.

    Returns:
        `dict`: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``, ``safety_checker`` (None),
        ``feature_extractor`` (None): the keyword arguments of `StableDiffusionPipeline`.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    factor = 2 ** (len(vae_block_out_channels) - 1)
    if resolution % factor or resolution // factor < 2 ** (len(unet_block_out_channels) - 1):
        raise ValueError(f"resolution {resolution} must be a multiple of the VAE's factor {factor} and leave the "
                         f"UNet's {len(unet_block_out_channels)} levels at least one latent pixel.")
    groups = min(32, *unet_block_out_channels, *vae_block_out_channels)
    tokenizer = build_clip_tokenizer(words)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=resolution // factor, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=tuple(unet_block_out_channels),
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(unet_block_out_channels) - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (len(unet_block_out_channels) - 1) + ("UpBlock2D",),
            cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=groups,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_block_out_channels),
            down_block_types=("DownEncoderBlock2D",) * len(vae_block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_block_out_channels), layers_per_block=1,
            norm_num_groups=groups, sample_size=resolution,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
            num_attention_heads=4, num_hidden_layers=text_layers, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, projection_dim=cross_attention_dim,
        ))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": PNDMScheduler(**SD15_SCHEDULER_CONFIG), "safety_checker": None, "feature_extractor": None}


def tiny_sd_pipeline(**kwargs):
    """A `StableDiffusionPipeline` of `tiny_sd_components` (same arguments), without a safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**tiny_sd_components(**kwargs), requires_safety_checker=False)


def save_tiny_sd_pipeline(output_dir: str, **kwargs) -> str:
    """Save `tiny_sd_pipeline` (same keyword arguments) as a standard diffusers folder; returns ``output_dir``."""
    if os.path.isfile(os.path.join(output_dir, "model_index.json")):
        raise FileExistsError(f"{output_dir} already holds a pipeline; choose another folder.")
    tiny_sd_pipeline(**kwargs).save_pretrained(output_dir)
    return output_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny Stable Diffusion pipeline folder (random weights).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_tiny_sd_pipeline(args.output_dir, resolution=args.resolution, seed=args.seed))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
