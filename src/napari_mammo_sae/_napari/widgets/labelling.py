"""Labelling: record whether the current neuron is clinical, spurious or unsure - saved at once.

Keyboard (on the canvas, whatever layer is active, and in this widget): 1 clinical, 2 spurious,
3 unsure, ] next neuron, [ previous neuron. Every verdict is written to the SQLite database
(``labels.py``) and committed before "saved" is shown; history is kept. The agreement panel shows
counts per verdict, Cohen's kappa (two raters) or Fleiss' kappa (more), and how the verdicts agree
with the automatic box agreement of the explorer.

Works with the neuron explorer (current neuron, SAE hash and image come from the viewer's review
session) or alone: type a neuron id and paste an SAE hash or pick the SAE weights file to hash.
"""

from __future__ import annotations

import functools
import math
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QShortcut,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...labels import VERDICTS, LabelStore, default_path
from ._common import get_session, keep_alive, load_settings, notify_error, save_settings

KEYS = {"1": "clinical", "2": "spurious", "3": "unsure", "]": +1, "[": -1}
KEY_NAMES = {"1": "clinical", "2": "spurious", "3": "unsure", "]": "next", "[": "previous"}
VERDICT_COLOURS = {"clinical": "#34c759", "spurious": "#ff3b30", "unsure": "#ffcc00"}

# live widgets by id (a viewer's key press finds the widget docked in that viewer)
_LIVE: dict[int, weakref.ref] = {}
_USER_KEYS_INSTALLED = False


def _live_widget(viewer: Any) -> LabellingWidget | None:
    for ref in list(_LIVE.values()):
        w = ref()
        try:
            if w is not None and w.viewer is viewer:
                w.objectName()  # raises RuntimeError when Qt already deleted the widget
                return w
        except RuntimeError:
            continue
    return None


def _fallback(viewer: Any, key: str) -> None:
    """No labelling widget in this viewer: run what the key does there without us."""
    from napari.utils.key_bindings import coerce_keybinding

    kb = coerce_keybinding(key)
    layer = viewer.layers.selection.active
    for parent in (layer, viewer):
        if parent is None:
            continue
        maps = [parent.keymap] + [getattr(c, "class_keymap", {}) for c in type(parent).__mro__]
        for keymap in maps:
            func = keymap.get(kb)
            if callable(func):
                out = func(parent)
                if hasattr(out, "__next__"):  # press/release generator: the press part only
                    next(out, None)
                return


def _on_user_key(key: str) -> None:
    """A key of ours pressed on a canvas: act in that viewer's labelling widget."""
    import napari

    viewer = napari.current_viewer()
    if viewer is None:
        return
    w = _live_widget(viewer)
    if w is None:
        _fallback(viewer, key)
    else:
        w.key_action(key)


def _install_user_keys() -> None:
    """Bind our keys in napari's user keymap: it takes precedence over the active layer's keys
    (an image layer uses 1/2 for its modes), so 1/2/3 record verdicts whatever layer is active."""
    global _USER_KEYS_INSTALLED
    if _USER_KEYS_INSTALLED:
        return
    try:
        from napari.utils.key_bindings import USER_KEYMAP, bind_key

        for key in KEYS:
            bind_key(USER_KEYMAP, key, _named(_on_user_key, key), overwrite=True)
        _USER_KEYS_INSTALLED = True
    except Exception:  # noqa: BLE001 - older/newer napari: the viewer bindings still work
        pass


def _forget(widget_id: int, *_: Any) -> None:
    """A labelling widget was destroyed; give the keys back to napari when none is left."""
    global _USER_KEYS_INSTALLED
    _LIVE.pop(widget_id, None)
    if _LIVE or not _USER_KEYS_INSTALLED:
        return
    try:
        from napari.utils.key_bindings import USER_KEYMAP, coerce_keybinding

        for key in KEYS:
            USER_KEYMAP.pop(coerce_keybinding(key), None)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        pass
    _USER_KEYS_INSTALLED = False


def _named(func: Any, key: str) -> Any:
    """``func`` with ``key`` bound, as a plain function (napari's keymaps read ``__name__``)."""

    def bound(*args: Any) -> None:
        func(key, *args)

    bound.__name__ = f"mammo_sae_label_key_{KEY_NAMES[key]}"
    bound.__doc__ = f"napari-mammo-sae labelling: {KEYS[key]}"
    return bound


def _viewer_key(key: str, viewer: Any) -> None:
    w = _live_widget(viewer)
    if w is not None:
        w.key_action(key)


class LabellingWidget(QWidget):
    """Dock widget: rater, neuron, verdict buttons + note, history, agreement, CSV export/import."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        settings = load_settings()
        self.worker: Any = None
        self.db_path = QLineEdit(settings.get("label_db", str(default_path())))
        self.db_path.setToolTip("SQLite file the verdicts are saved to (created when missing)")
        db_browse = QPushButton("...")
        db_browse.setMaximumWidth(28)
        self.rater = QLineEdit(settings.get("rater", ""))
        self.rater.setPlaceholderText("your name or initials")
        self.sae = QLineEdit(self.session.sae_hash)
        self.sae.setPlaceholderText("from the explorer, or paste a hash / pick the SAE file")
        sae_browse = QPushButton("...")
        sae_browse.setMaximumWidth(28)
        sae_browse.setToolTip("hash an SAE weights file (model.safetensors or a .pt)")
        self.neuron = QSpinBox()
        self.neuron.setRange(0, 1 << 20)
        self.neuron.setKeyboardTracking(False)
        if self.session.neuron is not None:
            self.neuron.setValue(int(self.session.neuron))
        self.per_image = QCheckBox("about this image only")
        self.per_image.setToolTip(
            "store the verdict for the explorer's current image (its SOPInstanceUID) instead of "
            "for the neuron as a whole"
        )
        self.note = QLineEdit()
        self.note.setPlaceholderText("optional note")
        self.buttons = {
            v: QPushButton(f"{i + 1}  {v}") for i, v in enumerate(VERDICTS)
        }  # fmt: skip
        for v, b in self.buttons.items():
            b.setStyleSheet(f"QPushButton {{ border-left: 4px solid {VERDICT_COLOURS[v]}; }}")
            b.setToolTip(f"record '{v}' for the current neuron (key {KEYS_BY_VERDICT[v]})")
        self.saved = QLabel("")
        self.saved.setWordWrap(True)
        self.history = QListWidget()
        self.history.setMaximumHeight(110)
        self.agreement = QLabel("")
        self.agreement.setWordWrap(True)
        self.agreement.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        export = QPushButton("export CSV...")
        import_ = QPushButton("import CSV...")
        prev_b, next_b = QPushButton("[ prev"), QPushButton("next ]")

        form = QFormLayout()
        db_row = QHBoxLayout()
        db_row.addWidget(self.db_path)
        db_row.addWidget(db_browse)
        form.addRow("database", db_row)
        form.addRow("rater", self.rater)
        sae_row = QHBoxLayout()
        sae_row.addWidget(self.sae)
        sae_row.addWidget(sae_browse)
        form.addRow("SAE", sae_row)
        nav = QHBoxLayout()
        nav.addWidget(prev_b)
        nav.addWidget(self.neuron, 1)
        nav.addWidget(next_b)
        form.addRow("neuron", nav)
        form.addRow("", self.per_image)
        form.addRow("note", self.note)
        row = QHBoxLayout()
        for b in self.buttons.values():
            row.addWidget(b)
        io = QHBoxLayout()
        io.addWidget(export)
        io.addWidget(import_)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(row)
        layout.addWidget(self.saved)
        layout.addWidget(QLabel("<b>history of this neuron</b>"))
        layout.addWidget(self.history)
        layout.addWidget(QLabel("<b>agreement</b>"))
        layout.addWidget(self.agreement)
        layout.addLayout(io)
        layout.addStretch(1)

        for verdict, b in self.buttons.items():
            b.clicked.connect(lambda _=False, v=verdict: self.record(v))
        prev_b.clicked.connect(lambda: self.step(-1))
        next_b.clicked.connect(lambda: self.step(+1))
        export.clicked.connect(self._export_dialog)
        import_.clicked.connect(self._import_dialog)
        db_browse.clicked.connect(self._db_dialog)
        sae_browse.clicked.connect(self._sae_dialog)
        self.neuron.valueChanged.connect(self._spin_changed)
        self.sae.editingFinished.connect(self.refresh)
        self.per_image.toggled.connect(lambda _on: self.refresh())
        self.rater.editingFinished.connect(lambda: save_settings(rater=self.rater.text().strip()))
        self.db_path.editingFinished.connect(self._db_changed)
        self.session.neuron_changed.connect(self._neuron_changed)
        self.session.analysis_changed.connect(self._analysis_changed)
        self.session.verdicts_changed.connect(self.refresh)
        self._bind_keys()
        _warm_up_kappa()
        self._db_changed()

    # --- keys -----------------------------------------------------------------------------------
    def _bind_keys(self) -> None:
        _LIVE[id(self)] = weakref.ref(self)
        self.destroyed.connect(functools.partial(_forget, id(self)))
        for key in KEYS:
            shortcut = QShortcut(QKeySequence(key), self)
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(functools.partial(self.key_action, key))
            # the viewer's own keymap (used when no layer is active) ...
            self.viewer.bind_key(key, _named(_viewer_key, key), overwrite=True)
        # ... and napari's user keymap, which wins over the active layer's keys
        _install_user_keys()

    def key_action(self, key: str) -> None:
        """What a key does: 1/2/3 record a verdict, ] and [ move to the next/previous neuron."""
        action = KEYS[key]
        if isinstance(action, str):
            self.record(action)
        else:
            self.step(action)

    def step(self, step: int) -> int:
        """Next (+1) / previous (-1) neuron: of the explorer's top list, else the next id."""
        if self.session.top_neurons:
            self.session.step_neuron(step)
        else:
            self.neuron.setValue(max(0, self.neuron.value() + step))
        return self.neuron.value()

    # --- state ----------------------------------------------------------------------------------
    def sae_hash(self) -> str:
        """The SAE key verdicts are stored under (the field, else the explorer's)."""
        return self.sae.text().strip() or self.session.sae_hash

    def image_uid(self) -> str | None:
        """SOPInstanceUID of the explorer's current image when 'this image only' is ticked."""
        if not self.per_image.isChecked():
            return None
        cur = self.session.current
        if cur is None:
            return None
        uid = getattr(cur.analysis, "sop_instance_uid", "") or ""
        if not uid and cur.placement is not None:
            uid = getattr(cur.placement.record, "sop_instance_uid", "") or ""
        return uid or None

    def _analysis_changed(self, _session: Any = None) -> None:
        if self.session.sae_hash:
            self.sae.setText(self.session.sae_hash)
        self.refresh()

    def _db_changed(self) -> None:
        path = Path(self.db_path.text().strip() or default_path())
        self.session.label_db = path
        save_settings(label_db=str(path))
        self.session.verdicts_changed.emit()  # this widget and the explorer's table re-read it

    def _spin_changed(self, value: int) -> None:
        if self.session.neuron != value:
            self.session.set_neuron(int(value))  # the other widgets follow; we refresh on it
        else:
            self.refresh()

    def _neuron_changed(self, neuron: int) -> None:
        if self.neuron.value() != neuron:
            self.neuron.setValue(int(neuron))
        else:
            self.refresh()

    def store(self) -> LabelStore:
        """The label database (StoreError when it cannot be opened)."""
        return LabelStore(self.session.label_db or default_path())

    def record(self, verdict: str) -> int | None:
        """Save a verdict on the current neuron; returns the row id (None when refused)."""
        rater = self.rater.text().strip()
        save_settings(rater=rater)
        neuron, uid = self.neuron.value(), self.image_uid()
        if self.per_image.isChecked() and uid is None:
            self.saved.setText("NOT saved: no analysed image - untick 'about this image only'")
            notify_error("verdict not saved: run the explorer on an image for per-image verdicts")
            return None
        try:
            with self.store() as store:
                row = store.add(
                    self.sae_hash(), neuron, verdict, rater, self.note.text(), image_uid=uid,
                    concept=self.session.concept,
                )  # fmt: skip
        except Exception as exc:  # StoreError: shown, never raised into the viewer
            self.saved.setText(f"<span style='color:#ff453a'>NOT saved: {exc}</span>")
            notify_error(f"verdict not saved: {exc}")
            return None
        # add() returned: the row is committed and synced (synchronous=FULL)
        where = " (this image)" if uid else ""
        self.saved.setText(
            f"<span style='color:{VERDICT_COLOURS[verdict]}'>&#10003;</span> saved "
            f"{datetime.now(UTC).strftime('%H:%M:%S')} UTC: neuron {neuron} {verdict}{where} "
            f"by {rater}"
        )
        self.note.clear()
        self.session.verdicts_changed.emit()  # refreshes this widget and the explorer's table
        return row

    def refresh(self) -> None:
        """Redraw history and agreement from the database."""
        self.history.clear()
        sae = self.sae_hash()
        if not sae:
            self.agreement.setText("no SAE yet: run the neuron explorer or enter the SAE")
            return
        try:
            with self.store() as store:
                for v in reversed(store.history(sae, self.neuron.value())):
                    note = f" - {v.note}" if v.note else ""
                    where = f" [image ...{v.image_uid[-8:]}]" if v.image_uid else ""
                    when = v.created_utc[:16].replace("T", " ") + " UTC"
                    self.history.addItem(f"{when}  {v.rater}: {v.verdict}{where}{note}")
                self.agreement.setText(self._agreement_text(store, sae))
        except Exception as exc:  # a bad path must not break the widget
            self.agreement.setText(f"label database unavailable: {exc}")

    def _agreement_text(self, store: LabelStore, sae: str) -> str:
        counts = store.counts(sae)
        lines = ["verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items())]
        raters = store.raters(sae)
        if len(raters) == 2:
            kappa, n = store.cohen_kappa(raters[0], raters[1], sae)
            lines.append(f"Cohen's kappa {raters[0]} vs {raters[1]}: {_fmt(kappa)} ({n} neurons)")
        elif len(raters) > 2:
            kappa, n = store.fleiss_kappa(sae, raters)
            lines.append(f"Fleiss' kappa, {len(raters)} raters: {_fmt(kappa)} ({n} neurons)")
        else:
            lines.append("kappa: needs a second rater")
        cur = self.session.current
        if cur is not None and cur.box_iou:
            ious = {n: v for n, v in cur.box_iou.items() if not math.isnan(v)}
            agree = store.box_agreement(sae, ious)
            if agree["n"]:
                t = agree["table"]
                lines.append(
                    f"vs box agreement (IoU >= 0.25 = on lesion), {agree['n']} neurons: "
                    f"{100 * agree['agreement']:.0f}% agree, kappa {_fmt(agree['kappa'])}; "
                    f"clinical on/off {t['clinical']['on']}/{t['clinical']['off']}, "
                    f"spurious on/off {t['spurious']['on']}/{t['spurious']['off']}"
                )
        return "\n".join(lines)

    # --- dialogs --------------------------------------------------------------------------------
    def _db_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Label database", self.db_path.text(), "SQLite (*.sqlite *.db)",
            options=QFileDialog.Option.DontConfirmOverwrite,
        )  # fmt: skip
        if path:
            self.db_path.setText(path)
            self._db_changed()

    def _sae_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "SAE weights", "", "SAE weights (*.safetensors *.pt *.pth)"
        )
        if path:
            self.hash_sae(path)

    def hash_sae(self, path: str | Path) -> Any:
        """Hash an SAE weights file in a worker thread; the field is filled when done."""
        from napari.qt.threading import create_worker

        from ...models.folders import sae_sha256

        self.saved.setText(f"hashing {Path(path).name}...")
        self.worker = create_worker(sae_sha256, path, _progress={"desc": "SAE hash"})
        self.worker.returned.connect(self._hashed)
        self.worker.errored.connect(lambda exc: notify_error(f"cannot hash the SAE: {exc}"))
        self.worker.finished.connect(self._worker_done)
        keep_alive(self.worker)
        self.worker.start()
        return self.worker

    def _hashed(self, digest: str) -> None:
        self.sae.setText(digest)
        self.saved.setText("SAE hash set")
        self.refresh()

    def _worker_done(self) -> None:
        self.worker = None

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export verdicts", "verdicts.csv", "CSV (*.csv)"
        )
        if path:
            self.export_csv(path)

    def _import_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import verdicts", "", "CSV (*.csv)")
        if path:
            self.import_csv(path)

    def export_csv(self, path: str | Path) -> int:
        """Export every verdict of this database; returns the row count."""
        try:
            with self.store() as store:
                n = store.export_csv(path)
        except Exception as exc:
            notify_error(f"export failed: {exc}")
            return 0
        self.saved.setText(f"exported {n} verdicts to {Path(path).name}")
        return n

    def import_csv(self, path: str | Path) -> int:
        """Merge verdicts from a CSV; returns rows added."""
        try:
            with self.store() as store:
                n = store.import_csv(path)
        except Exception as exc:
            notify_error(f"import failed: {exc}")
            return 0
        self.saved.setText(f"imported {n} new verdicts from {Path(path).name}")
        self.session.verdicts_changed.emit()
        return n


KEYS_BY_VERDICT = {v: k for k, v in KEYS.items() if isinstance(v, str)}


def _warm_up_kappa() -> None:
    """Import scikit-learn's metrics off the GUI thread (about 1 s the first time)."""
    import sys
    import threading

    if "sklearn.metrics" not in sys.modules:
        threading.Thread(
            target=__import__, args=("sklearn.metrics",)
        ).start()  # not daemon: an import cut off at exit can crash


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"
