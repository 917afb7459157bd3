"""Standard screening hanging layout (Qt-free).

Right and left breasts back to back: right images on the viewer's left with their chest wall on their
right edge, left images on the viewer's right with their chest wall on their left edge; the CC row above
the MLO row; other views (XCCL, ML, ...) in further rows below. Images whose chest wall is on the wrong
side (found from Patient Orientation, else from the pixels) are mirrored left-right, as a workstation does.

Coordinates: an image layer placed *in its own frame* has ``scale=spacing_mm`` and ``translate=(0, 0)``
(pixel centre ``(r, c)`` at ``(r * sy, c * sx)`` mm). Every layer defined in that frame (heatmaps at
feature-grid resolution, boxes as Shapes in mm, points) follows the layout through the same placement::

    scale, translate = placement.transform(layer_scale, layer_translate)   # or
    affine = placement.affine(layer_scale, layer_translate)                # 3x3 napari affine

A mirrored placement returns a negative column scale (napari draws it mirrored); ``affine`` gives the
same map as a matrix for layers where an affine is preferred.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .dicom import MammogramRecord, chest_wall_side

#: row order of views; views not listed come after, alphabetically
VIEW_ROWS = ("CC", "XCCL", "XCCM", "FB", "MLO", "ML", "LM", "LMO", "SIO", "ISO")
#: the chest wall edge each laterality should show in the standard hanging
WANTED_CHEST_WALL = {"R": "right", "L": "left"}


@dataclass(frozen=True)
class Placement:
    """Where one image hangs: world translate of its (possibly mirrored) frame, in mm."""

    record: MammogramRecord
    translate_mm: tuple[float, float]  # (ty, tx) of the image frame's origin after mirroring
    flip: bool = False  # mirrored left-right so the chest wall faces the middle
    chest_wall: str | None = None  # "left" | "right" edge in the ORIGINAL image, None if unknown
    chest_wall_source: str = "unknown"  # "PatientOrientation" | "image" | "unknown"

    @property
    def height_mm(self) -> float:
        """Image height in mm (row extent)."""
        return self.record.shape[0] * self.record.spacing_mm[0]

    def _mirror_axis_mm(self) -> float:
        # mirroring about the image's vertical centre line maps the image-frame x range
        # [-sx/2, (W - 1/2) sx] onto itself: x -> (W - 1) sx - x
        return (self.record.shape[1] - 1) * self.record.spacing_mm[1]

    def to_world(self, points_mm: np.ndarray) -> np.ndarray:
        """Map (N, 2) image-frame positions in mm (row, col) to world positions."""
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 2).copy()
        if self.flip:
            pts[:, 1] = self._mirror_axis_mm() - pts[:, 1]
        pts += np.asarray(self.translate_mm, dtype=np.float64)
        return pts

    def edge_to_world(self, rc_edge: np.ndarray) -> np.ndarray:
        """Map (N, 2) original-pixel edge coordinates (row, col) to world positions in mm."""
        sy, sx = self.record.spacing_mm
        pts = np.asarray(rc_edge, dtype=np.float64).reshape(-1, 2)
        return self.to_world(np.column_stack([(pts[:, 0] - 0.5) * sy, (pts[:, 1] - 0.5) * sx]))

    def transform(
        self,
        scale: Sequence[float] | None = None,
        translate: Sequence[float] = (0.0, 0.0),
    ) -> tuple[tuple[float, float], tuple[float, float]]:
        """World (scale, translate) for a layer given in the image frame (default: the image itself)."""
        sy, sx = (float(v) for v in (scale if scale is not None else self.record.spacing_mm))
        ty, tx = (float(v) for v in translate)
        oy, ox = self.translate_mm
        if self.flip:
            return (sy, -sx), (ty + oy, self._mirror_axis_mm() - tx + ox)
        return (sy, sx), (ty + oy, tx + ox)

    def affine(
        self,
        scale: Sequence[float] | None = None,
        translate: Sequence[float] = (0.0, 0.0),
    ) -> np.ndarray:
        """The same map as ``transform`` as a 3x3 homogeneous matrix (data index -> world)."""
        (sy, sx), (ty, tx) = self.transform(scale, translate)
        return np.array([[sy, 0.0, ty], [0.0, sx, tx], [0.0, 0.0, 1.0]])

    def layer_kwargs(self) -> dict:
        """napari kwargs placing the image layer itself: scale and translate in mm."""
        scale, translate = self.transform()
        return {"scale": scale, "translate": translate}

    def world_extent(self) -> tuple[float, float, float, float]:
        """(top, left, bottom, right) world bounds of the image in mm."""
        rows, cols = self.record.shape
        corners = self.edge_to_world(np.array([[0.0, 0.0], [rows, cols]]))
        return (
            float(corners[:, 0].min()),
            float(corners[:, 1].min()),
            float(corners[:, 0].max()),
            float(corners[:, 1].max()),
        )


def _row_key(view: str | None) -> tuple[int, str]:
    if view in VIEW_ROWS:
        return (VIEW_ROWS.index(view), "")
    return (len(VIEW_ROWS), view or "~")


def view_rows(views: Sequence[str | None]) -> dict[str | None, int]:
    """Row index per view: CC always row 0, MLO always row 1, other views below in a fixed order."""
    rows: dict[str | None, int] = {"CC": 0, "MLO": 1}
    others = sorted({v for v in views if v not in rows}, key=_row_key)
    rows.update({v: 2 + i for i, v in enumerate(others)})
    return rows


def hanging_layout(records: Sequence[MammogramRecord], gap_mm: float = 10.0) -> list[Placement]:
    """Place records in the standard screening hanging; returns one Placement per record, same order.

    Rows have a uniform pitch (tallest image + 2 % + gap) and fixed indices (CC 0, MLO 1), so images of
    one exam opened one file at a time still land in the same rows without overlapping.
    """
    if not records:
        return []
    # mirror decision per image
    info = []
    for rec in records:
        side, source = chest_wall_side(rec)
        wanted = WANTED_CHEST_WALL.get(rec.laterality or "")
        flip = bool(side and wanted and side != wanted)
        info.append((side, source if side else "unknown", flip))

    row_of = view_rows([rec.view for rec in records])
    pitch = max(rec.shape[0] * rec.spacing_mm[0] for rec in records) * 1.02 + gap_mm
    tops = {view: row * pitch for view, row in row_of.items()}

    # horizontal: right images grow leftward from -gap/2, left images rightward from +gap/2;
    # images without laterality go to the right of everything
    cursor: dict[tuple[int, str], float] = {}
    placements: list[Placement | None] = [None] * len(records)
    unknown: list[int] = []
    for i, rec in enumerate(records):
        r = row_of[rec.view]
        sy, sx = rec.spacing_mm
        width = rec.shape[1] * sx
        side, source, flip = info[i]
        if rec.laterality not in ("R", "L"):
            unknown.append(i)
            continue
        key = (r, rec.laterality)
        edge = cursor.get(key, gap_mm / 2.0)  # distance of the next image's inner edge from x=0
        ty = float(tops[rec.view]) + 0.5 * sy
        if rec.laterality == "R":
            tx = -edge - width + 0.5 * sx  # right (inner) edge at x = -edge
        else:
            tx = edge + 0.5 * sx  # left (inner) edge at x = +edge
        cursor[key] = edge + width + gap_mm
        placements[i] = Placement(rec, (ty, tx), flip, side, source)
    if unknown:
        right_edge = max(
            [p.world_extent()[3] for p in placements if p is not None] + [gap_mm / 2.0]
        )
        x = right_edge + 4 * gap_mm
        for i in unknown:
            rec = records[i]
            side, source, flip = info[i]
            sy, sx = rec.spacing_mm
            ty = float(tops[rec.view]) + 0.5 * sy
            placements[i] = Placement(rec, (ty, x + 0.5 * sx), False, side, source)
            x += rec.shape[1] * sx + gap_mm
    return [p for p in placements if p is not None]
