"""Plots dock: class-wise mean latent vectors (the paper's Figure 4) and AUROC versus k (Figure 2).

The class means come from a probe file (``napari-mammo-sae probe``): the explorer's, or one chosen
by path; without one, from the ``figure4_*.csv`` of an evaluation report. The AUROC-versus-k curves
come from an evaluation report folder (``napari-mammo-sae evaluate``: ``results.json``), chosen by
path. The explorer's current neuron is marked on the class means. The controls are magicgui
widgets; the plots are a matplotlib canvas.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton

from ._common import (
    ScrollingForm,
    figure_canvas,
    get_session,
    load_settings,
    notify_error,
    on_show,
    path_edit,
    path_text,
    save_settings,
)

POSITIVE, NEGATIVE = "#d62728", "#1f77b4"
N_MARKED, N_LABELLED = 10, 5


def read_report(folder: str | Path | None) -> dict:
    """results.json of an evaluation report folder ({} when there is none or it is unreadable)."""
    try:
        return json.loads((Path(folder) / "results.json").read_text()) if folder else {}
    except (OSError, ValueError):
        return {}


def report_class_means(folder: Path, variant: str, concept: str) -> np.ndarray | None:
    """(2, m) class means from a report's figure4_<variant>_<concept>.csv (None when absent)."""
    matches = [p for p in folder.glob("figure4_*.csv") if variant in p.stem and concept in p.stem]
    if not matches:
        return None
    try:
        with open(matches[0], newline="") as fh:
            rows = list(csv.DictReader(fh))
        return np.array([[float(r[k]) for r in rows] for k in ("mean_negative", "mean_positive")])
    except (OSError, KeyError, ValueError):
        return None


def style(ax: Any, title: str, xlabel: str, ylabel: str, ncol: int) -> None:
    """The dock's look: small type, the legend under the axes (``ncol`` columns), a light grid."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(
        fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=ncol, frameon=False
    )
    ax.grid(alpha=0.25)


class PlotsWidget(ScrollingForm, Container):
    """Dock widget with a matplotlib canvas: Figure 4 and Figure 2 analogues."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self._scrolling(300)  # in a short dock the form scrolls
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        settings = load_settings()
        self.probe_path = path_edit("probe", "r", settings.get("plots_probe"), filter="*.npz",
                                    tooltip="probe .npz (default: the explorer's)")  # fmt: skip
        self.report = path_edit("report", "d", settings.get("report_dir"),
                                tooltip="evaluation report folder (optional)")  # fmt: skip
        self._models: list[tuple[str, str]] = []  # (variant, concept) pairs of the report
        # choices from a callable: napari resets a docked widget's choices when layers change
        self.curves = ComboBox(label="curves", choices=self._curve_choices,
                               tooltip="which model's AUROC-vs-k curves to show")  # fmt: skip
        redraw = PushButton(text="redraw")
        self.status = Label(label="", value="")
        self.status.native.setWordWrap(True)
        self.extend([self.probe_path, self.report, self.curves, redraw, self.status])
        # constrained layout keeps the legends under the axes clear of the labels
        self.figure, self.canvas = figure_canvas(
            self, 520, figsize=(4.2, 6.0), facecolor="white", layout="constrained"
        )
        self._probe_cache: tuple[tuple, Any] | None = None
        self._current_line: Any = None
        self._means: np.ndarray | None = None
        self._stale = False  # something changed while the dock was hidden
        for control in (redraw, self.report, self.probe_path, self.curves):
            control.changed.connect(self.draw)
        self.session.analysis_changed.connect(self._analysis_changed)
        self.session.neuron_changed.connect(self._neuron_changed)
        on_show(self.native, self._shown)
        self.draw()

    def _analysis_changed(self, _session: Any = None) -> None:
        # a matplotlib redraw costs the GUI thread 0.1-0.3 s: only when the dock can be seen
        self._stale = True
        if self.native.isVisible():
            self._shown()

    def _shown(self) -> None:
        """Draw what changed while the dock was hidden (a tab behind another, or closed)."""
        if self._stale:
            self._stale = False
            self.draw()

    # --- data -----------------------------------------------------------------------------------
    def probe(self) -> Any:
        """The probe result: the file chosen here, else the explorer's (None when neither)."""
        text = path_text(self.probe_path)
        if not text:
            return self.session.probe
        from ...pipeline.probe import load_probe

        path = Path(text)
        key = (str(path), path.stat().st_mtime if path.exists() else None)
        if self._probe_cache is None or self._probe_cache[0] != key:
            self._probe_cache = (key, load_probe(path))
        return self._probe_cache[1]

    def _curve_choices(self, _widget: Any = None) -> list[tuple[str, tuple[str, str]]]:
        return [(f"{v} · {c}", (v, c)) for v, c in self._models]

    def figure2_rows(self) -> list[dict]:
        """Figure-2 rows of the report for the chosen model (variant, concept)."""
        rows = read_report(path_text(self.report)).get("figure2", [])
        models = sorted({(r["variant"], r["concept"]) for r in rows})
        chosen, self._models = self.curves.value, models
        if chosen not in models and models:
            wanted = (self.session.variant, self.session.concept)
            chosen = wanted if wanted in models else models[0]
        with self.curves.changed.blocked():
            self.curves.reset_choices()
            if models:
                self.curves.value = chosen
        return [r for r in rows if (r["variant"], r["concept"]) == chosen]

    # --- drawing --------------------------------------------------------------------------------
    def draw(self, *_: Any) -> dict:
        """Redraw; returns what was drawn: {'means': lines, 'marked': top neurons, 'curves': n}."""
        try:
            return self._draw()
        except Exception as exc:  # noqa: BLE001 - a bad file must not break the dock
            self.figure.clear()
            self.canvas.draw()  # synchronous: no deferred draw can outlive a closed viewer
            self.status.value = f"cannot draw: {exc}"
            notify_error(f"plots: {exc}")
            return {"means": 0, "marked": 0, "curves": 0}

    def _draw(self) -> dict:
        s = self.session
        report = path_text(self.report)
        save_settings(report_dir=report, plots_probe=path_text(self.probe_path))
        self.figure.clear()
        self._current_line = None
        drawn = {"means": 0, "marked": 0, "curves": 0}
        rows = self.figure2_rows()
        ax = self.figure.add_subplot(2 if rows else 1, 1, 1)
        probe = self.probe()
        means, counts, title = None, None, ""
        if probe is not None:
            means, counts = np.asarray(probe.class_means), np.asarray(probe.class_counts)
            split = probe.meta.get("split", "training")
            title = f"class-wise mean latents\n{probe.concept} · {split} split"
        elif report:
            means = report_class_means(Path(report), s.variant, s.concept)
            title = f"class-wise mean latents\n{s.concept} · {s.variant} (report)"
        self._means = means
        notes = []
        if means is not None:
            drawn.update(self._draw_means(ax, means, counts, title))
        else:
            ax.text(0.5, 0.5, "no class means yet:\nrun the explorer with a probed SAE,\n"
                    "or choose a probe file or a report", ha="center", va="center", fontsize=9,
                    transform=ax.transAxes, color="#555")  # fmt: skip
            ax.set_axis_off()
            notes.append("no probe result loaded")
        if rows:
            drawn["curves"] = self._draw_curves(self.figure.add_subplot(2, 1, 2), rows)
        elif report:
            notes.append("the report folder has no AUROC-vs-k results (results.json figure2)")
        self.canvas.draw()  # synchronous: no deferred draw can outlive a closed viewer
        self.status.value = "; ".join(notes)
        return drawn

    def _draw_means(self, ax: Any, means: np.ndarray, counts: Any, title: str) -> dict:
        x = np.arange(means.shape[1])
        n0, n1 = [f" (n={int(c)})" for c in counts] if counts is not None else ["", ""]
        ax.plot(x, means[0], color=NEGATIVE, lw=0.7, label=f"class 0, negative{n0}")
        ax.plot(x, means[1], color=POSITIVE, lw=0.7, alpha=0.85, label=f"class 1, positive{n1}")
        top = [int(n) for n in np.argsort(-means[1], kind="stable")[:N_MARKED]]
        ax.scatter(top, means[1][top], marker="v", color=POSITIVE, s=18, zorder=3,
                   label=f"top-{len(top)} class-1 neurons")  # fmt: skip
        # labels left to right, alternately raised, so neighbouring neurons stay legible
        for k, n in enumerate(sorted(top[:N_LABELLED])):
            ax.annotate(str(n), (n, means[1][n]), fontsize=7, color=POSITIVE, ha="center",
                        xytext=(0, 5 + 8 * (k % 2)), textcoords="offset points")  # fmt: skip
        neuron = self.session.neuron
        self._current_line = ax.axvline(
            neuron if neuron is not None else 0, color="#333", lw=0.8, ls="--",
            label="current neuron", visible=neuron is not None and neuron < means.shape[1],
        )  # fmt: skip
        ax.margins(x=0.01, y=0.15)
        style(ax, title, "SAE neuron", "mean activation", ncol=2)
        return {"means": 2, "marked": len(top)}

    def _draw_curves(self, ax: Any, rows: list[dict]) -> int:
        """One AUROC-vs-k curve per row (with its confidence band); returns how many."""
        for r in rows:
            au = np.asarray(r["auroc"], dtype=float)
            # x: the size of the top-k union, else k as categories
            xs = np.asarray(r.get("union_size") or np.arange(len(r["k"])), dtype=float)
            activated = r["mode"] == "activated"
            (line,) = ax.plot(xs, au, "o-" if activated else "s--", ms=3, lw=1,
                              color="#2ca02c" if activated else "#9467bd",
                              label=f"top-k {r['mode']}")  # fmt: skip
            if cis := r.get("auroc_ci"):  # a bootstrap interval per k (None where undefined)
                lo, hi = np.array([c or (np.nan, np.nan) for c in cis], dtype=float).T
                ax.fill_between(xs, lo, hi, alpha=0.12, color=line.get_color(), lw=0)
        if rows[0].get("baseline") is not None:
            ax.axhline(rows[0]["baseline"], color="grey", lw=0.8, ls=":", label="all latents")
        if rows[0].get("union_size"):
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(0, max(float(np.nanmax(r["union_size"])) for r in rows) * 1.5)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            xlabel = "neurons in the top-k union"
        else:
            ax.set_xticks(range(len(rows[0]["k"])))
            ax.set_xticklabels([str(k) for k in rows[0]["k"]], fontsize=7)
            xlabel = "k"
        ax.axhline(0.5, color="k", lw=0.4)
        ax.set_ylim(0.0, 1.02)
        title = f"test AUROC vs k\n{rows[0]['variant']} · {rows[0]['concept']}"
        style(ax, title, xlabel, "test AUROC", ncol=3)
        return len(rows)

    def _neuron_changed(self, neuron: int) -> None:
        """Move the current-neuron marker (no full redraw)."""
        line = self._current_line
        if line is None or self._means is None:
            return
        line.set_xdata([neuron, neuron])
        line.set_visible(0 <= neuron < self._means.shape[1])
        if self.native.isVisible():
            self.canvas.draw()  # synchronous: no deferred draw can outlive a closed viewer
        else:
            self._stale = True
