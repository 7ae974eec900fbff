"""Sampling pipeline for consistency students of EDM teachers (1-step or multistep, CM Alg. 1)."""

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel

from ..schedulers.scheduling_consistency import ConsistencyStudentScheduler
from .pipeline_io import SingleFilePipelineMixin
from .sampling_utils import (
    UNetSamplingMixin,
    check_generators,
    postprocess_images,
    prepare_class_labels,
    prepare_latents,
)


class ConsistencyStudentPipeline(SingleFilePipelineMixin, UNetSamplingMixin, DiffusionPipeline):
    r"""Pipeline for consistency students: a `UNet2DModel` F in the consistency parameterization
    f(x, sigma) = c_skip x + c_out F(c_in x; c_noise) with f(x, sigma_min) = x, sampled in one or a few steps with
    [`ConsistencyStudentScheduler`] (or diffusers' `CMStochasticIterativeScheduler`, whose 1000-times timesteps the
    pipeline converts to the c_noise = ln(sigma) / 4 the UNet is fed).

    Args:
        unet (`UNet2DModel`): the student network F (class-conditional through `num_class_embeds`).
        scheduler (`ConsistencyStudentScheduler`): noise levels, sigma_data and sigma_min of the student.
    """

    single_file_name = "pipeline_consistency"
    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: ConsistencyStudentScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        num_inference_steps: Optional[Union[int, Sequence[float]]] = None,
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
            num_inference_steps (`int` or `Sequence[float]`, *optional*): the number m of student evaluations
                (1: x = f(sigma_max z, sigma_max); m > 1: the scheduler's default levels), or the list of
                intermediate noise levels tau_2 > ... > tau_m visited after sigma_max. Defaults to the scheduler's.
            sigmas (`Sequence[float]`, *optional*): all m noise levels tau_1 > ... > tau_m, passed to the scheduler's
                `set_timesteps` instead of `num_inference_steps`.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): one generator per sample makes
                each sample independent of the batch it is drawn in; CPU generators work on every device.
            latents (`torch.Tensor`, *optional*): unit-variance starting noise of shape (B, C, H, W); the scheduler's
                `init_noise_sigma` scales it.
            output_type (`str`): `"pil"`, `"np"`, `"pt"` (NCHW in [0, 1]) or `"latent"` (the final sample in [-1, 1],
                unclamped, float32).
            return_dict (`bool`): return an [`ImagePipelineOutput`] or a tuple.
            callback_on_step_end (`Callable` or `PipelineCallback`, *optional*): called after each student evaluation
                as ``callback_on_step_end(pipe, i, t, callback_kwargs)``; the tensors it returns (`"latents"`,
                `"class_labels"`) replace the pipeline's. Setting ``pipe._interrupt = True`` skips the remaining steps.
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
        elif num_inference_steps is None or isinstance(num_inference_steps, int):
            if num_inference_steps is None:
                num_inference_steps = getattr(self.scheduler.config, "num_inference_steps", None) or 1
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            self.scheduler.set_timesteps(device=device, intermediate_sigmas=list(num_inference_steps))

        images = self.denoise(latents, labels, generator, callback_on_step_end, tensor_inputs)
        images = postprocess_images(images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
