"""Localisation at any layer: Table 2's AP@0.25 at the store's hook point, with both box rules.

A heatmap box is made of feature cells (bilinear upsampling blurs it by about a cell), so a finding
smaller than a cell cannot be matched at IoU 0.25 whatever the box rule: at the last layer of the
demo's 768 x 480 TinyNet (stride 32, a 24 x 15 grid) a cell is about 12 mm, at ``extract --hook
stage3`` (stride 16, 48 x 30) about 6 mm. So the rows say how large a cell and a finding are. For
one run - a feature store at any hook point, the SAE trained on that layer, the concept - this
module reports, per box rule of :mod:`..analysis.localisation` (``percentile``: the paper's 95th
percentile; ``contour``: the paper code's 0.3 x max contours), one row of ``localisation.csv``:

``layer``, ``concept``, ``grid`` ("h x w")
    the store's hook point, the concept, the feature grid.
``cell_mm_row``, ``cell_mm_col``
    the feature cell in millimetres: model-input pixel size times the stride (input size / grid),
    median over the test images.
``finding_span_cells_row``, ``finding_span_cells_col``, ``n_finding_boxes``
    the median extent of the concept's ground-truth boxes on the test images, in feature cells
    (fractional: the box mapped onto the grid with ``Geometry.original_to_feature``, clipped to
    the grid), and how many boxes that median is over. Below 1, a finding fits inside one cell.
``method``, ``k``, ``neurons``
    the box rule; the top-k class-1 neurons by the paper's class mean over the store's training
    split (``pipeline.shortcuts.class1_top_neurons``, the ranking of the shortcut report).
``mean_ap_finding_images``, ``mean_ap_whole_split``, ``n_finding_images``, ``n_whole_split``
    mean AP@0.25 of those neurons under the two protocols of ``AP_PROTOCOLS`` (the paper's: test
    images with a finding only; every test image) and the image counts (``localisation_table``).

What explains an AP (same neurons, finding images only):

``recall_ceiling``
    mean over the neurons of the share of finding boxes that some box of the neuron on that image
    overlaps at IoU >= 0.25 - the highest recall its AP can reach.
``median_best_iou``
    median over (neuron, finding box) of the best IoU any box of the neuron on that image reaches.
``pred_span_cells_row``, ``pred_span_cells_col``
    median extent, in feature cells, of each neuron's best-scored box on each finding image (a box
    many times the finding's span caps the IoU at the ratio of their areas).
``boxes_per_image``
    mean number of boxes per neuron and test image (each box on an image without a finding is a
    false positive of the whole-split protocol).

Every run encodes the store's test split with its SAE on the CPU or ``device``; nothing here
re-implements the ranking (``shortcuts.class1_top_neurons``) or the boxes and APs
(:func:`neuron_boxes`, :func:`localisation_table`, which ``evaluate``'s Table 2 uses too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..analysis.localisation import AP_PROTOCOLS, METHODS, split_average_precision

Box = tuple[float, float, float, float]
IOU = 0.25

#: localisation.csv columns, in file order
COLUMNS = (
    "layer", "concept", "grid", "cell_mm_row", "cell_mm_col", "finding_span_cells_row",
    "finding_span_cells_col", "n_finding_boxes", "method", "k", "neurons",
    "mean_ap_finding_images", "mean_ap_whole_split", "n_finding_images", "n_whole_split",
    "recall_ceiling", "median_best_iou", "pred_span_cells_row", "pred_span_cells_col",
    "boxes_per_image",
)  # fmt: skip


# --- Table 2's pieces (evaluate imports them from here) -----------------------------------------
def neuron_boxes(
    summary: Any,
    sae: Any,
    neurons: list[int],
    rows: Sequence[int],
    *,
    device: str = "cpu",
    progress: Any = None,
    **box_kw: Any,
) -> dict[int, dict[str, list]]:
    """neuron -> image_id -> scored boxes (original pixels) of its heatmap, for the given rows.

    ``summary`` is anything with a ``.view`` (a feature store); ``box_kw`` go to
    ``analysis.localisation.heatmap_boxes`` (``method``, ``score``, ...)."""
    import torch

    from ..analysis.localisation import heatmap_boxes
    from .probe import encode_latents

    out: dict[int, dict[str, list]] = {n: {} for n in neurons}
    if not neurons or len(rows) == 0:
        return out
    view = summary.view
    for row, fmap in view.iter_maps(np.asarray(sorted(set(int(r) for r in rows)))):
        c, h, w = fmap.shape
        tokens = torch.as_tensor(np.asarray(fmap), device=device).float().reshape(c, -1).T
        with torch.inference_mode():
            z = encode_latents(sae, tokens, neurons).float().cpu().numpy()
        geometry = view.geometry(row)
        image_id = str(view.index.image_id[row])
        for col, n in enumerate(neurons):
            out[n][image_id] = heatmap_boxes(z[:, col].reshape(h, w), geometry, **box_kw)
        if progress is not None:
            progress.update(1)
    return out


def localisation_table(
    boxes: dict[int, dict[str, list]],
    gt: Mapping[str, list],
    neurons: list[int],
    image_ids: Sequence[str],
) -> dict:
    """Table 2 row: AP@0.25 per neuron under both protocols over the test ``image_ids``.

    ``finding_images``: the paper's protocol (images with a box of the concept only);
    ``whole_split``: every test image, so boxes on images without a finding are false positives.
    Means skip undefined (NaN) APs.
    """
    row: dict[str, Any] = {"neurons": [int(n) for n in neurons]}
    for protocol in AP_PROTOCOLS:
        key = protocol.replace("-", "_")
        aps = [split_average_precision(boxes[n], gt, image_ids, protocol, IOU) for n in neurons]
        row[f"ap_{key}"] = aps
        row[f"mean_ap_{key}"] = _nanmean(aps)
    row["n_finding_images"] = sum(1 for i in image_ids if gt.get(i))
    row["n_whole_split"] = len(list(dict.fromkeys(image_ids)))
    return row


def _nanmean(values: Iterable[float]) -> float:
    finite = [float(a) for a in values if not math.isnan(a)]
    return float(np.mean(finite)) if finite else math.nan


def _nanmedian(values: Iterable[float]) -> float:
    v = [float(a) for a in values if not math.isnan(a)]
    return float(np.median(v)) if v else math.nan


# --- grid measures -------------------------------------------------------------------------------
def cell_mm(geometry: Any, grid: tuple[int, int]) -> tuple[float, float]:
    """(row, col) size of a feature cell in mm: the model-input pixel size times the stride."""
    h, w = (int(v) for v in grid)
    sy, sx = geometry.input_spacing_mm
    return (float(sy) * geometry.input_shape[0] / h, float(sx) * geometry.input_shape[1] / w)


def span_cells(geometry: Any, box: Sequence[float], grid: tuple[int, int]) -> tuple[float, float]:
    """(rows, cols) extent of an original-pixel box (xmin, ymin, xmax, ymax) in feature cells,
    fractional, the part outside the grid (cut away by the crop) left out."""
    h, w = (int(v) for v in grid)
    x0, y0, x1, y1 = (float(v) for v in box)
    f = geometry.original_to_feature(np.array([[y0, x0], [y1, x1]], dtype=np.float64), (h, w))
    rows = np.clip(f[:, 0], 0.0, h)
    cols = np.clip(f[:, 1], 0.0, w)
    return (float(abs(rows[1] - rows[0])), float(abs(cols[1] - cols[0])))


# --- one run -------------------------------------------------------------------------------------
@dataclass
class LocalisationRow:
    """One row of localisation.csv (see the module docstring for each field)."""

    layer: str
    concept: str
    grid: str
    cell_mm_row: float
    cell_mm_col: float
    finding_span_cells_row: float
    finding_span_cells_col: float
    n_finding_boxes: int
    method: str
    k: int
    neurons: list[int]
    mean_ap_finding_images: float
    mean_ap_whole_split: float
    n_finding_images: int
    n_whole_split: int
    recall_ceiling: float
    median_best_iou: float
    pred_span_cells_row: float
    pred_span_cells_col: float
    boxes_per_image: float
    ap_finding_images: list[float] = field(default_factory=list, repr=False)  # per neuron
    ap_whole_split: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        """JSON-ready (NaN stays a float; the CSV writer prints it as 'nan')."""
        return asdict(self)


def _diagnostics(
    boxes: Mapping[int, Mapping[str, list]],
    gt: Mapping[str, Sequence[Box]],
    neurons: Sequence[int],
    test_ids: Sequence[str],
    geometries: Mapping[str, Any],
    grid: tuple[int, int],
) -> dict[str, float]:
    """recall ceiling, median best IoU, median best-box span, boxes per image (module docstring)."""
    from ..analysis.localisation import iou_matrix

    finding = [i for i in test_ids if gt.get(i)]
    recalls, best_ious, spans = [], [], []
    for n in neurons:
        hit = total = 0
        for i in finding:
            pred = list(boxes[n].get(i, []))
            truth = list(gt[i])
            total += len(truth)
            if pred:
                best = iou_matrix([b.box for b in pred], truth).max(axis=0)
                spans.append(span_cells(geometries[i], pred[0].box, grid))
            else:
                best = np.zeros(len(truth))
            hit += int((best >= IOU).sum())
            best_ious.extend(float(v) for v in best)
        if total:
            recalls.append(hit / total)
    n_boxes = [len(boxes[n].get(i, [])) for n in neurons for i in test_ids]
    return {
        "recall_ceiling": _nanmean(recalls) if recalls else math.nan,
        "median_best_iou": _nanmedian(best_ious),
        "pred_span_cells_row": _nanmedian(s[0] for s in spans),
        "pred_span_cells_col": _nanmedian(s[1] for s in spans),
        "boxes_per_image": float(np.mean(n_boxes)) if n_boxes else math.nan,
    }


def layer_localisation_rows(
    view: Any,
    sae: Any,
    concept: str,
    gt: Mapping[str, Sequence[Box]],
    *,
    k: int = 10,
    methods: Sequence[str] = METHODS,
    box_score: str = "max",
    device: str = "cpu",
    progress: Any = None,
) -> list[LocalisationRow]:
    """One :class:`LocalisationRow` per box rule for one run (store at any hook point, the SAE
    trained on that layer, the concept); ``gt`` maps image id -> the concept's boxes (original
    pixels), e.g. ``evaluate.load_label_source(data).boxes[concept]``."""
    from ..errors import ConfigError
    from .shortcuts import class1_top_neurons, store_hook

    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"unknown box rule {method!r}: use one of {', '.join(METHODS)}")
    grid = tuple(int(v) for v in view.grid)
    test_rows = [int(r) for r in view.rows("test")]
    if not test_rows:
        raise ConfigError("the store holds no test-split images: extract the test split too")
    top = class1_top_neurons(view, sae, concept, k)
    test_ids = [str(view.index.image_id[r]) for r in test_rows]
    geometries = {i: view.geometry(r) for i, r in zip(test_ids, test_rows, strict=True)}
    cells = [cell_mm(g, grid) for g in geometries.values()]
    spans = [span_cells(geometries[i], b, grid) for i in test_ids for b in gt.get(i, [])]
    common = dict(
        layer=store_hook(view), concept=concept, grid=f"{grid[0]} x {grid[1]}",
        cell_mm_row=_nanmedian(c[0] for c in cells), cell_mm_col=_nanmedian(c[1] for c in cells),
        finding_span_cells_row=_nanmedian(s[0] for s in spans),
        finding_span_cells_col=_nanmedian(s[1] for s in spans), n_finding_boxes=len(spans),
        k=len(top), neurons=[int(n) for n in top],
    )  # fmt: skip
    summary = SimpleNamespace(view=view)  # neuron_boxes reads the store through .view
    out = []
    if progress is not None:
        progress.set_total(len(methods) * len(test_rows))
    for method in methods:
        boxes = neuron_boxes(summary, sae, top, test_rows, device=device, progress=progress,
                             method=method, score=box_score)  # fmt: skip
        table = localisation_table(boxes, gt, top, test_ids)
        out.append(
            LocalisationRow(
                **common,
                method=method,
                mean_ap_finding_images=table["mean_ap_finding_images"],
                mean_ap_whole_split=table["mean_ap_whole_split"],
                n_finding_images=table["n_finding_images"],
                n_whole_split=table["n_whole_split"],
                ap_finding_images=[float(a) for a in table["ap_finding_images"]],
                ap_whole_split=[float(a) for a in table["ap_whole_split"]],
                **_diagnostics(boxes, gt, top, test_ids, geometries, grid),
            )  # fmt: skip
        )
    return out


def localisation_rows(
    runs: Sequence[tuple[Any, Any, Any, str]],
    gt: Mapping[str, Mapping[str, Sequence[Box]]],
    *,
    k: int = 10,
    methods: Sequence[str] = METHODS,
    box_score: str = "max",
    progress: Any = None,
) -> list[LocalisationRow]:
    """Every (store, SAE, model, concept) run - the runs ``shortcuts.open_runs`` gives - with
    ``gt`` mapping concept -> image id -> boxes; the SAE's own device."""
    rows = []
    for view, sae, _model, concept in runs:
        device = str(next(sae.parameters()).device)
        rows += layer_localisation_rows(view, sae, concept, gt.get(concept, {}), k=k,
                                        methods=methods, box_score=box_score, device=device,
                                        progress=progress)  # fmt: skip
    return rows


# --- the CSV -------------------------------------------------------------------------------------
def write_localisation_csv(rows: Iterable[LocalisationRow], path: str | Path) -> Path:
    """Write the rows to ``localisation.csv``: the :data:`COLUMNS`, formatted as the shortcut
    report is (``analysis.shortcuts.write_rows_csv``: atomic, NaN as 'nan')."""
    from ..analysis.shortcuts import write_rows_csv

    return write_rows_csv(rows, COLUMNS, path)
