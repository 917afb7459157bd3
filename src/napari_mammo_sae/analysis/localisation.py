"""Neuron heatmaps -> boxes, IoU, average precision at IoU 0.25 (the paper's Table 2), box agreement.

A heatmap is a latent map ``(h, w)`` over the feature grid. Boxes come out as
``(xmin, ymin, xmax, ymax)`` in edge coordinates (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``),
in original DICOM pixels when a :class:`~napari_mammo_sae.geometry.Geometry` is given, else in
model-input pixels.

Two thresholding methods:

- ``"percentile"`` (the paper's text, default): the heatmap is bilinearly upsampled to the model
  input (``align_corners=False``, so feature-cell edges land on the input grid as in the
  architecture contract), pixels strictly above its 95th percentile are kept, and each 8-connected
  component gives one box.
- ``"contour"`` (the paper's code): pixels at or above ``0.3 x max`` are kept, each external contour
  (= 8-connected component with its holes filled) gives one box if its contour area is >= 10 px.
  The contour area is OpenCV's ``contourArea`` of the polygon through the boundary pixel centres,
  computed here without OpenCV by Pick's theorem (``pixels - boundary/2 - 1``; exact for convex
  components, a close estimate otherwise).

Each box carries a confidence score, ``score="max"`` (default: the upsampled heatmap's maximum inside
the component) or ``score="mean"`` (the component's mean activation). Average precision ranks all
boxes of a dataset by that score.

``space="input"`` thresholds at model-input resolution and maps boxes to the original image through
the geometry (an exact affine map for the crop + resize); ``space="original"`` resamples the heatmap
directly onto the original pixels of the crop box and thresholds there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]  # (xmin, ymin, xmax, ymax), edge coordinates

METHODS = ("percentile", "contour")
SCORES = ("max", "mean")
SPACES = ("input", "original")


@dataclass(frozen=True)
class ScoredBox:
    """A predicted box with its confidence score."""

    box: Box
    score: float


# --- resampling --------------------------------------------------------------------------------
def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1-D linear resampling with align_corners=False."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, None)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    return i0, i1, w1


def upsample_heatmap(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to ``shape`` like ``F.interpolate(align_corners=False)``."""
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heat.shape}")
    H, W = int(shape[0]), int(shape[1])
    r0, r1, wr = _linear_weights(heat.shape[0], H)
    c0, c1, wc = _linear_weights(heat.shape[1], W)
    wr = wr.astype(np.float32)[:, None]
    wc = wc.astype(np.float32)[None, :]
    rows = heat[r0] * (1 - wr) + heat[r1] * wr
    return rows[:, c0] * (1 - wc) + rows[:, c1] * wc


# --- boxes from a map --------------------------------------------------------------------------
def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    return ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))


def _contour_area(filled: np.ndarray) -> float:
    """OpenCV-style contour area of one filled component (Pick's theorem on pixel centres)."""
    from scipy import ndimage

    count = int(filled.sum())
    if count < 3:
        return 0.0
    interior = ndimage.binary_erosion(filled, structure=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]]))
    boundary = count - int(interior.sum())
    return max(0.0, count - boundary / 2.0 - 1.0)


def _mask(heat: np.ndarray, method: str, percentile: float, fraction: float) -> np.ndarray:
    peak = float(heat.max()) if heat.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        return np.zeros(heat.shape, dtype=bool)  # a neuron that never fires localises nothing
    if method == "percentile":
        thr = float(np.percentile(heat, percentile))
        mask = heat > thr
        if not mask.any():  # a plateau at the maximum: keep the plateau
            mask = heat >= thr
        return mask
    if method == "contour":
        return heat >= fraction * peak
    raise ValueError(f"unknown threshold method {method!r}: use one of {', '.join(METHODS)}")


def map_boxes(
    heat: np.ndarray,
    *,
    method: str = "percentile",
    percentile: float = 95.0,
    fraction: float = 0.3,
    min_area: float = 10.0,
    score: str = "max",
) -> list[ScoredBox]:
    """Boxes of the thresholded components of a map, in that map's pixel edge coordinates."""
    from scipy import ndimage

    if score not in SCORES:
        raise ValueError(f"unknown box score {score!r}: use one of {', '.join(SCORES)}")
    heat = np.asarray(heat, dtype=np.float32)
    mask = _mask(heat, method, percentile, fraction)
    labels, n = _components(mask)
    if n == 0:
        return []
    out: list[ScoredBox] = []
    for k, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None:
            continue
        rows, cols = sl
        own = labels[sl] == k + 1  # the component within its bounding box
        if method == "contour":
            if _contour_area(ndimage.binary_fill_holes(own)) < min_area:
                continue
        box = (float(cols.start), float(rows.start), float(cols.stop), float(rows.stop))
        # the score from the component's own pixels (scipy's labelled maximum/mean over the whole
        # map cost 0.03 s per map at 768 x 480, most of evaluate's localisation time)
        values = heat[sl][own]
        value = values.max() if score == "max" else values.mean(dtype=np.float64)
        out.append(ScoredBox(box, float(value)))
    out.sort(key=lambda b: -b.score)
    return out


def _box_input_to_original(geometry: Any, box: Box) -> Box:
    """Map an input-space box to original pixels with the geometry's own helpers."""
    if hasattr(geometry, "box_to_original"):
        mapped = geometry.box_to_original(box)
        return tuple(float(v) for v in np.asarray(mapped, dtype=np.float64).ravel()[:4])  # type: ignore[return-value]
    xmin, ymin, xmax, ymax = box
    rc = geometry.input_to_original(np.array([[ymin, xmin], [ymax, xmax]], dtype=np.float64))
    (r0, c0), (r1, c1) = np.asarray(rc, dtype=np.float64)
    return (float(min(c0, c1)), float(min(r0, r1)), float(max(c0, c1)), float(max(r0, r1)))


def heatmap_boxes(
    heatmap: np.ndarray,
    geometry: Any | None = None,
    *,
    percentile: float = 95.0,
    method: str = "percentile",
    fraction: float = 0.3,
    min_area: float = 10.0,
    score: str = "max",
    space: str = "input",
    input_shape: tuple[int, int] | None = None,
) -> list[ScoredBox]:
    """Boxes of a neuron heatmap (feature grid), best score first.

    With ``geometry`` the boxes are in original DICOM pixels, else in model-input pixels of
    ``input_shape`` (default: the heatmap's own grid, i.e. feature-cell units).
    """
    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}: use one of {', '.join(SPACES)}")
    heatmap = np.asarray(heatmap, dtype=np.float32)
    kw = dict(
        method=method, percentile=percentile, fraction=fraction, min_area=min_area, score=score
    )
    if geometry is None:
        shape = tuple(input_shape) if input_shape is not None else heatmap.shape
        return map_boxes(upsample_heatmap(heatmap, shape), **kw)  # type: ignore[arg-type]
    if space == "input":
        heat = upsample_heatmap(heatmap, tuple(geometry.input_shape))
        return [
            ScoredBox(_box_input_to_original(geometry, b.box), b.score)
            for b in map_boxes(heat, **kw)  # type: ignore[arg-type]
        ]
    r0, c0, r1, c1 = (float(v) for v in geometry.crop_box)
    rows, cols = max(1, round(r1 - r0)), max(1, round(c1 - c0))
    heat = upsample_heatmap(heatmap, (rows, cols))
    sy, sx = (r1 - r0) / rows, (c1 - c0) / cols
    out = []
    for b in map_boxes(heat, **kw):  # type: ignore[arg-type]
        xmin, ymin, xmax, ymax = b.box
        out.append(
            ScoredBox((c0 + xmin * sx, r0 + ymin * sy, c0 + xmax * sx, r0 + ymax * sy), b.score)
        )
    return out


# --- overlap and average precision -------------------------------------------------------------
def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (xmin, ymin, xmax, ymax) boxes; 0 for empty boxes."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def iou_matrix(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]]) -> np.ndarray:
    """Pairwise IoU, shape (len(pred), len(gt))."""
    p = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    g = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    ix = np.minimum(p[:, None, 2], g[None, :, 2]) - np.maximum(p[:, None, 0], g[None, :, 0])
    iy = np.minimum(p[:, None, 3], g[None, :, 3]) - np.maximum(p[:, None, 1], g[None, :, 1])
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    ap = np.clip(p[:, 2] - p[:, 0], 0, None) * np.clip(p[:, 3] - p[:, 1], 0, None)
    ag = np.clip(g[:, 2] - g[:, 0], 0, None) * np.clip(g[:, 3] - g[:, 1], 0, None)
    union = ap[:, None] + ag[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, inter / union, 0.0)
    return out


def average_precision(
    predictions: Mapping[str, Sequence[ScoredBox]] | Sequence[ScoredBox],
    ground_truth: Mapping[str, Sequence[Sequence[float]]] | Sequence[Sequence[float]],
    iou_threshold: float = 0.25,
) -> float:
    """Average precision of scored boxes against ground-truth boxes (VOC all-point interpolation).

    ``predictions`` and ``ground_truth`` map an image id to its boxes (or are one image's lists).
    Boxes are ranked by score over the whole dataset; each is a true positive if it overlaps a
    not-yet-matched ground-truth box of its image with IoU >= ``iou_threshold`` (the best such box
    is taken). Images present only in ``predictions`` contribute false positives. NaN when there is
    no ground-truth box at all.
    """
    if not isinstance(predictions, Mapping):
        predictions = {"_": list(predictions)}
        ground_truth = {"_": list(ground_truth)}  # type: ignore[arg-type]
    gt = {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in ground_truth.items()}  # type: ignore[union-attr]
    n_gt = sum(len(v) for v in gt.values())
    if n_gt == 0:
        return math.nan
    flat = [(b.score, image_id, b.box) for image_id, boxes in predictions.items() for b in boxes]
    if not flat:
        return 0.0
    flat.sort(key=lambda t: -t[0])
    matched = {k: np.zeros(len(v), dtype=bool) for k, v in gt.items()}
    tp = np.zeros(len(flat))
    for n, (_, image_id, box) in enumerate(flat):
        boxes = gt.get(image_id)
        if boxes is None or len(boxes) == 0:
            continue
        overlaps = iou_matrix([box], boxes)[0]
        overlaps[matched[image_id]] = -1.0
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou_threshold:
            tp[n] = 1.0
            matched[image_id][best] = True
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, len(flat) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


AP_PROTOCOLS = {
    "finding-images": "the paper's protocol: only the test images with a box of the concept are "
    "scored (a neuron that also fires on images without a finding is not penalised)",
    "whole-split": "every test image is scored: boxes on images without a finding of the concept "
    "are false positives",
}


def split_average_precision(
    predictions: Mapping[str, Sequence[ScoredBox]],
    ground_truth: Mapping[str, Sequence[Sequence[float]]],
    image_ids: Iterable[str],
    protocol: str,
    iou_threshold: float = 0.25,
) -> float:
    """AP of one neuron's boxes over a split's ``image_ids`` under an :data:`AP_PROTOCOLS` protocol.

    ``"finding-images"`` keeps the images with at least one ground-truth box; ``"whole-split"``
    keeps them all, so every box on an image without a finding counts as a false positive.
    Images missing from ``predictions`` have no boxes; NaN when no kept image has a box.
    """
    if protocol not in AP_PROTOCOLS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown AP protocol {protocol!r}: use one of {', '.join(AP_PROTOCOLS)}")
    ids = list(dict.fromkeys(image_ids))
    if protocol == "finding-images":
        ids = [i for i in ids if len(ground_truth.get(i, [])) > 0]
    pred = {i: list(predictions.get(i, [])) for i in ids}
    truth = {i: list(ground_truth.get(i, [])) for i in ids}
    return average_precision(pred, truth, iou_threshold)


def neuron_average_precision(
    heatmaps: Iterable[tuple[str, np.ndarray, Any]],
    ground_truth: Mapping[str, Sequence[Sequence[float]]],
    *,
    iou_threshold: float = 0.25,
    **box_kw: Any,
) -> float:
    """AP@iou of one neuron over a dataset: ``heatmaps`` yields (image_id, heatmap, geometry)."""
    predictions = {
        image_id: heatmap_boxes(heat, geometry, **box_kw) for image_id, heat, geometry in heatmaps
    }
    gt = {k: v for k, v in ground_truth.items() if k in predictions}
    return average_precision(predictions, gt, iou_threshold)


# --- box agreement (GUI) -----------------------------------------------------------------------
@dataclass(frozen=True)
class BoxAgreement:
    """IoU of a neuron's top box with the nearest annotation box (None when either is missing)."""

    iou: float
    box: Box | None
    annotation: Box | None


def box_agreement(
    heatmap: np.ndarray,
    annotations: Sequence[Sequence[float]],
    geometry: Any | None = None,
    **box_kw: Any,
) -> BoxAgreement:
    """IoU of the heatmap's best 95th-percentile box with the annotation box that overlaps it most.

    The "best" box is the one with the highest score (the component holding the heatmap's maximum
    with the default ``score="max"``). When no annotation overlaps it, the nearest annotation by
    centre distance is reported with IoU 0.
    """
    boxes = heatmap_boxes(heatmap, geometry, **box_kw)
    if not boxes:
        return BoxAgreement(0.0, None, None)
    top = boxes[0].box
    if len(annotations) == 0:
        return BoxAgreement(0.0, top, None)
    ann = np.asarray(annotations, dtype=np.float64).reshape(-1, 4)
    overlaps = iou_matrix([top], ann)[0]
    best = int(np.argmax(overlaps))
    if overlaps[best] <= 0:
        centre = np.array([(top[0] + top[2]) / 2, (top[1] + top[3]) / 2])
        centres = np.stack([(ann[:, 0] + ann[:, 2]) / 2, (ann[:, 1] + ann[:, 3]) / 2], axis=1)
        best = int(np.argmin(np.linalg.norm(centres - centre, axis=1)))
    return BoxAgreement(float(overlaps[best]), top, tuple(float(v) for v in ann[best]))  # type: ignore[arg-type]
