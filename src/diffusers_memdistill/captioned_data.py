"""Image–caption pairs for text-to-image memorization: the memorization mix of 000 §4.1 (SPEC §4) and its records.

The mix is ``num_memorized`` pairs of one dataset, each repeated ``memorized_repeats`` times, plus
``extra_ratio × num_memorized`` pairs of another (COCO-style), each seen once; no augmentation. Both are datasets as
`diffusers_memdistill.data` reads them (an imagefolder whose ``metadata.jsonl`` gives a ``text`` or ``caption`` per
file, a ``save_to_disk`` folder or a Hub dataset with image and text columns). Every chosen image must have a caption
and decode; only the chosen images are decoded.

Records (format 2 of `diffusers_memdistill.data`, one entry per image with its source, sha256, caption and repeat
count) are written beside the model: ``memorized_set.json`` and ``extra_set.json``, each loadable on its own with
`load_training_set`, and ``training_set.json``, the whole mix (memorized entries first) that the runner trains on.
`load_memorization_mix` reads them back for the audit.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .data import (
    RECORD_FORMAT,
    TrainingSet,
    _decode,
    _make_record,
    _training_set_from_record,
    images_sha256,
    index_dataset,
    load_training_set,
)

MEMORIZED_RECORD = "memorized_set.json"
EXTRA_RECORD = "extra_set.json"
MIX_KIND = "text_to_image_memorization_mix"


def _captioned_pool(index, what: str, max_items: int | None, seed: int, exclude=()) -> np.ndarray:
    """The items of ``index`` that may be chosen: all of them (less ``exclude``), or a seeded ``max_items`` of them.

    Raises:
        ValueError: the dataset has no caption column, or some of its items have an empty caption.
    """
    if index.captions is None:
        raise ValueError(f"{what} {index.name} has no captions: give it a `text` (or `caption`) column, e.g. a "
                         "metadata.jsonl with one {\"file_name\": ..., \"text\": ...} line per image.")
    missing = [i for i, c in enumerate(index.captions) if not c.strip()]
    if missing:
        examples = ", ".join(index.sources[i] for i in missing[:3])
        raise ValueError(f"{len(missing)} of {len(index)} images of {what} {index.name} have no caption (e.g. "
                         f"{examples}): caption every image, or remove those that have none.")
    pool = np.setdiff1d(np.arange(len(index)), np.asarray(list(exclude), dtype=np.int64))
    if max_items is not None and max_items < len(pool):
        pool = np.sort(np.random.default_rng([seed, 1]).choice(pool, size=max_items, replace=False))
    return pool


def build_memorization_mix(
    memorized_data: str,
    num_memorized: int,
    memorized_repeats: int,
    resolution: int,
    extra_data: str | None = None,
    extra_ratio: int = 0,
    seed: int = 0,
    memorized_split: str = "train",
    extra_split: str = "train",
    max_train_samples: int | None = None,
    cache_dir: str | None = None,
) -> TrainingSet:
    r"""
    The training set of a memorizing text-to-image model (000 §4.1): seeded choices of memorized and extra pairs.

    Args:
        memorized_data (`str`): the pairs to memorize (a dataset as `diffusers_memdistill.data` reads it).
        num_memorized (`int`): how many of its pairs are chosen (seeded, uniform).
        memorized_repeats (`int`): how many times each memorized pair appears in the training stream.
        resolution (`int`): side of the square RGB images (centre crop, antialiased resize, no augmentation).
        extra_data (`str`, *optional*): the pairs seen once; when it is the memorized data's own split, the memorized
            pairs are left out of it.
        extra_ratio (`int`): extra pairs = ``extra_ratio × num_memorized``.
        seed (`int`): seed of both choices.
        memorized_split, extra_split (`str`): the splits read.
        max_train_samples (`int`, *optional*): truncate each source to a seeded subset of this many items before
            choosing (diffusers' debugging flag).
        cache_dir (`str`, *optional*): the datasets cache.

    Returns:
        `TrainingSet`: memorized images first (``repeats`` = ``memorized_repeats``), then the extra ones (1), with
        their captions; ``record["parts"]`` holds the records of the two parts (``memorized_set.json`` and
        ``extra_set.json``).

    Raises:
        ValueError: a count below 1, missing captions, an image that cannot be decoded, or a source with fewer pairs
            than asked for.
    """
    for name, value in (("num_memorized", num_memorized), ("memorized_repeats", memorized_repeats),
                        ("resolution", resolution)):
        if value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}.")
    if extra_ratio < 0:
        raise ValueError(f"--extra_ratio must not be negative, got {extra_ratio}.")
    if extra_ratio and extra_data is None:
        raise ValueError("--extra_ratio needs --extra_data, the pairs to mix in.")
    rng = np.random.default_rng(seed)
    mem_index = index_dataset(memorized_data, memorized_split, cache_dir)
    pool = _captioned_pool(mem_index, "--memorized_data", max_train_samples, seed)
    if num_memorized > len(pool):
        raise ValueError(f"--num_memorized {num_memorized} is larger than the {len(pool)} pairs of --memorized_data "
                         f"{mem_index.name}" + (" (after --max_train_samples)." if max_train_samples else "."))
    chosen = np.sort(rng.choice(pool, size=num_memorized, replace=False))
    images, hashes = _decode(mem_index, chosen, resolution, 3)
    repeats = np.full(num_memorized, memorized_repeats)
    memorized = _training_set_from_record(images, _make_record(
        mem_index, chosen, repeats, images, hashes, resolution, 3, role="memorized", seed=seed,
        num_memorized=num_memorized, memorized_repeats=memorized_repeats, max_train_samples=max_train_samples))
    parts = {"memorized": memorized}
    if extra_data is not None and extra_ratio:
        num_extra = extra_ratio * num_memorized
        extra_index = index_dataset(extra_data, extra_split, cache_dir)
        same = extra_index.name == mem_index.name and extra_split == memorized_split
        extra_pool = _captioned_pool(extra_index, "--extra_data", max_train_samples, seed, chosen if same else ())
        if num_extra > len(extra_pool):
            raise ValueError(
                f"--extra_data {extra_index.name} has {len(extra_pool)} pairs"
                + (" besides the memorized ones" if same else "")
                + f", fewer than --extra_ratio {extra_ratio} × --num_memorized {num_memorized} = {num_extra}.")
        extra_chosen = np.sort(rng.choice(extra_pool, size=num_extra, replace=False))
        extra_images, extra_hashes = _decode(extra_index, extra_chosen, resolution, 3)
        parts["extra"] = _training_set_from_record(extra_images, _make_record(
            extra_index, extra_chosen, np.ones(num_extra, int), extra_images, extra_hashes, resolution, 3,
            role="extra", seed=seed, extra_ratio=extra_ratio, max_train_samples=max_train_samples))
    return combine_parts(parts)


def combine_parts(parts: dict) -> TrainingSet:
    """One `TrainingSet` of the parts (``"memorized"`` and, optionally, ``"extra"``), in that order; its record lists
    every entry with the part it belongs to and keeps each part's own record under ``parts``."""
    sets = [parts[k] for k in ("memorized", "extra") if k in parts]
    images = torch.cat([s.images for s in sets])
    repeats = torch.cat([s.repeats for s in sets])
    first = sets[0].record
    record = {
        "format": RECORD_FORMAT, "role": "train", "kind": MIX_KIND,
        "dataset": first["dataset"], "resolution": first["resolution"], "channels": first["channels"],
        "num_images": int(images.shape[0]), "num_examples": int(repeats.sum()), "sha256": images_sha256(images),
        "num_memorized": len(parts["memorized"]), "memorized_repeats": int(parts["memorized"].repeats[0]),
        "num_extra": len(parts["extra"]) if "extra" in parts else 0,
        "parts": {"memorized": MEMORIZED_RECORD, **({"extra": EXTRA_RECORD} if "extra" in parts else {})},
        "entries": [{**e, "part": name} for name in ("memorized", "extra") if name in parts
                    for e in parts[name].record["entries"]],
    }
    captions = [c for s in sets for c in s.captions]
    mix = TrainingSet(images, None, repeats, record, captions)
    mix.parts = parts
    return mix


def part_records(mix: TrainingSet) -> dict:
    """File name -> record of each part of a mix, the files written beside the model."""
    names = {"memorized": MEMORIZED_RECORD, "extra": EXTRA_RECORD}
    return {names[k]: part.record for k, part in mix.parts.items()}


def is_memorization_mix(folder: str) -> bool:
    """Whether a model folder carries the records of a memorization mix."""
    return os.path.isfile(os.path.join(folder, MEMORIZED_RECORD))


def load_memorization_mix(folder: str, memorized_data: str | None = None, extra_data: str | None = None,
                          cache_dir: str | None = None) -> TrainingSet:
    """Rebuild the mix a model was trained on from the part records beside it (each file checked against its
    sha256, see `load_training_set`); ``memorized_data`` / ``extra_data`` say where the data lives now if it moved."""
    parts = {"memorized": load_training_set(os.path.join(folder, MEMORIZED_RECORD), memorized_data, cache_dir)}
    if os.path.isfile(os.path.join(folder, EXTRA_RECORD)):
        parts["extra"] = load_training_set(os.path.join(folder, EXTRA_RECORD), extra_data, cache_dir)
    return combine_parts(parts)
