"""The data an audit compares samples with: each model's training set, held-out real images of the same distribution
(the floor), and for text-to-image models the audited image–caption pairs whose captions are the prompts."""

from __future__ import annotations

import numpy as np

from ..data import TrainingSet, build_training_set, load_heldout_set, load_training_set


def heldout_or_note(training_set, num_images, seed: int):
    """``(held, None)``: ``num_images`` held-out real images of ``training_set``'s distribution
    ([`load_heldout_set`]), or all there are when fewer; ``(None, note)`` where the data holds none, the note saying
    why."""
    try:
        return load_heldout_set(training_set, num_images=num_images, seed=seed), None
    except ValueError:
        # Fewer held-out images than asked for (checked before anything is decoded): take them all. Where there are
        # none, this raises again, and its message is the note.
        try:
            return load_heldout_set(training_set, num_images=None, seed=seed), None
        except ValueError as exc:
            return None, str(exc).rstrip(".")


def heldout_sets(train_sets: dict, num_images: int, seed: int, floor: bool):
    """Held-out real images of each training set's distribution: as many as the samples, or all there are when fewer;
    a note instead where the data holds none (or the floor was not asked for)."""
    heldout, notes = {}, {}
    if not floor:
        return heldout, {tid: "not requested (--no_floor)" for tid in train_sets}
    for tid, ts in train_sets.items():
        held, note = heldout_or_note(ts, num_images, seed)
        if held is None:
            notes[tid] = note
        else:
            heldout[tid] = held
    return heldout, notes


def heldout_entry(held: TrainingSet, seed: int) -> dict:
    return {"sha256": held.record["sha256"], "num_images": len(held), "seed": seed,
            "dataset": held.record["dataset"], "split": held.record["split"], "how": held.record["heldout_from"]["how"]}


def training_set_of(path: str, train_data: str | None, image_shape: tuple) -> TrainingSet:
    """A pixel model's training set: ``train_data`` decoded at the model's resolution, or its ``training_set.json``."""
    if train_data is not None:
        channels, size, _ = image_shape
        return build_training_set(train_data, size, channels=channels)
    return load_training_set(path)


# ----------------------------------------------------------------------------------------------------------------
# Prompts: the captions of image–caption pairs.


def distinct_prompts(pairs) -> tuple[list, list]:
    """The distinct captions of a `TrainingSet` of pairs, in order, and for each the indices of its images."""
    if pairs.captions is None:
        raise ValueError(f"The pairs of {pairs.record.get('dataset')} have no captions: the text-to-image audit needs "
                         "an image–caption list (e.g. an imagefolder with a metadata.jsonl giving each file's text).")
    owners: dict = {}
    for i, caption in enumerate(pairs.captions):
        owners.setdefault(caption, []).append(i)
    empty = owners.pop("", None) or owners.pop(" ", None)
    if empty:
        raise ValueError(f"{len(empty)} images of {pairs.record.get('dataset')} have no caption (e.g. "
                         f"{pairs.record['entries'][empty[0]]['source']}): every audited image needs one.")
    return list(owners), list(owners.values())


def prompt_subset(prompts, owners, limit, seed):
    """A seeded subset of ``limit`` prompts (all when ``limit`` is None or larger), in their order."""
    if limit is None or limit >= len(prompts):
        return prompts, owners
    keep = np.sort(np.random.default_rng([seed, 2]).choice(len(prompts), size=limit, replace=False))
    return [prompts[k] for k in keep], [owners[k] for k in keep]


def audit_sets(path: str, train_data: str | None, resolution: int, num_heldout: int | None, seed: int):
    """The audited pairs, the whole training set and the held-out pairs (or None, with a note) of a text-to-image model
    folder: the memorized part of a memorization mix, a captioned ``training_set.json``, or the pairs of
    ``train_data``; as many held-out pairs as prompts (at most ``num_heldout``)."""
    from ..captioned_data import is_memorization_mix, load_memorization_mix

    if train_data is not None:
        pairs = training = build_training_set(train_data, resolution, channels=3)
    elif is_memorization_mix(path):
        training = load_memorization_mix(path)
        pairs = training.parts["memorized"]
    else:
        pairs = training = load_training_set(path)
    # As many held-out pairs as prompts (only those are decoded).
    num_prompts = len(distinct_prompts(pairs)[0])
    num_heldout = num_prompts if num_heldout is None else min(num_heldout, num_prompts)
    held, note = heldout_or_note(pairs, num_heldout, seed)
    if held is not None and "extra" in getattr(training, "parts", {}):
        # Pairs of the extra part were trained on: never held out.
        extra = {(e["source"], e["sha256"]) for e in training.parts["extra"].record["entries"]}
        keep = [i for i, e in enumerate(held.record["entries"]) if (e["source"], e["sha256"]) not in extra]
        if len(keep) < len(held):
            record = {**held.record, "entries": [held.record["entries"][i] for i in keep], "num_images": len(keep)}
            held = TrainingSet(held.images[keep], None, held.repeats[keep], record, [held.captions[i] for i in keep])
    if held is not None and not len(held):
        held, note = None, "every held-out candidate is in the training set"
    return pairs, training, held, note


__all__ = ["audit_sets", "distinct_prompts", "heldout_entry", "heldout_or_note", "heldout_sets", "prompt_subset",
           "training_set_of"]
