"""Labelling: record whether the current neuron is clinical, spurious or unsure - saved at once.

Keyboard (in the viewer and in this widget): 1 clinical, 2 spurious, 3 unsure, ] next neuron,
[ previous neuron. Every verdict is written to the SQLite database (``labels.py``) and committed
before "saved" is shown; history is kept. The agreement panel shows counts per verdict, Cohen's
kappa (two raters) or Fleiss' kappa (more), and how the verdicts agree with the automatic box
agreement of the explorer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import (
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
from ._common import get_session, load_settings, notify_error, save_settings

KEYS = {"1": "clinical", "2": "spurious", "3": "unsure"}


class LabellingWidget(QWidget):
    """Dock widget: rater, neuron, verdict buttons + note, history, agreement, CSV export/import."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        settings = load_settings()
        self.db_path = QLineEdit(settings.get("label_db", str(default_path())))
        self.rater = QLineEdit(settings.get("rater", ""))
        self.rater.setPlaceholderText("your name or initials")
        self.neuron = QSpinBox()
        self.neuron.setRange(0, 1 << 20)
        self.sae = QLabel(self.session.sae_hash[:12] or "no SAE yet: run the explorer")
        self.note = QLineEdit()
        self.note.setPlaceholderText("optional note")
        self.buttons = {v: QPushButton(f"{i + 1}  {v}") for i, v in enumerate(VERDICTS)}
        self.saved = QLabel("")
        self.history = QListWidget()
        self.agreement = QLabel("")
        self.agreement.setWordWrap(True)
        export = QPushButton("export CSV...")
        import_ = QPushButton("import CSV...")
        prev_b, next_b = QPushButton("[ previous"), QPushButton("next ]")

        form = QFormLayout()
        form.addRow("database", self.db_path)
        form.addRow("rater", self.rater)
        form.addRow("SAE", self.sae)
        nav = QHBoxLayout()
        nav.addWidget(prev_b)
        nav.addWidget(self.neuron)
        nav.addWidget(next_b)
        form.addRow("neuron", nav)
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
        layout.addWidget(QLabel("history of this neuron"))
        layout.addWidget(self.history)
        layout.addWidget(self.agreement)
        layout.addLayout(io)

        for verdict, b in self.buttons.items():
            b.clicked.connect(lambda _=False, v=verdict: self.record(v))
        prev_b.clicked.connect(lambda: self.session.step_neuron(-1))
        next_b.clicked.connect(lambda: self.session.step_neuron(+1))
        export.clicked.connect(self._export_dialog)
        import_.clicked.connect(self._import_dialog)
        self.neuron.valueChanged.connect(lambda _v: self.refresh())
        self.rater.editingFinished.connect(lambda: save_settings(rater=self.rater.text().strip()))
        self.db_path.editingFinished.connect(self._db_changed)
        self.session.neuron_changed.connect(self._neuron_changed)
        self.session.analysis_changed.connect(lambda _s: self.refresh())
        self._bind_keys()
        self._db_changed()

    # --- keys -----------------------------------------------------------------------------------
    def _bind_keys(self) -> None:
        for key, verdict in KEYS.items():
            QShortcut(QKeySequence(key), self, activated=lambda v=verdict: self.record(v))
            self.viewer.bind_key(key, lambda _viewer, v=verdict: self.record(v), overwrite=True)
        QShortcut(QKeySequence("]"), self, activated=lambda: self.session.step_neuron(+1))
        QShortcut(QKeySequence("["), self, activated=lambda: self.session.step_neuron(-1))
        self.viewer.bind_key("]", lambda _v: self.session.step_neuron(+1), overwrite=True)
        self.viewer.bind_key("[", lambda _v: self.session.step_neuron(-1), overwrite=True)

    # --- state ----------------------------------------------------------------------------------
    def _db_changed(self) -> None:
        path = Path(self.db_path.text().strip() or default_path())
        self.session.label_db = path
        save_settings(label_db=str(path))
        self.refresh()

    def _neuron_changed(self, neuron: int) -> None:
        if self.neuron.value() != neuron:
            self.neuron.setValue(int(neuron))
        self.refresh()

    def store(self) -> LabelStore:
        """The label database (StoreError when it cannot be opened)."""
        return LabelStore(self.session.label_db)

    def record(self, verdict: str) -> int | None:
        """Save a verdict on the current neuron; returns the row id (None when refused)."""
        rater = self.rater.text().strip()
        save_settings(rater=rater)
        try:
            with self.store() as store:
                row = store.add(
                    self.session.sae_hash, self.neuron.value(), verdict, rater, self.note.text(),
                    concept=self.session.concept,
                )  # fmt: skip
        except Exception as exc:  # StoreError: shown, never raised into the viewer
            self.saved.setText(f"NOT saved: {exc}")
            notify_error(f"verdict not saved: {exc}")
            return None
        self.saved.setText(f"saved: neuron {self.neuron.value()} {verdict} ({rater})")
        self.note.clear()
        self.refresh()
        self.session.verdicts_changed.emit()
        return row

    def refresh(self) -> None:
        """Redraw SAE key, history and agreement from the database."""
        s = self.session
        self.sae.setText(s.sae_hash[:12] or "no SAE yet: run the explorer")
        self.history.clear()
        if not s.sae_hash:
            return
        try:
            with self.store() as store:
                for v in store.history(s.sae_hash, self.neuron.value()):
                    note = f" - {v.note}" if v.note else ""
                    self.history.addItem(f"{v.created_utc[:19]}  {v.rater}: {v.verdict}{note}")
                self.agreement.setText(self._agreement_text(store))
        except Exception as exc:
            self.agreement.setText(f"label database unavailable: {exc}")

    def _agreement_text(self, store: LabelStore) -> str:
        s = self.session
        counts = store.counts(s.sae_hash)
        parts = [" · ".join(f"{k} {v}" for k, v in counts.items())]
        raters = store.raters(s.sae_hash)
        if len(raters) == 2:
            kappa, n = store.cohen_kappa(raters[0], raters[1], s.sae_hash)
            parts.append(f"Cohen's kappa {raters[0]} vs {raters[1]}: {kappa:.2f} on {n} neurons")
        elif len(raters) > 2:
            kappa, n = store.fleiss_kappa(s.sae_hash, raters)
            parts.append(f"Fleiss' kappa ({len(raters)} raters): {kappa:.2f} on {n} neurons")
        cur = s.current
        if cur is not None and cur.box_iou:
            ious = {n: v for n, v in cur.box_iou.items() if not math.isnan(v)}
            agree = store.box_agreement(s.sae_hash, ious)
            if agree["n"]:
                parts.append(
                    f"vs box agreement (IoU >= 0.25 = on the lesion): {100 * agree['agreement']:.0f}% "
                    f"agree on {agree['n']} neurons, kappa {agree['kappa']:.2f}"
                )
        return "\n".join(parts)

    # --- CSV ------------------------------------------------------------------------------------
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
        self.refresh()
        self.session.verdicts_changed.emit()
        return n
