"""Neuron explorer: run the model + SAE on a mammogram and show its top neurons over the image.

Run (in a worker thread, cancellable) analyses the chosen image - or every view of the exam - and
adds one image layer per top neuron on the model's feature grid, aligned in mm over the mammogram
(never upsampled), with a distinct colour per rank, transparent at zero, additive blending and
shared contrast limits. Re-running updates those layers in place. Annotation boxes are taken from
every Shapes layer in the viewer (the phantom truth, a CSV loaded here, or boxes you draw) except
the planted-marker layer; each neuron's box agreement is the IoU of its 95th-percentile box with
the nearest annotation box. Click a row of the table to show that neuron alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .. import layers as L
from ..model_choice import ModelChoice, bundled_choice, load_models
from ._common import (
    ImageResult,
    QuietBatch,
    append_without_selecting,
    get_session,
    keep_alive,
    load_settings,
    notify_error,
    save_settings,
)

log = logging.getLogger(__name__)

CONCEPTS = {"suspicious calcification": "calcification", "mass": "mass"}
RANKINGS = {
    "logit contribution": "logit",
    "class mean": "class_mean",
    "class-centred": "class_centred",
}
OVERLAY_KEY = "mammo_sae"
COLUMNS = ("rank", "neuron", "score", "logit contrib.", "max act.", "box IoU", "verdict")


def freeze_long_lived_objects() -> None:
    """Move every object alive now (napari, Qt, torch, the loaded models) out of the cyclic GC.

    With about 700,000 such objects a full collection took 290 ms - on the GUI thread, at a random
    moment while the overlays were being shown. After :func:`gc.freeze` a full collection looks
    only at objects created later. Done once per process; ``NAPARI_MAMMO_SAE_GC_FREEZE=0`` turns it
    off.
    """
    import gc
    import os

    global _FROZEN
    if _FROZEN or os.environ.get("NAPARI_MAMMO_SAE_GC_FREEZE", "1") == "0":
        return
    gc.freeze()
    _FROZEN = True


_FROZEN = False


def rank_neurons(
    analysis: Any, ranking: str, target: int, probe: Any, k: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(top-k neurons, their scores, the ranking actually used) for one analysed image."""
    if ranking in ("class_mean", "class_centred") and probe is not None and ranking in probe.scores:
        scores = np.asarray(probe.scores[ranking][target], dtype=np.float64)
        used = ranking
    else:
        contrib = np.asarray(analysis.logit_contributions, dtype=np.float64)
        scores = contrib if target == 1 else -contrib
        used = "logit"
    top = np.argsort(-scores, kind="stable")[:k]
    return top, scores[top], used


def _existing(path: Any) -> str:
    """A remembered path, or '' when it no longer exists (a moved or deleted model folder)."""
    text = str(path or "").strip()
    return text if text and Path(text).exists() else ""


def image_layers(viewer: Any) -> list[Any]:
    """Image layers opened by this plugin's reader (they carry the record and placement)."""
    return [
        lay
        for lay in viewer.layers
        if lay._type_string == "image" and "record" in lay.metadata and "placement" in lay.metadata
    ]


def annotation_shapes(viewer: Any) -> list[np.ndarray]:
    """Every rectangle/polygon of the viewer's annotation Shapes layers (world coords)."""
    shapes = []
    for lay in viewer.layers:
        if lay._type_string != "shapes":
            continue
        name = lay.name.lower()
        if "confounder" in name or "marker" in name or lay.metadata.get(OVERLAY_KEY) == "marker":
            continue
        shapes.extend(np.asarray(s) for s in lay.data)
    return shapes


def analyse_layers(
    targets: list[tuple[str, Any, Any]],
    choice: ModelChoice,
    *,
    ranking: str,
    target_class: int,
    k: int,
    shapes: list[np.ndarray],
) -> tuple[Any, dict[str, ImageResult], str]:
    """Worker body (no Qt): load models, analyse each (name, record, placement), rank, score boxes."""
    from ...analysis.localisation import box_agreement
    from ...errors import MammoSAEError

    try:
        models = load_models(choice)
    except MammoSAEError as exc:  # typed errors are shown by the widget, not raised into napari
        return None, {}, str(exc)
    results: dict[str, ImageResult] = {}
    used = ranking
    for name, record, placement in targets:
        yield f"analysing {name}"
        try:
            analysis = models.analyzer.analyse(record)
        except MammoSAEError as exc:
            return None, {}, f"{name}: {exc}"
        top, scores, used = rank_neurons(analysis, ranking, target_class, models.probe, k)
        maps = analysis.latent_maps(top)
        boxes = L.shapes_to_boxes(placement, shapes) if placement is not None else []
        ious = {}
        for n, m in zip(top, maps, strict=True):
            ious[int(n)] = (
                box_agreement(m, boxes, analysis.geometry).iou
                if boxes and m.max() > 0
                else float("nan")
            )
        results[name] = ImageResult(name, analysis, placement, top, scores, maps, ious, boxes)
    return models, results, used


class NeuronExplorer(QWidget):
    """Dock widget: choose image, model, concept, class, k and ranking; Run; inspect the top neurons."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.worker = None
        self._pending: list = []
        self._used = "class_mean"  # the ranking the last run used
        # the layer steps of a run go in inside one layers batch with the window's repaints held
        self._batch = QuietBatch(napari_viewer, self)
        self.last_error: str | None = None
        settings = load_settings()

        self.image = QComboBox()
        self.all_views = QCheckBox("every view of the exam")
        self.source = QComboBox()
        self.source.addItems(["bundled demo weights", "classifier + SAE files"])
        self.classifier_path = QLineEdit(_existing(settings.get("classifier_path")))
        self.sae_path = QLineEdit(_existing(settings.get("sae_path")))
        self.probe_path = QLineEdit(_existing(settings.get("probe_path")))
        self.trust = QCheckBox("trust pickled Mammo-CLIP file (can run code)")
        self.concept = QComboBox()
        self.concept.addItems(list(CONCEPTS))
        self.variant = QComboBox()
        self.variant.addItems(["finetuned", "pretrained"])
        self.target = QComboBox()
        self.target.addItems(["1 (finding present)", "0 (absent)"])
        self.k = QSpinBox()
        self.k.setRange(1, 100)
        self.k.setValue(10)
        self.ranking = QComboBox()
        self.ranking.addItems(list(RANKINGS))
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.stack = QCheckBox("one k x h x w stack (slider)")
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.status = QLabel("Open a mammogram with this plugin's reader, then Run.")
        self.status.setWordWrap(True)
        self.probability = QLabel("")
        self.probability.setStyleSheet("font-weight: bold")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QTableWidget.SelectRows)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.show_all = QPushButton("show all")
        self.hide_all = QPushButton("hide all")
        self.remove_all = QPushButton("remove overlays")
        self.boxes_button = QPushButton("boxes CSV...")

        form = QFormLayout()
        form.addRow("image", self.image)
        form.addRow("", self.all_views)
        form.addRow("model", self.source)
        for label, edit, kind in [
            ("classifier", self.classifier_path, "classifier"),
            ("SAE", self.sae_path, "sae"),
            ("probe (.npz)", self.probe_path, "probe"),
        ]:
            row = QHBoxLayout()
            row.addWidget(edit)
            browse = QPushButton("...")
            browse.setMaximumWidth(28)
            browse.clicked.connect(lambda _=False, e=edit, t=kind: self._browse(e, t))
            row.addWidget(browse)
            form.addRow(label, row)
        form.addRow("", self.trust)
        form.addRow("concept", self.concept)
        form.addRow("variant", self.variant)
        form.addRow("class", self.target)
        form.addRow("top k", self.k)
        form.addRow("ranking", self.ranking)
        form.addRow("device", self.device)
        form.addRow("", self.stack)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        overlays = QHBoxLayout()
        for b in (self.show_all, self.hide_all, self.remove_all, self.boxes_button):
            overlays.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.probability)
        layout.addWidget(self.status)
        layout.addWidget(self.table)
        layout.addLayout(overlays)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.source.currentIndexChanged.connect(self._source_changed)
        self.table.cellClicked.connect(self._row_clicked)
        self.show_all.clicked.connect(lambda: self._set_visible(True))
        self.hide_all.clicked.connect(lambda: self._set_visible(False))
        self.remove_all.clicked.connect(self.remove_overlays)
        self.boxes_button.clicked.connect(self._load_boxes_dialog)
        self.session.neuron_changed.connect(self._show_neuron)
        self.session.verdicts_changed.connect(self._refresh_verdicts)
        self.image.currentTextChanged.connect(self._image_changed)
        napari_viewer.layers.events.inserted.connect(self._refresh_images)
        napari_viewer.layers.events.removed.connect(self._refresh_images)
        self._refresh_images()
        self._source_changed()

    # --- form helpers ---------------------------------------------------------------------------
    def _browse(self, edit: QLineEdit, kind: str) -> None:
        if kind == "probe":
            path, _ = QFileDialog.getOpenFileName(self, "Probe file", "", "Probe (*.npz)")
        else:
            path = QFileDialog.getExistingDirectory(self, f"{kind} weights folder")
            if not path:
                path, _ = QFileDialog.getOpenFileName(
                    self, f"{kind} file", "", "Checkpoints (*.pth *.pt *.tar)"
                )
        if path:
            edit.setText(path)

    def _source_changed(self) -> None:
        custom = self.source.currentIndex() == 1
        for w in (self.classifier_path, self.sae_path, self.probe_path, self.trust):
            w.setEnabled(custom)

    def _refresh_images(self, *_: Any) -> None:
        current = self.image.currentText()
        self.image.blockSignals(True)  # a refill is not the user choosing a view
        self.image.clear()
        names = [lay.name for lay in image_layers(self.viewer)]
        self.image.addItems(names)
        if current in names:
            self.image.setCurrentText(current)
        self.image.blockSignals(False)

    def choice(self) -> ModelChoice:
        """The ModelChoice of the form (ConfigError when incomplete)."""
        from ...errors import ConfigError

        concept = CONCEPTS[self.concept.currentText()]
        device = self.device.currentText()
        if self.source.currentIndex() == 0:
            return bundled_choice(concept, self.variant.currentText(), device)
        clf, sae = self.classifier_path.text().strip(), self.sae_path.text().strip()
        if not clf or not sae:
            raise ConfigError("choose a classifier and an SAE (or use the bundled demo weights)")
        probe = self.probe_path.text().strip()
        save_settings(classifier_path=clf, sae_path=sae, probe_path=probe)
        return ModelChoice(Path(clf), Path(sae), Path(probe) if probe else None,
                           self.trust.isChecked(), device)  # fmt: skip

    def targets(self) -> list[tuple[str, Any, Any]]:
        """(layer name, record, placement) of the image(s) to analyse."""
        layers = image_layers(self.viewer)
        if not self.all_views.isChecked():
            layers = [lay for lay in layers if lay.name == self.image.currentText()]
        return [(lay.name, lay.metadata["record"], lay.metadata["placement"]) for lay in layers]

    # --- running --------------------------------------------------------------------------------
    def run(self) -> Any:
        """Start the analysis in a worker thread; returns the worker (None when refused)."""
        from napari.qt.threading import create_worker

        from ...errors import MammoSAEError

        targets = self.targets()
        if not targets:
            notify_error(
                "No mammogram to analyse: open a DICOM file with the napari-mammo-sae reader"
            )
            return None
        try:
            choice = self.choice()
        except MammoSAEError as exc:
            self._fail(str(exc))
            return None
        s = self.session
        s.concept = CONCEPTS[self.concept.currentText()]
        s.variant = self.variant.currentText()
        s.target_class = 1 if self.target.currentIndex() == 0 else 0
        s.ranking = RANKINGS[self.ranking.currentText()]
        self.worker = create_worker(
            analyse_layers, targets, choice, ranking=s.ranking, target_class=s.target_class,
            k=self.k.value(), shapes=annotation_shapes(self.viewer),
            _progress={"desc": "Mammo-SAE analysis"},
        )  # fmt: skip
        self.worker.yielded.connect(self.status.setText)
        self.worker.returned.connect(self._done)
        self.worker.errored.connect(lambda exc: self._fail(str(exc)))
        self.worker.finished.connect(self._worker_finished)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("loading the model...")
        keep_alive(self.worker)
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        """Stop the running analysis after the current image."""
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("cancelled")

    def _worker_finished(self) -> None:
        self.worker = None
        if not self._pending:
            self._finished()

    def _finished(self) -> None:
        self.worker = None
        if self._pending:
            return
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.status.setText(f"error: {message}")
        notify_error(message)

    def run_blocking(self, timeout_s: float = 600.0) -> str:
        """Run and wait (for scripts such as the demo); returns the status line."""
        import time

        from qtpy.QtWidgets import QApplication

        worker = self.run()
        t0 = time.time()
        while worker is not None and self.is_busy() and time.time() - t0 < timeout_s:
            QApplication.processEvents()
            time.sleep(0.02)
        return self.probability.text() or self.status.text()

    def _done(self, value: tuple) -> None:
        models, results, used = value
        if models is None:  # a typed error from the worker: `used` holds its message
            self._fail(used)
            return
        s = self.session
        s.models, s.sae_hash, s.probe = models, models.sae_hash, models.probe
        s.probe_path = models.choice.probe
        if models.probe is not None:
            s.class_scores = np.stack(
                [
                    models.probe.scores[used if used in models.probe.scores else "class_mean"][c]
                    for c in (0, 1)
                ]
            )
        else:
            s.class_scores = None
        s.results.update(results)
        freeze_long_lived_objects()
        first = next(iter(results))
        s.current_layer = self.image.currentText() if self.image.currentText() in results else first
        self._used = used
        self._pending = [*self._layer_steps(results), lambda: self._publish(used)]
        self._drain()

    def show_view(self, layer_name: str) -> bool:
        """Make an analysed view the current one: its texts, table and top neuron; False if none."""
        s = self.session
        if layer_name not in s.results or self.is_busy():
            return False
        s.current_layer = layer_name
        if self.image.currentText() != layer_name:
            self.image.blockSignals(True)
            self.image.setCurrentText(layer_name)
            self.image.blockSignals(False)
        self._publish(self._used)
        return True

    def _image_changed(self, name: str) -> None:
        """Choosing another view after an every-view run shows that view's analysis."""
        if name != self.session.current_layer:
            self.show_view(name)

    def _publish(self, used: str) -> None:
        """Last step of a run: texts, table, then tell the other widgets."""
        s = self.session
        cur = s.current
        a = cur.analysis
        note = (
            ""
            if used == s.ranking
            else f" (ranked by logit contribution: no probe for {s.ranking})"
        )
        self.probability.setText(
            f"P({s.concept}) = {a.probability:.3f}   SAE reconstruction: {a.reconstruction_probability:.3f}"
        )
        self.status.setText(
            f"{cur.layer_name}: top {len(cur.neurons)} of {a.n_neurons} neurons for class "
            f"{s.target_class}{note}; {a.timings.get('total', 0):.2f} s"
        )
        self._fill_table(cur)
        s.analysis_changed.emit(s)
        s.set_neuron(int(cur.neurons[0]))

    # --- layers ---------------------------------------------------------------------------------
    def _overlay_layers(self, image: str | None = None) -> list[Any]:
        out = []
        for lay in self.viewer.layers:
            meta = lay.metadata.get(OVERLAY_KEY)
            if isinstance(meta, dict) and (image is None or meta.get("image") == image):
                out.append(lay)
        return out

    def _layer_steps(self, results: dict[str, ImageResult]) -> list:
        """Small GUI-thread steps (one layer each) that bring the overlays up to date."""
        vmax = max(float(r.maps.max()) for r in results.values()) or 1.0
        stack = self.stack.isChecked()
        steps: list = []
        for name, res in results.items():
            a = res.analysis
            tf = L.heatmap_transform(a.geometry, a.grid, res.placement)
            wanted = {}
            if stack:
                wanted[f"{name} · top-{len(res.neurons)} stack"] = (
                    res.maps, {"kind": "stack", "image": name, "neurons": [int(n) for n in res.neurons]},
                    {"scale": (1.0, *tf["scale"]), "translate": (0.0, *tf["translate"])}, 0,
                )  # fmt: skip
            else:
                for rank, (n, m) in enumerate(zip(res.neurons, res.maps, strict=True)):
                    wanted[f"{name} · #{rank + 1} n{int(n)}"] = (
                        m, {"kind": "neuron", "image": name, "neuron": int(n), "rank": rank}, tf, rank,
                    )  # fmt: skip
            for lay in self._overlay_layers(name):
                if lay.name not in wanted:
                    steps.append(lambda lay=lay: self.viewer.layers.remove(lay))
            for lname, spec in wanted.items():
                steps.append(
                    lambda lname=lname, spec=spec: self._put_layer(lname, spec, vmax, stack)
                )
        steps.append(self._boxes_on_top)
        # napari re-arranges and redraws the whole scene graph on every insert, and each insert
        # makes the window repaint: the batch defers both to one update each, in steps of their own
        b = self._batch
        return [b.begin, *steps, b.end, b.release]

    @property
    def _batching(self) -> bool:
        """True while the layers batch of a run's layer steps is open."""
        return self._batch.open

    def _put_layer(self, lname: str, spec: tuple, vmax: float, stack: bool) -> None:
        """Update the overlay layer ``lname`` in place, or build it and queue its insertion.

        A new layer costs napari two chunks of GUI-thread work of about equal size - building the
        layer, then inserting it (layer controls, vispy node, layer-list row) - so they run in two
        event-loop turns. Hidden layers are built hidden, so nothing is drawn for them.
        """
        data, meta, transform, rank = spec
        visible = stack or meta.get("rank") == 0
        if lname in self.viewer.layers:
            lay = self.viewer.layers[lname]
            lay.data = data
            lay.scale, lay.translate = transform["scale"], transform["translate"]
            lay.contrast_limits = (0.0, vmax)
            lay.metadata[OVERLAY_KEY] = meta
            lay.visible = visible
            return
        from napari.layers import Image

        lay = Image(
            data, name=lname, metadata={OVERLAY_KEY: meta}, colormap=L.neuron_colormap(rank),
            blending="additive", contrast_limits=(0.0, vmax), interpolation2d="linear",
            units=("pixel", "mm", "mm") if data.ndim == 3 else ("mm", "mm"), visible=visible,
            **transform,
        )  # fmt: skip
        self._pending.insert(0, lambda: self._insert_layer(lay))

    def _insert_layer(self, layer: Any) -> None:
        """Add a built overlay on top, leaving the user's layer selection as it was."""
        append_without_selecting(self.viewer, layer)

    def _boxes_on_top(self) -> None:
        """Annotation boxes stay above the heatmaps."""
        n = len(self.viewer.layers)
        shapes = [i for i, lay in enumerate(self.viewer.layers) if lay._type_string == "shapes"]
        for i in shapes[::-1]:
            self.viewer.layers.move(i, n)
            n -= 1

    def _drain(self) -> None:
        """Run one pending GUI step, then yield to the event loop before the next one."""
        from qtpy.QtCore import QTimer

        if not self._pending:
            return
        step = self._pending.pop(0)
        try:
            step()
        except Exception as exc:  # a layer step must never take the viewer down
            self._pending.clear()
            try:
                self._batch.end()
            except Exception:  # noqa: BLE001 - already failing: report the first error
                pass
            finally:
                self._batch.release()
            self._fail(f"could not show the overlays: {exc}")
            self._finished()
            return
        if self._pending:  # a real (1 ms) timer: paints and input run before the next step
            QTimer.singleShot(1, self._drain)
        else:
            self._finished()

    def is_busy(self) -> bool:
        """True while an analysis runs or its layers are still being shown."""
        return self.worker is not None or bool(self._pending)

    def _set_visible(self, visible: bool) -> None:
        for lay in self._overlay_layers():
            if lay.visible != visible:
                lay.visible = visible

    def remove_overlays(self) -> None:
        """Remove every heatmap layer this widget added."""
        for lay in self._overlay_layers():
            self.viewer.layers.remove(lay)

    def _show_neuron(self, neuron: int) -> None:
        for lay in self._overlay_layers():
            meta = lay.metadata[OVERLAY_KEY]
            want = meta.get("neuron") == neuron
            # napari refreshes a layer on every visibility set, changed or not
            if meta.get("kind") == "neuron" and lay.visible != want:
                lay.visible = want
        cur = self.session.current
        if cur is not None and neuron in list(cur.neurons):
            row = list(cur.neurons).index(neuron)
            if self.table.currentRow() != row:
                self.table.selectRow(row)

    # --- table ----------------------------------------------------------------------------------
    def _verdicts(self, neurons: list[int]) -> list[str]:
        """Current verdicts of the neurons ('?' when the database cannot be read)."""
        if not self.session.sae_hash:
            return [""] * len(neurons)
        try:
            from ...labels import LabelStore

            with LabelStore(self.session.label_db) as store:
                return [store.verdict_of(self.session.sae_hash, n) or "" for n in neurons]
        except Exception:  # the table must render even when the database cannot be opened
            return ["?"] * len(neurons)

    def _fill_table(self, res: ImageResult) -> None:
        a = res.analysis
        self.table.setRowCount(len(res.neurons))
        verdicts = self._verdicts([int(n) for n in res.neurons])
        for row, (n, score, m) in enumerate(zip(res.neurons, res.scores, res.maps, strict=True)):
            iou = res.box_iou.get(int(n), float("nan"))
            values = [
                row + 1, int(n), f"{score:.4g}", f"{a.logit_contributions[int(n)]:+.3f}", f"{m.max():.3f}",
                "-" if np.isnan(iou) else f"{iou:.2f}", verdicts[row],
            ]  # fmt: skip
            for col, v in enumerate(values):
                item = QTableWidgetItem(str(v))
                item.setTextAlignment(Qt.AlignCenter)
                self.table.setItem(row, col, item)
        self.table.resizeColumnsToContents()

    def _refresh_verdicts(self) -> None:
        cur = self.session.current
        if cur is None:
            return
        for row, v in enumerate(self._verdicts([int(n) for n in cur.neurons])):
            self.table.setItem(row, len(COLUMNS) - 1, QTableWidgetItem(v))

    def _row_clicked(self, row: int, _col: int) -> None:
        cur = self.session.current
        if cur is not None and row < len(cur.neurons):
            self.session.set_neuron(int(cur.neurons[row]))

    # --- annotation boxes -----------------------------------------------------------------------
    def _load_boxes_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Annotation boxes", "", "CSV (*.csv)")
        if path:
            self.load_boxes(path)

    def load_boxes(self, path: str | Path) -> int:
        """Add a Shapes layer of the boxes in a VinDr-format or generic CSV; returns boxes shown."""
        from ...annotations import load_box_csv, load_vindr
        from ...errors import MammoSAEError

        try:
            header = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[0]
            by_key: dict[str, list[tuple[tuple[float, ...], str]]] = {}
            if "finding_categories" in header:
                for image_id, im in load_vindr(path).images.items():
                    for f in im.findings:
                        if f.box is not None:
                            by_key.setdefault(str(image_id), []).append((f.box, f.category))
            else:
                for b in load_box_csv(path):
                    key = str(
                        getattr(b, "sop_instance_uid", "") or Path(str(getattr(b, "path", ""))).stem
                    )
                    by_key.setdefault(key, []).append((tuple(b.box), str(getattr(b, "label", ""))))
        except (MammoSAEError, OSError, IndexError) as exc:
            self._fail(f"cannot read boxes from {Path(path).name}: {exc}")
            return 0
        shapes, cats = [], []
        for lay in image_layers(self.viewer):
            rec, placement = lay.metadata["record"], lay.metadata["placement"]
            for key in (rec.sop_instance_uid, Path(rec.source).stem):
                for box, cat in by_key.get(key, []):
                    shapes.append(L.box_corners_world(placement, box))
                    cats.append(cat)
        if not shapes:
            self._fail(f"none of the boxes in {Path(path).name} belongs to an open image")
            return 0
        self.viewer.add_shapes(
            shapes, shape_type="rectangle", name=f"annotations ({Path(path).name})",
            edge_color="#ff5050", face_color="transparent", edge_width=1.0,
            features={"category": cats, "label": [L.box_label(c) for c in cats]},
            text={"string": "{label}", "color": "white", "size": 9, "anchor": "upper_left"},
        )  # fmt: skip
        return len(shapes)
