"""Sampling pipeline for EDM pixel-space teachers (unconditional or class-conditional)."""

from typing import List, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from ..models.denoiser import EDMDenoiser
from ..schedulers.scheduling_edm_heun import EDMHeunScheduler
from .pipeline_io import SingleFilePipelineMixin


def prepare_class_labels(unet, batch_size, class_labels, generator, device) -> Optional[torch.Tensor]:
    """Class labels for a class-conditional UNet: the given ones, validated, or drawn uniformly per sample."""
    num_classes = unet.config.num_class_embeds
    if not num_classes:
        if class_labels is not None:
            raise ValueError("class_labels were given but the UNet is unconditional (no num_class_embeds).")
        return None
    if class_labels is None:
        generators = generator if isinstance(generator, list) else [generator] * batch_size
        # One draw per sample from its own generator, so labels do not depend on the batch size.
        class_labels = [int(torch.randint(num_classes, (1,), generator=g).item()) for g in generators]
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 1 and batch_size > 1:
        labels = labels.expand(batch_size)
    if labels.numel() != batch_size:
        raise ValueError(f"Got {labels.numel()} class labels for a batch of {batch_size}.")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"class_labels must lie in [0, {num_classes}); got {labels.tolist()}.")
    return labels.to(device)


def prepare_latents(unet, batch_size, latents, generator, device) -> torch.Tensor:
    """Unit-variance starting noise of shape (B, C, H, W): the given ``latents``, validated, or drawn per sample."""
    cfg = unet.config
    shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if latents is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
    return latents.to(device, torch.float32)


def postprocess_images(images: torch.Tensor, output_type: str):
    """Map samples in [-1, 1] to ``"pt"`` (NCHW in [0, 1]), ``"np"`` (NHWC in [0, 1]) or ``"pil"``; NaNs stay NaN."""
    images = ((images.float() + 1) / 2).clamp(0, 1)
    if output_type == "pt":
        return images.cpu()
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        return DiffusionPipeline.numpy_to_pil(np.nan_to_num(array))
    raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")


class EDMPipeline(SingleFilePipelineMixin, DiffusionPipeline):
    r"""Pipeline for EDM teachers: a `UNet2DModel` sampled with EDM's Heun sampler ([`EDMHeunScheduler`]).

    Args:
        unet (`UNet2DModel`): the network F of the EDM denoiser (class-conditional through `num_class_embeds`).
        scheduler (`EDMHeunScheduler`): grid, sigma_data and stochasticity of the sampler.
    """

    single_file_name = "pipeline_edm"
    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: EDMHeunScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        num_inference_steps: Optional[int] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        r"""Sample images.

        Args:
            batch_size (`int`): number of images.
            class_labels (`int`, `List[int]` or `torch.Tensor`, *optional*): labels for a class-conditional UNet;
                drawn uniformly (per sample, from its generator) when omitted.
            num_inference_steps (`int`, *optional*): number N of noise levels (2N - 1 network evaluations);
                defaults to the scheduler's (18).
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): one generator per sample makes
                each sample independent of the batch it is drawn in.
            latents (`torch.Tensor`, *optional*): unit-variance starting noise of shape (B, C, H, W).
            output_type (`str`): `"pil"`, `"np"` or `"pt"`.

        Returns:
            [`ImagePipelineOutput`] or a tuple whose first element is the images.
        """
        device = self._execution_device
        latents = prepare_latents(self.unet, batch_size, latents, generator, device)
        labels = prepare_class_labels(self.unet, batch_size, class_labels, generator, device)
        denoiser = EDMDenoiser(self.unet, self.scheduler.config.sigma_data)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sigmas = self.scheduler.sigmas

        x = latents * sigmas[0]
        for i in self.progress_bar(range(len(sigmas) - 1)):
            x_hat, sigma_hat = self.scheduler.churn(x, i, generator)
            # Euler step.
            out = self.scheduler.step(denoiser(x_hat, sigma_hat, labels), sigma_hat, x_hat, i)
            x = out.prev_sample
            # Apply 2nd order correction.
            if sigmas[i + 1] > 0:
                denoised_next = denoiser(x, sigmas[i + 1], labels)
                x = self.scheduler.step_correct(denoised_next, sigma_hat, x_hat, out.derivative, x, i).prev_sample

        images = postprocess_images(x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
