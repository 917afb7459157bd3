"""Localisation: heatmap -> boxes in original pixels, IoU, AP@0.25, box agreement."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from napari_mammo_sae.analysis import localisation as loc


def test_upsample_matches_torch_bilinear():
    import torch  # a core dependency: never skipped

    rng = np.random.default_rng(0)
    heat = rng.random((6, 4)).astype(np.float32)
    ours = loc.upsample_heatmap(heat, (48, 29))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(heat)[None, None], size=(48, 29), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_iou_and_matrix():
    assert loc.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert loc.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    m = loc.iou_matrix([(0, 0, 10, 10)], [(0, 0, 10, 10), (5, 0, 15, 10)])
    np.testing.assert_allclose(m, [[1.0, 1 / 3]])


def test_percentile_boxes_find_two_blobs_in_input_pixels():
    heat = np.zeros((16, 10), np.float32)
    heat[2:4, 1:3] = 5.0  # strong blob
    heat[12:14, 7:9] = 2.0  # weak blob
    boxes = loc.heatmap_boxes(heat, input_shape=(160, 100))
    assert len(boxes) == 2
    strong, weak = boxes
    assert strong.score > weak.score
    x0, y0, x1, y1 = strong.box
    # the blob covers input rows 20..40, cols 10..30; bilinear spill keeps the box near it
    assert 10 <= y0 <= 25 and 35 <= y1 <= 45 and 5 <= x0 <= 15 and 25 <= x1 <= 35


def test_contour_variant_drops_tiny_components():
    heat = np.zeros((40, 40), np.float32)
    heat[5:15, 5:15] = 1.0  # area (10-1)^2 = 81 px
    heat[30, 30] = 1.0  # single pixel: contour area 0
    boxes = loc.map_boxes(heat, method="contour")
    assert [b.box for b in boxes] == [(5.0, 5.0, 15.0, 15.0)]
    all_boxes = loc.map_boxes(heat, method="contour", min_area=0)
    assert len(all_boxes) == 2


def test_score_mean_vs_max():
    heat = np.zeros((20, 20), np.float32)
    heat[2:7, 2:7] = 5.0  # 5x5: contour area 16
    heat[3, 3] = 9.0
    (b,) = loc.map_boxes(heat, method="contour", score="max")
    (m,) = loc.map_boxes(heat, method="contour", score="mean")
    assert b.score == 9.0 and m.score == pytest.approx((24 * 5 + 9) / 25)


def test_zero_heatmap_gives_no_boxes():
    assert loc.heatmap_boxes(np.zeros((5, 5))) == []


@dataclass(frozen=True)
class _Geom:
    """Crop box rows 100..900, cols 50..450 of the original, resized to a 160x80 input."""

    crop_box: tuple = (100.0, 50.0, 900.0, 450.0)
    input_shape: tuple = (160, 80)

    def input_to_original(self, rc):
        rc = np.asarray(rc, dtype=float)
        return rc * [5.0, 5.0] + [100.0, 50.0]


def test_boxes_map_to_original_pixels_in_both_spaces():
    heat = np.zeros((16, 8), np.float32)
    heat[4:6, 2:4] = 1.0  # input rows 40..60, cols 20..40 -> original rows 300..400, cols 150..250
    truth = (150.0, 300.0, 250.0, 400.0)
    for space in ("input", "original"):
        (box, *_) = loc.heatmap_boxes(heat, _Geom(), space=space)
        assert loc.iou(box.box, truth) > 0.5, space


def test_average_precision_ranks_over_dataset():
    gt = {"a": [(0, 0, 10, 10)], "b": [(50, 50, 60, 60)]}
    perfect = {
        "a": [loc.ScoredBox((0, 0, 10, 10), 0.9)],
        "b": [loc.ScoredBox((50, 50, 61, 61), 0.8)],
    }
    assert loc.average_precision(perfect, gt) == pytest.approx(1.0)
    # a confident false positive first halves precision at the first hit
    fp_first = {
        "a": [loc.ScoredBox((0, 0, 10, 10), 0.5), loc.ScoredBox((30, 30, 40, 40), 0.99)],
        "b": [],
    }
    assert loc.average_precision(fp_first, gt) == pytest.approx(0.5 * 0.5)
    # IoU 0.2 is below the 0.25 threshold
    weak = {"a": [loc.ScoredBox((0, 0, 10, 2), 1.0)]}
    assert loc.average_precision(weak, {"a": gt["a"]}) == 0.0
    # a duplicate detection of one lesion counts once
    dup = {"a": [loc.ScoredBox((0, 0, 10, 10), 0.9), loc.ScoredBox((0, 0, 9, 9), 0.8)]}
    assert loc.average_precision(dup, {"a": gt["a"]}) == pytest.approx(1.0)
    assert math.isnan(loc.average_precision({"a": []}, {"a": []}))


def test_neuron_average_precision_on_synthetic_heatmaps():
    geom = _Geom()
    heat_hit = np.zeros((16, 8), np.float32)
    heat_hit[4:6, 2:4] = 1.0
    heat_miss = np.zeros((16, 8), np.float32)
    heat_miss[12:14, 5:7] = 1.0
    gt = {"x": [(150.0, 300.0, 250.0, 400.0)], "y": [(150.0, 300.0, 250.0, 400.0)]}
    ap = loc.neuron_average_precision([("x", heat_hit, geom), ("y", heat_hit, geom)], gt)
    assert ap == pytest.approx(1.0)
    ap = loc.neuron_average_precision([("x", heat_miss, geom), ("y", heat_miss, geom)], gt)
    assert ap == 0.0


def test_box_agreement_picks_overlapping_annotation():
    heat = np.zeros((16, 8), np.float32)
    heat[4:6, 2:4] = 1.0
    # Upsampled bilinearly to the 160x80 input, the block (input rows 40..60, cols 20..40) ramps
    # 0.05, 0.15, 0.25, ... over the 10 px between cell centres on each side. The map's 95th
    # percentile lies between 0.15 and 0.25, so the box's edges are the first 0.25 pixels: input
    # rows 37..63, cols 17..43, i.e. original x 135..265, y 285..415 (5 px per input px).
    assert 0.15 < np.percentile(loc.upsample_heatmap(heat, (160, 80)), 95) < 0.25
    box = (135.0, 285.0, 265.0, 415.0)
    anns = [(0.0, 800.0, 40.0, 880.0), (150.0, 300.0, 250.0, 400.0), (240.0, 380.0, 340.0, 480.0)]
    agr = loc.box_agreement(heat, anns, _Geom())
    assert agr.box == pytest.approx(box)
    # the block's own box lies inside: 100 x 100 over 130 x 130 (the third overlaps 25 x 35 only)
    assert agr.annotation == anns[1] and agr.iou == pytest.approx(100 * 100 / (130 * 130))
    # shifted 50 px right: overlap 65 x 100, union 130^2 + 100^2 - 6500
    shifted = (200.0, 300.0, 300.0, 400.0)
    agr = loc.box_agreement(heat, [anns[2], shifted], _Geom())
    assert agr.annotation == shifted and agr.iou == pytest.approx(6500 / (16900 + 10000 - 6500))
    far = loc.box_agreement(heat, anns[:1], _Geom())
    assert far.iou == 0.0 and far.annotation == anns[0]
    assert loc.box_agreement(np.zeros((4, 4)), anns).box is None


def test_split_average_precision_names_its_protocol():
    from napari_mammo_sae.analysis.localisation import AP_PROTOCOLS, split_average_precision
    from napari_mammo_sae.errors import ConfigError

    assert set(AP_PROTOCOLS) == {"finding-images", "whole-split"}
    pred = {"a": [loc.ScoredBox((0, 0, 4, 4), 0.2)], "n": [loc.ScoredBox((0, 0, 4, 4), 0.9)]}
    gt = {"a": [(0, 0, 4, 4)]}
    assert split_average_precision(pred, gt, ["a", "n"], "finding-images") == 1.0
    assert split_average_precision(pred, gt, ["a", "n"], "whole-split") == 0.5
    assert split_average_precision(pred, gt, ["a"], "whole-split") == 1.0  # only the ids given
    with pytest.raises(ConfigError, match="unknown AP protocol"):
        split_average_precision(pred, gt, ["a"], "paper")
