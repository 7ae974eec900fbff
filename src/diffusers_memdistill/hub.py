"""Sharing saved models on the Hugging Face Hub: model cards that report measured memorization, and the upload.

A card is rendered with `huggingface_hub.ModelCard.from_template` from the templates in ``model_card_templates/``
(one per kind of model: EDM teacher, consistency student, DMD generator, Stable Diffusion memorization fine-tune,
LCM / LCM-LoRA student) and from what the model folder records: ``model_index.json`` and the scheduler config
(sampling settings), ``training_set.json`` (data provenance and size), ``training_config.json`` (the command and
the resolved config) and, when the model was evaluated, the ``metrics.json`` of ``memdistill evaluate``. The card
never shows a number that is not in those files: a metric absent from ``metrics.json`` is "not measured", and a
model without a readable ``metrics.json`` is "not evaluated".

`push_to_hub_folder` builds the exact folder that goes to the Hub (the pipeline in safetensors, its single-file
pipeline for ``trust_remote_code`` loading, the card, the figures and ``metrics.json``), then publishes it in one
commit. ``memdistill push`` and ``memdistill card`` are its command line; ``memdistill push`` first audits the model
for memorization (`hub_audit.audit_before_push`) unless it is given an earlier audit or ``--no_audit``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .utils.redact import redact_config

TEMPLATES_DIR = Path(__file__).resolve().parent / "model_card_templates"

# The licence of what this project trains from scratch (pyproject.toml); a model derived from another inherits its.
PROJECT_LICENSE = "apache-2.0"
# Licences of the usual base models, for when their card is not in the local Hub cache (no network is assumed).
KNOWN_BASE_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
}
DEFAULT_WARNING_THRESHOLD = 0.01

# Weight formats that can carry pickled code: never uploaded.
PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
# Keys of training_config.json that hold the command line rather than the resolved configuration.
_COMMAND_KEYS = ("command", "argv", "command_line")
# Keys of training_config.json that name the model a run started from, most specific first.
_PARENT_KEYS = ("teacher", "pretrained_teacher_model", "pretrained_model_name_or_path", "base_model")


@dataclass(frozen=True)
class CardKind:
    """A kind of model and the template of its card."""

    name: str
    title: str
    tags: tuple
    pipeline_tag: str = "unconditional-image-generation"


KINDS = {
    "edm_teacher": CardKind("edm_teacher", "EDM teacher", ("edm", "diffusion")),
    "consistency_student": CardKind("consistency_student", "consistency student",
                                    ("consistency-distillation", "consistency-model")),
    "dmd_generator": CardKind("dmd_generator", "DMD generator", ("dmd", "distribution-matching-distillation")),
    "progressive_student": CardKind("progressive_student", "progressive-distillation student",
                                    ("progressive-distillation",)),
    "sd_memorization": CardKind("sd_memorization", "Stable Diffusion memorization fine-tune",
                                ("stable-diffusion", "text-to-image"), "text-to-image"),
    "lcm_student": CardKind("lcm_student", "latent consistency student", ("lcm", "latent-consistency-model",
                                                                         "text-to-image"), "text-to-image"),
}
PIPELINE_KINDS = {
    "EDMPipeline": "edm_teacher",
    "ConsistencyStudentPipeline": "consistency_student",
    "DMDGeneratorPipeline": "dmd_generator",
    "ProgressiveDistillationPipeline": "progressive_student",
    "StableDiffusionPipeline": "sd_memorization",
    "LatentConsistencyModelPipeline": "lcm_student",
}
SCRIPT_KINDS = {
    "train_edm_teacher": "edm_teacher",
    "distill_consistency": "consistency_student",
    "distill_dmd": "dmd_generator",
    "distill_progressive": "progressive_student",
    "finetune_sd_memorize": "sd_memorization",
    "distill_lcm": "lcm_student",
}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


class MalformedMetricsError(ValueError):
    """``metrics.json`` is not what ``memdistill evaluate`` writes."""


class HubTokenError(RuntimeError):
    """No Hugging Face token is available for an upload."""


# ---------------------------------------------------------------------------------------------------------------
# The model folder.


@dataclass
class ModelFolder:
    """What a saved model folder records, read without loading any weights."""

    path: str
    kind: CardKind
    model_index: dict | None  # None for a LoRA folder
    pipeline_class: str | None
    single_file: str | None  # the custom pipeline file (without .py) that trust_remote_code loads, if any
    components: list  # sub-folders named by model_index.json
    is_lora: bool
    training_set: dict | None
    training_config: dict | None
    scheduler_config: dict | None

    @property
    def text_to_image(self) -> bool:
        return self.kind.pipeline_tag == "text-to-image" or "text_encoder" in self.components

    @property
    def pipeline_tag(self) -> str:
        """The Hub task: text-to-image for any model with a text encoder (a DMD generator of Stable Diffusion too)."""
        return "text-to-image" if self.text_to_image else self.kind.pipeline_tag


def _read_json(path: str, what: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({what}): {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} ({what}) holds a {type(data).__name__}, not an object.")
    return data


def _script_name(config: dict | None) -> str | None:
    script = (config or {}).get("script")
    return None if not isinstance(script, str) else os.path.splitext(os.path.basename(script))[0]


def inspect_model_folder(model_dir: str, kind: str | None = None) -> ModelFolder:
    r"""
    Read a saved model folder: its pipeline, the kind of card it gets and its training records.

    Args:
        model_dir (`str`): a folder written by `save_pretrained` (with ``model_index.json``), or a LoRA folder
            (with ``pytorch_lora_weights.safetensors``).
        kind (`str`, *optional*): one of ``KINDS``; by default from the training script that wrote the folder
            (``training_config.json``), else from the pipeline class.

    Raises:
        `FileNotFoundError`: the folder is not a saved pipeline. `ValueError`: its kind cannot be told.
    """
    path = os.path.abspath(str(model_dir))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{model_dir} is not a folder.")
    index = _read_json(os.path.join(path, "model_index.json"), "the pipeline index")
    is_lora = index is None and os.path.isfile(os.path.join(path, LORA_WEIGHTS))
    if index is None and not is_lora:
        raise FileNotFoundError(
            f"{model_dir} is not a saved pipeline: it has neither model_index.json nor {LORA_WEIGHTS}.")
    pipeline_class = single_file = None
    components = []
    if index is not None:
        class_name = index.get("_class_name")
        if isinstance(class_name, list) and len(class_name) == 2:
            single_file, pipeline_class = class_name
        else:
            pipeline_class = class_name
        components = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
                            and len(v) == 2 and v[0] is not None)
    training_config = _read_json(os.path.join(path, "training_config.json"), "the training config")
    if kind is None:
        kind = SCRIPT_KINDS.get(_script_name(training_config)) or PIPELINE_KINDS.get(pipeline_class)
    if kind not in KINDS:
        raise ValueError(
            f"Cannot tell what kind of model {model_dir} holds (pipeline {pipeline_class}, script "
            f"{_script_name(training_config)}); pass kind= one of {', '.join(KINDS)}.")
    scheduler_config = _read_json(os.path.join(path, "scheduler", "scheduler_config.json"), "the scheduler config")
    training_set = _read_json(os.path.join(path, "training_set.json"), "the training-set record")
    return ModelFolder(path, KINDS[kind], index, pipeline_class, single_file, components, is_lora, training_set,
                       training_config, scheduler_config)


# ---------------------------------------------------------------------------------------------------------------
# Secrets.


def _known_tokens(token: str | None) -> list:
    """The token passed and the one huggingface_hub would use, to check that none is written anywhere."""
    tokens = [token] if token else []
    try:
        from huggingface_hub import get_token

        stored = get_token()
    except Exception:  # noqa: BLE001 - an unreadable login is not an error when nothing is uploaded
        stored = None
    if stored and stored not in tokens:
        tokens.append(stored)
    return tokens


def _assert_no_token(folder: str, tokens: list) -> None:
    needles = [t.encode() for t in tokens if t]
    if not needles:
        return
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            if any(n in data for n in needles):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    if found:
        raise RuntimeError(f"{', '.join(sorted(found))} would contain the Hugging Face token; nothing was written or "
                           "uploaded. Remove the token from the model folder's files.")


# ---------------------------------------------------------------------------------------------------------------
# metrics.json: strict reading, the rows of one model, no number that was not measured.


def _reject_constant(name):
    raise MalformedMetricsError(f"it contains {name}, which is not JSON")


def read_metrics(path: str) -> dict:
    """``metrics.json`` as written by ``memdistill evaluate``; `MalformedMetricsError` otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            results = json.loads(f.read(), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMetricsError(f"{path} is not valid JSON ({exc})") from exc
    except MalformedMetricsError as exc:
        raise MalformedMetricsError(f"{path}: {exc}") from exc
    if not isinstance(results, dict) or not isinstance(results.get("models"), dict):
        raise MalformedMetricsError(f"{path} has no 'models' object: it was not written by memdistill evaluate")
    for name, row in results["models"].items():
        if not isinstance(row, dict):
            raise MalformedMetricsError(f"{path}: models[{name!r}] is a {type(row).__name__}, not an object")
    return results


def _number(container, key, where, fraction=False):
    """A measured number, or None when absent/null; anything else is malformed."""
    if not isinstance(container, dict) or container.get(key) is None:
        return None
    value = container[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MalformedMetricsError(f"{where}.{key} is {value!r}, not a number")
    if fraction and not 0.0 <= value <= 1.0:
        raise MalformedMetricsError(f"{where}.{key} is {value}, not a fraction in [0, 1]")
    return float(value)


def _count(container, key, where):
    value = _number(container, key, where)
    if value is not None and (value < 0 or value != int(value)):
        raise MalformedMetricsError(f"{where}.{key} is {value}, not a count")
    return None if value is None else int(value)


def _section(row, key, where):
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MalformedMetricsError(f"{where}.{key} is a {type(value).__name__}, not an object")
    return value


@dataclass
class MetricsRow:
    """One evaluated configuration (a model at a number of sampling steps), with only measured numbers.

    ``values`` maps a metric id (``METRIC_COLUMNS``), suffixed ``:<preprocessing>`` for SSCD measured under several
    preprocessings, to its value; a metric that was not measured has no entry.
    """

    name: str
    role: str  # "model", "reference" (e.g. the teacher) or "floor" (held-out real images)
    steps: int | None = None
    training_set: str | None = None  # the evaluation's id of the training set, when it records one
    num_samples: int | None = None
    num_nan_samples: int | None = None
    values: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)  # "l2" / "sscd" -> threshold
    sscd_preprocessings: dict = field(default_factory=dict)  # variant (None: the only one) -> description or None
    figures: dict = field(default_factory=dict)  # "samples"/"memorized" -> figure file name
    prompts: str | None = None  # a text-to-image row's prompts: "training prompts" or "held-out prompts"


# metric id -> (column header, shown as a percentage)
METRIC_COLUMNS = {
    "fid": ("FID ↓", False),
    "fd_pixel": ("FD (pixels) ↓", False),
    "clip": ("CLIP score ↑", False),
    "l2_memorized": ("Memorized (L2 ratio < {l2})", True),
    "l2_p95": ("L2 ratio p95", False),
    "sscd_memorized": ("SSCD > {sscd}", True),
    "sscd_mean": ("SSCD mean", False),
    "sscd_p95": ("SSCD p95", False),
    "delta_e": ("ΔE vs teacher", False),
}
# metric id -> model-index metric type and name
EVAL_RESULT_TYPES = {
    "fid": ("fid", "FID against the training set"),
    "fd_pixel": ("fd_pixel", "Fréchet distance of raw pixels to the training set"),
    "clip": ("clip_score", "CLIP score"),
    "l2_memorized": ("memorization_l2_ratio", "Fraction of samples memorized (L2 nearest-neighbour ratio)"),
    "l2_p95": ("l2_ratio_p95", "95th percentile of the L2 nearest-neighbour ratio"),
    "sscd_memorized": ("memorization_sscd", "Fraction of samples memorized (SSCD similarity)"),
    "sscd_mean": ("sscd_mean", "Mean SSCD similarity to the nearest training image"),
    "sscd_p95": ("sscd_p95", "95th percentile of the SSCD similarity to the nearest training image"),
    "delta_e": ("pairing_delta_e", "Pairing inefficiency ΔE against the teacher's ODE map"),
}
_STATISTICS_KEYS = ("fraction_memorized", "threshold", "num_samples", "p95", "mean")


def _split_metric(key: str):
    base, _, variant = key.partition(":")
    return base, variant or None


def _description(value) -> str | None:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else None


def _row_from_entry(name, entry, role, where, slug, sscd_descriptions=None) -> MetricsRow:
    row = MetricsRow(name=name, role=role)
    steps = entry.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
        raise MalformedMetricsError(f"{where}.steps is {steps!r}, not an integer")
    row.steps = steps
    row.training_set = entry.get("training_set") if isinstance(entry.get("training_set"), str) else None
    row.prompts = entry.get("prompt_set") if isinstance(entry.get("prompt_set"), str) else None
    row.num_nan_samples = _count(entry, "num_nan_samples", where)
    for key in ("fid", "fd_pixel"):
        value = _number(entry, key, where)
        if value is not None:
            row.values[key] = value
    clip = entry.get("clip")
    clip_value = _number(clip, "mean", where + ".clip") if isinstance(clip, dict) else _number(entry, "clip", where)
    if clip_value is not None:
        row.values["clip"] = clip_value
    l2 = _section(entry, "l2", where)
    if l2 is not None:
        row.num_samples = _count(l2, "num_samples", where + ".l2")
        threshold = _number(l2, "threshold", where + ".l2")
        if threshold is not None:
            row.thresholds["l2"] = threshold
        for key, metric, frac in (("fraction_memorized", "l2_memorized", True), ("p95", "l2_p95", False)):
            value = _number(l2, key, where + ".l2", fraction=frac)
            if value is not None:
                row.values[metric] = value
    sscd = _section(entry, "sscd", where)
    if sscd is not None:
        # One set of statistics, or one per preprocessing ({"sscd": {...}, "dcr": {...}}).
        flat = any(k in sscd for k in _STATISTICS_KEYS)
        variants = [(None, sscd)] if flat else [(p, _section(sscd, p, where + ".sscd")) for p in sscd]
        for variant, stats in variants:
            at = where + ".sscd" + ("" if variant is None else f".{variant}")
            suffix = "" if variant is None else f":{variant}"
            row.num_samples = row.num_samples or _count(stats, "num_samples", at)
            threshold = _number(stats, "threshold", at)
            if threshold is not None:
                row.thresholds["sscd"] = threshold
            row.sscd_preprocessings[variant] = _description(stats.get("preprocessing")) or _description(
                (sscd_descriptions or {}).get(variant))
            for key, metric, frac in (("fraction_memorized", "sscd_memorized", True), ("mean", "sscd_mean", False),
                                      ("p95", "sscd_p95", False)):
                value = _number(stats, key, at, fraction=frac)
                if value is not None:
                    row.values[metric + suffix] = value
    pairing = _section(entry, "pairing", where)
    if pairing is not None:
        value = _number(pairing, "delta_e", where + ".pairing")
        if value is not None:
            row.values["delta_e"] = value
    if slug is not None:
        row.figures = {"samples": f"samples_{slug}.png", "memorized": f"memorized_{slug}.png"}
    return row


def _slug(name: str) -> str:
    # The figure names of memdistill evaluate.
    from .evaluation.models import slug

    return slug(name)


def _same_folder(a, b) -> bool:
    return isinstance(a, str) and isinstance(b, str) and os.path.realpath(a) == os.path.realpath(b)


@dataclass
class Evaluation:
    """What a card says about measurements: either ``evaluated`` rows, or the reason it was not evaluated."""

    evaluated: bool
    reason: str | None = None
    path: str | None = None
    rows: list = field(default_factory=list)  # this model's rows
    reference_rows: list = field(default_factory=list)  # its teacher's, from the same run
    floor_rows: list = field(default_factory=list)
    floor_notes: list = field(default_factory=list)  # why a floor row is absent, as the evaluation says
    settings: dict = field(default_factory=dict)
    not_computed: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # the evaluation's own warnings
    null_values: dict = field(default_factory=dict)  # metrics.json path of a null value -> what it was
    weights: list = field(default_factory=list)  # (metric, description) of the weights that produced numbers
    sscd_preprocessings: dict = field(default_factory=dict)  # variant -> description
    figures_dir: str | None = None
    histograms: list = field(default_factory=list)

    @property
    def all_rows(self):
        return self.rows + self.reference_rows + self.floor_rows


def _floor_entries(results: dict, training_sets: set) -> tuple:
    """Entries of held-out real images scored against the same training set (the floor of each statistic).

    ``floor`` is one entry, or one per training-set id; rows of kind ``floor`` count too. Returns the
    (name, entry) pairs and the evaluation's notes on floors it could not measure."""
    floors, notes = [], []
    floor = results.get("floor")
    if isinstance(floor, dict) and any(k in floor for k in ("l2", "sscd", "fid", "fd_pixel")):
        floors.append(("held-out real images (floor)", floor))
    elif isinstance(floor, dict):
        mine = {tid: e for tid, e in floor.items() if isinstance(e, dict) and (not training_sets or tid in training_sets)}
        for tid, entry in mine.items():
            where = f"{entry.get('dataset')} {entry.get('split')}" if entry.get("dataset") and entry.get("split") else tid
            floors.append((f"held-out real images ({where}, floor)", entry))
    for name, entry in results["models"].items():
        if entry.get("kind") in ("floor", "held_out", "held-out"):
            floors.append((name, entry))
    floor_notes = results.get("floor_notes")
    if isinstance(floor_notes, dict):
        notes = [str(v) for tid, v in floor_notes.items()
                 if v and (not training_sets or tid in training_sets) and not any(tid in n for n, _ in floors)]
    return floors, notes


def load_evaluation(model: ModelFolder, metrics_path: str | None, row_names=None) -> Evaluation:
    r"""
    The measured rows of ``model`` in a ``metrics.json`` (this model's rows, its teacher's and the floor rows).

    Rows are this model's when their ``path`` is the model folder (or the folder it was saved to, the
    ``output_dir`` of its training config), or when ``row_names`` names them. A missing, malformed or unrelated
    ``metrics.json`` gives ``evaluated=False`` with the reason; nothing is ever filled in.
    """
    if metrics_path is None:
        beside = os.path.join(model.path, "metrics.json")
        if not os.path.isfile(beside):
            return Evaluation(False, "no metrics.json was given for this model")
        metrics_path = beside
    if not os.path.isfile(metrics_path):
        return Evaluation(False, f"{metrics_path} does not exist")
    try:
        results = read_metrics(metrics_path)
        return _evaluation_from_results(model, results, metrics_path, row_names)
    except MalformedMetricsError as exc:
        return Evaluation(False, f"metrics.json is malformed ({exc})", path=metrics_path)


def check_audit(model_dir: str, metrics_path: str, metrics_rows=None, kind: str | None = None) -> None:
    r"""
    Raise `ValueError` unless the card of ``model_dir`` can show its rows of ``metrics_path``: a pushed model's card
    must carry its audit, never silently say "not evaluated".

    Args:
        model_dir (`str`): the saved model folder.
        metrics_path (`str`): the audit's ``metrics.json``.
        metrics_rows (`list[str]`, *optional*): names of the model's rows (default: the rows of its folder).
        kind (`str`, *optional*): the card's kind, for a folder whose kind cannot be told (see `hub.KINDS`).
    """
    evaluation = load_evaluation(inspect_model_folder(model_dir, kind), metrics_path, metrics_rows)
    if not evaluation.evaluated:
        raise ValueError(f"{metrics_path} is no audit of {model_dir}: {evaluation.reason}. Pass the metrics.json of an "
                         "audit of this model, or let it be audited before the upload.")


def _weights_lines(weights) -> list:
    lines = []
    for metric, info in (weights or {}).items() if isinstance(weights, dict) else []:
        if not isinstance(info, dict):
            continue
        parts = [f"{k} {info[k]}" for k in ("backend",) if isinstance(info.get(k), str)]
        sha = info.get("sha256")
        if isinstance(sha, str):
            parts.append(f"sha256 `{sha}`")
        elif isinstance(sha, dict):
            parts += [f"{k}: sha256 `{v}`" for k, v in sha.items() if isinstance(v, str)]
        if parts:
            lines.append((str(metric), ", ".join(parts)))
    return lines


def _model_rows(results: dict) -> dict:
    """The rows of ``metrics.json``'s models: each model's own, and in a text-to-image audit also the row of its
    held-out prompts (``"<name>, held-out prompts"``, the same measures of its generations for captions it never
    trained on)."""
    if results.get("task") != "text-to-image":
        return results["models"]
    rows = {}
    for name, entry in results["models"].items():
        rows[name] = {**entry, "prompt_set": "training prompts"}
        held = entry.get("heldout_prompts")
        if isinstance(held, dict):
            rows[f"{name}, held-out prompts"] = {**{k: entry[k] for k in ("steps", "path", "kind", "training_set")
                                                    if k in entry}, "prompt_set": "held-out prompts", **held}
    return rows


def _evaluation_from_results(model, results, metrics_path, row_names) -> Evaluation:
    entries = _model_rows(results)
    candidates = {model.path}
    saved_to = (model.training_config or {}).get("output_dir")
    if isinstance(saved_to, str):
        candidates.add(saved_to)
    if row_names:
        missing = [n for n in row_names if n not in entries]
        if missing:
            return Evaluation(False, f"metrics.json has no row {missing[0]!r} (rows: {', '.join(entries)})",
                              path=metrics_path)
        mine = list(row_names)
    else:
        mine = [n for n, e in entries.items() if any(_same_folder(e.get("path"), c) for c in candidates)]
    if not mine:
        return Evaluation(False, f"metrics.json has no row for this model (rows: {', '.join(entries) or 'none'})",
                          path=metrics_path)
    evaluation = Evaluation(True, path=metrics_path)
    weights = results.get("weights") if isinstance(results.get("weights"), dict) else {}
    sscd_weights = weights.get("sscd") if isinstance(weights.get("sscd"), dict) else {}
    descriptions = sscd_weights.get("preprocessings") if isinstance(sscd_weights.get("preprocessings"), dict) else {}
    row = lambda n, e, role, where, slug: _row_from_entry(n, e, role, where, slug, descriptions)  # noqa: E731
    evaluation.rows = [row(n, entries[n], "model", f"models[{n!r}]", _slug(n)) for n in mine]
    # The teacher of this model, evaluated from the same noise, is shown beside it for reference.
    teacher_path = (model.training_config or {}).get("teacher")
    teacher_names = {e.get("pairing", {}).get("teacher") for n, e in entries.items()
                     if n in mine and isinstance(e.get("pairing"), dict)}
    for n, e in entries.items():
        if n not in mine and (n in teacher_names or _same_folder(e.get("path"), teacher_path)):
            evaluation.reference_rows.append(row(n, e, "reference", f"models[{n!r}]", _slug(n)))
    floors, evaluation.floor_notes = _floor_entries(results, {r.training_set for r in evaluation.rows} - {None})
    evaluation.floor_rows = [row(n, e, "floor", f"floor[{n!r}]", None) for n, e in floors]
    for key in ("num_samples", "seed", "noise", "device", "created"):
        value = results.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            evaluation.settings[key] = value
    versions = results.get("versions")
    if isinstance(versions, dict):
        evaluation.settings["versions"] = ", ".join(f"{k} {v}" for k, v in versions.items())
    errors = results.get("errors")
    if isinstance(errors, dict):
        evaluation.not_computed = {str(k): str(v) for k, v in errors.items()}
    if isinstance(results.get("warnings"), list):
        evaluation.warnings = [str(w) for w in results["warnings"]]
    nulls = results.get("null_values")
    if isinstance(nulls, dict):
        prefixes = tuple(f"models.{n}." for n in mine)
        evaluation.null_values = {k: str(v) for k, v in nulls.items() if str(k).startswith(prefixes)}
    evaluation.weights = _weights_lines(weights)
    for r in evaluation.all_rows:
        for variant, text in r.sscd_preprocessings.items():
            if text or variant not in evaluation.sscd_preprocessings:
                evaluation.sscd_preprocessings[variant] = text
    figures_dir = os.path.join(os.path.dirname(os.path.abspath(metrics_path)), "figures")
    evaluation.figures_dir = figures_dir if os.path.isdir(figures_dir) else None
    for r in evaluation.rows + evaluation.reference_rows:
        r.figures = {k: v for k, v in r.figures.items()
                     if evaluation.figures_dir and os.path.isfile(os.path.join(figures_dir, v))}
        if r.role == "reference":
            r.figures.pop("memorized", None)
    if evaluation.figures_dir:
        evaluation.histograms = sorted(f for f in os.listdir(figures_dir) if f == "l2_ratio_histogram.png"
                                       or (f.startswith("sscd_similarity_histogram") and f.endswith(".png")))
    return evaluation


# ---------------------------------------------------------------------------------------------------------------
# Card content.


def _cell(text) -> str:
    """Text that stays inside one markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(value, percent=False) -> str:
    return f"{100 * value:.2f}%" if percent else f"{value:.4g}"


def _threshold_text(value) -> str:
    if value is None:
        return "the threshold"
    return "1/3" if abs(value - 1 / 3) < 1e-6 else f"{value:g}"


def _row_label(row: MetricsRow) -> str:
    """How a row is named on the card: this model (with its steps), its teacher, or a floor row."""
    if row.role == "floor":
        return row.name
    name = row.name
    if row.prompts is not None and name.endswith(f", {row.prompts}"):  # a text-to-image model's held-out-prompt row
        name = name[: -len(f", {row.prompts}")]
    label = "this model" if row.role == "model" else ("teacher" if name == "teacher" else f"teacher ({name})")
    if row.steps is not None:
        label += f", {row.steps} step{'s' if row.steps != 1 else ''}"
    elif row.role == "model":
        label += f" ({row.name})"
    return label if row.prompts is None else f"{label}, {row.prompts}"


def _measured_columns(rows) -> list:
    """Metric ids measured in any row, in the order of ``METRIC_COLUMNS`` (SSCD preprocessings in turn)."""
    keys = {k for r in rows for k in r.values}
    order = {m: i for i, m in enumerate(METRIC_COLUMNS)}
    return sorted(keys, key=lambda k: (order[_split_metric(k)[0]], _split_metric(k)[1] or ""))


def metrics_table(evaluation: Evaluation) -> str:
    """The markdown table of every measured number (this model, its teacher, the floor rows)."""
    rows = evaluation.all_rows
    measured = _measured_columns(rows)
    l2 = next((r.thresholds["l2"] for r in rows if "l2" in r.thresholds), None)
    sscd = next((r.thresholds["sscd"] for r in rows if "sscd" in r.thresholds), None)
    headers = ["Row", "Samples"]
    for key in measured:
        base, variant = _split_metric(key)
        header = METRIC_COLUMNS[base][0].format(l2=_threshold_text(l2), sscd=_threshold_text(sscd))
        headers.append(header if variant is None else f"{header} ({variant})")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        samples = "–" if r.num_samples is None else f"{r.num_samples}"
        if r.num_nan_samples:
            samples += f" ({r.num_nan_samples} NaN)"
        label = _cell(_row_label(r))
        cells = [f"**{label}**" if r.role == "model" else label, samples]
        for key in measured:
            percent = METRIC_COLUMNS[_split_metric(key)[0]][1]
            cells.append(_fmt(r.values[key], percent) if key in r.values else "not measured")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# What a card lists as "not measured" when no row of the model has it: family -> metric ids.
METRIC_FAMILIES = {
    "FID": ("fid",), "FD (pixels)": ("fd_pixel",), "CLIP score": ("clip",), "L2 memorization ratio": ("l2_memorized",),
    "SSCD copy detection": ("sscd_memorized", "sscd_p95"), "pairing inefficiency ΔE": ("delta_e",),
}


def unmeasured_metrics(evaluation: Evaluation, model: ModelFolder) -> list:
    """The metric families that apply to ``model`` but have no measured value in its rows."""
    families = dict(METRIC_FAMILIES)
    if not model.text_to_image:
        families.pop("CLIP score")
    if model.kind.name in ("edm_teacher", "sd_memorization"):
        families.pop("pairing inefficiency ΔE")
    measured = {_split_metric(k)[0] for r in evaluation.rows for k in r.values}
    return [name for name, ids in families.items() if not measured.intersection(ids)]


def memorization_warnings(evaluation: Evaluation, threshold: float) -> list:
    """Plain sentences for each of this model's rows whose memorized fraction exceeds ``threshold`` and the floor
    (the fraction of held-out real images flagged by the same test, when it was measured)."""
    warnings = []
    keys = [k for k in _measured_columns(evaluation.rows) if _split_metric(k)[0] in ("l2_memorized", "sscd_memorized")]
    for key in keys:
        base, variant = _split_metric(key)
        floors = [r.values[key] for r in evaluation.floor_rows if key in r.values]
        floor = max(floors) if floors else None
        for r in evaluation.rows:
            value = r.values.get(key)
            if value is None or value <= threshold or (floor is not None and value <= floor):
                continue
            if base == "l2_memorized":
                test = f"L2 nearest-neighbour ratio below {_threshold_text(r.thresholds.get('l2'))}"
            else:
                test = f"SSCD similarity above {_threshold_text(r.thresholds.get('sscd'))}"
                test += f", preprocessing {variant}" if variant else ""
            steps = f" {r.steps}-step" if r.steps is not None else ""
            prompts = f" for its {r.prompts}" if r.prompts else ""
            sentence = (f"{_fmt(value, True)} of this model's{steps} samples{prompts} are near-copies of training "
                        f"images ({test}")
            sentence += f"; held-out real images: {_fmt(floor, True)})." if floor is not None else ")."
            warnings.append(sentence)
    return warnings


def _training_set_rows(record: dict | None) -> list:
    if not record:
        return []
    rows = []
    for key, value in record.items():
        if key == "entries" or key == "class_names":
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            rows.append((_cell(key), "–" if value is None else _cell(value)))
        elif isinstance(value, dict):
            rows.append((_cell(key), _cell(json.dumps(value, sort_keys=True))))
    if isinstance(record.get("class_names"), list):
        rows.append(("classes", f"{len(record['class_names'])}"))
    entries = record.get("entries")
    if isinstance(entries, list):
        repeated = sum(1 for e in entries if isinstance(e, dict) and isinstance(e.get("repeats"), int)
                       and e["repeats"] > 1)
        captions = sum(1 for e in entries if isinstance(e, dict) and isinstance(e.get("caption"), str))
        text = f"{len(entries)} recorded images"
        if repeated:
            text += f", {repeated} of them repeated"
        if captions:
            text += f", {captions} with captions"
        rows.append(("entries", text))
    return rows


def _is_hub_id(value) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or os.path.exists(value) or value.count("/") != 1:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _hub_id_of_cached_snapshot(path: str) -> str | None:
    match = re.search(r"models--([^/]+)--([^/]+)/snapshots/", os.path.realpath(path) + "/")
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _card_license(path: str) -> str | None:
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path).data.license
    except Exception:  # noqa: BLE001 - an unreadable card gives no licence, the caller says so
        return None


@dataclass
class Lineage:
    base_model: str | None  # a Hub id for the card metadata
    parent: str | None  # what the run started from, as recorded
    parent_text: str  # a sentence for the card
    license: str
    license_source: str


def lineage(model: ModelFolder, base_model: str | None = None, license: str | None = None) -> Lineage:
    """The model's parent (teacher or base model) and the licence it inherits."""
    config = model.training_config or {}
    parent = next((config[k] for k in _PARENT_KEYS if isinstance(config.get(k), str)), None)
    hub_id = base_model or (parent if _is_hub_id(parent) else None)
    if hub_id is None and parent and os.path.isdir(parent):
        hub_id = _hub_id_of_cached_snapshot(parent)
    if parent is None:
        text = "None: trained from scratch by diffusers-memdistill."
    elif hub_id:
        text = f"[`{hub_id}`](https://huggingface.co/{hub_id})"
        if parent != hub_id:
            text += f" (trained from the local copy `{parent}`)"
    else:
        text = (f"the local folder `{parent}` (not on the Hub: push it and pass its repo id as `--base_model` to "
                "link it)")
    sha = config.get("teacher_sha256")
    if isinstance(sha, str) and parent:
        text += f"; its weights' sha256, recorded at training time: `{sha}`"
    if license:
        return Lineage(hub_id, parent, text, license, "given when the card was made")
    if parent is None:
        return Lineage(hub_id, parent, text, PROJECT_LICENSE, "the licence of diffusers-memdistill (trained from "
                       "scratch; check the terms of the training data)")
    if os.path.isdir(parent):
        if os.path.isfile(os.path.join(parent, "README.md")):
            found = _card_license(os.path.join(parent, "README.md"))
            if found:
                return Lineage(hub_id, parent, text, found, "inherited from the parent's model card")
        try:
            parent_model = inspect_model_folder(parent)
        except (OSError, ValueError):
            parent_model = None
        if parent_model is not None:
            inherited = lineage(parent_model)
            return Lineage(hub_id, parent, text, inherited.license, f"inherited from the parent: {inherited.license_source}")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id, "README.md")
        found = _card_license(cached) if isinstance(cached, str) else None
        if found:
            return Lineage(hub_id, parent, text, found, f"inherited from the card of {hub_id}")
        if hub_id in KNOWN_BASE_LICENSES:
            return Lineage(hub_id, parent, text, KNOWN_BASE_LICENSES[hub_id], f"the licence of {hub_id}")
    return Lineage(hub_id, parent, text, "other", "the parent's licence could not be read here: check it before use")


def _command_text(config: dict | None) -> str | None:
    if not config:
        return None
    for key in _COMMAND_KEYS:
        value = config.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return shlex.join(value)
    return None


def _default_steps(model: ModelFolder):
    config = model.scheduler_config or {}
    steps = config.get("num_inference_steps")
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def _sampling_rows(model: ModelFolder) -> list:
    config = model.scheduler_config or {}
    return [(_cell(k), _cell(json.dumps(v))) for k, v in sorted(config.items()) if not k.startswith("_")]


def _card_evaluation(model: ModelFolder, metrics_path, metrics_rows, unaudited) -> Evaluation:
    """What the card reports: the evaluation in ``metrics_path``, or none for a model uploaded without an audit."""
    if unaudited is None:
        return load_evaluation(model, metrics_path, metrics_rows)
    if metrics_path is not None:
        raise ValueError(f"A model uploaded without an audit ({unaudited}) has no metrics.json: pass the metrics or "
                         f"{unaudited}, not both.")
    return Evaluation(False, f"This model was uploaded without a memorization audit ({unaudited})")


def _template_path(kind: CardKind) -> str:
    return str(TEMPLATES_DIR / f"{kind.name}.md")


def render_model_card(
    model_dir: str,
    *,
    metrics_path: str | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    kind: str | None = None,
    metrics_rows=None,
    warning_threshold: float = DEFAULT_WARNING_THRESHOLD,
    figures_prefix: str = "figures",
    metrics_link: str | None = None,
    name: str | None = None,
    unaudited: str | None = None,
):
    r"""
    The model card of a saved model, rendered with `huggingface_hub.ModelCard.from_template`.

    Args:
        model_dir (`str`): the saved model folder.
        metrics_path (`str`, *optional*): the ``metrics.json`` of ``memdistill evaluate``; by default the one in
            ``model_dir``, if any. Without one (or with a malformed one) the card says "not evaluated".
        repo_id (`str`, *optional*): the Hub repository the card is for (used in the usage example and title).
        base_model (`str`, *optional*): the Hub id of the teacher or base model, when the training config names a
            local folder.
        license (`str`, *optional*): overrides the licence inherited from the base model.
        kind (`str`, *optional*): the template, one of ``KINDS`` (default: told from the folder).
        metrics_rows (`list[str]`, *optional*): names of this model's rows in ``metrics.json`` (default: the rows
            whose ``path`` is the model folder).
        warning_threshold (`float`): memorized fraction above which the card opens with a warning.
        figures_prefix (`str`): the folder, relative to the card, where its figures are placed.
        metrics_link (`str`, *optional*): where ``metrics.json`` is placed relative to the card, if it is.
        name (`str`, *optional*): the model's name on the card (default: the repository's or the folder's name).
        unaudited (`str`, *optional*): the flag with which the model is uploaded without a memorization audit
            (``"--no_audit"``, ``"--push_without_audit"``): the card says so plainly and shows no measurement, not
            even of a ``metrics.json`` beside the model. Not with ``metrics_path``.

    Returns:
        `tuple[huggingface_hub.ModelCard, list[tuple[str, str]]]`: the card and the figures it shows, as
        (source file, path relative to the card) pairs for the caller to copy.
    """
    import jinja2
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if base_model is not None:
        validate_hub_repo_id(base_model)
    model = inspect_model_folder(model_dir, kind)
    evaluation = _card_evaluation(model, metrics_path, metrics_rows, unaudited)
    lineage_ = lineage(model, base_model, license)
    record = model.training_set or {}
    dataset = record.get("dataset") if isinstance(record.get("dataset"), str) else None
    name = name or (repo_id.split("/")[-1] if repo_id else os.path.basename(model.path.rstrip(os.sep)))

    figures = []  # (source, relative path)

    def figure(file_name):
        rel = f"{figures_prefix}/{file_name}"
        figures.append((os.path.join(evaluation.figures_dir, file_name), rel))
        return rel

    eval_results = []
    table = warnings = None
    if evaluation.evaluated:
        table = metrics_table(evaluation)
        warnings = memorization_warnings(evaluation, warning_threshold)
        task = model.pipeline_tag
        dataset_name = f"{dataset or 'training set'} (the model's own training set"
        dataset_name += f", {record['num_images']} images)" if isinstance(record.get("num_images"), int) else ")"
        for row in evaluation.rows:
            for key, value in row.values.items():
                metric, variant = _split_metric(key)
                metric_type, metric_name = EVAL_RESULT_TYPES[metric]
                family = metric.split("_")[0]
                args = {"num_samples": row.num_samples, "steps": row.steps, "seed": evaluation.settings.get("seed"),
                        "threshold": row.thresholds.get(family)}
                if family == "sscd":
                    args["sscd_preprocessing"] = variant
                    args["sscd_preprocessing_description"] = row.sscd_preprocessings.get(variant)
                eval_results.append(EvalResult(
                    task_type=task, dataset_type=dataset or "training-set", dataset_name=dataset_name,
                    dataset_split=record.get("split") if isinstance(record.get("split"), str) else None,
                    dataset_args={"sha256": record["sha256"]} if isinstance(record.get("sha256"), str) else None,
                    metric_type=metric_type, metric_name=metric_name, metric_value=value,
                    metric_config=row.name if variant is None else f"{row.name}, SSCD preprocessing {variant}",
                    metric_args={k: v for k, v in args.items() if v is not None}))
    sample_grids = []
    for row in evaluation.rows + evaluation.reference_rows if evaluation.evaluated else []:
        if "samples" in row.figures:
            sample_grids.append((_row_label(row), figure(row.figures["samples"])))
    memorized_grids = [(_row_label(r), figure(r.figures["memorized"])) for r in evaluation.rows
                       if "memorized" in r.figures] if evaluation.evaluated else []
    histograms = [figure(h) for h in evaluation.histograms] if evaluation.evaluated else []
    training_grid = None
    if not sample_grids:
        grids = sorted(Path(model.path, "samples").glob("*.png")) if os.path.isdir(os.path.join(model.path,
                                                                                                "samples")) else []
        if grids:
            training_grid = (grids[-1].name, f"{figures_prefix}/training_{grids[-1].name}")
            figures.append((str(grids[-1]), training_grid[1]))

    tags = ["diffusers-memdistill", "memorization", *model.kind.tags]
    if model.is_lora:
        tags.append("lora")
    if model.pipeline_tag not in tags:
        tags.append(model.pipeline_tag)
    card_data = ModelCardData(
        base_model=lineage_.base_model, library_name="diffusers", license=lineage_.license, tags=tags,
        pipeline_tag=model.pipeline_tag, model_name=name, eval_results=eval_results or None,
    )
    config = redact_config(model.training_config) if model.training_config else None
    context = dict(
        name=name, kind=model.kind, model=model, repo=repo_id or "path/to/this/folder", lineage=lineage_,
        evaluation=evaluation, table=table, warnings=warnings, warning_threshold=_fmt(warning_threshold, True),
        training_set_rows=_training_set_rows(model.training_set), dataset=dataset,
        command=_command_text(config), config_json=None if config is None else json.dumps(
            {k: v for k, v in config.items() if k not in _COMMAND_KEYS}, indent=1, sort_keys=True),
        script=_script_name(model.training_config), sampling_rows=_sampling_rows(model),
        default_steps=_default_steps(model), sample_grids=sample_grids, memorized_grids=memorized_grids,
        histograms=histograms, training_grid=training_grid,
        unmeasured=unmeasured_metrics(evaluation, model) if evaluation.evaluated else [], settings=evaluation.settings,
        sscd_preprocessings=[(variant, text) for variant, text in evaluation.sscd_preprocessings.items()],
        config=model.training_config or {}, metrics_link=metrics_link, unaudited=unaudited,
    )
    # The shared parts are templates of their own that the kind's template places (from_template has no includes).
    for part in ("warning", "sections"):
        template = jinja2.Template((TEMPLATES_DIR / f"{part}.md").read_text(encoding="utf-8"),
                                   undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        context[f"{part}_block" if part == "warning" else part] = template.render(**context).strip()
    card = ModelCard.from_template(card_data, template_path=_template_path(model.kind), **context)
    # Parts that render empty (no warning, say) leave runs of blank lines; the text has no other blank-line runs.
    card = ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))
    return card, figures


# ---------------------------------------------------------------------------------------------------------------
# The upload folder and the push.


def _check_weights(folder: str, files: list) -> None:
    for rel in files:
        if rel.lower().endswith(PICKLE_EXTENSIONS):
            raise ValueError(f"{os.path.join(folder, rel)} is a pickle-based weight file; only safetensors are "
                             "uploaded. Save the pipeline again with `save_pretrained(..., safe_serialization=True)`.")


def _pipeline_files(model: ModelFolder) -> list:
    """Paths, relative to the model folder, of everything the pipeline needs to load (and nothing else)."""
    files = []
    if model.is_lora:
        files.append(LORA_WEIGHTS)
    else:
        files.append("model_index.json")
        if model.single_file is not None:
            if not os.path.isfile(os.path.join(model.path, model.single_file + ".py")):
                raise FileNotFoundError(
                    f"{model.path} names the single-file pipeline {model.single_file}.py but does not contain it: it "
                    "would not load with trust_remote_code. Save it again with the package's save_pretrained.")
            files.append(model.single_file + ".py")
        for component in model.components:
            folder = os.path.join(model.path, component)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{model.path}: model_index.json names {component}/, which is missing.")
            component_files = sorted(os.path.relpath(os.path.join(root, f), model.path)
                                     for root, dirs, names in os.walk(folder) for f in names
                                     if not f.startswith("."))
            _check_weights(model.path, component_files)
            if os.path.isfile(os.path.join(folder, "config.json")) and not any(
                    f.endswith(".safetensors") for f in component_files):
                raise FileNotFoundError(f"{folder} holds a model without safetensors weights; only safetensors are "
                                        "uploaded.")
            files += component_files
    for record in ("training_set.json", "training_config.json"):
        if os.path.isfile(os.path.join(model.path, record)):
            files.append(record)
    _check_weights(model.path, files)
    return files


def build_upload_folder(
    model_dir: str,
    output_dir: str,
    *,
    repo_id: str | None = None,
    metrics_path: str | None = None,
    token: str | None = None,
    **card_kwargs,
) -> str:
    r"""
    Write the exact folder that ``push`` uploads: the pipeline (safetensors only), its single-file pipeline for
    ``trust_remote_code`` loading, ``training_set.json``, ``training_config.json`` (secrets redacted), the card
    (``README.md``), its figures and ``metrics.json``.

    Args:
        model_dir (`str`): the saved model folder.
        output_dir (`str`): where to write; must not exist or be empty.
        repo_id (`str`, *optional*): the repository the card is written for.
        metrics_path (`str`, *optional*): see [`render_model_card`].
        token (`str`, *optional*): checked to appear in no written file (nor does the logged-in token).
        card_kwargs: passed to [`render_model_card`].

    Returns:
        `str`: ``output_dir``.
    """
    output_dir = os.path.abspath(str(output_dir))
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"{output_dir} exists and is not empty; the upload folder is written to a new folder.")
    model = inspect_model_folder(model_dir, card_kwargs.get("kind"))
    files = _pipeline_files(model)
    card, figures = render_model_card(model.path, metrics_path=metrics_path, repo_id=repo_id,
                                      metrics_link="metrics.json", **card_kwargs)
    evaluation = _card_evaluation(model, metrics_path, card_kwargs.get("metrics_rows"), card_kwargs.get("unaudited"))
    # Written beside the destination and moved into place when complete: a failure leaves no partial folder.
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-upload-", dir=os.path.dirname(output_dir))
    try:
        for rel in files:
            destination = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            if rel == "training_config.json":
                with open(destination, "w", encoding="utf-8") as f:
                    json.dump(redact_config(model.training_config), f, indent=1)
            else:
                shutil.copy2(os.path.join(model.path, rel), destination)
        for source, rel in figures:
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(source, os.path.join(tmp, rel))
        if evaluation.evaluated:  # the file as measured; a malformed or unrelated one is not published
            shutil.copy2(evaluation.path, os.path.join(tmp, "metrics.json"))
        card.save(os.path.join(tmp, "README.md"))
        _assert_no_token(tmp, _known_tokens(token))
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty, checked above
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def validate_hub_repo_id(repo_id: str) -> str:
    """``namespace/name`` checked with huggingface_hub's validator; a clear `ValueError` otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"Repo id {repo_id!r} is not of the form USER/NAME (or ORG/NAME).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"Repo id {repo_id!r} is not valid: {exc}") from None
    return repo_id


def require_token(token: str | None = None) -> str:
    """``token``, or huggingface_hub's (``HF_TOKEN`` or ``hf auth login``); `HubTokenError` when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubTokenError("No Hugging Face token: log in with `hf auth login` or set HF_TOKEN (nothing was "
                            "uploaded).")
    return token


def push_to_hub_folder(
    model_dir: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    dry_run_dir: str | None = None,
    metrics_path: str | None = None,
    **card_kwargs,
) -> str:
    r"""
    Publish a saved model on the Hub with its card, figures and metrics, in one commit (or write what would be).

    Everything is written to a local folder first; then the repository is created if needed and the whole folder
    goes up as a single commit (`HfApi.create_commit` with every file): an upload interrupted midway leaves the
    repository as it was, never half-published. (`HfApi.upload_folder` is not used: with ``hf_xet`` installed it
    may split a folder into several commits.)

    Args:
        model_dir (`str`): the saved model folder.
        repo_id (`str`): ``USER/NAME`` or ``ORG/NAME``.
        token (`str`, *optional*): a Hub token; by default huggingface_hub's (``HF_TOKEN`` or ``hf auth login``).
            It is never printed, logged or written into a file.
        private (`bool`): create the repository as private (an existing repository keeps its visibility).
        revision (`str`, *optional*): the branch to commit to (created from the default branch if missing).
        dry_run_dir (`str`, *optional*): write the upload folder there and upload nothing.
        metrics_path (`str`, *optional*): the ``metrics.json`` of ``memdistill evaluate`` for this model
            ([`~hub_audit.audit_before_push`] writes one).
        card_kwargs: passed to [`render_model_card`] (``base_model``, ``license``, ``kind``, ``unaudited``...).

    Returns:
        `str`: the commit URL, or ``dry_run_dir`` for a dry run.
    """
    validate_hub_repo_id(repo_id)
    inspect_model_folder(model_dir, card_kwargs.get("kind"))  # a folder that is not a pipeline fails first
    if dry_run_dir is not None:
        return build_upload_folder(model_dir, dry_run_dir, repo_id=repo_id, metrics_path=metrics_path, token=token,
                                   **card_kwargs)
    from huggingface_hub import CommitOperationAdd, HfApi

    token = require_token(token)
    with tempfile.TemporaryDirectory(prefix="memdistill-upload-") as tmp:
        folder = build_upload_folder(model_dir, os.path.join(tmp, "upload"), repo_id=repo_id,
                                     metrics_path=metrics_path, token=token, **card_kwargs)
        operations = [CommitOperationAdd(path_in_repo=Path(os.path.relpath(os.path.join(root, f), folder)).as_posix(),
                                         path_or_fileobj=os.path.join(root, f))
                      for root, _, names in sorted(os.walk(folder)) for f in sorted(names)]
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        size = sum(os.path.getsize(op.path_or_fileobj) for op in operations) / 1e6
        print(f"Uploading {len(operations)} files ({size:.1f} MB) to {repo_id} in one commit.")
        info = api.create_commit(repo_id, operations=operations, revision=revision,
                                 commit_message="Upload model, card and metrics with diffusers-memdistill")
    return info.commit_url


# ---------------------------------------------------------------------------------------------------------------
# Command line: `memdistill push` and `memdistill card`.


# Bad input that the commands report in one line (other exceptions keep their traceback).
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, HubTokenError)


def _add_card_arguments(parser: argparse.ArgumentParser, push: bool = False) -> None:
    if push:
        parser.add_argument("--metrics", default=None, metavar="PATH",
                            help="metrics.json of an earlier audit (memdistill evaluate) of this model: its card is "
                                 "made from it and the model is not audited again (default: audit it before the "
                                 "upload).")
    else:
        parser.add_argument("--metrics", default=None, metavar="PATH",
                            help="metrics.json of memdistill evaluate for this model (default: DIR/metrics.json if "
                                 "any; without one the card says 'not evaluated').")
    parser.add_argument("--metrics_rows", default=None,
                        help="Comma-separated names of this model's rows in metrics.json (default: matched by path).")
    parser.add_argument("--base_model", default=None,
                        help="Hub id of the teacher or base model when the training config names a local folder.")
    parser.add_argument("--license", default=None, help="Overrides the licence inherited from the base model.")
    parser.add_argument("--kind", default=None, choices=sorted(KINDS), help="Card template (default: told from DIR).")
    parser.add_argument("--warning_threshold", type=float, default=DEFAULT_WARNING_THRESHOLD,
                        help="Memorized fraction above which the card opens with a warning.")
    parser.add_argument("--name", default=None, help="The model's name on the card (default: the repo's or DIR's).")


def _card_kwargs(args) -> dict:
    return dict(base_model=args.base_model, license=args.license, kind=args.kind,
                metrics_rows=args.metrics_rows.split(",") if args.metrics_rows else None,
                warning_threshold=args.warning_threshold, name=args.name)


# The flags of the audit before the push: name -> the keyword of `hub_audit.audit_before_push`.
_AUDIT_FLAGS = {"audit_num_samples": "num_samples", "audit_metrics": "metrics", "audit_output_dir": "output_dir",
                "audit_device": "device", "sscd_weights": "sscd_weights", "sscd_onnx": "sscd_onnx",
                "inception_weights": "inception_weights"}


class PushCommand:
    """``memdistill push --model DIR --repo_id USER/NAME [--private] [--revision] [--dry_run [DIR]]``: audits the
    model for memorization first (`hub_audit.audit_before_push`), unless ``--metrics PATH`` gives an earlier audit or
    ``--no_audit`` uploads it without one (and its card says so)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, metavar="DIR", help="The saved model folder.")
        parser.add_argument("--repo_id", required=True, help="USER/NAME or ORG/NAME on the Hub.")
        parser.add_argument("--private", action="store_true", help="Create the repository as private.")
        parser.add_argument("--revision", default=None, help="Branch to commit to (default: main).")
        parser.add_argument("--dry_run", nargs="?", const="", default=None, metavar="DIR",
                            help="Write the exact upload folder (to DIR, default ./NAME-upload) and upload nothing; "
                                 "the model is audited as for an upload.")
        _add_card_arguments(parser, push=True)
        from .hub_audit import DEFAULT_AUDIT_NUM_SAMPLES

        audit = parser.add_argument_group("the memorization audit before the upload")
        audit.add_argument("--no_audit", action="store_true",
                           help="Upload without a memorization audit; the card then says so plainly.")
        audit.add_argument("--audit_num_samples", type=int, default=None,
                           help=f"Samples of the model in the audit (default {DEFAULT_AUDIT_NUM_SAMPLES}; for a "
                                "text-to-image model, generations for its training prompts, 4 per prompt).")
        audit.add_argument("--audit_metrics", default=None,
                           help="Comma-separated metrics of the audit (default l2,fd_pixel; l2 for text-to-image "
                                "models: neither needs pretrained weights). sscd, fid and clip need their weights.")
        audit.add_argument("--audit_output_dir", default=None, metavar="DIR",
                           help="Folder of the audit, outside the model folder (default: DIR-audit beside the model; "
                                "an earlier audit of the same model there is replaced).")
        audit.add_argument("--audit_device", default=None, help="cuda or cpu (default: CUDA when available).")
        audit.add_argument("--sscd_weights", default=None, help="SSCD TorchScript file or URL (audit metric sscd).")
        audit.add_argument("--sscd_onnx", default=None, help="SSCD ONNX file, instead of --sscd_weights.")
        audit.add_argument("--inception_weights", default=None,
                           help="FID Inception TorchScript file or URL (audit metric fid).")

    @staticmethod
    def main(args) -> int:
        try:
            return PushCommand._run(args)
        except _USER_ERRORS as exc:
            print(f"memdistill push: error: {exc}", file=sys.stderr)
            return 2

    @staticmethod
    def _run(args) -> int:
        # Everything that would refuse the upload is checked before the audit, which may take a while.
        validate_hub_repo_id(args.repo_id)
        inspect_model_folder(args.model, args.kind)
        dry_run_dir = None
        if args.dry_run is not None:
            dry_run_dir = os.path.abspath(args.dry_run or f"{args.repo_id.split('/')[-1]}-upload")
            if os.path.exists(dry_run_dir) and (not os.path.isdir(dry_run_dir) or os.listdir(dry_run_dir)):
                raise FileExistsError(f"{dry_run_dir} exists and is not empty; the upload folder is written to a new "
                                      "folder.")
        else:
            require_token()
        given = [f"--{flag}" for flag in _AUDIT_FLAGS if getattr(args, flag) is not None]
        skipped_by = "--no_audit" if args.no_audit else ("--metrics" if args.metrics is not None else None)
        if args.no_audit and args.metrics is not None:
            raise ValueError("--metrics gives an audit and --no_audit uploads without one: pass one of them.")
        if skipped_by and given:
            raise ValueError(f"{', '.join(given)} set the audit, which {skipped_by} skips: drop one or the other.")
        from .hub_audit import audit_before_push

        metrics_path = args.metrics
        if not args.no_audit:
            if metrics_path is None:
                metrics_path = audit_before_push(args.model, **{keyword: getattr(args, flag)
                                                                for flag, keyword in _AUDIT_FLAGS.items()})
                print(f"Audited {args.model}: {metrics_path}")
            # The card must carry the audit: one it cannot read this model's rows from stops the upload.
            check_audit(args.model, metrics_path, _card_kwargs(args)["metrics_rows"], args.kind)
        result = push_to_hub_folder(args.model, args.repo_id, private=args.private, revision=args.revision,
                                    dry_run_dir=dry_run_dir, metrics_path=metrics_path,
                                    unaudited="--no_audit" if args.no_audit else None, **_card_kwargs(args))
        if dry_run_dir is not None:
            print(f"Wrote the upload folder to {result}; nothing was uploaded.")
        else:
            print(f"Published {args.repo_id}: {result}")
        return 0


class CardCommand:
    r"""``memdistill card --model DIR [--metrics PATH] --output FILE``.

    The demo's card, ``model_cards/digits-demo.md``, is generated from a ``memdistill demo`` run with::

        memdistill demo --output_dir memdistill-demo
        memdistill card --model memdistill-demo/cd --metrics memdistill-demo/eval/metrics.json \
            --name digits-demo --output model_cards/digits-demo.md

    It writes the card and copies the figures it shows to ``model_cards/digits-demo-figures/``.
    """

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, metavar="DIR", help="The saved model folder.")
        parser.add_argument("--output", required=True, metavar="FILE", help="The card to write (markdown).")
        parser.add_argument("--repo_id", default=None, help="The Hub repository the card is for, if any.")
        _add_card_arguments(parser)

    @staticmethod
    def main(args) -> int:
        try:
            return CardCommand._run(args)
        except _USER_ERRORS as exc:
            print(f"memdistill card: error: {exc}", file=sys.stderr)
            return 2

    @staticmethod
    def _run(args) -> int:
        output = os.path.abspath(args.output)
        stem = os.path.splitext(os.path.basename(output))[0]
        figures_prefix = f"{stem}-figures"
        card, figures = render_model_card(args.model, metrics_path=args.metrics, repo_id=args.repo_id,
                                          figures_prefix=figures_prefix, **_card_kwargs(args))
        os.makedirs(os.path.dirname(output), exist_ok=True)
        figures_dir = os.path.join(os.path.dirname(output), figures_prefix)
        if figures:
            if os.path.isdir(figures_dir):
                shutil.rmtree(figures_dir)  # the figures of an earlier version of this card
            os.makedirs(figures_dir)
            for source, rel in figures:
                shutil.copy2(source, os.path.join(os.path.dirname(output), rel))
        card.save(output)
        print(f"Wrote {args.output}" + (f" and {len(figures)} figures in {figures_dir}" if figures else ""))
        return 0
