"""Which SAE neurons fire on a planted cue, and where they rank for the concept.

For every image of a feature store that carries the cue (``--cue``: the phantom's marker by
default, or any cue its phantom.json lists - lead, clip, site), the SAE latents of the cells under
the cue box are averaged and compared with the image's other cells; the neurons with the largest
on-cue minus off-cue mean are listed with their rank among the class-1 neurons of the probe (class
mean, the paper's equation 2), with their mean on the cells under the annotated boxes of the
concept (``--concept``, same split), and with their cue share (the shortcut report's rule,
``analysis.shortcuts``, here over the images with the cue or the concept): a neuron that fires as
strongly on the findings as on the cue has the shortcut folded into the concept. Works at any
layer: the store's cells are its hook point's grid.

    .venv/bin/python scripts/cue_neurons.py --store build/recipe/stores/finetuned-calcification.h5 \\
        --sae weights/sae-finetuned-calcification --probe weights/probes/calcification.npz \\
        --data build/recipe/phantom [--cue clip] [--concept calcification]
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
    ap.add_argument("--cue", default="marker", help="marker (default), lead, clip or site")
    ap.add_argument("--concept", default="calcification", choices=("calcification", "mass"))
    args = ap.parse_args(argv)

    import torch

    from napari_mammo_sae.analysis.shortcuts import SHARE_THRESHOLD
    from napari_mammo_sae.annotations import concept_category
    from napari_mammo_sae.models.folders import load_sae
    from napari_mammo_sae.phantom.cues import load_cue_boxes
    from napari_mammo_sae.pipeline.probe import load_probe, open_view

    view = open_view(args.store)
    sae = load_sae(args.sae).float()
    probe = load_probe(args.probe)
    boxes = load_cue_boxes(args.data)
    if args.cue not in boxes:
        print(
            f"{args.data} carries no cue {args.cue!r} (it has: {', '.join(boxes)})", file=sys.stderr
        )
        return 1
    cues = boxes[args.cue]
    category = concept_category(args.concept)
    calcs: dict[str, list[tuple[float, ...]]] = {}
    with open(args.data / "finding_annotations.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if category in r["finding_categories"]:
                box = tuple(float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
                calcs.setdefault(r["image_id"], []).append(box)
    on = off = None
    calc_sum, n, n_calc = None, 0, 0
    mass_on = mass_all = None  # the report's cue share
    for row, image_id in enumerate(view.index.image_id):
        if image_id not in cues and image_id not in calcs:
            continue
        if args.split and view.index.split[row] != args.split:
            continue
        f = torch.from_numpy(np.asarray(view.feature_map(row), np.float32))
        c, h, w = f.shape
        with torch.inference_mode():
            z = sae.encode(f.reshape(c, -1).T).numpy()
        g = view.geometry(row)
        if image_id in calcs:
            cmask = np.zeros((h, w), bool)
            for box in calcs[image_id]:
                cmask |= _cells(g, box, h, w)
            cmask = cmask.reshape(-1)
            if cmask.any():
                a = z[cmask].mean(0)
                calc_sum = a if calc_sum is None else calc_sum + a
                n_calc += 1
        total = z.sum(0)
        mass_all = total if mass_all is None else mass_all + total
        if image_id not in cues:
            continue
        mask = np.zeros((h, w), bool)
        for box in cues[image_id]:
            mask |= _cells(g, box, h, w)
        mask = mask.reshape(-1)
        mass_on = z[mask].sum(0) if mass_on is None else mass_on + z[mask].sum(0)
        a, b = z[mask].mean(0), z[~mask].mean(0)
        on, off = (a, b) if on is None else (on + a, off + b)
        n += 1
    if n == 0:
        print(f"no image of the store carries the {args.cue}", file=sys.stderr)
        return 1
    share = np.divide(mass_on, mass_all, out=np.zeros_like(mass_on), where=mass_all > 0)
    on, off = on / n, off / n
    on_calc = calc_sum / n_calc if n_calc else np.full_like(on, np.nan)
    rank = np.empty(len(on), int)
    rank[np.argsort(-np.asarray(probe.class_means)[1], kind="stable")] = np.arange(1, len(on) + 1)
    print(
        f"{n} images with the {args.cue}, {n_calc} with annotated {args.concept} boxes; neurons by "
        f"on-{args.cue} minus off-{args.cue} mean activation; cue share as the report's rule "
        f"(> {SHARE_THRESHOLD} makes a cue neuron), over the images with the cue or the concept"
    )
    print(
        f"| neuron | mean on the {args.cue} cells | mean elsewhere | ratio | mean on the "
        f"{args.concept} cells | cue share | class-1 rank (class mean) |"
    )
    print("|---|---|---|---|---|---|---|")
    for j in np.argsort(-(on - off))[: args.top]:
        ratio = on[j] / off[j] if off[j] > 0 else float("inf")
        print(
            f"| {j} | {on[j]:.3f} | {off[j]:.3f} | {ratio:.1f} | {on_calc[j]:.3f} | "
            f"{share[j]:.2f} | {rank[j]} |"
        )
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
