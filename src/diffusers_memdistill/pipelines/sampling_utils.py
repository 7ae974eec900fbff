"""What the package's UNet pipelines share: inputs (noise, class labels, generators), the denoising loop with
diffusers' step-end callbacks and interruption, and the conversion of the final sample to images."""

from typing import List, Optional, Union

import numpy as np
import torch
from diffusers import CMStochasticIterativeScheduler, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_generators(generator, batch_size: int, device) -> None:
    """One generator or one per sample, each on the CPU or on the device the pipeline runs on."""
    generators = generator if isinstance(generator, list) else [generator]
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"Got a list of {len(generator)} generators for a batch of {batch_size}.")
    device = torch.device(device)
    for g in generators:
        if g is not None and g.device.type not in ("cpu", device.type):
            raise ValueError(
                f"A generator on {g.device.type} cannot draw for a pipeline running on {device.type}: pass CPU "
                f"generators (they work on every device) or generators on {device.type}."
            )


def unet_sample_shape(unet) -> tuple:
    """(C, H, W) of the UNet's samples, pixels or latents."""
    cfg = unet.config
    size = cfg.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (cfg.in_channels, height, width)


def prepare_latents(unet, batch_size, latents, generator, device) -> torch.Tensor:
    """Unit-variance starting noise of shape (B, C, H, W), float32: the given ``latents``, validated, or drawn per
    sample (the pipeline scales it by the scheduler's `init_noise_sigma`)."""
    shape = (batch_size, *unet_sample_shape(unet))
    if latents is None:
        return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
    return latents.to(device, torch.float32)


def prepare_class_labels(unet, batch_size, class_labels, generator, device) -> Optional[torch.Tensor]:
    """Class labels for a class-conditional UNet: the given ones, validated, or drawn uniformly per sample.

    Each label is drawn on its generator's device (a CUDA generator draws on the GPU) and moved to ``device``.
    """
    num_classes = unet.config.num_class_embeds
    if not num_classes:
        if class_labels is not None:
            raise ValueError("class_labels were given but the UNet is unconditional (no num_class_embeds).")
        return None
    if class_labels is None:
        generators = generator if isinstance(generator, list) else [generator] * batch_size
        # One draw per sample from its own generator, so labels do not depend on the batch size.
        class_labels = [
            int(torch.randint(num_classes, (1,), generator=g, device=None if g is None else g.device).item())
            for g in generators
        ]
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 1 and batch_size > 1:
        labels = labels.expand(batch_size)
    if labels.numel() != batch_size:
        raise ValueError(f"Got {labels.numel()} class labels for a batch of {batch_size}.")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"class_labels must lie in [0, {num_classes}); got {labels.tolist()}.")
    return labels.to(device)


def postprocess_images(images: torch.Tensor, output_type: str):
    """Map samples in [-1, 1] to ``"pt"`` (NCHW in [0, 1], CPU), ``"np"`` (NHWC in [0, 1]) or ``"pil"``; NaNs stay
    NaN. ``"latent"`` returns the samples unchanged (float32, on their device)."""
    if output_type == "latent":
        return images
    images = ((images.float() + 1) / 2).clamp(0, 1)
    if output_type == "pt":
        return images.cpu()
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        return DiffusionPipeline.numpy_to_pil(np.nan_to_num(array))
    raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}.")


def network_timestep(scheduler, timestep: torch.Tensor) -> torch.Tensor:
    """The timestep the package's UNets are fed, c_noise = ln(sigma) / 4, from a scheduler's timestep.

    The package's schedulers and diffusers' EDM schedulers use c_noise itself (`ConsistencyStudentScheduler` times
    its `c_noise_scale`); `CMStochasticIterativeScheduler` uses 1000 c_noise, the scale of the original consistency
    checkpoints.
    """
    if isinstance(scheduler, CMStochasticIterativeScheduler):
        return timestep / 1000
    return timestep / getattr(scheduler.config, "c_noise_scale", 1.0)


class UNetSamplingMixin:
    """The denoising loop of a `DiffusionPipeline` with a ``unet`` and a ``scheduler`` of diffusers' contract, with
    diffusers' `callback_on_step_end`, `interrupt` and `num_timesteps`."""

    _callback_tensor_inputs = ["latents", "class_labels"]

    @property
    def num_timesteps(self) -> int:
        """Number of network evaluations of the last call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a callback to skip the remaining steps."""
        return self._interrupt

    def check_callback_inputs(self, callback_on_step_end, callback_on_step_end_tensor_inputs, output_type):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not among {self._callback_tensor_inputs}."
            )
        return list(callback_on_step_end_tensor_inputs or ())

    def denoise(
        self,
        latents: torch.Tensor,
        class_labels: Optional[torch.Tensor],
        generator: Optional[Union[torch.Generator, List[torch.Generator]]],
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Optional[List[str]] = None,
    ) -> torch.Tensor:
        """Run the scheduler's timesteps from unit-variance ``latents``; return the final sample (float32)."""
        scheduler, unet = self.scheduler, self.unet
        timesteps = scheduler.timesteps
        latents = latents * scheduler.init_noise_sigma
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            model_input = scheduler.scale_model_input(latents, t)
            cond = {} if class_labels is None else {"class_labels": class_labels}
            timestep = network_timestep(scheduler, t)
            model_output = unet(model_input.to(unet.dtype), timestep, **cond, return_dict=False)[0]
            latents = scheduler.step(model_output.float(), t, latents, generator=generator).prev_sample.float()
            if callback_on_step_end is not None:
                local = {"latents": latents, "class_labels": class_labels}
                outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                latents = outputs.pop("latents", latents)
                class_labels = outputs.pop("class_labels", class_labels)
        return latents
