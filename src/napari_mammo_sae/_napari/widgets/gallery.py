"""Neuron gallery: where the current neuron fires most across a probed dataset, as a grid of crops.

A neuron is judged on many images, not one. ``napari-mammo-sae probe`` stores each top neuron's
top-activating images with the feature cell of its maximum (:class:`pipeline.probe.TopActivation`).
The gallery reads those images from the dataset folder (VinDr layout) and draws a crop around that
cell with the neuron's heatmap over it, cell edges on the model's crop box. The heatmap comes from
the feature store the probe was made from (the SAE encodes the stored map: no backbone run) or,
without a store, from the explorer's model (one cached backbone run per image). Loading happens in
a worker thread; click a crop to open that image in the viewer with the neuron's overlay. The
controls are magicgui widgets; the image grid is a matplotlib canvas (magicgui has no image grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import Container, Label, PushButton, SpinBox

from ...errors import MammoSAEError
from ..gallery_tiles import Tile, draw_tiles, gallery_tiles  # noqa: F401 - Tile for users
from ._common import (
    ScrollingForm,
    figure_canvas,
    get_session,
    load_settings,
    notify_error,
    notify_info,
    path_edit,
    path_text,
    save_settings,
    start_worker,
)


class NeuronGallery(ScrollingForm, Container):
    """Dock widget: the current neuron's top-activating crops across a probed dataset."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self._scrolling(300)  # in a short dock the form scrolls
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        settings = load_settings()
        self.data_dir = path_edit("dataset", "d", settings.get("gallery_data"),
                                  tooltip="dataset folder (VinDr layout) the probe was made on")  # fmt: skip
        self.probe_path = path_edit("probe", "r", settings.get("gallery_probe"), filter="*.npz",
                                    tooltip="probe .npz or its folder (default: the explorer's)")  # fmt: skip
        self.store_path = path_edit("store", "r", settings.get("gallery_store"), filter="*.h5 *.hdf5",
                                    tooltip="feature store .h5 (optional: no backbone reruns)")  # fmt: skip
        self.neuron = SpinBox(label="neuron", max=1 << 20, value=int(self.session.neuron or 0))
        self.neuron.native.setKeyboardTracking(False)
        self.count = SpinBox(label="crops", min=1, max=16, value=12)
        self.show_button = PushButton(text="show gallery")
        self.status = Label(label="", value="")
        self.status.native.setWordWrap(True)
        self.extend([self.data_dir, self.probe_path, self.store_path, self.neuron, self.count,
                     self.show_button, self.status])  # fmt: skip
        self.figure, self.canvas = figure_canvas(self, 300, figsize=(4, 3.4), facecolor="#262930")
        self.tiles: list[Tile] = []
        self.worker: Any = None
        self.last_error: str | None = None
        self._shown_neuron: int | None = None
        self.show_button.changed.connect(self.load)
        self.session.neuron_changed.connect(self._neuron_changed)
        self.canvas.mpl_connect("button_press_event", self._clicked)

    def _neuron_changed(self, neuron: int) -> None:
        if self.neuron.value != neuron:
            self.neuron.value = int(neuron)
        if self.native.isVisible() and neuron != self._shown_neuron:
            self.load()

    def probe(self) -> Any:
        """The probe result to use: the explorer's, else the file or folder given (by SAE hash)."""
        s = self.session
        text = path_text(self.probe_path)
        if not text:
            return s.probe
        from ...pipeline.probe import find_probe, load_probe

        path = Path(text)
        if path.is_dir():
            if not s.sae_hash:
                raise MammoSAEError("a probe folder needs the explorer's SAE: choose the .npz file")
            found = find_probe(path, s.sae_hash, s.concept)
            if found is None:
                raise MammoSAEError(f"no probe for this SAE and {s.concept} in {path.name}")
            path = found
        result = load_probe(path)
        if s.sae_hash and result.sae_sha256 != s.sae_hash:
            raise MammoSAEError(f"{path.name} was made for another SAE than the explorer's")
        return result

    # --- loading --------------------------------------------------------------------------------
    def load(self, *_: Any) -> Any:
        """Load the neuron's tiles in a worker; returns the worker (None when refused)."""
        neuron = int(self.neuron.value)
        try:
            probe = self.probe()
        except MammoSAEError as exc:  # an input it cannot use, a probe file it cannot read
            return self._refuse(str(exc))
        if probe is None:
            return self._refuse(
                "no probe result: run the explorer with a probe file, or choose one"
            )
        if neuron not in probe.top_images:
            listed = sorted(probe.top_images)[:12]
            return self._refuse(
                f"the probe keeps galleries for its top neurons only ({listed}...); "
                f"neuron {neuron} is not among them"
            )
        data = Path(path_text(self.data_dir))
        if not path_text(self.data_dir) or not (data / "images").is_dir():
            return self._refuse("choose the dataset folder (it holds images/<study>/<image>)")
        analyzer = getattr(self.session.models, "analyzer", None)  # None: no explorer run yet
        store = path_text(self.store_path) or None
        if analyzer is None and store is None:
            return self._refuse(
                "run the neuron explorer (its SAE draws the heatmaps), or choose the feature "
                "store the probe was made from (crops with the strongest cell, no heatmap)"
            )
        save_settings(gallery_data=str(data), gallery_probe=path_text(self.probe_path),
                      gallery_store=store or "")  # fmt: skip
        if self.worker is not None:
            self.worker.quit()
        self.last_error = None
        self.status.value = f"loading neuron {neuron}..."
        self._shown_neuron = neuron
        self.worker = worker = start_worker(  # the slots run on the GUI thread, after this
            gallery_tiles, neuron, probe, data, self.count.value, analyzer=analyzer,
            store_path=store, _progress={"desc": f"gallery: neuron {neuron}"},
            _connect={"returned": lambda tiles: self._draw(neuron, tiles, worker),
                      "errored": lambda exc: self._failed(exc, worker)},
        )  # fmt: skip
        return worker

    def _refuse(self, message: str) -> None:
        if self.worker is not None:  # a pending load of another neuron must not draw over this
            self.worker.quit()
            self.worker = None
        self.status.value = message
        self.last_error = message

    def _failed(self, exc: Exception, worker: Any) -> None:
        if worker is self.worker:
            self.worker = None
        self.last_error = str(exc)
        self.status.value = f"gallery failed: {exc}"
        notify_error(f"gallery: {exc}")

    def _draw(self, neuron: int, tiles: list[Tile], worker: Any = None) -> None:
        if worker is not None and worker is not self.worker:
            return  # a newer request superseded this one
        self.worker = None
        self.tiles = tiles
        draw_tiles(self.figure, neuron, tiles)
        self.canvas.draw()  # synchronous: no deferred draw can outlive a closed viewer
        if not tiles:
            self.status.value = f"neuron {neuron}: none of its top images are in this folder"
        else:
            self.status.value = f"neuron {neuron}: {len(tiles)} images - click one to open it"

    # --- opening ----------------------------------------------------------------------------------
    def _clicked(self, event: Any) -> None:
        k = getattr(event.inaxes, "_gallery_index", None)
        if k is not None and k < len(self.tiles):
            self.open_tile(k)

    def open_tile(self, k: int) -> list[Any]:
        """Open tile ``k``'s image in the viewer with the neuron's heatmap over it."""
        from ..layers import heatmap_transform, neuron_colormap

        t = self.tiles[k]
        try:
            layers = self.viewer.open(str(t.path), plugin="napari-mammo-sae")
        except Exception as exc:  # noqa: BLE001 - shown, never raised into the viewer
            notify_error(f"cannot open {t.path.name}: {exc}")
            return []
        if not layers or t.heat is None:
            return list(layers or [])
        image = layers[0]
        placement = image.metadata.get("placement")
        transform = heatmap_transform(t.geometry, t.heat.shape, placement)
        neuron = self._shown_neuron
        units = getattr(image, "units", None)
        overlay = self.viewer.add_image(
            t.heat, name=f"neuron {neuron} · {image.name}", colormap=neuron_colormap(0),
            blending="additive", contrast_limits=(0.0, max(float(t.heat.max()), 1e-6)),
            interpolation2d="linear", metadata={"mammo_sae_gallery": {"neuron": neuron}},
            **transform, **({"units": units} if units is not None else {}),
        )  # fmt: skip
        self.viewer.layers.selection.active = image
        # centre the view on the strongest cell
        scale, translate = np.asarray(transform["scale"]), np.asarray(transform["translate"])
        self.viewer.scene.camera.center = tuple(translate + scale * np.asarray(t.cell))
        notify_info(f"opened {t.path.name} with neuron {neuron}")
        return [*layers, overlay]
