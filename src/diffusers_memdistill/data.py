"""Training data for memorization studies: loading, seeded subsets, the localized-memorization construction,
and the record of the exact training set that evaluation reads back.

A dataset is one of
- ``"digits"``: scikit-learn's 1,797 real 8x8 handwritten digits (grayscale, 10 classes), upsampled;
- a directory: an imagefolder (``root/<class>/<image>`` gives labels; images directly in ``root`` give none), or a
  folder written by ``datasets.Dataset.save_to_disk``;
- any other string: a Hugging Face ``datasets`` name, loaded with ``datasets.load_dataset(name, split=split)``.

No augmentation is ever applied (memorization studies forbid it, 000 §4.1). Images are kept in memory as uint8.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RECORD_NAME = "training_set.json"


@dataclass
class DatasetIndex:
    """What a dataset holds before any image is decoded: one source string and label per item."""

    name: str
    sources: list
    labels: list | None
    class_names: list | None
    load_item: object = field(repr=False)  # i -> PIL image
    relative_to: str | None = None

    def __len__(self):
        return len(self.sources)


@dataclass
class TrainingSet:
    """The exact training set: distinct images, their labels and how many times each is repeated."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor | None  # long (N,)
    repeats: torch.Tensor  # long (N,)
    record: dict

    def __len__(self):
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.record["class_names"] or []) if self.labels is not None else 0

    def expanded_indices(self) -> torch.Tensor:
        """Index of each training example once repeats are applied (what the trainer iterates over)."""
        return torch.repeat_interleave(torch.arange(len(self)), self.repeats)

    def groups(self) -> torch.Tensor:
        """Per image: 1 if repeated (the localized-memorization group), else 0."""
        return (self.repeats > 1).long()

    def save(self, directory: str) -> str:
        """Write the record (``training_set.json``) into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, RECORD_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.record, f, indent=1)
        os.replace(tmp, path)
        return path


def images_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def _digits_index() -> DatasetIndex:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    return DatasetIndex(
        name="digits",
        sources=[f"digits:{i}" for i in range(len(pixels))],
        labels=[int(t) for t in digits.target],
        class_names=[str(c) for c in digits.target_names],
        load_item=lambda i: Image.fromarray(pixels[i], mode="L"),
    )


def _folder_index(root: str) -> DatasetIndex:
    entries = sorted(os.listdir(root))
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    files, labels = [], []
    if class_dirs:
        for label, name in enumerate(class_dirs):
            for dirpath, _, filenames in sorted(os.walk(os.path.join(root, name))):
                for fn in sorted(filenames):
                    if fn.lower().endswith(IMAGE_EXTENSIONS):
                        files.append(os.path.relpath(os.path.join(dirpath, fn), root))
                        labels.append(label)
        class_names = class_dirs
    else:
        files = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)]
        labels, class_names = None, None
    if not files:
        raise ValueError(f"Dataset directory {root} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")

    def load(i):
        path = os.path.join(root, files[i])
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except Exception as exc:  # PIL raises several types for broken files
            raise ValueError(f"Cannot read image {path}: {exc}") from exc

    return DatasetIndex(os.path.abspath(root), files, labels, class_names, load, relative_to=os.path.abspath(root))


def _hf_index(dataset, name: str) -> DatasetIndex:
    features = dataset.features
    image_column = next((c for c in ("image", "img", "pixel_values") if c in features), None)
    if image_column is None:
        raise ValueError(f"Dataset {name} has no image column (looked for image, img, pixel_values): {list(features)}.")
    label_column = next((c for c in ("label", "labels", "fine_label", "class") if c in features), None)
    labels = [int(v) for v in dataset[label_column]] if label_column else None
    names = getattr(features[label_column], "names", None) if label_column else None
    if labels is not None and names is None:
        names = [str(v) for v in range(max(labels) + 1)]
    return DatasetIndex(
        name=name,
        sources=[f"{name}:{i}" for i in range(len(dataset))],
        labels=labels,
        class_names=names,
        load_item=lambda i: dataset[int(i)][image_column],
    )


def index_dataset(dataset: str, split: str = "train") -> DatasetIndex:
    """List a dataset's items and labels without decoding images."""
    if dataset == "digits":
        return _digits_index()
    if os.path.isdir(dataset):
        if os.path.isfile(os.path.join(dataset, "dataset_info.json")) or os.path.isfile(
            os.path.join(dataset, "state.json")
        ):
            import datasets

            loaded = datasets.load_from_disk(dataset)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"Dataset {dataset} has no split {split!r}; it has {list(loaded)}.")
                loaded = loaded[split]
            return _hf_index(loaded, os.path.abspath(dataset))
        return _folder_index(dataset)
    if os.path.sep in dataset or dataset.startswith("."):
        raise FileNotFoundError(f"Dataset directory {dataset} does not exist.")
    import datasets

    return _hf_index(datasets.load_dataset(dataset, split=split), dataset)


def _to_tensor(image: Image.Image, resolution: int, channels: int) -> torch.Tensor:
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    if w != h:  # centre crop to a square, never a random crop
        s = min(w, h)
        image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], channels).permute(2, 0, 1)
    if tensor.shape[-1] != resolution:
        upscale = resolution > tensor.shape[-1]
        resized = F.interpolate(
            tensor[None].float(), size=(resolution, resolution), mode="bilinear", align_corners=False,
            antialias=not upscale,
        )[0]
        tensor = resized.round().clamp(0, 255).to(torch.uint8)
    return tensor


def _balanced_choice(labels: np.ndarray, count: int, rng: np.random.Generator, classes=None) -> np.ndarray:
    """Seeded class-balanced choice of ``count`` items among ``classes`` (all by default)."""
    classes = np.unique(labels) if classes is None else np.asarray(classes)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    quota = {c: count // len(classes) for c in classes}
    for c in rng.permutation(classes)[: count % len(classes)]:
        quota[c] += 1
    short = [int(c) for c in classes if quota[c] > len(pools[c])]
    if short:
        raise ValueError(
            f"Cannot take a class-balanced subset of {count} images: classes {short} have too few images."
        )
    return np.sort(np.concatenate([pools[c][: quota[c]] for c in classes]))


def select_training_items(
    index: DatasetIndex,
    num_train_images: int | None = None,
    seed: int = 0,
    repeat_classes: list | None = None,
    repeat_images_per_class: int = 50,
    repeat_times: int = 5,
    num_other_images: int = 1000,
):
    """Choose the training items and their repeat counts.

    Either a class-balanced (or, without labels, uniform) seeded subset of ``num_train_images`` (all items when
    None), or the localized-memorization construction of 000 §4.3: ``repeat_images_per_class`` images of each
    class in ``repeat_classes`` repeated ``repeat_times`` times, plus ``num_other_images`` non-repeated images of the
    other classes (class-balanced).

    Returns: ``(indices, repeats)``, numpy int arrays.
    """
    n = len(index)
    rng = np.random.default_rng(seed)
    labels = None if index.labels is None else np.asarray(index.labels)
    if repeat_classes:
        if labels is None:
            raise ValueError("The localized-memorization construction needs class labels; the dataset has none.")
        known = set(np.unique(labels).tolist())
        unknown = [c for c in repeat_classes if c not in known]
        if unknown:
            raise ValueError(f"Repeated classes {unknown} are not in the dataset (classes: {sorted(known)}).")
        others = [c for c in sorted(known) if c not in set(repeat_classes)]
        repeated = _balanced_choice(labels, repeat_images_per_class * len(repeat_classes), rng, repeat_classes)
        other = _balanced_choice(labels, num_other_images, rng, others) if num_other_images else np.array([], int)
        indices = np.concatenate([repeated, other])
        repeats = np.concatenate([np.full(len(repeated), repeat_times), np.ones(len(other), int)])
        order = np.argsort(indices, kind="stable")
        return indices[order], repeats[order]
    if num_train_images is None:
        return np.arange(n), np.ones(n, int)
    if num_train_images <= 0:
        raise ValueError(f"--num_train_images must be positive, got {num_train_images}.")
    if num_train_images > n:
        raise ValueError(f"--num_train_images={num_train_images} is larger than the dataset ({n} images).")
    if labels is None:
        indices = np.sort(rng.choice(n, size=num_train_images, replace=False))
    else:
        indices = _balanced_choice(labels, num_train_images, rng)
    return indices, np.ones(len(indices), int)


def _decode(index: DatasetIndex, indices, resolution: int, channels: int) -> torch.Tensor:
    from tqdm.auto import tqdm

    items = [
        _to_tensor(index.load_item(int(i)), resolution, channels)
        for i in tqdm(indices, desc="Loading images", disable=len(indices) < 2000)
    ]
    return torch.stack(items) if items else torch.empty(0, channels, resolution, resolution, dtype=torch.uint8)


def images_sha256(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def build_training_set(
    dataset: str,
    resolution: int,
    split: str = "train",
    channels: int | None = None,
    num_train_images: int | None = None,
    seed: int = 0,
    repeat_classes: list | None = None,
    repeat_images_per_class: int = 50,
    repeat_times: int = 5,
    num_other_images: int = 1000,
) -> TrainingSet:
    """Load, subsample and decode a training set, and make its record.

    Args:
        dataset (`str`): ``"digits"``, a directory, or a Hugging Face dataset name (see the module docstring).
        resolution (`int`): side of the square images.
        channels (`int`, *optional*): 1 or 3; defaults to 1 for digits and 3 otherwise.
        num_train_images, seed, repeat_*, num_other_images: see `select_training_items`.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}.")
    index = index_dataset(dataset, split)
    channels = channels or (1 if index.name == "digits" else 3)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    indices, repeats = select_training_items(
        index, num_train_images, seed, repeat_classes, repeat_images_per_class, repeat_times, num_other_images
    )
    images = _decode(index, indices, resolution, channels)
    labels = None if index.labels is None else torch.tensor([index.labels[i] for i in indices], dtype=torch.long)
    record = {
        "format": 1,
        "dataset": index.name,
        "split": split,
        "resolution": resolution,
        "channels": channels,
        "seed": seed,
        "num_train_images": num_train_images,
        "localized": None
        if not repeat_classes
        else {
            "repeat_classes": list(repeat_classes),
            "repeat_images_per_class": repeat_images_per_class,
            "repeat_times": repeat_times,
            "num_other_images": num_other_images,
        },
        "class_names": index.class_names,
        "num_images": int(len(indices)),
        "num_examples": int(repeats.sum()),
        "sha256": images_sha256(images),
        "entries": [
            {
                "index": int(i),
                "source": index.sources[i],
                "label": None if labels is None else int(labels[k]),
                "repeats": int(repeats[k]),
            }
            for k, i in enumerate(indices)
        ],
    }
    return TrainingSet(images, labels, torch.as_tensor(repeats, dtype=torch.long), record)


def load_training_set(path: str, dataset: str | None = None) -> TrainingSet:
    """Rebuild the exact training set from a record (a ``training_set.json`` file or the folder holding it).

    Args:
        path (`str`): the record or its folder (a saved model folder).
        dataset (`str`, *optional*): where the data lives now, if it moved since training.

    Raises:
        FileNotFoundError: no record. ValueError: the rebuilt images differ from those trained on.
    """
    record_path = os.path.join(path, RECORD_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(record_path):
        raise FileNotFoundError(
            f"No training-set record at {record_path}: the model was not trained by this package's scripts. "
            "Pass the training data explicitly (e.g. --train_data)."
        )
    with open(record_path, encoding="utf-8") as f:
        record = json.load(f)
    index = index_dataset(dataset or record["dataset"], record["split"])
    indices = [e["index"] for e in record["entries"]]
    if indices and max(indices) >= len(index):
        raise ValueError(f"The record at {record_path} indexes item {max(indices)} but {index.name} has {len(index)}.")
    mismatched = [e["source"] for e in record["entries"] if index.sources[e["index"]] != e["source"]]
    if mismatched:
        raise ValueError(f"{index.name} no longer matches the record at {record_path}: e.g. {mismatched[:3]}.")
    images = _decode(index, indices, record["resolution"], record["channels"])
    if images_sha256(images) != record["sha256"]:
        raise ValueError(f"The images of {index.name} differ from those recorded at {record_path} (sha256 mismatch).")
    labels = None
    if record["entries"] and record["entries"][0]["label"] is not None:
        labels = torch.tensor([e["label"] for e in record["entries"]], dtype=torch.long)
    repeats = torch.tensor([e["repeats"] for e in record["entries"]], dtype=torch.long)
    return TrainingSet(images, labels, repeats, record)
