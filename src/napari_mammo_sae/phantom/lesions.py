"""Lesions, benign distractors and the planted marker, each rendered as a small patch.

Every renderer works in physical units (``size_mm``, ``spacing_mm``) and returns a :class:`Patch`:
an intensity increment (display units, added to the breast image), the lesion's *footprint* (the
pixels that make it out: where the increment is at least half its local peak) and its centre. The
annotation box of a finding is the bounding box of the footprint in edge coordinates.

* Masses: round, oval, irregular (harmonic outline) or spiculated (irregular core with tapered
  radiating spicules); 5-40 mm; margin blur 0.2-2.5 mm (circumscribed to indistinct); dome profile.
* Suspicious calcifications: 5-30 specks of 0.1-1 mm (pleomorphic: elongated, varied brightness)
  within about 1 cm, distributed as a round cluster, a line, or a branching (Y-shaped) cast.
* Benign distractors (never annotated): large round calcifications (2-6 mm, solid or eggshell) and
  lymph nodes (oval, 5-14 mm, with a fatty hilum).
* Marker: a radiopaque tag (square or round lead plate with a letter), the planted confounder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MASS_SHAPES = ("round", "oval", "irregular", "spiculated")
CALC_SHAPES = ("cluster", "linear", "branching")


@dataclass
class Patch:
    """An intensity increment centred at ``centre`` (row, col in the patch's pixel frame)."""

    values: np.ndarray  # float32 (h, w)
    footprint: np.ndarray  # bool (h, w)
    centre: tuple[float, float]  # position of the lesion centre inside the patch (pixels)

    def box_at(self, row0: int, col0: int) -> tuple[float, float, float, float]:
        """Edge-coordinate box (xmin, ymin, xmax, ymax) of the footprint, patch placed at row0/col0."""
        rows = np.nonzero(self.footprint.any(axis=1))[0]
        cols = np.nonzero(self.footprint.any(axis=0))[0]
        if rows.size == 0:
            return (float(col0), float(row0), float(col0), float(row0))
        return (
            float(col0 + cols[0]),
            float(row0 + rows[0]),
            float(col0 + cols[-1] + 1),
            float(row0 + rows[-1] + 1),
        )


def combine(a: Patch, b: Patch) -> Patch:
    """Two patches sharing a centre, summed; the footprint is the union."""
    up = int(math.ceil(max(a.centre[0], b.centre[0])))
    left = int(math.ceil(max(a.centre[1], b.centre[1])))
    down = max(p.values.shape[0] - p.centre[0] for p in (a, b))
    right = max(p.values.shape[1] - p.centre[1] for p in (a, b))
    shape = (up + int(math.ceil(down)), left + int(math.ceil(right)))
    values = np.zeros(shape, np.float32)
    footprint = np.zeros(shape, bool)
    for p in (a, b):
        r0, c0 = int(round(up - p.centre[0])), int(round(left - p.centre[1]))
        h, w = p.values.shape
        values[r0 : r0 + h, c0 : c0 + w] += p.values
        footprint[r0 : r0 + h, c0 : c0 + w] |= p.footprint
    return Patch(values, footprint, (float(up), float(left)))


def _grid(half_h: int, half_w: int) -> tuple[np.ndarray, np.ndarray]:
    yy = np.arange(-half_h, half_h + 1, dtype=np.float32)[:, None]
    xx = np.arange(-half_w, half_w + 1, dtype=np.float32)[None, :]
    return yy, xx


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.clip(x, -40.0, 40.0)))


def render_mass(
    shape: str,
    size_mm: float,
    contrast: float,
    margin_mm: float,
    spacing_mm: float,
    rng: np.random.Generator,
) -> Patch:
    """A mass of the given shape and mean diameter (mm)."""
    radius = 0.5 * size_mm / spacing_mm
    blur = max(0.35, margin_mm / spacing_mm)
    n_spic = int(rng.integers(8, 20)) if shape == "spiculated" else 0
    spic_len = rng.uniform(0.6, 1.4) if n_spic else 0.0
    half = int(math.ceil(radius * (1.35 + spic_len) + 3 * blur)) + 2
    yy, xx = _grid(half, half)
    rho = np.hypot(yy, xx)
    theta = np.arctan2(yy, xx)
    if shape == "oval":
        ratio = rng.uniform(0.55, 0.8)
        a, b = radius / math.sqrt(ratio), radius * math.sqrt(ratio)
        phi = rng.uniform(0, math.pi)
        r_theta = a * b / np.sqrt((b * np.cos(theta - phi)) ** 2 + (a * np.sin(theta - phi)) ** 2)
    else:
        r_theta = np.full_like(theta, radius)
        if shape in ("irregular", "spiculated"):
            amp = 0.16 if shape == "irregular" else 0.08
            for k in range(2, 8):
                r_theta = r_theta * (
                    1.0 + rng.uniform(0.3, 1.0) * amp / k**0.6 * np.cos(k * theta + rng.uniform(0, 6.3))
                )  # fmt: skip
        else:
            r_theta = r_theta * (1.0 + 0.03 * np.cos(2 * theta + rng.uniform(0, 6.3)))
    core = _sigmoid((r_theta - rho) / blur)
    dome = 0.8 + 0.2 * np.clip(1.0 - (rho / np.maximum(r_theta, 1e-3)) ** 2, 0.0, 1.0)
    values = core * dome
    footprint = core >= 0.5
    for _ in range(n_spic):
        alpha = rng.uniform(-math.pi, math.pi)
        base = radius * 0.8
        length = radius * spic_len * rng.uniform(0.5, 1.0)
        width = max(0.45, rng.uniform(0.2, 0.45) / spacing_mm)
        ux, uy = math.cos(alpha), math.sin(alpha)
        t = xx * ux + yy * uy - base  # along the spicule
        d = np.abs(-xx * uy + yy * ux)  # across it
        along = np.clip(t / length, 0.0, 1.0)
        taper = (1.0 - 0.8 * along) * (t >= 0) * (t <= length)
        spic = taper * np.exp(-0.5 * (d / (width * (1.0 - 0.6 * along))) ** 2) * 0.75
        values = np.maximum(values, spic)
        footprint |= spic >= 0.375
    return Patch((contrast * values).astype(np.float32), footprint, (float(half), float(half)))


def _specks(
    points_mm: np.ndarray,
    diam_mm: np.ndarray,
    elong: np.ndarray,
    angle: np.ndarray,
    bright: np.ndarray,
    spacing_mm: float,
) -> Patch:
    """Sum of small anisotropic Gaussian specks; integral preserved below the pixel size."""
    psf = 0.45  # detector blur, pixels
    sig = diam_mm / (2.355 * spacing_mm)  # FWHM = diameter
    sig_a = np.sqrt((sig * elong) ** 2 + psf**2)
    sig_b = np.sqrt((sig / elong) ** 2 + psf**2)
    amp = bright * (sig**2) / (sig_a * sig_b)
    pts = points_mm / spacing_mm
    reach = float(np.max(sig_a) * 3.5 + 2)
    half_h = int(math.ceil(np.abs(pts[:, 0]).max() + reach))
    half_w = int(math.ceil(np.abs(pts[:, 1]).max() + reach))
    yy, xx = _grid(half_h, half_w)
    values = np.zeros((yy.size, xx.size), np.float32)
    footprint = np.zeros_like(values, dtype=bool)
    for (py, px), sa, sb, a, ang in zip(pts, sig_a, sig_b, amp, angle, strict=True):
        r0, r1 = int(py + half_h - reach), int(py + half_h + reach) + 1
        c0, c1 = int(px + half_w - reach), int(px + half_w + reach) + 1
        dy = yy[r0:r1] - py
        dx = xx[:, c0:c1] - px
        u = dx * math.cos(ang) + dy * math.sin(ang)
        v = -dx * math.sin(ang) + dy * math.cos(ang)
        g = np.exp(-0.5 * ((u / sa) ** 2 + (v / sb) ** 2))
        values[r0:r1, c0:c1] += a * g
        footprint[r0:r1, c0:c1] |= g >= 0.5
    return Patch(values, footprint, (float(half_h), float(half_w)))


def calcification_points(shape: str, n: int, extent_mm: float, rng: np.random.Generator):
    """Speck centres (mm, relative to the cluster centre) for a cluster, a line or a branching cast."""
    if shape == "linear":
        ang = rng.uniform(0, math.pi)
        t = rng.uniform(-0.5, 0.5, n) * extent_mm
        off = rng.normal(0.0, 0.3, n)
        pts = np.stack([t * math.sin(ang) + off * math.cos(ang),
                        t * math.cos(ang) - off * math.sin(ang)], 1)  # fmt: skip
    elif shape == "branching":
        ang = rng.uniform(0, 2 * math.pi)
        stem = rng.uniform(0, 0.5, n) * extent_mm
        branch = rng.integers(0, 3, n)  # 0: stem, 1/2: the two branches
        out = []
        for s, b in zip(stem, branch, strict=True):
            if b == 0:
                a, base = ang + math.pi, 0.0
            else:
                a, base = ang + (0.45 if b == 1 else -0.45), 0.0
            r = base + s
            out.append((r * math.sin(a), r * math.cos(a)))
        pts = np.array(out) + rng.normal(0.0, 0.2, (n, 2))
    else:  # round cluster
        r = extent_mm * 0.5 * np.sqrt(rng.uniform(0, 1, n))
        a = rng.uniform(0, 2 * math.pi, n)
        pts = np.stack([r * np.sin(a), r * np.cos(a)], 1)
    return pts - pts.mean(axis=0)


def render_calcifications(
    shape: str,
    n: int,
    extent_mm: float,
    contrast: float,
    spacing_mm: float,
    rng: np.random.Generator,
) -> Patch:
    """A cluster of ``n`` pleomorphic specks (0.1-1 mm) within ``extent_mm``."""
    pts = calcification_points(shape, n, extent_mm, rng)
    diam = np.clip(rng.lognormal(math.log(0.28), 0.55, n), 0.1, 1.0)
    elong = rng.uniform(1.0, 2.2, n) if shape != "cluster" else rng.uniform(1.0, 1.6, n)
    angle = rng.uniform(0, math.pi, n)
    bright = contrast * rng.uniform(0.6, 1.0, n)
    return _specks(pts, diam, elong, angle, bright, spacing_mm)


def render_benign_calcification(
    size_mm: float, contrast: float, spacing_mm: float, rng: np.random.Generator
) -> Patch:
    """A large round benign calcification (solid, or an eggshell rim)."""
    radius = 0.5 * size_mm / spacing_mm
    half = int(math.ceil(radius + 4))
    yy, xx = _grid(half, half)
    rho = np.hypot(yy, xx)
    disc = _sigmoid((radius - rho) / 0.6)
    if rng.random() < 0.5:  # eggshell: bright rim, lucent centre
        rim = _sigmoid((rho - radius * 0.7) / 0.6) * disc
        values = 0.35 * disc + 0.65 * rim
    else:
        values = disc * (0.85 + 0.15 * np.cos(rho / max(radius, 1) * 2.0))
    return Patch((contrast * values).astype(np.float32), disc >= 0.5, (float(half), float(half)))


def render_lymph_node(
    size_mm: float, contrast: float, spacing_mm: float, rng: np.random.Generator
) -> Patch:
    """An oval lymph node with its fatty hilum (a lucent notch on one side)."""
    a = 0.5 * size_mm / spacing_mm
    b = a * rng.uniform(0.5, 0.7)
    half = int(math.ceil(a + 4))
    yy, xx = _grid(half, half)
    phi = rng.uniform(0, math.pi)
    u = xx * math.cos(phi) + yy * math.sin(phi)
    v = -xx * math.sin(phi) + yy * math.cos(phi)
    body = _sigmoid((1.0 - np.hypot(u / a, v / b)) * min(a, b) / 0.8)
    hilum = np.exp(-0.5 * (np.hypot(u / (0.35 * a), (v - 0.7 * b) / (0.45 * b))) ** 2)
    values = body * (1.0 - 0.75 * hilum)
    return Patch((contrast * values).astype(np.float32), body >= 0.5, (float(half), float(half)))


#: 5 x 7 bitmaps of the marker letters
GLYPHS = {
    "A": ["01110", "10001", "10001", "11111", "10001", "10001", "10001"],
    "M": ["10001", "11011", "10101", "10101", "10001", "10001", "10001"],
    "T": ["11111", "00100", "00100", "00100", "00100", "00100", "00100"],
    "X": ["10001", "10001", "01010", "00100", "01010", "10001", "10001"],
    "K": ["10001", "10010", "10100", "11000", "10100", "10010", "10001"],
}


def render_marker(size_mm: float, spacing_mm: float, rng: np.random.Generator) -> Patch:
    """A radiopaque tag: a faint plate (square or round) with a bright border and a lead letter."""
    side = max(7, int(round(size_mm / spacing_mm)))
    values = np.zeros((side, side), np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    round_plate = rng.random() < 0.4
    if round_plate:
        rho = np.hypot(yy - side / 2, xx - side / 2)
        plate = rho <= side / 2
        border = plate & (rho >= side / 2 - max(1.0, side / 10))
    else:
        plate = np.ones((side, side), bool)
        bw = max(1, side // 10)
        border = np.zeros_like(plate)
        border[:bw], border[-bw:], border[:, :bw], border[:, -bw:] = True, True, True, True
    values[plate] = 0.35
    glyph = np.array([[c == "1" for c in row] for row in GLYPHS[rng.choice(sorted(GLYPHS))]])
    gh, gw = int(side * 0.6), int(side * 0.45)
    ri = np.clip(((np.arange(gh) + 0.5) / gh * 7).astype(int), 0, 6)
    ci = np.clip(((np.arange(gw) + 0.5) / gw * 5).astype(int), 0, 4)
    letter = glyph[ri][:, ci]
    r0, c0 = (side - gh) // 2, (side - gw) // 2
    values[r0 : r0 + gh, c0 : c0 + gw][letter] = 1.0
    values[border] = 0.95
    return Patch(values, plate, (side / 2.0, side / 2.0))
