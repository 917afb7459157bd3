"""What the review widgets share per viewer: the current analysis, neuron, SAE key and settings.

One :class:`ReviewSession` per viewer (:func:`get_session`). The explorer fills it after a run; the
intervention, labelling, gallery and plots widgets listen to its signals. Settings the user expects
to be remembered (model paths, rater name, label database) live in a small JSON file in the user
config directory - never patient data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import weakref
from functools import lru_cache
from pathlib import Path
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


def path_edit(label: str, mode: str, remembered: Any = None, **kw: Any) -> Any:
    """A magicgui FileEdit (``mode`` r, w or d) holding a remembered path while it still exists."""
    from magicgui.widgets import FileEdit

    text = str(remembered or "").strip()
    value = text if text and Path(text).exists() else None  # a moved or deleted folder: empty
    return FileEdit(label=label, mode=mode, nullable=True, value=value, **kw)


def row(*widgets: Any, label: str = "") -> Any:
    """magicgui widgets side by side, without the container's own margins."""
    from magicgui.widgets import Container

    c = Container(widgets=list(widgets), layout="horizontal", labels=False, label=label)
    c.margins = (0, 0, 0, 0)
    return c


def file_picker(parent: Any, then: Any, caption: str, filter: str, save_as: str = "") -> Any:
    """A button's callback: magicgui's file dialog (a save dialog when given ``save_as``), then
    ``then(path)`` when a file was chosen."""

    def pick(*_: Any) -> None:
        from magicgui.widgets import show_file_dialog

        path = show_file_dialog("w" if save_as else "r", caption, save_as, filter, parent=parent)
        if path:
            then(path)

    return pick


def figure_canvas(form: Any, min_height: int, **figure: Any) -> tuple[Any, Any]:
    """(matplotlib Figure, its Qt canvas) under ``form``'s widgets, taking the spare height."""
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure

    fig = Figure(**figure)
    canvas = FigureCanvasQTAgg(fig)
    canvas.setMinimumHeight(min_height)
    form.body.layout().addWidget(canvas, 1)
    return fig, canvas


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


@lru_cache(maxsize=1)
def _form_scroll_class() -> type:
    from qtpy.QtCore import QEvent, QSize, Qt
    from qtpy.QtWidgets import QFrame, QScrollArea

    class FormScroll(QScrollArea):
        def __init__(self, body: Any, min_height: int) -> None:
            super().__init__()
            self._min_height = min_height
            self.setWidgetResizable(True)
            self.setFrameShape(QFrame.Shape.NoFrame)
            self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
            self.setWidget(body)

        def _bar(self) -> int:
            return self.verticalScrollBar().sizeHint().width()

        def sizeHint(self) -> Any:  # noqa: N802 - Qt's name
            hint = self.widget().sizeHint()
            return QSize(hint.width() + self._bar(), hint.height())

        def minimumSizeHint(self) -> Any:  # noqa: N802 - Qt's name
            return QSize(self.widget().minimumSizeHint().width() + self._bar(), self._min_height)

        def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 - Qt's name
            # the form re-laid out (a wider row, a figure drawn): the dock asks again, as it
            # would for the bare form - no side-scrolling, no clipped column
            if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
                self.updateGeometry()
            return super().eventFilter(obj, event)

    return FormScroll


class ScrollingForm:
    """For a tall magicgui dock (first base, before ``Container``): ``_scrolling(min_height)``
    puts the form in a scroll area that asks for the form's whole size (Qt's own asks for at most
    24 lines), so a dock with room shows all of it and only a squeezed one scrolls, down to
    ``min_height``. Stacked docks then do not push napari's window past the screen (napari issue
    4579: the explorer and the interventions stacked needed 1,101 px of window). napari docks a
    magicgui widget's ``native``: here that scroll area; ``body`` is the widget with the form."""

    _form_scroll: Any = None

    def _scrolling(self, min_height: int) -> None:
        self._form_scroll = _form_scroll_class()(self.body, min_height)
        self._form_scroll._magic_widget = self  # napari's dock finds the magicgui widget by it

    @property
    def native(self) -> Any:
        return self._form_scroll if self._form_scroll is not None else self.body

    @property
    def body(self) -> Any:
        return self._widget._mgui_get_native_widget()


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


def start_worker(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """napari's ``create_worker(fn, *args, **kwargs)`` (slots in ``_connect``), started and held
    until it finishes, so closing a widget (or the viewer) mid-run cannot delete the worker's Qt
    signals while its thread still emits - that aborts the whole process."""
    from napari.qt.threading import create_worker

    worker = create_worker(fn, *args, _start_thread=False, **kwargs)
    if not _LIVE_WORKERS:
        import atexit

        atexit.unregister(_await_workers)
        atexit.register(_await_workers)
    _LIVE_WORKERS.add(worker)
    worker.finished.connect(lambda w=worker: _LIVE_WORKERS.discard(w))
    worker.start()
    return worker


def _await_workers(timeout_ms: int = 20_000) -> None:
    """At interpreter exit: stop our running workers and let their threads end before Qt goes."""
    for worker in list(_LIVE_WORKERS):
        with contextlib.suppress(RuntimeError):  # its Qt side is already gone
            worker.quit()
    with contextlib.suppress(Exception):  # never raise at exit
        from napari.qt.threading import WorkerBase

        WorkerBase.await_workers(timeout_ms)


def notify_error(message: str) -> None:
    """Show an error in the viewer's notifications."""
    from napari.utils.notifications import show_error

    show_error(message)


def notify_info(message: str) -> None:
    """Show an information message in the viewer's notifications."""
    from napari.utils.notifications import show_info

    show_info(message)
