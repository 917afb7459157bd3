"""Adding layers to napari without freezing the viewer.

A napari layer insert costs the GUI thread about 100 ms under software OpenGL (layer controls,
vispy visuals), napari then rebuilds its scene graph (with a full gc.collect), and the window
repaint that follows costs as much again. The helpers below let a widget spread that over
separate event-loop turns: insert with repaints held and the scene-graph update batched, add the
layer's controls panel, close the batch, then let the window repaint.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from types import SimpleNamespace
from typing import Any


def main_window(viewer: Any, widget: Any = None) -> Any:
    """napari's main window (the top-level Qt widget), else ``widget``'s window, else None."""
    qt_window = getattr(getattr(viewer, "window", None), "_qt_window", None)
    if qt_window is not None:
        return qt_window
    return widget.window() if widget is not None else None


def append_without_selecting(viewer: Any, layer: Any, controls_later: bool = False) -> Any:
    """Add a layer on top, leaving the user's layer selection as it was.

    ``controls_later``: add it without its layer-controls panel and return the step that adds
    them, for a later event-loop turn (else None). napari builds a layer's vispy node and its
    controls panel in one insert, about 50 + 45 ms of the GUI thread under software OpenGL; split,
    neither turn holds the viewer for 100 ms. The panel only shows for the selected layer, and
    the layer is not selected.
    """
    layers = viewer.layers
    activate = getattr(layers, "_activate_on_insert", None)
    if activate is not None:  # napari selects each inserted layer; ours should not steal it
        layers._activate_on_insert = False
    qt_viewer = getattr(getattr(viewer, "window", None), "_qt_viewer", None)
    controls = getattr(qt_viewer, "controls", None) if controls_later else None
    add = getattr(controls, "_add", None)
    try:
        with layers.events.inserted.blocker(add) if add else nullcontext():
            layers.append(layer)
    finally:
        if activate is not None:
            layers._activate_on_insert = activate
    if not controls_later:
        return None

    def add_controls() -> None:
        if add is not None and layer in layers and layer not in controls.widgets:
            add(SimpleNamespace(value=layer))

    return add_controls


class QuietBatch:
    """A napari layers batch with the main window's repaints held, closed in two steps.

    ``begin`` opens the batch and holds repaints; ``end`` closes the batch (napari rebuilds its
    scene graph once); ``release`` lets the window repaint (once). Each of the three is safe to
    call again or out of turn, so a failing step can always call ``end`` and ``release``. Under a
    software OpenGL compositor each repaint of the window costs about as much as an insert (50 ms
    at 1600x1000), hence: hold repaints, repaint once.

    The hold keeps Qt's update requests to the window back instead of dropping them: widgets go
    on marking what they need repainted, and the release paints just that, once. (Turning the
    window's updates off and on instead repaints every widget of the window on release, and
    under Qt 6 in two passes: 80-120 ms here, against 40-60 ms for what an insert changed.)
    """

    def __init__(self, viewer: Any, widget: Any = None) -> None:
        self.viewer, self.widget = viewer, widget
        self.open = False
        self._held: Any = None  # the window whose repaints are held

    def begin(self) -> None:
        if self.open:
            return
        self.viewer.layers.events.begin_batch()
        self.open = True
        window = main_window(self.viewer, self.widget)
        if window is not None and self._held is None and window.updatesEnabled():
            # counted per window: two docks' batches interleave (the explorer's hidden layers and
            # the interventions' CAM layer), and one's release must not repaint inside the other's
            hold = _hold_of(window)
            if hold is None:
                hold = _HOLDS[id(window)] = _hold_class()(window)
            hold.count += 1
            self._held = window

    def end(self) -> None:
        if self.open:
            self.open = False
            self.viewer.layers.events.end_batch()

    def release(self) -> None:
        window, self._held = self._held, None
        hold = _hold_of(window) if window is not None else None
        if hold is not None:
            hold.count -= 1
            if hold.count <= 0:
                del _HOLDS[id(window)]
                hold.release()


def holding(window: Any) -> bool:
    """True while a batch holds ``window``'s repaints."""
    return _hold_of(window) is not None


def _hold_of(window: Any) -> Any:
    hold = _HOLDS.get(id(window))
    try:
        if hold is not None and hold.parent() is window:
            return hold
    except RuntimeError:  # the window (and its hold with it) was closed while held
        pass
    _HOLDS.pop(id(window), None)
    return None


_HOLDS: dict[int, Any] = {}  # id(main window) -> its repaint hold (a child QObject of it)


@lru_cache(maxsize=1)
def _hold_class() -> type:
    from qtpy.QtCore import QCoreApplication, QEvent, QObject, Qt

    class RepaintHold(QObject):
        """An event filter on a window that keeps its update requests back until released."""

        def __init__(self, window: Any) -> None:
            super().__init__(window)  # a child: it goes when the window goes
            self.count, self.kept = 0, False
            window.installEventFilter(self)

        def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 - Qt's name
            if event.type() == QEvent.Type.UpdateRequest and obj is self.parent():
                self.kept = True  # what is marked dirty stays dirty until the release
                return True
            return False

        def release(self) -> None:
            window = self.parent()
            window.removeEventFilter(self)
            if self.kept:  # Qt asks once and waits: ask again for what was kept back
                QCoreApplication.postEvent(window, QEvent(QEvent.Type.UpdateRequest),
                                           Qt.EventPriority.LowEventPriority.value)  # fmt: skip
            self.deleteLater()

    return RepaintHold


def insert_in_turns(
    viewer: Any, layer: Any, widget: Any = None, on_error: Any = None, on_done: Any = None
) -> None:
    """Add a built layer over four event-loop turns (insert; its controls panel; scene graph;
    repaint), then call ``on_done()``.

    The viewer stays responsive between them. Whatever fails, the batch is closed, the window
    repaints again, ``on_error(exc)`` is called, and then ``on_done()``.
    """
    from qtpy.QtCore import QTimer

    batch = QuietBatch(viewer, widget)
    controls: list = []

    def insert() -> None:
        batch.begin()
        controls.append(append_without_selecting(viewer, layer, controls_later=True))

    steps = [insert, lambda: controls[0](), batch.end, batch.release]

    def next_step() -> None:
        try:
            steps.pop(0)()
        except Exception as exc:  # noqa: BLE001 - reported, and the viewer must go on
            steps.clear()
            try:
                batch.end()
            finally:
                batch.release()
            if on_error is not None:
                on_error(exc)
        if steps:
            QTimer.singleShot(1, next_step)
        elif on_done is not None:
            on_done()

    QTimer.singleShot(0, next_step)
