"""Sampling pipeline for progressive-distillation students of EDM teachers (K-step deterministic DDIM)."""

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel

from ..schedulers.scheduling_edm_ddim import EDMDDIMScheduler
from .pipeline_io import SingleFilePipelineMixin
from .sampling_utils import (
    UNetSamplingMixin,
    check_generators,
    postprocess_images,
    prepare_class_labels,
    prepare_latents,
)


class ProgressiveDistillationPipeline(SingleFilePipelineMixin, UNetSamplingMixin, DiffusionPipeline):
    r"""Pipeline for progressive-distillation students (Salimans & Ho 2022): a `UNet2DModel` F in EDM's
    parameterization, D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), sampled with K deterministic DDIM steps on
    the nested Karras grid of [`EDMDDIMScheduler`]. K is the student's round (the scheduler's `num_inference_steps`):
    a student of round r took one step where the student of round r - 1 took two.

    Args:
        unet (`UNet2DModel`): the student network F (class-conditional through `num_class_embeds`).
        scheduler (`EDMDDIMScheduler`): grid, sigma_data and the student's number of steps.
    """

    single_file_name = "pipeline_progressive"
    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: EDMDDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        num_inference_steps: Optional[int] = None,
        sigmas: Optional[Sequence[float]] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[[DiffusionPipeline, int, torch.Tensor, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
    ):
        r"""Sample images.

        Args:
            batch_size (`int`): number of images.
            class_labels (`int`, `List[int]` or `torch.Tensor`, *optional*): labels for a class-conditional UNet;
                drawn uniformly (per sample, from its generator) when omitted.
            num_inference_steps (`int`, *optional*): number K of DDIM steps; defaults to the scheduler's (the
                student's round).
            sigmas (`Sequence[float]`, *optional*): all K + 1 levels instead of `num_inference_steps`.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): one generator per sample makes each
                sample independent of the batch it is drawn in (only labels are drawn from it: the sampler is
                deterministic).
            latents (`torch.Tensor`, *optional*): unit-variance starting noise z of shape (B, C, H, W); the scheduler's
                `init_noise_sigma` (sigma_max) scales it.
            output_type (`str`): `"pil"`, `"np"`, `"pt"` (NCHW in [0, 1]) or `"latent"` (the final sample in [-1, 1],
                unclamped, float32).
            return_dict (`bool`): return an [`ImagePipelineOutput`] or a tuple.
            callback_on_step_end (`Callable` or `PipelineCallback`, *optional*): called after each network evaluation
                as ``callback_on_step_end(pipe, i, t, callback_kwargs)``; the tensors it returns replace the
                pipeline's. Setting ``pipe._interrupt = True`` skips the remaining steps.
            callback_on_step_end_tensor_inputs (`List[str]`): the tensors passed in ``callback_kwargs``.

        Returns:
            [`ImagePipelineOutput`] or a tuple whose first element is the images.
        """
        tensor_inputs = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                                   output_type)
        device = self._execution_device
        check_generators(generator, batch_size, device)
        latents = prepare_latents(self.unet, batch_size, latents, generator, device)
        labels = prepare_class_labels(self.unet, batch_size, class_labels, generator, device)
        if sigmas is not None:
            self.scheduler.set_timesteps(device=device, sigmas=sigmas)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        images = self.denoise(latents, labels, generator, callback_on_step_end, tensor_inputs)
        images = postprocess_images(images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
