"""Model input from a mammogram record: Mammo-CLIP's published pipeline, and a robust variant.

Both return a :class:`Preprocessed`: the float32 ``(3, H, W)`` model input and the
:class:`~napari_mammo_sae.geometry.Geometry` that maps every model-input point and feature-grid
cell back to original DICOM pixels and millimetres (and forward).

**Which one to use**

* ``mammoclip`` (:func:`preprocess_mammoclip`) reproduces the preprocessing Mammo-CLIP was trained
  and evaluated with, step by step. Use it for full-field digital mammograms like VinDr-Mammo's
  (clean black background, no burned-in labels): that is what the released checkpoints and the
  Mammo-SAE paper's figures assume, so results are comparable with the paper.
* ``robust`` (:func:`preprocess_robust`) first finds the breast as the largest bright region on the
  chest-wall side and blanks everything else. Use it for images unlike VinDr's - scanned film such as
  CBIS-DDSM (film borders, bright scanner edges, burned-in view labels, markers) or any image where
  the ``mammoclip`` crop misbehaves: its fixed "<= 40 of 255 is background" rule and "longest run of
  non-constant columns" assume a clean black background. On the eight CBIS-DDSM films of the
  ``mammograms`` package it cuts off the faint breast periphery (up to ~300 rows above and below the
  breast in the CC views) and keeps the labels' intensities in the 8-bit scaling. It changes the
  input distribution a little (labels blanked, contrast stretched over the breast only), so prefer
  ``mammoclip`` whenever it crops correctly.

**Mammo-CLIP's pipeline** (their ``preprocess_image_to_png_vindr.py`` + dataset code; SPEC section 2):

1. :func:`border_crop` - drop a 5-pixel border: ``img[5:-5, 5:-5]``.
2. :func:`to_uint8` - MONOCHROME1: ``img = max(img) - img``; then ``img -= min``; ``img /= max``;
   ``(img * 255).astype(uint8)`` in float32, i.e. *truncating*, exactly as their numpy code does.
3. :func:`longest_run_crop` - on a copy, values ``<= 40`` become 0; over the central 80% of rows a
   column is "on" if its standard deviation is non-zero (equivalently: it is not constant); keep the
   longest run of consecutive "on" columns; then the same for rows of the column-cropped image over
   its central 80% of columns; crop the un-thresholded image. Run lengths are scored with their
   ``np_CountUpContinuingOnes``, which counts a run touching either end of the array one short; we
   keep that quirk. Where two runs tie, their code keeps *both* (a non-contiguous crop); we keep the
   first, so that the crop stays a box. When no column is "on" the whole range is kept, as theirs does.
4. :func:`resize_area` - OpenCV ``INTER_AREA`` to ``(H, W)``, reproduced bit for bit for uint8
   (checked against ``cv2.resize`` 5.0 on thousands of random sizes, and on the whole pipeline for the
   eight CBIS-DDSM images; OpenCV is not a dependency). Downscaling: fractional-overlap box averaging
   with OpenCV's own tables (``computeResizeAreaTab``: cell width ``1 / (dst / src)``, overlaps under
   1e-3 pixel ignored, float32 weights), applied as separable banded weight matrices in OpenCV's
   order and precision (each row horizontally, then rows combined, float32), rounded half-to-even.
   Integer factors follow OpenCV's fast path (block sums; the 2x2 case rounds halves up). Upscaling
   either axis: OpenCV then uses, for both axes, its "area-mode" linear interpolation (``sx =
   floor(dx*scale)``, ``fx = float32((dx+1) - (sx+1)/scale)``, ``fx = 0 if fx <= 0 else frac(fx)``,
   taps ``sx, sx+1``) in 11-bit fixed point with its SIMD rounding, which we reproduce too.
   Float input is resized with the same weights in float32 (float64 for float64 input).
5. :func:`normalise` - float32, ``x -= x.min(); x /= x.max()`` (not /255), then
   ``(x - 0.3089279) / 0.25053555408335154``, repeated to 3 identical channels.

The geometry's crop box is ``(5 + row0, 5 + col0, 5 + row1, 5 + col1)`` - the border offset
included - and area resizing maps input edge ``0`` to the crop start and ``H`` to the crop end, so
model-input points map back to exact original pixels.

**Robust variant** (:func:`breast_region`): the breast mask is computed on a block-averaged copy
(longest side ~512 px). Li's minimum-cross-entropy threshold gives the tissue; nearly full bright
bands along the top/bottom edges and along the edge opposite the chest wall are cleared (film
borders, scanner edges); a binary opening separates thin borders and label strokes; the largest
component touching the chest-wall side is kept (else the largest). That core then grows into
connected pixels above 1/8 of Li's threshold (the faint skin line and the nipple), within 8% of the
image size of the core and away from the chest-wall edge, where film borders run; holes are filled.
The crop box is the mask's bounding box plus one block. The crop is area-resized, everything
outside the mask is set to the background level (labels and markers vanish), the contrast is
stretched over what remains to 8 bits, truncating (as Mammo-CLIP's PNGs are), and
:func:`normalise` follows. The geometry's crop box is that box (no 5-pixel border crop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, UnsupportedImageError
from .geometry import Geometry

if TYPE_CHECKING:  # pragma: no cover
    import torch

MAMMOCLIP_SIZE: tuple[int, int] = (1520, 912)
MAMMOCLIP_MEAN: float = 0.3089279
MAMMOCLIP_STD: float = 0.25053555408335154
BORDER: int = 5
BACKGROUND_LEVEL: int = 40  # Mammo-CLIP: values <= 40 (of 255) are background for the breast crop

#: bump when a preprocessor's output changes, so that caches keyed by the signature are rebuilt
#: the robust mask grows into pixels above this fraction of the Li threshold (skin line, nipple)
PERIPHERY_FRACTION = 0.125
_VERSIONS = {"mammoclip": 1, "robust": 1}


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """A model input (3, H, W) float32 and the geometry that maps it back to the original image."""

    image: np.ndarray
    geometry: Geometry
    method: str = "mammoclip"

    def tensor(self) -> torch.Tensor:
        """The image as a (1, 3, H, W) float32 torch tensor (shares memory with ``image``)."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.image)).unsqueeze(0)


# --------------------------------------------------------------------------------------------
# Mammo-CLIP steps
# --------------------------------------------------------------------------------------------
def border_crop(pixels: np.ndarray, border: int = BORDER) -> np.ndarray:
    """``pixels[border:-border, border:-border]`` (a view); refuses images too small to crop."""
    if pixels.ndim != 2:
        raise UnsupportedImageError(
            f"expected a 2-D grey image, got an array of shape {pixels.shape}"
        )
    if border == 0:
        return pixels
    if min(pixels.shape) <= 2 * border:
        raise UnsupportedImageError(
            f"image of {pixels.shape[0]} x {pixels.shape[1]} pixels is too small for the "
            f"{border}-pixel border crop: use an image larger than {2 * border + 1} pixels a side"
        )
    return pixels[border:-border, border:-border]


def to_uint8(pixels: np.ndarray, photometric: str = "MONOCHROME2") -> np.ndarray:
    """MONOCHROME1 inversion, min-max to [0, 1], times 255, cast to uint8 truncating (float32)."""
    data = np.asarray(pixels, dtype=np.float32)
    hi, lo = np.max(data), np.min(data)
    # float32 rounding is monotonic, so the min and max of the shifted image are the shifted min
    # and max: MONOCHROME1's ``max - x`` has minimum exactly 0 (nothing to subtract) and maximum
    # ``max - min``. That lets the image go through in row blocks of ~1M pixels, with the same
    # operations in the same order, instead of a float32 copy of the whole image.
    mono1 = photometric == "MONOCHROME1"
    top = hi - lo
    if not top > 0:
        raise UnsupportedImageError(
            "the image has a single grey value: there is nothing to analyse; check the file"
        )
    out = np.empty(data.shape, dtype=np.uint8)
    step = max(1, (1 << 20) // max(1, data.shape[-1]))
    for r in range(0, data.shape[0], step):
        block = hi - data[r : r + step] if mono1 else data[r : r + step] - lo
        block /= top
        block *= 255
        np.copyto(out[r : r + step], block, casting="unsafe")  # truncating, as astype(uint8)
    return out


def run_scores(on: np.ndarray) -> np.ndarray:
    """Score each element as Mammo-CLIP's ``np_CountUpContinuingOnes`` does.

    An "on" element gets the length of its run of consecutive "on" elements, minus one for each end
    of the array the run touches (their quirk, kept on purpose); "off" elements get -1.
    """
    b = np.asarray(on, dtype=bool).ravel()
    n = len(b)
    scores = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return scores
    edges = np.diff(np.concatenate(([0], b.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    lengths = stops - starts - (starts == 0) - (stops == n)
    scores[b] = np.repeat(lengths, stops - starts)
    return scores


def longest_run(on: np.ndarray) -> tuple[int, int]:
    """(start, stop) of the highest-scoring run of "on" elements (first one on ties); all if none."""
    scores = run_scores(on)
    n = len(scores)
    if n == 0:
        return (0, 0)
    best = scores.max()
    hits = np.flatnonzero(scores == best)
    start = int(hits[0])
    if best < 0 or not np.asarray(on, dtype=bool)[start]:
        return (0, n)  # nothing "on": Mammo-CLIP keeps everything
    # extend over the run containing ``start`` only (a tie elsewhere is ignored)
    breaks = np.flatnonzero(np.diff(hits) != 1)
    stop = int(hits[breaks[0]] + 1) if len(breaks) else int(hits[-1] + 1)
    return (start, stop)


def _non_constant(block: np.ndarray, axis: int, level: int) -> np.ndarray:
    """``np.where(block <= level, 0, block).std(axis) != 0`` without the thresholded copy."""
    hi = block.max(axis=axis)
    lo = block.min(axis=axis)
    hi = np.where(hi <= level, 0, hi)
    lo = np.where(lo <= level, 0, lo)
    return hi != lo


def longest_run_crop(img: np.ndarray, level: int = BACKGROUND_LEVEL) -> tuple[int, int, int, int]:
    """Mammo-CLIP's breast crop of a uint8 image: (row0, col0, row1, col1), rows/cols half-open."""
    height, width = img.shape
    y_a = height // 2 + int(height * 0.4)
    y_b = height // 2 - int(height * 0.4)
    c0, c1 = longest_run(_non_constant(img[y_b:y_a], 0, level))
    cropped = img[:, c0:c1]
    width = cropped.shape[1]
    x_a = width // 2 + int(width * 0.4)
    x_b = width // 2 - int(width * 0.4)
    r0, r1 = longest_run(_non_constant(cropped[:, x_b:x_a], 1, level))
    return (r0, c0, r1, c1)


def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV INTER_AREA downscaling taps along one axis: (first source index (n_out,), weights (n_out, K))."""
    inv_scale = n_out / n_in
    scale = 1.0 / inv_scale
    fsx1 = np.arange(n_out, dtype=np.float64) * scale
    fsx2 = fsx1 + scale
    cell = np.minimum(scale, n_in - fsx1)
    sx1 = np.ceil(fsx1).astype(np.int64)
    sx2 = np.floor(fsx2).astype(np.int64)
    sx2 = np.minimum(sx2, n_in - 1)
    sx1 = np.minimum(sx1, sx2)
    has_left = (sx1 - fsx1) > 1e-3
    has_right = (fsx2 - sx2) > 1e-3
    start = np.where(has_left, sx1 - 1, sx1)
    stop = np.where(has_right, sx2 + 1, sx2)  # exclusive
    k = int((stop - start).max())
    offs = np.arange(k)
    idx = start[:, None] + offs[None, :]
    weights = np.where((idx >= sx1[:, None]) & (idx < sx2[:, None]), 1.0 / cell[:, None], 0.0)
    left_w = np.where(has_left, (sx1 - fsx1) / cell, 0.0)
    right_w = np.where(has_right, np.minimum(np.minimum(fsx2 - sx2, 1.0), cell) / cell, 0.0)
    weights[:, 0] += np.where(has_left, left_w, 0.0)
    right_col = stop - start - 1
    weights[np.arange(n_out), right_col] += np.where(has_right, right_w, 0.0)
    return start, weights


def _area_linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV INTER_AREA taps when upscaling: its "area-mode" linear interpolation along one axis."""
    inv_scale = n_out / n_in
    scale = 1.0 / inv_scale
    dx = np.arange(n_out, dtype=np.float64)
    sx = np.floor(dx * scale).astype(np.int64)
    # OpenCV rounds fx to float32 before taking its fractional part; that rounding decides ties
    fx = ((dx + 1) - (sx + 1) * inv_scale).astype(np.float32).astype(np.float64)
    fx = np.where(fx <= 0, 0.0, fx - np.floor(fx))
    last = sx >= n_in - 1
    fx = np.where(last, 0.0, fx)
    sx = np.where(last, n_in - 1, sx)
    return sx, np.stack([1.0 - fx, fx], axis=1)


def area_weights(n_in: int, n_out: int, *, upscale_mode: bool | None = None) -> np.ndarray:
    """The dense (n_out, n_in) INTER_AREA weight matrix along one axis (for inspection and tests)."""
    if upscale_mode is None:
        upscale_mode = n_out > n_in
    start, w = (_area_linear_taps if upscale_mode else _area_taps)(n_in, n_out)
    out = np.zeros((n_out, n_in))
    for k in range(w.shape[1]):
        np.add.at(out, (np.arange(n_out), np.minimum(start + k, n_in - 1)), w[:, k])
    return out


def _apply_taps(
    x: np.ndarray, start: np.ndarray, weights: np.ndarray, axis: int, dtype: type
) -> np.ndarray:
    """Weighted sum of taps along ``axis``, accumulated tap by tap in ``dtype`` (OpenCV's order)."""
    n_in = x.shape[axis]
    weights = weights.astype(dtype)
    out = None
    for k in range(weights.shape[1]):
        w = weights[:, k]
        if not w.any():
            continue  # adding exact zeros changes nothing
        idx = np.minimum(start + k, n_in - 1)
        # x's taps converted to ``dtype`` and weighted in one pass (the same float products)
        if axis == 0:
            term = np.multiply(x[idx], w[:, None], dtype=dtype)
        else:
            term = np.multiply(x[:, idx], w[None, :], dtype=dtype)
        if out is None:
            out = term
        else:
            out += term
    assert out is not None
    return out


def _area_fast_uint8(img: np.ndarray, ky: int, kx: int) -> np.ndarray:
    """Integer-factor INTER_AREA of uint8 as OpenCV rounds it (its 2x2 path rounds halves up)."""
    h, w = img.shape[0] // ky, img.shape[1] // kx
    sums = img.reshape(h, ky, w, kx).sum(axis=(1, 3), dtype=np.int32)
    if (ky, kx) == (2, 2):
        return ((sums + 2) >> 2).astype(np.uint8)
    out = sums.astype(np.float32) * np.float32(1.0 / (ky * kx))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _area_linear_uint8(img: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    """INTER_AREA upscaling of uint8 in OpenCV's fixed point (11-bit weights, its SIMD rounding)."""
    h_in, w_in = img.shape
    r_start, r_w = _area_linear_taps(h_in, h_out)
    c_start, c_w = _area_linear_taps(w_in, w_out)

    def fixed(w: np.ndarray) -> np.ndarray:
        return np.rint(w.astype(np.float32) * np.float32(2048)).astype(np.int64)

    ca, ra = fixed(c_w), fixed(r_w)
    src = img.astype(np.int64)
    rows = src[:, c_start] * ca[:, 0] + src[:, np.minimum(c_start + 1, w_in - 1)] * ca[:, 1]
    s0 = rows[r_start] >> 4
    s1 = rows[np.minimum(r_start + 1, h_in - 1)] >> 4
    out = (((s0 * ra[:, :1]) >> 16) + ((s1 * ra[:, 1:]) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def resize_area(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D image to ``size = (H, W)`` like OpenCV ``INTER_AREA`` (see module docstring).

    uint8 input gives uint8 output (rounded half-to-even); any other input gives float64 output.
    """
    h_out, w_out = _check_size(size)
    if img.ndim != 2:
        raise UnsupportedImageError(f"expected a 2-D grey image, got an array of shape {img.shape}")
    h_in, w_in = img.shape
    if min(h_in, w_in) < 1:
        raise UnsupportedImageError("cannot resize an empty image: the crop removed everything")
    if (h_out, w_out) == (h_in, w_in):
        return img.copy() if img.dtype in (np.uint8, np.float64) else img.astype(np.float32)
    ky, kx = h_in // h_out, w_in // w_out
    if img.dtype == np.uint8 and (ky * h_out, kx * w_out) == (h_in, w_in) and ky * kx > 1:
        return _area_fast_uint8(img, ky, kx)
    if h_out > h_in or w_out > w_in:
        if img.dtype == np.uint8:
            return _area_linear_uint8(img, h_out, w_out)
        taps = _area_linear_taps
    else:
        taps = _area_taps
    r_start, r_w = taps(h_in, h_out)
    c_start, c_w = taps(w_in, w_out)
    # OpenCV sums each source row horizontally, then combines rows; float64 only for float64 input
    work = np.float64 if img.dtype == np.float64 else np.float32
    out = _apply_taps(_apply_taps(img, c_start, c_w, 1, work), r_start, r_w, 0, work)
    if img.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def normalise(img: np.ndarray) -> np.ndarray:
    """Mammo-CLIP's model-time step: float32, min-max (not /255), mean/std, 3 identical channels."""
    x = np.asarray(img, dtype=np.float32).copy()
    x -= x.min()
    top = x.max()
    if not top > 0:
        raise UnsupportedImageError(
            "the preprocessed image has a single grey value: there is nothing to analyse"
        )
    x /= top
    x = (x - MAMMOCLIP_MEAN) / MAMMOCLIP_STD
    x = x.astype(np.float32, copy=False)
    return np.ascontiguousarray(np.broadcast_to(x, (3, *x.shape)))


def _check_size(size: Any) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"size must be (H, W), got {size!r}") from exc
    if h < 1 or w < 1:
        raise ConfigError(f"size must be positive, got {h} x {w}")
    return (h, w)


def _pixels(record: Any) -> np.ndarray:
    pixels = getattr(record, "pixels", None)
    if pixels is None:
        raise UnsupportedImageError("the record carries no pixels")
    return np.asarray(pixels)


def preprocess_mammoclip(record: Any, size: tuple[int, int] = MAMMOCLIP_SIZE) -> Preprocessed:
    """Mammo-CLIP's published preprocessing of a mammogram record, with its geometry."""
    size = _check_size(size)
    pixels = _pixels(record)
    inner = border_crop(pixels)
    img8 = to_uint8(inner, getattr(record, "photometric", "MONOCHROME2"))
    r0, c0, r1, c1 = longest_run_crop(img8)
    resized = resize_area(img8[r0:r1, c0:c1], size)
    geometry = Geometry(
        original_shape=pixels.shape,
        crop_box=(BORDER + r0, BORDER + c0, BORDER + r1, BORDER + c1),
        input_shape=size,
        spacing_mm=tuple(getattr(record, "spacing_mm", (1.0, 1.0))),
    )
    return Preprocessed(normalise(resized), geometry, "mammoclip")


# --------------------------------------------------------------------------------------------
# robust variant
# --------------------------------------------------------------------------------------------
def block_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor x factor`` blocks (the ragged last rows/cols are dropped); float32."""
    if factor <= 1:
        return np.asarray(pixels, dtype=np.float32)
    h = (pixels.shape[0] // factor) * factor
    w = (pixels.shape[1] // factor) * factor
    blocks = pixels[:h, :w].reshape(h // factor, factor, w // factor, factor)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy * yy + xx * xx) <= radius * radius


@dataclass(frozen=True)
class BreastRegion:
    """The breast found by :func:`breast_region`: a low-resolution mask and its box in original pixels."""

    mask: np.ndarray  # bool, one element per factor x factor block of the original image
    factor: int
    box: tuple[int, int, int, int]  # (row0, col0, row1, col1) original edge coordinates
    chest_wall: str  # "left" | "right"


def _drop_edge_bands(mask: np.ndarray, chest_wall_left: bool, fraction: float = 0.9) -> None:
    """Clear nearly full bright bands along the top/bottom edges and the edge opposite the chest wall."""
    h, w = mask.shape
    edge = max(1, int(round(0.1 * h)))
    for rows in (slice(0, edge), slice(h - edge, h)):
        band = mask[rows]  # a view
        band[band.mean(axis=1) > fraction] = False
    edge_c = max(1, int(round(0.1 * w)))
    band = mask[:, w - edge_c :] if chest_wall_left else mask[:, :edge_c]
    band[:, band.mean(axis=0) > fraction] = False


def breast_region(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", *, work_size: int = 512
) -> BreastRegion:
    """Find the breast: largest bright region on the chest-wall side, without labels or borders."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_li

    if pixels.ndim != 2 or min(pixels.shape) < 8:
        raise UnsupportedImageError(
            f"image of shape {pixels.shape} is too small to find a breast region in"
        )
    factor = max(1, int(round(max(pixels.shape) / work_size)))
    small = block_mean(pixels, factor)
    if photometric == "MONOCHROME1":
        small = small.max() - small
    small = small - small.min()
    if not small.max() > 0:
        raise UnsupportedImageError(
            "the image has a single grey value: there is nothing to analyse; check the file"
        )
    level = float(threshold_li(small))
    mask = small > level
    h, w = mask.shape

    # chest-wall side: the side edge band with more tissue over the central rows
    band = max(1, int(round(0.15 * w)))
    mid = slice(int(0.1 * h), max(int(0.9 * h), int(0.1 * h) + 1))
    left_side = bool(mask[mid, :band].mean() >= mask[mid, w - band :].mean())
    _drop_edge_bands(mask, left_side)

    # core: the opened mask's largest component touching the chest-wall side
    radius = max(1, int(round(0.012 * max(h, w))))
    opened = ndi.binary_opening(mask, structure=_disk(radius))
    labels, n = ndi.label(opened if opened.any() else mask)
    if n == 0:
        raise UnsupportedImageError(
            "no breast region found (the image looks empty); check the file and its window"
        )
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    touch = max(1, int(round(0.05 * w)))
    side = labels[:, :touch] if left_side else labels[:, w - touch :]
    touching = np.zeros(n + 1, dtype=bool)
    touching[np.unique(side)] = True
    touching[0] = False
    candidates = np.where(touching, sizes, 0) if touching.any() else sizes
    keep = labels == int(np.argmax(candidates))
    core = (mask & ndi.binary_dilation(keep, structure=_disk(radius + 1))) | keep

    # periphery: the faint skin line and nipple lie below Li's threshold; grow the core into an
    # eighth of it, away from the chest-wall edge (where film borders run) and not too far
    low = small > level * PERIPHERY_FRACTION
    _drop_edge_bands(low, left_side)
    band_c = max(1, int(round(0.1 * w)))
    if left_side:
        low[:, :band_c] = False
    else:
        low[:, w - band_c :] = False
    low_labels, _ = ndi.label(low)
    ids = np.unique(low_labels[core & low])
    near = ndi.distance_transform_edt(~core) <= 0.08 * max(h, w)
    periphery = np.isin(low_labels, ids[ids > 0]) & near
    breast = ndi.binary_fill_holes(core | periphery)

    rows = np.flatnonzero(breast.any(axis=1))
    cols = np.flatnonzero(breast.any(axis=0))
    r0 = max(0, (int(rows[0]) - 1) * factor)
    r1 = min(pixels.shape[0], (int(rows[-1]) + 2) * factor)
    c0 = max(0, (int(cols[0]) - 1) * factor)
    c1 = min(pixels.shape[1], (int(cols[-1]) + 2) * factor)
    # the ragged last rows/cols (not in the block grid) belong to the box when it reaches the grid end
    if rows[-1] + 1 >= h:
        r1 = pixels.shape[0]
    if cols[-1] + 1 >= w:
        c1 = pixels.shape[1]
    return BreastRegion(breast, factor, (r0, c0, r1, c1), "left" if left_side else "right")


def preprocess_robust(record: Any, size: tuple[int, int] = MAMMOCLIP_SIZE) -> Preprocessed:
    """Crop to the largest breast region (labels and film borders blanked), then Mammo-CLIP scaling."""
    size = _check_size(size)
    pixels = _pixels(record)
    photometric = getattr(record, "photometric", "MONOCHROME2")
    region = breast_region(pixels, photometric)
    r0, c0, r1, c1 = region.box
    geometry = Geometry(
        original_shape=pixels.shape,
        crop_box=(r0, c0, r1, c1),
        input_shape=size,
        spacing_mm=tuple(getattr(record, "spacing_mm", (1.0, 1.0))),
    )
    resized = resize_area(np.asarray(pixels[r0:r1, c0:c1], dtype=np.float32), size)
    if photometric == "MONOCHROME1":
        resized = resized.max() - resized
    inside = input_mask(region, geometry)
    if not inside.any():
        raise UnsupportedImageError("no breast region found; check the file and its window")
    background = resized[inside].min()
    resized[~inside] = background
    resized -= background
    top = resized.max()
    if not top > 0:
        raise UnsupportedImageError(
            "the breast region has a single grey value: there is nothing to analyse"
        )
    resized /= top  # then * 255 and truncate, in Mammo-CLIP's order: the brightest pixel is 255
    resized *= 255
    img8 = resized.astype(np.uint8)
    return Preprocessed(normalise(img8), geometry, "robust")


def input_mask(region: BreastRegion, geometry: Geometry) -> np.ndarray:
    """The breast mask sampled at the centres of the model-input pixels, (H, W) bool."""
    h_in, w_in = geometry.input_shape
    rows = geometry.input_to_original(np.stack([np.arange(h_in) + 0.5, np.zeros(h_in)], axis=1))[
        :, 0
    ]
    cols = geometry.input_to_original(np.stack([np.zeros(w_in), np.arange(w_in) + 0.5], axis=1))[
        :, 1
    ]
    ri = np.clip((rows // region.factor).astype(np.int64), 0, region.mask.shape[0] - 1)
    ci = np.clip((cols // region.factor).astype(np.int64), 0, region.mask.shape[1] - 1)
    return region.mask[np.ix_(ri, ci)]


PREPROCESSORS: dict[str, Callable[..., Preprocessed]] = {
    "mammoclip": preprocess_mammoclip,
    "robust": preprocess_robust,
}


def preprocessing_signature(name: str, size: tuple[int, int] = MAMMOCLIP_SIZE) -> str:
    """A short string that changes whenever the preprocessing output would (for caches)."""
    if name not in PREPROCESSORS:
        raise ConfigError(f"unknown preprocessing {name!r}: use one of {', '.join(PREPROCESSORS)}")
    h, w = _check_size(size)
    return f"{name}-v{_VERSIONS[name]}-{h}x{w}-mean{MAMMOCLIP_MEAN}-std{MAMMOCLIP_STD}"
