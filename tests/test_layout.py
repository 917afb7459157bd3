"""Hanging layout: R on the viewer's left, CC above MLO, chest walls toward the middle."""

from __future__ import annotations

import numpy as np
import pytest

from data_helpers import write_mammogram
from napari_mammo_sae.dicom import read_mammogram
from napari_mammo_sae.layout import hanging_layout


def _exam(tmp_path, *, flip_right=False, spacing=(0.1, 0.1)):
    """Four views; right images have their chest wall on the left edge when flip_right."""
    specs = [
        ("L", "CC", "left"),
        ("L", "MLO", "left"),
        ("R", "CC", "left" if flip_right else "right"),
        ("R", "MLO", "left" if flip_right else "right"),
    ]
    recs = []
    for i, (lat, view, wall) in enumerate(specs):
        path = write_mammogram(
            tmp_path / f"{i}.dcm",
            image_laterality=lat,
            view_code=view,
            chest_wall=wall,
            pixel_spacing=spacing,
            rows=96 + 8 * i,
            cols=64 + 4 * i,
        )
        recs.append(read_mammogram(path))
    return recs


def _by_name(placements):
    return {p.record.name: p for p in placements}


def test_four_view_positions(tmp_path):
    placements = hanging_layout(_exam(tmp_path), gap_mm=10.0)
    by = _by_name(placements)
    assert set(by) == {"L CC", "L MLO", "R CC", "R MLO"}
    ext = {k: p.world_extent() for k, p in by.items()}  # (top, left, bottom, right)
    # R on the viewer's left, L on the right, back to back around x = 0 with the gap between
    for view in ("CC", "MLO"):
        assert ext[f"R {view}"][3] == pytest.approx(-5.0)
        assert ext[f"L {view}"][1] == pytest.approx(5.0)
    # CC row above the MLO row, at least the gap apart, tops aligned within a row
    tallest = max(p.height_mm for p in placements)
    cc_bottom = max(ext["R CC"][2], ext["L CC"][2])
    assert ext["R MLO"][0] == ext["L MLO"][0] == pytest.approx(tallest * 1.02 + 10.0)
    assert ext["R MLO"][0] >= cc_bottom + 10.0
    assert ext["R CC"][0] == ext["L CC"][0] == pytest.approx(0.0)
    # no mirroring needed: chest walls already face the middle
    assert not any(p.flip for p in placements)
    assert {p.chest_wall_source for p in placements} == {"image"}


def test_mirrors_images_whose_chest_wall_faces_outward(tmp_path):
    placements = hanging_layout(_exam(tmp_path, flip_right=True))
    by = _by_name(placements)
    assert by["R CC"].flip and by["R MLO"].flip
    assert not by["L CC"].flip and not by["L MLO"].flip
    # the chest wall (column 0 of a flipped right image) lands on its inner edge, next to the middle
    p = by["R CC"]
    rows, cols = p.record.shape
    wall = p.edge_to_world(np.array([[rows / 2, 0.0]]))[0]
    nipple = p.edge_to_world(np.array([[rows / 2, cols]]))[0]
    assert wall[1] == pytest.approx(-5.0) and nipple[1] < wall[1]


def _pixel_world_centre(placement, r, c):
    """World position napari gives the centre of pixel (r, c) of the image layer."""
    (sy, sx), (ty, tx) = placement.transform()
    return np.array([r * sy + ty, c * sx + tx])


@pytest.mark.parametrize("flip_right", [False, True])
def test_transform_matches_to_world_and_affine(tmp_path, flip_right):
    for p in hanging_layout(_exam(tmp_path, flip_right=flip_right)):
        sy, sx = p.record.spacing_mm
        for r, c in [(0, 0), (10, 3), (50, 40)]:
            expected = p.to_world(np.array([[r * sy, c * sx]]))[0]
            np.testing.assert_allclose(_pixel_world_centre(p, r, c), expected)
            np.testing.assert_allclose((p.affine() @ [r, c, 1.0])[:2], expected)


@pytest.mark.parametrize("flip_right", [False, True])
def test_overlay_at_feature_grid_resolution_follows_the_image(tmp_path, flip_right):
    """A coarse heatmap over the image (cell (i, j) covering a block of pixels) lands on that block."""
    for p in hanging_layout(_exam(tmp_path, flip_right=flip_right)):
        rows, cols = p.record.shape
        sy, sx = p.record.spacing_mm
        h, w = 4, 2  # grid covering the whole image
        # in the image frame: cell (i, j) centre at edge coords ((i + .5) rows / h, (j + .5) cols / w)
        cell_scale = (rows / h * sy, cols / w * sx)
        cell_translate = ((rows / h - 1) / 2 * sy, (cols / w - 1) / 2 * sx)
        scale, translate = p.transform(cell_scale, cell_translate)
        for i, j in [(0, 0), (3, 1), (2, 0)]:
            world = np.array([i * scale[0] + translate[0], j * scale[1] + translate[1]])
            expected = p.edge_to_world(np.array([[(i + 0.5) * rows / h, (j + 0.5) * cols / w]]))[0]
            np.testing.assert_allclose(world, expected)


def test_shapes_box_in_mm_follows_mirroring(tmp_path):
    """A box given in image-frame mm (Shapes layer, scale 1) maps to the mirrored world box."""
    p = _by_name(hanging_layout(_exam(tmp_path, flip_right=True)))["R MLO"]
    sy, sx = p.record.spacing_mm
    # box over pixel columns [2, 10) rows [5, 9): corners in image-frame mm via edge coords
    corners_edge = np.array([[5, 2], [5, 10], [9, 10], [9, 2]], dtype=float)
    corners_mm = np.column_stack([(corners_edge[:, 0] - 0.5) * sy, (corners_edge[:, 1] - 0.5) * sx])
    scale, translate = p.transform((1.0, 1.0), (0.0, 0.0))
    world = corners_mm * np.array(scale) + np.array(translate)
    np.testing.assert_allclose(world, p.edge_to_world(corners_edge))
    # mirrored: the box's left edge in the image is its right edge in the world
    assert world[0, 1] > world[1, 1]


def test_patient_orientation_decides_mirroring(tmp_path):
    # chest wall drawn on the left, but Patient Orientation says columns run toward posterior
    rec = read_mammogram(
        write_mammogram(
            tmp_path / "po.dcm",
            image_laterality="L",
            chest_wall="left",
            patient_orientation=("P", "F"),
        )
    )
    (p,) = hanging_layout([rec])
    assert p.flip and p.chest_wall == "right" and p.chest_wall_source == "PatientOrientation"


def test_unknown_laterality_and_extra_views(tmp_path):
    recs = _exam(tmp_path)
    extra = read_mammogram(
        write_mammogram(
            tmp_path / "x.dcm", image_laterality="L", view_code=None, view_position="XCCL"
        )
    )
    unknown = read_mammogram(
        write_mammogram(
            tmp_path / "u.dcm", image_laterality=None, view_code=None, pixels=np.full((20, 20), 7)
        )
    )
    assert unknown.laterality is None
    placements = hanging_layout([*recs, extra, unknown])
    assert len(placements) == 6
    by = _by_name(placements)
    # XCCL gets its own row below CC and MLO; the unknown image goes right of everything
    assert by["L CC"].world_extent()[2] < by["L MLO"].world_extent()[0]
    assert by["L MLO"].world_extent()[2] < by["L XCCL"].world_extent()[0]
    assert by["? ?"].world_extent()[1] > max(
        p.world_extent()[3] for p in placements if p is not by["? ?"]
    )
    assert placements[4].record is extra  # same order as the input


def test_real_cbis_exam_hangs_without_mirroring(cbis_files):
    from napari_mammo_sae.dicom import read_mammogram as read

    exam = [read(p) for p in cbis_files if p.parent.name == "sfm-benign-0"]
    placements = hanging_layout(exam)
    by = _by_name(placements)
    assert set(by) == {"L CC", "L MLO", "R CC", "R MLO"}
    assert not any(p.flip for p in placements)  # CBIS images already hang chest wall inward
    assert by["R CC"].world_extent()[3] < 0 < by["L CC"].world_extent()[1]
    assert by["R CC"].world_extent()[2] < by["R MLO"].world_extent()[0]


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_files_opened_one_at_a_time_do_not_overlap(tmp_path):
    """napari calls the reader once per file when several files are selected."""
    placements = [hanging_layout([rec], gap_mm=10.0)[0] for rec in _exam(tmp_path, flip_right=True)]
    by = _by_name(placements)
    ext = {k: p.world_extent() for k, p in by.items()}
    names = list(ext)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not _overlap(ext[a], ext[b]), (a, b)
    assert ext["R CC"][3] < 0 < ext["L CC"][1] and ext["R MLO"][3] < 0 < ext["L MLO"][1]
    assert max(ext["R CC"][2], ext["L CC"][2]) < min(ext["R MLO"][0], ext["L MLO"][0])
    assert by["R CC"].flip and by["R MLO"].flip


def test_empty():
    assert hanging_layout([]) == []
