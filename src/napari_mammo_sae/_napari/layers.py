"""Layer data for the review widgets: neuron heatmaps, CAMs and boxes, placed over their mammogram.

Heatmaps stay on the model's feature grid (h x w, e.g. 48 x 29): napari scales and translates them
in millimetres so that each cell covers exactly the part of the original image it was computed
from (``Geometry.feature_layer_transform``), then follows the image's place in the hanging layout
(``Placement.transform``). Nothing is upsampled to the image's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: one hue per rank, chosen to stay distinct from each other and from the grey mammogram
NEURON_COLOURS = (
    "#ff3b30", "#ffcc00", "#34c759", "#00c7ff", "#af52de",
    "#ff9500", "#ff2d95", "#5ac8fa", "#a2ff00", "#ffffff",
)  # fmt: skip


SHORT_LABELS = {"suspicious calcification": "susp. calc.", "architectural distortion": "arch. dist.",
                "focal asymmetry": "focal asym.", "global asymmetry": "global asym."}  # fmt: skip


def box_label(category: str) -> str:
    """The short text drawn at a box (the full category stays in the layer's features).

    Findings often sit side by side; full VinDr category names ran into each other on screen.
    """
    return SHORT_LABELS.get(str(category).strip().lower(), str(category))


def neuron_colormap(rank: int) -> Any:
    """A colormap transparent at zero rising to the rank's colour (napari Colormap)."""
    from napari.utils.colormaps import Colormap
    from napari.utils.colormaps.standardize_color import transform_color

    rgb = transform_color(NEURON_COLOURS[rank % len(NEURON_COLOURS)])[0][:3]
    # fully transparent at zero and for the faintest tenth, so the mammogram stays readable
    colors = np.array([[*rgb, 0.0], [*rgb, 0.0], [*rgb, 0.5], [*rgb, 0.9]])
    return Colormap(colors, controls=[0.0, 0.1, 0.5, 1.0], name=f"SAE rank {rank + 1}")


def cam_colormap() -> Any:
    """Diverging blue-transparent-red for a class-activation map with symmetric limits.

    Zero (the middle of the limits) and the faintest tenth either side are fully transparent, so
    the map never washes the whole crop over in white as napari's 'bwr' does.
    """
    from napari.utils.colormaps import Colormap

    blue, red = (0.16, 0.47, 1.0), (1.0, 0.23, 0.19)
    colors = np.array([[*blue, 0.9], [*blue, 0.0], [*blue, 0.0], [*red, 0.0], [*red, 0.0],
                       [*red, 0.9]])  # fmt: skip
    return Colormap(colors, controls=[0.0, 0.45, 0.5, 0.5, 0.55, 1.0], name="SAE CAM")


def heatmap_transform(geometry: Any, grid: tuple[int, int], placement: Any | None) -> dict:
    """``scale``/``translate`` (world mm) of an h x w map over the image (hanging layout aware)."""
    scale, translate = geometry.feature_layer_transform(grid)
    if placement is not None:
        scale, translate = placement.transform(scale, translate)
    return {"scale": tuple(scale), "translate": tuple(translate)}


def box_corners_world(placement: Any, box: Sequence[float]) -> np.ndarray:
    """The 4 world corners (row, col) of an (xmin, ymin, xmax, ymax) original-pixel box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    corners = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
    return placement.edge_to_world(corners)


def world_to_edge(placement: Any, world: np.ndarray) -> np.ndarray:
    """Inverse of ``Placement.edge_to_world``: world (N, 2) mm -> original edge coordinates."""
    pts = np.asarray(world, dtype=np.float64).reshape(-1, 2) - np.asarray(placement.translate_mm)
    if placement.flip:
        pts[:, 1] = placement._mirror_axis_mm() - pts[:, 1]
    sy, sx = placement.record.spacing_mm
    return np.column_stack([pts[:, 0] / sy + 0.5, pts[:, 1] / sx + 0.5])


def shapes_to_boxes(placement: Any, shapes: Sequence[np.ndarray]) -> list[tuple[float, ...]]:
    """Original-pixel boxes of the shapes (world coords) that fall on this image."""
    rows, cols = placement.record.shape
    out = []
    for shape in shapes:
        shape = np.asarray(shape)[:, -2:]
        edge = world_to_edge(placement, shape)
        y0, x0 = edge.min(axis=0)
        y1, x1 = edge.max(axis=0)
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        if 0 <= cy <= rows and 0 <= cx <= cols:
            out.append((float(max(x0, 0)), float(max(y0, 0)), float(min(x1, cols)),
                        float(min(y1, rows))))  # fmt: skip
    return out


def boxes_by_image(path: str | Path) -> dict[str, list[tuple[tuple[float, ...], str]]]:
    """(box, category) lists keyed by image id / SOPInstanceUID / file stem, from a VinDr-format
    ``finding_annotations.csv`` or a generic box CSV (MammoSAEError, OSError on a bad file)."""
    from ..annotations import load_box_csv, load_vindr

    header = (Path(path).read_text(encoding="utf-8", errors="replace").splitlines() or [""])[0]
    by_key: dict[str, list[tuple[tuple[float, ...], str]]] = {}
    if "finding_categories" in header:
        for image_id, im in load_vindr(path).images.items():
            for f in im.findings:
                if f.box is not None:
                    by_key.setdefault(str(image_id), []).append((f.box, f.category))
        return by_key
    for b in load_box_csv(path):
        key = str(getattr(b, "sop_instance_uid", "") or Path(str(getattr(b, "path", ""))).stem)
        by_key.setdefault(key, []).append((tuple(b.box), str(getattr(b, "label", ""))))
    return by_key
