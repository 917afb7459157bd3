"""docs/images/phantom_cues.png: one phantom exam with every optional cue, the truth boxes drawn.

    .venv/bin/python scripts/phantom_cues_figure.py [--out docs/images/phantom_cues.png] [--seed 3]

Four views at medium size (1400 x 1150 at 0.2 mm) with the lead marker, the biopsy clip and the
site (processing + burned-in text) on every view, as ``--cue NAME:1,1,1`` would plant them; boxes:
lead red, clip green, site blue, the skin marker cyan, findings yellow. Each view is shown in its
own display window (the DICOM window the phantom writes), then scaled down.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {
    "lead": (255, 60, 60),
    "clip": (60, 220, 60),
    "site": (80, 140, 255),
    "marker": (0, 230, 255),
    "finding": (255, 210, 0),
}


def _frame(rgb: np.ndarray, box, colour, width: int = 3) -> None:
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0, x1, y1 = max(x0 - width, 0), max(y0 - width, 0), min(x1 + width, w), min(y1 + width, h)
    rgb[y0 : y0 + width, x0:x1] = colour
    rgb[y1 - width : y1, x0:x1] = colour
    rgb[y0:y1, x0 : x0 + width] = colour
    rgb[y0:y1, x1 - width : x1] = colour


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "phantom_cues.png")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)

    from PIL import Image

    from napari_mammo_sae.phantom import SIZES
    from napari_mammo_sae.phantom.cues import CueSpec
    from napari_mammo_sae.phantom.dataset import PhantomConfig, plan_dataset, render_image

    h, w, sp = SIZES["medium"]
    always = dict(pos_rate=1.0, neg_rate=1.0, test_rate=1.0)
    cfg = PhantomConfig(studies=1, seed=args.seed, height=h, width=w, spacing_mm=sp,
                        mass_rate=0.6, calc_rate=0.6, cue_pos_rate=1.0, cue_neg_rate=1.0,
                        cue_test_rate=1.0)  # fmt: skip
    cfg = replace(cfg, cues=tuple(CueSpec(n, **always) for n in ("lead", "clip", "site")))
    order = {("R", "CC"): 0, ("L", "CC"): 1, ("R", "MLO"): 2, ("L", "MLO"): 3}
    tiles = [None] * 4
    for plan in plan_dataset(cfg):
        out = render_image(plan, cfg)
        centre, width = out.window
        img = np.clip((out.pixels.astype(np.float32) - (centre - width / 2)) / width, 0, 1)
        rgb = np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2)
        for f in out.findings:
            _frame(rgb, f.box, COLOURS["finding"])
        if out.cue_box is not None:
            _frame(rgb, out.cue_box, COLOURS["marker"])
        for name, box in out.cue_boxes.items():
            _frame(rgb, box, COLOURS[name])
        tiles[order[(plan.laterality, plan.view)]] = rgb
    grid = np.concatenate(
        [np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0
    )
    image = Image.fromarray(grid).resize((grid.shape[1] // 2, grid.shape[0] // 2), Image.LANCZOS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256).save(args.out, optimize=True)  # a palette keeps the file small
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
