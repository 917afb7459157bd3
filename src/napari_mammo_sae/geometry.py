"""Exact maps between original DICOM pixels, the model input, feature grids, millimetres and napari.

Coordinates are numpy order ``(row, col)`` in *edge* convention: original pixel ``(r, c)`` covers
``[r, r+1) x [c, c+1)``, so the image's top-left corner is ``(0, 0)`` and its bottom-right corner is
``(rows, cols)``. Preprocessing crops the original image to ``crop_box = (row0, col0, row1, col1)``
(edge coordinates, possibly fractional) and resizes that crop to ``input_shape = (H, W)``; the map is
therefore a per-axis affine map that sends input edge ``0`` to ``row0`` and input edge ``H`` to ``row1``.

A feature map of ``h x w`` cells over the input follows the ``align_corners=False`` convention: cell
``(i, j)`` covers input rows ``[i*H/h, (i+1)*H/h)`` and cols ``[j*W/w, (j+1)*W/w)``, so the outer cell
edges land exactly on the crop box and neighbouring cells share their edges exactly.

Millimetres: ``mm = edge_coordinate * spacing_mm`` (origin at the image's top-left corner). napari puts
the *centre* of data pixel ``k`` of a layer at world ``k * scale + translate``, so an image layer with
``scale=spacing_mm`` and ``translate=(0, 0)`` shows edge coordinate ``e`` at world ``(e - 0.5) * spacing``;
:meth:`Geometry.original_to_world` and :meth:`Geometry.feature_layer_transform` encode this.

Pure numpy; boxes are ``(xmin, ymin, xmax, ymax)`` as VinDr-Mammo writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

Box = tuple[float, float, float, float]


def _lerp(a: float, b: float, t: np.ndarray | float) -> np.ndarray | float:
    """``a`` at ``t == 0`` and ``b`` at ``t == 1`` exactly (no rounding at the end points)."""
    return (1.0 - t) * a + t * b


def _as_points(rc: np.ndarray | Sequence) -> np.ndarray:
    arr = np.asarray(rc, dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == 2:
        return arr
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ConfigError(
            f"points must be an (N, 2) array of (row, col) coordinates, got shape {arr.shape}"
        )
    return arr


@dataclass(frozen=True)
class Geometry:
    """How a model input was cut and resized from an original image (all fields JSON-friendly)."""

    original_shape: tuple[int, int]  # DICOM rows, cols
    crop_box: tuple[float, float, float, float]  # (row0, col0, row1, col1) original edge coords
    input_shape: tuple[int, int]  # model input (H, W)
    spacing_mm: tuple[float, float]  # (row, col) mm per original pixel

    def __post_init__(self) -> None:
        shape = tuple(int(v) for v in self.original_shape)
        box = tuple(float(v) for v in self.crop_box)
        size = tuple(int(v) for v in self.input_shape)
        spacing = tuple(float(v) for v in self.spacing_mm)
        if len(shape) != 2 or len(box) != 4 or len(size) != 2 or len(spacing) != 2:
            raise ConfigError(
                "Geometry needs original_shape (rows, cols), crop_box (row0, col0, row1, col1), "
                "input_shape (H, W) and spacing_mm (row, col)"
            )
        if min(shape) < 1 or min(size) < 1:
            raise ConfigError(f"image sizes must be positive, got {shape} and {size}")
        if not (box[2] > box[0] and box[3] > box[1]):
            raise ConfigError(f"crop box {box} is empty: row1 > row0 and col1 > col0 are needed")
        if not (spacing[0] > 0 and spacing[1] > 0):
            raise ConfigError(f"pixel spacing must be positive, got {spacing}")
        object.__setattr__(self, "original_shape", shape)
        object.__setattr__(self, "crop_box", box)
        object.__setattr__(self, "input_shape", size)
        object.__setattr__(self, "spacing_mm", spacing)

    # --- constructors and simple properties ------------------------------------------------------
    @classmethod
    def identity(
        cls, shape: tuple[int, int], spacing_mm: tuple[float, float] = (1.0, 1.0)
    ) -> Geometry:
        """The geometry of an image used as model input without crop or resize."""
        rows, cols = (int(v) for v in shape)
        return cls((rows, cols), (0.0, 0.0, float(rows), float(cols)), (rows, cols), spacing_mm)

    @property
    def crop_shape(self) -> tuple[float, float]:
        """(rows, cols) of the crop box in original pixels."""
        r0, c0, r1, c1 = self.crop_box
        return (r1 - r0, c1 - c0)

    @property
    def input_pixel_size(self) -> tuple[float, float]:
        """Original pixels per model-input pixel along (row, col)."""
        ch, cw = self.crop_shape
        return (ch / self.input_shape[0], cw / self.input_shape[1])

    @property
    def input_spacing_mm(self) -> tuple[float, float]:
        """Millimetres per model-input pixel along (row, col)."""
        py, px = self.input_pixel_size
        return (py * self.spacing_mm[0], px * self.spacing_mm[1])

    # --- points --------------------------------------------------------------------------------
    def input_to_original(self, rc: np.ndarray) -> np.ndarray:
        """Model-input edge coordinates (N, 2) -> original edge coordinates (N, 2)."""
        p = _as_points(rc)
        r0, c0, r1, c1 = self.crop_box
        out = np.empty_like(p)
        out[..., 0] = _lerp(r0, r1, p[..., 0] / self.input_shape[0])
        out[..., 1] = _lerp(c0, c1, p[..., 1] / self.input_shape[1])
        return out

    def original_to_input(self, rc: np.ndarray) -> np.ndarray:
        """Original edge coordinates (N, 2) -> model-input edge coordinates (N, 2)."""
        p = _as_points(rc)
        r0, c0, r1, c1 = self.crop_box
        out = np.empty_like(p)
        out[..., 0] = (p[..., 0] - r0) * (self.input_shape[0] / (r1 - r0))
        out[..., 1] = (p[..., 1] - c0) * (self.input_shape[1] / (c1 - c0))
        return out

    def original_to_mm(self, rc: np.ndarray) -> np.ndarray:
        """Original edge coordinates -> millimetres from the image's top-left corner."""
        return _as_points(rc) * np.asarray(self.spacing_mm)

    def mm_to_original(self, mm: np.ndarray) -> np.ndarray:
        """Millimetres from the image's top-left corner -> original edge coordinates."""
        return _as_points(mm) / np.asarray(self.spacing_mm)

    def input_to_mm(self, rc: np.ndarray) -> np.ndarray:
        """Model-input edge coordinates -> millimetres on the original image."""
        return self.original_to_mm(self.input_to_original(rc))

    def mm_to_input(self, mm: np.ndarray) -> np.ndarray:
        """Millimetres on the original image -> model-input edge coordinates."""
        return self.original_to_input(self.mm_to_original(mm))

    def original_to_world(self, rc: np.ndarray) -> np.ndarray:
        """Original edge coordinates -> napari world (mm) of an image layer with scale=spacing_mm."""
        return (_as_points(rc) - 0.5) * np.asarray(self.spacing_mm)

    def world_to_original(self, world: np.ndarray) -> np.ndarray:
        """napari world (mm) over an image layer with scale=spacing_mm -> original edge coordinates."""
        return _as_points(world) / np.asarray(self.spacing_mm) + 0.5

    # --- boxes ---------------------------------------------------------------------------------
    def _map_boxes(self, box, fn) -> Box | np.ndarray:
        arr = np.asarray(box, dtype=np.float64)
        single = arr.ndim == 1
        arr = np.atleast_2d(arr)
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise ConfigError(
                f"boxes must be (xmin, ymin, xmax, ymax) or an (N, 4) array, got shape {arr.shape}"
            )
        lo = fn(arr[:, [1, 0]])
        hi = fn(arr[:, [3, 2]])
        out = np.stack([lo[:, 1], lo[:, 0], hi[:, 1], hi[:, 0]], axis=1)
        if single:
            return tuple(float(v) for v in out[0])  # type: ignore[return-value]
        return out

    def box_to_input(self, box: Box | np.ndarray) -> Box | np.ndarray:
        """Original (xmin, ymin, xmax, ymax) box(es) -> model-input box(es); (N, 4) arrays too."""
        return self._map_boxes(box, self.original_to_input)

    def box_to_original(self, box: Box | np.ndarray) -> Box | np.ndarray:
        """Model-input (xmin, ymin, xmax, ymax) box(es) -> original box(es); (N, 4) arrays too."""
        return self._map_boxes(box, self.input_to_original)

    # --- feature grids -------------------------------------------------------------------------
    def feature_grid_edges(self, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Row edges (h+1,) and col edges (w+1,) of an h x w feature grid, in original edge coords."""
        h, w = self._grid(grid)
        r0, c0, r1, c1 = self.crop_box
        rows = _lerp(r0, r1, np.arange(h + 1, dtype=np.float64) / h)
        cols = _lerp(c0, c1, np.arange(w + 1, dtype=np.float64) / w)
        return np.asarray(rows), np.asarray(cols)

    def feature_cell_box(
        self, grid: tuple[int, int], i: int, j: int
    ) -> tuple[float, float, float, float]:
        """(row0, col0, row1, col1) in original edge coordinates of cell (i, j) of an h x w grid."""
        h, w = self._grid(grid)
        if not (0 <= i < h and 0 <= j < w):
            raise ConfigError(f"cell ({i}, {j}) is outside a {h} x {w} feature grid")
        r0, c0, r1, c1 = self.crop_box
        return (
            float(_lerp(r0, r1, i / h)),
            float(_lerp(c0, c1, j / w)),
            float(_lerp(r0, r1, (i + 1) / h)),
            float(_lerp(c0, c1, (j + 1) / w)),
        )

    def original_to_feature(self, rc: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """Original edge coordinates -> fractional feature-grid coordinates (floor = cell index)."""
        h, w = self._grid(grid)
        p = self.original_to_input(rc)
        return p * np.array([h / self.input_shape[0], w / self.input_shape[1]])

    def feature_layer_transform(
        self, grid: tuple[int, int]
    ) -> tuple[tuple[float, float], tuple[float, float]]:
        """(scale_mm, translate_mm) for a napari layer holding an h x w map over this image.

        The image layer is assumed to have ``scale=spacing_mm`` and ``translate=(0, 0)``; add that
        layer's own translate (e.g. from a hanging layout) to the returned translate.
        """
        h, w = self._grid(grid)
        r0, c0, r1, c1 = self.crop_box
        sy, sx = self.spacing_mm
        cell_r, cell_c = (r1 - r0) / h, (c1 - c0) / w
        scale = (cell_r * sy, cell_c * sx)
        # centre of cell k sits at original edge r0 + (k + 0.5) * cell; world = (edge - 0.5) * spacing
        translate = ((r0 + 0.5 * cell_r - 0.5) * sy, (c0 + 0.5 * cell_c - 0.5) * sx)
        return scale, translate

    def input_layer_transform(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(scale_mm, translate_mm) for a napari layer holding a map at model-input resolution."""
        return self.feature_layer_transform(self.input_shape)

    @staticmethod
    def _grid(grid: tuple[int, int]) -> tuple[int, int]:
        h, w = (int(v) for v in grid)
        if h < 1 or w < 1:
            raise ConfigError(f"feature grid must be at least 1 x 1, got {grid}")
        return h, w
