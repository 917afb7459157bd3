"""The HDF5 feature store: per-image backbone feature maps + an index table, streamed as tokens.

Layout of one file (format ``napari-mammo-sae/features/1``, the layout ``extract`` writes)::

    attrs: format, complete (bool, set True LAST), n_expected, n_unreadable,
           meta = JSON {feature_dim, grid [h, w], backbone_signature, feature_dtype, ...caller attrs}
    features            (N, C, h, w) fp16 (default) or fp32, chunks (1, C, h, w), growable
    index/<column>      (N,) one dataset per column: strings (utf-8) or int8 labels

Index columns: ``image_id, study_id, sop_instance_uid, split, laterality, view, density,
label_<concept> (0/1/-1 unknown) for each concept, geometry`` (geometry = JSON of geometry.Geometry).

A torchrun extraction writes one shard per rank and an index file (format ``.../shards``, attr
``shards`` = JSON list of shard file names beside it); :func:`open` accepts either.

API::

    w = store.create(path, feature_dim=C, grid=(h, w), backbone_signature=sig, dtype="float16",
                     attrs={...}, n_expected=None)   # reopens a partial store to resume
    w.has(image_id); w.append(image_id, fmap (C, h, w), {"study_id":..., "labels": {"mass": 1}, ...})
    w.close(complete=True)        # complete=False leaves it resumable and unreadable for training
    s = store.open(path)          # StoreError: missing, incomplete, corrupt
    s.index.split, s.index.image_id, ...    # numpy arrays, one entry per image
    s.feature_map(i); s.tokens(i) -> (h*w, C) float32; s.iter_images(split="training")
    for batch in s.iter_token_batches(4096, split="training", fraction=0.25, seed=49,
                                      shuffle_buffer_images=64): ...   # numpy (B, C) float32
    stream = s.token_stream(...); stream.position -> dict; stream = s.token_stream(..., start_position=pos)

Token stream: epoch e visits the split's images in a permutation drawn from (seed, e); images are
read ``shuffle_buffer_images`` at a time (a window); from each image ``fraction`` of its h*w positions
are kept at random (drawn from (seed, e, image row)), the window's tokens are shuffled (seed, e,
window) and batches are cut from the concatenation of all windows. Every draw is a pure function
of the seed and the position ``{epoch, window, offset}``, so a saved position resumes exactly;
memory is bounded by one window. ``rank``/``world`` give each rank its contiguous 1/world slice of
every global batch, so W ranks x B/W tokens see exactly the tokens 1 rank x B sees.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..errors import ConfigError, StoreError

STORE_FORMAT = "napari-mammo-sae/features/1"
SHARDS_FORMAT = STORE_FORMAT + "/shards"
CONCEPTS = ("mass", "calcification")
STRING_COLUMNS = (
    "image_id", "study_id", "sop_instance_uid", "split", "laterality", "view", "density",
)  # fmt: skip
LABEL_COLUMNS = tuple(f"label_{c}" for c in CONCEPTS)
INDEX_COLUMNS = STRING_COLUMNS + LABEL_COLUMNS + ("geometry",)
_DTYPES = {"float16": "float16", "fp16": "float16", "float32": "float32", "fp32": "float32"}


def _h5py() -> Any:
    import h5py

    return h5py


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in ("O", "S"):
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])
    return values


# --- writing ---------------------------------------------------------------------------------------
class StoreWriter:
    """Appends feature maps to one store file; the 'complete' flag is only set by close()."""

    def __init__(self, path: Path, f: Any) -> None:
        self.path = path
        self._f = f
        meta = json.loads(f.attrs["meta"])
        self.meta = meta
        self.feature_dim = int(meta["feature_dim"])
        self.grid = tuple(int(v) for v in meta["grid"])
        self._ids = set(_decode(f["index/image_id"][: len(self)]).tolist())

    def __len__(self) -> int:
        return int(self._f["features"].shape[0])

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._f is not None:
            self.close(complete=exc_type is None)

    def has(self, image_id: str) -> bool:
        """True when this image is already stored (resume skips it)."""
        return str(image_id) in self._ids

    @property
    def image_ids(self) -> set[str]:
        """Ids of the stored images."""
        return set(self._ids)

    def append(
        self, image_id: str, feature_map: Any, meta: Mapping[str, Any] | None = None
    ) -> None:
        """Store one image's (C, h, w) feature map and its index row."""
        self.append_many([feature_map], [{**(meta or {}), "image_id": image_id}])

    def append_many(self, feature_maps: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        """Store several maps (N, C, h, w) with one index row each; the index grows last."""
        feats = np.asarray(
            feature_maps.detach().cpu().numpy() if hasattr(feature_maps, "detach") else feature_maps
        )
        if feats.ndim == 3:
            feats = feats[None]
        c, (h, w) = self.feature_dim, self.grid
        if feats.shape[1:] != (c, h, w) or feats.shape[0] != len(rows):
            raise StoreError(
                f"feature maps of shape {tuple(feats.shape[1:])} do not fit {self.path.name}, which "
                f"holds {c} x {h} x {w} maps: extract into a new store for this backbone/input size"
            )
        values = {col: [] for col in INDEX_COLUMNS}
        for row in rows:
            image_id = str(row["image_id"])
            if image_id in self._ids:
                raise StoreError(f"image {image_id} is already in {self.path.name}")
            labels = dict(row.get("labels") or {})
            for col in STRING_COLUMNS:
                values[col].append(str(row.get(col, "") or ""))
            for concept, col in zip(CONCEPTS, LABEL_COLUMNS, strict=True):
                v = row.get(col, labels.get(concept, -1))
                values[col].append(int(-1 if v is None else v))
            geom = row.get("geometry", "")
            if not isinstance(geom, str):
                from dataclasses import asdict, is_dataclass

                geom = json.dumps(
                    asdict(geom) if is_dataclass(geom) else geom, separators=(",", ":")
                )
            values["geometry"].append(geom)
        f = self._f
        n, k = len(self), feats.shape[0]
        f["features"].resize(n + k, axis=0)
        f["features"][n : n + k] = feats.astype(f["features"].dtype, copy=False)
        for col in INDEX_COLUMNS:
            ds = f[f"index/{col}"]
            ds.resize(n + k, axis=0)
            ds[n : n + k] = values[col]
        f.flush()
        self._ids.update(values["image_id"])

    def close(self, complete: bool = True, *, n_unreadable: int = 0) -> None:
        """Close the file; with complete=True the store becomes readable by training."""
        if self._f is None:
            return
        try:
            if complete:
                self._f.attrs["n_unreadable"] = int(n_unreadable)
                self._f.flush()
                self._f.attrs["complete"] = True
                self._f.flush()
        finally:
            self._f.close()
            self._f = None


def create(
    path: str | Path,
    *,
    feature_dim: int,
    grid: tuple[int, int],
    backbone_signature: str,
    dtype: str = "float16",
    attrs: Mapping[str, Any] | None = None,
    n_expected: int | None = None,
) -> StoreWriter:
    """Create a store, or reopen a partial/complete one made the same way to append (resume)."""
    h5py = _h5py()
    path = Path(path)
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown feature dtype {dtype!r}: use float16 or float32")
    dtype = _DTYPES[dtype]
    meta = {
        **dict(attrs or {}),
        "feature_dim": int(feature_dim),
        "grid": [int(grid[0]), int(grid[1])],
        "backbone_signature": str(backbone_signature),
        "feature_dtype": dtype,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            f = h5py.File(path, "a")
        except OSError as exc:
            raise StoreError(
                f"{path.name} exists but is not a readable HDF5 store ({exc}): delete it or pick "
                "another output path"
            ) from exc
        if f.attrs.get("format") != STORE_FORMAT:
            f.close()
            raise StoreError(f"{path.name} is not a feature store: delete it or pick another path")
        old = json.loads(f.attrs["meta"])
        for key in ("feature_dim", "grid", "backbone_signature", "feature_dtype") + tuple(
            k for k in ("preprocess", "input_size", "hook") if k in meta
        ):
            if old.get(key) != meta.get(key):
                f.close()
                raise StoreError(
                    f"{path.name} was made with another {key.replace('_', ' ')} "
                    f"({old.get(key)!r} vs {meta.get(key)!r}): pick another path for a new store"
                )
        f.attrs["complete"] = False
        if n_expected is not None:
            f.attrs["n_expected"] = int(n_expected)
        f.flush()
        return StoreWriter(path, f)
    f = h5py.File(path, "w")
    f.attrs["format"] = STORE_FORMAT
    f.attrs["complete"] = False
    f.attrs["n_expected"] = int(n_expected) if n_expected is not None else -1
    f.attrs["meta"] = json.dumps(meta)
    c, (h, w) = int(feature_dim), grid
    f.create_dataset(
        "features", shape=(0, c, h, w), maxshape=(None, c, h, w), chunks=(1, c, h, w), dtype=dtype
    )
    str_dt = h5py.string_dtype()
    for col in INDEX_COLUMNS:
        dt = "i1" if col in LABEL_COLUMNS else str_dt
        f.create_dataset(f"index/{col}", shape=(0,), maxshape=(None,), dtype=dt, chunks=(256,))
    f.flush()
    return StoreWriter(path, f)


def join_shards(out: str | Path, shards: Sequence[str | Path]) -> Path | None:
    """Write ``out`` as an index joining per-rank shard files once all are complete (else None)."""
    h5py = _h5py()
    out = Path(out)
    for shard in shards:
        try:
            with h5py.File(shard, "r") as f:
                if not bool(f.attrs.get("complete", False)):
                    return None
        except OSError:
            return None
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = SHARDS_FORMAT
        f.attrs["shards"] = json.dumps([Path(s).name for s in shards])
        f.attrs["complete"] = True
    tmp.replace(out)
    return out


# --- reading ---------------------------------------------------------------------------------------
class FeatureStore:
    """A complete store (single file or shard index) opened for reading."""

    def __init__(self, path: Path, files: list[Any]) -> None:
        self.path = path
        self._files = files
        self.meta = json.loads(files[0].attrs["meta"])
        self.feature_dim = int(self.meta["feature_dim"])
        self.grid = tuple(int(v) for v in self.meta["grid"])
        self.backbone = str(self.meta.get("backbone", ""))
        self.backbone_signature = str(self.meta.get("backbone_signature", ""))
        #: the backbone layer the maps come from (models.backbone hook point; older stores: head)
        self.hook = str(self.meta.get("hook") or "head")
        cols: dict[str, list[np.ndarray]] = {}
        where: list[np.ndarray] = []
        for k, f in enumerate(files):
            fm = json.loads(f.attrs["meta"])
            if int(fm["feature_dim"]) != self.feature_dim or list(fm["grid"]) != list(self.grid):
                raise StoreError(
                    f"the shards of {path.name} hold different feature shapes: extract them again"
                )
            n = int(f["features"].shape[0])
            for col in f["index"]:
                values = f["index"][col][:n]
                if len(values) != n:
                    raise StoreError(f"{path.name}: index column {col} is shorter than the maps")
                cols.setdefault(col, []).append(_decode(values))
            where.append(np.stack([np.full(n, k), np.arange(n)], axis=1))
        self._where = np.concatenate(where) if where else np.zeros((0, 2), dtype=np.int64)
        self.index = SimpleNamespace(**{c: np.concatenate(v) for c, v in cols.items()})
        self.store = self  # probe/evaluate compatibility

    def __len__(self) -> int:
        return int(self._where.shape[0])

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokens_per_image(self) -> int:
        """Patch positions per image (h*w)."""
        return self.grid[0] * self.grid[1]

    def rows(self, split: str | None = None) -> np.ndarray:
        """Row numbers of a split (every row for None); ConfigError for an unknown split."""
        if split is None:
            return np.arange(len(self))
        if split not in ("training", "test"):
            raise ConfigError(f"unknown split {split!r}: use training or test")
        return np.nonzero(self.index.split == split)[0]

    def labels(self, concept: str) -> np.ndarray:
        """Per-image labels of a concept (0/1, -1 unknown), one per row."""
        if concept not in CONCEPTS:
            raise ConfigError(f"unknown concept {concept!r}: use one of {', '.join(CONCEPTS)}")
        return np.asarray(getattr(self.index, f"label_{concept}"), dtype=np.int64)

    def feature_map(self, row: int) -> np.ndarray:
        """One image's (C, h, w) feature map as float32."""
        k, i = self._where[int(row)]
        return np.asarray(self._files[int(k)]["features"][int(i)], dtype=np.float32)

    def tokens(self, row: int) -> np.ndarray:
        """One image's patch tokens (h*w, C) float32, row-major over the grid."""
        fmap = self.feature_map(row)
        return np.ascontiguousarray(fmap.reshape(fmap.shape[0], -1).T)

    def iter_maps(self, rows: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (row, feature map) for the given rows, in order."""
        for row in rows:
            yield int(row), self.feature_map(int(row))

    def iter_images(self, split: str | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (row, feature map) for every image of a split, in store order."""
        return self.iter_maps(self.rows(split))

    def geometry(self, row: int) -> Any:
        """The geometry.Geometry of one image (feature grid -> original pixels)."""
        from ..geometry import Geometry

        data = json.loads(str(self.index.geometry[int(row)]))
        return Geometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def token_stream(self, batch_size: int, **kwargs: Any) -> TokenStream:
        """A resumable token stream (see the module docstring)."""
        return TokenStream(self, batch_size, **kwargs)

    def iter_token_batches(self, batch_size: int, **kwargs: Any) -> Iterator[np.ndarray]:
        """Yield shuffled (B, C) float32 token batches with bounded memory (see TokenStream)."""
        return iter(TokenStream(self, batch_size, **kwargs))

    def close(self) -> None:
        """Close the underlying files."""
        for f in self._files:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing twice is harmless
                pass


def open(path: str | Path) -> FeatureStore:  # noqa: A001 - store.open reads naturally
    """Open a complete store (file or shard index); StoreError if missing, incomplete or corrupt."""
    h5py = _h5py()
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no feature store at {path}: run 'napari-mammo-sae extract' first")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(
            f"{path.name} is not a readable feature store ({exc}): run 'extract' again"
        ) from exc
    fmt = f.attrs.get("format")
    files = [f]
    if fmt == SHARDS_FORMAT:
        names = json.loads(f.attrs["shards"])
        f.close()
        files = []
        for name in names:
            try:
                files.append(h5py.File(path.with_name(name), "r"))
            except OSError as exc:
                for g in files:
                    g.close()
                raise StoreError(
                    f"shard {name} of {path.name} is missing or unreadable: run 'extract' again"
                ) from exc
    elif fmt != STORE_FORMAT:
        f.close()
        raise StoreError(f"{path.name} is not a feature store written by 'extract'")
    for g in files:
        if not bool(g.attrs.get("complete", False)):
            for h in files:
                h.close()
            raise StoreError(
                f"{path.name} is incomplete (an extraction was interrupted): run the same "
                "'extract' command again to finish it"
            )
    try:
        return FeatureStore(path, files)
    except (KeyError, ValueError, OSError) as exc:
        for g in files:
            g.close()
        raise StoreError(f"{path.name} is corrupt ({exc}): run 'extract' again") from exc


# --- token stream ----------------------------------------------------------------------------------
class TokenStream:
    """Shuffled token batches over epochs; ``position`` can be saved and passed back to resume.

    Yields (B/world, C) float32 numpy arrays (rank's slice of each global batch of size B), forever
    unless ``epochs`` is given. ``epoch_tokens`` is the number of tokens in one epoch.
    """

    def __init__(
        self,
        store: FeatureStore,
        batch_size: int,
        *,
        split: str | None = "training",
        fraction: float = 0.25,
        seed: int = 49,
        shuffle_buffer_images: int = 64,
        start_position: Mapping[str, int] | None = None,
        epochs: int | None = None,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1 or batch_size % world:
            raise ConfigError(
                f"batch size {batch_size} must be a positive multiple of the {world} processes"
            )
        if not 0 < fraction <= 1:
            raise ConfigError(f"token fraction must be in (0, 1], got {fraction}")
        self.store = store
        self.batch_size = int(batch_size)
        self.rows = store.rows(split)
        if len(self.rows) == 0:
            raise StoreError(f"{store.path.name} holds no {split or ''} images to train on")
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.buffer = max(1, int(shuffle_buffer_images))
        self.epochs = epochs
        self.rank, self.world = int(rank), int(world)
        self.drop_last = drop_last
        self.per_image = max(1, int(round(self.fraction * store.tokens_per_image)))
        self.epoch_tokens = self.per_image * len(self.rows)
        self.n_windows = -(-len(self.rows) // self.buffer)
        pos = dict(start_position or {})
        self._epoch = int(pos.get("epoch", 0))
        self._window = int(pos.get("window", 0))
        self._offset = int(pos.get("offset", 0))
        self.batches_yielded = int(pos.get("batches", 0))
        self._cache: tuple[tuple[int, int], np.ndarray] | None = None

    @property
    def position(self) -> dict[str, int]:
        """Where the next batch starts: {epoch, window, offset, batches} (JSON-serialisable)."""
        return {
            "epoch": self._epoch,
            "window": self._window,
            "offset": self._offset,
            "batches": self.batches_yielded,
        }

    def _window_tokens(self, epoch: int, window: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == (epoch, window):
            return self._cache[1]
        order = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        rows = order[window * self.buffer : (window + 1) * self.buffer]
        hw = self.store.tokens_per_image
        parts = []
        for row in rows:
            keep = np.random.default_rng([self.seed, epoch, int(row)]).permutation(hw)
            keep = np.sort(keep[: self.per_image])
            parts.append(self.store.tokens(int(row))[keep])
        tokens = np.concatenate(parts)
        perm = np.random.default_rng([self.seed, epoch, window, 1]).permutation(len(tokens))
        tokens = tokens[perm]
        self._cache = ((epoch, window), tokens)
        return tokens

    def next_global(self) -> np.ndarray | None:
        """The next global (B, C) batch, or None at the end of the last epoch."""
        need, parts = self.batch_size, []
        epoch, window, offset = self._epoch, self._window, self._offset
        while need:
            if self.epochs is not None and epoch >= self.epochs:
                break
            tokens = self._window_tokens(epoch, window)
            take = tokens[offset : offset + need]
            parts.append(take)
            need -= len(take)
            offset += len(take)
            if offset >= len(tokens):
                window, offset = window + 1, 0
                if window >= self.n_windows:
                    epoch, window = epoch + 1, 0
        if need and (self.drop_last or not parts):
            return None
        self._epoch, self._window, self._offset = epoch, window, offset
        self.batches_yielded += 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def next_batch(self) -> np.ndarray | None:
        """This rank's slice of the next global batch (None at the end)."""
        batch = self.next_global()
        if batch is None or self.world == 1:
            return batch
        per = self.batch_size // self.world
        return batch[self.rank * per : (self.rank + 1) * per]

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch
