"""napari sample data: a phantom four-view screening exam with its finding and marker boxes.

The exam is generated on the fly (medium size, 1400 x 1150 pixels at 0.2 mm), written as DICOM to a
temporary folder, read back with the plugin's reader and hung in the standard layout; the finding
boxes (category as text) and the planted marker's boxes follow their images as Shapes layers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..annotations import load_confounders, load_vindr
from ..layout import hanging_layout
from ..phantom.dataset import PhantomConfig, write_dataset
from .layers import box_label
from .reader import layer_data_tuples, read_records

FINDING_COLOURS = {"Mass": "#ff5050", "Suspicious Calcification": "#ffd000"}
MARKER_COLOUR = "#00e5ff"


def phantom_exam(seed: int = 16, size: tuple[int, int, float] = (1400, 1150, 0.2)):
    """(records, {sop_uid: ImageAnnotation}, {sop_uid: marker boxes}) of one phantom exam."""
    h, w, sp = size
    cfg = PhantomConfig(
        studies=1, seed=seed, height=h, width=w, spacing_mm=sp, mass_rate=0.5, calc_rate=0.5,
        cue_pos_rate=1.0, cue_neg_rate=0.0,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mammo-sae-phantom-") as tmp:
        root = Path(tmp)
        write_dataset(cfg, root, workers=1)
        vindr = load_vindr(root)
        cues = load_confounders(root)
        paths = [
            root / "images" / im.study_id / f"{im.image_id}.dicom" for im in vindr.images.values()
        ]
        records = read_records(paths)
    by_uid = {}
    markers = {}
    for rec, im in zip(records, vindr.images.values(), strict=True):
        by_uid[rec.sop_instance_uid] = im
        markers[rec.sop_instance_uid] = cues.get(im.image_id, [])
    return records, by_uid, markers


def _rectangles(placement, boxes) -> list[np.ndarray]:
    out = []
    for x0, y0, x1, y1 in boxes:
        corners = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], dtype=float)
        out.append(placement.edge_to_world(corners))
    return out


def phantom_exam_sample(seed: int = 16) -> list:
    """Layer data tuples: four phantom views in the hanging layout plus finding and marker boxes."""
    records, annotations, markers = phantom_exam(seed)
    layers = layer_data_tuples(records)
    shapes, cats, marks = [], [], []
    for placement in hanging_layout(records, gap_mm=max(10.0, 0.02 * max(
        r.shape[1] * r.spacing_mm[1] for r in records))):  # fmt: skip
        uid = placement.record.sop_instance_uid
        for f in annotations[uid].findings:
            if f.box is not None:
                shapes += _rectangles(placement, [f.box])
                cats.append(f.category)
        marks += _rectangles(placement, markers[uid])
    if shapes:
        layers.append(
            (
                shapes,
                {
                    "name": "phantom findings",
                    "shape_type": "rectangle",
                    "edge_color": [FINDING_COLOURS.get(c, "#ff00ff") for c in cats],
                    "face_color": "transparent",
                    "edge_width": 1.0,
                    "features": {"category": cats, "label": [box_label(c) for c in cats]},
                    "text": {
                        "string": "{label}",
                        "color": "white",
                        "size": 9,
                        "anchor": "upper_left",
                    },  # fmt: skip
                    "units": ("mm", "mm"),
                },
                "shapes",
            )
        )
    if marks:
        layers.append(
            (
                marks,
                {
                    "name": "phantom confounder (planted marker)",
                    "shape_type": "rectangle",
                    "edge_color": MARKER_COLOUR,
                    "face_color": "transparent",
                    "edge_width": 1.0,
                    "features": {"kind": ["marker"] * len(marks)},
                    "units": ("mm", "mm"),
                },
                "shapes",
            )
        )
    from .reader import _install_workstation

    _install_workstation()  # the workstation keys work on a sample as on opened files
    return layers
