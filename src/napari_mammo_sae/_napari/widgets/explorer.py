"""Neuron explorer: run the model + SAE on a mammogram and show its top neurons over the image.

Run (in a worker thread, cancellable) analyses the chosen image - or every view of the exam - and
adds one image layer per top neuron on the model's feature grid, aligned in mm over the mammogram
(never upsampled), with a distinct colour per rank, transparent at zero, additive blending and
shared contrast limits. Re-running updates those layers in place. Annotation boxes are taken from
every Shapes layer in the viewer (the phantom truth, a CSV loaded here, or boxes you draw) except
the planted-marker layer; each neuron's box agreement is the IoU of its 95th-percentile box with
the nearest annotation box. Click a row of the table to show that neuron alone.

The form is magicgui widgets (typed choices, a layer picker that follows the viewer's layers,
file pickers); the neuron table is magicgui's Table, its row clicks taken from the Qt table.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
from magicgui import widgets as mw
from qtpy.QtWidgets import QStyledItemDelegate

from .. import inserts
from .. import layers as L
from .. import model_choice as mc
from ..model_choice import Concept, Layer, Ranking, Source, TargetClass, Variant
from ..viewing import OVERLAY_KEY, annotation_shapes, install, mammogram_layers
from . import _common as C

CLASS_LABELS = {TargetClass.present: "1 (finding present)", TargetClass.absent: "0 (absent)"}
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


class NeuronExplorer(C.ScrollingForm, mw.Container):
    """Dock widget: choose image, model, concept, class, k and ranking; Run; inspect the top neurons."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self._scrolling(320)  # in a short dock the form scrolls
        self.viewer = napari_viewer
        self.session = C.get_session(napari_viewer)
        self.worker = None
        self._pending: list = []
        self._used = "class_mean"  # the ranking the last run used
        # the layer steps of a run go in inside one layers batch with the window's repaints held
        self._batch = inserts.QuietBatch(napari_viewer, self.native)
        self._shown_neuron: int | None = None  # the neuron whose layers are visible
        self.shown_at: float | None = None  # perf_counter when a run's overlays were last shown
        self._queue: list | None = None  # the running open-analysis's targets (it takes appends)
        self._open_again = False  # an open-analysis is owed when the current run ends
        self._open_scheduled = False
        self.last_error: str | None = None
        settings = C.load_settings()
        install(napari_viewer)  # workstation viewing (window/level, magnifier, view keys)

        import napari

        self.image = mw.create_widget(annotation=napari.layers.Image, label="image",
                                   options={"choices": self._image_choices})  # fmt: skip
        self.all_views = mw.CheckBox(text="every view of the exam")
        # a CAD-like habit: the overlays come with the exam, no Run needed
        self.on_open = mw.CheckBox(
            text="analyse every view as an exam opens",
            value=bool(settings.get("analyse_on_open", True)),
        )
        self.source = mw.ComboBox(label="model", choices=C.choices(Source))
        tip = "a checkpoint (.pth, .pt), or any file inside one of our weights folders"
        self.classifier_path = C.path_edit(
            "classifier", "r", settings.get("classifier_path"), tooltip=tip
        )
        self.sae_path = C.path_edit("SAE", "r", settings.get("sae_path"), tooltip=tip)
        self.probe_path = C.path_edit(
            "probe (.npz)", "r", settings.get("probe_path"), filter="*.npz"
        )
        self.trust = mw.CheckBox(text="trust pickled Mammo-CLIP file (can run code)")
        self.concept = mw.ComboBox(label="concept", choices=C.choices(Concept))
        self.variant = mw.ComboBox(label="variant", choices=C.choices(Variant))
        # which backbone layer the SAE reads (bundled weights; a chosen SAE folder says its own)
        self.layer = mw.ComboBox(label="layer", choices=C.choices(Layer))
        self.target = mw.ComboBox(label="class", choices=C.choices(TargetClass, CLASS_LABELS))
        self.k = mw.SpinBox(label="top k", min=1, max=100, value=10)
        self.ranking = mw.ComboBox(label="ranking", choices=C.choices(Ranking))
        self.device = mw.ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"])
        self.stack = mw.CheckBox(text="one k x h x w stack (slider)")
        self.run_button = mw.PushButton(text="Run")
        self.cancel_button = mw.PushButton(text="Cancel", enabled=False)
        self.probability = mw.Label(value="P = 0")
        self.probability.native.setStyleSheet("font-weight: bold")
        # as tall empty as with its text: a dock that grows by a pixel can resize the whole window
        self.probability.native.setMinimumHeight(self.probability.native.sizeHint().height())
        self.probability.value = ""
        self.status = mw.Label(value="Open a mammogram with this plugin's reader, then Run.")
        self.status.native.setWordWrap(True)
        self.table = mw.Table(value=[], columns=COLUMNS)
        self.table.read_only = True
        qt_table = self.table.native
        qt_table.verticalHeader().setVisible(False)
        qt_table.setSelectionBehavior(qt_table.SelectionBehavior.SelectRows)
        qt_table.setItemDelegate(QStyledItemDelegate(qt_table))  # our texts as written (no 3e-02)
        self.show_all = mw.PushButton(text="show all")
        self.hide_all = mw.PushButton(text="hide all")
        self.remove_all = mw.PushButton(text="remove overlays")
        self.boxes_button = mw.PushButton(text="boxes CSV...")
        self.export_button = mw.PushButton(text="Export to DICOM / send to PACS...")

        self.extend([
            self.image, self.all_views, self.on_open, self.source, self.classifier_path,
            self.sae_path, self.probe_path, self.trust, self.concept, self.variant, self.layer, self.target, self.k,
            self.ranking, self.device, self.stack, C.row(self.run_button, self.cancel_button),
            self.probability, self.status, self.table,
            C.row(self.show_all, self.hide_all, self.remove_all, self.boxes_button),
            self.export_button,
        ])  # fmt: skip
        for w in (self.probability, self.status, self.table):
            w.label = ""

        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.source.changed.connect(self._source_changed)
        qt_table.cellClicked.connect(self._row_clicked)
        self.show_all.changed.connect(lambda: self._set_visible(True))
        self.hide_all.changed.connect(lambda: self._set_visible(False))
        self.remove_all.changed.connect(self.remove_overlays)
        self.boxes_button.changed.connect(
            C.file_picker(self.native, self.load_boxes, "Annotation boxes", "CSV (*.csv)")
        )
        self.export_button.changed.connect(self.export_analysis)
        self.session.neuron_changed.connect(self._show_neuron)
        self.session.verdicts_changed.connect(self._refresh_verdicts)
        self.image.changed.connect(self._image_changed)
        # napari refreshes a docked widget's layer pickers itself; this also covers an undocked one
        napari_viewer.layers.events.inserted.connect(self._refresh_images)
        napari_viewer.layers.events.inserted.connect(self._layer_inserted)
        self.on_open.changed.connect(lambda v: C.save_settings(analyse_on_open=bool(v)))
        napari_viewer.layers.events.removed.connect(self._refresh_images)
        self._refresh_images()
        self._source_changed()

    # --- form helpers ---------------------------------------------------------------------------
    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(lay.name, lay) for lay in mammogram_layers(self.viewer)]

    def _refresh_images(self, *_: Any) -> None:
        with self.image.changed.blocked():  # a refill is not the user choosing a view
            self.image.reset_choices()

    @property
    def image_name(self) -> str:
        """The name of the chosen image layer ('' when none)."""
        return self.image.value.name if self.image.value is not None else ""

    def _source_changed(self, *_: Any) -> None:
        custom = self.source.value is Source.files
        for w in (self.classifier_path, self.sae_path, self.probe_path, self.trust):
            w.enabled = custom
        self.layer.enabled = not custom

    def choice(self) -> mc.ModelChoice:
        """The ModelChoice of the form (ConfigError when incomplete)."""
        from ...errors import ConfigError

        concept = self.concept.value.name
        device = self.device.value
        if self.source.value is Source.bundled:
            return mc.bundled_choice(
                concept, self.variant.value.value, device, layer=self.layer.value.name
            )
        clf, sae = mc.weights_path(self.classifier_path.value), mc.weights_path(self.sae_path.value)
        if clf is None or sae is None:
            raise ConfigError("choose a classifier and an SAE (or use the bundled demo weights)")
        probe = Path(C.path_text(self.probe_path)) if C.path_text(self.probe_path) else None
        C.save_settings(classifier_path=str(clf), sae_path=str(sae),
                      probe_path=str(probe) if probe else "")  # fmt: skip
        return mc.ModelChoice(clf, sae, probe, self.trust.value, device)

    def targets(self, every_view: bool | None = None) -> list[tuple[str, Any, Any]]:
        """(layer name, record, placement) of the image(s) to analyse."""
        layers = mammogram_layers(self.viewer)
        if not (self.all_views.value if every_view is None else every_view):
            layers = [lay for lay in layers if lay.name == self.image_name]
        return [(lay.name, lay.metadata["record"], lay.metadata["placement"]) for lay in layers]

    # --- running --------------------------------------------------------------------------------
    def run(self, *_: Any, every_view: bool | None = None, queue: bool = False) -> Any:
        """Start the analysis in a worker thread; returns the worker (None when refused).

        ``queue``: views the reader adds while it runs are appended to its targets (the worker
        takes them in turn) - the *analyse on open* run.
        """
        from ...errors import MammoSAEError

        if self.is_busy():  # e.g. the analysis of an exam being opened (the Run button is off)
            self.status.value = "an analysis is running: wait for it, or Cancel it"
            return None
        targets = self.targets(every_view)
        if not targets:
            C.notify_error(
                "No mammogram to analyse: open a DICOM file with the napari-mammo-sae reader"
            )
            return None
        try:
            choice = self.choice()
        except MammoSAEError as exc:
            self._fail(str(exc))
            return None
        s = self.session
        s.concept, s.variant = self.concept.value.name, self.variant.value.value
        s.target_class, s.ranking = int(self.target.value), self.ranking.value.name
        self._queue = targets if queue else None
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = "loading the model..."
        self.worker = C.start_worker(
            mc.analyse_layers, targets, choice, ranking=s.ranking, target_class=s.target_class,
            k=self.k.value, shapes=annotation_shapes(self.viewer), open_labels=True,
            label_db=s.label_db,
            _connect={"yielded": self.status.native.setText, "returned": self._done,
                      "errored": lambda exc: self._fail(str(exc)), "finished": self._finished},
            # no napari progress bar: its status-bar spinner animates for as long as one is open,
            # and under software OpenGL every frame recomposites the whole window - about 4.5
            # CPU-seconds taken from the backbone over a four-view run. The status line below
            # says which view is being analysed; a first ONNX export still shows in napari.
        )  # fmt: skip
        return self.worker

    def cancel(self, *_: Any) -> None:
        """Stop the running analysis after the current image."""
        if self.worker is not None:
            self.worker.quit()
            self.status.value = "cancelled"

    def _finished(self) -> None:
        self.worker = None
        self._queue = None
        if self._pending:
            return
        self.run_button.enabled, self.cancel_button.enabled = True, False
        if self._open_again:  # views opened too late for the last run
            self._open_again = False
            self._schedule_open_run()

    # --- analyse on open ----------------------------------------------------------------------
    def _layer_inserted(self, event: Any) -> None:
        """With *analyse on open*, a mammogram the reader adds joins the running open-analysis
        (the worker takes it next) or starts one in the next event-loop turn."""
        layer = getattr(event, "value", None)
        if not self.on_open.value or layer is None or layer not in mammogram_layers(self.viewer):
            return
        if self._queue is not None:
            self._queue.append((layer.name, layer.metadata["record"], layer.metadata["placement"]))
        elif self.is_busy():
            self._open_again = True
        else:
            self._schedule_open_run()

    def _schedule_open_run(self) -> None:
        from qtpy.QtCore import QTimer

        if not self._open_scheduled:
            self._open_scheduled = True
            QTimer.singleShot(0, self._run_on_open)

    def _run_on_open(self) -> None:
        from ...errors import MammoSAEError

        self._open_scheduled = False
        if self.is_busy():
            self._open_again = True
            return
        try:
            self.choice()
        except MammoSAEError:  # no model chosen yet: say so, no error dialog on every open
            self.status.value = "analyse on open: choose the model, then open the exam again"
            return
        self.run(every_view=True, queue=True)

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.status.value = f"error: {message}"
        C.notify_error(message)

    def run_blocking(self, timeout_s: float = 600.0) -> str:
        """Run and wait (for scripts such as the demo); returns the status line."""
        self.wait_idle(timeout_s)  # an analysis of views being opened may be running
        if self.run() is not None:
            self.wait_idle(timeout_s)
        return self.probability.value or self.status.value

    def wait_idle(self, timeout_s: float = 600.0) -> None:
        """Wait until no analysis runs, its layers are in and no open-analysis is owed - in a real
        event loop, so timers fire on time and Qt's deferred deletes run (scripts, benchmarks)."""
        import time

        from qtpy.QtCore import QEventLoop, QTimer

        def idle() -> bool:
            return not (self.is_busy() or self._open_scheduled or self._open_again)

        loop, timer, t0 = QEventLoop(), QTimer(), time.time()
        timer.timeout.connect(
            lambda: loop.quit() if idle() or time.time() - t0 > timeout_s else None
        )
        timer.start(10)
        loop.exec()
        timer.stop()

    def _done(self, value: tuple) -> None:
        models, results, used = value
        queued, self._queue = self._queue, None
        if models is None:  # a typed error from the worker: `used` holds its message
            self._fail(used)
            return
        if queued is not None:  # a view added after the worker's last look: run again after
            self._open_again = any(name not in results for name, _r, _p in queued)
        s = self.session
        s.models, s.sae_hash, s.probe = models, models.sae_hash, models.probe
        s.probe_path = models.choice.probe
        if models.probe is not None:
            key = used if used in models.probe.scores else "class_mean"
            s.class_scores = np.stack([models.probe.scores[key][c] for c in (0, 1)])
        else:
            s.class_scores = None
        s.results.update(results)
        freeze_long_lived_objects()
        s.current_layer = self.image_name if self.image_name in results else next(iter(results))
        self._used = used
        top = self._shown_neuron = int(s.current.neurons[0])
        shown, rest = self._layer_steps(results)
        # the last steps in turns of their own: texts and table; the other docks; the top neuron.
        # Then the reader has the overlays, and the hidden layers of the other neurons follow.
        self._pending = [*shown, lambda: self._publish(used, tell=False),
                         lambda: s.analysis_changed.emit(s), lambda: s.set_neuron(top),
                         self._mark_shown, *rest]  # fmt: skip
        self._drain()

    def _mark_shown(self) -> None:
        import time

        self.shown_at = time.perf_counter()

    def show_view(self, layer_name: str) -> bool:
        """Make an analysed view the current one: its texts, table and top neuron; False if none."""
        s = self.session
        if layer_name not in s.results or self.is_busy():
            return False
        s.current_layer = layer_name
        if self.image_name != layer_name and layer_name in self.viewer.layers:
            with self.image.changed.blocked():
                self.image.value = self.viewer.layers[layer_name]
        self._publish(self._used)
        return True

    def _image_changed(self, layer: Any) -> None:
        """Choosing another view after an every-view run shows that view's analysis."""
        if layer is not None and layer.name != self.session.current_layer:
            self.show_view(layer.name)

    def _publish(self, used: str, tell: bool = True) -> None:
        """Texts and table of the current view, then (``tell``) the other widgets."""
        s = self.session
        cur = s.current
        a = cur.analysis
        note = (
            ""
            if used == s.ranking
            else f" (ranked by logit contribution: no probe for {s.ranking})"
        )
        runtime = getattr(a, "runtime", None)
        hook = getattr(a, "hook", "head")
        where = "" if hook == "head" else f"; SAE at {hook} (interventions re-run the rest)"
        self.probability.value = f"P({s.concept}) = {a.probability:.3f}   SAE reconstruction: {a.reconstruction_probability:.3f}"
        self.status.value = (
            f"{cur.layer_name}: top {len(cur.neurons)} of {a.n_neurons} neurons for class "
            f"{s.target_class}{note}; {a.timings.get('total', 0):.2f} s"
            + (f" ({runtime} backbone)" if runtime else "")
            + where
        )
        self._fill_table(cur)
        if tell:
            s.analysis_changed.emit(s)
            s.set_neuron(int(cur.neurons[0]))

    def export_analysis(self, *_: Any) -> None:
        """The PACS dock's export dialog for this viewer's analysis (DICOM objects, PACS send)."""
        try:
            from .pacs import export_analysis_dialog
        except ImportError:
            C.notify_error("Export to DICOM / PACS is not available in this installation yet")
            return
        export_analysis_dialog(self.viewer)

    # --- layers ---------------------------------------------------------------------------------
    def _overlay_layers(self, image: str | None = None) -> list[Any]:
        metas = ((lay, lay.metadata.get(OVERLAY_KEY)) for lay in self.viewer.layers)
        return [lay for lay, m in metas if isinstance(m, dict) and image in (None, m.get("image"))]

    def _layer_steps(self, results: dict[str, mc.ImageResult]) -> tuple[list, list]:
        """Small GUI-thread steps (one layer each) that bring the overlays up to date: (those the
        reader sees - the shown neuron's layer in each view, or the stacks - and the rest).

        A napari insert costs about 100 ms of the GUI thread under software OpenGL, so the hidden
        layers of the other ranks (36 of 40 for a four-view exam at top 10) go in after the shown
        ones are painted and the table is filled, one per event-loop turn.
        """
        vmax = max(float(r.maps.max()) for r in results.values()) or 1.0
        stack = self.stack.value
        steps: list = []
        later: list = []
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
                shown = stack or spec[1].get("neuron") == self._shown_neuron
                (steps if shown else later).append(
                    lambda lname=lname, spec=spec: self._put_layer(lname, spec, vmax, stack)
                )
        steps.append(self._boxes_on_top)
        # napari re-arranges and redraws the whole scene graph on every insert, and each insert
        # makes the window repaint: the batch defers both to one update each, in steps of their own
        b = self._batch
        if not later:
            return [b.begin, *steps, b.end, b.release], []
        # the hidden layers, while the reader looks: each in a batch of its own over three turns
        # (insert; scene graph; repaint), so no turn holds both an insert and a repaint
        lb = self._batch  # closed and released by then: the same batch, opened per layer
        rest = [
            s for step in [*later, self._boxes_on_top] for s in (lb.begin, step, lb.end, lb.release)
        ]
        return [b.begin, *steps, b.end, b.release], rest

    @property
    def _batching(self) -> bool:
        """True while a layers batch of a run's layer steps is open."""
        return self._batch.open

    def _put_layer(self, lname: str, spec: tuple, vmax: float, stack: bool) -> None:
        """Update the overlay layer ``lname`` in place, or build it and queue its insertion.

        A new layer costs napari two chunks of GUI-thread work of about equal size - building the
        layer, then inserting it (layer controls, vispy node, layer-list row) - so they run in two
        event-loop turns. Hidden layers are built hidden, so nothing is drawn for them.
        """
        data, meta, transform, rank = spec
        visible = stack or meta.get("neuron") == self._shown_neuron
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
        """Add a built overlay on top, leaving the user's layer selection as it was; its layer
        controls follow in the next step."""
        self._pending.insert(
            0, inserts.append_without_selecting(self.viewer, layer, controls_later=True)
        )

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
            with contextlib.suppress(Exception):  # already failing: report the first error
                self._batch.end()
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
        self._shown_neuron = neuron  # also for layers still to come in
        for lay in self._overlay_layers():
            meta = lay.metadata[OVERLAY_KEY]
            want = meta.get("neuron") == neuron
            # napari refreshes a layer on every visibility set, changed or not
            if meta.get("kind") == "neuron" and lay.visible != want:
                lay.visible = want
        self._select_row(neuron)

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

    def _fill_table(self, res: mc.ImageResult) -> None:
        a = res.analysis
        verdicts = self._verdicts([int(n) for n in res.neurons])
        rows = []
        for rank, (n, score, m) in enumerate(zip(res.neurons, res.scores, res.maps, strict=True)):
            iou = res.box_iou.get(int(n), float("nan"))
            rows.append([
                rank + 1, int(n), f"{score:.4g}", f"{a.logit_contributions[int(n)]:+.3f}",
                f"{m.max():.3f}", "-" if np.isnan(iou) else f"{iou:.2f}", verdicts[rank],
            ])  # fmt: skip
        # cell by cell on the Qt table: magicgui's Table.value setter took 7.5 ms for 10 rows, this
        # 0.8 ms - and it runs in the step that shows a run's results
        from qtpy.QtWidgets import QTableWidgetItem

        qt_table = self.table.native
        qt_table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, v in enumerate(row):
                qt_table.setItem(r, c, QTableWidgetItem(str(v)))
        qt_table.resizeColumnsToContents()

    def _refresh_verdicts(self) -> None:
        cur = self.session.current
        if cur is not None and self.table.shape[0] == len(cur.neurons):
            for row, v in enumerate(self._verdicts([int(n) for n in cur.neurons])):
                self.table.data[row, len(COLUMNS) - 1] = v

    def _row_clicked(self, row: int, _col: int = 0) -> None:
        cur = self.session.current
        if cur is not None and row < len(cur.neurons):
            self.session.set_neuron(int(cur.neurons[row]))

    def _select_row(self, neuron: int) -> None:
        cur = self.session.current
        if cur is not None and neuron in list(cur.neurons):
            row = list(cur.neurons).index(neuron)
            if self.table.native.currentRow() != row:
                self.table.native.selectRow(row)

    # --- annotation boxes -----------------------------------------------------------------------
    def load_boxes(self, path: str | Path) -> int:
        """Add a Shapes layer of the boxes in a VinDr-format or generic CSV; returns boxes shown."""
        from ...errors import MammoSAEError

        try:
            by_key = L.boxes_by_image(path)
        except (MammoSAEError, OSError) as exc:
            self._fail(f"cannot read boxes from {Path(path).name}: {exc}")
            return 0
        shapes, cats = [], []
        for lay in mammogram_layers(self.viewer):
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
