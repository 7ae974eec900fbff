"""Memorization and quality audits: one pipeline for every model, sharded over processes, resumable.

- `evaluation.streams`: the per-sample random streams (starting noise, injected noise, class label).
- `evaluation.store`: the sample store (8-bit shards with seeds and conditions, one manifest).
- `evaluation.sets`, `evaluation.models`: the data sets and the models of an audit.
- `evaluation.references`: the training sets' features, chunked over processes and cached by sha256.
- `evaluation.measures`: each measure declared once with what it needs.
- `evaluation.audit`: the pipeline (plan → samples → per-sample measures → results) and ``--from_samples``.
- `evaluation.results`, `evaluation.report`: the one ``metrics.json`` schema and its one renderer.
- `evaluation.command`: ``memdistill evaluate``.
"""

from .audit import evaluate, evaluate_from_samples, read_conditions, read_samples
from .measures import DEFAULT_METRICS, L2_THRESHOLD, METRICS, PAIRING_TEACHER_STEPS
from .models import local_model_folder, takes_prompts
from .report import render_report
from .results import SCHEMA, compare_results, read_results, strict_json
from .streams import shared_labels, shared_noise, stream_generators, stream_seeds

__all__ = ["DEFAULT_METRICS", "L2_THRESHOLD", "METRICS", "PAIRING_TEACHER_STEPS", "SCHEMA", "compare_results",
           "evaluate", "evaluate_from_samples", "local_model_folder", "read_conditions", "read_results",
           "read_samples", "render_report", "shared_labels", "shared_noise", "stream_generators", "stream_seeds",
           "strict_json", "takes_prompts"]
