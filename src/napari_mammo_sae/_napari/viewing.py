"""Mammography workstation viewing on the plugin's mammogram layers.

What a radiologist's hands expect, on every image layer opened by this plugin's reader
(:func:`install` binds it once per viewer; the review docks call it):

* **window/level by right-drag** on an image (Shift: every view together): horizontal = width
  (right widens), vertical = level (down raises it, the image darkens); the canvas shows the window
  in the file's units (the values
  of the DICOM WindowCenter/Width, MONOCHROME1 included). ``W`` resets the image under the cursor
  (all images when the cursor is on none) to the file's window.
* **magnifier**: ``M`` toggles a loupe that shows the full-resolution pixels around the cursor
  enlarged ``magnification`` times (2-4, nearest neighbour: no smoothing over calcifications),
  in the image's current window.
* **one view large**: ``F1`` R CC, ``F2`` L CC, ``F3`` R MLO, ``F4`` L MLO fill the canvas with that
  view, its neuron/CAM overlays and its annotation boxes; the same key again, or ``F5``, returns to
  the hanging layout. (``1``-``3`` are the labelling dock's verdict keys, hence function keys.)
* **overlays**: ``H`` hides every overlay (heatmaps, CAMs, boxes) and shows them again. Adding an
  overlay never changes a mammogram's window (checked on every insert, restored if changed).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

VIEW_KEYS = {"F1": "R CC", "F2": "L CC", "F3": "R MLO", "F4": "L MLO"}
HANGING_KEY, OVERLAYS_KEY, RESET_KEY, MAGNIFIER_KEY = "F5", "H", "W", "M"
MAGNIFIER = "mammo_sae_magnifier"  # metadata key of the loupe layer
VIEW_COPY = "mammo_sae_view_copy"  # metadata key of a one-view copy of a boxes layer
OVERLAY_KEY = "mammo_sae"  # metadata key of the neuron explorer's heatmap layers
DRAG_UNITS_PER_PIXEL = 1 / 400  # a 400-pixel drag moves the window by the image's value range

_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _real(viewer: Any) -> Any:
    """The viewer behind napari's per-widget ``PublicOnlyProxy``."""
    try:
        return object.__getattribute__(viewer, "__wrapped__")
    except AttributeError:
        return viewer


def mammogram_layers(viewer: Any) -> list[Any]:
    """Image layers opened by this plugin's reader (they carry the record and placement)."""
    return [
        lay
        for lay in viewer.layers
        if lay._type_string == "image" and "record" in lay.metadata and "placement" in lay.metadata
    ]


def annotation_shapes(viewer: Any) -> list[np.ndarray]:
    """Every rectangle/polygon of the viewer's annotation Shapes layers (world coords): not the
    planted-marker layer, not one-view copies of boxes already counted."""
    shapes = []
    for lay in viewer.layers:
        if lay._type_string != "shapes" or VIEW_COPY in lay.metadata:
            continue
        name = lay.name.lower()
        if "confounder" in name or "marker" in name or lay.metadata.get(OVERLAY_KEY) == "marker":
            continue
        shapes.extend(np.asarray(s) for s in lay.data)
    return shapes


def file_window(layer: Any) -> tuple[float, float]:
    """(center, width) of a mammogram layer's contrast limits in the file's units.

    The inverse of ``dicom.Window.limits``: MONOCHROME1 images are shown inverted around a pivot,
    and the DICOM LINEAR function maps ``c - 0.5 +- (w - 1) / 2``, so an unchanged layer reads as
    its header's WindowCenter/WindowWidth.
    """
    lo, hi = (float(v) for v in layer.contrast_limits)
    rec = layer.metadata["record"]
    window = rec.window
    linear = window is not None and window.function == "LINEAR"
    center, width = (lo + hi) / 2 + (0.5 if linear else 0.0), hi - lo + (1.0 if linear else 0.0)
    if rec.photometric == "MONOCHROME1" and not getattr(window, "is_sigmoid", False):
        center = rec._inversion_pivot() - center + (1.0 if linear else 0.0)
    return center, width


def window_text(layer: Any) -> str:
    center, width = file_window(layer)
    sigmoid = getattr(layer.metadata["record"].window, "is_sigmoid", False)
    units = " (of the SIGMOID VOI output)" if sigmoid else ""
    return f"{layer.name}   W {width:.6g}   L {center:.6g}{units}"


class Workstation:
    """The workstation behaviour of one viewer (see the module docstring)."""

    def __init__(self, viewer: Any) -> None:
        # weakly: install()'s registry is keyed weakly by the viewer, and a value holding its key
        # would keep every closed viewer alive
        self._viewer = weakref.ref(viewer)
        self.magnification = 3.0
        self.loupe_pixels = 260  # size of the loupe on screen
        self.single: str | None = None  # the view shown large, None in the hanging layout
        self._saved_visibility: list[tuple[Any, bool]] = []
        self._hidden_overlays: list[Any] = []
        self._windows: dict[int, tuple[float, float]] = {}  # mammogram id -> limits before insert
        self.magnifier: Any = None
        self._loupe_heat: dict[int, Any] = {}  # overlay id -> its magnified copy in the loupe
        viewer.mouse_drag_callbacks.append(self._drag)
        viewer.mouse_move_callbacks.append(self._moved)
        keys = {
            **{k: (lambda v, name=name: self.show_view(name)) for k, name in VIEW_KEYS.items()},
            HANGING_KEY: lambda v: self.show_hanging(),
            OVERLAYS_KEY: lambda v: self.toggle_overlays(),
            RESET_KEY: lambda v: self.reset_window(self.layer_at(v.cursor.position)),
            MAGNIFIER_KEY: lambda v: self.toggle_magnifier(),
        }
        for key, func in keys.items():
            func.__name__ = f"mammo_sae_{key}"  # napari's keymap lists bindings by name
            viewer.bind_key(key, func, overwrite=True)
        viewer.layers.events.inserting.connect(self._remember_windows)
        viewer.layers.events.inserted.connect(self._keep_windows)

    @property
    def viewer(self) -> Any:
        return self._viewer()

    # --- which layer ----------------------------------------------------------------------------
    def layer_at(self, position: Any) -> Any:
        """The visible mammogram under a world position (None when there is none)."""
        for lay in reversed(mammogram_layers(self.viewer)):
            if not lay.visible or position is None:
                continue
            r, c = np.asarray(lay.world_to_data(tuple(position)))[-2:]
            rows, cols = lay.data.shape[-2:]
            if -0.5 <= r < rows - 0.5 and -0.5 <= c < cols - 0.5:
                return lay
        return None

    def overlays(self) -> list[Any]:
        """Every layer drawn over the mammograms (heatmaps, CAMs, boxes), not the loupe."""
        images = {id(lay) for lay in mammogram_layers(self.viewer)}
        return [
            lay
            for lay in self.viewer.layers
            if id(lay) not in images and MAGNIFIER not in lay.metadata
        ]

    # --- window / level -------------------------------------------------------------------------
    def set_window(self, layer: Any, center: float, width: float) -> None:
        """Set a mammogram's window in display units (center, width) and show it on the canvas."""
        width = max(float(width), 1e-6)
        limits = (float(center) - width / 2, float(center) + width / 2)
        lo, hi = layer.contrast_limits_range
        if limits[0] < lo or limits[1] > hi:  # a window wider than the data is allowed
            layer.contrast_limits_range = (min(lo, limits[0]), max(hi, limits[1]))
        layer.contrast_limits = limits
        self._show_text(window_text(layer))

    def reset_window(self, layer: Any = None) -> None:
        """Back to the file's window: ``layer``, or every mammogram when None."""
        layers = [layer] if layer is not None else mammogram_layers(self.viewer)
        for lay in layers:
            lay.contrast_limits = lay.metadata["record"].display_limits()
        if layers:
            self._show_text(window_text(layers[0]) + "   (DICOM window)")

    def _show_text(self, text: str) -> None:
        overlay = self.viewer.canvas.overlays.text
        overlay.text, overlay.visible = text, True
        overlay.position, overlay.color, overlay.font_size = "bottom_left", "white", 10
        self.viewer.status = text

    def _drag(self, viewer: Any, event: Any) -> Any:
        """Right-drag on a mammogram: horizontal = width, vertical = level (a drag generator);
        with Shift, every visible mammogram of the viewer follows (each in its own value range)."""
        if event.button != 2:
            return
        layer = self.layer_at(event.position)
        if layer is None:
            return
        event.handled = True  # the camera must not zoom on this drag
        linked = any(m == "Shift" for m in event.modifiers)  # vispy Keys equal their names
        others = (
            [v for v in mammogram_layers(viewer) if v.visible and v is not layer] if linked else []
        )
        start = []
        for lay in [*others, layer]:  # the one under the cursor last: its window is shown
            lo, hi = (float(v) for v in lay.contrast_limits)
            rlo, rhi = (float(v) for v in lay.contrast_limits_range)
            start.append(
                (lay, (lo + hi) / 2, hi - lo, max(rhi - rlo, hi - lo) * DRAG_UNITS_PER_PIXEL)
            )
        x0, y0 = event.pos[:2]
        yield
        while event.type == "mouse_move":
            dx, dy = event.pos[0] - x0, event.pos[1] - y0
            for lay, center, width, per_pixel in start:
                self.set_window(lay, center + dy * per_pixel, width + dx * per_pixel)
            event.handled = True
            yield

    def _remember_windows(self, event: Any = None) -> None:
        self._windows = {
            id(lay): tuple(lay.contrast_limits) for lay in mammogram_layers(self.viewer)
        }

    def _keep_windows(self, event: Any = None) -> None:
        """An overlay went in: every mammogram keeps the window it had; while one view is shown
        large, an overlay of another view goes in hidden (and shows again in the hanging)."""
        views = mammogram_layers(self.viewer)
        for lay in views:
            before = self._windows.get(id(lay))
            if before is not None and tuple(lay.contrast_limits) != before:
                lay.contrast_limits = before
        new = getattr(event, "value", None)
        if self.single is not None and new is not None and MAGNIFIER not in new.metadata:
            owner = None if id(new) in map(id, views) else self._owner(new, views)
            if owner is not None and owner.name != self.single and new.visible:
                self._saved_visibility.append((new, True))
                new.visible = False

    # --- overlays -------------------------------------------------------------------------------
    def toggle_overlays(self) -> bool:
        """Hide every visible overlay, or show again the ones hidden this way; True when shown."""
        shown = [lay for lay in self.overlays() if lay.visible]
        if shown:
            self._hidden_overlays = shown
            for lay in shown:
                lay.visible = False
            return False
        present = set(map(id, self.viewer.layers))
        for lay in self._hidden_overlays:
            if id(lay) in present:
                lay.visible = True
        self._hidden_overlays = []
        return True

    # --- one view large -------------------------------------------------------------------------
    def _owner(self, layer: Any, views: list[Any]) -> Any:
        """The mammogram an overlay belongs to (by its metadata, else where it lies)."""
        for key in ("mammo_sae", "mammo_sae_cam", "mammo_sae_gallery"):
            meta = layer.metadata.get(key)
            if isinstance(meta, dict) and meta.get("image"):
                return next((v for v in views if v.name == meta["image"]), None)
        centre = np.asarray(layer.extent.world, dtype=float)[:, -2:].mean(axis=0)
        return self._view_containing(centre, views)

    @staticmethod
    def _view_containing(point: np.ndarray, views: list[Any]) -> Any:
        for v in views:
            top, left, bottom, right = v.metadata["placement"].world_extent()
            if top <= point[0] <= bottom and left <= point[1] <= right:
                return v
        return None

    def show_view(self, name: str) -> bool:
        """Show one view large with its overlays; the shown view's key again returns to the
        hanging layout. False when the exam has no such view."""
        views = mammogram_layers(self.viewer)
        target = next((v for v in views if v.name == name), None)
        if target is None:
            self.viewer.status = f"no {name} view in this viewer"
            return False
        if self.single == name:
            self.show_hanging()
            return True
        if self.single is not None:
            self.show_hanging(reset_camera=False)
        self._saved_visibility = [(lay, lay.visible) for lay in self.viewer.layers]
        self.single = name
        copies = []
        for lay in list(self.viewer.layers):
            if lay is target or MAGNIFIER in lay.metadata:
                continue
            if id(lay) in {id(v) for v in views}:
                lay.visible = False
            elif lay._type_string == "shapes" and len(lay.data):
                copies += self._boxes_of(lay, target, views)
            elif self._owner(lay, views) not in (target, None):
                lay.visible = False
        from .inserts import append_without_selecting as append_quietly

        for copy in copies:
            append_quietly(self.viewer, copy)
        target.visible = True
        self.viewer.fit_to_view(layers=[target], margin=0.02)
        self.viewer.status = f"{name} (F5: hanging layout)"
        return True

    def _boxes_of(self, layer: Any, target: Any, views: list[Any]) -> list[Any]:
        """A boxes layer spanning several views is hidden and replaced, while one view is shown,
        by a copy holding that view's boxes only (same colours, labels and features)."""
        centres = [np.asarray(s)[:, -2:].mean(axis=0) for s in layer.data]
        mine = [i for i, c in enumerate(centres) if self._view_containing(c, views) is target]
        if len(mine) == len(centres):
            return []
        was_visible = layer.visible
        layer.visible = False
        if not mine or not was_visible:
            return []
        from napari.layers import Shapes

        state = layer._get_state()
        per_shape = ("shape_type", "edge_width", "edge_color", "face_color", "z_index")
        kwargs = {k: [state[k][i] for i in mine] for k in per_shape}
        text = layer.text
        copy = Shapes(
            [layer.data[i] for i in mine], **kwargs, name=f"{layer.name} ({target.name})",
            features=layer.features.iloc[mine].reset_index(drop=True),
            text={"string": text.string, "color": text.color, "size": text.size,
                  "anchor": text.anchor} if text.visible and len(layer.features.columns) else None,
            opacity=layer.opacity, metadata={VIEW_COPY: True}, units=layer.units,
            scale=layer.scale, translate=layer.translate,
        )  # fmt: skip
        return [copy]

    def show_hanging(self, reset_camera: bool = True) -> None:
        """Back to the four-view hanging layout, every layer as it was before."""
        for lay in [lay for lay in self.viewer.layers if VIEW_COPY in lay.metadata]:
            self.viewer.layers.remove(lay)
        present = {id(lay) for lay in self.viewer.layers}
        for lay, visible in self._saved_visibility:
            if id(lay) in present and lay.visible != visible:
                lay.visible = visible
        self._saved_visibility, self.single = [], None
        if reset_camera:
            self.viewer.reset_view()
            self.viewer.status = "hanging layout"

    # --- magnifier ------------------------------------------------------------------------------
    def toggle_magnifier(self) -> bool:
        """Show or hide the loupe; True when it is on."""
        if self.magnifier is not None:
            for lay in [self.magnifier, *self._loupe_heat.values()]:
                if lay in self.viewer.layers:
                    self.viewer.layers.remove(lay)
            self.magnifier, self._loupe_heat = None, {}
            return False
        from napari.layers import Image

        self.magnifier = Image(
            np.zeros((2, 2), np.float32), name="magnifier", interpolation2d="nearest",
            blending="translucent_no_depth", metadata={MAGNIFIER: True}, visible=False,
            units=("mm", "mm"),
        )  # fmt: skip
        self.magnifier.bounding_box.visible = True
        self.magnifier.bounding_box.points = False
        self.magnifier.bounding_box.line_color = "#ffcc00"
        from .inserts import append_without_selecting as append_quietly

        append_quietly(self.viewer, self.magnifier)
        self.magnify(self.viewer.cursor.position)
        return True

    def _moved(self, viewer: Any, event: Any) -> None:
        if self.magnifier is not None:
            self.magnify(event.position)

    def magnify(self, position: Any) -> bool:
        """Move the loupe to a world position: the full-resolution pixels around it, enlarged
        ``magnification`` times about that point. False (loupe hidden) off the mammograms."""
        loupe = self.magnifier
        layer = self.layer_at(position) if loupe is not None else None
        if layer is None:
            for lay in [loupe, *self._loupe_heat.values()] if loupe is not None else []:
                if lay.visible:
                    lay.visible = False
            return False
        zoom = float(self.viewer.scene.camera.zoom)  # screen pixels per world unit (mm)
        spacing = np.abs(np.asarray(layer.scale[-2:], dtype=float))
        half = max(4, int(self.loupe_pixels / (2 * self.magnification * zoom * spacing.min())))
        r, c = np.asarray(layer.world_to_data(tuple(position)))[-2:]
        rows, cols = layer.data.shape[-2:]
        r0, c0 = max(0, int(round(r)) - half), max(0, int(round(c)) - half)
        patch = np.asarray(layer.data[r0 : min(rows, r0 + 2 * half), c0 : min(cols, c0 + 2 * half)])
        scale = np.asarray(layer.scale[-2:], dtype=float) * self.magnification
        # pixel (r - r0, c - c0) of the patch lands on the cursor: the loupe zooms about it
        translate = np.asarray(position[-2:], dtype=float) - scale * np.array([r - r0, c - c0])
        loupe.data = patch
        loupe.scale, loupe.translate = scale, translate
        loupe.contrast_limits_range = layer.contrast_limits_range
        loupe.contrast_limits = layer.contrast_limits
        if not loupe.visible:
            loupe.visible = True
        rows_cols = (np.arange(r0, r0 + patch.shape[0]), np.arange(c0, c0 + patch.shape[1]))
        heat = self._magnify_heat(layer, rows_cols, scale, translate)
        top = [loupe, *heat]  # the loupe on top, its heatmaps above it
        if list(self.viewer.layers)[-len(top) :] != top:  # moving repaints the layer list
            for lay in top:
                self.viewer.layers.move(self.viewer.layers.index(lay), len(self.viewer.layers))
        return True

    def _magnify_heat(self, layer: Any, rows_cols: tuple, scale: Any, translate: Any) -> list:
        """The visible neuron/CAM heatmaps of ``layer`` in the loupe: each sampled (bilinear, as
        napari draws them) at the patch's pixels, clipped to the loupe, at half opacity so the
        magnified tissue (calcifications) stays readable under them."""
        from scipy.ndimage import map_coordinates

        wanted = [
            o for o in self.overlays()
            if o.visible and o._type_string == "image" and o.ndim == 2
            and self._owner(o, [layer]) is layer
        ]  # fmt: skip
        t, sc = np.asarray(layer.translate[-2:], float), np.asarray(layer.scale[-2:], float)
        wy, wx = t[0] + sc[0] * rows_cols[0], t[1] + sc[1] * rows_cols[1]  # patch pixel centres
        out = []
        for o in wanted:
            ot, os_ = np.asarray(o.translate[-2:], float), np.asarray(o.scale[-2:], float)
            gy, gx = np.meshgrid((wy - ot[0]) / os_[0], (wx - ot[1]) / os_[1], indexing="ij")
            data = np.asarray(o.data, dtype=np.float32)
            sampled = map_coordinates(data, [gy, gx], order=1, mode="nearest")
            inside = (
                (gy >= -0.5)
                & (gy <= data.shape[0] - 0.5)
                & (gx >= -0.5)
                & (gx <= data.shape[1] - 0.5)
            )
            sampled = np.where(inside, sampled, 0).astype(np.float32)
            copy = self._loupe_heat.get(id(o))
            if copy is None or copy not in self.viewer.layers:
                from napari.layers import Image

                copy = Image(sampled, name=f"magnifier · {o.name}", colormap=o.colormap,
                             blending=o.blending, opacity=0.5 * o.opacity, units=("mm", "mm"),
                             contrast_limits=o.contrast_limits, metadata={MAGNIFIER: True},
                             interpolation2d="nearest", scale=scale, translate=translate)  # fmt: skip
                self._loupe_heat[id(o)] = copy
                from .inserts import append_without_selecting

                append_without_selecting(self.viewer, copy)
            else:
                copy.data = sampled
                copy.scale, copy.translate = scale, translate
                copy.contrast_limits = o.contrast_limits
                copy.visible = True
            out.append(copy)
        shown = {id(c) for c in out}
        for copy in self._loupe_heat.values():
            if id(copy) not in shown and copy.visible:
                copy.visible = False
        return out


def install(viewer: Any) -> Workstation:
    """The viewer's workstation behaviour (bound on first call, then the same object)."""
    real = _real(viewer)
    if real not in _STATES:
        _STATES[real] = Workstation(real)
    return _STATES[real]
