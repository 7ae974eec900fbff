"""Real CIFAR-10 from ../shared/data through the imagefolder loader (skipped where that folder is absent)."""

import tarfile

import pytest
import torch

from conftest import SHARED_DATA
from diffusers_memdistill.data import build_training_set, load_training_set

CIFAR = SHARED_DATA / "cifar10-jpeg.tar.gz"
pytestmark = pytest.mark.skipif(not CIFAR.is_file(), reason="../shared/data/cifar10-jpeg.tar.gz is absent")


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory):
    """The first 12 test images of each class, unpacked into an imagefolder."""
    root = tmp_path_factory.mktemp("cifar")
    counts = {}
    with tarfile.open(CIFAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and parts[1] == "test":
                if counts.get(parts[2], 0) < 12:
                    counts[parts[2]] = counts.get(parts[2], 0) + 1
                    tar.extract(member, root, filter="data")
            if len(counts) == 10 and all(c == 12 for c in counts.values()):
                break
    return root / "cifar10" / "test"


def test_class_balanced_cifar_subset_and_its_record(cifar_subset, tmp_path):
    ts = build_training_set(str(cifar_subset), resolution=32, num_train_images=50, seed=0)
    assert ts.images.shape == (50, 3, 32, 32) and ts.images.dtype == torch.uint8
    assert ts.record["class_names"][:2] == ["airplane", "automobile"] and len(ts.record["class_names"]) == 10
    assert torch.bincount(ts.labels, minlength=10).tolist() == [5] * 10
    assert ts.images.float().std() > 30  # real photographs, not blank decodes
    ts.save(tmp_path)
    assert torch.equal(load_training_set(str(tmp_path)).images, ts.images)
    local = build_training_set(str(cifar_subset), 32, repeat_classes=[0, 1], repeat_images_per_class=5,
                               repeat_times=5, num_other_images=16)
    assert local.record["num_examples"] == 2 * 5 * 5 + 16
