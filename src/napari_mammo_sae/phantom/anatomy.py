"""Breast anatomy of a phantom view: outline, pectoral muscle, skin, nipple, glandular texture, vessels.

Everything is rendered in a *canonical frame* whose chest wall is the image's left edge (column 0), as
a left breast is displayed; right breasts are mirrored at the very end (``dataset.render_image``).
Sizes are physical (mm) so a small image at coarse spacing shows the same anatomy as a full-size one.

Intensities are in display units (dense = bright), roughly 0 (air) to 1:

* air ``AIR`` (about 0.03), fat about 0.32 x the compressed-thickness profile, glandular tissue up to
  ``GLAND`` more, pectoral muscle about 0.62, a skin rim about 0.1 brighter than the fat below it;
* fibroglandular tissue is a power-law texture (power spectrum 1/f^beta, beta about 3, elongated
  toward the nipple), thresholded so the dense fraction matches the BI-RADS density class
  (``DENSITY_FRACTION``) inside an envelope that spares the subcutaneous and retromammary fat;
* vessels run from the chest wall toward the nipple, ducts converge on the nipple.

Smooth parts are rendered on a coarse grid (about 0.4 mm) and interpolated to the output grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AIR = 0.03
FAT = 0.34
GLAND = 0.30
MUSCLE = 0.50
SKIN = 0.10
#: BI-RADS density class -> fraction of the glandular envelope that is dense tissue
DENSITY_FRACTION = {"A": 0.08, "B": 0.22, "C": 0.5, "D": 0.78}
#: how strongly the dense tissue shows (A: almost entirely fatty .. D: extremely dense)
DENSITY_CONTRAST = {"A": 0.75, "B": 0.9, "C": 1.0, "D": 1.05}
COARSE_MM = 0.4  # pixel size of the grid the smooth anatomy is rendered on


@dataclass(frozen=True)
class Outline:
    """Breast outline in the canonical frame, one value per output row (pixels, edge coordinates).

    The breast occupies columns ``[pectoral[r], edge[r])`` of row ``r`` (skin line at ``edge``; the
    pectoral muscle, MLO only, covers ``[0, pectoral[r])``); ``edge[r] == 0`` where no breast.
    """

    edge: np.ndarray  # (H,) float
    pectoral: np.ndarray  # (H,) float
    nipple: tuple[float, float]  # (row, col) of the nipple tip, pixels
    nipple_radius: float  # pixels
    view: str

    def mask(self, shape: tuple[int, int], step: float = 1.0) -> np.ndarray:
        """Boolean breast mask (skin included, nipple excluded) on a grid ``step`` pixels apart."""
        rows = _sample_rows(self.edge, shape[0], step)
        cols = (np.arange(shape[1], dtype=np.float32) + 0.5) * step
        return cols[None, :] < rows[:, None]

    def box_inside(self, box: tuple[float, float, float, float], margin: float = 0.0) -> bool:
        """Whether an edge-coordinate box (xmin, ymin, xmax, ymax) lies in breast tissue (no muscle)."""
        x0, y0, x1, y1 = box
        r0, r1 = math.floor(y0 - margin), math.ceil(y1 + margin)
        if r0 < 0 or r1 > len(self.edge) or x0 - margin < 0:
            return False
        edge = self.edge[r0:r1]
        pect = self.pectoral[r0:r1]
        return bool(edge.size and (x1 + margin <= edge).all() and (x0 - margin >= pect).all())


def _sample_rows(values: np.ndarray, n: int, step: float) -> np.ndarray:
    """Per-row values sampled at the centres of ``n`` rows ``step`` output pixels tall."""
    centres = (np.arange(n) + 0.5) * step - 0.5
    idx = np.clip(np.round(centres).astype(int), 0, len(values) - 1)
    return (values[idx] / 1.0).astype(np.float32)


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def make_outline(
    view: str, shape: tuple[int, int], spacing_mm: float, rng: np.random.Generator
) -> Outline:
    """A random, plausible breast outline for a CC (half ellipse) or MLO (with pectoral) view."""
    h, w = shape
    rows = np.arange(h, dtype=np.float64) + 0.5
    if view == "CC":
        depth = w * rng.uniform(0.52, 0.78)  # chest wall to nipple
        half = h * rng.uniform(0.33, 0.43)  # half the medio-lateral extent
        centre = h * rng.uniform(0.47, 0.53)
        p = rng.uniform(2.0, 2.6)  # super-ellipse exponent: fuller than an ellipse
        t = np.clip(np.abs(rows - centre) / half, 0.0, 1.0)
        edge = depth * (1.0 - t**p) ** (1.0 / p)
        edge[np.abs(rows - centre) >= half] = 0.0
        nipple_row = centre + rng.uniform(-0.06, 0.06) * half
        pectoral = np.zeros(h)
        if rng.random() < 0.25:  # a sliver of pectoral muscle at the chest wall (good positioning)
            pr = centre + rng.uniform(-0.3, 0.1) * half
            ph = half * rng.uniform(0.25, 0.45)
            pw = w * rng.uniform(0.02, 0.05)
            tt = np.clip(1.0 - ((rows - pr) / ph) ** 2, 0.0, None)
            pectoral = pw * np.sqrt(tt)
    else:  # MLO (and any oblique view)
        depth = w * rng.uniform(0.55, 0.8)
        nipple_t = rng.uniform(0.48, 0.6)  # nipple level as a fraction of the height
        bottom = h * rng.uniform(0.86, 0.97)  # inframammary fold
        nipple_row = h * nipple_t
        up = nipple_row / rng.uniform(0.8, 0.95)  # upper semi-axis: the breast leaves the top edge
        down = bottom - nipple_row
        p = rng.uniform(1.8, 2.3)
        d = np.where(rows < nipple_row, (nipple_row - rows) / up, (rows - nipple_row) / down)
        d = np.clip(d, 0.0, 1.0)
        edge = depth * (1.0 - d**p) ** (1.0 / p)
        edge[rows >= bottom] = 0.0
        # axillary tail: the outline above the nipple sags toward the chest wall a little
        edge *= 1.0 - 0.12 * _smoothstep(nipple_row - rows, 0.2 * h, 0.5 * h)
        # pectoral muscle: a wedge from the top of the chest wall, anterior border slightly convex
        top_w = min(depth * rng.uniform(0.35, 0.6), 0.85 * edge[0] if edge[0] > 0 else depth)
        length = h * rng.uniform(0.38, 0.62)
        s = np.clip(rows / length, 0.0, 1.0)
        bow = rng.uniform(0.75, 1.0)
        pectoral = top_w * (1.0 - s) ** bow
    nipple_col = float(np.interp(nipple_row, rows, edge))
    nipple_radius = rng.uniform(3.5, 6.5) / spacing_mm
    return Outline(
        edge=edge.astype(np.float32),
        pectoral=pectoral.astype(np.float32),
        nipple=(float(nipple_row), nipple_col),
        nipple_radius=float(nipple_radius),
        view="CC" if view == "CC" else "MLO",
    )


def power_law_noise(
    shape: tuple[int, int], beta: float, rng: np.random.Generator, elongation: float = 1.0
) -> np.ndarray:
    """Zero-mean, unit-variance noise with power spectrum 1/f^beta; ``elongation`` > 1 stretches
    structures along columns (toward the nipple)."""
    h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy**2 + (fx * elongation) ** 2)
    f[0, 0] = 1.0
    amp = f ** (-beta / 2.0)
    amp[0, 0] = 0.0
    amp[f < 1.0 / max(h, w)] *= 0.3  # tame the largest scales so texture, not shading, dominates
    spec = amp * (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape))
    out = np.fft.irfft2(spec, s=(h, w))
    out -= out.mean()
    out /= out.std() + 1e-12
    return out.astype(np.float32)


def _radial_texture(
    shape: tuple[int, int], nipple: tuple[float, float], beta: float, rng: np.random.Generator
) -> np.ndarray:
    """Power-law texture in polar coordinates about the nipple: strands that converge on it."""
    h, w = shape
    nr, nc = nipple
    rr = np.arange(h, dtype=np.float32)[:, None] + 0.5 - nr
    cc = np.arange(w, dtype=np.float32)[None, :] + 0.5 - nc
    dist = np.hypot(rr, cc)
    ang = np.arctan2(rr, -cc)  # 0 toward the chest wall
    n_r = int(dist.max() / 2.5) + 8  # radial samples every 2.5 px: strands elongated radially
    n_a = int(0.5 * max(h, w) * math.pi / 1.0) + 8  # angular samples ~1 px apart at mid radius
    tex = power_law_noise((n_r, n_a), beta, rng)
    coords = np.stack([dist / 2.5, (ang / math.pi + 1.0) * 0.5 * (n_a - 1)])
    out = ndimage.map_coordinates(tex, coords, order=1, mode="reflect")
    out -= out.mean()
    out /= out.std() + 1e-6
    # the spokes converge too fast right behind the nipple: fade them over the first 2 cm
    out *= _smoothstep(dist, 0.0, 0.1 * max(h, w))
    return out.astype(np.float32)


def _curves_image(
    shape: tuple[int, int], paths: list[np.ndarray], weights: list[float]
) -> np.ndarray:
    """Splat points of polylines (N x 2 row/col arrays) into an image."""
    img = np.zeros(shape, np.float32)
    for pts, wgt in zip(paths, weights, strict=True):
        r = np.round(pts[:, 0]).astype(int)
        c = np.round(pts[:, 1]).astype(int)
        ok = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
        np.add.at(img, (r[ok], c[ok]), wgt)
    return img


def _random_path(
    start: tuple[float, float], heading: float, length: float, step: float, rng: np.random.Generator,
    wiggle: float = 0.08,
) -> np.ndarray:  # fmt: skip
    n = max(2, int(length / step))
    turns = np.cumsum(rng.normal(0.0, wiggle, n))
    turns = ndimage.gaussian_filter1d(turns, 3)
    ang = heading + turns
    pts = np.empty((n, 2))
    pts[0] = start
    pts[1:, 0] = start[0] + np.cumsum(np.sin(ang[1:]) * step)
    pts[1:, 1] = start[1] + np.cumsum(np.cos(ang[1:]) * step)
    return pts


@dataclass
class Anatomy:
    """The rendered background of one view (coarse grid) and what lesions need to know."""

    image: np.ndarray  # coarse-grid display intensity, canonical frame
    gland: np.ndarray  # coarse-grid glandular fraction 0..1
    outline: Outline
    factor: int  # output pixels per coarse pixel
    density: str


def render_anatomy(
    view: str,
    shape: tuple[int, int],
    spacing_mm: float,
    density: str,
    rng: np.random.Generator,
    beta: float = 3.0,
    outline_rng: np.random.Generator | None = None,
) -> Anatomy:
    """Breast background of one view: outline, skin, nipple, fat, glandular texture, vessels.

    ``outline_rng`` draws the outline (give both breasts of a study the same seed for symmetric
    breasts); the image's own ``rng`` then varies its size by a few per cent.
    """
    h, w = shape
    factor = max(1, int(round(COARSE_MM / spacing_mm)))
    ch, cw = -(-h // factor), -(-w // factor)
    cmm = spacing_mm * factor  # coarse pixel size in mm
    outline = make_outline(view, shape, spacing_mm, outline_rng or rng)
    scale = rng.uniform(0.95, 1.03)  # left and right breasts differ a little
    outline = Outline(
        edge=np.minimum(outline.edge * scale, w - 0.12 * w).astype(np.float32),
        pectoral=outline.pectoral * rng.uniform(0.9, 1.1),
        nipple=(outline.nipple[0], outline.nipple[1] * scale),
        nipple_radius=outline.nipple_radius,
        view=outline.view,
    )

    # soft breast mask on the coarse grid (skin edge anti-aliased)
    edge_c = _sample_rows(outline.edge, ch, factor) / factor
    pect_c = _sample_rows(outline.pectoral, ch, factor) / factor
    cols = np.arange(cw, dtype=np.float32)[None, :] + 0.5
    inside = np.clip(edge_c[:, None] - cols + 0.5, 0.0, 1.0)
    # nipple: a small half-disc beyond the outline
    nr, nc = outline.nipple[0] / factor, outline.nipple[1] / factor
    rad = outline.nipple_radius / factor
    rr = np.arange(ch, dtype=np.float32)[:, None] + 0.5
    nip = np.clip(rad - np.hypot(rr - nr, (cols - nc) * 1.3) + 0.5, 0.0, 1.0)
    nip *= cols >= nc - 1
    # distance to the skin (mm), from a ~1 mm grid
    step = max(1, int(round(1.0 / cmm)))
    small = inside[::step, ::step] > 0.5
    dist = ndimage.distance_transform_edt(np.pad(small, ((1, 1), (0, 1)), constant_values=False))
    dist = dist[1:-1, :-1] * step * cmm
    dist = _upsample(dist.astype(np.float32), step, (ch, cw))
    depth_mm = float(outline.edge.max()) * spacing_mm
    x_mm = cols * cmm

    # compressed thickness falls toward the skin (peripheral band 8-20 mm)
    band = rng.uniform(8.0, 20.0)
    thick = 0.62 + 0.38 * _smoothstep(dist, 0.0, band) ** 0.7

    # glandular envelope: spares subcutaneous and retromammary fat, fuller behind the nipple
    env = _smoothstep(dist, rng.uniform(4.0, 9.0), rng.uniform(14.0, 24.0))
    env *= _smoothstep(x_mm, 0.06 * depth_mm, rng.uniform(0.18, 0.32) * depth_mm)
    axis_r = (rr - nr) * cmm
    spread = rng.uniform(0.35, 0.55) * depth_mm
    env *= 0.35 + 0.65 * np.exp(-0.5 * (axis_r / spread) ** 2)
    if view == "CC":  # more gland in the lateral half (image top in the standard CC)
        env *= 1.0 + 0.25 * np.tanh(-(rr - nr) * cmm / 30.0)
    if view != "CC":
        env *= _smoothstep(
            cols - pect_c[:, None], 2.0 / cmm, 10.0 / cmm
        )  # no gland inside the muscle
    noise = 0.45 * power_law_noise((ch, cw), beta, rng, elongation=1.3)
    noise += 0.75 * _radial_texture((ch, cw), (nr, nc), beta, rng)
    fine = power_law_noise((ch, cw), 2.0, rng, elongation=1.5)
    core = env > 0.5
    frac = DENSITY_FRACTION[density]
    thr = float(np.quantile(noise[core], 1.0 - frac)) if core.any() else 0.0
    gland = env * (1.0 / (1.0 + np.exp(-(noise - thr) / 0.28)))
    gland = np.clip(gland + 0.08 * fine * env, 0.0, 1.0).astype(np.float32)

    img = FAT * thick + GLAND * DENSITY_CONTRAST[density] * gland * thick
    img += 0.018 * fine * thick  # fat lobules, Cooper's ligaments

    # vessels (chest wall -> nipple) and ducts (converging on the nipple)
    paths, weights = [], []
    rows_in = np.nonzero(edge_c > 10)[0]
    for _ in range(rng.integers(2, 6)):
        if rows_in.size == 0:
            break
        r0 = float(rng.choice(rows_in))
        c0 = float(pect_c[int(r0)]) + 2.0
        heading = math.atan2(nr - r0, nc - c0) + rng.normal(0.0, 0.25)
        length = rng.uniform(0.35, 0.8) * edge_c[int(r0)]
        paths.append(_random_path((r0, c0), heading, length, 0.5, rng))
        weights.append(rng.uniform(0.9, 1.6))
    for _ in range(rng.integers(4, 9)):
        heading = math.pi + rng.normal(0.0, 0.5)
        length = rng.uniform(15.0, 45.0) / cmm
        paths.append(_random_path((nr, nc - rad), heading, length, 0.5, rng, wiggle=0.05))
        weights.append(rng.uniform(0.15, 0.35))
    if paths:
        sigma = max(0.6, 0.7 / cmm)
        lines = ndimage.gaussian_filter(_curves_image((ch, cw), paths, weights), sigma)
        lines *= 0.5 / (2 * math.pi * sigma**2) ** 0.5
        img += 0.09 * np.clip(lines, 0.0, 1.5) * thick

    if view != "CC" or pect_c.max() > 0:
        soft = 0.5 if view != "CC" else 2.5 / cmm  # a CC shows only a blurred sliver of muscle
        pm = np.clip((pect_c[:, None] - cols) / (2 * soft) + 0.5, 0.0, 1.0)
        if view == "CC":
            pm *= 0.55
        across = np.clip(1.0 - cols / np.maximum(pect_c[:, None], 1.0), 0.0, 1.0)
        muscle = MUSCLE * (0.8 + 0.25 * np.sqrt(across)) * (1.0 - 0.1 * rr / ch) + 0.015 * fine
        img = img * (1.0 - pm) + muscle * pm

    # skin rim (1-2 mm) and nipple
    skin_mm = rng.uniform(1.0, 2.0)
    rim = np.exp(-0.5 * (dist / (skin_mm * 0.6)) ** 2) * (inside > 0)
    img += SKIN * rim
    img = img * inside + (FAT * 0.75 + SKIN) * nip * (1.0 - inside)
    img += AIR * (1.0 - np.maximum(inside, nip))
    return Anatomy(
        image=img.astype(np.float32),
        gland=gland,
        outline=outline,
        factor=factor,
        density=density,
    )


def _upsample(
    img: np.ndarray, factor: int, shape: tuple[int, int], align_right: bool = False
) -> np.ndarray:
    """Bilinear interpolation of a coarse grid (pixel centres aligned) to ``shape``.

    The coarse grid may overhang the output by up to ``factor - 1`` pixels: cut on the right, or on
    the left with ``align_right`` (a mirrored coarse grid).
    """
    img = np.asarray(img, np.float32)
    if factor == 1:
        c0 = img.shape[1] - shape[1] if align_right else 0
        return np.ascontiguousarray(img[: shape[0], c0 : c0 + shape[1]])
    rows = _upsample_rows(img, factor)[: shape[0]]
    cols = _upsample_rows(np.ascontiguousarray(rows.T), factor).T
    c0 = cols.shape[1] - shape[1] if align_right else 0
    return np.ascontiguousarray(cols[:, c0 : c0 + shape[1]])


def _upsample_rows(a: np.ndarray, k: int) -> np.ndarray:
    """Linear interpolation by an integer factor along axis 0, one slice per phase (no gathers)."""
    pad = np.concatenate([a[:1], a, a[-1:]], axis=0)  # edge-replicated: index i -> pad[i + 1]
    n_in = a.shape[0]
    out = np.empty((n_in, k) + a.shape[1:], np.float32)
    for p in range(k):
        pos = (p + 0.5) / k - 0.5  # offset of output sample p from coarse centre i
        if pos < 0:
            lo, hi, f = pad[:-2], pad[1:-1], np.float32(1.0 + pos)  # between i-1 and i
        else:
            lo, hi, f = pad[1:-1], pad[2:], np.float32(pos)
        dst = out[:, p]
        np.multiply(lo, np.float32(1.0) - f, out=dst)
        dst += hi * f
    return out.reshape((n_in * k,) + a.shape[1:])


upsample = _upsample
