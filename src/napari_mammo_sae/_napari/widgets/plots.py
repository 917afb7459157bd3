"""Plots dock: class-wise mean latent vectors (the paper's Figure 4) and AUROC versus k (Figure 2).

The class means come from the probe file of the explorer's SAE (``napari-mammo-sae probe``); the
AUROC-versus-k curves from an evaluation report folder (``napari-mammo-sae evaluate``), chosen by
path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ._common import get_session, load_settings, save_settings


class PlotsWidget(QWidget):
    """Dock widget with a matplotlib canvas: Figure 4 and Figure 2 analogues."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.report = QLineEdit(load_settings().get("report_dir", ""))
        self.report.setPlaceholderText("evaluation report folder (optional)")
        browse = QPushButton("...")
        browse.setMaximumWidth(28)
        redraw = QPushButton("redraw")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.figure = Figure(figsize=(4, 5), facecolor="white")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(380)
        row = QHBoxLayout()
        row.addWidget(self.report)
        row.addWidget(browse)
        row.addWidget(redraw)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.status)
        layout.addWidget(self.canvas)
        browse.clicked.connect(self._browse)
        redraw.clicked.connect(self.draw)
        self.session.analysis_changed.connect(lambda _s: self.draw())
        self.draw()

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Evaluation report folder")
        if path:
            self.report.setText(path)
            save_settings(report_dir=path)
            self.draw()

    def figure2_rows(self) -> list[dict]:
        """Figure-2 rows of the report for the session's concept and variant."""
        folder = Path(self.report.text().strip()) if self.report.text().strip() else None
        if folder is None or not (folder / "results.json").exists():
            return []
        try:
            results = json.loads((folder / "results.json").read_text())
        except (OSError, ValueError):
            return []
        s = self.session
        return [
            r
            for r in results.get("figure2", [])
            if r["concept"] == s.concept and r["variant"] == s.variant
        ]

    def draw(self) -> dict:
        """Redraw; returns what was drawn (for tests): {'means': n_lines, 'marked': n, 'curves': n}."""
        s = self.session
        self.figure.clear()
        drawn = {"means": 0, "marked": 0, "curves": 0}
        rows = self.figure2_rows()
        n_axes = 1 + bool(rows)
        ax = self.figure.add_subplot(n_axes, 1, 1)
        probe = s.probe
        if probe is not None:
            means = np.asarray(probe.class_means)
            x = np.arange(means.shape[1])
            ax.plot(
                x,
                means[0],
                color="#1f77b4",
                lw=0.8,
                label=f"class 0 (n={int(probe.class_counts[0])})",
            )
            ax.plot(
                x,
                means[1],
                color="#d62728",
                lw=0.8,
                label=f"class 1 (n={int(probe.class_counts[1])})",
            )
            drawn["means"] = 2
            top = probe.top(1, "class_mean", 10)
            ax.scatter(top, means[1][top], color="#d62728", s=14, zorder=3)
            for n in top[:5]:
                ax.annotate(
                    str(n), (n, means[1][n]), fontsize=7, xytext=(2, 2), textcoords="offset points"
                )
            drawn["marked"] = len(top)
            ax.set_title(f"class-wise mean latents ({probe.concept}, training split)", fontsize=9)
            ax.set_xlabel("SAE neuron", fontsize=8)
            ax.set_ylabel("mean activation", fontsize=8)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "run the explorer with a probed SAE\nto see class-wise means",
                    ha="center", va="center", fontsize=9, transform=ax.transAxes)  # fmt: skip
            ax.set_axis_off()
        if rows:
            ax2 = self.figure.add_subplot(2, 1, 2)
            for r in rows:
                ks = [len(r["k"]) - 1 if k == "all" else i for i, k in enumerate(r["k"])]
                ax2.plot(ks, r["auroc"], marker="o", ms=3,
                         label=f"top-k {r['mode']}", color="#2ca02c" if r["mode"] == "activated" else "#9467bd")  # fmt: skip
                drawn["curves"] += 1
            ax2.set_xticks(range(len(rows[0]["k"])))
            ax2.set_xticklabels([str(k) for k in rows[0]["k"]], rotation=60, fontsize=6)
            ax2.axhline(0.5, color="grey", lw=0.6, ls=":")
            ax2.set_ylabel("test AUROC", fontsize=8)
            ax2.set_title(f"AUROC vs k ({s.variant} {s.concept})", fontsize=9)
            ax2.legend(fontsize=7)
        self.figure.tight_layout()
        self.canvas.draw_idle()
        self.status.setText("" if probe is not None else "no probe result loaded")
        return drawn
