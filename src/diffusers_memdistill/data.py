"""Training data for memorization studies: loading, seeded subsets, the localized-memorization construction,
the record of the exact training set that evaluation reads back, and held-out images of the same distribution.

A dataset is one of
- ``"digits"``: scikit-learn's 1,797 real 8x8 handwritten digits (grayscale, 10 classes, one split ``"train"``),
  upsampled; the embedded default, needing no download;
- a directory: an imagefolder read by ``datasets.load_dataset("imagefolder", data_dir=...)``, so the layout means
  what it means to 🤗 datasets: ``root/train/...`` and ``root/test/...`` are splits, ``.../<class>/<image>`` gives
  class labels, a ``metadata.jsonl`` (``file_name`` plus ``text`` or ``caption``) gives captions; or a folder
  written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, read by ``datasets.load_from_disk``;
- local webdataset shards: a ``.tar`` file, a glob of them (``shards/*.tar``) or a directory holding only ``.tar``
  files, read by ``datasets.load_dataset("webdataset", ...)`` as one ``"train"`` split (each sample's image under its
  extension, ``jpg`` or ``png``, and its caption in ``txt``, as diffusers' LCM scripts write them);
- any other string: a Hugging Face Hub dataset, read by ``datasets.load_dataset(name)``.

Only labels, captions and file paths are read to choose a subset; images are decoded afterwards, and only the
chosen ones. No augmentation is ever applied (memorization studies forbid it, 000 §4.1). Images are kept in
memory as uint8.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RECORD_NAME = "training_set.json"
RECORD_FORMAT = 2
IMAGE_COLUMNS = ("image", "img")  # preferred among several columns of images
LABEL_COLUMNS = ("label", "labels", "fine_label", "class")
CAPTION_COLUMNS = ("text", "caption", "txt")  # txt: a webdataset sample's caption file
HELDOUT_SPLIT = "test"
_METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # those datasets' imagefolder reads
_CACHE_SUBDIR = "diffusers_memdistill"


class DatasetIndex:
    """One split of a dataset before any image is decoded: its labels, captions and where each item lives.

    ``root`` is set for an imagefolder: its items are files and ``sources`` are their paths relative to ``root``.
    Otherwise a source is ``"<dataset>:<index>"``.
    """

    def __init__(self, name, split, splits, num_items, labels, class_names, captions, root=None, rows=None,
                 image_column=None, pixels=None):
        self.name = name
        self.split = split
        self.splits = list(splits)
        self.labels = labels
        self.class_names = class_names
        self.captions = captions
        self.root = root
        self._num_items = num_items
        self._rows = rows  # a datasets.Dataset whose image column is not decoded
        self._image_column = image_column
        self._pixels = pixels  # digits: uint8 (N, 8, 8)

    def __len__(self):
        return self._num_items

    @functools.cached_property
    def sources(self) -> list:
        if self.root is None:
            return [f"{self.name}:{i}" for i in range(len(self))]
        paths = _column(self._rows, self._image_column).field("path").to_pylist()
        real_root = os.path.realpath(self.root)  # datasets lists the files of a symlinked root under its target
        prefixes = {os.path.join(r, "") for r in (self.root, real_root)}
        sources = []
        for path in paths:
            prefix = next((p for p in prefixes if path.startswith(p)), None)
            sources.append(path[len(prefix):] if prefix else os.path.relpath(os.path.realpath(path), real_root))
        return sources

    def read_item(self, i: int):
        """Decode item ``i``. Returns ``(PIL image, sha256 of its encoded bytes or None)``."""
        if self._pixels is not None:
            return Image.fromarray(self._pixels[i], mode="L"), None
        value = self._rows[int(i)][self._image_column]
        path, data = value.get("path"), value.get("bytes")
        if data is None and path is not None and os.path.exists(path):
            if self.root is not None:
                path = _resolve_inside(self.root, path)
            with open(path, "rb") as f:
                data = f.read()
        image = _decode_image({"path": path, "bytes": data} if data is not None else value)
        return image, None if data is None else hashlib.sha256(data).hexdigest()


def _column(ds, name: str):
    """One column of a datasets.Dataset as a pyarrow array, without formatting it row by row."""
    import pyarrow as pa

    column = ds.with_format("arrow")[name]
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _decode_image(value: dict) -> Image.Image:
    """Decode one stored image (``{"path", "bytes"}``) as datasets' ``Image`` feature does (EXIF orientation)."""
    import datasets

    try:
        return datasets.Image().decode_example(value)
    except Exception as exc:  # PIL raises several types for broken files
        raise ValueError(f"Cannot read image {value.get('path') or '<embedded bytes>'}: {exc}") from exc


def _resolve_inside(root: str, path: str) -> str:
    """The real path of ``path`` (relative to ``root`` or absolute); refuses one that leaves ``root`` (``..``,
    an absolute path elsewhere, a symlink out of it)."""
    real_root = os.path.realpath(root)
    resolved = os.path.realpath(os.path.join(real_root, path))
    if os.path.commonpath([real_root, resolved]) != real_root:
        raise ValueError(f"Image {path} resolves to {resolved}, outside the dataset root {root}: refusing to read it.")
    return resolved


@dataclass
class TrainingSet:
    """The exact training set: distinct images, their labels and captions and how many times each is repeated."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor | None  # long (N,)
    repeats: torch.Tensor  # long (N,)
    record: dict
    captions: list | None = None  # list[str] (N,) where the dataset has a text/caption column

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


# ---------------------------------------------------------------------------------------------------------------
# Opening datasets


def _is_saved_dataset(path: str) -> bool:
    return any(
        os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "dataset_info.json", "state.json")
    )


def _looks_like_path(dataset: str) -> bool:
    """A string that can only be a local path (a Hub id is ``name`` or ``owner/name``)."""
    return (
        os.path.isabs(dataset)
        or dataset.startswith((".", "~"))
        or dataset.endswith(("/", os.path.sep))
        or dataset.count("/") > 1
        or os.path.sep != "/" and os.path.sep in dataset
    )


def _cache_root(cache_dir: str | None) -> str:
    import datasets

    return os.path.join(str(cache_dir or datasets.config.HF_DATASETS_CACHE), _CACHE_SUBDIR)


def _folder_fingerprint(root: str) -> str:
    """A cheap key of an imagefolder's listing: every directory's path, mtime and number of files, and the size and
    mtime of its metadata files. Adding, removing or renaming an image changes its directory's mtime; the contents
    of images are not part of the key because they are hashed when decoded."""
    import datasets

    digest = hashlib.sha256(f"{datasets.__version__}\0{os.path.realpath(root)}\n".encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        stat = os.stat(dirpath)
        digest.update(f"{os.path.relpath(dirpath, root)}\0{stat.st_mtime_ns}\0{len(filenames)}\n".encode())
        for name in sorted(set(filenames) & set(_METADATA_FILES)):
            stat = os.stat(os.path.join(dirpath, name))
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _load_imagefolder(root: str, cache_dir: str | None) -> dict:
    """``datasets.load_dataset("imagefolder", data_dir=root)``, remembered across runs.

    datasets re-resolves the data files of a folder on every call (for CIFAR-10's 60,000 files that is tens of
    seconds of globbing and stat calls even when its Arrow cache is warm), so the Arrow files it wrote are reused
    directly while the folder's listing (`_folder_fingerprint`) is unchanged.
    """
    import datasets

    pointer = os.path.join(_cache_root(cache_dir), f"imagefolder-{_folder_fingerprint(root)}.json")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            files = json.load(f)
        if all(os.path.isfile(p) for paths in files.values() for p in paths):
            return {
                split: datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in paths])
                for split, paths in files.items()
            }
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = tuple(ImageFolder.EXTENSIONS)
    if not any(f.lower().endswith(extensions) for _, _, files in os.walk(root) for f in files):
        raise ValueError(f"Dataset directory {root} contains no images (no file ending in an image extension).")
    loaded = datasets.load_dataset("imagefolder", data_dir=root, cache_dir=cache_dir)
    files = {split: [c["filename"] for c in ds.cache_files] for split, ds in loaded.items()}
    if all(files.values()):  # datasets kept it on disk (not in memory): remember where
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        tmp = f"{pointer}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(files, f)
        os.replace(tmp, pointer)
    return dict(loaded)


def _webdataset_shards(dataset: str) -> list | None:
    """The sorted shard files of local webdataset shards (a ``.tar`` file, a glob of them, or a directory whose files
    are all ``.tar``), or None when ``dataset`` names none of those.

    Raises:
        FileNotFoundError: a glob that matches no file.
    """
    import glob

    if any(c in dataset for c in "*?["):
        shards = sorted(glob.glob(os.path.expanduser(dataset)))
        if not shards:
            raise FileNotFoundError(f"No webdataset shard matches {dataset}.")
        return shards
    if os.path.isfile(dataset) and dataset.endswith(".tar"):
        return [dataset]
    if os.path.isdir(dataset):
        files = [f for f in sorted(os.listdir(dataset)) if not f.startswith(".")
                 and os.path.isfile(os.path.join(dataset, f))]
        if files and all(f.endswith(".tar") for f in files):
            return [os.path.join(dataset, f) for f in files]
    return None


def _open_dataset(dataset: str, cache_dir: str | None = None):
    """Returns ``(name, root, splits)``: ``splits`` maps split names to ``datasets.Dataset`` objects (None for the
    embedded digits); ``root`` is the imagefolder's directory (None for other datasets)."""
    if dataset == "digits":
        return "digits", None, {"train": None}
    import datasets

    shards = _webdataset_shards(dataset)
    if shards is not None:
        loaded = datasets.load_dataset("webdataset", data_files={"train": shards}, cache_dir=cache_dir)
        return os.path.abspath(os.path.expanduser(dataset)), None, dict(loaded)

    if os.path.isdir(dataset):
        name = os.path.abspath(dataset)
        if _is_saved_dataset(dataset):
            loaded = datasets.load_from_disk(dataset)
            if isinstance(loaded, datasets.Dataset):
                return name, None, {str(loaded.split or "train"): loaded}
            return name, None, dict(loaded)
        return name, name, _load_imagefolder(name, cache_dir)
    if _looks_like_path(dataset):
        raise FileNotFoundError(f"Dataset directory {dataset} does not exist.")
    try:
        loaded = datasets.load_dataset(dataset, cache_dir=cache_dir)
    except Exception as exc:
        raise FileNotFoundError(
            f"Dataset {dataset!r} is not a local directory and could not be loaded from the Hub: {exc}"
        ) from exc
    if isinstance(loaded, datasets.Dataset):
        return dataset, None, {str(loaded.split or "train"): loaded}
    return dataset, None, dict(loaded)


def _digits_index() -> DatasetIndex:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    return DatasetIndex(
        "digits", "train", ["train"], len(pixels), labels=[int(t) for t in digits.target],
        class_names=[str(c) for c in digits.target_names], captions=None, pixels=pixels,
    )


def _split_index(name: str, root: str | None, splits: dict, split: str) -> DatasetIndex:
    import datasets

    if split not in splits:
        raise ValueError(f"Dataset {name} has no split {split!r}; its splits are {sorted(splits)}.")
    ds = splits[split]
    if ds is None:
        return _digits_index()
    features = ds.features
    image_columns = [c for c, feature in features.items() if isinstance(feature, datasets.Image)]
    if not image_columns:
        raise ValueError(f"Dataset {name} has no column of images (datasets.Image): its columns are {features}.")
    image_column = next((c for c in IMAGE_COLUMNS if c in image_columns), image_columns[0])
    # Reading labels and captions must not decode images.
    rows = ds.cast_column(image_column, datasets.Image(decode=False))
    label_column = next((c for c in LABEL_COLUMNS if c in features), None)
    labels = class_names = None
    if label_column is not None:
        values = _column(rows, label_column).to_pylist()
        class_names = getattr(features[label_column], "names", None)
        if all(isinstance(v, str) for v in values):  # e.g. a label column of metadata.jsonl
            class_names = sorted(set(values))
            number = {c: k for k, c in enumerate(class_names)}
            labels = [number[v] for v in values]
        else:
            labels = [int(v) for v in values]
            if class_names is None:
                class_names = [str(v) for v in range(max(labels) + 1)] if labels else []
    caption_column = next((c for c in CAPTION_COLUMNS if c in features), None)
    captions = None
    if caption_column is not None:
        # A row without a caption gets the empty prompt.
        captions = ["" if c is None else str(c) for c in _column(rows, caption_column).to_pylist()]
    return DatasetIndex(name, split, splits, len(ds), labels, class_names, captions, root=root, rows=rows,
                        image_column=image_column)


def index_dataset(dataset: str, split: str = "train", cache_dir: str | None = None) -> DatasetIndex:
    """List one split of a dataset (labels, captions, sources) without decoding images.

    Args:
        dataset (`str`): ``"digits"``, a directory, or a Hugging Face dataset name (see the module docstring).
        split (`str`): the split, e.g. ``"train"``.
        cache_dir (`str`, *optional*): the datasets cache (default: ``HF_DATASETS_CACHE``).
    """
    return _split_index(*_open_dataset(dataset, cache_dir), split)


# ---------------------------------------------------------------------------------------------------------------
# Choosing and decoding


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


def _stack(items: list, resolution: int, channels: int) -> torch.Tensor:
    return torch.stack(items) if items else torch.empty(0, channels, resolution, resolution, dtype=torch.uint8)


def _decode(index: DatasetIndex, indices, resolution: int, channels: int):
    """Decode the chosen items only. Returns ``(uint8 images, per-item sha256 of the encoded bytes or None)``."""
    from tqdm.auto import tqdm

    items, hashes = [], []
    for i in tqdm(indices, desc="Loading images", disable=len(indices) < 2000):
        image, sha = index.read_item(int(i))
        items.append(_to_tensor(image, resolution, channels))
        hashes.append(sha)
    return _stack(items, resolution, channels), hashes


def images_sha256(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def _make_record(index, indices, repeats, images, hashes, resolution, channels, role="train", **fields) -> dict:
    record = {
        "format": RECORD_FORMAT,
        "role": role,
        "dataset": index.name,
        "root": index.root,  # an imagefolder's directory: every file read lies inside it
        "split": index.split,
        "resolution": resolution,
        "channels": channels,
        **fields,
        "class_names": index.class_names,
        "num_images": int(len(indices)),
        "num_examples": int(np.sum(repeats)),
        "sha256": images_sha256(images),
        "entries": [
            {
                "index": int(i),
                "source": index.sources[i],
                "sha256": hashes[k],  # of the encoded image file or bytes; None for in-memory arrays (digits)
                "label": None if index.labels is None else int(index.labels[i]),
                "caption": None if index.captions is None else index.captions[i],
                "repeats": int(repeats[k]),
            }
            for k, i in enumerate(indices)
        ],
    }
    return record


def _training_set_from_record(images: torch.Tensor, record: dict) -> TrainingSet:
    entries = record["entries"]
    labels = captions = None
    if entries and entries[0].get("label") is not None:
        labels = torch.tensor([e["label"] for e in entries], dtype=torch.long)
    if entries and entries[0].get("caption") is not None:
        captions = [e["caption"] for e in entries]
    repeats = torch.tensor([e["repeats"] for e in entries], dtype=torch.long)
    return TrainingSet(images, labels, repeats, record, captions)


def _default_channels(index: DatasetIndex, channels: int | None) -> int:
    channels = channels or (1 if index.name == "digits" else 3)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    return channels


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
    cache_dir: str | None = None,
) -> TrainingSet:
    """Load, subsample and decode a training set, and make its record.

    Labels and captions are read first and the subset is chosen from them; only the chosen images are decoded.

    Args:
        dataset (`str`): ``"digits"``, a directory, or a Hugging Face dataset name (see the module docstring).
        resolution (`int`): side of the square images.
        split (`str`, defaults to `"train"`): the split to train on (an imagefolder's ``train/`` folder, ...).
        channels (`int`, *optional*): 1 or 3; defaults to 1 for digits and 3 otherwise.
        num_train_images, seed, repeat_*, num_other_images: see `select_training_items`.
        cache_dir (`str`, *optional*): the datasets cache (default: ``HF_DATASETS_CACHE``).

    Returns:
        `TrainingSet`: its ``record`` names the dataset, split and root and, per image, its source, the sha256 of
        its file, its label, caption and repeat count.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}.")
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    index = index_dataset(dataset, split, cache_dir)
    channels = _default_channels(index, channels)
    indices, repeats = select_training_items(
        index, num_train_images, seed, repeat_classes, repeat_images_per_class, repeat_times, num_other_images
    )
    images, hashes = _decode(index, indices, resolution, channels)
    localized = None
    if repeat_classes:
        localized = {
            "repeat_classes": list(repeat_classes),
            "repeat_images_per_class": repeat_images_per_class,
            "repeat_times": repeat_times,
            "num_other_images": num_other_images,
        }
    record = _make_record(index, indices, repeats, images, hashes, resolution, channels, seed=seed,
                          num_train_images=num_train_images, localized=localized)
    return _training_set_from_record(images, record)


def _read_record(path: str) -> tuple[dict, str]:
    record_path = os.path.join(path, RECORD_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(record_path):
        raise FileNotFoundError(
            f"No training-set record at {record_path}: the model was not trained by this package's scripts. "
            "Pass the training data explicitly (e.g. --train_data)."
        )
    with open(record_path, encoding="utf-8") as f:
        return json.load(f), record_path


def _record_root(record: dict, dataset: str | None) -> str | None:
    """The imagefolder directory the record's files are read from, or None when its items are not files."""
    if record.get("format", 1) >= 2:
        if record.get("root") is None:
            return None
        return os.path.abspath(dataset) if dataset else record["root"]
    # Format 1 (before per-file hashes) recorded an imagefolder as its directory and each file relative to it.
    location = dataset or record["dataset"]
    if location != "digits" and os.path.isdir(location) and not _is_saved_dataset(location):
        return os.path.abspath(location)
    return None


def _read_recorded_file(root: str, entry: dict) -> Image.Image:
    path = _resolve_inside(root, entry["source"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Training image {entry['source']} is missing from {root}.")
    with open(path, "rb") as f:
        data = f.read()
    expected = entry.get("sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(
            f"Training image {path} has changed since the training set was recorded (its sha256 differs): refusing it."
        )
    return _decode_image({"path": path, "bytes": data})


def load_training_set(path: str, dataset: str | None = None, cache_dir: str | None = None) -> TrainingSet:
    """Rebuild the exact training set from a record (a ``training_set.json`` file or the folder holding it).

    The files of an imagefolder are read from the recorded root; each must lie inside it and, in records of format
    2, match its recorded sha256. Records of format 1 (written before per-file hashes) still load: their files are
    checked against the root and the decoded images against the whole-set sha256, as for every record.

    Args:
        path (`str`): the record or its folder (a saved model folder).
        dataset (`str`, *optional*): where the data lives now, if it moved since training.
        cache_dir (`str`, *optional*): the datasets cache (default: ``HF_DATASETS_CACHE``).

    Raises:
        FileNotFoundError: no record, or a recorded file is missing. ValueError: a file lies outside the dataset
        root or differs from the one trained on, or the rebuilt images differ from those trained on.
    """
    record, record_path = _read_record(path)
    entries = record["entries"]
    resolution, channels = record["resolution"], record["channels"]
    root = _record_root(record, dataset)
    if root is not None:
        images = _stack([_to_tensor(_read_recorded_file(root, e), resolution, channels) for e in entries],
                        resolution, channels)
        name = root
    else:
        index = index_dataset(dataset or record["dataset"], record["split"], cache_dir)
        name = index.name
        indices = [e["index"] for e in entries]
        if indices and max(indices) >= len(index):
            raise ValueError(f"The record at {record_path} indexes item {max(indices)} but {name} has {len(index)}.")
        images, hashes = _decode(index, indices, resolution, channels)
        changed = [e["source"] for e, sha in zip(entries, hashes) if e.get("sha256") not in (None, sha)]
        if changed:
            raise ValueError(
                f"Items of {name} differ from those recorded at {record_path} (their sha256): e.g. {changed[:3]}."
            )
    if images_sha256(images) != record["sha256"]:
        raise ValueError(f"The images of {name} differ from those recorded at {record_path} (sha256 mismatch).")
    return _training_set_from_record(images, record)


def load_heldout_set(
    training_set: TrainingSet,
    num_images: int | None = None,
    seed: int = 0,
    dataset: str | None = None,
    cache_dir: str | None = None,
) -> TrainingSet:
    """Real images of the training set's distribution that the model never saw: the floor of memorization metrics.

    They come from the dataset's ``"test"`` split when it has one (an imagefolder's ``test/`` folder, a
    ``DatasetDict``'s ``"test"``), otherwise from the items of the training split that are not in the training set
    (for digits: the 1,797 digits less the training ones). Items of the training set are never returned. They are
    decoded exactly like the training set (same resolution, channels, crop and resize).

    Args:
        training_set (`TrainingSet`): the training set (from `build_training_set` or `load_training_set`).
        num_images (`int`, *optional*): a seeded uniform subset of this many held-out images; all when None.
        seed (`int`): seed of that subset.
        dataset (`str`, *optional*): where the data lives now, if it moved since training.
        cache_dir (`str`, *optional*): the datasets cache (default: ``HF_DATASETS_CACHE``).

    Returns:
        `TrainingSet`: every image once; its ``record`` has ``"role": "heldout"`` and says in ``"heldout_from"``
        which split it was drawn from and how.

    Raises:
        ValueError: no held-out image exists, or fewer than ``num_images``.
    """
    record = training_set.record
    name, root, splits = _open_dataset(dataset or record["dataset"], cache_dir)
    train_split = record["split"]
    split = HELDOUT_SPLIT if HELDOUT_SPLIT in splits and train_split != HELDOUT_SPLIT else train_split
    index = _split_index(name, root, splits, split)
    if index.root is not None:  # files: the same file is the same image whatever its split
        seen = {e["source"] for e in record["entries"]}
        candidates = [i for i, source in enumerate(index.sources) if source not in seen]
    elif split == train_split:
        seen = {e["index"] for e in record["entries"]}
        candidates = [i for i in range(len(index)) if i not in seen]
    else:
        candidates = list(range(len(index)))
    if split != train_split:
        how, none_left = f"the {split!r} split", f"its {split!r} split holds only training images"
    else:
        how = f"the items of the {split!r} split that are not in the training set"
        none_left = f"it has no {HELDOUT_SPLIT!r} split and every item of its {split!r} split is in the training set"
    if not candidates:
        raise ValueError(f"Dataset {index.name} has no held-out image: {none_left}.")
    num_available = len(candidates)
    if num_images is not None:
        if num_images <= 0:
            raise ValueError(f"num_images must be positive, got {num_images}.")
        if num_images > len(candidates):
            raise ValueError(
                f"Asked for {num_images} held-out images but {how} of {index.name} has {len(candidates)}."
            )
        rng = np.random.default_rng(seed)
        candidates = np.sort(rng.choice(np.asarray(candidates), size=num_images, replace=False)).tolist()
    resolution, channels = record["resolution"], record["channels"]
    images, hashes = _decode(index, candidates, resolution, channels)
    heldout_from = {"split": split, "how": how, "num_available": num_available,
                    "training_set_sha256": record.get("sha256")}
    heldout = _make_record(index, candidates, np.ones(len(candidates), int), images, hashes, resolution, channels,
                           role="heldout", seed=seed, num_heldout_images=num_images, heldout_from=heldout_from)
    return _training_set_from_record(images, heldout)
