import json
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_memdistill.data import (
    build_training_set,
    images_sha256,
    images_to_model_range,
    index_dataset,
    load_heldout_set,
    load_training_set,
    select_training_items,
)


def test_digits_are_the_real_sklearn_digits_upsampled():
    from sklearn.datasets import load_digits

    ts = build_training_set("digits", resolution=8)
    assert len(ts) == 1797 and ts.images.shape == (1797, 1, 8, 8) and ts.images.dtype == torch.uint8
    expected = np.round(load_digits().images / 16 * 255).astype(np.uint8)
    assert np.array_equal(ts.images[:, 0].numpy(), expected)
    up = build_training_set("digits", resolution=16, num_train_images=20)
    assert up.images.shape == (20, 1, 16, 16)
    x = images_to_model_range(up.images)
    assert x.min() >= -1 and x.max() <= 1
    assert ts.captions is None and ts.record["role"] == "train"


def test_class_balanced_seeded_subsets():
    index = index_dataset("digits")
    a, repeats = select_training_items(index, num_train_images=95, seed=3)
    b, _ = select_training_items(index, num_train_images=95, seed=3)
    c, _ = select_training_items(index, num_train_images=95, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and len(set(a)) == 95 and (repeats == 1).all()
    counts = np.bincount(np.asarray(index.labels)[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="larger than the dataset"):
        select_training_items(index, num_train_images=5000)
    with pytest.raises(ValueError, match="positive"):
        select_training_items(index, num_train_images=0)


def test_localized_memorization_construction():
    ts = build_training_set("digits", 8, repeat_classes=[0, 1], repeat_images_per_class=20, repeat_times=5,
                            num_other_images=80)
    labels, repeats = ts.labels.numpy(), ts.repeats.numpy()
    assert len(ts) == 120 and ts.record["num_examples"] == 20 * 2 * 5 + 80
    assert set(labels[repeats == 5]) == {0, 1} and (np.bincount(labels[repeats == 5]) == 20).all()
    assert set(labels[repeats == 1]) == set(range(2, 10)) and (repeats[repeats == 1].sum() == 80)
    assert np.bincount(ts.expanded_indices().numpy(), minlength=len(ts)).tolist() == repeats.tolist()
    assert ts.groups().tolist() == (repeats > 1).astype(int).tolist()
    with pytest.raises(ValueError, match="not in the dataset"):
        build_training_set("digits", 8, repeat_classes=[12])


def _write_images(folder, count, seed, size=(10, 14)):
    """``count`` random RGB PNGs named 0.png, 1.png, ... in ``folder``; returns their uint8 arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for i in range(count):
        array = rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"{i}.png")
        arrays.append(array)
    return arrays


def _write_imagefolder(root, splits=(("train", 4), ("test", 2)), classes=("cat", "dog")):
    """``root/<split>/<class>/<i>.png`` (or ``root/<class>/<i>.png`` for split None)."""
    for s, (split, count) in enumerate(splits):
        for c, name in enumerate(classes):
            _write_images(root / split / name if split else root / name, count, seed=10 * s + c)
    return root


def test_train_and_test_folders_are_splits_not_classes(tmp_path):
    root = _write_imagefolder(tmp_path / "data", splits=(("train", 4), ("test", 2)))
    cache = tmp_path / "cache"
    ts = build_training_set(str(root), 8, cache_dir=cache)
    # The old reader took train/ and test/ for two classes and trained on all 12 images.
    assert len(ts) == 8 and ts.record["class_names"] == ["cat", "dog"] and ts.record["split"] == "train"
    sources = [e["source"] for e in ts.record["entries"]]
    assert all(s.startswith("train" + os.sep) for s in sources)
    assert sorted(ts.labels.tolist()) == [0] * 4 + [1] * 4
    assert all(ts.labels[k] == int(s.split(os.sep)[1] == "dog") for k, s in enumerate(sources))
    test = build_training_set(str(root), 8, split="test", cache_dir=cache)
    assert len(test) == 4 and all(e["source"].startswith("test" + os.sep) for e in test.record["entries"])
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits are \['test', 'train'\]"):
        build_training_set(str(root), 8, split="validation", cache_dir=cache)
    with pytest.raises(ValueError, match="larger than the dataset .8 images"):
        build_training_set(str(root), 8, num_train_images=9, cache_dir=cache)


def test_only_the_chosen_images_are_decoded_and_the_listing_is_cached(tmp_path, monkeypatch):
    root = _write_imagefolder(tmp_path / "data", splits=(("train", 20), ("test", 5)))
    cache = tmp_path / "cache"
    decoded, loads = [], []
    decode, load_dataset = datasets.Image.decode_example, datasets.load_dataset

    def counting_decode(self, value, *args, **kwargs):
        decoded.append(value["path"])
        return decode(self, value, *args, **kwargs)

    def counting_load(*args, **kwargs):
        loads.append(args)
        return load_dataset(*args, **kwargs)

    monkeypatch.setattr(datasets.Image, "decode_example", counting_decode)
    monkeypatch.setattr(datasets, "load_dataset", counting_load)
    first = build_training_set(str(root), 8, num_train_images=4, seed=1, cache_dir=cache)
    chosen = sorted(os.path.join(root, e["source"]) for e in first.record["entries"])
    assert sorted(decoded) == chosen and len(loads) == 1  # 4 of 40 train images decoded, test images untouched
    decoded.clear()
    second = build_training_set(str(root), 8, num_train_images=4, seed=1, cache_dir=cache)
    assert len(loads) == 1 and sorted(decoded) == chosen  # the folder was not listed again
    assert torch.equal(second.images, first.images) and second.record == first.record
    _write_images(root / "train" / "cat", 21, seed=5)  # one more image (20.png): a new listing
    assert len(build_training_set(str(root), 8, cache_dir=cache)) == 41 and len(loads) == 2


def test_captions_from_metadata_jsonl(tmp_path):
    root = tmp_path / "captioned"
    _write_images(root / "train", 3, seed=0)
    _write_images(root / "test", 2, seed=1)
    for split, count in (("train", 3), ("test", 2)):
        with open(root / split / "metadata.jsonl", "w") as f:
            for i in range(count):
                f.write(json.dumps({"file_name": f"{i}.png", "text": f"a {split} photo number {i}"}) + "\n")
    ts = build_training_set(str(root), 8, cache_dir=tmp_path / "cache")
    assert ts.captions == [f"a train photo number {i}" for i in range(3)] and ts.labels is None
    assert [e["caption"] for e in ts.record["entries"]] == ts.captions
    ts.save(tmp_path / "model")
    assert load_training_set(str(tmp_path / "model")).captions == ts.captions
    heldout = load_heldout_set(ts, cache_dir=tmp_path / "cache")
    assert heldout.captions == ["a test photo number 0", "a test photo number 1"]


def test_record_is_checked_file_by_file(tmp_path):
    root = _write_imagefolder(tmp_path / "data", splits=((None, 3),))
    ts = build_training_set(str(root), resolution=8, num_train_images=4, seed=1, cache_dir=tmp_path / "cache")
    assert ts.images.shape == (4, 3, 8, 8) and ts.record["class_names"] == ["cat", "dog"]
    assert sorted(ts.labels.tolist()) == [0, 0, 1, 1] and ts.record["root"] == str(root)
    for entry in ts.record["entries"]:
        with open(root / entry["source"], "rb") as f:
            assert entry["sha256"] == __import__("hashlib").sha256(f.read()).hexdigest()
    ts.save(tmp_path / "model")
    again = load_training_set(str(tmp_path / "model"))
    assert torch.equal(again.images, ts.images) and torch.equal(again.labels, ts.labels)
    (tmp_path / "link").symlink_to(root)  # datasets lists a symlinked root's files under its target
    linked = build_training_set(str(tmp_path / "link"), 8, num_train_images=4, seed=1, cache_dir=tmp_path / "cache")
    assert [e["source"] for e in linked.record["entries"]] == [e["source"] for e in ts.record["entries"]]
    assert torch.equal(linked.images, ts.images) and linked.record["root"] == str(tmp_path / "link")

    # A changed file is named; the whole-set check alone would only say that something differs.
    source = ts.record["entries"][0]["source"]
    original = (root / source).read_bytes()
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(root / source)
    with pytest.raises(ValueError, match=f"{source}.*sha256 differs"):
        load_training_set(str(tmp_path / "model"))
    (root / source).unlink()
    with pytest.raises(FileNotFoundError, match=f"Training image {source} is missing"):
        load_training_set(str(tmp_path / "model"))
    (root / source).write_bytes(original)
    with pytest.raises(FileNotFoundError, match="No training-set record"):
        load_training_set(str(tmp_path))

    # An entry that climbs out of the root, and a file that is a symlink out of it, are refused.
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(original)
    record = json.loads((tmp_path / "model" / "training_set.json").read_text())
    record["entries"][0]["source"] = os.path.join("..", "elsewhere.png")
    (tmp_path / "climb").mkdir()
    (tmp_path / "climb" / "training_set.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"elsewhere.png resolves to .* outside the dataset root"):
        load_training_set(str(tmp_path / "climb"))
    (root / source).unlink()
    (root / source).symlink_to(outside)
    with pytest.raises(ValueError, match=f"{source} resolves to .*elsewhere.png, outside the dataset root"):
        load_training_set(str(tmp_path / "model"))
    with pytest.raises(ValueError, match="outside the dataset root"):
        build_training_set(str(root), 8, cache_dir=tmp_path / "cache")


def test_records_of_format_1_still_load(tmp_path):
    """Records written before per-file hashes: no root, no per-entry sha256; the whole-set sha256 is checked."""
    root = _write_imagefolder(tmp_path / "data", splits=((None, 3),))
    ts = build_training_set(str(root), 8, num_train_images=4, seed=1, cache_dir=tmp_path / "cache")
    record = {k: v for k, v in ts.record.items() if k not in ("root", "role")}
    record["format"] = 1
    record["entries"] = [{k: e[k] for k in ("index", "source", "label", "repeats")} for e in record["entries"]]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "training_set.json").write_text(json.dumps(record))
    old = load_training_set(str(tmp_path / "old"))
    assert torch.equal(old.images, ts.images) and torch.equal(old.labels, ts.labels) and old.captions is None
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(root / record["entries"][0]["source"])
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_training_set(str(tmp_path / "old"))
    digits = build_training_set("digits", 8, num_train_images=10).record
    digits["format"] = 1
    digits["entries"] = [{k: e[k] for k in ("index", "source", "label", "repeats")} for e in digits["entries"]]
    (tmp_path / "old_digits.json").write_text(json.dumps(digits))
    assert images_sha256(load_training_set(str(tmp_path / "old_digits.json")).images) == digits["sha256"]


def _hf_dataset(values, labels):
    images = [Image.fromarray(np.full((6, 6, 3), v, np.uint8)) for v in values]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_flat_folder_and_saved_datasets(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(flat / f"{i}.png")
    ts = build_training_set(str(flat), 8, channels=1, cache_dir=tmp_path / "cache")
    assert ts.labels is None and ts.images[:, 0, 0, 0].tolist() == [0, 40, 80]

    _hf_dataset([0, 10, 20, 30], [0, 1, 0, 1]).save_to_disk(str(tmp_path / "hf"))
    ts = build_training_set(str(tmp_path / "hf"), 6)
    assert ts.record["class_names"] == ["a", "b"] and ts.images[:, 0, 0, 0].tolist() == [0, 10, 20, 30]
    assert ts.record["root"] is None and all(len(e["sha256"]) == 64 for e in ts.record["entries"])
    ts.save(tmp_path / "model")
    assert torch.equal(load_training_set(str(tmp_path / "model")).images, ts.images)
    held = load_heldout_set(build_training_set(str(tmp_path / "hf"), 6, num_train_images=2, seed=0))
    assert held.record["heldout_from"]["split"] == "train" and len(held) == 2

    both = datasets.DatasetDict({"train": _hf_dataset([0, 10, 20, 30], [0, 1, 0, 1]),
                                 "test": _hf_dataset([200, 210], [1, 0])})
    both.save_to_disk(str(tmp_path / "hfdict"))
    ts = build_training_set(str(tmp_path / "hfdict"), 6, num_train_images=2)
    assert sorted(ts.labels.tolist()) == [0, 1] and set(ts.images[:, 0, 0, 0].tolist()) <= {0, 10, 20, 30}
    held = load_heldout_set(ts)
    assert held.record["heldout_from"]["split"] == "test" and sorted(held.images[:, 0, 0, 0].tolist()) == [200, 210]
    with pytest.raises(ValueError, match=r"no split 'val'; its splits are \['test', 'train'\]"):
        build_training_set(str(tmp_path / "hfdict"), 6, split="val")


def test_hub_names_go_through_load_dataset(monkeypatch, tmp_path):
    """No network here: the Hub is replaced by what datasets.load_dataset returns for a name (CIFAR-10's columns)."""
    calls = []
    hub = datasets.DatasetDict({"train": _hf_dataset([0, 10, 20, 30], [0, 1, 0, 1]).rename_column("image", "img"),
                                "test": _hf_dataset([200, 210, 220], [1, 0, 1]).rename_column("image", "img")})

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ts = build_training_set("someone/tiny-set", 6, num_train_images=2, cache_dir=str(tmp_path))
    assert calls[0] == ("someone/tiny-set", {"cache_dir": str(tmp_path)}) and ts.record["dataset"] == "someone/tiny-set"
    assert sorted(ts.labels.tolist()) == [0, 1]
    held = load_heldout_set(ts, num_images=2, seed=0)
    assert held.record["heldout_from"]["split"] == "test" and set(held.images[:, 0, 0, 0].tolist()) <= {200, 210, 220}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_training_set(str(tmp_path / "missing" / "folder"), 8)


def test_heldout_digits_are_the_digits_not_trained_on():
    ts = build_training_set("digits", 8, num_train_images=32, seed=0)
    held = load_heldout_set(ts)
    assert len(held) == 1797 - 32 and held.record["role"] == "heldout"
    assert held.record["heldout_from"]["split"] == "train" and held.record["heldout_from"]["num_available"] == 1765
    trained = {e["index"] for e in ts.record["entries"]}
    assert trained.isdisjoint(e["index"] for e in held.record["entries"])
    assert held.images.shape[1:] == ts.images.shape[1:] and held.repeats.eq(1).all()
    a, b, c = (load_heldout_set(ts, num_images=50, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.images, b.images) and a.record == b.record and not torch.equal(a.images, c.images)
    assert {e["index"] for e in a.record["entries"]} <= {e["index"] for e in held.record["entries"]}
    big = build_training_set("digits", 16, num_train_images=10, seed=1)
    assert load_heldout_set(big, num_images=3).images.shape == (3, 1, 16, 16)
    with pytest.raises(ValueError, match="Asked for 1766 held-out images but .* has 1765"):
        load_heldout_set(ts, num_images=1766)
    with pytest.raises(ValueError, match="no held-out image: it has no 'test' split and every item"):
        load_heldout_set(build_training_set("digits", 8))


def test_heldout_prefers_the_test_split_and_never_returns_training_files(tmp_path):
    root = _write_imagefolder(tmp_path / "data", splits=(("train", 6), ("test", 3)))
    cache = tmp_path / "cache"
    ts = build_training_set(str(root), 8, num_train_images=4, cache_dir=cache)
    held = load_heldout_set(ts, cache_dir=cache)
    assert held.record["heldout_from"]["split"] == "test" and len(held) == 6
    assert all(e["source"].startswith("test" + os.sep) for e in held.record["entries"])
    assert held.record["class_names"] == ["cat", "dog"] and sorted(held.labels.tolist()) == [0] * 3 + [1] * 3
    # Decoded exactly as the training set would decode the test split.
    assert torch.equal(held.images, build_training_set(str(root), 8, split="test", cache_dir=cache).images)
    subset = load_heldout_set(ts, num_images=2, seed=3, cache_dir=cache)
    assert len(subset) == 2 and torch.equal(subset.images, load_heldout_set(ts, 2, 3, cache_dir=cache).images)
    # Without a test split: the training split's other files.
    flat = _write_imagefolder(tmp_path / "flat", splits=((None, 5),))
    small = build_training_set(str(flat), 8, num_train_images=4, cache_dir=cache)
    rest = load_heldout_set(small, cache_dir=cache)
    assert len(rest) == 6 and rest.record["heldout_from"]["split"] == "train"
    assert {e["source"] for e in small.record["entries"]}.isdisjoint(e["source"] for e in rest.record["entries"])
    # Saved and reloaded like a training set.
    rest.save(tmp_path / "heldout")
    assert torch.equal(load_training_set(str(tmp_path / "heldout")).images, rest.images)


def test_bad_data_gives_clear_errors(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_training_set(str(tmp_path / "missing"), 8, cache_dir=cache)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="contains no images"):
        build_training_set(str(tmp_path / "empty"), 8, cache_dir=cache)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="Cannot read image .*broken.png"):
        build_training_set(str(bad), 8, cache_dir=cache)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        build_training_set("digits", 8, channels=2)
    datasets.Dataset.from_dict({"text": ["no", "images"]}).save_to_disk(str(tmp_path / "text_only"))
    with pytest.raises(ValueError, match="has no column of images"):
        build_training_set(str(tmp_path / "text_only"), 8)
    with pytest.raises(ValueError, match=r"digits has no split 'test'; its splits are \['train'\]"):
        build_training_set("digits", 8, split="test")


def test_labels_and_captions_from_metadata_columns(tmp_path):
    """A metadata.jsonl with a string label column and a caption column (datasets then infers no folder labels)."""
    root = tmp_path / "meta"
    _write_images(root, 4, seed=0)
    with open(root / "metadata.jsonl", "w") as f:
        for i, kind in enumerate(["zebra", "ant", "zebra", "ant"]):
            f.write(json.dumps({"file_name": f"{i}.png", "label": kind, "caption": f"{kind} {i}"}) + "\n")
    ts = build_training_set(str(root), 8, num_train_images=2, seed=0, cache_dir=tmp_path / "cache")
    assert ts.record["class_names"] == ["ant", "zebra"] and sorted(ts.labels.tolist()) == [0, 1]
    assert all(c == f"{['ant', 'zebra'][label]} {e['index']}" for c, label, e in
               zip(ts.captions, ts.labels.tolist(), ts.record["entries"]))
