"""Render the PACS dock (README "Working with a PACS").

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python scripts/screenshot_pacs.py

Starts a throw-away Orthanc with DICOMweb on a loopback port (as the tests do), stores two phantom
four-view studies with accession numbers, searches them in the dock and opens the first: the exam
is retrieved in the background and hung in the viewer. Writes docs/images/pacs_dock.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "pacs_dock.png")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mammo-sae-pacs-shot-"))
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        os.environ[name] = str(tmp / name.lower())  # none of the user's settings or cache

    import napari
    import pydicom
    from qtpy.QtWidgets import QApplication

    import napari_mammo_sae._napari  # noqa: F401 - triton guard first
    from napari_mammo_sae._napari.widgets.pacs import PacsDock
    from napari_mammo_sae.phantom.dataset import PhantomConfig, write_dataset

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_orthanc import start_orthanc, stop_orthanc

    (tmp / "orthanc").mkdir()
    server = start_orthanc(tmp / "orthanc")
    try:
        for i, (seed, date) in enumerate(((16, "20250314"), (7, "20240302"))):
            root = tmp / f"phantom{i}"
            write_dataset(PhantomConfig(studies=1, seed=seed, height=1400, width=1150,
                                        spacing_mm=0.2), root, workers=1)  # fmt: skip
            for p in sorted(root.rglob("*.dicom")):
                ds = pydicom.dcmread(p)
                ds.AccessionNumber = f"A{seed:04d}{i}"
                ds.StudyDate = date
                ds.save_as(p, enforce_file_format=True)
                server.upload(p)

        viewer = napari.Viewer(title="napari-mammo-sae: PACS", show=True)
        viewer.window._qt_window.resize(1500, 950)
        dock = PacsDock(viewer)
        viewer.window.add_dock_widget(dock, name="PACS", area="right")
        dock.url.value = server.dicomweb
        dock.date_from.value = "2024-01-01"

        def settle(cond, timeout=60.0):
            end = time.monotonic() + timeout
            while not cond() and time.monotonic() < end:
                QApplication.processEvents()
                time.sleep(0.02)
            for _ in range(20):
                QApplication.processEvents()
                time.sleep(0.02)

        dock.search()
        settle(lambda: dock.search_button.enabled and "with MG" in dock.status.value)
        dock.open_selected()
        settle(lambda: len(viewer.layers) == 4 and dock.open_button.enabled)
        settle(lambda: True, 1.0)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        viewer.window._qt_window.grab().save(str(args.out))
        print(f"wrote {args.out}")
        viewer.close()
    finally:
        stop_orthanc(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
