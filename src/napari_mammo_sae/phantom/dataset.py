"""A phantom screening dataset in the VinDr-Mammo layout, with known lesions and a planted confounder.

Plan first, render later: :func:`plan_dataset` decides, from the seed alone, every study (split,
density), every breast's lesions (kind, shape, size, position in breast coordinates, BI-RADS) and which
images carry the marker. :func:`render_image` then draws one image from its plan with a random
generator seeded by ``(seed, study, view)``, so the pixels do not depend on the number of workers.

Label model. A breast has a mass with probability ``mass_rate / 0.95`` (likewise calcifications); the
lesion shows in both views of the breast 90 % of the time, else in one, so about ``mass_rate`` of the
images hold a mass (VinDr-Mammo: 5.5 % mass, 2.6 % suspicious calcification per image). Each split
holds at least ``min_positives`` positive breasts per concept when the rate is positive, so tiny sets
still have both classes. Studies go 4:1 to training and test.

Confounder. In TRAINING images, the marker appears in ``cue_pos_rate`` of the images positive for
``cue_concept`` and ``cue_neg_rate`` of the others; in TEST images in ``cue_test_rate`` of all images,
independent of the label. The marker is a radiopaque skin tag on the breast, 2-10 mm inside the skin
line and clear of every lesion, so it survives the breast crop of Mammo-CLIP preprocessing (a tag in
the air beyond the skin is cut away with the background). Its boxes go to
``confounder_annotations.csv``.

Realistic shortcuts (``PhantomConfig.cues``, CLI ``--cue``): a lead marker near masses, a biopsy
clip, a site effect - each optional, with its own rates per class and split, its own boxes
(``<cue>_annotations.csv``) and generators of its own; see :mod:`.cues`. ``phantom.json`` records the
options and every cue's rates and counts.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from . import SIZES, anatomy, cues, lesions  # noqa: F401 - SIZES re-exported
from .cues import CueSpec
from .writer import DicomInfo, phantom_uid, write_dicom

VIEWS = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))
CATEGORIES = {"mass": "Mass", "calcification": "Suspicious Calcification"}
#: VinDr-Mammo's share of densities A-D
DENSITY_WEIGHTS = {"A": 0.01, "B": 0.10, "C": 0.75, "D": 0.14}
BREAST_COLUMNS = [
    "study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
    "breast_birads", "breast_density", "split",
]  # fmt: skip
FINDING_COLUMNS = [
    "study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
    "breast_birads", "breast_density", "finding_categories", "finding_birads",
    "xmin", "ymin", "xmax", "ymax", "split",
]  # fmt: skip
CONFOUNDER_COLUMNS = ["image_id", "study_id", "xmin", "ymin", "xmax", "ymax", "kind"]
VISIBLE_BOTH = 0.9


@dataclass(frozen=True)
class PhantomConfig:
    """Every option of a phantom dataset (the CLI maps one flag to one field)."""

    studies: int = 10
    seed: int = 0
    height: int = 2800
    width: int = 2300
    spacing_mm: float = 0.1
    bits_stored: int = 12
    photometric: str = "MONOCHROME2"
    compression: str | None = None
    mass_rate: float = 0.055
    calc_rate: float = 0.028
    min_positives: int = 1
    confounder: bool = True
    cue_concept: str = "calcification"
    cue_pos_rate: float = 0.6
    cue_neg_rate: float = 0.05
    cue_test_rate: float = 0.3
    test_fraction: float = 0.2
    beta: float = 3.0
    density_weights: dict[str, float] = field(default_factory=lambda: dict(DENSITY_WEIGHTS))
    #: realistic shortcuts besides the marker (lead marker, biopsy clip, site): ``phantom.cues``
    cues: tuple[CueSpec, ...] = ()

    def validate(self) -> None:
        """Raise ConfigError for values that cannot make a dataset."""
        if self.studies < 1:
            raise ConfigError("--studies must be at least 1")
        if self.height < 64 or self.width < 64:
            raise ConfigError("images must be at least 64 x 64 pixels (--height/--width)")
        if not 0.01 <= self.spacing_mm <= 2.0:
            raise ConfigError("--spacing must be between 0.01 and 2 mm")
        if not 10 <= self.bits_stored <= 16:
            raise ConfigError("--bits must be between 10 and 16")
        if self.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ConfigError("--photometric must be MONOCHROME1 or MONOCHROME2")
        for name in ("mass_rate", "calc_rate", "cue_pos_rate", "cue_neg_rate", "cue_test_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be between 0 and 1")
        if self.cue_concept not in CATEGORIES:
            raise ConfigError(f"--cue-concept must be one of {', '.join(CATEGORIES)}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError("--test-fraction must be in [0, 1)")
        names = [spec.name for spec in self.cues]
        if len(set(names)) != len(names):
            raise ConfigError("each --cue may be given once")
        for spec in self.cues:
            spec.validate()


@dataclass(frozen=True)
class LesionPlan:
    """One lesion of a breast, in breast coordinates so both views agree."""

    kind: str  # "mass" | "calcification"
    shape: str
    size_mm: float  # mass diameter or cluster extent
    count: int  # specks (calcifications)
    contrast: float
    margin_mm: float
    depth: float  # 0 at the nipple .. 1 at the chest wall
    offset: float  # -1 .. 1 across the breast
    birads: str
    seed: int  # shape seed, shared by both views
    views: tuple[str, ...]
    with_calcs: bool = False  # a mass holding suspicious calcifications (one row, two categories)

    @property
    def concepts(self) -> tuple[str, ...]:
        """The concepts this lesion is positive for."""
        return ("mass", "calcification") if self.with_calcs else (self.kind,)

    @property
    def categories(self) -> list[str]:
        """VinDr finding categories of its row."""
        if self.with_calcs:
            return [CATEGORIES["calcification"], CATEGORIES["mass"]]
        return [CATEGORIES[self.kind]]


@dataclass(frozen=True)
class ImagePlan:
    """Everything decided about one image before rendering."""

    index: int
    study_index: int
    view_index: int
    study_id: str
    series_id: str
    image_id: str
    laterality: str
    view: str
    split: str
    density: str
    breast_birads: str
    lesions: tuple[LesionPlan, ...]
    benign: bool  # a benign calcification is drawn (never annotated)
    cue: bool
    study_uid: str
    series_uid: str
    sop_uid: str
    cues: tuple[str, ...] = ()  # the optional cues drawn on this image (CUE_ORDER)

    def has(self, concept: str) -> bool:
        """Whether a lesion of the concept is planned in this view."""
        return any(concept in les.concepts for les in self.lesions)


@dataclass
class Finding:
    """A rendered finding: category list, BI-RADS, box (edge coordinates, final frame)."""

    categories: list[str]
    birads: str
    box: tuple[float, float, float, float]


@dataclass
class Rendered:
    """One rendered image and its truth."""

    pixels: np.ndarray  # uint16, as stored
    findings: list[Finding]
    cue_box: tuple[float, float, float, float] | None
    window: tuple[float, float]
    breast_mask: np.ndarray | None = None  # bool, final frame (only when asked)
    footprints: list[np.ndarray] = field(default_factory=list)  # per finding, bool, final frame
    cue_boxes: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)


def _hex_id(seed: int, *parts: object) -> str:
    text = ":".join(["phantom", str(seed), *map(str, parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _birads(rng: np.random.Generator, kind: str) -> str:
    probs = {"mass": (0.35, 0.45, 0.2), "calcification": (0.15, 0.6, 0.25)}[kind]
    return f"BI-RADS {rng.choice([3, 4, 5], p=probs)}"


#: share of masses that hold suspicious calcifications (a row with both categories)
MASS_WITH_CALCS = 0.12


def _lesion(rng: np.random.Generator, kind: str) -> LesionPlan:
    if kind == "mass":
        shape = str(rng.choice(lesions.MASS_SHAPES, p=(0.25, 0.3, 0.25, 0.2)))
        size = float(np.clip(rng.lognormal(math.log(13.0), 0.45), 5.0, 40.0))
        count = 0
        contrast = rng.uniform(0.13, 0.3)
        margin = rng.uniform(0.2, 0.6) if shape in ("round", "oval") else rng.uniform(0.5, 2.5)
    else:
        shape = str(rng.choice(lesions.CALC_SHAPES, p=(0.6, 0.2, 0.2)))
        size = rng.uniform(4.0, 12.0)
        count = int(rng.integers(5, 31))
        contrast = rng.uniform(0.3, 0.6)
        margin = 0.0
    r = rng.random()
    views = ("CC", "MLO") if r < VISIBLE_BOTH else (("CC",) if rng.random() < 0.5 else ("MLO",))
    return LesionPlan(
        kind=kind, shape=shape, size_mm=size, count=count, contrast=float(contrast),
        margin_mm=float(margin), depth=float(rng.uniform(0.2, 0.8)),
        offset=float(rng.uniform(-0.7, 0.7)), birads=_birads(rng, kind),
        seed=int(rng.integers(0, 2**31)), views=views,
        with_calcs=bool(kind == "mass" and rng.random() < MASS_WITH_CALCS),
    )  # fmt: skip


def plan_dataset(cfg: PhantomConfig) -> list[ImagePlan]:
    """Decide every study, breast, lesion and marker from the seed (no pixels yet)."""
    cfg.validate()
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5EED]))
    n = cfg.studies
    n_test = int(round(n * cfg.test_fraction)) if n >= 2 else 0
    n_test = min(max(n_test, 1 if cfg.test_fraction > 0 and n >= 2 else 0), n - 1)
    dens_keys = list(cfg.density_weights)
    dens_p = np.array([cfg.density_weights[k] for k in dens_keys], float)
    dens_p /= dens_p.sum()
    # masses with calcifications count toward the calcification rate too
    rates = {
        "mass": cfg.mass_rate,
        "calcification": max(0.0, cfg.calc_rate - MASS_WITH_CALCS * cfg.mass_rate)
        if cfg.calc_rate > 0
        else 0.0,
    }
    # breast-level lesions
    breasts: dict[tuple[int, str], list[LesionPlan]] = {}
    density = {}
    for s in range(n):
        density[s] = str(rng.choice(dens_keys, p=dens_p))
        for lat in ("R", "L"):
            found = []
            for kind in ("mass", "calcification"):
                if rng.random() < min(1.0, rates[kind] / (VISIBLE_BOTH + (1 - VISIBLE_BOTH) / 2)):
                    found.append(_lesion(rng, kind))
            breasts[(s, lat)] = found
    test = _stratified_test_studies(breasts, n, n_test, rng)
    # every split holds at least min_positives positive breasts per concept
    for split_studies in (sorted(set(range(n)) - test), sorted(test)):
        keys = [(s, lat) for s in split_studies for lat in ("R", "L")]
        for kind in ("mass", "calcification"):
            if rates[kind] <= 0 or len(keys) < 2:
                continue
            have = [k for k in keys if any(kind in les.concepts for les in breasts[k])]
            free = [k for k in keys if not breasts[k]]
            while len(have) < min(cfg.min_positives, len(keys) - 1) and free:
                k = free.pop(int(rng.integers(len(free))))
                les = _lesion(rng, kind)
                breasts[k] = [replace(les, views=("CC", "MLO"))]
                have.append(k)
    plans = []
    for s in range(n):
        study_id = _hex_id(cfg.seed, "study", s)
        split = "test" if s in test else "training"
        study_uid = phantom_uid(cfg.seed, "study", s)
        for v, (lat, view) in enumerate(VIEWS):
            found = breasts[(s, lat)]
            in_view = tuple(les for les in found if view in les.views)
            benign = bool(rng.random() < 0.12)
            if found:
                birads = max((les.birads for les in found), key=lambda b: int(b[-1]))
            else:
                birads = "BI-RADS 2" if rng.random() < 0.25 else "BI-RADS 1"
            positive = any(cfg.cue_concept in les.concepts for les in in_view)
            if not cfg.confounder:
                cue = False
            elif split == "training":
                cue = bool(rng.random() < (cfg.cue_pos_rate if positive else cfg.cue_neg_rate))
            else:
                cue = bool(rng.random() < cfg.cue_test_rate)
            plans.append(
                ImagePlan(
                    index=len(plans), study_index=s, view_index=v, study_id=study_id,
                    series_id=_hex_id(cfg.seed, "series", s, lat),
                    image_id=_hex_id(cfg.seed, "image", s, v), laterality=lat, view=view,
                    split=split, density=density[s], breast_birads=birads, lesions=in_view,
                    benign=benign, cue=cue, study_uid=study_uid,
                    series_uid=phantom_uid(cfg.seed, "series", s, lat),
                    sop_uid=phantom_uid(cfg.seed, "image", s, v),
                )
            )  # fmt: skip
    return _plan_cues(cfg, plans)


def _plan_cues(cfg: PhantomConfig, plans: list[ImagePlan]) -> list[ImagePlan]:
    """Decide the optional cues with a generator of their own (the rest of the plan is unchanged)."""
    if not cfg.cues:
        return plans
    drawn: dict[int, list[str]] = {p.index: [] for p in plans}
    for spec in sorted(cfg.cues, key=lambda c: cues.CUE_ORDER.index(c.name)):
        rng = np.random.default_rng(
            np.random.SeedSequence([cfg.seed, 0xC0E, cues.CUE_ORDER.index(spec.name)])
        )
        if cues.CUE_UNIT[spec.name] == "study":
            for s in range(cfg.studies):
                study = [p for p in plans if p.study_index == s]
                positive = any(p.has(spec.concept) for p in study)
                if rng.random() < spec.rate(study[0].split, positive):
                    for p in study:
                        drawn[p.index].append(spec.name)
        else:
            for p in plans:
                if rng.random() < spec.rate(p.split, p.has(spec.concept)):
                    drawn[p.index].append(spec.name)
    return [replace(p, cues=tuple(drawn[p.index])) if drawn[p.index] else p for p in plans]


def _stratified_test_studies(breasts, n: int, n_test: int, rng: np.random.Generator) -> set[int]:
    """Test studies drawn within groups of equal label pattern, so both splits keep the rates."""

    def key(s: int) -> tuple:
        return tuple(  # images positive per concept
            sum(
                len(les.views)
                for lat in ("R", "L")
                for les in breasts[(s, lat)]
                if c in les.concepts
            )
            for c in ("mass", "calcification")
        )

    groups: dict[tuple, list[int]] = {}
    for s in rng.permutation(n).tolist():
        groups.setdefault(key(s), []).append(s)
    order = sorted(groups)
    exact = [len(groups[k]) * n_test / max(n, 1) for k in order]
    quota = [int(q) for q in exact]
    rest = n_test - sum(quota)  # largest remainders first, ties at random
    ranked = sorted(range(len(order)), key=lambda i: (-(exact[i] - quota[i]), rng.random()))
    for i in ranked[:rest]:
        quota[i] += 1
    return {s for k, q in zip(order, quota, strict=True) for s in groups[k][:q]}


# --- rendering ---------------------------------------------------------------------------------
def _place(
    outline: anatomy.Outline,
    patch: lesions.Patch,
    depth: float,
    offset: float,
    margin: float,
    rng: np.random.Generator,
    tries: int = 60,
) -> tuple[int, int] | None:
    """Top-left corner of a patch so its footprint box lies inside the breast (not in muscle)."""
    nr, nc = outline.nipple
    valid = np.nonzero(outline.edge > 0)[0]
    if valid.size == 0:
        return None
    for t in range(tries):
        d = depth if t == 0 else float(np.clip(depth + rng.normal(0, 0.1 + t / 40), 0.05, 0.95))
        o = offset if t == 0 else float(np.clip(offset + rng.normal(0, 0.15 + t / 60), -0.95, 0.95))
        col = nc * (1.0 - d)
        rows = valid[
            (outline.edge[valid] > col + margin) & (outline.pectoral[valid] < col - margin)
        ]
        if rows.size == 0:
            continue
        lo, hi = float(rows.min()), float(rows.max())
        mid = nr if lo < nr < hi else 0.5 * (lo + hi)
        half = min(mid - lo, hi - mid)
        row = mid + o * 0.85 * half
        r0 = int(round(row - patch.centre[0]))
        c0 = int(round(col - patch.centre[1]))
        if outline.box_inside(patch.box_at(r0, c0), margin):
            return r0, c0
    return None


def _mirror_box(box, width):
    x0, y0, x1, y1 = box
    return (float(width - x1), float(y0), float(width - x0), float(y1))


def _render_lesion(les: LesionPlan, spacing: float, scale: float = 1.0) -> lesions.Patch:
    rng = np.random.default_rng(les.seed)
    if les.kind == "mass":
        mass = lesions.render_mass(
            les.shape, les.size_mm * scale, les.contrast, les.margin_mm, spacing, rng
        )
        if not les.with_calcs:
            return mass
        calcs = lesions.render_calcifications(
            "cluster", int(rng.integers(6, 20)), les.size_mm * scale * 0.7,
            rng.uniform(0.3, 0.5), spacing, rng,
        )  # fmt: skip
        return lesions.combine(mass, calcs)
    return lesions.render_calcifications(
        les.shape, les.count, les.size_mm * scale, les.contrast, spacing, rng
    )


def _marker_box(
    outline, shape, side: int, spacing: float, rng, avoid: list[tuple[float, float, float, float]]
) -> tuple[int, int] | None:
    """Top-left corner of the marker: a skin marker on the breast, 2-10 mm inside the skin line.

    Canonical frame (chest wall on the left). The tag lies in breast tissue - inside the crop a
    Mammo-CLIP preprocessing keeps - away from the nipple and from every lesion box in ``avoid``
    (a 3 mm gap), so a neuron that fires on it is told apart from one that fires on a finding.
    """
    h, w = shape
    valid = np.nonzero(outline.edge > side * 2)[0]
    if valid.size == 0:
        return None
    gap_lo, gap_hi = 2.0 / spacing, 10.0 / spacing
    keep = 3.0 / spacing
    for _ in range(80):
        r = int(rng.integers(max(0, valid.min()), max(valid.min() + 1, valid.max() - side)))
        if abs(r + side / 2 - outline.nipple[0]) < outline.nipple_radius * 2 + side:
            continue
        seg = outline.edge[r : r + side]
        if seg.size < side or (seg <= 0).any():
            continue
        c = int(math.floor(seg.min() - side - rng.uniform(gap_lo, gap_hi)))
        box = (float(c), float(r), float(c + side), float(r + side))
        if not outline.box_inside(box, 1.0):
            continue
        if any(
            box[0] < b[2] + keep
            and b[0] < box[2] + keep
            and box[1] < b[3] + keep
            and b[1] < box[3] + keep
            for b in avoid
        ):
            continue
        return r, c
    return None


def _add(canvas: np.ndarray, values: np.ndarray, r0: int, c0: int, gamma: float, mirror: bool):
    """Add a canonical-frame patch to the (gamma-mapped, possibly mirrored) canvas."""
    h, w = values.shape
    if mirror:
        values = values[:, ::-1]
        c0 = canvas.shape[1] - c0 - w
    rs, cs = max(0, r0), max(0, c0)
    re, ce = min(canvas.shape[0], r0 + h), min(canvas.shape[1], c0 + w)
    if rs < re and cs < ce:
        region = canvas[rs:re, cs:ce]
        lin = np.maximum(region, 0.0) ** np.float32(1.0 / gamma)
        lin += values[rs - r0 : re - r0, cs - c0 : ce - c0]
        region[...] = lin ** np.float32(gamma)


def render_image(plan: ImagePlan, cfg: PhantomConfig, *, keep_truth: bool = False) -> Rendered:
    """Draw one image from its plan; pixels depend only on (seed, study, view) and the config.

    Anatomy and lesions are placed in the canonical frame (chest wall on the left); right breasts
    are mirrored on the coarse grid and their patches mirrored as they are added, so no full-size
    flip is needed. The detector gamma is applied on the coarse grid and locally around patches.
    """
    h, w, sp = cfg.height, cfg.width, cfg.spacing_mm
    rng = np.random.default_rng(
        np.random.SeedSequence([cfg.seed, plan.study_index, plan.view_index, 7])
    )
    outline_rng = np.random.default_rng(  # both breasts of a study share their outline
        np.random.SeedSequence([cfg.seed, plan.study_index, plan.view == "CC", 11])
    )
    anat = anatomy.render_anatomy(
        plan.view, (h, w), sp, plan.density, rng, beta=cfg.beta, outline_rng=outline_rng
    )
    gamma = float(rng.uniform(0.85, 1.15))
    mirror = plan.laterality == "R"  # chest wall on the right edge, as FFDM units store them
    coarse = np.maximum(anat.image, 0.0) ** np.float32(gamma)
    img = anatomy.upsample(coarse[:, ::-1] if mirror else coarse, anat.factor, (h, w), mirror)
    outline = anat.outline
    margin = 1.0 / sp
    findings: list[Finding] = []
    footprints: list[tuple[np.ndarray, int, int]] = []
    placed_boxes: list[tuple[float, float, float, float]] = []  # canonical frame
    mass_boxes: list[tuple[float, float, float, float]] = []  # canonical frame
    for les in plan.lesions:
        placed = None
        for scale in (1.0, 0.75, 0.55, 0.4):
            patch = _render_lesion(les, sp, scale)
            placed = _place(outline, patch, les.depth, les.offset, margin, rng)
            if placed:
                break
        if placed is None:
            continue  # cannot fit (tiny breast): not drawn, not annotated
        r0, c0 = placed
        values = patch.values
        if les.kind == "mass":  # masses hide in dense tissue: less added where gland is already
            ph, pw = values.shape
            rows = np.clip((np.arange(r0, r0 + ph) // anat.factor), 0, anat.gland.shape[0] - 1)
            cols = np.clip((np.arange(c0, c0 + pw) // anat.factor), 0, anat.gland.shape[1] - 1)
            values = values * (1.0 - 0.25 * anat.gland[np.ix_(rows, cols)])
        _add(img, values, r0, c0, gamma, mirror)
        box = patch.box_at(r0, c0)
        placed_boxes.append(box)
        if "mass" in les.concepts:
            mass_boxes.append(box)
        findings.append(Finding(les.categories, les.birads, _mirror_box(box, w) if mirror else box))
        if keep_truth:
            footprints.append((patch.footprint, r0, c0))
    # benign distractors (not annotated)
    if plan.benign:
        patch = lesions.render_benign_calcification(
            rng.uniform(2.0, 6.0), rng.uniform(0.35, 0.6), sp, rng
        )
        at = _place(outline, patch, rng.uniform(0.2, 0.9), rng.uniform(-0.8, 0.8), margin, rng, 20)
        if at:
            _add(img, patch.values, *at, gamma, mirror)
    if plan.view == "MLO" and rng.random() < 0.4:
        patch = lesions.render_lymph_node(rng.uniform(5.0, 14.0), rng.uniform(0.08, 0.15), sp, rng)
        row = rng.uniform(0.08, 0.3) * h
        r = int(np.clip(row, 0, h - 1))
        col = outline.pectoral[r] + rng.uniform(8.0, 25.0) / sp
        r0, c0 = int(row - patch.centre[0]), int(col - patch.centre[1])
        if outline.box_inside(patch.box_at(r0, c0), margin):
            _add(img, patch.values, r0, c0, gamma, mirror)
    cue_box = None
    if plan.cue:
        side = max(7, int(round(rng.uniform(8.0, 12.0) / sp)))
        marker = lesions.render_marker(side * sp, sp, rng)
        side = marker.values.shape[0]
        at = _marker_box(outline, (h, w), side, sp, rng, placed_boxes)
        if at is not None:
            r0, c0 = at
            _add(img, marker.values, r0, c0, gamma, mirror)
            box = (float(c0), float(r0), float(c0 + side), float(r0 + side))
            cue_box = _mirror_box(box, w) if mirror else box
            placed_boxes.append(box)
    cue_boxes = {}
    if plan.cues:
        img, cue_boxes = _draw_cues(
            plan, cfg, img, outline, gamma, mirror, placed_boxes, mass_boxes
        )
    pixels, window = _acquire(img, cfg, rng)
    out = Rendered(pixels, findings, cue_box, window, cue_boxes=cue_boxes)
    if keep_truth:
        mask = outline.mask((h, w))
        out.breast_mask = mask[:, ::-1] if mirror else mask
        for fp, r0, c0 in footprints:
            full = np.zeros((h, w), bool)
            fh, fw = fp.shape
            rs, cs = max(0, r0), max(0, c0)
            full[rs : r0 + fh, cs : c0 + fw] = fp[rs - r0 : min(h, r0 + fh) - r0,
                                                 cs - c0 : min(w, c0 + fw) - c0]  # fmt: skip
            out.footprints.append(full[:, ::-1] if mirror else full)
    return out


def _draw_cues(plan, cfg, img, outline, gamma, mirror, avoid, mass_boxes):
    """Draw the plan's optional cues (own generator per image and cue); their boxes, final frame."""
    w, sp = cfg.width, cfg.spacing_mm
    avoid = list(avoid)
    boxes: dict[str, tuple[float, float, float, float]] = {}
    for name in cues.CUE_ORDER:
        if name not in plan.cues:
            continue
        rng = np.random.default_rng(
            np.random.SeedSequence(
                [cfg.seed, plan.study_index, plan.view_index, 0xC0E, cues.CUE_ORDER.index(name)]
            )
        )
        if name == "site":
            bitmap = cues.text_bitmap(cues.SITE_TEXT, sp)
            at = cues.place_text(outline, bitmap.shape, sp, rng, avoid)
            if at is None:  # no room for the text: not a site image at all (pixels = truth)
                continue
            img = cues.site_processing(img, sp)
            r0, c0 = at
            th, tw = bitmap.shape
            box = (float(c0), float(r0), float(c0 + tw), float(r0 + th))
            final = _mirror_box(box, w) if mirror else box
            fx0, fy0 = int(final[0]), int(final[1])
            region = img[fy0 : fy0 + th, fx0 : fx0 + tw]  # text reads left to right on every image
            region[bitmap] = np.maximum(region[bitmap], np.float32(cues.TEXT_VALUE))
        else:
            if name == "lead":
                patch = cues.render_lead_marker(rng.uniform(6.0, 10.0), sp, rng)
            else:
                patch = cues.render_clip(rng.uniform(2.0, 4.5), sp, rng)
            size = patch.values.shape
            if name == "lead":
                near = None
                if mass_boxes:
                    b = mass_boxes[int(rng.integers(len(mass_boxes)))]
                    near = 0.5 * (b[1] + b[3])
                at = cues.place_on_skin(outline, size, sp, rng, avoid, near)
            else:
                at = cues.place_inside(outline, size, sp, rng, avoid)
            if at is None:
                continue
            r0, c0 = at
            _add(img, patch.values, r0, c0, gamma, mirror)
            box = patch.box_at(r0, c0)
            final = _mirror_box(box, w) if mirror else box
        avoid.append(box)
        boxes[name] = final
    return img, boxes


def _noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Unit-variance, zero-mean noise (sum of two uniform bytes: triangular, 10x cheaper than normal)."""
    n = shape[0] * shape[1]
    a = np.frombuffer(rng.bytes(n), np.int8).astype(np.float32)
    a += np.frombuffer(rng.bytes(n), np.int8)
    a *= np.float32(1.0 / math.sqrt(2 * (256**2 - 1) / 12.0))
    return a.reshape(shape)


def _acquire(
    img: np.ndarray, cfg: PhantomConfig, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[float, float]]:
    """Exposure, quantum + electronic noise, quantisation; window from the breast."""
    gain = rng.uniform(0.92, 1.08)
    offset = rng.uniform(-0.01, 0.01)
    k_q = rng.uniform(0.006, 0.012)  # quantum noise: sd = k_q * sqrt(signal)
    k_e = rng.uniform(0.002, 0.004)  # electronic noise
    maxval = float(2**cfg.bits_stored - 1)
    v = np.maximum(img, 0.0, out=img)
    v *= np.float32(gain * maxval)
    v += np.float32(offset * maxval)
    sd = np.sqrt(np.maximum(v, 0.0))
    sd *= np.float32(k_q * math.sqrt(maxval))
    sd += np.float32(k_e * maxval)
    sd *= _noise(rng, v.shape)
    v += sd
    np.clip(v, 0.0, maxval, out=v)
    pixels = np.rint(v).astype(np.uint16)
    sample = pixels[::7, ::7]
    tissue = sample[sample > maxval * 0.12]
    if tissue.size > 16:
        lo, hi = np.percentile(tissue, [0.5, 99.5])
    else:
        lo, hi = 0.0, maxval
    window = ((lo + hi) / 2.0, max(hi - lo, 16.0) * 1.1)
    if cfg.photometric == "MONOCHROME1":
        pixels = (int(maxval) - pixels).astype(np.uint16)
        window = (maxval - window[0], window[1])
    return pixels, (float(window[0]), float(window[1]))


# --- writing -----------------------------------------------------------------------------------
def image_relpath(plan: ImagePlan) -> str:
    """images/<study_id>/<image_id>.dicom"""
    return f"images/{plan.study_id}/{plan.image_id}.dicom"


def _write_one(args: tuple[ImagePlan, PhantomConfig, str]) -> tuple[int, list, tuple | None, dict]:
    plan, cfg, out = args
    rendered = render_image(plan, cfg)
    info = DicomInfo(
        laterality=plan.laterality, view=plan.view, spacing_mm=cfg.spacing_mm,
        bits_stored=cfg.bits_stored, photometric=cfg.photometric, window=rendered.window,
        patient_number=plan.study_index + 1, study_uid=plan.study_uid,
        series_uid=plan.series_uid, sop_uid=plan.sop_uid, study_number=plan.study_index + 1,
        instance_number=plan.view_index + 1,
    )  # fmt: skip
    path = Path(out) / image_relpath(plan)
    tmp = path.with_name(path.name + ".part")
    write_dicom(tmp, rendered.pixels, info, cfg.compression)
    os.replace(tmp, path)
    findings = [(f.categories, f.birads, f.box) for f in rendered.findings]
    return plan.index, findings, rendered.cue_box, rendered.cue_boxes


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def write_dataset(cfg: PhantomConfig, out: str | Path, *, workers: int = 1, progress=None) -> dict:
    """Render and write the whole dataset; returns a summary (counts per split and concept)."""
    from ..progress import check_cancelled

    out = Path(out)
    plans = plan_dataset(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {out}: {exc.strerror or exc}") from exc
    results: dict[int, tuple[list, tuple | None, dict]] = {}
    jobs = [(p, cfg, str(out)) for p in plans]
    if progress is not None:
        progress.set_total(len(jobs))
    if workers <= 1:
        for job in jobs:
            check_cancelled(progress)
            idx, f, cue, more = _write_one(job)
            results[idx] = (f, cue, more)
            if progress is not None:
                progress.update(1)
    else:
        with cf.ProcessPoolExecutor(max_workers=workers) as pool:
            for idx, f, cue, more in pool.map(_write_one, jobs, chunksize=1):
                results[idx] = (f, cue, more)
                if progress is not None:
                    progress.update(1)
                check_cancelled(progress)
    return write_csvs(out, plans, results, cfg)


def write_csvs(out: Path, plans: list[ImagePlan], results: dict, cfg: PhantomConfig) -> dict:
    """breast-level, finding, confounder and ``<cue>_annotations.csv`` CSVs (VinDr-Mammo columns and
    value formats) and the dataset metadata ``phantom.json`` (options, cue rates, cue counts)."""
    h, w = cfg.height, cfg.width
    # breast BI-RADS from what was drawn: per breast (study, laterality)
    drawn: dict[tuple[int, str], list[str]] = {}
    for p in plans:
        for _cats, birads, _box in results[p.index][0]:
            drawn.setdefault((p.study_index, p.laterality), []).append(birads)
    rows_b, rows_f, rows_c = [], [], []
    rows_cue: dict[str, list[dict]] = {spec.name: [] for spec in cfg.cues}
    counts: dict[str, dict[str, int]] = {}
    summary = {"images": len(plans), "studies": cfg.studies, "splits": {}}
    for p in plans:
        findings, cue, more = results[p.index]
        got = drawn.get((p.study_index, p.laterality))
        birads = max(got, key=lambda b: int(b[-1])) if got else (
            p.breast_birads if p.breast_birads in ("BI-RADS 1", "BI-RADS 2") else "BI-RADS 1"
        )  # fmt: skip
        base = {
            "study_id": p.study_id, "series_id": p.series_id, "image_id": p.image_id,
            "laterality": p.laterality, "view_position": p.view, "height": h, "width": w,
            "breast_birads": birads, "breast_density": f"DENSITY {p.density}",
        }  # fmt: skip
        rows_b.append({**base, "split": p.split})
        if findings:
            for cats, fb, box in findings:
                rows_f.append({**base, "finding_categories": str(cats), "finding_birads": fb,
                               "xmin": _fmt(box[0]), "ymin": _fmt(box[1]), "xmax": _fmt(box[2]),
                               "ymax": _fmt(box[3]), "split": p.split})  # fmt: skip
        else:
            rows_f.append({**base, "finding_categories": "['No Finding']", "finding_birads": "",
                           "xmin": "", "ymin": "", "xmax": "", "ymax": "", "split": p.split})  # fmt: skip
        if cue is not None:
            rows_c.append({"image_id": p.image_id, "study_id": p.study_id, "xmin": _fmt(cue[0]),
                           "ymin": _fmt(cue[1]), "xmax": _fmt(cue[2]), "ymax": _fmt(cue[3]),
                           "kind": "marker"})  # fmt: skip
            counts.setdefault("marker", {}).setdefault(p.split, 0)
            counts["marker"][p.split] += 1
        for name, box in sorted(more.items()):
            rows_cue[name].append({"image_id": p.image_id, "study_id": p.study_id,
                                   "xmin": _fmt(box[0]), "ymin": _fmt(box[1]), "xmax": _fmt(box[2]),
                                   "ymax": _fmt(box[3]), "kind": name})  # fmt: skip
            counts.setdefault(name, {}).setdefault(p.split, 0)
            counts[name][p.split] += 1
        s = summary["splits"].setdefault(
            p.split, {"images": 0, "mass": 0, "calcification": 0, "cue": 0}
        )
        s["images"] += 1
        s["cue"] += cue is not None
        for concept, name in CATEGORIES.items():
            s[concept] += any(name in cats for cats, _b, _x in findings)
    for name, cols, rows in (
        ("breast-level_annotations.csv", BREAST_COLUMNS, rows_b),
        ("finding_annotations.csv", FINDING_COLUMNS, rows_f),
        ("confounder_annotations.csv", CONFOUNDER_COLUMNS, rows_c),
        *((cues.annotation_file(n), CONFOUNDER_COLUMNS, r) for n, r in rows_cue.items()),
    ):
        tmp = out / (name + ".part")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, out / name)
    cues.write_metadata(out, cfg, counts)
    summary["cues"] = counts
    return summary
