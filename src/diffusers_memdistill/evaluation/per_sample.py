"""The per-sample stage of the measures: for each shard of each run, on the process that holds it, the nearest
training images, the descriptors and the scores of its samples, written beside them (``measures/<run>/``). A shard's
outputs depend only on the shard."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .extractors import Extractors
from .processes import Processes, Timings, default_cache_dir
from .store import dequantize_samples, load_uint8, shard_path, shard_ranges, write_safetensors

MEASURES_DIR = "measures"


@dataclass
class MeasureContext:
    """What the measures of one audit read: its manifest and settings, where its samples and outputs are, its
    processes, its extractors and data sets, and what is computed once for all shards (the training sets' features,
    their distinct pixel rows and Fréchet statistics, the phase timings)."""

    manifest: dict
    settings: dict
    samples_dir: str
    output_dir: str
    figures_dir: str
    device: object
    procs: Processes
    extractors: Extractors
    train_sets: dict  # id -> TrainingSet (every image trained on)
    heldout: dict  # id -> TrainingSet (floor)
    pairs: object = None  # text-to-image: the audited pairs
    references: dict = field(default_factory=dict)  # (training set id, space) -> ReferenceFeatures
    timings: Timings = field(default_factory=Timings)
    distinct_pixels: dict = field(default_factory=dict)  # training set id -> (distinct rows, their indices)
    reference_stats: dict = field(default_factory=dict)  # (training set id, space) -> FeatureStats

    @property
    def text_to_image(self) -> bool:
        return self.manifest["task"] == "text-to-image"

    def run_folder(self, run) -> str:
        return os.path.join(self.samples_dir, run["slug"])

    def measures_folder(self, run) -> str:
        return os.path.join(self.output_dir, MEASURES_DIR, run["slug"])

    def num_samples(self, run) -> int:
        return run.get("num_samples", self.manifest["num_samples"])

    def prompts_of(self, run, start, stop) -> list | None:
        if not self.text_to_image:
            return None
        if run["kind"] == "floor":
            return self.heldout[run["training_set"]].captions[start:stop]
        c = self.manifest["conditions"]
        everything = c["prompts"] + c["heldout_prompts"]
        return [everything[i // c["samples_per_prompt"]] for i in range(start, stop)]


def prepare_references(ctx: MeasureContext, progress: bool) -> None:
    """Features of every training set in every feature space, computed once over the processes and cached."""
    from .references import reference_features

    cache = ctx.settings["cache_dir"] or default_cache_dir()
    for tid, ts in ctx.train_sets.items():
        for name, space in ctx.extractors.spaces.items():
            ctx.references[tid, name] = reference_features(
                ts.images, len(ts), ts.record["sha256"], space, cache, process_index=ctx.procs.index,
                num_processes=ctx.procs.count, wait_for_everyone=ctx.procs.wait, progress=progress)
        if "pixels" in ctx.extractors.spaces:
            # Every process at once: the main one computes it, the others wait (a barrier), then read it back.
            ctx.distinct_pixels[tid] = ctx.references[tid, "pixels"].distinct()
    ctx.procs.wait()


def _features(space, images_u8, nonfinite) -> torch.Tensor:
    """Descriptors of the finite samples; NaN rows for the others (reported as NaN samples by the measures)."""
    from .references import embed

    finite = ~nonfinite
    out = None
    if bool(finite.any()):
        values = embed(space, images_u8[finite])
        out = torch.full((images_u8.shape[0], values.shape[1]), float("nan"))
        out[finite] = values
    else:
        out = torch.full((images_u8.shape[0], 1), float("nan"))
    return out


def measure_shard(ctx: MeasureContext, run, k: int) -> dict:
    """The per-sample outputs of every measure for shard k of one run."""
    from ..metrics import compute_clip_score, knn_search

    images_u8, nonfinite = load_uint8(ctx.run_folder(run), ctx.num_samples(run), ctx.manifest["shard_size"], k)
    unit = dequantize_samples(images_u8, nonfinite)
    tid, out = run["training_set"], {}
    metrics = ctx.settings["metrics"]
    if "l2" in metrics:
        rows, keep = ctx.distinct_pixels[tid]
        with ctx.timings("search"):
            knn = knn_search(unit.flatten(1), rows, k=2, metric="l2", device=ctx.device)
        idx = knn.indices.cpu()
        out["l2_nn_indices"] = torch.where(idx >= 0, keep[idx.clamp_min(0)], idx)
        out["l2_nn_distances"] = knn.values.cpu()
    for p in ctx.extractors.sscd:
        with ctx.timings("features"):
            feats = _features(ctx.extractors.spaces[f"sscd-{p}"], images_u8, nonfinite)
        reference = ctx.references[tid, f"sscd-{p}"].features
        if feats.shape[1] != reference.shape[1]:  # every sample non-finite
            feats = torch.full((feats.shape[0], reference.shape[1]), float("nan"))
        with ctx.timings("search"):
            knn = knn_search(feats, reference, k=1, metric="cosine", device=ctx.device)
        out[f"sscd-{p}_features"], out[f"sscd-{p}_nn_index"] = feats, knn.indices[:, 0].cpu()
        out[f"sscd-{p}_similarity"] = knn.values[:, 0].cpu()
    if ctx.extractors.inception is not None:
        with ctx.timings("features"):
            out["inception_features"] = _features(ctx.extractors.spaces["inception"], images_u8, nonfinite)
    if ctx.extractors.clip is not None and ctx.text_to_image:
        start = k * ctx.manifest["shard_size"]
        prompts = ctx.prompts_of(run, start, start + images_u8.shape[0])
        scores = torch.full((images_u8.shape[0],), float("nan"))
        finite = ~nonfinite
        if bool(finite.any()):
            with ctx.timings("features"):
                scores[finite] = compute_clip_score(unit[finite], [p for p, f in zip(prompts, finite) if f],
                                                    ctx.extractors.clip).float().cpu()
        out["clip_score"] = scores
    return out


def measure_shards(ctx: MeasureContext, runs: list, progress: bool) -> None:
    size = ctx.manifest["shard_size"]
    for run in runs:
        ranges = shard_ranges(ctx.num_samples(run), size)
        folder = ctx.measures_folder(run)
        for k in tqdm(ctx.procs.mine(ranges), desc=f"Measuring {run['name']}", disable=not progress):
            path = shard_path(folder, k)
            if os.path.isfile(path):
                continue
            write_safetensors(path, measure_shard(ctx, run, k), {"format": "memdistill-measures"})


def gather(ctx: MeasureContext, run) -> dict:
    """Every shard's per-sample outputs of one run, concatenated in sample order."""
    from safetensors.torch import load_file

    parts = [load_file(shard_path(ctx.measures_folder(run), k))
             for k in range(len(shard_ranges(ctx.num_samples(run), ctx.manifest["shard_size"])))]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}



__all__ = ["MEASURES_DIR", "MeasureContext", "gather", "measure_shard", "measure_shards", "prepare_references"]
