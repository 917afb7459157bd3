"""Render a phantom exam and the review widgets in napari and save screenshots to docs/images/.

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python scripts/screenshots.py [--weights weights]

Uses the bundled demo weights (``weights/``): the finetuned calcification model and the SAE, with
the probe file for rankings and the gallery; the gallery reads images from the recipe's phantom
dataset when it is there (``build/recipe/phantom``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "weights")
    parser.add_argument("--data", type=Path, default=ROOT / "build" / "recipe" / "phantom")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--concept", default="calcification")
    args = parser.parse_args(argv)

    # the widgets remember paths between runs: screenshots start from none of the user's settings
    import os
    import tempfile
    import time

    os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="mammo-sae-screenshots-")

    import napari
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    import napari_mammo_sae._napari  # noqa: F401 - triton guard first
    from napari_mammo_sae._napari.model_choice import Ranking, Source
    from napari_mammo_sae._napari.sample_phantom import phantom_exam_sample
    from napari_mammo_sae._napari.widgets.explorer import NeuronExplorer
    from napari_mammo_sae._napari.widgets.gallery import NeuronGallery
    from napari_mammo_sae._napari.widgets.intervention import InterventionWidget, Mode
    from napari_mammo_sae._napari.widgets.labelling import LabellingWidget
    from napari_mammo_sae._napari.widgets.plots import PlotsWidget

    args.out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-mammo-sae: review", show=True)
    viewer.window._qt_window.resize(1900, 1150)
    for data, kwargs, kind in phantom_exam_sample():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    # the exam alone (README, phantom section): findings and the planted marker
    viewer.reset_view()
    for _ in range(10):
        QApplication.processEvents()
    exam = Image.fromarray(viewer.screenshot(canvas_only=True, flash=False))
    exam.thumbnail((1000, 1200))
    exam.save(args.out / "phantom_exam.png", optimize=True)
    print("wrote", args.out / "phantom_exam.png")
    explorer = NeuronExplorer(viewer)
    intervention = InterventionWidget(viewer)
    labelling = LabellingWidget(viewer)
    viewer.window.add_dock_widget(explorer, name="Neuron explorer", area="right")
    viewer.window.add_dock_widget(intervention, name="Interventions", area="right", tabify=True)
    viewer.window.add_dock_widget(labelling, name="Neuron labelling", area="right", tabify=True)
    explorer.source.value = Source.files
    w = args.weights
    explorer.classifier_path.value = w / f"finetuned-{args.concept}"
    explorer.sae_path.value = w / "sae-finetuned-calcification"
    probe = w / "probes" / f"{args.concept}.npz"
    explorer.probe_path.value = probe if probe.exists() else None
    explorer.ranking.value = Ranking.class_mean if probe.exists() else Ranking.logit
    explorer.all_views.value = True
    status = explorer.run_blocking()
    print("explorer:", status, explorer.status.value)
    if explorer.last_error:
        print("error:", explorer.last_error)
        return 1
    # focus the view that holds a calcification finding, zoom to it
    s = explorer.session
    best = max(s.results.values(), key=lambda r: (len(r.annotations), r.analysis.probability))
    explorer.show_view(best.layer_name)
    viewer.reset_view()
    viewer.layers.selection.active = viewer.layers[best.layer_name]
    dock = viewer.window._dock_widgets.get("Neuron explorer")
    if dock is not None:
        dock.raise_()
    for _ in range(20):
        QApplication.processEvents()

    def save(name: str) -> None:
        path = args.out / name
        img = viewer.screenshot(canvas_only=False, flash=False)
        im = Image.fromarray(img)
        if im.width > 1600:
            im = im.resize((1600, int(im.height * 1600 / im.width)))
        im.save(path, optimize=True)
        print("wrote", path)

    save("review_explorer.png")
    magnifier_shot(viewer, best, save)
    intervention.mode.value = Mode.topk_remove
    intervention.k.value = 10
    cam = f"{best.layer_name} · CAM (intervened)"
    for _ in range(200):  # the CAM layer is added over a few event-loop turns
        if cam in viewer.layers:
            break
        QApplication.processEvents()
        time.sleep(0.01)
    if cam in viewer.layers:
        viewer.layers[cam].visible = True
    for lay in viewer.layers:
        if "mammo_sae" in lay.metadata:
            lay.visible = False
    dock = viewer.window._dock_widgets.get("Interventions")
    if dock is not None:
        dock.raise_()
    for _ in range(20):
        QApplication.processEvents()
    save("review_intervention.png")
    if cam in viewer.layers:
        viewer.layers[cam].visible = False
    s.set_neuron(int(best.neurons[0]))

    plots = PlotsWidget(viewer)
    report = ROOT / "docs" / "evaluation"
    if report.exists():
        plots.report.value = report
    plots.draw()
    gallery = NeuronGallery(viewer)
    gallery.data_dir.value = args.data
    viewer.window.add_dock_widget(plots, name="Plots", area="left")
    viewer.window.add_dock_widget(gallery, name="Neuron gallery", area="left", tabify=True)
    # the docks' forms scroll when squeezed: room for the figures, as a reader drags the splitter
    from qtpy.QtCore import Qt

    qt_viewer = viewer.window._qt_viewer
    left = [qt_viewer.dockLayerControls, qt_viewer.dockLayerList,
            viewer.window._dock_widgets["Plots"]]  # fmt: skip
    viewer.window._qt_window.resizeDocks(left, [300, 150, 600], Qt.Orientation.Vertical)
    if hasattr(labelling.rater, "setText"):  # a Qt line edit, or a magicgui one
        labelling.rater.value = "demo"
    else:
        labelling.rater.value = "demo"
    dock = viewer.window._dock_widgets.get("Neuron labelling")
    if dock is not None:
        dock.raise_()
    worker = gallery.load()
    if worker is not None:
        t0 = time.time()
        while not gallery.tiles and time.time() - t0 < 300:
            QApplication.processEvents()
            time.sleep(0.05)
    for _ in range(20):
        QApplication.processEvents()
    if gallery.tiles:
        save("review_gallery_labelling.png")
    else:  # keep the committed one rather than replace it with an empty grid
        print(f"gallery: no tiles ({gallery.status.value}); review_gallery_labelling.png kept")
    dock = viewer.window._dock_widgets.get("Plots")
    if dock is not None:
        dock.raise_()
    for _ in range(20):
        QApplication.processEvents()
    save("review_plots.png")
    viewer.close()
    return 0


def magnifier_shot(viewer, best, save) -> None:
    """The view with the calcification finding large (F-key), its top neuron shown, and the
    magnifier over the finding's cluster: ``magnifier_calcification.png``."""
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_mammo_sae._napari.viewing import install

    ws = install(viewer)
    ws.show_view(best.layer_name)
    box = best.annotations[0] if best.annotations else None
    if box is None:
        print("no finding box on", best.layer_name, "- magnifier screenshot skipped")
        ws.show_hanging()
        return
    x0, y0, x1, y1 = box
    centre = best.placement.edge_to_world(np.array([[(y0 + y1) / 2, (x0 + x1) / 2]]))[0]
    ws.toggle_magnifier()
    ws.magnify(centre)
    viewer.status = (
        f"{best.layer_name}: magnifier x{ws.magnification:g} over the calcification cluster"
    )
    for _ in range(20):
        QApplication.processEvents()
    save("magnifier_calcification.png")
    ws.toggle_magnifier()
    ws.show_hanging()
    viewer.reset_view()


if __name__ == "__main__":
    sys.exit(main())
