"""Sampling pipeline for consistency students of EDM teachers (1-step or multistep, CM Alg. 1)."""

from typing import List, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel

from ..models.denoiser import ConsistencyDenoiser
from ..schedulers.scheduling_consistency import ConsistencyStudentScheduler
from .pipeline_edm import postprocess_images, prepare_class_labels, prepare_latents
from .pipeline_io import SingleFilePipelineMixin


class ConsistencyStudentPipeline(SingleFilePipelineMixin, DiffusionPipeline):
    r"""Pipeline for consistency students: a `UNet2DModel` F in the consistency parameterization
    f(x, sigma) = c_skip x + c_out F(c_in x; c_noise) with f(x, sigma_min) = x, sampled in one or a few steps with
    [`ConsistencyStudentScheduler`].

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
            num_inference_steps (`int` or `Sequence[float]`, *optional*): the number m of student evaluations
                (1: x = f(sigma_max z, sigma_max); m > 1: the scheduler's default levels), or the list of
                intermediate noise levels tau_2 > ... > tau_m visited after sigma_max. Defaults to the scheduler's.
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
        if num_inference_steps is None or isinstance(num_inference_steps, int):
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            self.scheduler.set_timesteps(device=device, intermediate_sigmas=list(num_inference_steps))
        sigmas = self.scheduler.sigmas
        student = ConsistencyDenoiser(self.unet, self.scheduler.config.sigma_data, self.scheduler.config.sigma_min)

        x = latents * sigmas[0]
        for i in self.progress_bar(range(len(sigmas))):
            # x = f(x_tau, tau), then fresh noise at the next level.
            x = self.scheduler.step(student(x, sigmas[i], labels), i, generator).prev_sample

        images = postprocess_images(x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
