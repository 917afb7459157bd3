"""Interventions: switch SAE neurons off or keep only some, and see the prediction change at once.

Uses the cached latents of the explorer's last run. At the last layer the exact closed form that
average pooling allows (``analysis.interventions``) means a slider move never reruns the backbone:
the original, the SAE-reconstruction and the intervened probability update immediately, and so does
the class-activation map of the (intervened) reconstruction, shown as a layer over the image. With
an SAE at an intermediate layer there is no closed form: each new neuron set decodes the edited
latents and re-runs the rest of the backbone (``models.inference.RerunEngine``, tens of
milliseconds for the demo model; the dock says so), and the CAM is gradient x activation.
The form is magicgui widgets (mode enum, k slider, neuron spin box).
Top-k uses the union of the top-k of each class, as the paper does (dataset rankings from the
probe file when there is one, else this image's logit contributions).
"""

from __future__ import annotations

from contextlib import nullcontext
from enum import Enum
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, LineEdit, Slider, SpinBox
from qtpy.QtCore import QTimer

from .. import layers as L
from ..inserts import insert_in_turns
from ._common import choices, get_session, notify_error, start_worker

CAM_KEY = "mammo_sae_cam"


class Mode(Enum):
    topk_keep = "top-k activated"
    topk_remove = "top-k deactivated"
    custom_remove = "custom set: remove"
    custom_keep = "custom set: keep only"
    spurious = "all neurons labelled spurious: remove"
    study_spurious = "every neuron the study's readers call spurious: remove"
    single = "single neuron: keep only"
    region = "everything under the selected Shapes layer's boxes: remove"


def _read_spurious(label_db: Any, sae_hash: str) -> list[int]:
    """Worker: the neurons with a current 'spurious' verdict for this SAE."""
    from ...labels import LabelStore

    with LabelStore(label_db) as store:
        return [int(n) for n in store.spurious_neurons(sae_hash)]


def parse_neurons(text: str, m: int) -> list[int]:
    """'3, 17 42-45' -> [3, 17, 42, 43, 44, 45] (ValueError on bad or out-of-range ids)."""
    out: list[int] = []
    for part in text.replace(",", " ").split():
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    bad = [n for n in out if not 0 <= n < m]
    if bad:
        raise ValueError(f"neuron ids must be between 0 and {m - 1}: {bad[:5]}")
    return sorted(set(out))


class InterventionWidget(Container):
    """Dock widget: mode, k, neuron set; original / reconstruction / intervened probability; CAM."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self._cam_pending: dict[str, Any] = {}  # CAM layers built, not yet in the viewer
        self._cam_stale: dict[str, tuple[float, float]] = {}  # hidden CAMs: limits to apply
        self._cam_watched: set[int] = set()  # CAM layers whose visibility we follow
        self._region_watched: set[int] = set()  # Shapes layers whose boxes the region mode follows
        self._order_of: tuple[Any, Any] | None = None  # the class scores _order was sorted from
        self._order: tuple[np.ndarray, np.ndarray] = (np.zeros(0, int), np.zeros(0, int))
        # ((label database, SAE hash), neurons labelled spurious) once read; the key being read
        self._spurious_known: tuple[tuple, list[int]] | None = None
        self._spurious_reading: tuple | None = None
        self._thumbnail_timer = QTimer(self.native)
        self._thumbnail_timer.setSingleShot(True)
        self._thumbnail_timer.setInterval(300)
        self._thumbnail_timer.timeout.connect(self._refresh_thumbnails)
        self.mode = ComboBox(label="mode", choices=self._modes)
        self.k = Slider(label="k", min=0, max=100, value=10)
        self.custom = LineEdit(label="custom set")
        self.custom.native.setPlaceholderText("neuron ids, e.g. 12, 40-42")
        self.single = SpinBox(label="single neuron", min=0, max=1 << 20)
        self.original = Label(label="P original", value="-")
        self.reconstruction = Label(label="P SAE reconstruction", value="-")
        self.intervened = Label(label="P intervened", value="-")
        self.intervened.native.setStyleSheet("font-weight: bold")
        self.neurons_label = Label(label="", value="")
        # fixed geometry: texts that change with every slider step must not re-layout the dock
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QSizePolicy

        text = self.neurons_label.native
        text.setWordWrap(True)
        text.setFixedHeight(4 * text.fontMetrics().lineSpacing() + 4)
        text.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        text.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.extend([self.mode, self.k, self.custom, self.single, self.original,
                     self.reconstruction, self.intervened, self.neurons_label])  # fmt: skip
        self.last: Any = None  # the last InterventionResult
        self.mode.changed.connect(self.recompute)
        self.k.changed.connect(self.recompute)
        self.custom.native.editingFinished.connect(self.recompute)
        self.single.changed.connect(self.recompute)
        # after a run, in its own event-loop turn (the explorer's layer steps come first)
        self.session.analysis_changed.connect(lambda _s: QTimer.singleShot(0, self.recompute))
        self.session.neuron_changed.connect(self._neuron_changed)
        self.session.study_changed.connect(self._study_changed)
        self.session.verdicts_changed.connect(self._verdicts_changed)
        self.recompute()

    def _modes(self, _widget: Any = None) -> list[tuple[str, Mode]]:
        """Every mode; the study's consensus only while a reading study is open."""
        have_study = self.session.study is not None
        return [c for c in choices(Mode) if c[1] is not Mode.study_spurious or have_study]

    def _study_changed(self, _study: Any = None) -> None:
        self.mode.reset_choices()

    def _neuron_changed(self, neuron: int) -> None:
        quiet = self.mode.value is not Mode.single  # only the single-neuron mode depends on it
        with self.single.changed.blocked() if quiet else nullcontext():
            self.single.value = int(neuron)

    def _scores(self, cur: Any) -> tuple[np.ndarray, np.ndarray]:
        """(class-0 scores, class-1 scores) over all neurons for the top-k union."""
        cs = self.session.class_scores
        if cs is not None and cs.shape[1] == cur.analysis.n_neurons:
            return cs[0], cs[1]
        contrib = np.asarray(cur.analysis.logit_contributions, dtype=np.float64)
        return -contrib, contrib

    def neuron_set(self) -> tuple[list[int], str]:
        """(neurons, 'keep'|'remove') of the current mode."""
        cur = self.session.current
        m = cur.analysis.n_neurons
        mode, k = self.mode.value, self.k.value
        if mode in (Mode.topk_keep, Mode.topk_remove):
            key = (self.session.class_scores, cur)
            old = self._order_of
            if old is None or old[0] is not key[0] or old[1] is not key[1]:
                # both classes' neuron orders once per analysis (the order topk_union uses): a
                # slider step then only slices them
                s0, s1 = self._scores(cur)
                self._order_of = key
                self._order = (np.argsort(-s0, kind="stable"), np.argsort(-s1, kind="stable"))
            a, b = self._order
            neurons = [int(n) for n in np.union1d(a[:k], b[:k])]
            return neurons, "remove" if mode is Mode.topk_remove else "keep"
        if mode in (Mode.custom_keep, Mode.custom_remove):
            return parse_neurons(
                self.custom.value, m
            ), "keep" if mode is Mode.custom_keep else "remove"
        if mode is Mode.spurious:
            neurons = self._spurious()
            if neurons is None:
                raise ValueError("the verdicts are still being read from the label database")
            return neurons, "remove"
        if mode is Mode.study_spurious:
            if self.session.study is None:
                raise ValueError("no reading study is open in the labelling dock")
            return sorted({int(n) for n in self.session.study.consensus_spurious()}), "remove"
        return [int(self.single.value)], "keep"

    def _spurious(self) -> list[int] | None:
        """The neurons labelled spurious for this SAE; None while a worker reads them (the label
        database may be a PostgreSQL server across the network: never on the GUI thread)."""
        key = (str(self.session.label_db), self.session.sae_hash)
        if self._spurious_known is not None and self._spurious_known[0] == key:
            return self._spurious_known[1]
        if self._spurious_reading != key:
            self._spurious_reading = key
            start_worker(_read_spurious, self.session.label_db, self.session.sae_hash,
                         _connect={"returned": lambda neurons: self._spurious_read(key, neurons),
                                   "errored": lambda exc: self._spurious_failed(key, exc)})  # fmt: skip
        return None

    def _spurious_read(self, key: tuple, neurons: list[int]) -> None:
        if self._spurious_reading != key:  # the database or SAE changed meanwhile: read again
            return
        self._spurious_reading = None
        self._spurious_known = (key, [int(n) for n in neurons])
        if self.mode.value is Mode.spurious:
            self.recompute()

    def _spurious_failed(self, key: tuple, exc: Exception) -> None:
        if self._spurious_reading == key:
            self._spurious_reading = None
        self.intervened.value = "the verdicts could not be read"
        notify_error(f"intervention: cannot read the verdicts: {exc}")

    def _verdicts_changed(self) -> None:
        self._spurious_known = None
        if self.mode.value is Mode.spurious:
            self.recompute()

    def region_cells(self, cur: Any) -> np.ndarray:
        """(h, w) bool: the feature cells the boxes of the selected Shapes layer touch on the
        current image (ValueError when no Shapes layer is selected or no box falls on it)."""
        from ...analysis.shortcuts import cue_cells

        layer = self.viewer.layers.selection.active
        if layer is None or layer._type_string != "shapes":
            raise ValueError("select the Shapes layer that holds the region's boxes")
        if cur.placement is None:
            raise ValueError("this image has no placement in the viewer")
        boxes = L.shapes_to_boxes(cur.placement, [np.asarray(d) for d in layer.data])
        if not boxes:
            raise ValueError(f"no box of {layer.name!r} lies on {cur.layer_name}")
        return cue_cells(cur.analysis.geometry, boxes, cur.analysis.grid)

    def _recompute_region(self, cur: Any) -> Any:
        a = cur.analysis
        try:
            cells = self.region_cells(cur)
        except ValueError as exc:
            self.intervened.value = str(exc)
            self.session.last_intervention = None  # what the dock shows is no result: export none
            return None
        layer = self.viewer.layers.selection.active
        if id(layer) not in self._region_watched:  # a moved or redrawn box updates the result
            self._region_watched.add(id(layer))
            layer.events.data.connect(self._region_changed)
        result = a.region_intervention(cells)
        # the DICOM export records it with its boxes (source-image pixels) on that image
        boxes = tuple(L.shapes_to_boxes(cur.placement, [np.asarray(d) for d in layer.data]))
        self._show(cur, result, f"every latent off on {int(cells.sum())} of {cells.size} feature "
                                f"cells ({self._how(a)})", region=(boxes, int(cells.sum())))  # fmt: skip
        cam = np.where(cells, a.cam_bias, np.asarray(a.cam, dtype=np.float64)).astype(np.float32)
        self._update_cam(cur, cam)
        return result

    def _region_changed(self, _event: Any = None) -> None:
        if self.mode.value is Mode.region:
            self.recompute()

    @staticmethod
    def _how(a: Any) -> str:
        """How the intervened probability is computed for this analysis (said in the dock)."""
        if a.closed_form:
            return "closed form"
        return f"SAE at {a.hook}: the rest of the backbone re-run from the edited activations"

    def _show(self, cur: Any, result: Any, text: str, region: tuple | None = None) -> None:
        """The three probabilities and the set's description; the result is kept for the DICOM
        export (PACS dock), with the image it was applied to and a region's boxes."""
        s, a = self.session, cur.analysis
        self.last = s.last_intervention = result
        s.last_intervention_layer, s.last_intervention_region = cur.layer_name, region
        self.original.value = f"{a.probability:.3f}"
        self.reconstruction.value = f"{a.reconstruction_probability:.3f}"
        self.intervened.value = f"{result.probability:.3f}  ({result.delta_probability:+.3f})"
        self.neurons_label.value = text

    def recompute(self, *_: Any) -> Any:
        """Recompute the intervened probability and CAM (closed form); returns the result."""
        cur = self.session.current
        if cur is None:
            self.intervened.value = "run the neuron explorer first"
            return None
        if self.mode.value is Mode.region:
            return self._recompute_region(cur)
        if self.mode.value is Mode.spurious and self._spurious() is None:
            self.intervened.value = "reading the verdicts..."  # recomputed when they arrive
            return None
        try:
            neurons, how = self.neuron_set()
        except Exception as exc:  # bad custom text, unreadable label database
            notify_error(f"intervention: {exc}")
            return None
        a = cur.analysis
        result = a.intervention().apply(neurons, how)
        shown = ", ".join(map(str, neurons[:20])) + (" ..." if len(neurons) > 20 else "")
        self._show(cur, result, f"{how} {len(neurons)} neurons ({self._how(a)}): {shown}")
        self._update_cam(cur, self.cam(a, neurons, how))
        return result

    def _show_cam(self, layer: Any, limits: tuple[float, float], thumbnail: bool = True) -> None:
        if tuple(layer.contrast_limits) != limits:
            layer.contrast_limits = limits
        if not thumbnail and self._redraw_texture(layer):
            return
        layer.refresh(extent=False, thumbnail=thumbnail, highlight=False)

    def _redraw_texture(self, layer: Any) -> bool:
        """Re-upload a visible CAM layer's texture straight to its vispy visual; False if not
        possible here (then the caller refreshes through napari).

        A napari ``refresh`` emits ``set_data``, which also makes the layer list repaint its rows
        (10-15 ms a slider step under software OpenGL). The CAM is written in place into the
        array napari displays, so only the texture needs to follow.
        """
        canvas = getattr(getattr(self.viewer.window, "_qt_viewer", None), "canvas", None)
        visual = getattr(canvas, "layer_to_visual", {}).get(layer)
        view = getattr(layer, "_data_view", None)
        if visual is None or view is None or not hasattr(visual, "_on_data_change"):
            return False
        if not np.shares_memory(np.asarray(view), layer.data):
            return False
        visual._on_data_change()
        return True

    def _refresh_thumbnails(self) -> None:
        """After a burst of slider steps: bring the CAM layers' layer-list thumbnails up to date."""
        for lay in self.viewer.layers:
            if CAM_KEY in lay.metadata and lay.visible:
                lay.refresh(extent=False, data_displayed=False, highlight=False)

    def _cam_visibility(self, event: Any) -> None:
        """A hidden CAM layer was shown: apply the updates it skipped."""
        layer = event.source
        if layer.visible and layer.name in self._cam_stale:
            self._show_cam(layer, self._cam_stale.pop(layer.name))

    def _cam_failed(self, exc: Exception) -> None:
        self._cam_pending.clear()
        notify_error(f"intervention: could not add the CAM layer: {exc}")

    def cam(self, a: Any, neurons: list[int], how: str) -> np.ndarray:
        """The intervened reconstruction's CAM (``Analysis.reconstruction_cam``)."""
        return a.reconstruction_cam(neurons, how)

    def _update_cam(self, cur: Any, cam: np.ndarray) -> None:
        a = cur.analysis
        name = f"{cur.layer_name} · CAM (intervened)"
        tf = L.heatmap_transform(a.geometry, a.grid, cur.placement)
        # one colour scale per image: that of the CAM with every neuron, so switching neurons off
        # shows as fading rather than being rescaled away (and a slider step changes no limits)
        full = np.asarray(a.cam, dtype=np.float64)
        lim = float(max(np.abs(full).max() if full.size else 0.0, 1e-6))
        if name in self.viewer.layers:
            self._cam_pending.pop(name, None)
            lay = self.viewer.layers[name]
            data = lay.data
            if isinstance(data, np.ndarray) and data.shape == cam.shape and data.dtype == cam.dtype:
                data[...] = cam  # same grid: written in place, no extent or dims recomputation
                if lay.visible:
                    self._show_cam(lay, (-lim, lim), thumbnail=False)
                    self._thumbnail_timer.start()  # the layer-list thumbnail once the slider rests
                else:
                    # a hidden layer is not refreshed at all: napari would redraw the canvas and
                    # repaint every layer-list row for it. It catches up when it is shown.
                    if id(lay) not in self._cam_watched:
                        self._cam_watched.add(id(lay))
                        lay.events.visible.connect(self._cam_visibility)
                    self._cam_stale[name] = (-lim, lim)
                return
        elif name not in self._cam_pending:
            from napari.layers import Image

            layer = Image(
                cam, name=name, colormap=L.cam_colormap(), blending="translucent", opacity=0.8,
                contrast_limits=(-lim, lim), interpolation2d="linear", visible=False,
                metadata={CAM_KEY: {"image": cur.layer_name}}, units=("mm", "mm"), **tf,
            )  # fmt: skip
            # built now, added over the next event-loop turns (the viewer stays responsive);
            # until it is in, later updates replace its data
            self._cam_pending[name] = layer
            insert_in_turns(self.viewer, layer, self.native, on_error=self._cam_failed)
            return
        else:
            lay = self._cam_pending[name]
        lay.data = cam  # another grid, or a layer still being added: its data replaced
        lay.contrast_limits = (-lim, lim)
