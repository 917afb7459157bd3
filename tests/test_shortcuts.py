"""The shortcut report (analysis.shortcuts): every number checked against a hand computation."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from napari_mammo_sae.analysis.shortcuts import (
    COLUMNS,
    box_cells,
    cue_cells,
    cue_neurons,
    cue_shares,
    gap_closed,
    shortcut_row,
    write_shortcuts_csv,
)
from napari_mammo_sae.errors import ConfigError
from napari_mammo_sae.geometry import Geometry

# 8 test images: 6 negatives (2 with the cue), 2 positives (1 with the cue)
LABELS = [0, 0, 0, 0, 0, 0, 1, 1]
HAS_CUE = [True, True, False, False, False, False, True, False]
P = [0.6, 0.8, 0.1, 0.3, 0.2, 0.2, 0.9, 0.7]
# cue-only negatives: mean(0.6, 0.8) = 0.7; clean negatives: mean(0.1, 0.3, 0.2, 0.2) = 0.2


def test_box_cells_are_the_cells_a_box_touches():
    # crop rows 20..100, cols 0..80 of a 100 x 80 image onto a 4 x 4 grid: cells of 20 x 20 pixels
    g = Geometry((100, 80), (20, 0, 100, 80), (40, 40), (1.0, 1.0))
    m = box_cells(g, (25, 45, 35, 62), (4, 4))  # rows 1.25..2.1, cols 1.25..1.75 in cells
    assert sorted(zip(*np.nonzero(m), strict=True)) == [(1, 1), (2, 1)]
    edge = box_cells(g, (40, 20, 60, 40), (4, 4))  # exactly cell (0, 2)
    assert sorted(zip(*np.nonzero(edge), strict=True)) == [(0, 2)]
    assert not box_cells(g, (0, 0, 10, 10), (4, 4)).any()  # cut away by the crop
    both = cue_cells(g, [(25, 45, 35, 62), (40, 20, 60, 40)], (4, 4))
    assert both.sum() == 3 and not cue_cells(g, None, (4, 4)).any()


def test_cue_shares_count_every_image_in_the_denominator():
    a1 = np.array([[4.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # 4 cells x 2 neurons
    a2 = np.array([[0.0, 2.0], [0.0, 0.0], [2.0, 0.0], [0.0, 0.0]])  # no cue on this image
    cells1 = np.array([True, False, False, False])
    shares = cue_shares([a1, a2], [cells1, None])
    # neuron 0: 4 on the cue of 4 + 2 = 6; neuron 1: 1 of 4 + 2 = 6
    np.testing.assert_allclose(shares, [4 / 6, 1 / 6])
    assert cue_neurons([10, 20], shares) == [10]
    # a silent neuron has share 0 (not NaN), a (h, w, k) map works like (cells, k)
    z = cue_shares([np.zeros((2, 2, 1))], [np.ones((2, 2), bool)])
    assert z.tolist() == [0.0]
    with pytest.raises(ConfigError, match="non-negative"):
        cue_shares([-a1], [cells1])
    with pytest.raises(ConfigError, match="cells"):
        cue_shares([a1], [np.ones(3, bool)])


def test_rule_needs_more_than_half():
    assert cue_neurons([1, 2, 3], [0.5, 0.51, 0.9]) == [2, 3]


def test_isolated_shortcut_row_by_hand():
    calls = []

    def deactivate(neurons):
        calls.append(neurons)
        return [0.3, 0.3, 0.1, 0.3, 0.2, 0.2, 0.8, 0.7]

    row = shortcut_row(cue="clip", concept="calcification", layer="stage3", labels=LABELS,
                       has_cue=HAS_CUE, probabilities=P, top_neurons=[5, 9, 3],
                       shares=[0.2, 0.7, 0.55], deactivate=deactivate)  # fmt: skip
    assert calls == [[9, 3]]  # the cue neurons, in rank order
    assert row.cue_neurons == [9, 3] and row.best_neuron == 9 and row.best_cue_share == 0.7
    assert row.reliance == pytest.approx(0.5)  # 0.7 - 0.2
    # after: cue-only negatives 0.3, clean 0.2 -> reliance 0.1 -> (0.5 - 0.1) / 0.5
    assert row.gap_closed == pytest.approx(0.8)
    # clean images 2, 3, 4, 5, 7: the positive (0.7) above every negative, before and after
    assert row.auroc_clean_before == 1.0 and row.auroc_clean_after == 1.0
    assert row.isolated is True
    assert (row.n_cue_negatives, row.n_clean_negatives, row.k) == (2, 4, 3)
    assert row.p_cue_negatives_after == pytest.approx(0.3)


def test_a_deactivation_that_costs_clean_auroc_is_not_isolated():
    after = [0.3, 0.3, 0.1, 0.3, 0.2, 0.2, 0.8, 0.25]  # the clean positive falls below 0.3
    row = shortcut_row(cue="lead", concept="mass", layer="head", labels=LABELS, has_cue=HAS_CUE,
                       probabilities=P, top_neurons=[1], shares=[0.9],
                       deactivate=lambda n: after)  # fmt: skip
    # clean: negatives 0.1, 0.3, 0.2, 0.2 vs positive 0.25 -> 3 of 4 pairs ordered
    assert row.auroc_clean_after == pytest.approx(0.75)
    assert row.gap_closed == pytest.approx(0.8) and row.isolated is False


def test_half_the_gap_is_the_bar():
    def row_with(cue_neg_after):
        after = [cue_neg_after, cue_neg_after, 0.1, 0.3, 0.2, 0.2, 0.9, 0.7]
        return shortcut_row(cue="site", concept="mass", layer="head", labels=LABELS,
                            has_cue=HAS_CUE, probabilities=P, top_neurons=[1], shares=[0.8],
                            deactivate=lambda n: after)  # fmt: skip

    closes_60 = row_with(0.4)  # reliance 0.2 after: (0.5 - 0.2) / 0.5
    closes_40 = row_with(0.5)  # reliance 0.3 after
    assert closes_60.gap_closed == pytest.approx(0.6) and closes_60.isolated is True
    assert closes_40.gap_closed == pytest.approx(0.4) and closes_40.isolated is False


def test_no_cue_neuron_removes_nothing():
    def never(neurons):
        raise AssertionError("nothing to deactivate")

    row = shortcut_row(cue="marker", concept="calcification", layer="head", labels=LABELS,
                       has_cue=HAS_CUE, probabilities=P, top_neurons=[4, 8], shares=[0.3, 0.1],
                       deactivate=never)  # fmt: skip
    assert row.cue_neurons == [] and row.best_cue_share == 0.3 and row.best_neuron == 4
    assert row.gap_closed == 0.0 and row.isolated is False
    assert row.auroc_clean_after == row.auroc_clean_before == 1.0


def test_without_reliance_there_is_no_gap_to_close():
    p = [0.1, 0.1, 0.1, 0.3, 0.2, 0.2, 0.9, 0.7]  # cue-only negatives below the clean ones
    row = shortcut_row(cue="clip", concept="mass", layer="head", labels=LABELS, has_cue=HAS_CUE,
                       probabilities=p, top_neurons=[1], shares=[0.9],
                       deactivate=lambda n: p)  # fmt: skip
    assert row.reliance == pytest.approx(-0.1)
    assert math.isnan(row.gap_closed) and row.isolated is False
    assert math.isnan(gap_closed(math.nan, 0.1))


def test_mismatched_inputs_are_refused():
    with pytest.raises(ConfigError, match="differ in length"):
        shortcut_row(cue="x", concept="mass", layer="head", labels=LABELS[:-1], has_cue=HAS_CUE,
                     probabilities=P, top_neurons=[1], shares=[0.1], deactivate=lambda n: P)  # fmt: skip
    with pytest.raises(ConfigError, match="one cue share"):
        shortcut_row(cue="x", concept="mass", layer="head", labels=LABELS, has_cue=HAS_CUE,
                     probabilities=P, top_neurons=[1, 2], shares=[0.1], deactivate=lambda n: P)  # fmt: skip


def test_csv_has_the_report_columns(tmp_path):
    rows = [
        shortcut_row(cue="clip", concept="calcification", layer="stage3", labels=LABELS,
                     has_cue=HAS_CUE, probabilities=P, top_neurons=[5, 9, 3],
                     shares=[0.2, 0.7, 0.55],
                     deactivate=lambda n: [0.3, 0.3, 0.1, 0.3, 0.2, 0.2, 0.8, 0.7]),
        shortcut_row(cue="site", concept="mass", layer="head", labels=LABELS, has_cue=HAS_CUE,
                     probabilities=[0.1] * 8, top_neurons=[4], shares=[0.0],
                     deactivate=lambda n: P),
    ]  # fmt: skip
    path = write_shortcuts_csv(rows, tmp_path / "evaluation" / "shortcuts.csv")
    with path.open(newline="") as fh:
        got = list(csv.DictReader(fh))
    assert tuple(got[0]) == COLUMNS
    for required in ("cue", "concept", "layer", "reliance", "cue_neurons", "best_cue_share",
                     "gap_closed", "auroc_clean_before", "auroc_clean_after", "isolated"):  # fmt: skip
        assert required in COLUMNS
    assert got[0]["cue_neurons"] == "9;3" and got[0]["isolated"] == "true"
    assert got[0]["reliance"] == "0.5000" and got[0]["gap_closed"] == "0.8000"
    assert got[1]["cue_neurons"] == "" and got[1]["isolated"] == "false"
    assert got[1]["gap_closed"] == "nan" and got[1]["auroc_clean_before"] == "0.5000"
    assert not list(path.parent.glob("*.part"))
