"""The HDF5 feature store: writing, resume, completion flag, shards and the token stream."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from napari_mammo_sae.errors import StoreError
from napari_mammo_sae.pipeline import store as fs

C, GRID = 8, (3, 4)


def _write(path, n=6, *, complete=True, start=0, splits=None, seed=0):
    rng = np.random.default_rng(seed)
    maps = {}
    w = fs.create(path, feature_dim=C, grid=GRID, backbone_signature="sig", attrs={"backbone": "b"})
    for i in range(start, start + n):
        fmap = rng.normal(size=(C, *GRID)).astype(np.float32)
        split = splits[i] if splits else ("training" if i % 3 else "test")
        w.append(
            f"img{i}",
            fmap,
            {"study_id": f"s{i // 2}", "split": split, "laterality": "L", "view": "CC",
             "labels": {"mass": i % 2, "calcification": 0}, "geometry": {"a": [1, 2]}},
        )  # fmt: skip
        maps[f"img{i}"] = fmap
    w.close(complete=complete)
    return maps


def test_roundtrip_index_and_maps(tmp_path):
    path = tmp_path / "s.h5"
    maps = _write(path)
    with fs.open(path) as s:
        assert len(s) == 6 and s.feature_dim == C and s.grid == GRID
        assert s.backbone_signature == "sig" and s.backbone == "b"
        assert list(s.index.image_id) == [f"img{i}" for i in range(6)]
        assert list(s.labels("mass")) == [0, 1, 0, 1, 0, 1]
        assert json.loads(s.index.geometry[0]) == {"a": [1, 2]}
        # fp16 storage: maps come back to fp16 precision
        np.testing.assert_allclose(s.feature_map(2), maps["img2"], atol=2e-3)
        tok = s.tokens(2)
        assert tok.shape == (12, C)
        np.testing.assert_allclose(tok[5], maps["img2"][:, 1, 1], atol=2e-3)
        assert [r for r, _ in s.iter_images("test")] == [0, 3]


def test_incomplete_store_refused_then_resumed(tmp_path):
    path = tmp_path / "s.h5"
    _write(path, n=3, complete=False)
    with pytest.raises(StoreError, match="incomplete"):
        fs.open(path)
    w = fs.create(path, feature_dim=C, grid=GRID, backbone_signature="sig")
    assert w.has("img1") and not w.has("img3") and len(w) == 3
    w.append("img3", np.zeros((C, *GRID)), {"split": "training"})
    w.close()
    with fs.open(path) as s:
        assert len(s) == 4


def test_mismatches_and_corrupt(tmp_path):
    path = tmp_path / "s.h5"
    _write(path, n=2)
    with pytest.raises(StoreError, match="backbone signature"):
        fs.create(path, feature_dim=C, grid=GRID, backbone_signature="other")
    with pytest.raises(StoreError, match="feature dim"):
        fs.create(path, feature_dim=C + 1, grid=GRID, backbone_signature="sig")
    w = fs.create(path, feature_dim=C, grid=GRID, backbone_signature="sig")
    with pytest.raises(StoreError, match="do not fit"):
        w.append("x", np.zeros((C + 1, *GRID)))
    w.close()
    with pytest.raises(StoreError, match="no feature store"):
        fs.open(tmp_path / "missing.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="not a readable"):
        fs.open(bad)


def test_shard_index(tmp_path):
    a, b = tmp_path / "s.rank0-of-2.h5", tmp_path / "s.rank1-of-2.h5"
    _write(a, n=3, start=0)
    assert fs.join_shards(tmp_path / "s.h5", [a, b]) is None  # shard 1 missing
    _write(b, n=2, start=3, seed=1)
    fs.join_shards(tmp_path / "s.h5", [a, b])
    with fs.open(tmp_path / "s.h5") as s:
        assert list(s.index.image_id) == [f"img{i}" for i in range(5)]
        with h5py.File(b) as f:
            np.testing.assert_array_equal(
                s.feature_map(4), np.asarray(f["features"][1], np.float32)
            )


def test_token_stream_covers_fraction_and_resumes_exactly(tmp_path):
    path = tmp_path / "s.h5"
    _write(path, n=10, splits=["training"] * 10)
    with fs.open(path) as s:
        kw = dict(fraction=0.5, seed=3, shuffle_buffer_images=3)
        stream = s.token_stream(5, **kw)
        assert stream.epoch_tokens == 10 * 6
        first_epoch = np.concatenate([stream.next_batch() for _ in range(12)])
        # one epoch = 6 distinct positions of each of the 10 images, no repeats
        assert len({tuple(t) for t in first_epoch.round(4)}) == 60
        all_tokens = {tuple(t) for r in range(10) for t in s.tokens(r).round(4)}
        assert {tuple(t) for t in first_epoch.round(4)} <= all_tokens
        # save a position mid-window, continue, and compare with a restarted stream
        pos = stream.position
        cont = [stream.next_batch() for _ in range(7)]
        resumed = s.token_stream(5, start_position=pos, **kw)
        for x, y in zip(cont, [resumed.next_batch() for _ in range(7)], strict=True):
            np.testing.assert_array_equal(x, y)
        # the next epoch draws another order
        second = np.concatenate(cont[:5])
        assert not np.array_equal(second[:5], first_epoch[:5])


def test_token_stream_rank_slices_equal_global_batch(tmp_path):
    path = tmp_path / "s.h5"
    _write(path, n=6, splits=["training"] * 6)
    with fs.open(path) as s:
        full = list(s.iter_token_batches(8, fraction=1.0, epochs=1))
        r0 = list(s.iter_token_batches(8, fraction=1.0, epochs=1, rank=0, world=2))
        r1 = list(s.iter_token_batches(8, fraction=1.0, epochs=1, rank=1, world=2))
        assert len(full) == 9 and all(b.shape == (8, C) for b in full)
        for g, a, b in zip(full, r0, r1, strict=True):
            np.testing.assert_array_equal(g, np.concatenate([a, b]))
