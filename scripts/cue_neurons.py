"""Which SAE neurons fire on the planted marker, and where they rank for the concept.

For every image of a feature store that carries the phantom's marker (confounder_annotations.csv),
the SAE latents of the cells under the marker box are averaged and compared with the image's other
cells; the neurons with the largest on-marker minus off-marker mean are listed with their rank among
the class-1 neurons of the probe (class mean, the paper's equation 2), and with their mean on the
cells under the annotated suspicious-calcification boxes (same split): a neuron that fires as
strongly on the calcifications as on the marker has the shortcut folded into the concept.

    .venv/bin/python scripts/cue_neurons.py --store build/recipe/stores/finetuned-calcification.h5 \\
        --sae weights/sae-finetuned-calcification --probe weights/probes/calcification.npz \\
        --data build/recipe/phantom
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--sae", type=Path, required=True)
    ap.add_argument("--probe", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="the phantom dataset folder")
    ap.add_argument("--split", default=None, help="only this split (default: all images)")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)

    import torch

    from napari_mammo_sae.models.folders import load_sae
    from napari_mammo_sae.pipeline.dataset import geometry_from_json
    from napari_mammo_sae.pipeline.probe import load_probe, open_view

    view = open_view(args.store)
    sae = load_sae(args.sae).float()
    probe = load_probe(args.probe)
    cues = {}
    with open(args.data / "confounder_annotations.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            cues[r["image_id"]] = tuple(float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
    calcs: dict[str, list[tuple[float, ...]]] = {}
    with open(args.data / "finding_annotations.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if "Suspicious Calcification" in r["finding_categories"]:
                box = tuple(float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
                calcs.setdefault(r["image_id"], []).append(box)
    on = off = None
    calc_sum, n, n_calc = None, 0, 0
    for row, image_id in enumerate(view.index.image_id):
        if image_id not in cues and image_id not in calcs:
            continue
        if args.split and view.index.split[row] != args.split:
            continue
        f = torch.from_numpy(np.asarray(view.feature_map(row), np.float32))
        c, h, w = f.shape
        with torch.inference_mode():
            z = sae.encode(f.reshape(c, -1).T).numpy()
        g = geometry_from_json(view.index.geometry[row])
        if image_id in calcs:
            cmask = np.zeros((h, w), bool)
            for box in calcs[image_id]:
                cmask |= _cells(g, box, h, w)
            cmask = cmask.reshape(-1)
            if cmask.any():
                a = z[cmask].mean(0)
                calc_sum = a if calc_sum is None else calc_sum + a
                n_calc += 1
        if image_id not in cues:
            continue
        mask = _cells(g, cues[image_id], h, w).reshape(-1)
        a, b = z[mask].mean(0), z[~mask].mean(0)
        on, off = (a, b) if on is None else (on + a, off + b)
        n += 1
    if n == 0:
        print("no image of the store carries the marker", file=sys.stderr)
        return 1
    on, off = on / n, off / n
    on_calc = calc_sum / n_calc if n_calc else np.full_like(on, np.nan)
    rank = np.empty(len(on), int)
    rank[np.argsort(-np.asarray(probe.class_means)[1], kind="stable")] = np.arange(1, len(on) + 1)
    print(
        f"{n} images with the marker, {n_calc} with annotated calcifications; neurons by on-marker "
        "minus off-marker mean activation"
    )
    print(
        "| neuron | mean on the marker cells | mean elsewhere | ratio | mean on the calcification "
        "cells | class-1 rank (class mean) |"
    )
    print("|---|---|---|---|---|---|")
    for j in np.argsort(-(on - off))[: args.top]:
        ratio = on[j] / off[j] if off[j] > 0 else float("inf")
        print(f"| {j} | {on[j]:.3f} | {off[j]:.3f} | {ratio:.1f} | {on_calc[j]:.3f} | {rank[j]} |")
    return 0


def _cells(g, box: tuple[float, ...], h: int, w: int) -> np.ndarray:
    """The (h, w) feature cells a box in original pixels (xmin, ymin, xmax, ymax) touches."""
    x0, y0, x1, y1 = box
    p = g.original_to_input(np.array([[y0, x0], [y1, x1]]))
    ch, cw = g.input_shape[0] / h, g.input_shape[1] / w
    mask = np.zeros((h, w), bool)
    r0, r1 = max(int(p[0, 0] // ch), 0), min(int(p[1, 0] // ch), h - 1)
    c0, c1 = max(int(p[0, 1] // cw), 0), min(int(p[1, 1] // cw), w - 1)
    mask[r0 : r1 + 1, c0 : c1 + 1] = True
    return mask


if __name__ == "__main__":
    sys.exit(main())
