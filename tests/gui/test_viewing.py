"""Workstation viewing driven in a real viewer under Xvfb: mouse events on the canvas, key presses
through the viewer's keymap."""

from __future__ import annotations

import time

import numpy as np
import pytest

from data_helpers import write_mammogram

pytestmark = pytest.mark.gui

PLUGIN = "napari-mammo-sae"
VIEWS = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]


@pytest.fixture
def exam(tmp_path):
    """Four views with a bright 'calcification' speck each; L MLO is MONOCHROME1."""
    rng = np.random.default_rng(0)
    for lat, view in VIEWS:
        pixels = rng.integers(500, 1500, size=(96, 64)).astype(np.uint16)
        pixels[40, 30] = 4000
        write_mammogram(
            tmp_path / f"{lat}{view}.dcm", pixels=pixels, image_laterality=lat, view_code=view,
            chest_wall={"R": "right", "L": "left"}[lat],
            photometric="MONOCHROME1" if (lat, view) == ("L", "MLO") else "MONOCHROME2",
        )  # fmt: skip
    return tmp_path


@pytest.fixture
def viewer(make_napari_viewer, exam):
    from napari_mammo_sae._napari import viewing

    v = make_napari_viewer(show=True)
    v.window._qt_window.resize(1000, 800)
    v.open(str(exam), plugin=PLUGIN)
    v.reset_view()
    # the reader bound the workstation keys in the viewer that opened the files
    assert {"F1", "F5", "H", "W", "M"} <= {str(k) for k in v.keymap}
    assert viewing.install(v) is viewing.install(v)  # installed once per viewer
    return v


def _press(viewer, key):
    """Call the viewer's binding for a key, as napari does on a key press."""
    func = next(f for k, f in viewer.keymap.items() if str(k) == key)
    func(viewer)


def _screen(viewer, world):
    """Canvas pixel (x, y) of a world point (row, col) for the current camera."""
    canvas = viewer.window._qt_viewer.canvas
    transform = canvas.view.transform * canvas.view.scene.transform
    mapped = transform.map([world[1], world[0], 0, 1])
    return float(mapped[0] / mapped[3]), float(mapped[1] / mapped[3])


def _mouse(viewer, kind, pos, button=None, shift=False):
    """Send a Qt mouse event to napari's canvas, as a real mouse would."""
    from qtpy.QtCore import QEvent, QPointF, Qt
    from qtpy.QtGui import QMouseEvent
    from qtpy.QtWidgets import QApplication

    native = viewer.window._qt_viewer.canvas._scene_canvas.native
    qt_button = {None: Qt.MouseButton.NoButton, 1: Qt.MouseButton.LeftButton,
                 2: Qt.MouseButton.RightButton}[button]  # fmt: skip
    kinds = {"press": QEvent.Type.MouseButtonPress, "move": QEvent.Type.MouseMove,
             "release": QEvent.Type.MouseButtonRelease}  # fmt: skip
    held = qt_button if kind == "move" else Qt.MouseButton.NoButton
    if kind == "press":
        held = qt_button
    point = QPointF(*pos)
    event = QMouseEvent(kinds[kind], point, native.mapToGlobal(point),
                        Qt.MouseButton.NoButton if kind == "move" else qt_button, held,
                        Qt.KeyboardModifier.ShiftModifier if shift
                        else Qt.KeyboardModifier.NoModifier)  # fmt: skip
    QApplication.sendEvent(native, event)


def _drag(viewer, start, end, button=2, shift=False):
    """A mouse drag on napari's canvas: press, moves 12 ms apart, release."""
    _mouse(viewer, "press", start, button, shift)
    for t in np.linspace(0, 1, 5)[1:]:
        pos = (start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]))
        _wait(0.012)  # vispy drops moves closer than 10 ms apart; napari throttles them in Qt
        _mouse(viewer, "move", pos, button, shift)
    _wait(0.012)
    _mouse(viewer, "release", end, button, shift)
    _wait(0.012)


def _wait(seconds):
    """Let Qt's event loop run (napari delivers mouse moves through a throttling Qt timer)."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.002)
    QApplication.processEvents()


def _centre(layer):
    top, left, bottom, right = layer.metadata["placement"].world_extent()
    return np.array([(top + bottom) / 2, (left + right) / 2])


def test_right_drag_sets_window_and_level_and_w_resets_to_the_dicom_window(viewer):
    from napari_mammo_sae._napari.viewing import file_window

    image = viewer.layers["R CC"]
    original = tuple(image.contrast_limits)
    assert file_window(image) == pytest.approx((2000.0, 3000.0))  # the header's C/W
    zoom, center = viewer.scene.camera.zoom, tuple(viewer.scene.camera.center)
    start = _screen(viewer, _centre(image))
    _drag(viewer, start, (start[0] + 100, start[1]))  # right: wider
    lo, hi = image.contrast_limits
    assert hi - lo > original[1] - original[0]
    assert (lo + hi) / 2 == pytest.approx(sum(original) / 2)
    # the camera did not zoom or pan on the right-drag
    assert (
        viewer.scene.camera.zoom == pytest.approx(zoom)
        and tuple(viewer.scene.camera.center) == center
    )
    width = hi - lo
    _drag(viewer, start, (start[0], start[1] + 80))  # down: higher level, same width
    lo2, hi2 = image.contrast_limits
    assert (lo2 + hi2) / 2 > (lo + hi) / 2 and hi2 - lo2 == pytest.approx(width)
    # the canvas shows the window in the file's units
    text = viewer.canvas.overlays.text
    c, w = file_window(image)
    assert text.visible and f"W {w:.6g}" in text.text and f"L {c:.6g}" in text.text
    # the other views kept their windows
    assert tuple(viewer.layers["L CC"].contrast_limits) == tuple(
        viewer.layers["L CC"].metadata["record"].display_limits()
    )
    # Shift: every view follows, each by the same drag
    before = {lay.name: tuple(lay.contrast_limits) for lay in viewer.layers}
    _drag(viewer, start, (start[0] + 50, start[1]), shift=True)
    for lay in viewer.layers:
        lo, hi = lay.contrast_limits
        assert hi - lo > before[lay.name][1] - before[lay.name][0], lay.name
    # W with the cursor over the image: back to the DICOM window
    viewer.cursor.position = tuple(_centre(image))
    _press(viewer, "W")
    assert tuple(image.contrast_limits) == pytest.approx(original)
    assert tuple(viewer.layers["L CC"].contrast_limits) != before["L CC"]  # the others kept theirs
    assert "W 3000" in text.text and "L 2000" in text.text
    # a left-drag still pans (napari's camera) and leaves the window alone
    _drag(viewer, start, (start[0] + 60, start[1]), button=1)
    _wait(0.1)
    assert tuple(viewer.scene.camera.center) != center
    assert tuple(image.contrast_limits) == pytest.approx(original)


def test_monochrome1_window_reads_in_the_files_units(viewer):
    from napari_mammo_sae._napari.viewing import file_window, install

    image = viewer.layers["L MLO"]
    assert image.metadata["photometric"] == "MONOCHROME1"
    assert file_window(image) == pytest.approx((2000.0, 3000.0))
    ws = install(viewer)
    c0, w0 = file_window(image)
    lo, hi = image.contrast_limits
    ws.set_window(image, (lo + hi) / 2 + 100, hi - lo)  # brighter display = lower file level
    assert file_window(image) == pytest.approx((c0 - 100, w0))


def test_overlays_never_change_the_window_and_h_hides_them_all(viewer):
    from napari_mammo_sae._napari.viewing import install

    ws = install(viewer)
    image = viewer.layers["R CC"]
    ws.set_window(image, 1500.0, 800.0)
    kept = tuple(image.contrast_limits)

    def hostile(event):  # something that re-windows images when a layer goes in
        image.contrast_limits = (0.0, 4095.0)

    viewer.layers.events.inserted.connect(hostile, position="first")
    heat = viewer.add_image(np.ones((6, 4), np.float32), name="R CC · #1 n3", blending="additive",
                            metadata={"mammo_sae": {"image": "R CC", "neuron": 3}})  # fmt: skip
    viewer.layers.events.inserted.disconnect(hostile)
    assert tuple(image.contrast_limits) == kept
    boxes = viewer.add_shapes([[[10, 10], [10, 20], [20, 20], [20, 10]]], name="boxes")
    _press(viewer, "H")
    assert not heat.visible and not boxes.visible
    assert all(lay.visible for lay in viewer.layers if "record" in lay.metadata)
    _press(viewer, "H")
    assert heat.visible and boxes.visible


def test_function_keys_show_one_view_large_with_its_overlays_and_back(viewer):
    views = {name: viewer.layers[name] for name in ("R CC", "L CC", "R MLO", "L MLO")}
    heat_r = viewer.add_image(np.ones((6, 4), np.float32), name="R CC · #1 n3",
                              metadata={"mammo_sae": {"image": "R CC"}}, units="mm")  # fmt: skip
    heat_l = viewer.add_image(np.ones((6, 4), np.float32), name="L CC · #1 n3",
                              metadata={"mammo_sae": {"image": "L CC"}}, units="mm")  # fmt: skip
    rect = lambda c: [c + d for d in ([-2, -2], [-2, 2], [2, 2], [2, -2])]  # noqa: E731
    boxes = viewer.add_shapes(
        [rect(_centre(views["R CC"])), rect(_centre(views["L CC"]))], name="findings",
        features={"label": ["calc R", "mass L"]}, text={"string": "{label}"},
        edge_color=["yellow", "red"], units="mm",
    )  # fmt: skip
    viewer.reset_view()
    hanging_zoom = viewer.scene.camera.zoom
    _press(viewer, "F1")
    assert [n for n, lay in views.items() if lay.visible] == ["R CC"]
    assert heat_r.visible and not heat_l.visible
    # the boxes spanning views: hidden, and a copy with R CC's box only shown
    copy = next(lay for lay in viewer.layers if lay.name == "findings (R CC)")
    assert not boxes.visible and copy.visible and len(copy.data) == 1
    assert list(copy.features["label"]) == ["calc R"]
    np.testing.assert_allclose(copy.edge_color[0], boxes.edge_color[0])
    assert viewer.scene.camera.zoom > hanging_zoom  # the view fills the canvas
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], _centre(views["R CC"]), atol=1.0)
    _press(viewer, "F4")  # straight to another view
    assert [n for n, lay in views.items() if lay.visible] == ["L MLO"]
    assert not heat_r.visible and "findings (R CC)" not in viewer.layers
    # an overlay of another view added meanwhile (a run) goes in hidden, and shows in the hanging
    late = viewer.add_image(np.ones((6, 4), np.float32), name="R CC · #2 n7", units="mm",
                            metadata={"mammo_sae": {"image": "R CC"}})  # fmt: skip
    assert not late.visible
    _press(viewer, "F4")  # the same key again: hanging layout
    assert late.visible
    assert all(lay.visible for lay in views.values()) and heat_r.visible and heat_l.visible
    assert boxes.visible and not any(lay.name.startswith("findings (") for lay in viewer.layers)
    assert viewer.scene.camera.zoom == pytest.approx(hanging_zoom)
    _press(viewer, "F2")
    _press(viewer, "F5")
    assert all(lay.visible for lay in views.values())


def test_magnifier_shows_full_resolution_pixels_enlarged_about_the_cursor(viewer):
    from napari_mammo_sae._napari.viewing import MAGNIFIER, install

    ws = install(viewer)
    image = viewer.layers["R CC"]
    speck = image.data_to_world((40, 30))  # the bright speck
    viewer.cursor.position = tuple(speck)
    _press(viewer, "M")
    loupe = next(lay for lay in viewer.layers if MAGNIFIER in lay.metadata)
    assert loupe.visible and viewer.layers[-1] is loupe
    assert 2 <= ws.magnification <= 4
    np.testing.assert_allclose(np.abs(loupe.scale), np.abs(image.scale) * ws.magnification)
    # the cursor's pixel is the same in the loupe (zoom about the cursor), at full resolution
    r, c = np.round(loupe.world_to_data(tuple(speck))).astype(int)
    assert loupe.data[r, c] == image.data[40, 30] == 4000
    assert loupe.data.dtype == image.data.dtype and loupe.interpolation2d == "nearest"
    assert tuple(loupe.contrast_limits) == tuple(image.contrast_limits)
    # a visible neuron heatmap of this view is magnified with it, sampled at the loupe's pixels
    heat = np.zeros((6, 4), np.float32)
    heat[2, 1] = 5.0
    cell = np.abs(np.asarray(image.scale)) * 16  # one heatmap cell = 16 x 16 image pixels
    overlay = viewer.add_image(
        heat, name="R CC · #1 n3", scale=image.scale * 16, units="mm", blending="additive",
        translate=image.data_to_world((7.5, 7.5)), metadata={"mammo_sae": {"image": "R CC"}},
    )  # fmt: skip
    assert cell.min() > 0
    at = overlay.data_to_world((2, 1))  # the heatmap cell's centre
    ws.magnify(at)
    copy = viewer.layers[f"magnifier · {overlay.name}"]
    assert viewer.layers[-1] is copy and viewer.layers[-2] is loupe
    assert copy.data.shape == loupe.data.shape and np.allclose(copy.scale, loupe.scale)
    r, c = np.round(copy.world_to_data(tuple(at))).astype(int)
    # bilinear, as napari draws the heatmap: the peak sits on the cursor (within a pixel)
    assert copy.data[r, c] > 4.3 and copy.data.max() <= 5.0
    peak = np.unravel_index(np.argmax(copy.data), copy.data.shape)
    assert abs(peak[0] - r) <= 1 and abs(peak[1] - c) <= 1
    overlay.visible = False
    ws.magnify(at)
    assert not copy.visible
    # moving the mouse moves the loupe; off the images it hides
    other = viewer.layers["L CC"]
    _wait(0.012)
    _mouse(viewer, "move", _screen(viewer, _centre(other)))
    _wait(0.012)
    r, c = np.round(loupe.world_to_data(viewer.cursor.position)).astype(int)
    ro, co = np.round(other.world_to_data(viewer.cursor.position)).astype(int)
    assert loupe.data[r, c] == other.data[ro, co]
    _wait(0.012)
    _mouse(viewer, "move", (2, 2))
    _wait(0.012)
    assert not loupe.visible
    _press(viewer, "M")
    assert not any(MAGNIFIER in lay.metadata for lay in viewer.layers)


def test_w_off_the_images_resets_every_window_and_a_missing_view_says_so(viewer):
    from napari_mammo_sae._napari.viewing import install

    ws = install(viewer)
    for name in ("R CC", "L MLO"):
        ws.set_window(viewer.layers[name], 900.0, 300.0)
    viewer.cursor.position = (-1e6, -1e6)  # on no image
    _press(viewer, "W")
    for lay in viewer.layers:
        assert tuple(lay.contrast_limits) == pytest.approx(lay.metadata["record"].display_limits())
    viewer.layers.remove("L MLO")
    visible = [lay.visible for lay in viewer.layers]
    _press(viewer, "F4")  # no L MLO in this viewer: nothing hidden, and the status says why
    assert [lay.visible for lay in viewer.layers] == visible and "no L MLO" in viewer.status


def test_a_closed_viewer_is_not_kept_alive_by_its_workstation(make_napari_viewer):
    import gc
    import weakref

    from napari_mammo_sae._napari import viewing

    v = make_napari_viewer()
    assert viewing.install(v).viewer is v
    ref = weakref.ref(v)
    v.close()
    del v
    gc.collect()
    assert ref() is None  # the registry is keyed weakly and its value holds the viewer weakly
