"""Render the labelling dock in study mode (README "Running a reading study").

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python scripts/screenshot_study.py

A throw-away SQLite study (40 neurons, readers ann and bob) in a temporary folder: ann has given
11 verdicts and gives the 12th on screen, then steps back to it ([): the dock shows her queue
position, "saved", and now colleagues' verdicts on that neuron. A phantom
exam is in the viewer so the dock is seen where a reader uses it. Writes
docs/images/labelling_study.png.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAE = "3f" * 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "images" / "labelling_study.png"
    )
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mammo-sae-study-shot-"))
    os.environ["XDG_CONFIG_HOME"] = str(tmp / "config")  # none of the user's settings
    os.environ["XDG_DATA_HOME"] = str(tmp / "data")

    import napari
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    import napari_mammo_sae._napari  # noqa: F401 - triton guard first
    from napari_mammo_sae._napari.sample_phantom import phantom_exam_sample
    from napari_mammo_sae._napari.widgets.labelling import LabellingWidget
    from napari_mammo_sae.labels import LabelStore
    from napari_mammo_sae.labels.study import choose_neurons, create_study

    db = tmp / "study.sqlite"
    with LabelStore(db) as store:
        top = {1: [213, 87, 402, 19, 355, 140, 61, 298, 477, 12], 0: [501, 33, 260, 118, 444]}
        design = create_study(
            store, "calc-pilot", sae_hash=SAE, concept="calcification",
            neurons=choose_neurons(top=top, controls=25, n_latents=512, seed=1),
            readers=["ann", "bob"], seed=1,
        )  # fmt: skip

        def verdict(n, reader):  # two readers who mostly agree: top class-1 neurons clinical
            if n in top[1]:
                return "unsure" if (reader == "bob" and n == 87) else "clinical"
            return (
                "spurious"
                if n % 3 == 0
                else "unsure"
                if n % 3 == 1 or reader == "bob"
                else "clinical"
            )

        for n in design.order("ann")[:11]:
            store.add(SAE, n, verdict(n, "ann"), "ann", study="calc-pilot")
        for n in design.order("bob")[:30]:
            store.add(SAE, n, verdict(n, "bob"), "bob", study="calc-pilot")

    viewer = napari.Viewer(title="napari-mammo-sae: reading study", show=True)
    viewer.window._qt_window.resize(1500, 950)
    for data, kwargs, kind in phantom_exam_sample():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    w = LabellingWidget(viewer)
    viewer.window.add_dock_widget(w, name="Neuron labelling", area="right")
    w.db_path.value = str(db)
    w._db_changed()
    w.rater.value = "ann"
    w.open_study("calc-pilot")

    def settle(cond=lambda: True, timeout=30.0):
        t0 = time.time()
        while (w.busy() or not cond()) and time.time() - t0 < timeout:
            QApplication.processEvents()
            time.sleep(0.02)
        for _ in range(10):
            QApplication.processEvents()

    settle(lambda: w.reader is not None)
    w.note.value = "fine linear cluster, upper outer quadrant"
    w.record("clinical")  # the 12th
    settle()
    w.step(-1)  # back to it: now that ann has given hers, bob's verdict on it shows
    settle()
    viewer.reset_view()
    settle()
    shot = Image.fromarray(viewer.screenshot(canvas_only=False, flash=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shot.save(args.out, optimize=True)
    print("wrote", args.out, shot.size, "|", w.progress.value, "|", w.saved.text())
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
