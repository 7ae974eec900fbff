"""One training loop for every script, built on accelerate.

The runner owns what every training script needs and none should copy: the Accelerator (devices, DDP, mixed
precision, gradient accumulation, trackers), a DataLoader over a 🤗 datasets copy of the training set, the
optimizers with their learning-rate schedules (`diffusers.optimization.get_scheduler`), gradient clipping, the
moving averages of the weights, checkpoints written with `Accelerator.save_state` and read back with
`Accelerator.load_state`, validation images sent to every tracker, the progress bar, divergence handling and the
atomic save of the finished model. A script supplies its networks, its step (the loss) and what it saves.

How a script plugs in
---------------------
1. Flags: ``add_training_args(parser, ...)`` (and ``add_data_args`` for scripts that read a dataset) from
   `training.arguments`, the script's own flags, then ``validate_training_args(parser, args, protected_paths)``:
   every flag is checked before any work, with a one-line error naming it.
2. ``runner = TrainingRunner(args, script="train_x.py")`` creates the Accelerator and checks the output folder and
   the checkpoint to resume from; nothing is written yet.
3. Load the teacher and the data under ``with runner.main_process_first():`` (rank 0 decodes and fills the caches,
   the other ranks then read them).
4. Build the networks and call ``runner.train(TrainingPlan(...), training_set)`` with:

   - ``models``: the networks that are trained (prepared by accelerate, saved in every checkpoint);
   - ``phases``: one `Phase` per optimizer: the model it updates, its optimizer (see `build_optimizer`), its step
     ``step(nets, batch, generator) -> loss`` (per-sample or scalar, optionally ``(loss, logs)``) and ``every`` /
     ``offset``, the update ratio: a phase runs every ``every`` steps from step ``offset`` on. The two time-scale
     rule of DMD (the fake denoiser updated 5 times per generator update) is ``[Phase("fake_score", ...),
     Phase("generator", ..., every=5, offset=4)]``; each phase's step must only produce gradients for its own model (the others under
     ``torch.no_grad()`` or ``requires_grad_(False)``);
   - ``averages``: moving averages (`ModelEMA`) of trained models, updated after each update of their source; the
     consistency-distillation target network is one (a constant decay mu);
   - ``frozen``: networks that are used but not trained (a teacher);
   - ``fingerprint``: what a resumed run must share with the run that wrote the checkpoint (the runner adds the
     seed, batch sizes, accumulation, mixed precision, optimizers and every network's config);
   - ``validate(nets, step) -> {tag: images in [0, 1]}`` and ``export(nets) -> (pipeline, records)``.

   ``nets`` maps every name (models, averages, frozen) to its network; in a step, trained models are the prepared
   (DDP, compiled) ones, in ``validate`` and ``export`` the plain ones. A batch is ``{"pixel_values": float in
   [-1, 1], "indices": long, "class_labels": long, "captions": list of str}`` (labels and captions only where the
   data has them) on the training device; ``indices`` are the examples' positions in the training set, so that a
   step can read what a script computed once per image (the cached latents of Stable Diffusion fine-tuning).

Reproducibility
---------------
The batch of micro-step m (optimizer step k, accumulation round a: m = k * accumulation + a) on process r is a pure
function of (seed, m, r) (`batch_indices`); so are the ``generator`` handed to the step and the global torch RNG
(dropout), which is re-seeded from (seed, m, r, phase) before each call of a step. A resumed run therefore ends with
the weights of an uninterrupted one, bit for bit, and DDP ranks draw different dropout masks. The learning rate is a
function of the step and of the current flags, so a run may be resumed with another ``--learning_rate``,
``--lr_scheduler``, ``--lr_warmup_steps``, ``--max_grad_norm`` or ``--max_train_steps``; the change is recorded in
``run_history.json`` (and in the finished model's ``training_config.json``). Changes that alter the data order or
the networks are refused by the fingerprint.

Divergence
----------
A non-finite loss (on any process) stops every process before the optimizer step, with a `TrainingDivergedError`
that names the last good checkpoint. The checkpoint written just before (its weights produced the non-finite loss)
is set aside as ``checkpoint-N.diverged``, so that ``--resume_from_checkpoint latest`` picks one from before the
blow-up; ``--checkpoints_total_limit`` prunes older checkpoints only once the step after the newest one has a finite
loss. Weights are checked before every checkpoint and before the final save: a diverged run is never saved as a
finished model.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from tqdm.auto import tqdm

from ..data import images_to_model_range
from ..utils.redact import redact_config
from .ema import ModelEMA
from .utils import (
    CHECKPOINT_DIR,
    CHECKPOINT_STATE,
    batch_indices,
    fsync_dir,
    fsync_tree,
    init_trackers,
    jsonable,
    list_checkpoints,
    log_images,
    make_accelerator,
    resolve_checkpoint,
    save_image_grid,
    save_pipeline_atomically,
    step_generator,
    step_seed,
    write_json_atomically,
)

CHECKPOINT_FORMAT = 2
HISTORY_FILE = "run_history.json"
# Streams of `step_seed`: 1 is the data order (`batch_indices`); phase i draws its noise from NOISE_STREAM + i and
# re-seeds the global RNG (dropout) from GLOBAL_STREAM + i.
NOISE_STREAM, GLOBAL_STREAM = 100, 1000
# Flags that may change when a run is resumed (recorded in the run history, not part of the fingerprint).
ADJUSTABLE = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "max_grad_norm",
              "max_train_steps")


class TrainingDivergedError(FloatingPointError):
    """A non-finite loss or non-finite weights stopped the run."""


@dataclass
class Phase:
    """One optimizer of a training step.

    Args:
        name (`str`): the phase's name (logged as ``loss/<name>`` when there are several).
        optimizer (`torch.optim.Optimizer`): over the parameters of ``model``.
        step (`Callable`): ``step(nets, batch, generator) -> loss`` or ``(loss, logs)``.
        model (`str`, *optional*): the key in ``TrainingPlan.models`` of the network it updates; defaults to ``name``.
        every (`int`, defaults to 1): the phase runs every ``every`` steps ...
        offset (`int`, defaults to 0): ... starting at step ``offset`` (0-based), i.e. at the steps ``s >= offset``
            with ``(s - offset) % every == 0``. DMD's generator phase uses ``every=k, offset=k - 1``: it runs after
            every k updates of the fake denoiser.
        learning_rate (`float`, *optional*): defaults to ``--learning_rate``.
    """

    name: str
    optimizer: torch.optim.Optimizer
    step: Callable
    model: Optional[str] = None
    every: int = 1
    offset: int = 0
    learning_rate: Optional[float] = None

    def is_due(self, step: int) -> bool:
        """Whether the phase runs at optimizer step ``step`` (0-based)."""
        return step >= self.offset and (step - self.offset) % self.every == 0


class Average(NamedTuple):
    """A moving average of the trained model ``source``."""

    source: str
    ema: ModelEMA


@dataclass
class TrainingPlan:
    """What a script hands to `TrainingRunner.train`; see the module docstring."""

    models: dict
    phases: list
    averages: dict = field(default_factory=dict)
    frozen: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)
    validate: Optional[Callable] = None
    export: Optional[Callable] = None
    config: dict = field(default_factory=dict)
    description: str = ""


class _RunState:
    """Position of the run (registered for checkpointing): optimizer steps, micro-batches consumed, updates per
    phase."""

    def __init__(self):
        self.step, self.micro_step, self.updates = 0, 0, {}

    def state_dict(self):
        return {"step": self.step, "micro_step": self.micro_step, "updates": dict(self.updates)}

    def load_state_dict(self, state):
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])
        self.updates = {str(k): int(v) for k, v in state["updates"].items()}


# ---------------------------------------------------------------- data


class StepBatchSampler:
    """This process's share of each micro-batch, from micro-step ``start`` to ``stop`` (`batch_indices` over the
    training examples, repeats included). Every batch is a pure function of (seed, micro-step, process), so the
    sampler of a resumed run simply starts at the micro-step the checkpoint records.

    accelerate's own sharding (``prepare(dataloader)``, ``skip_first_batches``) makes the order depend on the number
    of processes and on the epoch's position; this one gives the same global batch for any number of processes.
    """

    def __init__(self, examples: torch.Tensor, batch_size: int, num_processes: int, process_index: int, seed: int,
                 start: int = 0, stop: int = 0):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.num_processes, self.process_index, self.start, self.stop = num_processes, process_index, start, stop

    def __iter__(self):
        for m in range(self.start, self.stop):
            idx = batch_indices(m, self.batch_size, self.num_processes, self.process_index, len(self.examples),
                                self.seed)
            yield self.examples[idx].tolist()

    def __len__(self):
        return max(self.stop - self.start, 0)


def training_dataset(training_set):
    """The decoded training images as a 🤗 `datasets.Dataset` (in Arrow format) with a ``pixels`` column of raw
    uint8 bytes (C, H, W), an ``index`` column (the position in the training set) and, where the data has them,
    ``class_labels`` and ``captions``.

    Raw bytes rather than an ``Array3D`` column: gathering a random batch of 512 CIFAR-sized images takes ~2 ms this
    way against ~60 ms through datasets' tensor formatting.
    """
    from datasets import Dataset, Features, Value

    images = training_set.images.contiguous().numpy()
    columns = {"pixels": [row.tobytes() for row in images], "index": list(range(len(images)))}
    features = {"pixels": Value("binary"), "index": Value("int64")}
    if training_set.labels is not None:
        columns["class_labels"] = training_set.labels.numpy()
        features["class_labels"] = Value("int64")
    if getattr(training_set, "captions", None) is not None:
        columns["captions"] = list(training_set.captions)
        features["captions"] = Value("string")
    return Dataset.from_dict(columns, features=Features(features)).with_format("arrow")


class _DecodeBatch:
    """collate_fn: an Arrow table of rows -> {"pixel_values": uint8 (B, C, H, W), "indices": long (B,),
    "class_labels": long (B,), "captions": list of str} (the last two where the data has them)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __call__(self, table):
        raw = b"".join(table.column("pixels").to_pylist())
        batch = {"pixel_values": torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, *self.shape),
                 "indices": torch.as_tensor(table.column("index").to_numpy(), dtype=torch.long)}
        if "class_labels" in table.column_names:
            batch["class_labels"] = torch.as_tensor(table.column("class_labels").to_numpy(), dtype=torch.long)
        if "captions" in table.column_names:
            batch["captions"] = table.column("captions").to_pylist()
        return batch


def seed_micro_step(seed: int, micro_step: int, process_index: int, phase_index: int, device) -> torch.Generator:
    """Re-seed the global torch RNG (dropout and any other global draw) from (seed, micro-step, process, phase) and
    return the generator of the step's own noise, seeded from the same tuple on another stream."""
    torch.manual_seed(step_seed(seed, micro_step, process_index, GLOBAL_STREAM + phase_index))
    return step_generator(seed, micro_step, process_index, device, stream=NOISE_STREAM + phase_index)


def load_checkpoint_weights(path: str) -> dict:
    """The networks in a checkpoint written by `TrainingRunner`, by name (trained models and averages), as
    state dicts read with safetensors and ``torch.load(weights_only=True)``; without building an Accelerator."""
    import json

    from safetensors.torch import load_file

    with open(os.path.join(path, CHECKPOINT_STATE), encoding="utf-8") as f:
        manifest = json.load(f)["manifest"]
    out = {name: load_file(os.path.join(path, file)) for file, name in manifest["models"].items()}
    for file, name in manifest["objects"].items():
        state = torch.load(os.path.join(path, file), map_location="cpu", weights_only=True)
        if "module" in state:
            out[name] = dict(state["module"])
    return out


def export_snapshot(checkpoint: str, model_dir: str, output_dir: str, step: int, average: str = "ema_unet",
                    component: str = "unet") -> str:
    """A pipeline folder holding the weights of one average (an EMA) of a `TrainingRunner` checkpoint.

    The finished model in ``model_dir`` (any pipeline class of `diffusers_memdistill.registry`: a teacher, a CD, DMD
    or PD student) gives the pipeline; its ``component`` takes the checkpoint's ``average`` (``"ema_unet"`` for the
    teacher, CD and PD scripts, ``"ema_generator"`` for DMD). The model's ``training_set.json`` and
    ``training_config.json`` go beside it (the latter with ``snapshot_of`` and ``snapshot_step``), so that audits
    compare the snapshot against the exact training set and students can distil from it.

    Raises:
        KeyError: the checkpoint holds no ``average`` (the error names those it holds).
    """
    import json

    from ..registry import load_pipeline

    weights = load_checkpoint_weights(checkpoint)
    if average not in weights:
        raise KeyError(f"{checkpoint} holds no network {average!r}; it holds {sorted(weights)}.")
    pipeline, _ = load_pipeline(model_dir)
    getattr(pipeline, component).load_state_dict(weights[average])
    with open(os.path.join(model_dir, "training_set.json"), encoding="utf-8") as f:
        record = json.load(f)
    with open(os.path.join(model_dir, "training_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.update({"snapshot_of": os.path.abspath(checkpoint), "snapshot_step": step})
    save_pipeline_atomically(pipeline, output_dir, {"training_set.json": record, "training_config.json": config})
    return output_dir


# ---------------------------------------------------------------- optimizers


def build_optimizer(kind: str, params, args, learning_rate: float | None = None):
    """``kind`` in ``"adam"``, ``"adamw"``, ``"radam"``, with the ``--adam_*`` flags; bitsandbytes' 8-bit Adam(W)
    with ``--use_8bit_adam``."""
    lr = args.learning_rate if learning_rate is None else learning_rate
    kwargs = dict(lr=lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                  weight_decay=args.adam_weight_decay)
    if args.use_8bit_adam:
        if kind == "radam":
            raise ValueError("--use_8bit_adam takes Adam or AdamW; bitsandbytes has no 8-bit RAdam.")
        import bitsandbytes as bnb

        return (bnb.optim.AdamW8bit if kind == "adamw" else bnb.optim.Adam8bit)(params, **kwargs)
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}
    if kind not in classes:
        raise ValueError(f"Unknown optimizer {kind!r}; choose one of {sorted(classes)}.")
    return classes[kind](params, **kwargs)


# ---------------------------------------------------------------- the runner


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so that another run in the same process can build its Accelerator."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_cli(main: Callable, parse_args: Callable, argv=None) -> int:
    """Entry point of a training script: parse the flags (a bad flag exits with argparse's one-line error) and run
    ``main``; a divergence or a refused output folder ends with its message on stderr and exit status 1."""
    import sys

    args = parse_args(argv)
    try:
        return int(main(args) or 0)
    except (TrainingDivergedError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _model_config(module) -> dict:
    config = getattr(module, "config", None)
    if config is None:
        return {"class": type(module).__name__, "parameters": sum(p.numel() for p in module.parameters())}
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True  # one device sync


class TrainingRunner:
    """Runs a `TrainingPlan` under accelerate; see the module docstring.

    Args:
        args (`argparse.Namespace`): flags from `add_training_args` (validated by `validate_training_args`).
        script (`str`): the script's name, recorded in the saved config.
        log_with (*optional*): tracker objects for accelerate instead of ``--report_to``.

    Raises:
        FileExistsError: the output folder holds a finished model or checkpoints, and neither
            ``--resume_from_checkpoint`` nor ``--overwrite_output_dir`` was passed.
        FileNotFoundError: the checkpoint to resume from does not exist.
    """

    def __init__(self, args, script: str, log_with=None):
        self.args, self.script = args, script
        self.accelerator = make_accelerator(args, log_with)
        self.output_dir = args.output_dir
        self.resume_path = None
        if args.resume_from_checkpoint:
            self.resume_path = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        elif not args.overwrite_output_dir:
            finished = os.path.isfile(os.path.join(args.output_dir, "model_index.json"))
            checkpoints = list_checkpoints(args.output_dir)
            if finished or checkpoints:
                what = "a finished model" if finished else f"{len(checkpoints)} checkpoint(s)"
                raise FileExistsError(
                    f"{args.output_dir} already holds {what}. Pass --resume_from_checkpoint latest to continue that "
                    "run, or --overwrite_output_dir to start a new one there."
                )

    @property
    def device(self):
        return self.accelerator.device

    def main_process_first(self):
        """Context manager: the main process runs the block first (decoding data, filling caches), then the rest."""
        return self.accelerator.main_process_first()

    def print(self, *args):
        self.accelerator.print(*args)

    # ------------------------------------------------------------ output folder

    def _prepare_output_dir(self) -> None:
        """Main process: delete the old run on ``--overwrite_output_dir`` (every input has been checked by now),
        remove temporary folders left by killed runs, create the folder."""
        out = self.output_dir
        if self.args.overwrite_output_dir and os.path.isdir(out):
            entries = [CHECKPOINT_DIR, "samples", self.args.logging_dir, HISTORY_FILE, "model_index.json",
                       "training_config.json", "training_set.json"]
            index = os.path.join(out, "model_index.json")
            if os.path.isfile(index):
                import json

                with open(index, encoding="utf-8") as f:
                    entries += [k for k in json.load(f) if not k.startswith("_")]
            entries += [e for e in os.listdir(out) if e.startswith("pipeline_") and e.endswith(".py")]
            inside = os.path.realpath(out) + os.sep
            for entry in entries:
                path = os.path.join(out, entry)
                if not os.path.realpath(path).startswith(inside):  # never follow a name out of the folder
                    continue
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.isfile(path):
                    os.remove(path)
        os.makedirs(os.path.join(out, CHECKPOINT_DIR), exist_ok=True)
        for root in (out, os.path.join(out, CHECKPOINT_DIR)):
            for entry in os.listdir(root):
                if entry.startswith((".tmp-checkpoint-", ".tmp-final-")):
                    shutil.rmtree(os.path.join(root, entry), ignore_errors=True)

    def _read_history(self) -> list:
        import json

        path = os.path.join(self.output_dir, HISTORY_FILE)
        if not os.path.isfile(path):
            return []
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def _append_history(self, entry: dict) -> None:
        if self.accelerator.is_main_process:
            write_json_atomically(os.path.join(self.output_dir, HISTORY_FILE),
                                  jsonable(self._read_history() + [entry]))

    # ------------------------------------------------------------ checkpoints

    def _manifest(self, plan) -> dict:
        return {
            "models": {("model.safetensors" if i == 0 else f"model_{i}.safetensors"): name
                       for i, name in enumerate(plan.models)},
            "optimizers": {("optimizer.bin" if i == 0 else f"optimizer_{i}.bin"): phase.name
                           for i, phase in enumerate(plan.phases)},
            "objects": {f"custom_checkpoint_{i}.pkl": name for i, name in enumerate(["run_state", *plan.averages])},
        }

    def _load_checkpoint(self, path: str, plan, fingerprint: dict) -> dict:
        """Check the checkpoint against this run, then ``accelerator.load_state`` it."""
        import json

        with open(os.path.join(path, CHECKPOINT_STATE), encoding="utf-8") as f:
            state = json.load(f)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"Cannot resume from {path}: it was written by an older version of the training scripts "
                             "(before the accelerate checkpoints); start a new run with --overwrite_output_dir.")
        saved = state["fingerprint"]
        differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if differing:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {fingerprint.get(k)!r}" for k in differing)
            raise ValueError(f"Cannot resume from {path}: it was written with a different configuration ({details}).")
        if state["manifest"] != self._manifest(plan):
            raise ValueError(f"Cannot resume from {path}: it holds {state['manifest']}, this run has "
                             f"{self._manifest(plan)}.")
        # accelerate reads registered objects with weights_only=False; read them with the safe unpickler first, so
        # that a file needing arbitrary unpickling is refused before accelerate touches it.
        for name in state["manifest"]["objects"]:
            try:
                torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ValueError(f"Cannot resume from {path}: {name} is not a plain tensor file ({exc}).") from exc
        self.accelerator.load_state(path)
        return state

    def _save_checkpoint(self, step: int, plan, fingerprint: dict, history: list, averages: dict) -> str:
        """``accelerator.save_state`` into a temporary folder, flushed, then renamed to ``checkpoint-{step}``."""
        acc = self.accelerator
        root = os.path.join(self.output_dir, CHECKPOINT_DIR)
        tmp, final = os.path.join(root, f".tmp-checkpoint-{step}"), os.path.join(root, f"checkpoint-{step}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(root, exist_ok=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(tmp)
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_json_atomically(os.path.join(tmp, CHECKPOINT_STATE), jsonable({
                    "format": CHECKPOINT_FORMAT, "step": step, "fingerprint": fingerprint,
                    "manifest": self._manifest(plan), "run_history": history,
                    "averages": {name: avg.ema.summary() for name, avg in averages.items()},
                }))
                fsync_tree(tmp)
                if os.path.exists(final):
                    stale = f"{final}.old-{time.time_ns()}"
                    os.replace(final, stale)
                    os.replace(tmp, final)
                    shutil.rmtree(stale)
                else:
                    os.replace(tmp, final)
                fsync_dir(root)
        finally:
            if acc.is_main_process and os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        limit = self.args.checkpoints_total_limit
        if limit is not None and self.accelerator.is_main_process:
            for _, path in list_checkpoints(self.output_dir)[:-limit]:
                shutil.rmtree(path)

    def _diverged(self, weights_step: int, what: str, set_aside: bool) -> TrainingDivergedError:
        """Stop: the weights after ``weights_step`` updates are bad; their checkpoint (if any) is set aside."""
        acc = self.accelerator
        aside = None
        if acc.is_main_process:
            bad = os.path.join(self.output_dir, CHECKPOINT_DIR, f"checkpoint-{weights_step}")
            if set_aside and os.path.isdir(bad):
                aside = f"{bad}.diverged"
                if os.path.exists(aside):
                    aside = f"{aside}-{time.time_ns()}"
                os.replace(bad, aside)
                fsync_dir(os.path.dirname(bad))
            self._append_history({"event": "diverged", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "what": what, "weights_step": weights_step, "set_aside": aside})
        acc.wait_for_everyone()
        good = [(s, p) for s, p in list_checkpoints(self.output_dir) if s < weights_step]
        aside_note = (f" checkpoint-{weights_step} was written after the blow-up and is set aside as {aside};"
                      if aside else "")
        remedy = "a lower --learning_rate (or a longer --lr_warmup_steps, a --max_grad_norm)"
        advice = (f"the last good checkpoint is {good[-1][1]}: resume from it with --resume_from_checkpoint "
                  f"{good[-1][1]} and {remedy}." if good else
                  f"no checkpoint from before the blow-up is left: start again with {remedy}.")
        return TrainingDivergedError(
            f"{what}: the run diverged, so training stops and no model is saved;{aside_note} {advice}"
        )

    # ------------------------------------------------------------ training

    def train(self, plan: TrainingPlan, training_set, finalize: bool = True, callback: Callable = None) -> dict:
        """Train ``plan`` on ``training_set`` to ``--max_train_steps``; returns the networks (plain modules).

        Args:
            plan (`TrainingPlan`): the script's networks, phases and outputs.
            training_set (`TrainingSet`): the exact training set (its record is saved beside the model).
            finalize (`bool`, defaults to `True`): write checkpoints and the finished model (the throughput benchmark
                turns this off).
            callback (`Callable`, *optional*): ``callback(step)`` after every optimizer step (``step`` = updates done).

        Raises:
            TrainingDivergedError: a non-finite loss or non-finite weights (see the module docstring).
            ValueError: the checkpoint to resume from belongs to another configuration.
        """
        args, acc = self.args, self.accelerator
        device, rank, world = acc.device, acc.process_index, acc.num_processes
        accumulation = args.gradient_accumulation_steps
        for phase in plan.phases:
            phase.model = phase.model or phase.name
            if phase.model not in plan.models or phase.every < 1 or not 0 <= phase.offset < phase.every:
                raise ValueError(f"Phase {phase.name!r}: no trained model {phase.model!r}, or not every >= 1 and "
                                 f"0 <= offset < every.")
        for name, avg in plan.averages.items():
            if avg.source not in plan.models:
                raise ValueError(f"Average {name!r} follows {avg.source!r}, which is not a trained model.")

        # 1. Networks on the device; trained ones (and their optimizers) prepared by accelerate.
        for module in plan.frozen.values():
            module.to(device).eval().requires_grad_(False)
        for avg in plan.averages.values():
            avg.ema.to(device)
        if args.gradient_checkpointing:
            for name, model in plan.models.items():
                if not hasattr(model, "enable_gradient_checkpointing"):
                    raise ValueError(f"--gradient_checkpointing: {name} ({type(model).__name__}) does not support it.")
                model.enable_gradient_checkpointing()
        names = list(plan.models)
        prepared = acc.prepare(*plan.models.values(), *[p.optimizer for p in plan.phases])
        if len(names) + len(plan.phases) == 1:
            prepared = (prepared,)
        models = dict(zip(names, prepared[: len(names)]))
        optimizers = {p.name: opt for p, opt in zip(plan.phases, prepared[len(names):])}
        run_state = _RunState()
        acc.register_for_checkpointing(run_state, *[avg.ema for avg in plan.averages.values()])

        fingerprint = jsonable({
            "seed": args.seed, "train_batch_size": args.train_batch_size, "num_processes": world,
            "global_batch_size": args.train_batch_size * world, "gradient_accumulation_steps": accumulation,
            "mixed_precision": acc.mixed_precision,
            "optimizer": {"adam_beta1": args.adam_beta1, "adam_beta2": args.adam_beta2,
                          "adam_epsilon": args.adam_epsilon, "adam_weight_decay": args.adam_weight_decay,
                          "use_8bit_adam": args.use_8bit_adam,
                          "phases": [[p.name, p.model, p.every, p.offset, type(p.optimizer).__name__]
                                     for p in plan.phases]},
            "averages": {n: {k: v for k, v in avg.ema.summary().items()
                             if k in ("kind", "sigma_rel", "decay", "warmup")} | {"source": avg.source}
                         for n, avg in plan.averages.items()},
            "models": {n: _model_config(m) for n, m in plan.models.items()},
            "training_set_sha256": training_set.record["sha256"],
            "training_set_examples": training_set.record["num_examples"],
            **plan.fingerprint,
        })

        # 2. Resume (explicit only): weights, optimizers, averages, position; everything else follows from the step.
        lineage, resumed_from = [], None
        if self.resume_path:
            state = self._load_checkpoint(self.resume_path, plan, fingerprint)
            lineage, resumed_from = list(state.get("run_history", [])), self.resume_path
            self.print(f"Resumed from {self.resume_path} at step {run_state.step}.")
        first_step = run_state.step
        if first_step > args.max_train_steps:
            raise ValueError(f"--max_train_steps {args.max_train_steps} is below the step of the checkpoint to resume "
                             f"from ({first_step}).")

        # 3. Learning-rate schedules (diffusers.optimization), positioned at the first step with the current flags.
        from diffusers.optimization import get_scheduler

        schedulers = {}
        for phase in plan.phases:
            lr = args.learning_rate if phase.learning_rate is None else phase.learning_rate
            for group in optimizers[phase.name].param_groups:
                group["initial_lr"] = lr
                group["lr"] = lr
            optimizers[phase.name].optimizer.defaults["lr"] = lr  # read by the polynomial schedule
            schedulers[phase.name] = get_scheduler(
                args.lr_scheduler, optimizers[phase.name].optimizer, num_warmup_steps=args.lr_warmup_steps,
                num_training_steps=args.max_train_steps, num_cycles=args.lr_num_cycles, power=args.lr_power,
                last_epoch=first_step - 1)

        # 4. Output folder (only now: every input has been checked), history, trackers.
        if acc.is_main_process:
            self._prepare_output_dir()
            training_set.save(self.output_dir)
        acc.wait_for_everyone()
        settings = {k: getattr(args, k) for k in ADJUSTABLE}
        previous = next((e["settings"] for e in reversed(lineage) if "settings" in e), None)
        segment = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "start_step": first_step,
                   "resumed_from": resumed_from, "settings": settings,
                   "changed": {k: [previous.get(k), v] for k, v in settings.items()
                               if previous is not None and previous.get(k) != v}}
        lineage = jsonable(lineage + [segment])
        self._append_history(segment)
        if acc.is_main_process:
            init_trackers(acc, args.tracker_project_name, args)
        self.print(f"{plan.description}{', ' if plan.description else ''}{world} process(es).")

        # 5. Data: this process's share of every micro-batch, from the recorded position on.
        from torch.utils.data import DataLoader

        sampler = StepBatchSampler(training_set.expanded_indices(), args.train_batch_size, world, rank, args.seed,
                                   start=first_step * accumulation, stop=args.max_train_steps * accumulation)
        loader = DataLoader(training_dataset(training_set), sampler=sampler, batch_size=None,
                            collate_fn=_DecodeBatch(training_set.images.shape[1:]),
                            num_workers=args.dataloader_num_workers, pin_memory=device.type == "cuda")

        def on_device(batch):
            out = {"pixel_values": images_to_model_range(batch["pixel_values"].to(device, non_blocking=True)),
                   "indices": batch["indices"].to(device, non_blocking=True)}
            if "class_labels" in batch:
                out["class_labels"] = batch["class_labels"].to(device, non_blocking=True)
            if "captions" in batch:
                out["captions"] = batch["captions"]
            return out

        # --compile covers every network a step runs: the trained ones, their averages (e.g. LCM's target network,
        # updated in place: the compiled wrapper shares its parameters) and the frozen teacher.
        maybe_compile = torch.compile if args.compile else (lambda m: m)
        step_models = {n: maybe_compile(m) for n, m in models.items()}
        step_nets = {**step_models, **{n: maybe_compile(a.ema.module) for n, a in plan.averages.items()},
                     **{n: maybe_compile(m) for n, m in plan.frozen.items()}}
        plain_nets = {**{n: acc.unwrap_model(m) for n, m in models.items()},
                      **{n: a.ema.module for n, a in plan.averages.items()}, **plan.frozen}
        watched = [*(plain_nets[n] for n in models), *(a.ema.module for a in plan.averages.values())]
        followers = {name: [a.ema for a in plan.averages.values() if a.source == name] for name in plan.models}
        last_loss = {}

        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            def _terminate(signum, frame):
                raise SystemExit(128 + signum)
            previous_handler = signal.signal(signal.SIGTERM, _terminate)
        progress = tqdm(total=args.max_train_steps, initial=first_step, disable=not acc.is_local_main_process,
                        desc=self.script)
        try:
            batches = iter(loader)
            prune_pending = self.resume_path is not None
            upcoming = None
            for step in range(first_step, args.max_train_steps):
                micro = upcoming or [on_device(next(batches)) for _ in range(accumulation)]
                upcoming = None
                # 6. Every due phase: accumulate over the micro-batches, check the loss, clip, step, average.
                for index, phase in enumerate(plan.phases):
                    if not phase.is_due(step):
                        continue
                    model, optimizer = models[phase.model], optimizers[phase.name]
                    optimizer.zero_grad(set_to_none=True)
                    finite = torch.ones((), dtype=torch.bool, device=device)
                    total = torch.zeros((), device=device)
                    for a, batch in enumerate(micro):
                        m = step * accumulation + a
                        generator = seed_micro_step(args.seed, m, rank, index, device)
                        with acc.accumulate(model):
                            with acc.autocast():
                                out = phase.step(step_nets, batch, generator)
                            loss = (out[0] if isinstance(out, tuple) else out).float().mean()
                            finite &= torch.isfinite(loss.detach())
                            total += loss.detach() / accumulation
                            acc.backward(loss)
                    if upcoming is None and step + 1 < args.max_train_steps:
                        # Gather the next step's batches while the device still works on this one.
                        upcoming = [on_device(next(batches)) for _ in range(accumulation)]
                    # Every process stops together (a lone stop would hang the others in the next all-reduce).
                    if not bool(acc.gather(finite.reshape(1)).all()):
                        raise self._diverged(step, f"Non-finite {phase.name} loss at step {step + 1}", set_aside=True)
                    if args.max_grad_norm > 0:
                        # One optimizer's gradients at a time (accelerate's clip_grad_norm_ unscales them all).
                        acc.unscale_gradients(optimizer=optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    for ema in followers[phase.model]:
                        ema.update(plain_nets[phase.model])
                    run_state.updates[phase.name] = run_state.updates.get(phase.name, 0) + 1
                    last_loss[phase.name] = total
                with warnings.catch_warnings():
                    # Schedules follow the global step, so a phase that has not run yet (DMD's generator before its
                    # first update) still advances its warm-up; torch warns about exactly that.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                    for scheduler in schedulers.values():
                        scheduler.step()
                run_state.step, run_state.micro_step = step + 1, (step + 1) * accumulation
                done = step + 1
                if prune_pending:  # the newest checkpoint led to a finite loss: older ones may go now
                    self._prune()
                    prune_pending = False

                # 7. Logging, validation images, checkpoints.
                last = done == args.max_train_steps
                if done % args.logging_steps == 0 or last:
                    logs = {}
                    for name, value in last_loss.items():
                        key = "loss" if len(plan.phases) == 1 else f"loss/{name}"
                        logs[key] = acc.reduce(value, reduction="mean").item()
                        logs["lr" if len(plan.phases) == 1 else f"lr/{name}"] = schedulers[name].get_last_lr()[0]
                    progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")})
                    acc.log(logs, step=done)
                if finalize and (done % args.checkpointing_steps == 0 or last):
                    finite = _all_finite(t for m in watched for t in m.state_dict().values())
                    if not bool(acc.gather(torch.tensor([finite], device=device)).all()):
                        raise self._diverged(done, f"Non-finite weights after step {done}", set_aside=False)
                    self._save_checkpoint(done, plan, fingerprint, lineage, plan.averages)
                    prune_pending = True
                if (plan.validate is not None and args.num_validation_images > 0
                        and (done % args.validation_steps == 0 or last)):
                    if acc.is_main_process:
                        self._validate(plan, plain_nets, done)
                    acc.wait_for_everyone()
                progress.update(1)
                if callback is not None:
                    callback(done)

            # 8. The finished model, written atomically with its records.
            if finalize:
                if acc.is_main_process and plan.export is not None:
                    pipeline, records = plan.export(plain_nets)
                    config = jsonable(redact_config({
                        **vars(args), "command": list(sys.argv), "script": self.script, "num_processes": world,
                        "mixed_precision_used": acc.mixed_precision,
                        "averages": {n: {"source": a.source, **a.ema.summary()} for n, a in plan.averages.items()},
                        "optimizer_updates": dict(run_state.updates), "run_history": lineage, **plan.config,
                    }))
                    save_pipeline_atomically(pipeline, self.output_dir, {
                        "training_set.json": training_set.record, "training_config.json": config, **records})
                    self.print(f"Saved the finished model to {self.output_dir}.")
                self._prune()
                self._append_history({"event": "finished", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                      "step": args.max_train_steps})
                acc.wait_for_everyone()
                if getattr(args, "push_to_hub", False) and plan.export is not None:
                    # After everything is written: the memorization audit (every process samples its share), then,
                    # past the audit's last barrier so that a failed upload never leaves the other processes waiting,
                    # the card (made from the audit), the single-file pipeline and the weights in one commit.
                    from .. import hub

                    metrics_path = self._audit_before_push(args)
                    if acc.is_main_process:
                        url = hub.push_to_hub_folder(
                            self.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo,
                            metrics_path=metrics_path,
                            unaudited="--push_without_audit" if metrics_path is None else None)
                        self.print(f"Pushed the finished model to {url}.")
        finally:
            progress.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            acc.end_training()
        return plain_nets

    def _audit_before_push(self, args) -> str | None:
        """Every process, before ``--push_to_hub``: audit the finished model (`hub_audit.audit_before_push`, into
        ``<output_dir>-audit``, each process sampling its share) and return its ``metrics.json``; None with
        ``--push_without_audit``."""
        if getattr(args, "push_without_audit", False):
            return None
        from ..hub import check_audit
        from ..hub_audit import audit_before_push

        try:
            metrics_path = audit_before_push(self.output_dir, num_samples=getattr(args, "push_audit_num_samples", None),
                                             metrics=getattr(args, "push_audit_metrics", None),
                                             device=str(self.accelerator.device))
            if self.accelerator.is_main_process:
                check_audit(self.output_dir, metrics_path)  # the card must carry the audit
            return metrics_path
        except Exception as exc:
            raise RuntimeError(
                f"The memorization audit before the push failed ({type(exc).__name__}: {exc}); nothing was uploaded. "
                f"The model is saved in {self.output_dir}: push it with `memdistill push --model {self.output_dir} "
                f"--repo_id {args.hub_model_id}`.") from exc

    def _validate(self, plan, nets, step: int) -> None:
        """Main process: the script's validation images, saved as grids and sent to every tracker."""
        images = plan.validate(nets, step)
        folder = os.path.join(self.output_dir, "samples")
        for tag, x in images.items():
            save_image_grid(x, os.path.join(folder, f"step-{step:07d}{'-' + tag if tag else ''}.png"))
        log_images(self.accelerator, {("samples/" + tag if tag else "samples"): x for tag, x in images.items()}, step)


__all__ = ["Average", "ModelEMA", "Phase", "StepBatchSampler", "TrainingDivergedError", "TrainingPlan",
           "TrainingRunner", "build_optimizer", "load_checkpoint_weights", "reset_accelerate_state", "run_cli",
           "seed_micro_step", "training_dataset"]
