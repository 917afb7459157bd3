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


# --- the row from a feature store (pipeline.shortcuts) -------------------------------------------
def _store(path, maps, splits, labels, attrs=None):
    from dataclasses import asdict

    from napari_mammo_sae.pipeline import store as fs

    c, h, w = maps[0].shape
    geometry = asdict(Geometry((100, 100), (0, 0, 100, 100), (64, 64), (1.0, 1.0)))
    writer = fs.create(path, feature_dim=c, grid=(h, w), backbone_signature="sig",
                       dtype="float32", attrs=attrs or {})  # fmt: skip
    for i, (fmap, split, y) in enumerate(zip(maps, splits, labels, strict=True)):
        writer.append(f"img{i}", fmap, {"study_id": f"s{i}", "split": split, "laterality": "L",
                                        "view": "CC", "labels": {"mass": 0, "calcification": y},
                                        "geometry": geometry})  # fmt: skip
    writer.close(complete=True)
    return fs.open(path)


def _identity_sae():
    import torch

    from napari_mammo_sae.models.sae import SparseAutoencoder

    sae = SparseAutoencoder(2, 3, "relu")
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_store_row_at_the_last_layer_by_hand(tmp_path):
    """Channel 0 is the cue, channel 1 the finding; an identity SAE; head logit 4 * pooled - 2."""
    from napari_mammo_sae.pipeline.shortcuts import shortcut_report_row

    def fmap(cue_cell=None, finding_cell=None):
        m = np.zeros((2, 2, 2), np.float32)  # C x h x w: 2 x 2 cells of 50 x 50 pixels
        if cue_cell:
            m[0][cue_cell] = 1.0
        if finding_cell:
            m[1][finding_cell] = 2.0
        return m

    maps = [fmap((0, 0)), fmap((1, 1)), fmap(), fmap(), fmap(None, (1, 0)), fmap((0, 1), (1, 0)),
            fmap((0, 0))]  # fmt: skip
    splits = ["test"] * 6 + ["training"]
    labels = [0, 0, 0, 0, 1, 1, 0]
    boxes = {"img0": [(10, 10, 20, 20)], "img1": [(60, 60, 70, 70)], "img5": [(60, 10, 70, 20)],
             "img6": [(10, 10, 20, 20)]}  # fmt: skip
    view = _store(tmp_path / "s.h5", maps, splits, labels)
    row = shortcut_report_row(view, _identity_sae(), (np.array([4.0, 4.0]), -2.0), boxes,
                              cue="clip", concept="calcification", top_neurons=[1, 0, 2])  # fmt: skip
    # neuron 0 spends all its mass (3) on cue cells, neuron 1 none of its 4, neuron 2 never fires
    assert row.shares == pytest.approx([0.0, 1.0, 0.0])
    assert row.cue_neurons == [0] and row.best_neuron == 0 and row.layer == "head"
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # cue-only negatives: pooled cue 0.25 -> logit -1; clean negatives: logit -2
    assert row.reliance == pytest.approx(sig(-1) - sig(-2))
    assert row.p_cue_negatives_after == pytest.approx(sig(-2))  # the cue neuron off
    assert row.gap_closed == pytest.approx(1.0)
    # clean images: negatives at sig(-2), the positive at logit 4 * 0.5 - 2 = 0
    assert row.auroc_clean_before == row.auroc_clean_after == 1.0 and row.isolated is True
    assert (row.n_cue_negatives, row.n_clean_negatives) == (2, 2)  # the training image left out
    # one encoding of the split serves every cue: the same row, and another cue on top of it
    from napari_mammo_sae.pipeline.shortcuts import encode_split

    enc = encode_split(view, _identity_sae(), "calcification", [1, 0, 2])
    kw = dict(concept="calcification", top_neurons=[1, 0, 2], encoded=enc)
    again = shortcut_report_row(view, _identity_sae(), (np.array([4.0, 4.0]), -2.0), boxes,
                                cue="clip", **kw)  # fmt: skip
    assert again.as_dict() == row.as_dict()
    none = shortcut_report_row(view, _identity_sae(), (np.array([4.0, 4.0]), -2.0), {},
                               cue="lead", **kw)  # fmt: skip
    assert none.shares == [0.0, 0.0, 0.0] and none.cue_neurons == [] and math.isnan(none.reliance)
    with pytest.raises(ConfigError, match="other top neurons"):
        shortcut_report_row(view, _identity_sae(), (np.array([4.0, 4.0]), -2.0), boxes,
                            cue="clip", concept="calcification", top_neurons=[0], encoded=enc)  # fmt: skip


def test_store_row_at_an_intermediate_layer_reruns_the_backbone(tmp_path):
    import torch

    from napari_mammo_sae.models.backbone import create_backbone, features_at, rest_of_backbone
    from napari_mammo_sae.models.classifier import ConceptClassifier
    from napari_mammo_sae.models.sae import SparseAutoencoder
    from napari_mammo_sae.pipeline.shortcuts import shortcut_report_row

    torch.manual_seed(0)
    model = ConceptClassifier(create_backbone("test_efficientnet")).eval()
    with torch.no_grad():
        model.head.weight.normal_(0.0, 5.0)  # a head that reads the features strongly
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        acts = features_at(model, x, "stage3")  # 48 x 4 x 4
    sae = SparseAutoencoder(48, 48, "relu").eval()  # identity weights: z = relu(x), x_hat = z
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(48))
        sae.W_dec.copy_(torch.eye(48))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    view = _store(tmp_path / "s.h5", list(acts.numpy()), ["test"] * 3, [0, 0, 1],
                  attrs={"hook": "stage3"})  # fmt: skip
    whole = {f"img{i}": [(0, 0, 100, 100)] for i in (0, 1)}  # the cue covers images 0 and 1
    row = shortcut_report_row(view, sae, model, whole, cue="site", concept="calcification",
                              top_neurons=list(range(8)))  # fmt: skip
    assert row.layer == "stage3" and row.cue_neurons  # every firing neuron is on the cue there

    def p(i, off):
        with torch.no_grad():
            z = sae.encode(acts[i].reshape(48, -1).T)
            z[:, off] = 0
            feats = rest_of_backbone(model, sae.decode(z).T.reshape(1, 48, 4, 4), "stage3")
            return float(torch.sigmoid(model.forward_head(feats)).reshape(-1)[0])

    before = np.mean([p(0, []), p(1, [])])
    after = np.mean([p(0, row.cue_neurons), p(1, row.cue_neurons)])
    assert row.p_cue_negatives_before == pytest.approx(before, abs=1e-6)
    assert row.p_cue_negatives_after == pytest.approx(after, abs=1e-6)
    assert abs(after - before) > 1e-4  # the deactivation went through the rest of the backbone


def test_store_records_its_hook_point_and_refuses_to_mix_layers(tmp_path):
    from napari_mammo_sae.errors import StoreError
    from napari_mammo_sae.pipeline import store as fs
    from napari_mammo_sae.pipeline.shortcuts import store_hook

    maps = [np.zeros((2, 2, 2), np.float32)]
    view = _store(tmp_path / "a.h5", maps, ["test"], [0], attrs={"hook": "stage3"})
    assert view.hook == "stage3" and store_hook(view) == "stage3"
    older = _store(tmp_path / "b.h5", maps, ["test"], [0])  # a store from before hook points
    assert older.hook == "head" and store_hook(older) == "head"
    view.close()
    older.close()
    with pytest.raises(StoreError, match="hook"):  # resuming with features of another layer
        fs.create(tmp_path / "a.h5", feature_dim=2, grid=(2, 2), backbone_signature="sig",
                  dtype="float32", attrs={"hook": "head"})  # fmt: skip
