"""The memorization audit that runs before a model is pushed to the Hub.

``memdistill push`` and the training scripts' ``--push_to_hub`` call `audit_before_push` on the finished model unless
they are given an earlier audit (``--metrics``) or told to upload without one (``--no_audit``,
``--push_without_audit``, which the card then states). The audit is the evaluation of ``memdistill evaluate`` for this
one model; by default it measures only statistics that need no pretrained weights (the L2 nearest-neighbour ratio, and
the pixel Fréchet distance for image models), so it runs offline. Its folder is written beside the model,
``<parent>/<name>-audit``, never inside it: only the card, the figures and ``metrics.json`` that the card shows are
uploaded.
"""

from __future__ import annotations

import json
import os
import shutil

DEFAULT_AUDIT_NUM_SAMPLES = 1000
DEFAULT_AUDIT_METRICS = ("l2", "fd_pixel")
DEFAULT_TEXT_TO_IMAGE_AUDIT_METRICS = ("l2",)
SAMPLES_PER_PROMPT = 4  # seeds per prompt of a text-to-image model's audit
# Written first into an audit folder: it names the model audited there, so that a later audit of the same model may
# replace the folder and nothing else ever is.
AUDIT_MARKER = "audited_model.json"


def default_audit_dir(model_dir: str) -> str:
    """``<parent>/<name>-audit`` for the model folder ``<parent>/<name>``: beside the model, never inside it."""
    path = os.path.realpath(str(model_dir)).rstrip(os.sep)
    return os.path.join(os.path.dirname(path), os.path.basename(path) + "-audit")


def _overlaps(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def _audited_model(folder: str) -> str | None:
    """The model an audit folder was written for (its marker), or None when it holds no readable marker."""
    try:
        with open(os.path.join(folder, AUDIT_MARKER), encoding="utf-8") as f:
            model = json.load(f).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def parse_audit_metrics(metrics) -> tuple | None:
    """``"l2,fd_pixel"`` or a sequence of names -> a tuple of names (None or empty: the default of the model's kind);
    `ValueError` for a name that the evaluation does not measure."""
    if metrics is None:
        return None
    names = tuple(m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip())
    from .evaluation import METRICS

    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown audit metric {unknown[0]!r}: choose among {', '.join(METRICS)}.")
    return names or None


# ------------------------------------------------------------------------------------------------------------------
# THE ONE CALL INTO THE EVALUATION PIPELINE (`diffusers_memdistill.evaluation.evaluate`, which audits image and
# text-to-image models alike): only the audit's defaults differ between the two.


def _run_evaluation(model_dir, output_dir, *, num_samples, metrics, seed, batch_size, device, weights) -> None:
    """Evaluate the one model ``model_dir`` into ``output_dir`` (which then holds its ``metrics.json``)."""
    from .evaluation import evaluate, takes_prompts

    if takes_prompts(model_dir):  # num_samples generations for the training prompts, 4 per prompt
        if weights.pop("inception_weights", None) is not None:
            raise ValueError("--inception_weights does not apply to a text-to-image model (its audit has no FID).")
        evaluate([model_dir], output_dir, metrics=metrics or DEFAULT_TEXT_TO_IMAGE_AUDIT_METRICS,
                 num_prompts=max(1, num_samples // SAMPLES_PER_PROMPT), samples_per_prompt=SAMPLES_PER_PROMPT,
                 seed=seed, batch_size=batch_size, device=device, **weights)
    else:
        evaluate([model_dir], output_dir, num_samples=num_samples, metrics=metrics or DEFAULT_AUDIT_METRICS, seed=seed,
                 batch_size=batch_size, device=device, **weights)


# ------------------------------------------------------------------------------------------------------------------


def audit_before_push(
    model_dir: str,
    output_dir: str | None = None,
    *,
    num_samples: int | None = None,
    metrics=None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | None = None,
    sscd_weights: str | None = None,
    sscd_onnx: str | None = None,
    inception_weights: str | None = None,
) -> str:
    r"""
    Audit one saved model for memorization and quality before it is pushed, with the evaluation of
    ``memdistill evaluate``; return the ``metrics.json`` that its card is rendered from.

    A model whose pipeline takes prompts (or a LoRA folder of one) gets the text-to-image audit on the prompts of its
    training pairs; any other model is sampled from the evaluation's shared noise and compared with its
    ``training_set.json``, with a floor row of held-out real images when the data has some.

    Args:
        model_dir (`str`): the saved model folder.
        output_dir (`str`, *optional*): the audit folder; defaults to ``<parent>/<name>-audit`` beside the model. It
            must not be, hold or lie inside the model folder. An existing folder is replaced only when it is an
            earlier audit of this same model (or empty); any other is refused.
        num_samples (`int`, *optional*, defaults to 1000): samples of the model; for a text-to-image model, the
            generations for its training prompts (4 per prompt, so ``num_samples // 4`` prompts at most).
        metrics (`str` or `tuple[str]`, *optional*): comma-separated names or a tuple; defaults to ``l2,fd_pixel``
            (``l2`` for text-to-image models), which need no pretrained weights; ``sscd`` and ``fid`` need the
            weights below, ``clip`` open_clip's.
        seed (`int`, defaults to 0): the seed of the evaluation's noise streams.
        batch_size (`int`, *optional*): sampling batch size (default: 256, or 16 for text-to-image models).
        device (`str`, *optional*): ``"cuda"`` or ``"cpu"`` (CUDA when available); under ``accelerate launch``,
            this process's device (every process calls this function and audits its share of the samples).
        sscd_weights, sscd_onnx (`str`, *optional*): the SSCD TorchScript file or URL, or an ONNX file.
        inception_weights (`str`, *optional*): the FID Inception TorchScript file or URL (image models only).

    Returns:
        `str`: the path of the ``metrics.json`` written.

    Raises:
        `ValueError`: a bad setting or an audit folder that overlaps the model. `FileExistsError`: the audit folder
        exists and is not an earlier audit of this model.
    """
    model = os.path.realpath(str(model_dir))
    if not os.path.isdir(model):
        raise FileNotFoundError(f"{model_dir} is not a folder: there is no model to audit.")
    num_samples = DEFAULT_AUDIT_NUM_SAMPLES if num_samples is None else int(num_samples)
    if num_samples < 2:
        raise ValueError(f"The audit needs at least 2 samples, got {num_samples}.")
    metrics = parse_audit_metrics(metrics)
    out = os.path.realpath(str(output_dir)) if output_dir is not None else default_audit_dir(model)
    if _overlaps(out, model):
        raise ValueError(f"The audit folder {out} is, holds or lies inside the model folder {model}: it would be "
                         "uploaded with the model (or replace it). Choose a folder outside the model.")
    replace = False
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f"The audit folder {out} is a file; remove it or choose another audit folder.")
        if os.listdir(out):
            if _audited_model(out) != model:
                raise FileExistsError(
                    f"{out} exists and is not an earlier audit of {model}; remove it, choose another audit folder, "
                    "or pass the metrics.json of an earlier evaluation of this model instead of auditing it.")
            replace = True  # an earlier audit of this model: replaced, so that no figure of it lingers
    # Under `accelerate launch` every process takes its share of the audit: each has checked the folder above before
    # the main process replaces it.
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        if replace:
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, AUDIT_MARKER), "w", encoding="utf-8") as f:
            json.dump({"model": model}, f, indent=1)
        print(f"Auditing {model} for memorization before the push ({num_samples} samples); writing {out}.")
    state.wait_for_everyone()
    weights = {k: v for k, v in (("sscd_weights", sscd_weights), ("sscd_onnx", sscd_onnx),
                                 ("inception_weights", inception_weights)) if v is not None}
    _run_evaluation(model, out, num_samples=num_samples, metrics=metrics, seed=seed, batch_size=batch_size,
                    device=device, weights=weights)
    metrics_path = os.path.join(out, "metrics.json")
    if not os.path.isfile(metrics_path):
        raise RuntimeError(f"The audit of {model} wrote no metrics.json in {out}; nothing was uploaded.")
    return metrics_path
