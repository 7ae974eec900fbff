"""Tiny Stable Diffusion components built offline load through diffusers' standard StableDiffusionPipeline path."""

import json

import pytest
import torch

from diffusers_memdistill.models.tiny_sd import (
    SD15_SCHEDULER_CONFIG,
    build_clip_tokenizer,
    save_tiny_sd_pipeline,
    tiny_sd_components,
)


def test_tokenizer_merges_known_words_and_spells_the_rest():
    tok = build_clip_tokenizer(["handwritten", "digit"])
    ids = tok("A Handwritten DIGIT 3!").input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    # Lower-cased, whole words where a merge chain exists, characters otherwise, wrapped in CLIP's specials.
    assert tokens == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "3</w>", "!</w>", "<|endoftext|>"]
    assert tok.model_max_length == 77 and tok.pad_token == "<|endoftext|>"
    with pytest.raises(ValueError, match="printable ASCII"):
        build_clip_tokenizer(["two words"])


def test_saved_folder_is_a_standard_stable_diffusion_pipeline(tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    path = save_tiny_sd_pipeline(str(tmp_path / "sd"), resolution=16, seed=1)
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    # SD v1.5's noise schedule, read by the training scripts' DDPMScheduler as by the pipeline's PNDM sampler.
    ddpm = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    assert all(ddpm.config[k] == v for k, v in SD15_SCHEDULER_CONFIG.items() if k in ddpm.config)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.vae_scale_factor == 2
    images = pipe(["a handwritten digit 3", "a photo"], num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # Seeded: the same seed builds the same weights, another seed different ones.
    again = tiny_sd_components(resolution=16, seed=1)["unet"].state_dict()
    other = tiny_sd_components(resolution=16, seed=2)["unet"].state_dict()
    saved = pipe.unet.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in again.items())
    assert not all(torch.equal(saved[k], v) for k, v in other.items())
    with pytest.raises(FileExistsError):
        save_tiny_sd_pipeline(path)
    with pytest.raises(ValueError, match="multiple of the VAE"):
        tiny_sd_components(resolution=15)
