"""Annotation loaders: VinDr-Mammo CSVs (real or phantom), the phantom's confounder boxes, and a
generic box CSV for users' own annotations. Qt-free.

VinDr-Mammo quirks handled: ``finding_categories`` is a Python-list string (``"['Mass']"``, several
categories in one row, ``"['No Finding']"``); ``finding_birads`` may be empty; boxes are empty (or
``nan``) on No Finding rows and may run past the image edge (kept as written unless ``clip_boxes``).
Rows that cannot be parsed are never dropped silently: they are counted in ``.skipped`` (file, line,
reason) and logged once as a summary.

Two label protocols (SPEC section 3):

* per image: positive if any finding of the image lists the concept (:meth:`ImageAnnotation.has`);
* per row, as Mammo-CLIP and the Mammo-SAE paper train and score: one label per finding row, an image
  with k findings counts k times, an image without findings once (:meth:`ImageAnnotation.row_labels`).
"""

from __future__ import annotations

import ast
import csv
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AnnotationError

logger = logging.getLogger(__name__)

#: concept key -> VinDr-Mammo finding category
CONCEPTS = {"mass": "Mass", "calcification": "Suspicious Calcification"}
NO_FINDING = "No Finding"
BREAST_FILE = "breast-level_annotations.csv"
FINDING_FILE = "finding_annotations.csv"
CONFOUNDER_FILE = "confounder_annotations.csv"
IMAGE_COLUMNS = ("study_id", "image_id", "laterality", "view_position", "height", "width")
FINDING_COLUMNS = ("finding_categories", "xmin", "ymin", "xmax", "ymax")
BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")

Box = tuple[float, float, float, float]


def concept_category(concept: str) -> str:
    """'mass' -> 'Mass'; a category name ('Mass', 'Architectural Distortion') passes through."""
    return CONCEPTS.get(concept, concept)


@dataclass(frozen=True)
class Finding:
    """One finding row: its categories, box (xmin, ymin, xmax, ymax; original pixels) and BI-RADS."""

    category: str  # the first category of the row
    box: Box | None
    birads: str | None
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.categories:
            object.__setattr__(self, "categories", (self.category,))

    def has(self, concept: str) -> bool:
        """Whether this row lists the concept (key such as 'mass' or a category name)."""
        return concept_category(concept) in self.categories


@dataclass
class ImageAnnotation:
    """One image's breast-level record and its findings (No Finding rows are not findings)."""

    study_id: str
    image_id: str
    laterality: str
    view: str
    height: int
    width: int
    split: str
    breast_birads: str
    density: str
    findings: list[Finding] = field(default_factory=list)
    series_id: str = ""

    def has(self, concept: str) -> bool:
        """Per-image label: any finding lists the concept."""
        return any(f.has(concept) for f in self.findings)

    def boxes(self, concept: str | None = None) -> list[Box]:
        """Boxes of the findings that list the concept (all findings when None)."""
        return [
            f.box
            for f in self.findings
            if f.box is not None and (concept is None or f.has(concept))
        ]

    def row_labels(self, concept: str) -> list[int]:
        """Per-row labels (Mammo-CLIP protocol): one per finding row; one 0 without findings."""
        if not self.findings:
            return [0]
        return [int(f.has(concept)) for f in self.findings]


@dataclass
class VindrAnnotations:
    """Images of a VinDr-layout dataset, in file order, plus what could not be read."""

    images: dict[str, ImageAnnotation]
    skipped: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, reason)
    root: Path | None = None

    def split(self, name: str) -> list[ImageAnnotation]:
        """The images of one split ('training' or 'test')."""
        return [im for im in self.images.values() if im.split == name]

    def __len__(self) -> int:
        return len(self.images)


def image_labels(ann: VindrAnnotations, concept: str, split: str | None = None) -> dict[str, int]:
    """image_id -> per-image label (positive if any finding of the image lists the concept)."""
    return {
        i: int(im.has(concept))
        for i, im in ann.images.items()
        if split is None or im.split == split
    }


def row_labels(
    ann: VindrAnnotations, concept: str, split: str | None = None
) -> list[tuple[str, int]]:
    """(image_id, label) per finding row, the Mammo-CLIP/paper protocol."""
    return [
        (i, label)
        for i, im in ann.images.items()
        if split is None or im.split == split
        for label in im.row_labels(concept)
    ]


# --- parsing -----------------------------------------------------------------------------------
def _read_rows(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise AnnotationError(
                    f"{path.name} lacks column(s) {', '.join(missing)}: expected a VinDr-Mammo "
                    f"annotation file with columns {', '.join(required)}"
                )
            reader.fieldnames = header
            return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]
    except OSError as exc:
        raise AnnotationError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path.name} is not a readable CSV file: {exc}") from exc


def parse_categories(text: str) -> tuple[str, ...]:
    """ "['Mass', 'Suspicious Calcification']" -> ('Mass', 'Suspicious Calcification')."""
    text = (text or "").strip()
    if not text:
        raise ValueError("empty finding_categories")
    if text.startswith("["):
        value = ast.literal_eval(text)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"finding_categories is not a list of names: {text!r}")
        return tuple(v.strip() for v in value)
    return (text,)  # a bare category name


def parse_box(row: dict[str, str]) -> Box | None:
    """The row's box, or None when every coordinate is empty or NaN; ValueError when partial."""
    raw = [row.get(k, "") for k in BOX_COLUMNS]
    vals = [float(v) if v not in ("", None) else math.nan for v in raw]
    if all(math.isnan(v) for v in vals):
        return None
    if any(math.isnan(v) or math.isinf(v) for v in vals):
        raise ValueError(f"incomplete box {raw}")
    x0, y0, x1, y1 = vals
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box with xmax < xmin or ymax < ymin: {raw}")
    return (x0, y0, x1, y1)


def _clip(box: Box, width: int, height: int) -> Box:
    x0, y0, x1, y1 = box
    return (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))


def _image_from_row(row: dict[str, str]) -> ImageAnnotation:
    return ImageAnnotation(
        study_id=row["study_id"],
        image_id=row["image_id"],
        laterality=row["laterality"].upper(),
        view=row["view_position"].upper(),
        height=int(float(row["height"])),
        width=int(float(row["width"])),
        split=row.get("split", ""),
        breast_birads=row.get("breast_birads", ""),
        density=row.get("breast_density", ""),
        series_id=row.get("series_id", ""),
    )


def load_vindr(root_or_csv: str | Path, *, clip_boxes: bool = False) -> VindrAnnotations:
    """Read a VinDr-Mammo folder (or one of its two CSVs) into per-image records."""
    path = Path(root_or_csv)
    if path.is_dir():
        root, breast, finding = path, path / BREAST_FILE, path / FINDING_FILE
        if not finding.exists() and not breast.exists():
            raise AnnotationError(
                f"{path} holds neither {BREAST_FILE} nor {FINDING_FILE}: pass a VinDr-Mammo or "
                "phantom dataset folder"
            )
    elif path.is_file():
        root = path.parent
        if (
            path.name == BREAST_FILE
            or "finding_categories"
            not in path.read_text(encoding="utf-8-sig", errors="replace").split("\n", 1)[0]
        ):
            breast, finding = path, None
        else:
            breast, finding = None, path
    else:
        raise AnnotationError(f"no annotation file or folder at {path}")
    if breast is not None and not breast.exists():
        breast = None
    if finding is not None and not finding.exists():
        finding = None

    images: dict[str, ImageAnnotation] = {}
    skipped: list[tuple[str, int, str]] = []
    if breast is not None:
        for line, row in enumerate(_read_rows(breast, IMAGE_COLUMNS), start=2):
            try:
                image = _image_from_row(row)
            except (ValueError, KeyError) as exc:
                skipped.append((breast.name, line, f"bad image record: {exc}"))
                continue
            if image.image_id in images:
                skipped.append((breast.name, line, f"duplicate image {image.image_id}"))
                continue
            images[image.image_id] = image
    if finding is not None:
        unknown: list[str] = []
        for line, row in enumerate(_read_rows(finding, IMAGE_COLUMNS + FINDING_COLUMNS), start=2):
            image_id = row["image_id"]
            image = images.get(image_id)
            if image is None:
                if breast is not None:
                    unknown.append(image_id)
                    continue
                try:
                    image = images[image_id] = _image_from_row(row)
                except (ValueError, KeyError) as exc:
                    skipped.append((finding.name, line, f"bad image record: {exc}"))
                    continue
            try:
                cats = parse_categories(row["finding_categories"])
                box = parse_box(row)
            except (ValueError, SyntaxError) as exc:
                skipped.append((finding.name, line, str(exc)))
                continue
            real = tuple(c for c in cats if c != NO_FINDING)
            if not real:
                continue  # the image's No Finding row
            if box is not None and clip_boxes:
                box = _clip(box, image.width, image.height)
            image.findings.append(Finding(real[0], box, row.get("finding_birads") or None, real))
        if unknown:
            raise AnnotationError(
                f"{finding.name} names {len(unknown)} image(s) that {BREAST_FILE} lacks "
                f"(first: {unknown[0]}): use the two files of the same dataset"
            )
    if skipped:
        logger.warning(
            "%d annotation row(s) skipped (first: %s line %d: %s)", len(skipped), *skipped[0]
        )
    if not images:
        raise AnnotationError(f"no images in the annotations at {path}")
    return VindrAnnotations(images=images, skipped=skipped, root=root)


def load_confounders(root: str | Path) -> dict[str, list[Box]]:
    """image_id -> boxes of the phantom's planted marker (empty dict when the file is absent)."""
    root = Path(root)
    path = root / CONFOUNDER_FILE if root.is_dir() else root
    if not path.exists():
        return {}
    out: dict[str, list[Box]] = {}
    for line, row in enumerate(_read_rows(path, ("image_id",) + BOX_COLUMNS), start=2):
        try:
            box = parse_box(row)
        except ValueError as exc:
            raise AnnotationError(f"{path.name} line {line}: {exc}") from exc
        if box is not None:
            out.setdefault(row["image_id"], []).append(box)
    return out


@dataclass(frozen=True)
class BoxAnnotation:
    """A user's box: which image (file path or SOP Instance UID), where, and a label."""

    box: Box
    label: str
    path: Path | None = None
    sop_instance_uid: str | None = None


PATH_COLUMNS = ("path", "file", "filename", "file_path")
UID_COLUMNS = ("SOPInstanceUID", "sop_instance_uid", "sop_uid")


def load_box_csv(path: str | Path) -> list[BoxAnnotation]:
    """Generic box CSV: (path | SOPInstanceUID), xmin, ymin, xmax, ymax, label (original pixels).

    Relative paths are taken relative to the CSV's folder.
    """
    path = Path(path)
    rows = _read_rows(path, BOX_COLUMNS)
    if not rows:
        return []
    header = list(rows[0])
    key = next((c for c in PATH_COLUMNS + UID_COLUMNS if c in header), None)
    if key is None:
        raise AnnotationError(
            f"{path.name} needs a 'path' or 'SOPInstanceUID' column naming the image of each box"
        )
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            box = parse_box(row)
        except ValueError as exc:
            raise AnnotationError(f"{path.name} line {line}: {exc}") from exc
        if box is None:
            raise AnnotationError(f"{path.name} line {line}: empty box")
        if not row.get(key):
            raise AnnotationError(f"{path.name} line {line}: no image in column {key!r}")
        label = row.get("label", "")
        if key in PATH_COLUMNS:
            p = Path(row[key])
            out.append(BoxAnnotation(box, label, path=p if p.is_absolute() else path.parent / p))
        else:
            out.append(BoxAnnotation(box, label, sop_instance_uid=row[key]))
    return out
