"""Real CIFAR-10 from ../shared/data through the imagefolder loader (skipped where that archive is absent).

The archive holds ``cifar10/train/<class>/NNNN.jpg`` (5,000 per class) and ``cifar10/test/<class>/NNNN.jpg``
(1,000 per class), the same file names in both splits. A few of each are unpacked, in that layout.
"""

import os
import tarfile

import pytest
import torch

from conftest import SHARED_DATA
from diffusers_memdistill.data import build_training_set, load_heldout_set, load_training_set

CIFAR = SHARED_DATA / "cifar10-jpeg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = {"train": 12, "test": 4}
pytestmark = pytest.mark.skipif(not CIFAR.is_file(), reason="../shared/data/cifar10-jpeg.tar.gz is absent")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """The first 12 train and 4 test images of each class, unpacked as cifar10/{train,test}/<class>/."""
    root = tmp_path_factory.mktemp("cifar")
    counts = {}
    with tarfile.open(CIFAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and counts.get(tuple(parts[1:3]), 0) < PER_CLASS[parts[1]]:
                counts[tuple(parts[1:3])] = counts.get(tuple(parts[1:3]), 0) + 1
                tar.extract(member, root, filter="data")
    assert len(counts) == 20
    return root / "cifar10"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets_cache")


def test_cifar_root_trains_on_the_train_split_only(cifar_root, cache):
    ts = build_training_set(f"{cifar_root}{os.sep}", resolution=32, cache_dir=cache)  # as `--dataset cifar10/`
    # The old reader took train/ and test/ for the classes and trained on all 160 images, test images included.
    assert len(ts) == 120 and ts.record["split"] == "train" and ts.record["class_names"] == CLASSES
    sources = [e["source"] for e in ts.record["entries"]]
    assert all(s.split(os.sep)[0] == "train" for s in sources)
    assert [CLASSES[label] for label in ts.labels.tolist()] == [s.split(os.sep)[1] for s in sources]
    assert torch.bincount(ts.labels, minlength=10).tolist() == [12] * 10

    held = load_heldout_set(ts, cache_dir=cache)
    assert len(held) == 40 and held.record["heldout_from"]["split"] == "test"
    assert all(e["source"].split(os.sep)[0] == "test" for e in held.record["entries"])
    assert held.record["class_names"] == CLASSES and torch.bincount(held.labels).tolist() == [4] * 10
    # Same file names, different images: train/airplane/0000.jpg is not test/airplane/0000.jpg.
    first = {e["source"]: k for k, e in enumerate(held.record["entries"])}[os.path.join("test", "airplane", "0000.jpg")]
    assert not torch.equal(held.images[first], ts.images[0]) and sources[0] == os.path.join("train", "airplane",
                                                                                             "0000.jpg")


def test_class_balanced_cifar_subset_and_its_record(cifar_root, cache, tmp_path):
    ts = build_training_set(str(cifar_root), resolution=32, num_train_images=50, seed=0, cache_dir=cache)
    assert ts.images.shape == (50, 3, 32, 32) and ts.images.dtype == torch.uint8
    assert torch.bincount(ts.labels, minlength=10).tolist() == [5] * 10
    assert ts.images.float().std() > 30  # real photographs, not blank decodes
    ts.save(tmp_path)
    again = load_training_set(str(tmp_path))
    assert torch.equal(again.images, ts.images) and again.record["root"] == str(cifar_root)
    held = load_heldout_set(ts, num_images=20, seed=0, cache_dir=cache)
    assert len(held) == 20 and held.images.float().std() > 30 and held.images.shape[1:] == ts.images.shape[1:]
    local = build_training_set(str(cifar_root), 32, repeat_classes=[0, 1], repeat_images_per_class=5,
                               repeat_times=5, num_other_images=16, cache_dir=cache)
    assert local.record["num_examples"] == 2 * 5 * 5 + 16
    assert all(e["source"].split(os.sep)[0] == "train" for e in local.record["entries"])
