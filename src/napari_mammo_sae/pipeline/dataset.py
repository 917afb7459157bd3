"""The dataset and loader pieces every pipeline command shares.

A VinDr-layout folder (``breast-level_annotations.csv``, ``finding_annotations.csv``,
``images/<study_id>/<image_id>.dicom``; real VinDr-Mammo or a phantom set) listed image by image
(:func:`load_dataset`, :func:`list_images`), read and preprocessed in DataLoader workers
(:class:`PreprocessedImages`, :func:`make_loader`), with the settings parsers the commands share
(:func:`parse_size`, :func:`resolve_device`). ``extract``, ``train-head``, its lesion pretext,
``probe`` and ``evaluate`` import from here and never from each other's command modules.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AnnotationError, ConfigError, DicomReadError

log = logging.getLogger(__name__)

SPLITS = ("training", "test")
CONCEPTS = ("mass", "calcification")
DEFAULT_SIZE = (1520, 912)


# --- dataset listing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageItem:
    """One image of a VinDr-layout dataset, with what the store index and the trainers need."""

    image_id: str
    study_id: str
    path: Path
    split: str
    laterality: str
    view: str
    density: str
    labels: dict[str, int] = field(default_factory=dict)  # concept -> per-image label


def image_path(root: Path, study_id: str, image_id: str) -> Path:
    """Where VinDr-Mammo keeps an image: images/<study_id>/<image_id>.dicom (or .dcm)."""
    base = root / "images" / study_id / image_id
    for suffix in (".dicom", ".dcm", ""):
        candidate = base.with_name(base.name + suffix)
        if candidate.exists():
            return candidate
    return base.with_name(base.name + ".dicom")


@dataclass
class DatasetImage:
    """One image's annotations, normalised: labels per image and per row, boxes per concept."""

    image_id: str
    study_id: str
    split: str
    laterality: str
    view: str
    density: str
    labels: dict[str, int]  # concept -> per-image label
    rows: dict[str, list[int]]  # concept -> per-row labels (Mammo-CLIP protocol)
    boxes: dict[str, list[tuple[float, float, float, float]]]  # concept -> boxes, original pixels


def load_dataset(data_dir: str | Path) -> list[DatasetImage]:
    """Every annotated image of a VinDr-layout folder, in annotation order (annotations.py)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise AnnotationError(f"no dataset folder at {root}: pass a VinDr-Mammo or phantom folder")
    from ..annotations import load_vindr

    vindr = load_vindr(root)
    out = []
    for image_id, image in vindr.images.items():
        out.append(
            DatasetImage(
                image_id=str(image_id),
                study_id=str(image.study_id),
                split=str(image.split),
                laterality=str(image.laterality),
                view=str(image.view),
                density=str(getattr(image, "density", "") or ""),
                labels={c: int(bool(image.has(c))) for c in CONCEPTS},
                rows={c: [int(v) for v in image.row_labels(c)] for c in CONCEPTS},
                boxes={c: [tuple(map(float, b)) for b in image.boxes(c)] for c in CONCEPTS},
            )
        )
    return out


def list_images(
    data_dir: str | Path, *, split: str | None = None, limit: int | None = None
) -> list[ImageItem]:
    """Every annotated image of a VinDr-layout folder, in annotation order, optionally one split."""
    root = Path(data_dir)
    if split is not None and split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    items = []
    for image in load_dataset(root):
        if split is not None and image.split != split:
            continue
        items.append(
            ImageItem(
                image_id=image.image_id,
                study_id=image.study_id,
                path=image_path(root, image.study_id, image.image_id),
                split=image.split,
                laterality=image.laterality,
                view=image.view,
                density=image.density,
                labels=dict(image.labels),
            )
        )
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise AnnotationError(
            f"no images{' in split ' + repr(split) if split else ''} in the annotations of {root}"
        )
    return items


def parse_size(text: str | Sequence[int] | None) -> tuple[int, int]:
    """'HxW' (or a pair) -> (H, W); ConfigError when malformed."""
    if text is None:
        return DEFAULT_SIZE
    if not isinstance(text, str):
        h, w = (int(v) for v in text)
        return (h, w)
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise ConfigError(
            f"input size must look like 1520x912 (height x width), got {text!r}"
        ) from exc
    if h < 32 or w < 32:
        raise ConfigError(f"input size {h}x{w} is too small: use at least 32x32")
    return (h, w)


def geometry_to_json(geometry: Any) -> str:
    """A Geometry as compact JSON (dataclass fields)."""
    return json.dumps(asdict(geometry), separators=(",", ":"))


def geometry_from_json(text: str) -> Any:
    """Rebuild a Geometry from :func:`geometry_to_json`'s text."""
    from ..geometry import Geometry

    data = json.loads(text)
    return Geometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def preprocess_record(
    record: Any, preprocess: str, size: tuple[int, int]
) -> tuple[np.ndarray, Any]:
    """(image (3, H, W) float32, geometry) of a record under a named preprocessing."""
    from ..preprocess import PREPROCESSORS

    pre = PREPROCESSORS[preprocess](record, size=size)
    return np.ascontiguousarray(pre.image, dtype=np.float32), pre.geometry


def check_preprocess(name: str) -> None:
    """ConfigError for an unknown preprocessing name."""
    if name not in ("mammoclip", "robust"):
        raise ConfigError(f"unknown preprocessing {name!r}: use mammoclip or robust")


class PreprocessedImages:
    """A torch Dataset: item i = (i, image (3, H, W) float32, geometry JSON, SOPInstanceUID) or None."""

    def __init__(
        self, items: Sequence[ImageItem], preprocess: str = "mammoclip", size=DEFAULT_SIZE
    ):
        check_preprocess(preprocess)
        self.items = list(items)
        self.preprocess = preprocess
        self.size = tuple(size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from ..dicom import read_mammogram

        item = self.items[i]
        try:
            record = read_mammogram(item.path)
        except (DicomReadError, OSError) as exc:
            log.warning("skipping image %s: %s", item.image_id, exc)
            return None
        image, geometry = preprocess_record(record, self.preprocess, self.size)
        return (i, image, geometry_to_json(geometry), record.sop_instance_uid)


def collate(batch):
    """Stack the readable items of a batch; None when none was readable."""
    import torch

    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    idx, images, geoms, uids = zip(*batch, strict=True)
    return list(idx), torch.from_numpy(np.stack(images)), list(geoms), list(uids)


def make_loader(dataset: Any, *, batch_size: int, workers: int, pin_memory: bool = False):
    """A DataLoader that decodes/preprocesses in ``workers`` processes, in order."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )


# --- run settings ------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    """'auto' -> cuda if available else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
