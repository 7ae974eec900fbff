r"""Features of a reference image set (a training set of up to millions of images), computed once and read back as a
memory map, so that an audit against 1,000,000 reference images runs in bounded memory.

Layout of ``CACHE_DIR/references/<key>/`` (``key``: sha256 of the images' sha256, the feature space's fingerprint
and the format version)::

    features.npy        (N, D) float32, opened as a memory map; present only once complete
    meta.json           num_images, dim, images_sha256, the space's name and fingerprint (checked on every open)
    keep.npy            int64 indices of the distinct rows (first occurrence of bitwise-equal rows, increasing)
    distinct.npy        (len(keep), D) float32, those rows (a hard link to features.npy when all rows are distinct)
    chunks/             while computing: plan.json and chunk-00000.npy, ... (rows [k·chunk, (k+1)·chunk)),
                        deleted once features.npy is assembled

Chunk k is computed by process ``k % num_processes``; every file appears atomically (written under a temporary name in
its folder, then renamed), so a run killed at any point keeps its finished chunks and the same call started again
computes only the missing ones. Features depend neither on the chunk size nor on the number of processes: chunks are
multiples of the space's batch size, so every image goes through the same batch composition (see [`embed`]).

This is written by hand: no library among the dependencies caches chunked features keyed by sha256 across processes
with resumable, atomic chunk files (``datasets`` caches keyed by its own fingerprints of map functions, which cannot
see model weights loaded from elsewhere, and holds no memory-mapped float matrix for a nearest-neighbour search).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

REFERENCES_DIR = "references"
FORMAT_VERSION = 1
FEATURES_NAME = "features.npy"
META_NAME = "meta.json"
KEEP_NAME = "keep.npy"
DISTINCT_NAME = "distinct.npy"
CHUNKS_DIR = "chunks"
PLAN_NAME = "plan.json"

_READ_ROWS_BYTES = 2**25  # rows read at a time by `distinct` (32 MiB of features)
_HASH_ROWS = 4096  # rows hashed at a time (two uint64 temporaries of 4096 x D)
_VERIFY_ROWS = 8192  # candidate duplicates compared at a time (each touches at most a page or two of the file)

Images = Union[torch.Tensor, Callable[[int, int], torch.Tensor]]


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class FeatureSpace:
    r"""
    A feature extractor as the audit sees it.

    Args:
        name (`str`):
            Short name, e.g. ``"pixels"``, ``"sscd-sscd"``, ``"sscd-dcr"``, ``"inception"``, ``"clip"``.
        fingerprint (`str`):
            sha256 hex of everything that determines the features (weights' sha256, preprocessing, ...): cached
            features are keyed by it.
        extract (`Callable[[torch.Tensor], torch.Tensor]`):
            Maps a batch ``(n, C, H, W)`` float32 in [0, 1] to ``(n, D)`` features (returned on any device, any float
            dtype; [`embed`] brings them to float32 on the CPU).
        batch_size (`int`, defaults to 256):
            Images per call of `extract`.
    """

    name: str
    fingerprint: str
    extract: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int = 256


def _flatten_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).float()


_PIXELS_DESCRIPTION = "diffusers_memdistill pixel space: uint8 images / 255 as float32, flattened in C, H, W order"


def pixel_space() -> FeatureSpace:
    r"""
    The identity feature space: each image's pixels in [0, 1], flattened.

    Returns:
        [`FeatureSpace`]: named ``"pixels"``, with ``D = C·H·W`` and a fingerprint that is the sha256 of a fixed
        description.
    """
    return FeatureSpace("pixels", hashlib.sha256(_PIXELS_DESCRIPTION.encode()).hexdigest(), _flatten_pixels)


def _check_images_tensor(x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor of uint8 images (N, C, H, W), got {type(x).__name__}.")
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(
            f"{what} must be uint8 images of shape (N, C, H, W), got dtype {x.dtype} and shape {tuple(x.shape)}."
        )


@torch.no_grad()
def embed(space: FeatureSpace, images_uint8: torch.Tensor) -> torch.Tensor:
    r"""
    Features of images in a feature space, batch by batch.

    Batches are ``[0, b), [b, 2b), ...`` with ``b = space.batch_size``: fixed boundaries from the first row, so a
    given row always goes through the same batch composition when called with the same rows (and [`reference_features`]
    calls it on chunks starting at multiples of ``b``).

    Args:
        space ([`FeatureSpace`]):
            The feature extractor.
        images_uint8 (`torch.Tensor` of shape `(n, C, H, W)`, uint8):
            Images; each batch is converted to float32 and divided by 255 on the fly.

    Returns:
        `torch.Tensor` of shape `(n, D)`: float32 features on the CPU.
    """
    _check_images_tensor(images_uint8, "`images_uint8`")
    n = images_uint8.shape[0]
    if n == 0:
        raise ValueError("`images_uint8` holds no images.")
    if space.batch_size < 1:
        raise ValueError(f"The batch size of feature space {space.name!r} must be positive, got {space.batch_size}.")
    out = None
    for start in range(0, n, space.batch_size):
        stop = min(n, start + space.batch_size)
        batch = images_uint8[start:stop].to(torch.float32) / 255
        f = space.extract(batch)
        if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[0] != stop - start:
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(
                f"Feature space {space.name!r} must return ({stop - start}, D) features for a batch of "
                f"{stop - start} images, got {got}."
            )
        f = f.detach().to("cpu", torch.float32)
        if out is None:
            out = torch.empty(n, f.shape[1], dtype=torch.float32)
        elif f.shape[1] != out.shape[1]:
            raise ValueError(
                f"Feature space {space.name!r} returned {f.shape[1]} features per image after {out.shape[1]}."
            )
        out[start:stop] = f
    return out


# ----------------------------------------------------------------------------------------------------------------
# Atomic files.


def _tmp_name(path: str) -> str:
    """A temporary name in the folder of `path`, unique across processes and machines sharing the folder."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _fsync_and_replace(f, tmp: str, path: str) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp, path)


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = _tmp_name(path)
    try:
        f = open(tmp, "xb")  # not mkstemp: its files are private, these are shared by the processes
        np.save(f, array)  # through the file object: np.save would append ".npy" to the temporary name
        _fsync_and_replace(f, tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _write_json(path: str, obj: dict) -> None:
    tmp = _tmp_name(path)
    try:
        f = open(tmp, "x", encoding="utf-8")
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")
        _fsync_and_replace(f, tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _npy_layout(path: str) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """``(shape, dtype, data offset)`` of a C-ordered .npy file, or None when absent or unreadable."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # 3.0 (utf-8 field names) is never written for float or int arrays
                return None
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return None
    if fortran or size < offset + math.prod(shape) * dtype.itemsize:
        return None
    return tuple(shape), dtype, offset


def _create_npy(path: str, shape: tuple[int, ...], dtype=np.float32) -> int:
    """Creates the (sparse) .npy file `path` of `shape` and returns the offset of its data."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    offset = mm.offset
    del mm  # nothing written through the map: the data go through write(), which adds no resident pages
    return offset


def _remove_stale_temporaries(path: str) -> None:
    """Removes temporaries of `path` left by a killed process (only the process writing `path` calls this)."""
    folder, name = os.path.split(path)
    for entry in os.listdir(folder):
        if entry.startswith(f"{name}.tmp-"):
            _remove(os.path.join(folder, entry))


def _open_memmap(path: str) -> torch.Tensor:
    return torch.from_numpy(np.load(path, mmap_mode="c"))


# ----------------------------------------------------------------------------------------------------------------
# The reference features.


def reference_key(images_sha256: str, space: FeatureSpace) -> str:
    """sha256 hex naming the cache folder of the features of the images `images_sha256` in `space`."""
    record = {"format": FORMAT_VERSION, "images_sha256": images_sha256, "fingerprint": space.fingerprint}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


@dataclass
class ReferenceFeatures:
    r"""
    Output of [`reference_features`]: the features of a reference set, memory-mapped from the cache.

    Args:
        key (`str`):
            sha256 hex of the images' sha256, the feature space's fingerprint and the format version.
        path (`str`):
            The cache folder of this key.
        features (`torch.Tensor` of shape `(N, D)`, float32):
            Backed by a copy-on-write memory map of ``path/features.npy``: pages are read from disk as they are
            touched and never written back.
        process_index (`int`, defaults to 0):
            This process; [`~ReferenceFeatures.distinct`] is computed by process 0.
        wait_for_everyone (`Callable[[], None]`, defaults to a no-op):
            Barrier between the processes sharing the cache.
    """

    key: str
    path: str
    features: torch.Tensor
    process_index: int = field(default=0, repr=False, compare=False)
    wait_for_everyone: Callable[[], None] = field(default=_no_barrier, repr=False, compare=False)

    def statistics(self):
        r"""
        Mean and covariance of the features ([`~diffusers_memdistill.metrics.feature_statistics`], the training
        set's side of FID and pixel FD), from file reads of row chunks rather than the memory map, so that the pages
        of ``features.npy`` read for them do not stay in this process's memory.

        Returns:
            [`~diffusers_memdistill.metrics.FeatureStats`]
        """
        from ..metrics import feature_statistics

        return feature_statistics(_FileRows(os.path.join(self.path, FEATURES_NAME), tuple(self.features.shape)))

    def distinct(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        The distinct rows of the features: the first occurrence of each set of bitwise-equal rows, in order.

        Same result as [`~diffusers_memdistill.metrics.nn_search.unique_rows`] (``keep`` equals its first output),
        computed in bounded memory: every row's bytes are hashed chunk by chunk, then rows of equal hash are compared
        bitwise with the first of them. Computed once by process 0 and cached (``keep.npy``, ``distinct.npy``); with
        several processes, call it on every process (it holds a barrier).

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: ``rows`` (`(len(keep), D)` float32, memory-mapped from
            ``distinct.npy``) and ``keep`` (int64 indices of those rows in `features`, increasing).
        """
        rows_path, keep_path = os.path.join(self.path, DISTINCT_NAME), os.path.join(self.path, KEEP_NAME)
        if self.process_index == 0 and not _distinct_complete(self.path, self.features.shape):
            _write_distinct(self.path, self.features.shape)
        self.wait_for_everyone()
        if not _distinct_complete(self.path, self.features.shape):
            raise RuntimeError(
                f"{rows_path} is missing or incomplete after process 0 wrote it: do all processes share the folder?"
            )
        return _open_memmap(rows_path), torch.from_numpy(np.load(keep_path))


def _distinct_complete(folder: str, shape) -> bool:
    keep = _npy_layout(os.path.join(folder, KEEP_NAME))
    rows = _npy_layout(os.path.join(folder, DISTINCT_NAME))
    if keep is None or rows is None or keep[1] != np.int64 or len(keep[0]) != 1 or rows[1] != np.float32:
        return False
    return rows[0] == (keep[0][0], shape[1])


def _read_rows_into(f, offset: int, row_bytes: int, start: int, buf: np.ndarray) -> None:
    f.seek(offset + start * row_bytes)
    view = memoryview(buf.reshape(-1).view(np.uint8))
    got = f.readinto(view)
    if got != len(view):
        raise OSError(f"{f.name} is shorter than its header says (rows from {start}).")


class _FileRows:
    """Row slices of an (N, D) float32 ``.npy`` file read with ``readinto`` (no mapping): what `feature_statistics`
    needs of an array (``shape``, ``ndim``, ``[start:stop]``)."""

    def __init__(self, path: str, shape: tuple):
        self.path, self.shape, self.ndim = path, shape, len(shape)
        self.offset = _npy_layout(path)[2]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        buf = np.empty((max(0, stop - start), self.shape[1]), dtype=np.float32)
        with open(self.path, "rb") as f:
            _read_rows_into(f, self.offset, 4 * self.shape[1], start, buf)
        return buf


def _hash_weights(d: int) -> np.ndarray:
    return np.random.default_rng(0x5EED).integers(0, 2**63, size=d, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _distinct_indices(path: str, shape: tuple[int, int]) -> np.ndarray:
    """Indices of the first occurrences of the rows of the (N, D) float32 file `path` (see `distinct`)."""
    n, d = shape
    offset = _npy_layout(path)[2]
    row_bytes = 4 * d
    # Pass 1: a 64-bit hash of every row, ``Σ_j w_j x_j mod 2⁶⁴`` over its float32 words read as uint32, with fixed
    # random odd weights. Collisions of unequal rows only cost a comparison (pass 2 verifies every match bitwise).
    weights = _hash_weights(d)
    hashes = np.empty(n, dtype=np.uint64)
    step = max(1, min(_HASH_ROWS, _READ_ROWS_BYTES // row_bytes))
    buf = np.empty((step, d), dtype=np.float32)
    with open(path, "rb") as f:
        for start in range(0, n, step):
            rows = min(step, n - start)
            _read_rows_into(f, offset, row_bytes, start, buf[:rows])
            words = buf[:rows].view(np.uint32).astype(np.uint64)
            words *= weights
            hashes[start : start + rows] = words.sum(axis=1, dtype=np.uint64)
    order = np.argsort(hashes, kind="stable")  # equal hashes stay in increasing row order
    sorted_h = hashes[order]
    del hashes
    run_start = np.ones(n, dtype=bool)
    run_start[1:] = sorted_h[1:] != sorted_h[:-1]
    del sorted_h
    head_pos = np.maximum.accumulate(np.where(run_start, np.arange(n), 0))
    dup_pos = np.flatnonzero(~run_start)  # rows whose hash equals that of an earlier row
    is_dup = np.zeros(n, dtype=bool)
    if dup_pos.size == 0:
        return np.arange(n, dtype=np.int64)

    # Pass 2: each candidate against the first row of its hash, gathered through a read-only map whose pages are
    # dropped after each block (so resident memory stays that of one block whatever the number of duplicates).
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = np.frombuffer(mm, dtype=np.uint32, count=n * d, offset=offset).reshape(n, d)
        bad_heads = []
        try:
            for s in range(0, dup_pos.size, _VERIFY_ROWS):
                pos = dup_pos[s : s + _VERIFY_ROWS]
                cand, head = order[pos], order[head_pos[pos]]
                equal = (data[cand] == data[head]).all(axis=1)
                is_dup[cand[equal]] = True
                bad_heads.append(np.unique(head_pos[pos[~equal]]))
                _drop_pages(mm)
            # Hash groups holding unequal rows (true collisions, rare): each member against the group's distinct rows
            # so far, in increasing row order.
            for h in np.unique(np.concatenate(bad_heads)):
                later = np.flatnonzero(run_start[h + 1 :])
                stop = h + 1 + int(later[0]) if later.size else n
                members = order[h:stop]  # increasing
                is_dup[members] = False
                reps: list[np.ndarray] = []
                for s in range(0, members.size, _VERIFY_ROWS):
                    block = members[s : s + _VERIFY_ROWS]
                    rows = data[block]
                    todo = np.ones(block.size, dtype=bool)
                    for rep in reps:  # copies of distinct rows of the earlier blocks
                        todo &= ~(rows == rep).all(axis=1)
                    firsts = []
                    while todo.any():  # the first row left is a first occurrence; it and its copies leave `todo`
                        j = int(np.argmax(todo))
                        firsts.append(j)
                        reps.append(rows[j].copy())
                        todo &= ~(rows == rows[j]).all(axis=1)
                    is_dup[block] = True
                    is_dup[block[firsts]] = False
                    _drop_pages(mm)
        finally:
            del data
    return np.flatnonzero(~is_dup).astype(np.int64)


def _drop_pages(mm: mmap.mmap) -> None:
    """Unmaps the pages read so far (the page cache keeps them): they no longer count in this process's memory."""
    if hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def _write_distinct(folder: str, shape) -> None:
    n, d = int(shape[0]), int(shape[1])
    features_path = os.path.join(folder, FEATURES_NAME)
    rows_path = os.path.join(folder, DISTINCT_NAME)
    for path in (os.path.join(folder, KEEP_NAME), rows_path):
        _remove_stale_temporaries(path)
    keep = _distinct_indices(features_path, (n, d))
    _save_npy(os.path.join(folder, KEEP_NAME), keep)
    tmp = _tmp_name(rows_path)
    try:
        if keep.size == n:
            try:  # every row distinct: the same bytes, without a second copy on disk
                os.link(features_path, tmp)
                os.replace(tmp, rows_path)
                return
            except OSError:
                _remove(tmp)
        row_bytes = 4 * d
        out_offset = _create_npy(tmp, (keep.size, d))
        in_offset = _npy_layout(features_path)[2]
        step = max(1, _READ_ROWS_BYTES // row_bytes)
        buf = np.empty((step, d), dtype=np.float32)
        with open(features_path, "rb") as src, open(tmp, "r+b") as dst:
            dst.seek(out_offset)
            lo = 0
            for start in range(0, n, step):
                rows = min(step, n - start)
                hi = int(np.searchsorted(keep, start + rows))
                if hi == lo:
                    continue
                _read_rows_into(src, in_offset, row_bytes, start, buf[:rows])
                dst.write(np.ascontiguousarray(buf[keep[lo:hi] - start]).data)
                lo = hi
            _fsync_and_replace(dst, tmp, rows_path)
    except BaseException:
        _remove(tmp)
        raise


def _check_meta(folder: str, expected: dict) -> bool:
    """True when ``features.npy`` is complete in `folder`; ValueError when the folder holds features of other data."""
    layout = _npy_layout(os.path.join(folder, FEATURES_NAME))
    meta = _read_json(os.path.join(folder, META_NAME))
    if layout is None or meta is None:
        return False
    differences = [
        f"{name}: {meta.get(name)!r} in the cache, {value!r} here"
        for name, value in expected.items()
        if meta.get(name) != value
    ]
    shape, dtype, _ = layout
    if dtype != np.float32 or len(shape) != 2 or shape != (meta.get("num_images"), meta.get("dim")):
        differences.append(f"features.npy holds {dtype} {shape}, meta.json says ({meta.get('num_images')}, "
                           f"{meta.get('dim')}) float32")
    if differences:
        raise ValueError(
            f"The cached reference features in {folder} do not match this call: " + "; ".join(differences)
            + ". Pass the right images, or delete the folder to recompute it."
        )
    return True


def _chunk_plan(chunks_dir: str, num_images: int, chunk: int, batch_size: int) -> int:
    """Chunk size of this computation: that of an interrupted one when its chunk files are there (features do not
    depend on it), else `chunk` (recorded for the next resume)."""
    path = os.path.join(chunks_dir, PLAN_NAME)
    plan = {"format": FORMAT_VERSION, "num_images": num_images, "batch_size": batch_size, "chunk_size": chunk}
    saved = _read_json(path)
    if saved is None:
        _write_json(path, plan)  # every process writes the same content: the last rename wins, harmlessly
        return chunk
    differences = [f"{k}: {saved.get(k)!r} there, {plan[k]!r} here" for k in ("format", "num_images", "batch_size")
                   if saved.get(k) != plan[k]]
    if differences or not isinstance(saved.get("chunk_size"), int) or saved["chunk_size"] < 1:
        raise ValueError(
            f"The partial reference features in {chunks_dir} were computed with other settings ("
            + ("; ".join(differences) or f"chunk_size {saved.get('chunk_size')!r}")
            + "): rerun with the same settings, or delete the folder to start over."
        )
    if saved["chunk_size"] != chunk:
        logger.info("Resuming %s with its chunk size %d (not %d).", chunks_dir, saved["chunk_size"], chunk)
    return saved["chunk_size"]


def _chunk_path(chunks_dir: str, k: int) -> str:
    return os.path.join(chunks_dir, f"chunk-{k:05d}.npy")


def _chunk_ok(path: str, rows: int) -> bool:
    layout = _npy_layout(path)
    return layout is not None and layout[1] == np.float32 and len(layout[0]) == 2 and layout[0][0] == rows


def _image_rows(images: Images, start: int, stop: int) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[start:stop]
    x = images(start, stop)
    _check_images_tensor(x, f"`images({start}, {stop})`")
    if x.shape[0] != stop - start:
        raise ValueError(f"`images({start}, {stop})` returned {x.shape[0]} rows, expected {stop - start}.")
    return x


def _assemble(folder: str, chunks_dir: str, num_images: int, chunk: int, meta: dict) -> None:
    """Streams the chunk files into ``features.npy`` (one chunk in memory at a time), then deletes them."""
    num_chunks = math.ceil(num_images / chunk)
    layouts = []
    for k in range(num_chunks):
        rows = min(chunk, num_images - k * chunk)
        layout = _npy_layout(_chunk_path(chunks_dir, k))
        if layout is None or not _chunk_ok(_chunk_path(chunks_dir, k), rows):
            raise RuntimeError(
                f"Chunk {k} of the reference features is missing or incomplete in {chunks_dir} after every process "
                "computed its chunks: do all processes share the cache folder and call with the same arguments?"
            )
        layouts.append(layout)
    dims = {layout[0][1] for layout in layouts}
    if len(dims) != 1:
        raise RuntimeError(f"The chunks in {chunks_dir} have different feature sizes {sorted(dims)}.")
    dim = dims.pop()
    path = os.path.join(folder, FEATURES_NAME)
    _remove_stale_temporaries(path)
    tmp = _tmp_name(path)
    try:
        offset = _create_npy(tmp, (num_images, dim))
        # Written through the file rather than the map open_memmap returns: pages written through a map stay
        # resident (and count in this process's memory) until unmapped, here up to the whole N x D matrix.
        with open(tmp, "r+b") as out:
            out.seek(offset)
            for k in range(num_chunks):
                out.write(np.ascontiguousarray(np.load(_chunk_path(chunks_dir, k))).data)
            _write_json(os.path.join(folder, META_NAME), {**meta, "dim": int(dim)})
            _fsync_and_replace(out, tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    shutil.rmtree(chunks_dir, ignore_errors=True)


def reference_features(
    images: Images,
    num_images: int,
    images_sha256: str,
    space: FeatureSpace,
    cache_dir: str,
    *,
    chunk_size: int = 16384,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] = _no_barrier,
    progress: bool = False,
) -> ReferenceFeatures:
    r"""
    Features of a reference image set in a feature space, computed once (in chunks, over processes) and cached.

    The cache folder is ``cache_dir/references/<key>``. When it holds complete features they are only opened (after
    checking its ``meta.json``). Otherwise chunk ``k`` (rows ``[k·chunk, (k+1)·chunk)``) is computed by process
    ``k % num_processes`` with [`embed`] and written atomically; chunk files already there (a killed run) are kept.
    After a barrier, process 0 streams the chunks into ``features.npy`` and deletes them; after a second barrier every
    process opens it as a memory map. Memory stays bounded: one chunk of images and features at a time. Call it on
    every process with the same arguments (it holds two barriers, whether or not the cache is complete).

    Args:
        images (`torch.Tensor` or `Callable[[int, int], torch.Tensor]`):
            ``(N, C, H, W)`` uint8 images, or a function ``(start, stop) -> `` uint8 images of rows ``start..stop``
            (read chunk by chunk, so the set never needs to be in memory; it is not called for cached chunks).
        num_images (`int`):
            ``N``, the number of images.
        images_sha256 (`str`):
            Identifies the images (e.g. the training set record's sha256); part of the cache key.
        space ([`FeatureSpace`]):
            The feature extractor; its fingerprint is part of the cache key.
        cache_dir (`str`):
            Root of the cache, shared by all processes.
        chunk_size (`int`, defaults to 16384):
            Rows per chunk file, rounded up to a multiple of ``space.batch_size``. A resumed computation keeps the
            chunk size of the interrupted one (the features do not depend on it).
        process_index (`int`, defaults to 0):
            This process, in ``[0, num_processes)``; process 0 assembles the chunks.
        num_processes (`int`, defaults to 1):
            Number of processes sharing the work.
        wait_for_everyone (`Callable[[], None]`, defaults to a no-op):
            Barrier between the processes (e.g. ``accelerator.wait_for_everyone``).
        progress (`bool`, defaults to `False`):
            Show a progress bar over this process's chunks.

    Returns:
        [`ReferenceFeatures`]: the key, the cache folder and the ``(N, D)`` float32 features as a memory map.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"`num_images` must be a positive integer, got {num_images!r}.")
    if isinstance(images, torch.Tensor):
        _check_images_tensor(images, "`images`")
        if images.shape[0] != num_images:
            raise ValueError(f"`images` holds {images.shape[0]} images but `num_images` is {num_images}.")
    elif not callable(images):
        raise ValueError(
            f"`images` must be a uint8 tensor (N, C, H, W) or a callable (start, stop) -> images, got "
            f"{type(images).__name__}."
        )
    if not isinstance(images_sha256, str) or not images_sha256:
        raise ValueError(f"`images_sha256` must be a non-empty string, got {images_sha256!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
    if space.batch_size < 1:
        raise ValueError(f"The batch size of feature space {space.name!r} must be positive, got {space.batch_size}.")
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(
            f"`process_index` must be in [0, num_processes) with num_processes >= 1, got {process_index} and "
            f"{num_processes}."
        )

    key = reference_key(images_sha256, space)
    folder = os.path.join(cache_dir, REFERENCES_DIR, key)
    chunks_dir = os.path.join(folder, CHUNKS_DIR)
    meta = {"format": FORMAT_VERSION, "key": key, "num_images": num_images, "images_sha256": images_sha256,
            "space": space.name, "fingerprint": space.fingerprint}
    done = _check_meta(folder, meta)
    chunk = 0
    if not done:
        os.makedirs(chunks_dir, exist_ok=True)
        chunk = math.ceil(chunk_size / space.batch_size) * space.batch_size
        chunk = _chunk_plan(chunks_dir, num_images, chunk, space.batch_size)
        mine = range(process_index, math.ceil(num_images / chunk), num_processes)
        for k in tqdm(mine, desc=f"{space.name} features", disable=not progress):
            start, stop = k * chunk, min(num_images, (k + 1) * chunk)
            path = _chunk_path(chunks_dir, k)
            if _chunk_ok(path, stop - start):
                continue
            _save_npy(path, embed(space, _image_rows(images, start, stop)).numpy())
    wait_for_everyone()
    if process_index == 0 and not done:
        _assemble(folder, chunks_dir, num_images, chunk, meta)
    wait_for_everyone()
    if not _check_meta(folder, meta):
        raise RuntimeError(
            f"{os.path.join(folder, FEATURES_NAME)} is missing after process 0 assembled it: do all processes share "
            "the cache folder?"
        )
    return ReferenceFeatures(key, folder, _open_memmap(os.path.join(folder, FEATURES_NAME)), process_index,
                             wait_for_everyone)
