"""The phantom sample exam in a real viewer: hanging layout, finding boxes on their images, marker boxes."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _within(points: np.ndarray, extent: tuple[float, float, float, float]) -> bool:
    top, left, bottom, right = extent
    return bool(
        (points[:, 0] >= top - 1e-6).all()
        and (points[:, 0] <= bottom + 1e-6).all()
        and (points[:, 1] >= left - 1e-6).all()
        and (points[:, 1] <= right + 1e-6).all()
    )


def test_phantom_sample_opens_with_boxes_on_their_images(make_napari_viewer):
    from napari.layers import Layer

    from napari_mammo_sae._napari.sample_phantom import phantom_exam_sample

    tuples = phantom_exam_sample()
    viewer = make_napari_viewer()
    for data, kwargs, kind in tuples:
        viewer.add_layer(Layer.create(data, kwargs, kind))
    images = [ly for ly in viewer.layers if ly._type_string == "image"]
    assert sorted(ly.name for ly in images) == ["L CC", "L MLO", "R CC", "R MLO"]
    findings = viewer.layers["phantom findings"]
    marker = viewer.layers["phantom confounder (planted marker)"]
    assert set(findings.features["category"]) == {"Mass", "Suspicious Calcification"}
    # each box carries a short label (full names of neighbouring boxes ran into each other)
    expected = {"Mass": "Mass", "Suspicious Calcification": "susp. calc."}
    assert list(findings.text.values) == [expected[c] for c in findings.features["category"]]
    assert not np.allclose(findings.edge_color[0], marker.edge_color[0])  # told apart by colour
    # hanging: R images left of L images, CC above MLO, chest walls facing the middle
    by_name = {ly.name: ly.metadata["placement"] for ly in images}
    assert by_name["R CC"].world_extent()[3] < by_name["L CC"].world_extent()[1]
    assert by_name["R CC"].world_extent()[2] < by_name["R MLO"].world_extent()[0]
    # every box lies on one image, and each image with a finding holds a box
    extents = [p.world_extent() for p in by_name.values()]
    for layer in (findings, marker):
        for rect in layer.data:
            assert any(_within(np.asarray(rect), e) for e in extents)
    assert len(findings.data) >= 2 and len(marker.data) >= 1


def test_phantom_sample_through_the_plugin_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-mammo-sae", "phantom_exam")
    names = [ly.name for ly in viewer.layers]
    assert {"R CC", "L CC", "R MLO", "L MLO", "phantom findings"} <= set(names)
    record = viewer.layers["R CC"].metadata["record"]
    assert record.laterality == "R" and record.spacing_mm == (0.2, 0.2)
    assert viewer.layers["R CC"].metadata["chest_wall"] == "right"
