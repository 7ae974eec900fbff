"""Saving and loading of the package's pipelines so that a saved folder also loads without the package.

`save_pretrained` writes, beside diffusers' usual folder, a self-contained single-file pipeline (diffusers'
custom-pipeline convention: ``model_index.json`` names ``["<file>", "<Class>"]``), so that
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` works where this package is not
installed. The pipeline's own `from_pretrained` loads each component with the class its ``__init__`` names, and
takes diffusers' keyword arguments: components passed by name, ``torch_dtype`` / ``dtype`` (one dtype, or a dict
by component name with an optional ``"default"``), ``variant`` and ``use_safetensors``.
"""

import inspect
import json
import os

import torch
from diffusers import DiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin

from ..utils.bundle import render

_LIBRARIES = ("diffusers", "transformers")
_MODEL_KWARGS = ("variant", "use_safetensors")


def single_file_source(name: str) -> str:
    """The source text of the single-file pipeline ``name`` (e.g. ``"pipeline_edm"``)."""
    if __name__.split(".")[0] != "diffusers_memdistill":
        # This code runs from a rendered single file (the package is not imported): ship that file as it is.
        with open(os.path.abspath(__file__), encoding="utf-8") as f:
            return f.read()
    return render(name)


def component_dtype(dtype, name: str):
    """The dtype of component ``name`` under a pipeline-level ``torch_dtype`` (a dtype, a dict or `None`)."""
    if isinstance(dtype, dict):
        dtype = dtype.get(name, dtype.get("default"))
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"torch_dtype must be a torch.dtype or a dict of them, got {dtype!r} for {name}.")
    return dtype


class SingleFilePipelineMixin:
    """Mixin for `DiffusionPipeline` subclasses shipped with a single-file twin; set ``single_file_name``."""

    single_file_name: str = None

    def save_pretrained(self, save_directory, **kwargs):
        super().save_pretrained(save_directory, **kwargs)
        name = self.single_file_name
        source = single_file_source(name)
        with open(os.path.join(save_directory, name + ".py"), "w", encoding="utf-8") as f:
            f.write(source)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = [name, type(self).__name__]
        for component_name, component in self.components.items():
            if component is None or type(component).__module__.split(".")[0] in _LIBRARIES:
                continue
            # Components defined in the single file load from a copy of it in their sub-folder.
            with open(os.path.join(save_directory, component_name, name + ".py"), "w", encoding="utf-8") as f:
                f.write(source)
            index[component_name] = [name, type(component).__name__]
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder (or Hub repo) saved by `save_pretrained`.

        Each component is loaded with the class that the pipeline's ``__init__`` names, unless it is passed by name
        (``scheduler=EDMEulerScheduler(...)``, say). ``torch_dtype`` (or ``dtype``) is one dtype or a dict by
        component name with an optional ``"default"``; with ``variant`` and ``use_safetensors`` it is passed to the
        models. Other keyword arguments go to the Hub download.
        """
        parameters = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        passed = {name: kwargs.pop(name) for name in parameters if name in kwargs}
        torch_dtype, dtype = kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None)
        if torch_dtype is not None and dtype is not None:
            raise ValueError("Pass either torch_dtype or dtype, not both.")
        dtype = torch_dtype if dtype is None else dtype
        model_kwargs = {k: kwargs.pop(k) for k in _MODEL_KWARGS if k in kwargs}
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            folder = DiffusionPipeline.download(folder, **kwargs)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{folder} is not a saved pipeline: it has no model_index.json.")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        saved_class = index.get("_class_name")
        saved_class = saved_class[1] if isinstance(saved_class, (list, tuple)) else saved_class
        if saved_class != cls.__name__:
            raise ValueError(f"{folder} holds a {saved_class}, not a {cls.__name__}.")
        components = {}
        for name, parameter in parameters.items():
            if name in passed:
                components[name] = passed[name]
            elif name in index:
                component_class = parameter.annotation
                if issubclass(component_class, ModelMixin):
                    components[name] = component_class.from_pretrained(
                        folder, subfolder=name, torch_dtype=component_dtype(dtype, name), **model_kwargs)
                else:
                    components[name] = component_class.from_pretrained(folder, subfolder=name)
        return cls(**components)
