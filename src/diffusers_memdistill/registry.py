"""The evaluation registry: how to load and sample each `DiffusionPipeline` class, keyed by the class's name.

`memdistill evaluate` never names a pipeline class: it asks the registration of a model's class how to load the
model, how to sample it from given noise, and in which space its samples live. A registration
([`PipelineRegistration`]) records, for one pipeline class:

- ``kind``: ``"teacher"`` (a diffusion model sampled with many steps), ``"student"`` (a few-step distilled model
  sampled at the step counts asked for) or ``"generator"`` (a one-step generator, e.g. DMD);
- ``load(path_or_hub_id, **kwargs)``: the pipeline from a saved folder or a Hub id (default: the class's
  ``from_pretrained``);
- ``sample(pipe, latents, generators, class_labels=None, prompts=None, num_inference_steps=None)``: the samples
  from GIVEN unit-variance starting noise ``latents`` (B, *noise_shape), with one CPU generator per sample for the
  noise the sampler injects; for ``space="pixel"`` images in [0, 1] NCHW, for ``space="latent"`` the final latents
  (what ``output_type="latent"`` returns), which the registry decodes through ``pipe.vae``;
- ``space``: ``"pixel"`` or ``"latent"``;
- ``noise_shape(pipe)``: (C, H, W) of the starting noise; ``num_classes(pipe)``: 0 for unconditional models;
- ``default_steps``: an int, a callable of the pipeline, or `None`;
- for teachers that have them, ``ode_map(pipe, latents, class_labels, num_steps)``, the deterministic K-step ODE map
  Phi_K(z), and ``one_step_map(pipe, latents, class_labels)``, Phi_1(z) = D(sigma_max z; sigma_max), in the same
  space as ``sample`` (the pairing metric of 003 Def. 3.1 compares students with them);
- ``takes_prompts``: whether ``prompts`` are accepted (text-to-image pipelines).

Registered here: the package's `EDMPipeline` (teacher), `ConsistencyStudentPipeline` (student),
`DMDGeneratorPipeline` and `ProgressiveDistillationPipeline` (generators, sampled with their trained steps), and
diffusers' `DDPMPipeline`, `DDIMPipeline` (teachers), `ConsistencyModelPipeline` (student) and
`StableDiffusionPipeline` (a text-to-image teacher in latent space; its ``sample`` also takes ``guidance_scale``; with
an `LCMScheduler`, an LCM-LoRA or a DMD generator, 4 steps or the generator's K, without guidance) and `LatentConsistencyModelPipeline` (an LCM student, 4 steps).
`RefinedPipeline` (a registered generator's samples refined by an EDM teacher, 000 App. A) registers itself where it
is defined, `pipelines/pipeline_refined.py`, which uses this registry; `memdistill evaluate` imports it.

Adding a pipeline is one call, wherever the pipeline is defined::

    from diffusers_memdistill.registry import register_pipeline

    def sample_my_generator(pipe, latents, generators, class_labels=None, prompts=None, num_inference_steps=None):
        return pipe(latents=latents, generator=generators, class_labels=class_labels, output_type="pt").images

    register_pipeline("MyGeneratorPipeline", kind="generator", sample=sample_my_generator, default_steps=1,
                      load=MyGeneratorPipeline.from_pretrained)

Then `load_pipeline(path)`, `sample_images(pipe, latents, ...)` and `teacher_pairing_maps(pipe, latents, ...)` serve
it; `registration_for(pipe_or_class_or_name)` and `pipeline_class_name(path)` look registrations up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

KINDS = ("teacher", "student", "generator")
SPACES = ("pixel", "latent")


class UnregisteredPipelineError(ValueError):
    """A pipeline class that has no registration."""


@dataclass(frozen=True)
class PipelineRegistration:
    """How the evaluation loads and samples one pipeline class (see the module docstring for each field)."""

    name: str
    kind: str
    sample: Callable
    load: Callable
    space: str = "pixel"
    noise_shape: Callable = None
    num_classes: Callable = None
    default_steps: Union[int, Callable, None] = None
    ode_map: Optional[Callable] = None
    one_step_map: Optional[Callable] = None
    takes_prompts: bool = False

    @property
    def has_pairing_maps(self) -> bool:
        """Whether the pairing metric can use this pipeline as its teacher (Phi_K and Phi_1 are registered)."""
        return self.ode_map is not None and self.one_step_map is not None

    def steps(self, pipe) -> Optional[int]:
        """The default number of sampling steps of ``pipe``."""
        return self.default_steps(pipe) if callable(self.default_steps) else self.default_steps

    def image_shape(self, pipe) -> tuple:
        """(C, H, W) of the images the evaluation sees: the noise shape, or the VAE-decoded one for latent models."""
        shape = tuple(self.noise_shape(pipe))
        if self.space == "pixel":
            return shape
        vae = pipe.vae.config
        factor = 2 ** (len(vae.block_out_channels) - 1)
        return (vae.out_channels, shape[1] * factor, shape[2] * factor)


_REGISTRY: dict = {}


def unet_noise_shape(pipe) -> tuple:
    """(C, H, W) of the samples of ``pipe.unet``: the default ``noise_shape``."""
    from .pipelines.sampling_utils import unet_sample_shape

    return unet_sample_shape(pipe.unet)


def unet_num_classes(pipe) -> int:
    """Number of class embeddings of ``pipe.unet`` (0 when unconditional): the default ``num_classes``."""
    return int(getattr(pipe.unet.config, "num_class_embeds", None) or 0)


def register_pipeline(
    pipeline_class,
    *,
    kind: str,
    sample: Callable,
    load: Optional[Callable] = None,
    space: str = "pixel",
    noise_shape: Callable = unet_noise_shape,
    num_classes: Callable = unet_num_classes,
    default_steps: Union[int, Callable, None] = None,
    ode_map: Optional[Callable] = None,
    one_step_map: Optional[Callable] = None,
    takes_prompts: bool = False,
    overwrite: bool = False,
) -> PipelineRegistration:
    """Register how the evaluation loads and samples a pipeline class.

    Args:
        pipeline_class (`type` or `str`): the `DiffusionPipeline` subclass, or its name (the ``_class_name`` of its
            ``model_index.json``; a class loaded through ``trust_remote_code`` under the same name matches too).
        kind (`str`): ``"teacher"``, ``"student"`` or ``"generator"``.
        sample (`Callable`): ``sample(pipe, latents, generators, class_labels=None, prompts=None,
            num_inference_steps=None)``, see the module docstring.
        load (`Callable`, *optional*): ``load(path_or_hub_id, **kwargs)``; defaults to the class's
            ``from_pretrained`` (a name must then be one of diffusers' classes).
        space (`str`): ``"pixel"`` or ``"latent"`` (samples decoded through ``pipe.vae``).
        noise_shape, num_classes (`Callable`): of the pipeline; default to its UNet's.
        default_steps (`int` or `Callable`, *optional*): default sampling steps.
        ode_map, one_step_map (`Callable`, *optional*): Phi_K and Phi_1 of a teacher, for the pairing metric.
        takes_prompts (`bool`): whether ``sample`` accepts prompts.
        overwrite (`bool`): replace an existing registration of the same name instead of raising.

    Returns:
        The [`PipelineRegistration`].
    """
    name = pipeline_class if isinstance(pipeline_class, str) else pipeline_class.__name__
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}.")
    if (ode_map is None) != (one_step_map is None):
        raise ValueError("Register both ode_map and one_step_map (the pairing metric needs both) or neither.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"{name} is already registered; pass overwrite=True to replace its registration.")
    if load is None:
        cls = pipeline_class
        if isinstance(cls, str):
            import diffusers

            cls = getattr(diffusers, name, None)
            if cls is None:
                raise ValueError(f"{name} is not a diffusers class: pass load= to register it by name.")
        load = cls.from_pretrained
    registration = PipelineRegistration(
        name=name, kind=kind, sample=sample, load=load, space=space, noise_shape=noise_shape,
        num_classes=num_classes, default_steps=default_steps, ode_map=ode_map, one_step_map=one_step_map,
        takes_prompts=takes_prompts,
    )
    _REGISTRY[name] = registration
    return registration


def unregister_pipeline(pipeline_class) -> None:
    """Remove a registration (a class or its name)."""
    name = pipeline_class if isinstance(pipeline_class, str) else pipeline_class.__name__
    registration_for(name)
    del _REGISTRY[name]


def registered_pipelines() -> list:
    """The names of the registered pipeline classes, sorted."""
    return sorted(_REGISTRY)


def registration_for(pipeline) -> PipelineRegistration:
    """The registration of a pipeline instance, a pipeline class or a class name.

    Raises:
        UnregisteredPipelineError: the class is not registered (the message lists the registered ones).
    """
    if isinstance(pipeline, str):
        name = pipeline
    elif isinstance(pipeline, type):
        name = pipeline.__name__
    else:
        name = type(pipeline).__name__
    if name not in _REGISTRY:
        raise UnregisteredPipelineError(
            f"{name} is not registered for evaluation; registered: {', '.join(registered_pipelines())}. Register it "
            "with diffusers_memdistill.registry.register_pipeline."
        )
    return _REGISTRY[name]


def pipeline_class_name(path: str, **kwargs) -> str:
    """The pipeline class named by the ``model_index.json`` of a folder or Hub id (``_class_name`` as a string, or
    the ``[module, class]`` list of a folder loaded with ``trust_remote_code``). Keyword arguments go to the Hub
    download of ``model_index.json``."""
    from diffusers import DiffusionPipeline

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path} is not a saved pipeline folder: it has no model_index.json.")
    try:
        index = DiffusionPipeline.load_config(path, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"Cannot read the model_index.json of {path}: {exc}") from exc
    name = index.get("_class_name")
    if isinstance(name, (list, tuple)):
        name = name[-1]
    if not isinstance(name, str):
        raise ValueError(f"The model_index.json of {path} names no pipeline class (_class_name={name!r}).")
    return name


def load_pipeline(path: str, **kwargs):
    """Load a registered pipeline from a folder or Hub id; returns ``(pipeline, registration)``.

    Keyword arguments (``torch_dtype``, a scheduler, ...) go to the registration's ``load``.
    """
    registration = registration_for(pipeline_class_name(path))
    pipe = registration.load(path, **kwargs)
    return pipe, registration


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (float32, NaNs kept) from latents in the denoiser's space: ``vae.decode(latents /
    scaling_factor + shift_factor)``, the decoder's [-1, 1] output mapped to [0, 1]."""
    cfg = vae.config
    scaled = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    parameter = next(vae.parameters())
    images = vae.decode(scaled.to(parameter.device, parameter.dtype), return_dict=False)[0]
    return ((images.float() + 1) / 2).clamp(0, 1)


def _to_images(registration: PipelineRegistration, pipe, samples: torch.Tensor) -> torch.Tensor:
    if registration.space == "latent":
        samples = decode_latents(pipe.vae, samples)
    return samples.float().clamp(0, 1).cpu()


def _chunks(n: int, batch_size: Optional[int]):
    step = n if not batch_size else batch_size
    return [slice(start, min(start + step, n)) for start in range(0, n, max(step, 1))]


def _take(values, index: slice):
    return None if values is None else values[index]


@torch.no_grad()
def sample_images(
    pipe,
    latents: torch.Tensor,
    generators: Optional[Sequence[torch.Generator]] = None,
    class_labels: Optional[Union[Sequence[int], torch.Tensor]] = None,
    prompts: Optional[Sequence[str]] = None,
    num_inference_steps=None,
    batch_size: Optional[int] = None,
    guidance_scale: Optional[float] = None,
) -> torch.Tensor:
    """Sample a registered pipeline from given starting noise, in batches; images in [0, 1], float32 NCHW, CPU.

    Args:
        pipe (`DiffusionPipeline`): a pipeline of a registered class (moved to its device by the caller).
        latents (`torch.Tensor`): unit-variance starting noise of shape (N, *noise_shape).
        generators (`Sequence[torch.Generator]`, *optional*): one CPU generator per sample for the noise the
            sampler injects; samples then do not depend on the batch size. Defaults to generators seeded 0..N-1.
        class_labels (`Sequence[int]` or `torch.Tensor`, *optional*): one label per sample (class-conditional).
        prompts (`Sequence[str]`, *optional*): one prompt per sample (text-to-image pipelines).
        num_inference_steps (*optional*): passed to the registration's ``sample``; defaults to its default steps.
        batch_size (`int`, *optional*): samples per call; all at once when omitted.
        guidance_scale (`float`, *optional*): classifier-free guidance of text-to-image pipelines, passed to their
            ``sample`` as ``guidance_scale=`` when given (the pipeline's default otherwise).

    Returns:
        `torch.Tensor` of shape (N, *image_shape); NaNs are kept.
    """
    registration = registration_for(pipe)
    n = latents.shape[0]
    expected = tuple(registration.noise_shape(pipe))
    if tuple(latents.shape[1:]) != expected:
        raise ValueError(f"{registration.name} samples from noise of shape {expected}, got {tuple(latents.shape[1:])}.")
    if prompts is not None and not registration.takes_prompts:
        raise ValueError(f"{registration.name} takes no prompts.")
    generators = list(generators) if generators is not None else [torch.Generator().manual_seed(i) for i in range(n)]
    for name, values in (("generators", generators), ("class_labels", class_labels), ("prompts", prompts)):
        if values is not None and len(values) != n:
            raise ValueError(f"Got {len(values)} {name} for {n} samples.")
    if class_labels is not None and not registration.num_classes(pipe):
        raise ValueError(f"{registration.name} is unconditional: class_labels cannot be used.")
    if guidance_scale is not None and not registration.takes_prompts:
        raise ValueError(f"{registration.name} takes no prompts: guidance_scale cannot be used.")
    if num_inference_steps is None:
        num_inference_steps = registration.steps(pipe)
    extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    images = []
    for index in _chunks(n, batch_size):
        labels = _take(class_labels, index)
        samples = registration.sample(pipe, latents[index], generators[index],
                                      class_labels=None if labels is None else torch.as_tensor(labels).tolist(),
                                      prompts=_take(prompts, index), num_inference_steps=num_inference_steps,
                                      **extra)
        images.append(_to_images(registration, pipe, samples))
    return torch.cat(images)


@torch.no_grad()
def teacher_pairing_maps(
    pipe,
    latents: torch.Tensor,
    class_labels: Optional[Union[Sequence[int], torch.Tensor]] = None,
    num_steps: int = 8,
    batch_size: Optional[int] = None,
):
    """Phi_K(z), the teacher's deterministic K-step ODE map (003 uses K = 8), and Phi_1(z) = D(sigma_max z;
    sigma_max), as images in [0, 1] (float32 NCHW, CPU), for the pairing metric.

    Raises:
        ValueError: the pipeline's registration has no ODE map.
    """
    registration = registration_for(pipe)
    if not registration.has_pairing_maps:
        with_maps = [name for name in registered_pipelines() if _REGISTRY[name].has_pairing_maps]
        raise ValueError(f"{registration.name} has no registered ODE map; the pairing metric needs a teacher that "
                         f"has one: {', '.join(with_maps)}.")
    multi, single = [], []
    for index in _chunks(latents.shape[0], batch_size):
        labels = _take(class_labels, index)
        labels = None if labels is None else torch.as_tensor(labels).tolist()
        multi.append(_to_images(registration, pipe, registration.ode_map(pipe, latents[index], labels, num_steps)))
        single.append(_to_images(registration, pipe, registration.one_step_map(pipe, latents[index], labels)))
    return torch.cat(multi), torch.cat(single)


# ---------------------------------------------------------------------------------------------- the package's pipelines


def _sample_package_pipeline(pipe, latents, generators, class_labels=None, prompts=None, num_inference_steps=None):
    """The package's pipelines take the noise, the generators and the labels themselves."""
    kwargs = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=latents.shape[0], latents=latents, generator=list(generators), class_labels=class_labels,
                output_type="pt", **kwargs).images


def _edm_ode_map(pipe, latents, class_labels, num_steps):
    """The teacher's deterministic Heun sampler with ``num_steps`` levels (EDM Alg. 1, whatever its scheduler)."""
    from .schedulers.scheduling_edm_heun import EDMHeunScheduler

    heun = type(pipe)(unet=pipe.unet, scheduler=EDMHeunScheduler.from_config(pipe.scheduler.config, s_churn=0.0))
    heun.set_progress_bar_config(disable=True)
    return heun(batch_size=latents.shape[0], latents=latents, class_labels=class_labels,
                num_inference_steps=num_steps, output_type="pt").images


def _edm_one_step_map(pipe, latents, class_labels):
    """D(sigma_max z; sigma_max) mapped from [-1, 1] to [0, 1]."""
    from .models.denoiser import EDMDenoiser

    cfg = pipe.scheduler.config
    device = pipe._execution_device
    labels = None if class_labels is None else torch.as_tensor(class_labels, device=device)
    denoised = EDMDenoiser(pipe.unet, cfg.sigma_data)(latents.to(device, torch.float32) * cfg.sigma_max,
                                                      cfg.sigma_max, labels)
    return ((denoised + 1) / 2).clamp(0, 1)


def _scheduler_steps(pipe) -> Optional[int]:
    return getattr(pipe.scheduler.config, "num_inference_steps", None)


# ----------------------------------------------------------------------------------------- diffusers' own pipelines


def sample_with_scheduler_loop(pipe, latents, generators, class_labels=None, num_inference_steps=None, **step_kwargs):
    """diffusers' denoising loop of a ``unet`` + ``scheduler`` pipeline (DDPM, DDIM, consistency models), started from
    GIVEN unit-variance noise (the stock pipelines draw it themselves): images in [0, 1].

    With ``latents`` drawn from the same per-sample generators first, it reproduces the stock pipeline's samples.
    Missing class labels of a class-conditional UNet are drawn per sample from the generators.
    """
    from .pipelines.sampling_utils import prepare_class_labels

    unet, scheduler = pipe.unet, pipe.scheduler
    device = pipe._execution_device
    generators = list(generators)
    labels = prepare_class_labels(unet, latents.shape[0], class_labels, generators, device)
    cond = {} if labels is None else {"class_labels": labels}
    scheduler.set_timesteps(num_inference_steps, device=device)
    sample = latents.to(device, unet.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = unet(scheduler.scale_model_input(sample, t), t, **cond, return_dict=False)[0]
        sample = scheduler.step(model_output, t, sample, generator=generators, **step_kwargs).prev_sample
    return (sample.float() / 2 + 0.5).clamp(0, 1)


def _sample_ddpm(pipe, latents, generators, class_labels=None, prompts=None, num_inference_steps=None):
    return sample_with_scheduler_loop(pipe, latents, generators, class_labels, num_inference_steps)


def _sample_ddim(pipe, latents, generators, class_labels=None, prompts=None, num_inference_steps=None):
    return sample_with_scheduler_loop(pipe, latents, generators, class_labels, num_inference_steps, eta=0.0)


def _sample_consistency_model(pipe, latents, generators, class_labels=None, prompts=None, num_inference_steps=None):
    return sample_with_scheduler_loop(pipe, latents, generators, class_labels, num_inference_steps)


def _is_lcm_sampled(pipe) -> bool:
    """A Stable Diffusion pipeline sampled by an `LCMScheduler`: an LCM-LoRA loaded on its teacher, or a DMD generator
    (``distill_dmd.py`` on a Stable Diffusion teacher)."""
    from diffusers import LCMScheduler

    return isinstance(pipe.scheduler, LCMScheduler)


def _stable_diffusion_steps(pipe) -> int:
    """50 for a teacher; with an `LCMScheduler`, 4, or K for a K-step DMD generator (``original_inference_steps`` = K
    below 4)."""
    if not _is_lcm_sampled(pipe):
        return 50
    return min(4, int(pipe.scheduler.config.original_inference_steps or 50))


def _sample_stable_diffusion(pipe, latents, generators, class_labels=None, prompts=None, num_inference_steps=None,
                             guidance_scale=None):
    """diffusers' StableDiffusionPipeline from GIVEN unit-variance latents (it scales them by the scheduler's
    ``init_noise_sigma``) and one prompt per sample; the final latents (``output_type="latent"``).

    With an `LCMScheduler` (an LCM-LoRA on its teacher, or a DMD generator) the guidance is the one distilled into the
    weights: it samples at ``guidance_scale=1`` (no classifier-free guidance), whatever ``guidance_scale`` says."""
    if prompts is None:
        raise ValueError("StableDiffusionPipeline samples from prompts: pass one prompt per sample.")
    if _is_lcm_sampled(pipe):
        guidance_scale = 1.0
    kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=list(prompts), latents=latents.to(pipe._execution_device, pipe.unet.dtype),
                generator=list(generators), num_inference_steps=num_inference_steps, output_type="latent",
                **kwargs).images


def _sample_latent_consistency(pipe, latents, generators, class_labels=None, prompts=None, num_inference_steps=None,
                               guidance_scale=None):
    """diffusers' LatentConsistencyModelPipeline (an LCM student, its guidance embedded: ``guidance_scale`` g feeds
    w = g - 1) from GIVEN unit-variance latents and one prompt per sample; the final latents."""
    if prompts is None:
        raise ValueError("LatentConsistencyModelPipeline samples from prompts: pass one prompt per sample.")
    kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=list(prompts), latents=latents.to(pipe._execution_device, pipe.unet.dtype),
                generator=list(generators), num_inference_steps=num_inference_steps, output_type="latent",
                **kwargs).images


def _register_defaults():
    from .pipelines.pipeline_consistency import ConsistencyStudentPipeline
    from .pipelines.pipeline_dmd import DMDGeneratorPipeline
    from .pipelines.pipeline_edm import EDMPipeline
    from .pipelines.pipeline_progressive import ProgressiveDistillationPipeline

    register_pipeline(EDMPipeline, kind="teacher", sample=_sample_package_pipeline, default_steps=_scheduler_steps,
                      ode_map=_edm_ode_map, one_step_map=_edm_one_step_map)
    register_pipeline(ConsistencyStudentPipeline, kind="student", sample=_sample_package_pipeline,
                      default_steps=_scheduler_steps)
    register_pipeline(DMDGeneratorPipeline, kind="generator", sample=_sample_package_pipeline,
                      default_steps=_scheduler_steps)
    # A progressive-distillation student samples with its round's number of DDIM steps.
    register_pipeline(ProgressiveDistillationPipeline, kind="generator", sample=_sample_package_pipeline,
                      default_steps=_scheduler_steps)
    register_pipeline("DDPMPipeline", kind="teacher", sample=_sample_ddpm,
                      default_steps=lambda pipe: pipe.scheduler.config.num_train_timesteps)
    register_pipeline("DDIMPipeline", kind="teacher", sample=_sample_ddim, default_steps=50)
    register_pipeline("ConsistencyModelPipeline", kind="student", sample=_sample_consistency_model, default_steps=1)
    register_pipeline("StableDiffusionPipeline", kind="teacher", sample=_sample_stable_diffusion, space="latent",
                      default_steps=_stable_diffusion_steps, takes_prompts=True)
    # An LCM student (distill_lcm.py) samples in 4 steps.
    register_pipeline("LatentConsistencyModelPipeline", kind="student", sample=_sample_latent_consistency,
                      space="latent", default_steps=4, takes_prompts=True)


_register_defaults()
