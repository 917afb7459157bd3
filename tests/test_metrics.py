"""Metrics: AUROC/AUPRC against hand-computed values, bootstrap CIs, both label protocols."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_mammo_sae.analysis import metrics
from napari_mammo_sae.errors import ConfigError


def test_auroc_matches_pair_counting():
    y = [0, 0, 1, 1, 0, 1]
    p = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    pairs = [
        (a, b)
        for a, ya in zip(p, y, strict=True)
        if ya == 1
        for b, yb in zip(p, y, strict=True)
        if yb == 0
    ]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert metrics.auroc(y, p) == pytest.approx(expected)
    assert math.isnan(metrics.auroc([1, 1], [0.2, 0.3]))


def test_auprc_and_threshold_metrics():
    y = [1, 0, 1, 0]
    p = [0.9, 0.8, 0.7, 0.1]
    # ranks: TP (P=1), FP, TP (P=2/3) -> AP = 0.5*1 + 0.5*2/3
    assert metrics.auprc(y, p) == pytest.approx(0.5 + 1 / 3)
    t = metrics.threshold_metrics(y, p, 0.5)
    assert t["precision"] == pytest.approx(2 / 3)
    assert t["recall"] == pytest.approx(1.0)
    assert t["f1"] == pytest.approx(0.8)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = y * 0.5 + rng.normal(0, 0.5, 200)
    a = metrics.bootstrap_ci(metrics.auroc, y, p, n=200, seed=3)
    b = metrics.bootstrap_ci(metrics.auroc, y, p, n=200, seed=3)
    c = metrics.bootstrap_ci(metrics.auroc, y, p, n=200, seed=4)
    assert a == b and a != c
    est = metrics.auroc(y, p)
    assert a[0] < est < a[1]
    assert 0.02 < a[1] - a[0] < 0.3


def _pair_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC by counting positive/negative pairs (independent of metrics.auroc)."""
    pos, neg = p[y == 1], p[y == 0]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def test_grouped_bootstrap_resamples_whole_images():
    # 8 images with 1-3 rows each (the per-row protocol); classes overlap (AUROC 0.62, not 1), so
    # the resampled AUROC varies. Scores are distinct per row only so that the rows drawn can be
    # recognised from what the metric receives.
    groups = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6, 7])
    y = np.array([1, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1])
    p = np.array([0.81, 0.50, 0.35, 0.52, 0.61, 0.60, 0.45, 0.30, 0.31, 0.9, 0.42, 0.41, 0.2])
    estimate = _pair_auroc(y, p)
    assert 0.6 < estimate < 0.9  # not separated
    drawn: list[tuple[np.ndarray, np.ndarray]] = []

    def recording_auroc(ys, ps):
        drawn.append((ys.copy(), ps.copy()))
        return metrics.auroc(ys, ps)

    lo, hi = metrics.bootstrap_ci(recording_auroc, y, p, n=300, seed=0, groups=groups)
    assert len(drawn) == 300
    row = {v: i for i, v in enumerate(p.tolist())}
    for ys, ps in drawn:
        rows = np.array([row[v] for v in ps.tolist()])
        np.testing.assert_array_equal(ys, y[rows])  # labels travel with their rows
        counts = np.bincount(rows, minlength=p.size)
        per_image = []
        for g in np.unique(groups):
            c = counts[groups == g]
            assert (c == c[0]).all(), "an image was split between resamples"
            per_image.append(int(c[0]))
        assert sum(per_image) == 8  # 8 images drawn (with replacement) per resample
    # the interval: percentiles of the defined resampled AUROCs (one-class resamples dropped)
    values = [v for v in (_pair_auroc(ys, ps) for ys, ps in drawn) if not math.isnan(v)]
    assert 200 < len(values) <= 300
    want = np.quantile(values, [0.025, 0.975])
    assert (lo, hi) == pytest.approx(tuple(want))
    assert lo < estimate < hi and hi - lo > 0.2
    # resampling rows instead of images gives another interval
    assert metrics.bootstrap_ci(metrics.auroc, y, p, n=300, seed=0) != pytest.approx((lo, hi))


def test_protocols_expand_rows():
    ids = ["a", "b", "c"]
    scores = [0.9, 0.2, 0.5]
    labels = {"a": [1, 0], "b": [0], "c": 1}
    y, p, g = metrics.protocol_samples(ids, scores, labels, "image")
    assert y.tolist() == [1, 0, 1] and p.tolist() == [0.9, 0.2, 0.5]
    y, p, g = metrics.protocol_samples(ids, scores, labels, "row")
    assert y.tolist() == [1, 0, 0, 1]
    assert p.tolist() == [0.9, 0.9, 0.2, 0.5]
    assert g.tolist() == [0, 0, 1, 2]
    with pytest.raises(ConfigError):
        metrics.protocol_samples(ids, scores, labels, "breast")


def test_classification_report_to_dict():
    rep = metrics.classification_report([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.6], n_bootstrap=20)
    d = rep.to_dict()
    assert d["auroc"] == 1.0 and d["positives"] == 2 and len(d["auroc_ci"]) == 2
