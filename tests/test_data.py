
import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_memdistill.data import (
    build_training_set,
    images_to_model_range,
    index_dataset,
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


def _write_folder(root, classes=("cat", "dog"), per_class=3, size=10):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_record_round_trip_and_tampering(tmp_path):
    _write_folder(tmp_path / "data")
    ts = build_training_set(str(tmp_path / "data"), resolution=8, num_train_images=4, seed=1)
    assert ts.images.shape == (4, 3, 8, 8) and ts.record["class_names"] == ["cat", "dog"]
    assert sorted(ts.labels.tolist()) == [0, 0, 1, 1]
    ts.save(tmp_path / "model")
    again = load_training_set(str(tmp_path / "model"))
    assert torch.equal(again.images, ts.images) and torch.equal(again.labels, ts.labels)
    source = ts.record["entries"][0]["source"]
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(tmp_path / "data" / source)
    with pytest.raises(ValueError, match="sha256"):
        load_training_set(str(tmp_path / "model"))
    with pytest.raises(FileNotFoundError, match="No training-set record"):
        load_training_set(str(tmp_path))


def test_flat_folder_and_saved_hf_dataset(tmp_path):
    import datasets

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(flat / f"{i}.png")
    ts = build_training_set(str(flat), 8, channels=1)
    assert ts.labels is None and ts.images[:, 0, 0, 0].tolist() == [0, 40, 80]
    images = [Image.fromarray(np.full((6, 6, 3), 10 * i, np.uint8)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=["a", "b"])}))
    ds.save_to_disk(str(tmp_path / "hf"))
    ts = build_training_set(str(tmp_path / "hf"), 6)
    assert ts.record["class_names"] == ["a", "b"] and ts.images[:, 0, 0, 0].tolist() == [0, 10, 20, 30]


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_training_set(str(tmp_path / "missing"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        build_training_set(str(tmp_path / "empty"), 8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="Cannot read image .*broken.png"):
        build_training_set(str(bad), 8)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        build_training_set("digits", 8, channels=2)
