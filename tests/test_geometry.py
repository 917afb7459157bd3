"""Geometry: exact maps between original pixels, model input, feature grids, mm and napari world."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from napari_mammo_sae.errors import ConfigError
from napari_mammo_sae.geometry import Geometry

# a typical Mammo-CLIP case: 5-px border + breast crop of a 4500 x 2800 scan, resized to 1520 x 912
GEOM = Geometry(
    original_shape=(4500, 2800),
    crop_box=(105.0, 5.0, 4400.0, 1700.0),
    input_shape=(1520, 912),
    spacing_mm=(0.05, 0.05),
)


def test_fields_are_plain_and_json_roundtrip():
    g = Geometry([10, 20], np.array([1, 2, 9, 19]), (4, 5), (np.float32(0.1), 0.2))
    assert g.original_shape == (10, 20) and isinstance(g.original_shape[0], int)
    assert g.crop_box == (1.0, 2.0, 9.0, 19.0) and isinstance(g.crop_box[0], float)
    data = json.loads(json.dumps(asdict(g)))
    assert Geometry(**{k: tuple(v) for k, v in data.items()}) == g


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(crop_box=(10.0, 0.0, 10.0, 5.0)),  # empty rows
        dict(crop_box=(0.0, 5.0, 10.0, 1.0)),  # inverted cols
        dict(input_shape=(0, 4)),
        dict(spacing_mm=(0.0, 0.1)),
    ],
)
def test_invalid_geometry_raises_config_error(kwargs):
    base = dict(original_shape=(10, 10), crop_box=(0, 0, 10, 10), input_shape=(4, 4))
    base["spacing_mm"] = (0.1, 0.1)
    base.update(kwargs)
    with pytest.raises(ConfigError):
        Geometry(**base)


def test_input_corners_land_exactly_on_crop_box():
    H, W = GEOM.input_shape
    corners = np.array([[0, 0], [H, W], [0, W], [H, 0]], dtype=float)
    out = GEOM.input_to_original(corners)
    r0, c0, r1, c1 = GEOM.crop_box
    np.testing.assert_array_equal(out, [[r0, c0], [r1, c1], [r0, c1], [r1, c0]])
    np.testing.assert_array_equal(GEOM.original_to_input(out), corners)


def test_affine_map_hand_computed():
    g = Geometry((100, 60), (10.0, 5.0, 90.0, 45.0), (40, 20), (0.1, 0.2))
    # 80 original rows -> 40 input rows (2 px per input px); 40 cols -> 20 (2 px per input px)
    np.testing.assert_allclose(g.input_to_original([[1.5, 3.0]]), [[13.0, 11.0]])
    np.testing.assert_allclose(g.original_to_input([[50.0, 25.0]]), [[20.0, 10.0]])
    assert g.input_pixel_size == (2.0, 2.0)
    assert g.input_spacing_mm == pytest.approx((0.2, 0.4))


def test_round_trips_to_1e_9():
    rng = np.random.default_rng(0)
    pts = rng.uniform([-50, -50], [4600, 2900], size=(1000, 2))
    np.testing.assert_allclose(GEOM.input_to_original(GEOM.original_to_input(pts)), pts, atol=1e-9)
    inp = rng.uniform([0, 0], [1520, 912], size=(1000, 2))
    np.testing.assert_allclose(GEOM.original_to_input(GEOM.input_to_original(inp)), inp, atol=1e-9)
    np.testing.assert_allclose(GEOM.mm_to_input(GEOM.input_to_mm(inp)), inp, atol=1e-9)
    np.testing.assert_allclose(GEOM.world_to_original(GEOM.original_to_world(pts)), pts, atol=1e-9)


def test_single_point_and_bad_shapes():
    np.testing.assert_allclose(
        GEOM.original_to_input(GEOM.input_to_original([760.0, 456.0])), [760.0, 456.0]
    )
    with pytest.raises(ConfigError):
        GEOM.input_to_original(np.zeros((3, 3)))


def test_millimetres_and_napari_world():
    g = Geometry((100, 60), (0, 0, 100, 60), (100, 60), (0.07, 0.05))
    np.testing.assert_allclose(g.original_to_mm([[10.0, 20.0]]), [[0.7, 1.0]])
    np.testing.assert_allclose(g.mm_to_original([[0.7, 1.0]]), [[10.0, 20.0]])
    # centre of pixel (3, 4) is edge (3.5, 4.5) and napari shows it at world (3*sy, 4*sx)
    np.testing.assert_allclose(g.original_to_world([[3.5, 4.5]]), [[3 * 0.07, 4 * 0.05]])


def test_boxes_map_both_ways():
    box = (100.0, 300.0, 900.0, 2000.0)  # xmin, ymin, xmax, ymax in original pixels
    inp = GEOM.box_to_input(box)
    assert isinstance(inp, tuple) and len(inp) == 4
    # xmin -> col, ymin -> row
    r, c = GEOM.original_to_input([[300.0, 100.0]])[0]
    assert inp[:2] == pytest.approx((c, r))
    assert GEOM.box_to_original(inp) == pytest.approx(box, abs=1e-9)
    boxes = np.array([box, (5.0, 105.0, 1700.0, 4400.0)])
    out = GEOM.box_to_input(boxes)
    assert out.shape == (2, 4)
    np.testing.assert_allclose(out[1], [0, 0, 912, 1520], atol=1e-9)
    np.testing.assert_allclose(GEOM.box_to_original(out), boxes, atol=1e-9)
    with pytest.raises(ConfigError):
        GEOM.box_to_input((1.0, 2.0, 3.0))


def test_feature_grid_48x29_tiles_crop_box_exactly():
    grid = (48, 29)
    r0, c0, r1, c1 = GEOM.crop_box
    boxes = np.array([[GEOM.feature_cell_box(grid, i, j) for j in range(29)] for i in range(48)])
    # outer edges exactly on the crop box
    assert (boxes[0, :, 0] == r0).all() and (boxes[-1, :, 2] == r1).all()
    assert (boxes[:, 0, 1] == c0).all() and (boxes[:, -1, 3] == c1).all()
    # neighbours share edges exactly: no gaps, no overlaps
    assert (boxes[1:, :, 0] == boxes[:-1, :, 2]).all()
    assert (boxes[:, 1:, 1] == boxes[:, :-1, 3]).all()
    # the areas add up to the crop box's area
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).sum()
    assert area == pytest.approx((r1 - r0) * (c1 - c0), rel=1e-12)
    # agrees with the align_corners=False convention: cell i covers input rows [i*H/h, (i+1)*H/h)
    H, W = GEOM.input_shape
    i, j = 17, 11
    lo = GEOM.input_to_original([[i * H / 48, j * W / 29]])[0]
    hi = GEOM.input_to_original([[(i + 1) * H / 48, (j + 1) * W / 29]])[0]
    np.testing.assert_allclose(GEOM.feature_cell_box(grid, i, j), [*lo, *hi], atol=1e-9)
    rows, cols = GEOM.feature_grid_edges(grid)
    np.testing.assert_array_equal(rows, np.r_[boxes[:, 0, 0], r1])
    np.testing.assert_array_equal(cols, np.r_[boxes[0, :, 1], c1])
    with pytest.raises(ConfigError):
        GEOM.feature_cell_box(grid, 48, 0)


def test_original_to_feature_finds_the_cell():
    grid = (48, 29)
    box = GEOM.feature_cell_box(grid, 30, 7)
    centre = [[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]]
    assert tuple(np.floor(GEOM.original_to_feature(centre, grid)[0]).astype(int)) == (30, 7)


def _napari_world_of_data_pixel(scale, translate, k):
    """napari: the centre of data pixel k is at world k * scale + translate."""
    return np.asarray(k, dtype=float) * np.asarray(scale) + np.asarray(translate)


@pytest.mark.parametrize("grid", [(48, 29), (1520, 912), (3, 2)])
def test_feature_layer_transform_overlays_the_image(grid):
    scale, translate = GEOM.feature_layer_transform(grid)
    sy, sx = GEOM.spacing_mm
    for i, j in [(0, 0), (grid[0] - 1, grid[1] - 1), (grid[0] // 2, grid[1] // 3)]:
        r0, c0, r1, c1 = GEOM.feature_cell_box(grid, i, j)
        centre_edge = np.array([(r0 + r1) / 2, (c0 + c1) / 2])
        # where the image layer (scale=spacing, translate=0) shows that original position
        expected = (centre_edge - 0.5) * np.array([sy, sx])
        got = _napari_world_of_data_pixel(scale, translate, [i, j])
        np.testing.assert_allclose(got, expected, atol=1e-9)
    # the extent of the heat-map layer (centre +/- half a cell) covers exactly the crop box
    top_left = np.asarray(translate) - np.asarray(scale) / 2
    r0, c0, r1, c1 = GEOM.crop_box
    np.testing.assert_allclose(top_left, [(r0 - 0.5) * sy, (c0 - 0.5) * sx], atol=1e-9)


def test_input_layer_transform_and_identity():
    assert GEOM.input_layer_transform() == GEOM.feature_layer_transform(GEOM.input_shape)
    g = Geometry.identity((30, 20), (0.1, 0.2))
    scale, translate = g.input_layer_transform()
    assert scale == pytest.approx((0.1, 0.2)) and translate == pytest.approx((0.0, 0.0))
    pts = np.array([[3.0, 7.25]])
    np.testing.assert_array_equal(g.input_to_original(pts), pts)
