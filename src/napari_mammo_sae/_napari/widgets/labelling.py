"""Labelling: record whether the current neuron is clinical, spurious or unsure - saved at once.

Keyboard (on the canvas, whatever layer is active, and in this widget): 1 clinical, 2 spurious,
3 unsure, ] next neuron, [ previous neuron. The form is built from magicgui widgets (a verdict
enum drives the buttons) and uses magicgui's file dialogs; the history list, the password prompt
and the database file dialog stay plain Qt, which magicgui has no read-only list, masked prompt or
save dialog without an overwrite question (an existing database is opened, not replaced) for.

Where verdicts go: the "database" field takes an SQLite file (the default; written and committed
before "saved" is shown) or a ``postgresql://USER@HOST:PORT/DATABASE`` URL (no password in it: the
password comes from the environment, ~/.pgpass or a prompt, and is kept in memory only).

Study mode: type the study id and open it. The dock then walks the reader's own queue in their
seeded order ("12 of 40"), moves to the next neuron after each verdict, and says "saved" once the
server has committed a verdict or "queued, will be sent" while the server is away (the verdicts
wait in a local outbox and are sent in order when it is back). All database work of a study runs
in a worker thread, one operation after another, so the viewer never waits on the network.

Works with the neuron explorer (current neuron, SAE hash and image come from the viewer's review
session) or alone: type a neuron id and paste an SAE hash or pick the SAE weights file to hash.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import html
import os
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from magicgui.widgets import CheckBox, Container, Label, LineEdit, PushButton, SpinBox
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import (
    QFileDialog,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QShortcut,
)

from ...errors import DatabaseAuthError
from ...labels import LabelStore, default_path
from ...labels.db import URL_ENV, is_server_url
from ...labels.reading import neuron_texts, open_reader, progress_text, without_password
from ._common import (
    ScrollingForm,
    file_picker,
    get_session,
    load_settings,
    notify_error,
    row,
    save_settings,
    start_worker,
)


class VerdictChoice(enum.Enum):
    """The verdicts a reader gives (values as stored)."""

    clinical = "clinical"
    spurious = "spurious"
    unsure = "unsure"


KEYS = {"1": "clinical", "2": "spurious", "3": "unsure", "]": "next", "[": "previous"}
STEPS = {"next": +1, "previous": -1}
KEYS_BY_VERDICT = {v: k for k, v in KEYS.items() if v not in STEPS}
VERDICT_COLOURS = {"clinical": "#34c759", "spurious": "#ff3b30", "unsure": "#ffcc00"}
RED, AMBER = "#ff453a", "#ff9f0a"  # the status line: not saved / queued

# live widgets by id (a viewer's key press finds the widget docked in that viewer)
_LIVE: dict[int, weakref.ref] = {}


def _live_widget(viewer: Any) -> LabellingWidget | None:
    for ref in list(_LIVE.values()):
        w = ref()
        try:
            if w is not None and w.viewer is viewer:
                w.native.objectName()  # raises RuntimeError when Qt already deleted the dock
                return w
        except RuntimeError:
            continue
    return None


def _fallback(viewer: Any, key: str) -> None:
    """No labelling widget in this viewer: run what the key does there without us."""
    from napari.utils.key_bindings import coerce_keybinding

    kb = coerce_keybinding(key)
    for parent in (p for p in (viewer.layers.selection.active, viewer) if p is not None):
        maps = [parent.keymap] + [getattr(c, "class_keymap", {}) for c in type(parent).__mro__]
        for keymap in maps:
            func = keymap.get(kb)
            if callable(func):
                out = func(parent)
                if hasattr(out, "__next__"):  # press/release generator: the press part only
                    next(out, None)
                return


def _install_user_keys(install: bool = True) -> None:
    """Bind our keys in napari's user keymap (``install=False``: take them out again). It takes
    precedence over the active layer's keys (an image layer uses 1/2 for its modes), so 1/2/3
    record verdicts whatever layer is active. Binding again is harmless (overwrite)."""
    try:
        from napari.utils.key_bindings import USER_KEYMAP, bind_key, coerce_keybinding

        for key in KEYS:
            if install:
                bind_key(USER_KEYMAP, key, _on_key(key), overwrite=True)
            else:
                USER_KEYMAP.pop(coerce_keybinding(key), None)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - older/newer napari: the viewer bindings still work
        pass


def _forget(widget_id: int, *_: Any) -> None:
    """A labelling widget was destroyed; give the keys back to napari when none is left."""
    _LIVE.pop(widget_id, None)
    if not _LIVE:
        _install_user_keys(install=False)


def _on_key(key: str) -> Any:
    """What napari calls for ``key`` (a plain function: its keymaps read ``__name__``): act in
    that viewer's labelling widget. A viewer's keymap passes the viewer; the user keymap passes
    nothing (the current viewer, and without a widget there the key does what it does in napari).
    """

    def on_key(viewer: Any = None) -> None:
        import napari

        target = viewer if viewer is not None else napari.current_viewer()
        w = _live_widget(target)
        if w is not None:
            w.key_action(key)
        elif viewer is None and target is not None:
            _fallback(target, key)

    on_key.__name__ = f"mammo_sae_label_key_{KEYS[key]}"
    on_key.__doc__ = f"napari-mammo-sae labelling: {KEYS[key]}"
    return on_key


def ask_password(parent: Any, question: str) -> str | None:
    """A masked password prompt (None when cancelled). Kept in memory only, never saved."""
    text, ok = QInputDialog.getText(
        parent, "Database password", question, QLineEdit.EchoMode.Password
    )
    return text if ok and text else None


class LabellingWidget(ScrollingForm, Container):
    """Dock widget: database, rater, neuron, verdict buttons + note, study queue, history, agreement."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self._scrolling(280)  # in a short dock the form scrolls, down to the verdict buttons
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        settings = load_settings()
        self.worker: Any = None
        self.reader: Any = None  # labels.study.StudyReader while a study is open
        self._password: str | None = None  # typed at the prompt; memory only
        self._ops: collections.deque = collections.deque()
        self._op_worker: Any = None
        self._store: LabelStore | None = None
        self._store_key: tuple = ()

        # --- the form (magicgui) -----------------------------------------------------------------
        # $NAPARI_MAMMO_SAE_DB (set on the shell before starting napari) wins over the remembered one
        db = os.environ.get(URL_ENV) or settings.get("label_db") or str(default_path())
        self.db_path = LineEdit(value=db, label="database", tooltip=(
            "SQLite file the verdicts are saved to (created when missing), or a study server: "
            "postgresql://USER@HOST:PORT/DATABASE (no password in it)"
        ))  # fmt: skip
        db_browse = PushButton(text="...")
        db_browse.max_width = 28
        self.rater = LineEdit(value=settings.get("rater", ""), label="rater")
        self.rater.native.setPlaceholderText("your name or initials (a study server: your login)")
        self.study_id = LineEdit(value=settings.get("study", ""), label="study",
                                 tooltip="a reading study's id (from the coordinator); empty: free labelling")  # fmt: skip
        open_study, close_study = PushButton(text="open study"), PushButton(text="close")
        self.sae = LineEdit(value=self.session.sae_hash, label="SAE")
        self.sae.native.setPlaceholderText("from the explorer, or paste a hash / pick the SAE file")
        sae_browse = PushButton(
            text="...", tooltip="hash an SAE weights file (model.safetensors or a .pt)"
        )
        sae_browse.max_width = 28
        prev_b, next_b = PushButton(text="[ prev"), PushButton(text="next ]")
        self.neuron = SpinBox(value=int(self.session.neuron or 0), max=1 << 20, label="neuron")
        self.neuron.native.setKeyboardTracking(False)
        self.per_image = CheckBox(text="about this image only", value=False, tooltip=(
            "store the verdict for the explorer's current image (its SOPInstanceUID) instead of "
            "for the neuron as a whole"
        ))  # fmt: skip
        self.note = LineEdit(label="note")
        self.note.native.setPlaceholderText("optional note")
        self.verdict_buttons = {}
        for v in VerdictChoice:
            key = KEYS_BY_VERDICT[v.value]
            self.verdict_buttons[v] = b = PushButton(
                text=f"{key}  {v.value}",
                tooltip=f"record '{v.value}' for the current neuron (key {key})",
            )
            b.native.setStyleSheet(
                f"QPushButton {{ border-left: 4px solid {VERDICT_COLOURS[v.value]}; }}"
            )
        self.progress = Label(value="")
        self.progress.native.setWordWrap(True)
        export, import_ = PushButton(text="export CSV..."), PushButton(text="import CSV...")
        self.extend([
            row(self.db_path, db_browse, label="database"), self.rater,
            row(self.study_id, open_study, close_study, label="study"),
            row(self.sae, sae_browse, label="SAE"), row(prev_b, self.neuron, next_b, label="neuron"),
            self.per_image, self.note, row(*self.verdict_buttons.values(), label="verdict"),
            self.progress,
        ])  # fmt: skip
        self.io = row(export, import_)

        # plain Qt, under the form: status, the read-only history list, the agreement text
        self.saved = QLabel("")
        self.saved.setWordWrap(True)
        self.history = QListWidget()  # notes wrap: a reader sees the whole note, no side-scrolling
        self.history.setMaximumHeight(110)
        self.history.setWordWrap(True)
        self.history.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.history.setResizeMode(QListWidget.ResizeMode.Adjust)
        self.agreement = QLabel("")
        self.agreement.setWordWrap(True)
        self.agreement.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        for part in [self.saved, QLabel("<b>history of this neuron</b>"), self.history,
                     QLabel("<b>agreement</b>"), self.agreement, self.io.native]:  # fmt: skip
            self.body.layout().addWidget(part)
        self.body.layout().addStretch(1)

        for verdict, b in self.verdict_buttons.items():
            b.changed.connect(lambda _=None, v=verdict: self.record(v))
        prev_b.changed.connect(lambda _=None: self.step(-1))
        next_b.changed.connect(lambda _=None: self.step(+1))
        csv, pick = "CSV (*.csv)", functools.partial(file_picker, self.native)
        export.changed.connect(pick(self.export_csv, "Export verdicts", csv, "verdicts.csv"))
        import_.changed.connect(pick(self.import_csv, "Import verdicts", csv))
        weights = "SAE weights (*.safetensors *.pt *.pth)"
        sae_browse.changed.connect(pick(self.hash_sae, "SAE weights", weights))
        db_browse.changed.connect(self._db_dialog)
        open_study.changed.connect(lambda _=None: self.open_study())
        close_study.changed.connect(lambda _=None: self.close_study())
        self.neuron.changed.connect(self._spin_changed)
        self.sae.native.editingFinished.connect(self.refresh)
        self.per_image.changed.connect(lambda _on: self.refresh())
        self.rater.native.editingFinished.connect(
            lambda: save_settings(rater=self.rater.value.strip())
        )
        self.db_path.native.editingFinished.connect(self._db_changed)
        self.session.neuron_changed.connect(self._neuron_changed)
        self.session.analysis_changed.connect(self._analysis_changed)
        self.session.verdicts_changed.connect(self.refresh)
        self._flush_timer = QTimer(self.native)
        self._flush_timer.setInterval(3000)
        self._flush_timer.timeout.connect(self._flush_outbox)
        self._bind_keys()
        self._db_changed()

    # --- keys -----------------------------------------------------------------------------------
    def _bind_keys(self) -> None:
        _LIVE[id(self)] = weakref.ref(self)
        self.native.destroyed.connect(functools.partial(_forget, id(self)))
        for key in KEYS:
            shortcut = QShortcut(QKeySequence(key), self.native)
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(functools.partial(self.key_action, key))
            # the viewer's own keymap (used when no layer is active) ...
            self.viewer.bind_key(key, _on_key(key), overwrite=True)
        # ... and napari's user keymap, which wins over the active layer's keys
        _install_user_keys()

    def key_action(self, key: str) -> None:
        """What a key does: 1/2/3 record a verdict, ] and [ move to the next/previous neuron."""
        action = KEYS[key]
        if action in STEPS:
            self.step(STEPS[action])
        else:
            self.record(action)

    def step(self, step: int) -> int:
        """Next (+1) / previous (-1) neuron: the study queue, else the explorer's list, else ids."""
        if self.reader is not None:
            order, cur = self.reader.order, self.neuron.value
            i = order.index(cur) if cur in order else -1
            self.neuron.value = order[(i + step) % len(order)]
        elif self.session.top_neurons:
            self.session.step_neuron(step)
        else:
            self.neuron.value = max(0, self.neuron.value + step)
        return self.neuron.value

    # --- state ----------------------------------------------------------------------------------
    def sae_hash(self) -> str:
        """The SAE key verdicts are stored under (the study's, the field, else the explorer's)."""
        if self.reader is not None:
            return self.reader.design.sae_hash
        return self.sae.value.strip() or self.session.sae_hash

    def target(self) -> str | Path:
        """The database: a postgresql:// URL as typed, or the SQLite file."""
        text = self.db_path.value.strip()
        return text if is_server_url(text) else Path(text or default_path())

    def is_server(self) -> bool:
        return is_server_url(str(self.target()))

    def image_uid(self) -> str | None:
        """SOPInstanceUID of the explorer's current image when 'this image only' is ticked."""
        cur = self.session.current
        if not self.per_image.value or cur is None:
            return None
        uid = getattr(cur.analysis, "sop_instance_uid", "") or ""
        if not uid and cur.placement is not None:
            uid = getattr(cur.placement.record, "sop_instance_uid", "") or ""
        return uid or None

    def _analysis_changed(self, _session: Any = None) -> None:
        if self.session.sae_hash and self.reader is None:
            self.sae.value = self.session.sae_hash
        self.refresh()

    def _db_changed(self) -> None:
        bare = without_password(self.db_path.value)
        if bare is not None:  # never kept in the field or the settings: asked for when connecting
            self.db_path.value = bare
            self.saved.setText(
                "the password was taken out of the database URL: it is asked for when needed "
                "and kept in memory only"
            )
        target = self.target()
        if self.reader is not None and str(target) != str(self.session.label_db):
            self.close_study()
        self.session.label_db = target
        save_settings(label_db=str(target))  # a URL without password, or a path
        self.session.verdicts_changed.emit()  # this widget and the explorer's table re-read it

    def _spin_changed(self, value: int) -> None:
        if self.session.neuron != value:
            self.session.set_neuron(int(value))  # the other widgets follow; we refresh on it
        else:
            self.refresh()

    def _neuron_changed(self, neuron: int) -> None:
        if self.neuron.value != neuron:
            self.neuron.value = int(neuron)
        else:
            self.refresh()

    def store(self) -> Any:
        """The label database, as a context manager (StoreError when it cannot be opened).

        Kept open between verdicts (per database and password): opening a file for each verdict
        would checkpoint its WAL on every close, and a server login costs a round trip.
        """
        key = (str(self.target()), self._password)
        if self._store is None or self._store_key != key:
            old, self._store = self._store, None
            if old is not None:
                old.close()
            self._store = LabelStore(self.target(), password=self._password)
            self._store_key = key
            weakref.finalize(self, self._store.close)
        return contextlib.nullcontext(self._store)

    # --- background operations (study / server): one at a time, in order --------------------------
    def _submit(self, fn: Any, on_done: Any, on_error: Any = None) -> None:
        self._ops.append((fn, on_done, on_error))
        if self._op_worker is None:
            self._next_op()

    def _next_op(self) -> None:
        self._op_worker = None
        if not self._ops:
            return
        fn, on_done, on_error = self._ops.popleft()
        self._op_worker = start_worker(fn, _ignore_errors=True, _connect={  # errors to on_error
            "returned": on_done, "errored": on_error or self._op_failed, "finished": self._next_op,
        })  # fmt: skip

    def _op_failed(self, exc: BaseException | str) -> None:
        self._say(str(exc))
        notify_error(str(exc))

    def _run(self, fn: Any, on_done: Any, on_error: Any) -> Any:
        """``fn()`` in the background for a study or a server (the viewer never waits on the
        network); for a local file at once, returning its result (None when it failed)."""
        if self.reader is not None or self.is_server():
            self._submit(fn, on_done, on_error)
            return None
        try:
            result = fn()
        except Exception as exc:  # StoreError, a bad path: shown, never raised into the viewer
            on_error(exc)
            return None
        on_done(result)
        return result

    def _say(self, text: str, mark: str = "", colour: str = RED, tip: str = "") -> None:
        """The status line: ``text`` after ``mark`` (an HTML entity) in ``colour``, or all of it
        in ``colour`` without a mark; ``tip`` is its tooltip."""
        text = html.escape(text, quote=False)
        span = f"<span style='color:{colour}'>{mark or text}</span>"
        self.saved.setText(f"{span} {text}" if mark else span)
        self.saved.setToolTip(tip)

    def busy(self) -> bool:
        """Whether database work is queued or running (tests and scripts wait on it)."""
        return self._op_worker is not None or bool(self._ops)

    # --- study mode -------------------------------------------------------------------------------
    def open_study(self, study_id: str | None = None) -> None:
        """Open a reading study in the background: the reader's queue replaces the neuron list."""
        study_id = (study_id if study_id is not None else self.study_id.value).strip()
        if not study_id:
            self.saved.setText("type the study id the coordinator gave you, then open it")
            return
        self.study_id.value = study_id
        save_settings(study=study_id)
        reader = self.rater.value.strip() or None
        opening = functools.partial(open_reader, self.target(), study_id, reader, self._password)
        self.progress.value = f"opening study {study_id}..."

        def failed(exc: BaseException) -> None:
            if isinstance(exc, DatabaseAuthError) and self.is_server():
                self._say(str(exc))
                pw = ask_password(self.native, f"password for {self.db_path.value.strip()}")
                if pw:
                    self._password = pw
                    self.open_study(study_id)
                    return
            self.progress.value = "no study open"
            self._op_failed(exc)

        self._submit(opening, self._study_opened, failed)

    def _study_opened(self, reader: Any) -> None:
        from ...labels.study import StudyConsensus

        self.close_study(quiet=True)
        self.reader = reader
        design = reader.design
        self.rater.value = reader.reader
        self.rater.native.setReadOnly(True)  # the study's reader is the database login
        self.sae.value = design.sae_hash
        self.sae.native.setReadOnly(True)
        self.per_image.value = False
        self.per_image.enabled = False
        self.session.concept = design.concept or self.session.concept
        self.session.study = StudyConsensus(reader.store, design.id, design.sae_hash)
        self._flush_timer.start()
        self.neuron.value = (reader.remaining() or reader.order)[0]  # the first one still to do
        self._show_progress()
        self.saved.setText(f"study {design.id} open: {len(design.neurons)} neurons, blinded")
        self.refresh()

    def close_study(self, quiet: bool = False) -> None:
        """Leave study mode (verdicts still queued stay in the outbox for next time)."""
        if self.reader is None:
            return
        reader, self.reader = self.reader, None
        self._flush_timer.stop()
        self.session.study = None
        self.rater.native.setReadOnly(False)
        self.sae.native.setReadOnly(False)
        self.per_image.enabled = True
        waiting = reader.waiting()
        self._submit(reader.store.close, lambda _r: None)
        if not quiet:
            self.progress.value = "study closed" + (
                f"; {waiting} verdicts wait in the outbox" if waiting else ""
            )

    def _show_progress(self) -> None:
        if self.reader is not None:
            self.progress.value = progress_text(self.reader)

    def _record_in_study(self, verdict: str) -> None:
        reader, neuron, note = self.reader, self.neuron.value, self.note.value
        if neuron not in reader.design.neurons:
            self.saved.setText(f"NOT saved: neuron {neuron} is not in this study - use [ and ]")
            return
        self.saved.setText(f"sending neuron {neuron} {verdict}...")
        self.note.value = ""

        def done(result: tuple[str, str]) -> None:
            status, _uid = result
            if status == "saved":
                self._saved(verdict, neuron, reader.reader)
            else:  # the tooltip says why
                queued = (
                    f"queued, will be sent: neuron {neuron} {verdict} - the server cannot take it "
                    "now; it waits on this computer and goes out, in order, when the server is back"
                )
                self._say(queued, "&#8987;", AMBER, tip=reader.last_error)
            if self.reader is reader:
                nxt = reader.remaining()
                if nxt and self.neuron.value == neuron:
                    self.neuron.value = nxt[0]  # on to the reader's next neuron
                self._show_progress()
            self.session.verdicts_changed.emit()

        self._submit(lambda: reader.record(neuron, verdict, note), done)

    def _flush_outbox(self) -> None:
        reader = self.reader
        if reader is None or self.busy() or not reader.waiting():
            return

        def done(result: Any) -> None:
            if result.sent:
                self.saved.setText(f"sent {len(result.sent)} queued verdicts; {result.left} left")
                self.session.verdicts_changed.emit()
            if result.refused:
                (_row, why), *_ = reader.outbox.refused(reader.target)[-result.refused :]
                notify_error(
                    f"the server refused {result.refused} queued verdicts; they are kept in "
                    f"{reader.outbox.path} (table 'refused'): {why}"
                )
            self._show_progress()

        self._submit(reader.flush, done, lambda exc: self._show_progress())

    # --- recording --------------------------------------------------------------------------------
    def record(self, verdict: str | VerdictChoice) -> int | None:
        """Save a verdict on the current neuron; returns the row id (None when refused).

        In study mode (or against a server) the verdict is sent in the background and this
        returns None; the status line says "saved" or "queued, will be sent" when it is done.
        """
        verdict = verdict.value if isinstance(verdict, VerdictChoice) else verdict
        if self.reader is not None:
            self._record_in_study(verdict)
            return None
        rater = self.rater.value.strip()
        save_settings(rater=rater)
        neuron, uid = self.neuron.value, self.image_uid()
        if self.per_image.value and uid is None:
            self.saved.setText("NOT saved: no analysed image - untick 'about this image only'")
            notify_error("verdict not saved: run the explorer on an image for per-image verdicts")
            return None
        args = (self.sae_hash(), neuron, verdict, rater, self.note.value)
        kwargs = {"image_uid": uid, "concept": self.session.concept}
        if self.is_server():
            self.saved.setText(f"sending neuron {neuron} {verdict}...")

        def add() -> int:
            with self.store() as store:
                return store.add(*args, **kwargs)

        def done(_row: int) -> None:
            # add() returned: the row is committed (a local file: and synced, synchronous=FULL)
            self._saved(verdict, neuron, rater, " (this image)" if uid else "")
            self.note.value = ""
            self.session.verdicts_changed.emit()  # refreshes this widget and the explorer's table

        return self._run(add, done, self._not_saved)

    def _saved(self, verdict: str, neuron: int, rater: str, where: str = "") -> None:
        when = datetime.now(UTC).strftime("%H:%M:%S")
        text = f"saved {when} UTC: neuron {neuron} {verdict}{where} by {rater}"
        self._say(text, "&#10003;", VERDICT_COLOURS[verdict])

    def _not_saved(self, exc: BaseException) -> None:
        self._say(f"NOT saved: {exc}")
        notify_error(f"verdict not saved: {exc}")

    # --- history and agreement ----------------------------------------------------------------------
    def refresh(self) -> None:
        """Redraw history and agreement from the database (in the background for a server)."""
        sae = self.sae_hash()
        if not sae:
            self._show_texts(([], "no SAE yet: run the neuron explorer or enter the SAE"))
            return
        neuron, reader, cur = self.neuron.value, self.reader, self.session.current
        box_iou = cur.box_iou if cur is not None else None  # verdicts vs the explorer's boxes

        def texts() -> tuple[list[str], str]:
            if reader is not None:
                return neuron_texts(reader.store, sae, neuron, reader)
            with self.store() as store:
                return neuron_texts(store, sae, neuron, box_iou=box_iou)

        self._run(texts, self._show_texts, self._unavailable)

    def _show_texts(self, texts: tuple[list[str], str]) -> None:
        lines, agreement = texts
        self.history.clear()
        self.history.addItems(lines)
        self.agreement.setText(agreement)

    def _unavailable(self, exc: BaseException) -> None:  # a bad path must not break the widget
        self._show_texts(([], f"label database unavailable: {exc}"))

    # --- dialogs --------------------------------------------------------------------------------
    def _db_dialog(self, *_: Any) -> None:
        start = "" if self.is_server() else self.db_path.value
        path, _ = QFileDialog.getSaveFileName(
            self.native, "Label database", start, "SQLite (*.sqlite *.db)",
            options=QFileDialog.Option.DontConfirmOverwrite,
        )  # fmt: skip
        if path:
            self.db_path.value = path
            self._db_changed()

    def hash_sae(self, path: str | Path) -> Any:
        """Hash an SAE weights file in a worker thread; the field is filled when done."""
        from ...models.folders import sae_sha256

        self.saved.setText(f"hashing {Path(path).name}...")
        self.worker = start_worker(sae_sha256, path, _progress={"desc": "SAE hash"}, _connect={
            "returned": self._hashed, "finished": self._worker_done,
            "errored": lambda exc: notify_error(f"cannot hash the SAE: {exc}"),
        })  # fmt: skip
        return self.worker

    def _hashed(self, digest: str) -> None:
        self.sae.value = digest
        self.saved.setText("SAE hash set")
        self.refresh()

    def _worker_done(self) -> None:
        self.worker = None

    def export_csv(self, path: str | Path) -> int | None:
        """Export every verdict of this database (that this user may read); returns the count
        (None when it failed, or while a server's export runs in the background)."""
        return self._csv("export", path, "exported {} verdicts to {}", changed=False)

    def import_csv(self, path: str | Path) -> int | None:
        """Merge verdicts from a CSV; returns rows added (None: failed, or sent to a server)."""
        return self._csv("import", path, "imported {} new verdicts from {}", changed=True)

    def _csv(self, op: str, path: str | Path, said: str, changed: bool) -> int | None:
        def work() -> int:
            with self.store() as store:
                return getattr(store, f"{op}_csv")(path)

        def done(n: int) -> None:
            self.saved.setText(said.format(n, Path(path).name))
            if changed:  # an import: the history and the explorer's table re-read the database
                self.session.verdicts_changed.emit()

        return self._run(work, done, lambda exc: self._op_failed(f"{op} failed: {exc}"))
