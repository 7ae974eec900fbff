"""Reference features cached on disk (diffusers_memdistill.evaluation.references): equal to `embed` whatever the
chunking and the number of processes, resumed after a kill without recomputing finished chunks, read back without
extracting anything, their distinct rows equal to `unique_rows`; the memory benchmark's quick run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from conftest import REPO
from diffusers_memdistill.evaluation import references as refs
from diffusers_memdistill.evaluation.references import (
    FeatureSpace,
    ReferenceFeatures,
    embed,
    pixel_space,
    reference_features,
)
from diffusers_memdistill.metrics.nn_search import unique_rows

SHA = "a" * 64


def images(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g)


class Counting:
    """A feature space of small batches whose features depend on the batch composition (a batch mean is added), so
    that any change of batch boundaries shows; counts its calls."""

    def __init__(self, batch_size=4, fingerprint="f" * 64, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after
        self.space = FeatureSpace("counting", fingerprint, self, batch_size)

    def __call__(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        f = x.flatten(1)[:, :6] * 3.0
        return f + f.mean(0, keepdim=True) * 1e-3


def as_callable(x, log=None):
    def rows(start, stop):
        if log is not None:
            log.append((start, stop))
        return x[start:stop].clone()

    return rows


@pytest.mark.parametrize("chunk_size", [8, 10, 50, 1000])  # divides N, not a multiple of the batch, one chunk, > N
@pytest.mark.parametrize("use_callable", [False, True])
def test_features_equal_embed_whatever_the_chunking(tmp_path, chunk_size, use_callable):
    x = images(50)
    space = Counting().space
    expected = embed(space, x)
    source = as_callable(x) if use_callable else x
    ref = reference_features(source, 50, SHA, space, str(tmp_path), chunk_size=chunk_size)
    assert isinstance(ref, ReferenceFeatures)
    assert ref.features.dtype == torch.float32 and torch.equal(ref.features, expected)
    assert isinstance(ref.features.numpy(), np.ndarray) and ref.features.numpy().base is not None  # a memory map
    assert ref.path == os.path.join(str(tmp_path), "references", ref.key)
    assert sorted(os.listdir(ref.path)) == ["features.npy", "meta.json"]  # chunk files deleted once assembled
    with open(os.path.join(ref.path, "meta.json")) as f:
        meta = json.load(f)
    assert (meta["num_images"], meta["dim"], meta["images_sha256"], meta["space"], meta["fingerprint"]) == (
        50, 6, SHA, "counting", "f" * 64)


def test_embed_batches_from_the_first_row():
    x = images(10)
    c = Counting(batch_size=4)
    f = embed(c.space, x)
    assert c.calls == 3 and f.shape == (10, 6) and f.dtype == torch.float32
    assert torch.equal(f[4:8], embed(c.space, x[4:8]))  # the same batch composition gives the same bits
    p = embed(pixel_space(), x)
    assert torch.equal(p, x.flatten(1).float() / 255)


def test_callable_reads_only_chunks(tmp_path):
    x, log = images(50), []
    reference_features(as_callable(x, log), 50, SHA, Counting().space, str(tmp_path), chunk_size=10)
    assert log == [(0, 12), (12, 24), (24, 36), (36, 48), (48, 50)]  # 10 rounded up to a multiple of 4


def test_two_processes_sequentially_equal_one(tmp_path):
    x = images(50)
    one = reference_features(x, 50, SHA, Counting().space, str(tmp_path / "one"), chunk_size=8)

    class Stop(Exception):
        pass

    barrier_calls = [0]

    def barrier_of_1():  # process 1 "waits" at its second barrier: stop it there, run process 0, then resume it
        barrier_calls[0] += 1
        if barrier_calls[0] == 2:
            raise Stop

    c1, c0 = Counting(), Counting()
    with pytest.raises(Stop):
        reference_features(x, 50, SHA, c1.space, str(tmp_path / "two"), chunk_size=8, process_index=1,
                           num_processes=2, wait_for_everyone=barrier_of_1)
    assert c1.calls == 6  # chunks 1, 3, 5 (two batches of 4 each)
    ref0 = reference_features(x, 50, SHA, c0.space, str(tmp_path / "two"), chunk_size=8, process_index=0,
                              num_processes=2)
    assert c0.calls == 7  # chunks 0, 2, 4 and 6 (the last one: 2 rows)
    ref1 = reference_features(x, 50, SHA, c1.space, str(tmp_path / "two"), chunk_size=8, process_index=1,
                              num_processes=2)
    assert c1.calls == 6
    for ref in (ref0, ref1):
        assert ref.key == one.key and torch.equal(ref.features, one.features)
        assert ref.features.numpy().tobytes() == one.features.numpy().tobytes()


def test_two_processes_as_threads_with_a_real_barrier(tmp_path):
    x = images(50)
    one = reference_features(x, 50, SHA, Counting().space, str(tmp_path / "one"), chunk_size=8)
    barrier = threading.Barrier(2, timeout=30)
    out, errors = {}, []

    def worker(i):
        try:
            ref = reference_features(as_callable(x), 50, SHA, Counting().space, str(tmp_path / "two"), chunk_size=8,
                                     process_index=i, num_processes=2, wait_for_everyone=barrier.wait)
            out[i] = ref
            out[i, "distinct"] = ref.distinct()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in (0, 1):
        assert torch.equal(out[i].features, one.features)
        assert torch.equal(out[i, "distinct"][1], unique_rows(one.features)[0])


def test_resume_keeps_finished_chunks(tmp_path, monkeypatch):
    x = images(50)
    killed = Counting(fail_after=5)  # batches of 4, chunks of 8: chunks 0 and 1 finish, chunk 2 is killed
    with pytest.raises(KeyboardInterrupt):
        reference_features(x, 50, SHA, killed.space, str(tmp_path), chunk_size=8)
    folder = os.path.join(str(tmp_path), "references", refs.reference_key(SHA, killed.space))
    chunks = os.path.join(folder, "chunks")
    assert sorted(os.listdir(chunks)) == ["chunk-00000.npy", "chunk-00001.npy", "plan.json"]  # no temporary left
    assert not os.path.exists(os.path.join(folder, "features.npy"))
    before = [os.stat(os.path.join(chunks, f"chunk-0000{k}.npy")) for k in (0, 1)]
    stale = os.path.join(folder, "features.npy.tmp-1-deadbeef")  # as left by a process killed while assembling
    open(stale, "wb").close()

    seen = []
    assemble = refs._assemble

    def checking_assemble(*args, **kwargs):
        seen.extend(os.stat(os.path.join(chunks, f"chunk-0000{k}.npy")) for k in (0, 1))
        return assemble(*args, **kwargs)

    monkeypatch.setattr(refs, "_assemble", checking_assemble)
    log, resumed = [], Counting()
    # Another chunk size: the interrupted computation's one is kept (the features do not depend on it).
    ref = reference_features(as_callable(x, log), 50, SHA, resumed.space, str(tmp_path), chunk_size=16)
    assert log == [(16, 24), (24, 32), (32, 40), (40, 48), (48, 50)] and resumed.calls == 9
    for a, b in zip(before, seen):
        assert (a.st_ino, a.st_mtime_ns, a.st_size) == (b.st_ino, b.st_mtime_ns, b.st_size)
    assert torch.equal(ref.features, embed(Counting().space, x))
    assert not os.path.exists(chunks) and not os.path.exists(stale)


def test_second_call_extracts_nothing(tmp_path):
    x, log = images(50), []
    c = Counting()
    first = reference_features(x, 50, SHA, c.space, str(tmp_path), chunk_size=8)
    calls = c.calls
    second = reference_features(as_callable(x, log), 50, SHA, c.space, str(tmp_path), chunk_size=24)
    assert c.calls == calls and log == []
    assert second.key == first.key and torch.equal(second.features, first.features)


def test_fingerprint_and_images_name_the_folder(tmp_path):
    x = images(20)
    a = reference_features(x, 20, SHA, Counting(fingerprint="1" * 64).space, str(tmp_path))
    c = Counting(fingerprint="2" * 64)
    b = reference_features(x, 20, SHA, c.space, str(tmp_path))
    assert c.calls > 0 and a.key != b.key and a.path != b.path
    d = reference_features(x, 20, "b" * 64, c.space, str(tmp_path))
    assert d.key not in (a.key, b.key)
    assert len(os.listdir(os.path.join(str(tmp_path), "references"))) == 3
    assert pixel_space().fingerprint == pixel_space().fingerprint and len(pixel_space().fingerprint) == 64


def test_distinct_equals_unique_rows(tmp_path, monkeypatch):
    x = images(300, seed=1)
    x[100:140] = x[0:40]
    x[200] = x[7]
    x[299] = x[150]
    x[250:260] = x[250]
    ref = reference_features(x, 300, SHA, pixel_space(), str(tmp_path), chunk_size=64)
    rows, keep = ref.distinct()
    expected = unique_rows(ref.features)[0]
    assert keep.dtype == torch.int64 and torch.equal(keep, expected) and keep.shape[0] == 300 - 40 - 1 - 1 - 9
    assert torch.equal(rows, ref.features[keep]) and rows.numpy().base is not None  # memory-mapped
    # Cached: a second call reads the files back.
    monkeypatch.setattr(refs, "_distinct_indices", lambda *a: pytest.fail("recomputed"))
    rows2, keep2 = ref.distinct()
    assert torch.equal(keep2, keep) and torch.equal(rows2, rows)


def test_distinct_verifies_hash_collisions_bitwise(tmp_path, monkeypatch):
    """Every row gets the same hash: the bitwise comparison alone must find the duplicates (in blocks)."""
    monkeypatch.setattr(refs, "_hash_weights", lambda d: np.zeros(d, dtype=np.uint64))
    monkeypatch.setattr(refs, "_VERIFY_ROWS", 7)
    x = images(120, seed=2)
    x[60:90] = x[0:30]
    x[100] = x[95]
    ref = reference_features(x, 120, SHA, pixel_space(), str(tmp_path))
    rows, keep = ref.distinct()
    assert torch.equal(keep, unique_rows(ref.features)[0]) and torch.equal(rows, ref.features[keep])


def test_distinct_is_bitwise(tmp_path):
    """0.0 and -0.0 are equal numbers but distinct rows (as for unique_rows); all rows distinct: a hard link."""
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])

    def signed_zeros(x):
        return torch.zeros(x.shape[0], 3) * signs[: x.shape[0], None]

    space = FeatureSpace("zeros", "0" * 64, signed_zeros, batch_size=4)
    ref = reference_features(images(4), 4, SHA, space, str(tmp_path))
    rows, keep = ref.distinct()
    assert keep.tolist() == [0, 1] == unique_rows(ref.features)[0].tolist()
    distinct = reference_features(images(5), 5, "c" * 64, pixel_space(), str(tmp_path))
    rows, keep = distinct.distinct()
    assert keep.tolist() == list(range(5))
    assert os.path.samefile(os.path.join(distinct.path, "distinct.npy"), os.path.join(distinct.path, "features.npy"))


def test_bad_inputs(tmp_path):
    x, space, d = images(10), pixel_space(), str(tmp_path)
    with pytest.raises(ValueError, match="num_images"):
        reference_features(x[:0], 0, SHA, space, d)
    with pytest.raises(ValueError, match="uint8"):
        reference_features(x.float(), 10, SHA, space, d)
    with pytest.raises(ValueError, match="N, C, H, W"):
        reference_features(x[:, 0], 10, SHA, space, d)
    with pytest.raises(ValueError, match="num_images"):
        reference_features(x, 11, SHA, space, d)
    with pytest.raises(ValueError, match="chunk_size"):
        reference_features(x, 10, SHA, space, d, chunk_size=0)
    with pytest.raises(ValueError, match="returned 3 rows, expected 10"):
        reference_features(lambda a, b: x[:3], 10, SHA, space, d)
    with pytest.raises(ValueError, match="uint8"):
        reference_features(lambda a, b: x[a:b].float(), 10, "d" * 64, space, d)
    with pytest.raises(ValueError, match="process_index"):
        reference_features(x, 10, SHA, space, d, process_index=2, num_processes=2)
    with pytest.raises(ValueError, match="images_sha256"):
        reference_features(x, 10, "", space, d)
    with pytest.raises(ValueError, match="must return"):
        embed(FeatureSpace("bad", "e" * 64, lambda t: t[:1].flatten(1)), x)
    # A folder of the same key holding other data: the difference is named.
    reference_features(x, 10, SHA, space, d)
    with pytest.raises(ValueError, match="num_images: 10 in the cache, 8 here"):
        reference_features(x[:8], 8, SHA, space, d)
    renamed = FeatureSpace("renamed", space.fingerprint, space.extract)
    with pytest.raises(ValueError, match="space: 'pixels' in the cache, 'renamed' here"):
        reference_features(x, 10, SHA, renamed, d)


def test_memory_benchmark_quick(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_evaluate_memory.py"), "--quick", "--json",
                    str(out)], check=True, capture_output=True, text=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = json.loads(out.read_text())
    assert r["num_references"] == 10_000 and r["dim"] == 192 and r["num_distinct"] < 10_000
    for key in ("features_seconds_first", "features_seconds_cached", "distinct_seconds", "search_seconds",
                "features_seconds_per_million_references", "search_seconds_per_million_references", "peak_rss_mib",
                "num_queries", "num_distinct"):
        assert r[key] > 0, key
    assert r["near_copies_ok"] == r["near_copies_checked"] > 0
