"""Where does a model's reliance on a planted cue live: in the neurons that stand for the cue, or
in the cue's place?

For the test images that carry the cue but not the concept (cue-only negatives) and for clean
negatives, the model's probability on its SAE reconstruction at the store's hook point (the rest
of the backbone re-run, as the shortcut report does) is computed

* as is;
* with the neurons whose cue share (``analysis.shortcuts.cue_shares``, over every neuron of the SAE,
  not only the top-k) exceeds ``--share`` switched off everywhere;
* with every latent zeroed on the cells a cue box touches, and on those cells dilated by one cell.

If switching the cue's own neurons off leaves the probability where it was while zeroing the
cue's cells brings it down to the clean level, the shortcut is local but spread over neurons that
also code other things: no neuron isolates it at this layer.

    .venv/bin/python scripts/cue_ablation.py --store build/recipe/stores/finetuned-calcification-stage3.h5 \\
        --sae weights/sae-finetuned-calcification-stage3 --head weights/finetuned-calcification \\
        --data build/recipe/phantom --cue clip
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True, help="feature store at a hook point")
    ap.add_argument("--sae", type=Path, required=True, help="the SAE trained on that store")
    ap.add_argument("--head", type=Path, required=True, help="the concept model of the store")
    ap.add_argument("--data", type=Path, required=True, help="the phantom dataset folder")
    ap.add_argument("--cue", required=True, help="marker, lead, clip or site")
    ap.add_argument("--share", type=float, default=0.5, help="cue-share threshold (the rule's)")
    ap.add_argument("--images", type=int, default=20, help="images per group")
    args = ap.parse_args(argv)

    import torch

    from napari_mammo_sae.analysis.shortcuts import cue_cells, cue_shares
    from napari_mammo_sae.models.backbone import rest_of_backbone
    from napari_mammo_sae.phantom.cues import load_cue_boxes
    from napari_mammo_sae.pipeline.shortcuts import open_run

    view, sae, model, concept = open_run(args.store, args.sae, args.head)
    hook = str(view.hook)
    boxes = load_cue_boxes(args.data)[args.cue]
    grid = tuple(int(v) for v in view.grid)
    labels = view.labels(concept)
    rows = [int(r) for r in view.rows("test") if labels[int(r)] >= 0]
    ids = {r: str(view.index.image_id[r]) for r in rows}
    masks = {r: cue_cells(view.geometry(r), boxes.get(ids[r]), grid).reshape(-1) for r in rows}

    def latents(r: int) -> torch.Tensor:
        f = torch.as_tensor(np.asarray(view.feature_map(r)), dtype=torch.float32)
        with torch.inference_mode():
            return sae.encode(f.reshape(f.shape[0], -1).T)

    # every neuron's cue share over the test split (streamed: one image's latents at a time)
    on = total = 0.0
    for r in rows:
        z = latents(r).numpy()
        share = cue_shares([z], [masks[r]])  # this image's share per neuron
        mass = z.sum(axis=0)
        on, total = on + share * mass, total + mass
    shares = np.divide(on, total, out=np.zeros_like(total), where=total > 0)
    cue_neurons = [int(n) for n in np.argsort(-shares) if shares[n] > args.share]

    c = int(view.feature_dim)
    h, w = grid

    def probability(z: torch.Tensor) -> float:
        with torch.inference_mode():
            x_hat = sae.decode(z).T.reshape(1, c, h, w)
            feats = x_hat if hook == "head" else rest_of_backbone(model, x_hat, hook)
            return float(torch.sigmoid(model.forward_head(feats).reshape(-1)[0]))

    groups = {
        "cue-only negatives": [r for r in rows if labels[r] == 0 and masks[r].any()],
        "clean negatives": [r for r in rows if labels[r] == 0 and not masks[r].any()],
    }
    print(f"{args.store.name} ({hook}, grid {h}x{w}), cue {args.cue}: {len(cue_neurons)} neurons "
          f"with cue share > {args.share}: "
          + ", ".join(f"{n} ({shares[n]:.2f})" for n in cue_neurons[:8]))  # fmt: skip
    print("| group | n | P | cue neurons off | cue cells zeroed | dilated by one cell |")
    print("|---|---|---|---|---|---|")
    for name, group in groups.items():
        values: list[list[float]] = [[], [], [], []]
        for r in group[: args.images]:
            z = latents(r)
            values[0].append(probability(z))
            z1 = z.clone()
            z1[:, cue_neurons] = 0
            values[1].append(probability(z1))
            cells = torch.as_tensor(masks[r])
            z2 = z.clone()
            z2[cells] = 0
            values[2].append(probability(z2))
            wide = torch.nn.functional.max_pool2d(cells.reshape(1, 1, h, w).float(), 3, 1, 1)
            z3 = z.clone()
            z3[wide.reshape(-1) > 0] = 0
            values[3].append(probability(z3))
        n = len(values[0])
        cols = " | ".join(f"{np.mean(v):.3f}" if v else "n/a" for v in values)
        print(f"| {name} | {n} | {cols} |")
    view.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
