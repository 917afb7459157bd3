"""Neuron gallery: where the current neuron fires most across a probed dataset, as a grid of crops.

A neuron is judged on many images, not one. ``napari-mammo-sae probe`` stores each neuron's
top-activating images and cells; given the dataset folder (VinDr layout) the gallery reads those
images, runs the same model (cached), and draws a crop around the strongest cell with the neuron's
heatmap over it. Loading happens in a worker thread; click a crop to open that image in the viewer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._common import get_session, load_settings, notify_error, save_settings


def find_image(data_dir: Path, image_id: str) -> Path | None:
    """images/<study>/<image_id>.dicom (or .dcm) under a VinDr-layout folder."""
    for suffix in (".dicom", ".dcm"):
        hits = list((data_dir / "images").glob(f"*/{image_id}{suffix}"))
        if hits:
            return hits[0]
    return None


def gallery_tiles(neuron: int, probe: Any, analyzer: Any, data_dir: Path, n: int) -> list[dict]:
    """Worker body (no Qt): crops of the neuron's top images with its heatmap (up to n)."""
    from ...analysis.localisation import upsample_heatmap
    from ...dicom import read_mammogram
    from ...errors import MammoSAEError

    tiles = []
    for top in probe.top_images.get(int(neuron), [])[:n]:
        path = find_image(data_dir, top.image_id)
        if path is None:
            continue
        try:
            record = read_mammogram(path)
            analysis = analyzer.analyse(record)
        except MammoSAEError:  # an unreadable file is skipped, the others still show
            continue
        heat = analysis.latent_maps([int(neuron)])[0]
        g = analysis.geometry
        i, j = top.cell
        r0, c0, r1, c1 = g.feature_cell_box(analysis.grid, i, j)
        h, w = r1 - r0, c1 - c0
        y0, y1 = int(max(0, r0 - 2 * h)), int(min(record.shape[0], r1 + 2 * h))
        x0, x1 = int(max(0, c0 - 2 * w)), int(min(record.shape[1], c1 + 2 * w))
        crop = record.display_pixels()[y0:y1, x0:x1]
        # the heatmap over the whole crop box, resampled only for this small thumbnail
        cr0, cc0, cr1, cc1 = g.crop_box
        full = upsample_heatmap(heat, (max(1, int(cr1 - cr0)), max(1, int(cc1 - cc0))))
        canvas = np.zeros(record.shape, dtype=np.float32)
        canvas[int(cr0) : int(cr0) + full.shape[0], int(cc0) : int(cc0) + full.shape[1]] = full[
            : record.shape[0] - int(cr0), : record.shape[1] - int(cc0)
        ]
        tiles.append({
            "path": path, "image_id": top.image_id, "activation": top.activation,
            "crop": crop, "heat": canvas[y0:y1, x0:x1], "limits": record.display_limits(),
            "cell": (r0 - y0, c0 - x0, h, w), "split": top.split,
        })  # fmt: skip
    return tiles


class NeuronGallery(QWidget):
    """Dock widget: the current neuron's top-activating crops across a probed dataset."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.data_dir = QLineEdit(load_settings().get("gallery_data", ""))
        self.data_dir.setPlaceholderText("dataset folder (VinDr layout) the probe was made on")
        browse = QPushButton("...")
        browse.setMaximumWidth(28)
        self.count = QSpinBox()
        self.count.setRange(1, 16)
        self.count.setValue(8)
        self.show_button = QPushButton("show gallery")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.figure = Figure(figsize=(4, 4), facecolor="#262930")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(320)
        row = QHBoxLayout()
        row.addWidget(self.data_dir)
        row.addWidget(browse)
        controls = QHBoxLayout()
        controls.addWidget(QLabel("crops"))
        controls.addWidget(self.count)
        controls.addWidget(self.show_button)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addLayout(controls)
        layout.addWidget(self.status)
        layout.addWidget(self.canvas)
        self.tiles: list[dict] = []
        self.worker = None
        browse.clicked.connect(self._browse)
        self.show_button.clicked.connect(self.load)
        self.session.neuron_changed.connect(lambda _n: self.load() if self.isVisible() else None)
        self.canvas.mpl_connect("button_press_event", self._clicked)

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Dataset folder")
        if path:
            self.data_dir.setText(path)

    def load(self) -> Any:
        """Load the current neuron's tiles in a worker; returns the worker (None when refused)."""
        from napari.qt.threading import create_worker

        s = self.session
        if s.neuron is None or s.models is None:
            self.status.setText("run the neuron explorer and pick a neuron first")
            return None
        if s.probe is None:
            self.status.setText("no probe file for this SAE: run `napari-mammo-sae probe`")
            return None
        data = Path(self.data_dir.text().strip())
        if not (data / "images").is_dir():
            self.status.setText("choose the dataset folder (it holds images/<study>/<image>.dicom)")
            return None
        save_settings(gallery_data=str(data))
        neuron = s.neuron
        self.status.setText(f"loading neuron {neuron}...")
        self.worker = create_worker(
            gallery_tiles, neuron, s.probe, s.models.analyzer, data, self.count.value(),
            _progress={"desc": "neuron gallery"},
        )  # fmt: skip
        self.worker.returned.connect(lambda tiles, n=neuron: self._draw(n, tiles))
        self.worker.errored.connect(lambda exc: notify_error(f"gallery: {exc}"))
        self.worker.start()
        return self.worker

    def _draw(self, neuron: int, tiles: list[dict]) -> None:
        import matplotlib.patches as patches

        self.tiles = tiles
        self.figure.clear()
        if not tiles:
            self.status.setText(f"neuron {neuron}: no top images found in this folder")
            self.canvas.draw_idle()
            return
        cols = 4 if len(tiles) > 4 else len(tiles)
        rows = int(np.ceil(len(tiles) / cols))
        vmax = max(float(t["heat"].max()) for t in tiles) or 1.0
        for k, t in enumerate(tiles):
            ax = self.figure.add_subplot(rows, cols, k + 1)
            lo, hi = t["limits"]
            ax.imshow(t["crop"], cmap="gray", vmin=lo, vmax=hi)
            ax.imshow(
                np.ma.masked_less_equal(t["heat"], 0), cmap="inferno", alpha=0.45, vmin=0, vmax=vmax
            )
            r, c, h, w = t["cell"]
            ax.add_patch(patches.Rectangle((c, r), w, h, fill=False, ec="#00e5ff", lw=0.8))
            ax.set_title(f"{t['activation']:.2f} · {t['split']}", color="white", fontsize=7)
            ax.set_axis_off()
            ax._gallery_index = k
        self.figure.suptitle(f"neuron {neuron}: top-activating images", color="white", fontsize=9)
        self.figure.tight_layout()
        self.canvas.draw_idle()
        self.status.setText(f"neuron {neuron}: {len(tiles)} images (click one to open it)")

    def _clicked(self, event: Any) -> None:
        k = getattr(event.inaxes, "_gallery_index", None)
        if k is not None and k < len(self.tiles):
            self.viewer.open(str(self.tiles[k]["path"]), plugin="napari-mammo-sae")
