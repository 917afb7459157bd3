"""What the review widgets share per viewer: the current analysis, neuron, SAE key and settings.

One :class:`ReviewSession` per viewer (:func:`get_session`). The explorer fills it after a run; the
intervention, labelling, gallery and plots widgets listen to its signals. Settings the user expects
to be remembered (model paths, rater name, label database) live in a small JSON file in the user
config directory - never patient data.
"""

from __future__ import annotations

import json
import logging
import weakref
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from psygnal import Signal

from ..model_choice import ImageResult  # noqa: F401 - re-exported: the widgets share it

log = logging.getLogger(__name__)


def settings_path() -> Path:
    """The JSON settings file (user config directory)."""
    from platformdirs import user_config_dir

    return Path(user_config_dir("napari-mammo-sae", appauthor=False)) / "settings.json"


def choices(enum: Any, labels: dict | None = None) -> list[tuple[str, Any]]:
    """(text, member) pairs for a magicgui ComboBox: the enum's values (or ``labels``) as texts."""
    return [((labels or {}).get(m, m.value), m) for m in enum]


def path_text(edit: Any) -> str:
    """The path in a magicgui FileEdit as text ('' when empty)."""
    value = edit.value
    return "" if value is None or str(value).strip() in ("", ".") else str(value)


def on_show(widget: Any, callback: Any) -> Any:
    """Call ``callback()`` each time the Qt ``widget`` is shown (a dock tab raised, reopened)."""
    from qtpy.QtCore import QEvent, QObject

    class _Filter(QObject):
        def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 - Qt override
            if event.type() == QEvent.Type.Show:
                callback()
            return False

    widget._show_filter = _Filter(widget)  # parented and referenced: lives as long as the widget
    widget.installEventFilter(widget._show_filter)
    return widget._show_filter


def load_settings() -> dict:
    """Remembered settings ({} when none or unreadable)."""
    try:
        return json.loads(settings_path().read_text())
    except (OSError, ValueError):
        return {}


def save_settings(**values: Any) -> None:
    """Merge ``values`` into the remembered settings (best effort: never raises into the GUI)."""
    data = load_settings()
    data.update({k: v for k, v in values.items() if v is not None})
    try:
        path = settings_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError as exc:  # a read-only home must not break the plugin
        log.warning("settings not saved: %s", exc)


class ReviewSession:
    """Per-viewer state shared by the widgets."""

    analysis_changed = Signal(object)  # the ReviewSession
    neuron_changed = Signal(int)
    verdicts_changed = Signal()
    study_changed = Signal(object)  # the open reading study, or None

    def __init__(self) -> None:
        self.results: dict[str, ImageResult] = {}  # image layer name -> result
        self.current_layer: str | None = None
        self.neuron: int | None = None
        self.sae_hash: str = ""
        self.concept: str = "calcification"
        self.variant: str = "finetuned"
        self.target_class: int = 1
        self.ranking: str = "logit"
        self.class_scores: np.ndarray | None = None  # (2, m) dataset ranking scores when probed
        self.probe: Any = None  # pipeline.probe.ProbeResult
        self.probe_path: Path | None = None
        self.data_dir: Path | None = None
        self.models: Any = None  # _napari.model_choice.LoadedModels
        self.label_db: Path | None = None
        # the interventions dock's last result (analysis.interventions.InterventionResult) and the
        # image layer it was applied to; the DICOM export puts it in that image's SR
        self.last_intervention: Any = None
        self.last_intervention_layer: str | None = None
        # for a region intervention: (its boxes in the image's pixels, feature cells switched off)
        self.last_intervention_region: tuple | None = None
        self._study: Any = None

    @property
    def study(self) -> Any:
        """The labelling dock's open reading study, or None. Contract (owned by labels/study code):
        ``study.consensus_spurious() -> list[int]`` gives the neurons the study's readers call
        spurious; the interventions dock offers them as a mode while this is set. Setting it
        emits ``study_changed``."""
        return self._study

    @study.setter
    def study(self, study: Any) -> None:
        self._study = study
        self.study_changed.emit(study)

    @property
    def current(self) -> ImageResult | None:
        """The result of the image the explorer last focused."""
        if self.current_layer in self.results:
            return self.results[self.current_layer]
        return next(iter(self.results.values()), None)

    @property
    def top_neurons(self) -> list[int]:
        """The current image's ranked neurons."""
        cur = self.current
        return [] if cur is None else [int(n) for n in cur.neurons]

    def set_neuron(self, neuron: int) -> None:
        """Make ``neuron`` the current one (emits neuron_changed)."""
        self.neuron = int(neuron)
        self.neuron_changed.emit(int(neuron))

    def step_neuron(self, step: int) -> int | None:
        """Move to the next (+1) or previous (-1) neuron of the top list."""
        top = self.top_neurons
        if not top:
            return None
        i = top.index(self.neuron) if self.neuron in top else -1
        self.set_neuron(top[(i + step) % len(top)])
        return self.neuron


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_session(viewer: Any) -> ReviewSession:
    """The viewer's session (created on first use).

    Widgets opened from the Plugins menu get napari's ``PublicOnlyProxy`` of the viewer, a new
    proxy per widget: the session is keyed by the viewer itself, so it is shared and lives as
    long as the viewer, not as long as one widget's proxy.
    """
    try:
        real = object.__getattribute__(viewer, "__wrapped__")
    except AttributeError:
        real = viewer
    if real not in _SESSIONS:
        _SESSIONS[real] = ReviewSession()
    return _SESSIONS[real]


_LIVE_WORKERS: set = set()


def keep_alive(worker: Any) -> Any:
    """Hold a worker until it finishes, so closing a widget (or the viewer) mid-run cannot delete
    the worker's Qt signals while its thread still emits - that aborts the whole process."""
    if not _LIVE_WORKERS:
        import atexit

        atexit.unregister(_await_workers)
        atexit.register(_await_workers)
    _LIVE_WORKERS.add(worker)
    worker.finished.connect(lambda w=worker: _LIVE_WORKERS.discard(w))
    return worker


def _await_workers(timeout_ms: int = 20_000) -> None:
    """At interpreter exit: stop our running workers and let their threads end before Qt goes."""
    for worker in list(_LIVE_WORKERS):
        try:
            worker.quit()
        except RuntimeError:  # its Qt side is already gone
            pass
    try:
        from napari.qt.threading import WorkerBase

        WorkerBase.await_workers(timeout_ms)
    except Exception:  # never raise at exit
        pass


def notify_error(message: str) -> None:
    """Show an error in the viewer (falls back to the log outside napari)."""
    try:
        from napari.utils.notifications import show_error

        show_error(message)
    except Exception:  # pragma: no cover - no napari notification manager
        log.error(message)


def notify_info(message: str) -> None:
    """Show an information message in the viewer."""
    try:
        from napari.utils.notifications import show_info

        show_info(message)
    except Exception:  # pragma: no cover
        log.info(message)


# --- adding layers without freezing the viewer --------------------------------------------------
# A napari layer insert costs the GUI thread about 50 ms under software OpenGL (layer controls,
# vispy visuals), napari then rebuilds its scene graph (with a full gc.collect), and the window
# repaint that follows costs as much again. The helpers below let a widget spread that over
# separate event-loop turns: insert with repaints held and the scene-graph update batched, close
# the batch, then let the window repaint.


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
    at 1600x1000), hence Qt's advice for bulk changes: hold repaints, repaint once.
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
        if window is not None and self._held is None:
            # counted per window: two docks' batches interleave (the explorer's hidden layers and
            # the interventions' CAM layer), and one's release must not repaint inside the other's
            held = _HOLDS.get(id(window), 0)
            if held or window.updatesEnabled():
                if not held:
                    window.setUpdatesEnabled(False)
                _HOLDS[id(window)] = held + 1
                self._held = window

    def end(self) -> None:
        if self.open:
            self.open = False
            self.viewer.layers.events.end_batch()

    def release(self) -> None:
        window, self._held = self._held, None
        if window is not None:
            held = _HOLDS.pop(id(window), 1) - 1
            if held > 0:
                _HOLDS[id(window)] = held
            else:
                window.setUpdatesEnabled(True)


_HOLDS: dict[int, int] = {}  # id(main window) -> QuietBatches holding its repaints now


def insert_in_turns(viewer: Any, layer: Any, widget: Any = None, on_error: Any = None) -> None:
    """Add a built layer over three event-loop turns (insert; scene graph; repaint).

    The viewer stays responsive between them; whatever fails, the batch is closed and the window
    repaints again. ``on_error(exc)`` is called on failure.
    """
    from qtpy.QtCore import QTimer

    batch = QuietBatch(viewer, widget)

    def close() -> None:
        try:
            batch.end()
        finally:
            # a lambda, not the bound method: PyQt holds a bound method's object only weakly,
            # and nothing else keeps this batch alive once the timer has fired
            QTimer.singleShot(1, lambda: batch.release())

    def insert() -> None:
        batch.begin()
        try:
            controls = append_without_selecting(viewer, layer, controls_later=True)
        except Exception as exc:  # noqa: BLE001 - reported, and the viewer must go on
            close()
            if on_error is not None:
                on_error(exc)
            return
        QTimer.singleShot(1, lambda: _then(controls, close))

    QTimer.singleShot(0, insert)


def _then(step: Any, close: Any) -> None:
    """Run ``step`` (the layer controls), then ``close`` in the next turn, whatever happens."""
    from qtpy.QtCore import QTimer

    try:
        step()
    finally:
        QTimer.singleShot(1, close)
