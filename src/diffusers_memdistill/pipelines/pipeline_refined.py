"""The "+refine" control of 000 App. A as a pipeline: a generator's samples, re-noised to a level sigma and
reconstructed by an EDM teacher's probability-flow ODE (the PD+refine and DMD+refine rows of 000 Table A)."""

from __future__ import annotations

import json
import os
import shutil
from typing import List, Optional, Union

import torch
from diffusers import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..models.denoiser import EDMDenoiser
from ..registry import load_pipeline, register_pipeline, registration_for
from ..solvers import refine
from ..utils.hashing import file_sha256
from .sampling_utils import check_generators, postprocess_images

REFINED_CLASS_NAME = "RefinedPipeline"
# Records of the generator's folder that a refined folder carries (what `memdistill evaluate` reads beside a model).
_RECORDS = ("training_set.json", "training_config.json")


def weight_hashes(folder: str) -> dict:
    """sha256 of every ``*.safetensors`` file under a saved pipeline folder, by relative path."""
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                hashes[os.path.relpath(path, folder)] = file_sha256(path)
    return dict(sorted(hashes.items()))


class RefinedPipeline:
    r"""A registered generator's samples refined by an EDM teacher (000 App. A): each sample x (in [-1, 1]) is
    perturbed to the level ``sigma``, x + sigma n, and reconstructed with the teacher's deterministic Heun sampler
    from ``sigma`` to 0 ([`~diffusers_memdistill.solvers.refine`]).

    Generic over the generator: any pixel-space pipeline of `diffusers_memdistill.registry` (a PD or DMD student, a
    consistency student, ...), sampled through its registration with ``generator_steps`` steps. The teacher is an
    EDM denoiser pipeline (a ``unet`` F and a scheduler whose config has sigma_data, sigma_min and rho: `EDMPipeline`).
    Sample i's refinement noise n is drawn from its generator after the generator's own sampling, so that with
    one generator per sample (as `memdistill evaluate` passes) the samples do not depend on the batch.

    A refined pipeline is saved as a folder of references, not of weights: ``model_index.json`` names the two source
    folders with the sha256 of their weight files (checked when it is loaded), ``sigma`` and the step counts, and the
    generator's ``training_set.json`` is copied beside it, so that `memdistill evaluate --model DIR` audits it as a
    row of its own (a ``"generator"`` of the registry, registered when this module is imported). Build one with
    [`RefinedPipeline.from_sources`], then `save_pretrained`.

    Args:
        generator (`DiffusionPipeline`): the pipeline whose samples are refined (registered, pixel space).
        teacher (`DiffusionPipeline`): the EDM teacher.
        sigma (`float`): the refinement level (>= 0; 0 returns the generator's samples).
        num_steps (`int`, *optional*): Karras levels of the reconstruction; defaults to the teacher's scheduler's
            `num_inference_steps` (18 for EDM).
        generator_steps (`int`, *optional*): sampling steps of the generator; defaults to its registration's.
        sources (`dict`, *optional*): ``{"generator": path, "teacher": path}``, the saved folders (needed to save).
    """

    def __init__(self, generator, teacher, sigma: float, num_steps: Optional[int] = None,
                 generator_steps: Optional[int] = None, sources: Optional[dict] = None):
        sigma = float(sigma)
        if not sigma >= 0:
            raise ValueError(f"The refinement level sigma must be >= 0, got {sigma}.")
        registration = registration_for(generator)
        if registration.space != "pixel":
            raise ValueError(f"{registration.name} samples latents; refinement by a pixel-space EDM teacher needs a "
                             "pixel-space generator.")
        cfg = getattr(getattr(teacher, "scheduler", None), "config", None)
        if registration_for(teacher).kind != "teacher" or getattr(teacher, "unet", None) is None or cfg is None or \
                not all(hasattr(cfg, k) for k in ("sigma_data", "sigma_min", "rho")):
            raise ValueError(f"The teacher {type(teacher).__name__} is not an EDM teacher pipeline (a registered "
                             "teacher with a unet and a scheduler with sigma_data, sigma_min and rho: EDMPipeline).")
        teacher_shape = tuple(registration_for(teacher).noise_shape(teacher))
        image_shape = tuple(registration.image_shape(generator))
        if teacher_shape != image_shape:
            raise ValueError(f"The generator makes {image_shape} images but the teacher denoises {teacher_shape}.")
        teacher_classes = int(getattr(teacher.unet.config, "num_class_embeds", None) or 0)
        if teacher_classes != registration.num_classes(generator):
            raise ValueError(f"The generator has {registration.num_classes(generator)} classes, the teacher "
                             f"{teacher_classes}: refinement needs the same class conditioning.")
        num_steps = num_steps if num_steps is not None else (getattr(cfg, "num_inference_steps", None) or 18)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}.")
        self.generator, self.teacher, self.registration = generator, teacher, registration
        self.sigma, self.num_steps, self.sources = sigma, num_steps, dict(sources or {})
        self.generator_steps = generator_steps if generator_steps is not None else registration.steps(generator)

    # ------------------------------------------------------------ building, saving, loading

    @classmethod
    def from_sources(cls, generator: str, teacher: str, sigma: float, num_steps: Optional[int] = None,
                     generator_steps: Optional[int] = None) -> "RefinedPipeline":
        """Load the generator and the teacher from their saved folders (any registered classes) and refine with them.

        Args:
            generator (`str`): folder of the generator (e.g. a PD or DMD student).
            teacher (`str`): folder of the EDM teacher.
            sigma, num_steps, generator_steps: as in the class.
        """
        for role, path in (("generator", generator), ("teacher", teacher)):
            if not os.path.isdir(path):
                raise FileNotFoundError(f"The {role} folder {path} does not exist.")
        generator_pipe, _ = load_pipeline(generator)
        teacher_pipe, _ = load_pipeline(teacher)
        return cls(generator_pipe, teacher_pipe, sigma, num_steps, generator_steps,
                   sources={"generator": os.path.abspath(generator), "teacher": os.path.abspath(teacher)})

    def save_pretrained(self, save_directory: str) -> None:
        """Write the refined pipeline's folder: ``model_index.json`` (class, sources with the sha256 of their weights,
        sigma, steps) and the generator's ``training_set.json`` / ``training_config.json``."""
        if set(self.sources) != {"generator", "teacher"}:
            raise ValueError("This RefinedPipeline was built from pipelines, not folders: build it with "
                             "RefinedPipeline.from_sources(generator_dir, teacher_dir, sigma) to save it.")
        if not os.path.isfile(os.path.join(self.sources["generator"], "training_set.json")):
            raise FileNotFoundError(f"{self.sources['generator']} has no training_set.json to audit the refined "
                                    "samples against.")
        os.makedirs(save_directory, exist_ok=True)
        index = {
            "_class_name": REFINED_CLASS_NAME, "sigma": self.sigma, "num_steps": self.num_steps,
            "generator_steps": self.generator_steps,
            "generator": self.sources["generator"], "generator_class": self.registration.name,
            "generator_sha256": weight_hashes(self.sources["generator"]),
            "teacher": self.sources["teacher"], "teacher_class": type(self.teacher).__name__,
            "teacher_sha256": weight_hashes(self.sources["teacher"]),
        }
        for name in _RECORDS:
            source = os.path.join(self.sources["generator"], name)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(save_directory, name))
        with open(os.path.join(save_directory, "model_index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, folder: str, **kwargs) -> "RefinedPipeline":
        """Load a folder written by `save_pretrained`; the sources' weights must be those it recorded.

        Raises:
            ValueError: the folder holds another class, or a source's weight files changed since it was written.
        """
        path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} is not a saved pipeline folder: it has no model_index.json.")
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("_class_name") != REFINED_CLASS_NAME:
            raise ValueError(f"{folder} holds a {index.get('_class_name')}, not a {REFINED_CLASS_NAME}.")
        for role in ("generator", "teacher"):
            source = index[role]
            if not os.path.isdir(source):
                raise FileNotFoundError(f"The {role} of the refined pipeline {folder}, {source}, does not exist.")
            if weight_hashes(source) != index[f"{role}_sha256"]:
                raise ValueError(f"The weights of the {role} {source} changed since the refined pipeline {folder} was "
                                 "written: rebuild it with RefinedPipeline.from_sources.")
        return cls.from_sources(index["generator"], index["teacher"], index["sigma"], index["num_steps"],
                                index["generator_steps"])

    def to(self, device) -> "RefinedPipeline":
        self.generator.to(device)
        self.teacher.to(device)
        return self

    # ------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        r"""Sample the generator, then refine its samples.

        Args:
            batch_size (`int`): number of images.
            class_labels (`int`, `List[int]` or `torch.Tensor`, *optional*): one label per sample; required for
                class-conditional models (the teacher must see the generator's labels).
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): one CPU generator per sample (the
                generator's injected noise, then the refinement noise); drawn from the global RNG when omitted.
            latents (`torch.Tensor`, *optional*): the generator's unit-variance starting noise; drawn from the
                generators when omitted.
            output_type (`str`): `"pil"`, `"np"`, `"pt"` (NCHW in [0, 1]) or `"latent"` (the refined samples in
                [-1, 1], float32).
            return_dict (`bool`): return an [`ImagePipelineOutput`] or a tuple.
        """
        if generator is None:
            generator = [torch.Generator().manual_seed(int(torch.randint(2**62, ()))) for _ in range(batch_size)]
        generators = generator if isinstance(generator, list) else [generator] * batch_size
        check_generators(generators, batch_size, "cpu")
        labels = None
        if self.registration.num_classes(self.generator):
            if class_labels is None:
                raise ValueError("A class-conditional refined pipeline needs class_labels (the teacher must see the "
                                 "generator's labels).")
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).expand(batch_size).tolist()
        elif class_labels is not None:
            raise ValueError("class_labels were given but the generator is unconditional.")
        if latents is None:
            shape = (batch_size, *self.registration.noise_shape(self.generator))
            latents = randn_tensor(shape, generator=generators, dtype=torch.float32)
        images = self.registration.sample(self.generator, latents, generators, class_labels=labels,
                                          num_inference_steps=self.generator_steps)
        # The generator's samples in the teacher's range, perturbed to sigma and reconstructed (000 App. A).
        unet = self.teacher.unet
        device = next(unet.parameters()).device
        x = images.to(device, torch.float32) * 2 - 1
        noise = randn_tensor(x.shape, generator=generators, dtype=torch.float32).to(device)
        cfg = self.teacher.scheduler.config
        denoiser = EDMDenoiser(unet, cfg.sigma_data)
        cond = {} if labels is None else {"class_labels": torch.as_tensor(labels, device=device)}
        refined = refine(denoiser, x, self.sigma, noise, self.num_steps, cfg.sigma_min, cfg.rho, **cond)
        out = postprocess_images(refined, output_type)
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)


def _sample_refined(pipe, latents, generators, class_labels=None, prompts=None, num_inference_steps=None):
    """The registry's sampler: the generator with the steps the refined pipeline was built with, then refinement."""
    return pipe(batch_size=latents.shape[0], latents=latents, generator=list(generators), class_labels=class_labels,
                output_type="pt").images


# Registered here, where it is defined (the registry does not import this module: it uses the registry).
register_pipeline(RefinedPipeline, kind="generator", sample=_sample_refined,
                  noise_shape=lambda pipe: pipe.registration.noise_shape(pipe.generator),
                  num_classes=lambda pipe: pipe.registration.num_classes(pipe.generator))
