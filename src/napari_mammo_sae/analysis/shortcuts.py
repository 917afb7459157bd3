"""The shortcut report: does the model rely on a planted cue, is there a neuron for it, and does
switching that neuron off remove the reliance while keeping the finding?

One row per cue, concept and layer (``docs/evaluation/shortcuts.csv``):

``reliance``
    mean P(concept) on the test images that carry the cue but not the concept ("cue-only
    negatives") minus the mean on the test images with neither ("clean negatives"). Positive: the
    cue alone raises the prediction.
``cue_neurons``
    THE RULE: among the top-k class-1 neurons (ranked by their mean contribution to the concept's
    logit over the class-1 training images: ``pipeline.shortcuts.RANKING_TEXT``), those whose
    activation mass lies mostly on the cue's boxes - ``cue_share > 0.5``, where a neuron's
    ``cue_share`` is the sum of its activations over the feature cells that a cue box touches, over
    every test image, divided by the sum of its activations over all cells of every test image
    (:func:`cue_shares`). A neuron that also fires on the findings, or everywhere, spends its mass
    elsewhere and does not pass. The same k and threshold for every cue and layer.
``best_cue_share``
    the largest ``cue_share`` among the top-k neurons (how close the best one came).
``gap_closed``
    the share of the reliance removed by deactivating the cue neurons:
    ``(reliance_before - reliance_after) / reliance_before``; 0 when there is no cue neuron, NaN
    when there is no reliance to remove (``reliance_before <= 0``) or too few images to measure it.
``auroc_clean_before``, ``auroc_clean_after``
    test AUROC of the concept on the images without the cue, before and after the deactivation.
``isolated``
    a cue neuron exists, it closes at least half the gap (``gap_closed >= 0.5``) and costs at most
    0.02 clean AUROC.

The probabilities after deactivation come from the caller (:func:`shortcut_row` takes a function of
the neurons): at the last layer the closed form of ``interventions.intervened_logits``; at an
intermediate layer the rest of the backbone re-run from the edited activations.

This rule (activation mass) is not ``analysis.confounder``'s (IoU of a neuron's top heatmap box
with the cue box): that one asks whether a neuron's strongest box *lands on* the cue; this one asks
whether the neuron *stands for* the cue, which is what switching it off needs.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .metrics import auroc

SHARE_THRESHOLD = 0.5
MIN_GAP_CLOSED = 0.5
MAX_AUROC_COST = 0.02
RULE = (
    f"a cue neuron is a top-k class-1 neuron whose activation mass over the test split lies mostly "
    f"on the cue's boxes: the sum of its activations over the feature cells a cue box touches, "
    f"divided by the sum over every cell of every test image, exceeds {SHARE_THRESHOLD}; a cue is "
    f"isolated when a cue neuron exists, deactivating the cue neurons removes at least "
    f"{MIN_GAP_CLOSED:.0%} of the reliance and costs at most {MAX_AUROC_COST} clean AUROC"
)
#: docs/evaluation/shortcuts.csv columns, in file order
COLUMNS = (
    "cue", "concept", "layer", "reliance", "cue_neurons", "best_cue_share", "best_neuron",
    "gap_closed", "auroc_clean_before", "auroc_clean_after", "isolated", "k",
    "n_cue_negatives", "n_clean_negatives", "p_cue_negatives_before", "p_cue_negatives_after",
    "p_clean_negatives_before", "p_clean_negatives_after",
)  # fmt: skip


def box_cells(geometry: Any, box: Sequence[float], grid: tuple[int, int]) -> np.ndarray:
    """(h, w) bool: the feature cells an original-pixel box (xmin, ymin, xmax, ymax) touches."""
    h, w = (int(v) for v in grid)
    x0, y0, x1, y1 = (float(v) for v in box)
    f = geometry.original_to_feature(np.array([[y0, x0], [y1, x1]], dtype=np.float64), (h, w))
    r0, c0 = max(int(math.floor(f[0, 0])), 0), max(int(math.floor(f[0, 1])), 0)
    r1, c1 = min(int(math.ceil(f[1, 0])), h), min(int(math.ceil(f[1, 1])), w)
    mask = np.zeros((h, w), bool)
    if r1 > r0 and c1 > c0:
        mask[r0:r1, c0:c1] = True
    return mask


def cue_cells(
    geometry: Any, boxes: Iterable[Sequence[float]] | None, grid: tuple[int, int]
) -> np.ndarray:
    """(h, w) bool: the cells any of an image's cue boxes touches (all False without boxes)."""
    mask = np.zeros(tuple(int(v) for v in grid), bool)
    for box in boxes or ():
        mask |= box_cells(geometry, box, grid)
    return mask


def cue_shares(
    activations: Iterable[np.ndarray], cue_cells: Iterable[np.ndarray | None]
) -> np.ndarray:
    """Per neuron, the share of its activation mass on cue cells over a set of images.

    ``activations``: per image, (cells, k) non-negative activations of the k neurons (or (h, w, k));
    ``cue_cells``: per image, a bool mask over the same cells (None or all False: no cue). Images
    without the cue still count in the denominator. A neuron that never fires gets 0.
    """
    on = total = None
    for a, cells in zip(activations, cue_cells, strict=True):
        a = np.asarray(a, dtype=np.float64)
        a = a.reshape(-1, a.shape[-1])
        if (a < 0).any():
            raise ConfigError("cue shares need non-negative activations (SAE latents)")
        if on is None:
            on, total = np.zeros(a.shape[1]), np.zeros(a.shape[1])
        total += a.sum(axis=0)
        if cells is not None:
            m = np.asarray(cells, bool).reshape(-1)
            if m.size != a.shape[0]:
                raise ConfigError(f"cue mask has {m.size} cells, the activations {a.shape[0]}")
            on += a[m].sum(axis=0)
    if on is None:
        raise ConfigError("cue shares need at least one image")
    return np.divide(on, total, out=np.zeros_like(on), where=total > 0)


def cue_neurons(neurons: Sequence[int], shares: Sequence[float]) -> list[int]:
    """The rule: the neurons (in their given, ranked order) whose cue share exceeds 0.5."""
    return [int(n) for n, s in zip(neurons, shares, strict=True) if s > SHARE_THRESHOLD]


def reliance(p: np.ndarray, cue_negative: np.ndarray, clean_negative: np.ndarray) -> float:
    """Mean probability on the cue-only negatives minus the mean on the clean negatives (NaN if
    either group is empty)."""
    p = np.asarray(p, dtype=np.float64)
    a, b = np.asarray(cue_negative, bool), np.asarray(clean_negative, bool)
    if not a.any() or not b.any():
        return math.nan
    return float(p[a].mean() - p[b].mean())


def gap_closed(before: float, after: float) -> float:
    """Share of the reliance removed: (before - after) / before; NaN without reliance to remove."""
    if not math.isfinite(before) or not math.isfinite(after) or before <= 0:
        return math.nan
    return float((before - after) / before)


@dataclass
class ShortcutRow:
    """One row of the shortcut report (see the module docstring for each field)."""

    cue: str
    concept: str
    layer: str
    reliance: float
    cue_neurons: list[int]
    best_cue_share: float
    best_neuron: int | None
    gap_closed: float
    auroc_clean_before: float
    auroc_clean_after: float
    isolated: bool
    k: int
    n_cue_negatives: int
    n_clean_negatives: int
    p_cue_negatives_before: float
    p_cue_negatives_after: float
    p_clean_negatives_before: float
    p_clean_negatives_after: float
    shares: list[float] = field(default_factory=list, repr=False)  # per top-k neuron, in rank order

    def as_dict(self) -> dict:
        """JSON-ready (NaN stays a float; the CSV writer prints it as 'nan')."""
        return asdict(self)


def isolated(neurons: Sequence[int], closed: float, before: float, after: float) -> bool:
    """A cue neuron exists, closes >= half the gap and costs <= 0.02 clean AUROC."""
    if not neurons or not math.isfinite(closed):
        return False
    cost = before - after if math.isfinite(before) and math.isfinite(after) else math.inf
    return bool(closed >= MIN_GAP_CLOSED and cost <= MAX_AUROC_COST + 1e-12)


def shortcut_row(
    *,
    cue: str,
    concept: str,
    layer: str,
    labels: Sequence[int],
    has_cue: Sequence[bool],
    probabilities: Sequence[float],
    top_neurons: Sequence[int],
    shares: Sequence[float],
    deactivate: Callable[[list[int]], Sequence[float]],
) -> ShortcutRow:
    """One report row from the test split.

    ``labels``, ``has_cue`` and ``probabilities`` (the model's, with every neuron) are per test image;
    ``top_neurons`` the top-k class-1 neurons in rank order and ``shares`` their :func:`cue_shares`;
    ``deactivate(neurons)`` returns the per-image probabilities with those neurons switched off
    (called only when the rule finds a cue neuron).
    """
    y = np.asarray(labels, dtype=np.int64).ravel()
    c = np.asarray(has_cue, dtype=bool).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if not (y.size == c.size == p.size):
        raise ConfigError(
            f"labels ({y.size}), cue flags ({c.size}) and probabilities ({p.size}) differ in length"
        )
    if len(top_neurons) != len(shares):
        raise ConfigError("one cue share per top neuron")
    found = cue_neurons(top_neurons, shares)
    after = p if not found else np.asarray(deactivate(found), dtype=np.float64).ravel()
    if after.size != p.size:
        raise ConfigError(f"deactivation gave {after.size} probabilities for {p.size} images")
    cue_neg, clean_neg = c & (y == 0), ~c & (y == 0)
    rel_before = reliance(p, cue_neg, clean_neg)
    rel_after = reliance(after, cue_neg, clean_neg)
    closed = gap_closed(rel_before, rel_after)
    clean = ~c
    auc_before, auc_after = auroc(y[clean], p[clean]), auroc(y[clean], after[clean])
    best = int(np.argmax(shares)) if len(shares) else None

    def mean(v: np.ndarray, m: np.ndarray) -> float:
        return float(v[m].mean()) if m.any() else math.nan

    return ShortcutRow(
        cue=cue, concept=concept, layer=layer, reliance=rel_before, cue_neurons=found,
        best_cue_share=float(shares[best]) if best is not None else math.nan,
        best_neuron=int(top_neurons[best]) if best is not None else None,
        gap_closed=closed, auroc_clean_before=auc_before, auroc_clean_after=auc_after,
        isolated=isolated(found, closed, auc_before, auc_after), k=len(top_neurons),
        n_cue_negatives=int(cue_neg.sum()), n_clean_negatives=int(clean_neg.sum()),
        p_cue_negatives_before=mean(p, cue_neg), p_cue_negatives_after=mean(after, cue_neg),
        p_clean_negatives_before=mean(p, clean_neg), p_clean_negatives_after=mean(after, clean_neg),
        shares=[float(s) for s in shares],
    )  # fmt: skip


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(str(int(v)) for v in value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def write_rows_csv(rows: Iterable[Any], columns: Sequence[str], path: str | Path) -> Path:
    """Write report rows (objects with ``as_dict()``) to a CSV with ``columns`` in that order:
    neurons joined by ';', booleans as true/false, floats with 4 decimals, NaN as 'nan'. Written to
    a temporary file first, so a failure leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            d = row.as_dict()
            writer.writerow([_cell(d[c]) for c in columns])
    os.replace(tmp, path)
    return path


def write_shortcuts_csv(rows: Iterable[ShortcutRow], path: str | Path) -> Path:
    """Write the report rows to ``docs/evaluation/shortcuts.csv`` (:data:`COLUMNS`)."""
    return write_rows_csv(rows, COLUMNS, path)
