"""Realistic shortcuts ("cues") a phantom can carry besides the baseline skin marker.

Each cue is optional, has its own truth boxes (``<cue>_annotations.csv``, the columns of
``confounder_annotations.csv``: image_id, study_id, xmin, ymin, xmax, ymax, kind) and, like the
marker, a label correlation in the training split that is absent from the test split:

* ``lead`` - the lead marker a technologist tapes on a palpable lump: a hollow metal triangle with
  sharp edges (6-10 mm a side) on the skin, 1-5 mm inside the skin line; on an image with a mass it
  sits on the skin at the level of the mass (clear of the mass box by 3 mm), else anywhere on the
  skin. Default concept: mass.
* ``clip`` - a biopsy/localisation clip: a small, very bright metal ribbon with bent ends (2-6 mm)
  inside the breast, anywhere clear of the findings by 3 mm (a clip marks an earlier biopsy site,
  not necessarily today's finding). Default concept: calcification.
* ``site`` - images from one simulated site: its own intensity processing (an unsharp mask and a
  flatter tone curve over the whole image) and its burned-in label text in the air at the corner on
  the nipple side, where the Mammo-CLIP breast crop keeps it. The box is the text. A site acquires
  whole studies, so the site is decided per STUDY: in training a study that holds an image positive
  for the concept comes from the site with ``pos_rate``, any other with ``neg_rate`` (a site with a
  higher prevalence); in test every study with ``test_rate``. Default concept: mass.

Rates of ``lead`` and ``clip`` are per image, as the marker's: in training ``pos_rate`` of the
images positive for the concept and ``neg_rate`` of the others; in test ``test_rate`` of all images.
Every cue is drawn with random generators of its own, so a dataset without these cues is byte for
byte what it was before they existed, and adding one changes no pixel outside its box (``site``
excepted: its processing covers the image by design).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .lesions import Patch

#: cue name -> default concept it is correlated with in training
CUE_CONCEPTS = {"lead": "mass", "clip": "calcification", "site": "mass"}
#: cue name -> default (pos_rate, neg_rate, test_rate)
CUE_RATES = {"lead": (0.6, 0.05, 0.3), "clip": (0.6, 0.05, 0.3), "site": (0.6, 0.15, 0.3)}
#: cue name -> decided per "image" or per "study"
CUE_UNIT = {"lead": "image", "clip": "image", "site": "study"}
#: the order cues are drawn in (lead and clip are objects on the breast; the site's text is burned
#: in after its processing)
CUE_ORDER = ("lead", "clip", "site")
METADATA_FILE = "phantom.json"
MARKER_FILE = "confounder_annotations.csv"
METAL = 1.5  # display units added in linear space: saturates the detector, as lead and steel do
SITE_TEXT = "SITE B"
TEXT_VALUE = 0.9


def annotation_file(name: str) -> str:
    """``<cue>_annotations.csv`` (the baseline marker keeps ``confounder_annotations.csv``)."""
    return MARKER_FILE if name == "marker" else f"{name}_annotations.csv"


@dataclass(frozen=True)
class CueSpec:
    """One optional cue: which, the concept it is correlated with in training, and its rates."""

    name: str
    concept: str = ""
    pos_rate: float = -1.0
    neg_rate: float = -1.0
    test_rate: float = -1.0

    def __post_init__(self) -> None:
        if self.name not in CUE_CONCEPTS:
            raise ConfigError(f"unknown cue {self.name!r}: use one of {', '.join(CUE_CONCEPTS)}")
        if not self.concept:
            object.__setattr__(self, "concept", CUE_CONCEPTS[self.name])
        for field_name, default in zip(
            ("pos_rate", "neg_rate", "test_rate"), CUE_RATES[self.name], strict=True
        ):
            if getattr(self, field_name) < 0:
                object.__setattr__(self, field_name, default)

    def validate(self) -> None:
        """Raise ConfigError for a concept or rate that cannot make a dataset."""
        if self.concept not in ("mass", "calcification"):
            raise ConfigError(f"--cue {self.name}: the concept must be mass or calcification")
        for name in ("pos_rate", "neg_rate", "test_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--cue {self.name}: rates must be between 0 and 1")

    def rate(self, split: str, positive: bool) -> float:
        """Probability of the cue for an image (a study, for ``site``) of this split and label."""
        if split != "training":
            return self.test_rate
        return self.pos_rate if positive else self.neg_rate

    def describe(self) -> dict:
        """What the dataset metadata records about this cue."""
        return {
            "concept": self.concept,
            "unit": CUE_UNIT[self.name],
            "file": annotation_file(self.name),
            "rates": {
                "training": {"positive": self.pos_rate, "negative": self.neg_rate},
                "test": {"any": self.test_rate},
            },
        }


def parse_cue(text: str) -> CueSpec:
    """``NAME[@CONCEPT][:POS,NEG,TEST]`` (the CLI's ``--cue``), e.g. ``lead``, ``clip:0.7,0,0.3``,
    ``site@calcification:0.5,0.1,0.25``."""
    head, _, rates = text.partition(":")
    name, _, concept = head.partition("@")
    values: list[float] = []
    if rates:
        try:
            values = [float(v) for v in rates.split(",")]
        except ValueError:
            values = []
        if len(values) != 3:
            raise ConfigError(
                f"--cue {text}: rates are three numbers POS,NEG,TEST (e.g. {name}:0.6,0.05,0.3)"
            )
    spec = CueSpec(name.strip(), concept.strip(), *values)
    spec.validate()
    return spec


# --- drawing -------------------------------------------------------------------------------------
def _polyline(points_px: np.ndarray, half_width: float, closed: bool = False) -> Patch:
    """A metal wire along a polyline (pixels, row/col), anti-aliased by distance; footprint is every
    pixel it changes, so the box covers the whole object."""
    pts = np.asarray(points_px, np.float64)
    if closed:
        pts = np.vstack([pts, pts[:1]])
    reach = half_width + 1.5
    lo = np.floor(pts.min(0) - reach).astype(int)
    hi = np.ceil(pts.max(0) + reach).astype(int)
    rr = np.arange(lo[0], hi[0] + 1, dtype=np.float64)[:, None] + 0.5
    cc = np.arange(lo[1], hi[1] + 1, dtype=np.float64)[None, :] + 0.5
    dist = np.full((rr.size, cc.size), np.inf)
    for a, b in zip(pts[:-1], pts[1:], strict=True):
        d = b - a
        length2 = float(d @ d) or 1e-9
        t = np.clip(((rr - a[0]) * d[0] + (cc - a[1]) * d[1]) / length2, 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(rr - (a[0] + t * d[0]), cc - (a[1] + t * d[1])))
    cover = np.clip(half_width - dist + 0.5, 0.0, 1.0).astype(np.float32)
    # trimmed to the pixels it changes: the patch's rectangle is its box
    rows = np.nonzero(cover.any(axis=1))[0]
    cols = np.nonzero(cover.any(axis=0))[0]
    cover = cover[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    centre = (float(-lo[0] - rows[0]), float(-lo[1] - cols[0]))
    return Patch(METAL * cover, cover > 0, centre)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def render_lead_marker(size_mm: float, spacing_mm: float, rng: np.random.Generator) -> Patch:
    """A hollow lead triangle (side ``size_mm``, wire about 0.8 mm), randomly turned."""
    r = size_mm / math.sqrt(3.0) / spacing_mm  # circumradius in pixels
    ang = rng.uniform(0, 2 * math.pi / 3)
    corners = np.array(
        [[r * math.sin(ang + k * 2 * math.pi / 3), r * math.cos(ang + k * 2 * math.pi / 3)]
         for k in range(3)]
    )  # fmt: skip
    return _polyline(corners, max(0.5, 0.4 / spacing_mm), closed=True)


def render_clip(length_mm: float, spacing_mm: float, rng: np.random.Generator) -> Patch:
    """A biopsy clip: a metal ribbon ``length_mm`` long (0.5 mm wide) with both ends bent back."""
    half = 0.5 * length_mm / spacing_mm
    leg = 0.3 * length_mm / spacing_mm * rng.uniform(0.7, 1.0)
    side = 1.0 if rng.random() < 0.5 else -1.0  # a U or a Z
    pts = np.array([[leg, -half], [0.0, -half], [0.0, half], [leg * side, half]])
    pts = _rotate(pts - pts.mean(0), rng.uniform(0, 2 * math.pi))
    return _polyline(pts, max(0.5, 0.25 / spacing_mm))


#: 5 x 7 bitmaps of the site's burned-in text
TEXT_GLYPHS = {
    "S": ["01111", "10000", "10000", "01110", "00001", "00001", "11110"],
    "I": ["11111", "00100", "00100", "00100", "00100", "00100", "11111"],
    "T": ["11111", "00100", "00100", "00100", "00100", "00100", "00100"],
    "E": ["11111", "10000", "10000", "11110", "10000", "10000", "11111"],
    "B": ["11110", "10001", "10001", "11110", "10001", "10001", "11110"],
    " ": ["00000"] * 7,
}


def text_bitmap(text: str, spacing_mm: float, cell_mm: float = 0.7) -> np.ndarray:
    """Boolean bitmap of ``text`` in the 5 x 7 font, one glyph cell about ``cell_mm`` square."""
    k = max(1, int(round(cell_mm / spacing_mm)))
    cols = []
    for i, ch in enumerate(text):
        glyph = np.array([[c == "1" for c in row] for row in TEXT_GLYPHS[ch]])
        if i:
            cols.append(np.zeros((7, 1), bool))
        cols.append(glyph)
    bitmap = np.hstack(cols)
    return np.kron(bitmap, np.ones((k, k), bool))


def site_processing(img: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The simulated site's own processing: unsharp mask (2 mm, amount 0.6), then a flatter tone
    curve (power 0.8, gain 1.03). Works on display intensities (dense = bright)."""
    from scipy import ndimage

    from .anatomy import upsample

    h, w = img.shape
    f = max(1, int(round(0.5 / spacing_mm)))  # blur on a 0.5 mm grid: cheap at full size
    ph, pw = -(-h // f) * f, -(-w // f) * f
    padded = np.pad(img, ((0, ph - h), (0, pw - w)), mode="edge")
    small = padded.reshape(ph // f, f, pw // f, f).mean(axis=(1, 3))
    small = ndimage.gaussian_filter(small, 2.0 / (spacing_mm * f), truncate=2.5)
    blur = upsample(small.astype(np.float32), f, (h, w))
    out = img + np.float32(0.6) * (img - blur)
    np.maximum(out, 0.0, out=out)
    out **= np.float32(0.8)
    out *= np.float32(1.03)
    return out.astype(np.float32)


# --- placement (canonical frame: chest wall on the left) ---------------------------------------
def _border(spacing: float) -> int:
    """Pixels kept free at the image border: Mammo-CLIP's 5-pixel trim plus 3 mm."""
    return 5 + int(math.ceil(3.0 / spacing))


def _clear(box, avoid, keep: float) -> bool:
    return not any(
        box[0] < b[2] + keep
        and b[0] < box[2] + keep
        and box[1] < b[3] + keep
        and b[1] < box[3] + keep
        for b in avoid
    )


def place_on_skin(
    outline,
    size: tuple[int, int],
    spacing: float,
    rng: np.random.Generator,
    avoid: list,
    near_row: float | None = None,
) -> tuple[int, int] | None:
    """Top-left corner of a (rows, cols) object on the skin, 1-5 mm inside the skin line, clear of
    the nipple and of ``avoid`` boxes by 3 mm; near ``near_row`` when given (widening search)."""
    bh, bw = size
    valid = np.nonzero(outline.edge > bw * 2)[0]
    if valid.size == 0:
        return None
    keep = 3.0 / spacing
    border = _border(spacing)
    lo, hi = int(valid.min()), max(int(valid.min()) + 1, int(valid.max()) - bh)
    for t in range(160):
        if near_row is not None and t < 100:
            r = int(round(near_row + rng.normal(0.0, (4.0 + t / 2.0) / spacing) - bh / 2))
        else:
            r = int(rng.integers(lo, hi))
        if r < border or r + bh > len(outline.edge) - border:
            continue
        if abs(r + bh / 2 - outline.nipple[0]) < outline.nipple_radius + bh / 2 + keep:
            continue
        seg = outline.edge[r : r + bh]
        if seg.size < bh or (seg <= 0).any():
            continue
        c = int(math.floor(seg.min() - bw - rng.uniform(1.0, 5.0) / spacing))
        box = (float(c), float(r), float(c + bw), float(r + bh))
        if outline.box_inside(box, 1.0) and _clear(box, avoid, keep):
            return r, c
    return None


def place_inside(
    outline, size: tuple[int, int], spacing: float, rng: np.random.Generator, avoid: list
) -> tuple[int, int] | None:
    """Top-left corner of a (rows, cols) object anywhere inside the breast (not in the muscle),
    1 mm from the skin and muscle, clear of ``avoid`` boxes by 3 mm and of the image border (which
    the Mammo-CLIP crop trims)."""
    bh, bw = size
    border = _border(spacing)
    rows = np.nonzero(outline.edge > bw + 4.0 / spacing + border)[0]
    rows = rows[(rows >= border) & (rows < len(outline.edge) - bh - border)]
    if rows.size == 0:
        return None
    keep, margin = 3.0 / spacing, 1.0 / spacing
    for _ in range(160):
        r = int(rng.choice(rows))
        lo = max(float(outline.pectoral[r]) + margin, border)
        hi = float(outline.edge[r]) - bw - margin
        if hi <= lo:
            continue
        c = int(rng.uniform(lo, hi))
        box = (float(c), float(r), float(c + bw), float(r + bh))
        if outline.box_inside(box, margin) and _clear(box, avoid, keep):
            return r, c
    return None


def place_text(outline, size: tuple[int, int], spacing: float, rng: np.random.Generator, avoid):
    """Top-left corner of the site's text in the air at the nipple-side corner of the breast (top or
    bottom), in rows where the breast is at least a quarter of its depth wide so the Mammo-CLIP
    crop keeps it, 4 mm clear of the skin and of the image border (which that crop trims)."""
    th, tw = size
    cmax = float(outline.edge.max())
    gap = 4.0 / spacing
    border = _border(spacing)
    c0 = int(math.floor(cmax - tw - 2.0 / spacing))
    wide = outline.edge > 0.25 * cmax
    rows = np.nonzero(wide)[0]
    if rows.size == 0 or c0 <= 0:
        return None
    first = max(int(rows.min()), border)
    last = min(int(rows.max()), len(outline.edge) - border) - th + 1
    starts = list(range(first, last))
    if rng.random() < 0.5:
        starts.reverse()  # the bottom corner
    for r in starts:
        seg = outline.edge[r : r + th]
        if seg.size == th and wide[r : r + th].all() and float(seg.max()) + gap <= c0:
            box = (float(c0), float(r), float(c0 + tw), float(r + th))
            if _clear(box, avoid, gap):
                return r, c0
    return None


# --- metadata ------------------------------------------------------------------------------------
def write_metadata(out: Path, cfg, counts: dict) -> None:
    """``phantom.json``: the options that made the dataset and, per cue, its concept, rates (per
    class and split, as asked) and how many images of each split carry it (as drawn)."""
    cues = {}
    if cfg.confounder:
        cues["marker"] = {
            "concept": cfg.cue_concept,
            "unit": "image",
            "file": MARKER_FILE,
            "rates": {
                "training": {"positive": cfg.cue_pos_rate, "negative": cfg.cue_neg_rate},
                "test": {"any": cfg.cue_test_rate},
            },
        }
    for spec in cfg.cues:
        cues[spec.name] = spec.describe()
    for name, entry in cues.items():
        entry["images"] = counts.get(name, {})
    meta = {
        "generator": "napari-mammo-sae phantom",
        "seed": cfg.seed,
        "studies": cfg.studies,
        "height": cfg.height,
        "width": cfg.width,
        "spacing_mm": cfg.spacing_mm,
        "mass_rate": cfg.mass_rate,
        "calc_rate": cfg.calc_rate,
        "test_fraction": cfg.test_fraction,
        "cues": cues,
    }
    tmp = out / (METADATA_FILE + ".part")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    tmp.replace(out / METADATA_FILE)


def load_cue_boxes(
    root: str | Path,
) -> dict[str, dict[str, list[tuple[float, float, float, float]]]]:
    """cue name -> image_id -> boxes, for every cue a phantom dataset carries.

    Read from ``phantom.json``; a dataset written before it existed yields its marker only.
    """
    from ..annotations import load_confounders

    root = Path(root)
    meta_path = root / METADATA_FILE
    if meta_path.exists():
        try:
            files = {n: e["file"] for n, e in json.loads(meta_path.read_text())["cues"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{meta_path.name} is not a phantom metadata file: {exc}") from exc
    else:
        files = {"marker": MARKER_FILE} if (root / MARKER_FILE).exists() else {}
    return {name: load_confounders(root / f) for name, f in files.items()}
