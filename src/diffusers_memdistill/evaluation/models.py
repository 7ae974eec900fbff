"""The models of an audit: where a saved folder or Hub id lives, whether it takes prompts, how it loads."""

from __future__ import annotations

import json
import os

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def local_model_folder(model: str) -> str:
    """A saved folder as is; a Hub id (``user/name``) as its local snapshot (downloaded, or read from the Hub cache
    offline), so that its pipeline and its ``training_set.json`` / ``training_config.json`` records are read alike."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model) or os.path.isabs(model) or model.startswith("."):
        raise FileNotFoundError(f"--model {model} is neither a saved pipeline folder nor a Hub id (user/name).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(model)
    except HFValidationError as exc:
        raise FileNotFoundError(f"--model {model} is neither a saved pipeline folder nor a Hub id: {exc}") from exc


def is_lora_folder(path: str) -> bool:
    """LoRA weights of a text-to-image model without a pipeline of their own."""
    return (not os.path.isfile(os.path.join(path, "model_index.json"))
            and os.path.isfile(os.path.join(path, LORA_WEIGHTS)))


def takes_prompts(model: str) -> bool:
    """Whether a saved folder or Hub id holds a text-to-image pipeline (its registration takes prompts), or the LoRA
    weights of one; read from the folder's records, without loading weights."""
    from ..registry import pipeline_class_name, registration_for

    path = local_model_folder(model)
    if is_lora_folder(path):
        return True
    return registration_for(pipeline_class_name(path)).takes_prompts


def training_config(path: str) -> dict:
    """The fields of a model's ``training_config.json`` that an audit reports (its loss and LPIPS weights)."""
    config_path = os.path.join(path, "training_config.json")
    if not os.path.isfile(config_path):
        return {}
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    return {k: config[k] for k in ("script", "loss", "lpips_net", "lpips_sha256") if k in config}


def load_model(path: str):
    """A registered pipeline from a saved folder, or the base model with the LoRA weights of a LoRA folder
    (``pytorch_lora_weights.safetensors`` and the ``training_config.json`` that names the base model; an LCM-LoRA of
    ``distill_lcm.py`` gets diffusers' `LCMScheduler`).

    Returns: ``(pipeline, registration)``.
    """
    from ..pipelines import pipeline_refined  # noqa: F401 (registers RefinedPipeline, the +refine rows)
    from ..registry import load_pipeline, registration_for

    if not is_lora_folder(path):
        return load_pipeline(path)
    config_path = os.path.join(path, "training_config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    base = config.get("pretrained_model_name_or_path") or config.get("pretrained_teacher_model")
    if not base:
        raise ValueError(f"{path} holds LoRA weights but no training_config.json naming its base model.")
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(local_model_folder(base))
    pipe.load_lora_weights(path)
    if config.get("script") == "distill_lcm.py":  # an LCM-LoRA samples with the LCMScheduler it was distilled for
        pipe.scheduler = LCMScheduler.from_config(
            pipe.scheduler.config, timestep_scaling=config.get("timestep_scaling_factor", 10.0),
            original_inference_steps=config.get("num_ddim_timesteps", 50), clip_sample=False)  # latents unclipped
    return pipe, registration_for(pipe)


def slug(name: str) -> str:
    """A report name as a file name (samples folders, figures)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")


__all__ = ["LORA_WEIGHTS", "is_lora_folder", "load_model", "local_model_folder", "slug", "takes_prompts",
           "training_config"]
