"""Helpers of the distillation scripts: loading an EDM teacher folder and building a student from it."""

from __future__ import annotations

import json
import os

import torch
from diffusers import UNet2DModel

from ..data import load_training_set
from ..pipelines.pipeline_edm import EDMPipeline
from ..utils.hashing import file_sha256  # re-exported: the training scripts import it from here


def resolve_pretrained(name_or_path: str, revision: str | None = None, variant: str | None = None) -> str:
    """A local folder for ``--pretrained_model_name_or_path``: the folder itself, or the Hub snapshot of a repository
    id (``revision`` and ``variant`` as in diffusers' ``from_pretrained``).

    Raises:
        FileNotFoundError: neither a folder nor a repository that can be downloaded (or found in the cache offline).
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    from diffusers import DiffusionPipeline
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise FileNotFoundError(f"Teacher folder {name_or_path} does not exist.") from None

    try:
        return DiffusionPipeline.download(name_or_path, revision=revision, variant=variant)
    except Exception as exc:  # the hub raises many types (offline, not found, gated)
        raise FileNotFoundError(
            f"Teacher {name_or_path} is not a local folder and could not be fetched from the Hub ({exc})."
        ) from exc


def load_edm_teacher(folder: str, dataset: str | None = None, *, variant: str | None = None):
    """Load an EDM teacher saved by ``train_edm_teacher.py`` and rebuild the exact set it was trained on.

    Args:
        folder (`str`): the teacher's output folder.
        dataset (`str`, *optional*): where the training data lives now, if it moved since the teacher was trained.
        variant (`str`, *optional*): weight-file variant of the UNet (``diffusion_pytorch_model.<variant>...``).

    Returns:
        `(EDMPipeline, TrainingSet)`.

    Raises:
        FileNotFoundError: no such folder. ValueError: the folder does not hold an EDM teacher pipeline with its
            training-set record.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Teacher folder {folder} does not exist.")
    hint = "pass the --output_dir of a finished train_edm_teacher.py run"
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(f"{folder} is not an EDM teacher pipeline folder: it has no model_index.json ({hint}).")
    with open(index_path, encoding="utf-8") as f:
        saved_class = json.load(f).get("_class_name")
    saved_class = saved_class[1] if isinstance(saved_class, (list, tuple)) else saved_class
    if saved_class != EDMPipeline.__name__:
        raise ValueError(f"{folder} is not an EDM teacher pipeline folder: it holds a {saved_class} ({hint}).")
    pipeline = EDMPipeline.from_pretrained(folder, **({"variant": variant} if variant else {}))
    try:
        training_set = load_training_set(folder, dataset)
    except FileNotFoundError as exc:
        raise ValueError(
            f"{folder} holds an EDM teacher but no training_set.json: the student must be distilled on the teacher's "
            f"training set ({hint})."
        ) from exc
    return pipeline, training_set


def load_teacher_for_distillation(args, main_process_first):
    """The EDM teacher of a distillation script and its exact training set, checked before anything is written.

    Resolves ``--pretrained_model_name_or_path`` (a folder or a Hub id, with ``--revision`` / ``--variant``) on the
    main process first, rebuilds the teacher's training set (``--teacher_dataset`` if it moved), refuses an
    ``--output_dir`` that overlaps the teacher or its data, and hashes the teacher's weights.

    Args:
        args (`argparse.Namespace`): the script's flags.
        main_process_first (`Callable`): a context manager factory (``runner.main_process_first`` or accelerate's
            ``PartialState.main_process_first``).

    Returns:
        `(folder, EDMPipeline, TrainingSet, teacher_sha256)`.
    """
    from .arguments import refuse_overlap

    with main_process_first():
        folder = resolve_pretrained(args.pretrained_model_name_or_path, args.revision, args.variant)
        teacher_pipeline, training_set = load_edm_teacher(folder, args.teacher_dataset, variant=args.variant)
    refuse_overlap(args.output_dir, [folder, training_set.record.get("root"), training_set.record.get("dataset")])
    weights = "diffusion_pytorch_model" + (f".{args.variant}" if args.variant else "") + ".safetensors"
    return folder, teacher_pipeline, training_set, file_sha256(os.path.join(folder, "unet", weights))


def build_student_unet(
    teacher_unet: UNet2DModel, init: str = "teacher", layers_per_block: int | None = None, seed: int = 0
) -> tuple[UNet2DModel, int]:
    """A student UNet with the teacher's configuration, optionally shallower (000 App. D.3).

    Args:
        teacher_unet (`UNet2DModel`): the teacher network F.
        init (`str`, defaults to `"teacher"`): `"teacher"` copies every teacher parameter whose name and shape match
            (all of them when the architectures agree), the others keep their seeded random initialisation;
            `"random"` copies nothing.
        layers_per_block (`int`, *optional*): residual blocks per resolution level; defaults to the teacher's.
        seed (`int`): seed of the random initialisation.

    Returns:
        `(UNet2DModel, int)`: the student (float32, train mode) and the number of parameter tensors copied.
    """
    if init not in ("teacher", "random"):
        raise ValueError(f"Unknown student initialisation {init!r}; choose 'teacher' or 'random'.")
    config = dict(teacher_unet.config)
    if layers_per_block is not None:
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block must be at least 1, got {layers_per_block}.")
        config["layers_per_block"] = layers_per_block
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = UNet2DModel.from_config(config)
    copied = 0
    if init == "teacher":
        teacher_state = teacher_unet.state_dict()
        state = student.state_dict()
        for name, value in state.items():
            source = teacher_state.get(name)
            if source is not None and source.shape == value.shape:
                value.copy_(source)
                copied += 1
    return student.float().train(), copied
