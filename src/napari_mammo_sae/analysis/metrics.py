"""Classification metrics with bootstrap confidence intervals, under both VinDr label protocols.

Protocols (SPEC section 3):

- ``"image"``: one sample per image, positive if any finding of the image has the concept.
- ``"row"``: Mammo-CLIP's and the paper's protocol: one sample per row of ``finding_annotations.csv``,
  so an image with k findings appears k times (with that row's label, possibly conflicting) and its
  score is repeated. Bootstrap resampling then draws whole images (``groups``) so repeated rows of one
  image stay together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

PROTOCOLS = ("image", "row")

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _arrays(y: Sequence | np.ndarray, p: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and scores ({p.size}) differ in length")
    return y, p


def auroc(y: Sequence | np.ndarray, p: Sequence | np.ndarray) -> float:
    """Area under the ROC curve (sklearn ``roc_auc_score``); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y, p = _arrays(y, p)
    if np.unique(y).size < 2:
        return math.nan
    return float(roc_auc_score(y, p))


def auprc(y: Sequence | np.ndarray, p: Sequence | np.ndarray) -> float:
    """Area under the precision-recall curve (sklearn ``average_precision_score``); NaN without positives."""
    from sklearn.metrics import average_precision_score

    y, p = _arrays(y, p)
    if y.sum() == 0:
        return math.nan
    return float(average_precision_score(y, p))


def threshold_metrics(
    y: Sequence | np.ndarray, p: Sequence | np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Precision, recall and F1 of ``p >= threshold`` (p are probabilities); 0 where undefined."""
    y, p = _arrays(y, p)
    pred = p >= threshold
    tp = float(np.sum(pred & (y == 1)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def bootstrap_ci(
    metric: MetricFn,
    y: Sequence | np.ndarray,
    p: Sequence | np.ndarray,
    *,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence | np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of ``metric(y, p)``; seeded, so reproducible.

    With ``groups`` (e.g. image ids under the per-row protocol) whole groups are resampled. Resamples
    on which the metric is undefined (NaN, e.g. one class only) are dropped; (nan, nan) if ``n`` is 0
    or every resample was undefined.
    """
    y, p = _arrays(y, p)
    if n <= 0 or y.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    if groups is None:
        members = None
        n_units = y.size
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        members = (order, starts, counts)
        n_units = counts.size
    values = []
    for _ in range(n):
        units = rng.integers(0, n_units, n_units)
        if members is None:
            idx = units
        else:
            order, starts, counts = members
            idx = np.concatenate([order[starts[u] : starts[u] + counts[u]] for u in units])
        value = metric(y[idx], p[idx])
        if not math.isnan(value):
            values.append(value)
    if not values:
        return (math.nan, math.nan)
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


@dataclass
class ClassificationReport:
    """Every metric of one score vector, with bootstrap intervals for AUROC and AUPRC."""

    n: int
    positives: int
    auroc: float
    auroc_ci: tuple[float, float]
    auprc: float
    auprc_ci: tuple[float, float]
    precision: float
    recall: float
    f1: float

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (NaN stays NaN; json.dumps writes it as NaN)."""
        d = asdict(self)
        d["auroc_ci"] = list(self.auroc_ci)
        d["auprc_ci"] = list(self.auprc_ci)
        return d


def classification_report(
    y: Sequence | np.ndarray,
    p: Sequence | np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
    threshold: float = 0.5,
) -> ClassificationReport:
    """AUROC and AUPRC with bootstrap 95% CIs, plus precision/recall/F1 at ``threshold``."""
    y, p = _arrays(y, p)
    thr = threshold_metrics(y, p, threshold)
    return ClassificationReport(
        n=int(y.size),
        positives=int(y.sum()),
        auroc=auroc(y, p),
        auroc_ci=bootstrap_ci(auroc, y, p, n=n_bootstrap, seed=seed, groups=groups),
        auprc=auprc(y, p),
        auprc_ci=bootstrap_ci(auprc, y, p, n=n_bootstrap, seed=seed, groups=groups),
        **thr,
    )


def protocol_samples(
    image_ids: Sequence[str],
    scores: Sequence[float] | np.ndarray,
    labels: Mapping[str, Sequence[int] | int],
    protocol: str = "image",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn per-image scores into (labels, scores, groups) samples under a label protocol.

    ``labels`` maps an image id to its per-row labels (a list, one entry per annotation row of the
    image; a plain int counts as one row). ``"image"``: one sample per image, positive if any row is;
    ``"row"``: one sample per row, the image's score repeated. Images without labels are skipped.
    """
    from ..errors import ConfigError

    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown label protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    ys: list[int] = []
    ps: list[float] = []
    gs: list[int] = []
    for i, image_id in enumerate(image_ids):
        if image_id not in labels:
            continue
        rows = labels[image_id]
        rows = [int(rows)] if np.isscalar(rows) else [int(v) for v in rows]
        if not rows:
            continue
        if protocol == "image":
            ys.append(int(any(rows)))
            ps.append(float(scores[i]))
            gs.append(i)
        else:
            ys.extend(rows)
            ps.extend([float(scores[i])] * len(rows))
            gs.extend([i] * len(rows))
    return np.asarray(ys, dtype=np.int64), np.asarray(ps), np.asarray(gs, dtype=np.int64)
