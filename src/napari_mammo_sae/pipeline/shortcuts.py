"""One row of the shortcut report from a feature store, its SAE, the concept model and a cue's boxes.

The rule and the row's fields live in :mod:`..analysis.shortcuts`; this module reads the test split
of a store, encodes every image with the SAE, measures each top neuron's activation mass on the cue
boxes and computes the probabilities before and after switching the cue neurons off:

* at the last layer (the store's hook point is ``head``): the closed form
  (``interventions.intervened_logits``) on the SAE reconstruction;
* at an intermediate hook point: the SAE reconstruction of the activations there, edited, is run
  through the rest of the backbone (``models.backbone.rest_of_backbone``) and the concept head -
  there is no closed form.

"P" is the model's probability on the SAE reconstruction in both cases, so "before" and "after"
differ only by the deactivation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..analysis.shortcuts import ShortcutRow, cue_cells, cue_shares, shortcut_row
from ..errors import ConfigError

Box = tuple[float, float, float, float]


def store_hook(view: Any) -> str:
    """The hook point a store's features were taken at (stores from before hooks: ``head``)."""
    meta = getattr(view, "meta", None) or {}
    return str(meta.get("hook") or "head")


def shortcut_report_row(
    view: Any,
    sae: Any,
    model: Any,
    cue_boxes: Mapping[str, Sequence[Box]],
    *,
    cue: str,
    concept: str,
    top_neurons: Sequence[int],
    split: str = "test",
) -> ShortcutRow:
    """The report row of one cue and concept at the store's layer (see the module docstring).

    ``cue_boxes`` maps image id -> the cue's boxes (original pixels); ``top_neurons`` are the top-k
    class-1 neurons in rank order; ``model`` is the concept classifier the store was extracted with
    (its head; at an intermediate layer its backbone too). Images with an unknown label are left out.
    """
    import torch

    from ..analysis.interventions import intervened_logits, sigmoid

    hook = store_hook(view)
    rows = [int(r) for r in view.rows(split) if view.labels(concept)[int(r)] >= 0]
    if not rows:
        raise ConfigError(f"the store has no {split} images with a known {concept} label")
    top = np.asarray(list(top_neurons), dtype=np.int64)
    grid = tuple(int(v) for v in view.grid)
    labels = np.array([int(view.labels(concept)[r]) for r in rows])
    has_cue = np.array([bool(cue_boxes.get(str(view.index.image_id[r]))) for r in rows])
    param = next(sae.parameters())
    acts, masks, pooled = [], [], []
    with torch.inference_mode():
        for r in rows:
            tokens = torch.as_tensor(view.tokens(r), dtype=param.dtype, device=param.device)
            z = sae.encode(tokens)
            acts.append(z[:, torch.as_tensor(top, device=z.device)].float().cpu().numpy())
            pooled.append(z.mean(dim=0).double().cpu().numpy())
            boxes = cue_boxes.get(str(view.index.image_id[r]))
            masks.append(cue_cells(view.geometry(r), boxes, grid).reshape(-1))
    shares = cue_shares(acts, masks)
    pooled_z = np.stack(pooled)

    if hook == "head":

        def probabilities(off: list[int] | None) -> np.ndarray:
            return sigmoid(intervened_logits(pooled_z, sae, model, off, "remove"))

    else:

        def probabilities(off: list[int] | None) -> np.ndarray:
            return _rerun_probabilities(view, rows, sae, model, hook, off)

    return shortcut_row(
        cue=cue, concept=concept, layer=hook, labels=labels, has_cue=has_cue,
        probabilities=probabilities(None), top_neurons=[int(n) for n in top],
        shares=shares, deactivate=probabilities,
    )  # fmt: skip


def _rerun_probabilities(
    view: Any, rows: list[int], sae: Any, model: Any, hook: str, off: list[int] | None
) -> np.ndarray:
    """P per image with the SAE reconstruction at ``hook`` (neurons ``off`` zeroed) run through the
    rest of the backbone and the head."""
    import torch

    from ..models.backbone import rest_of_backbone

    param = next(sae.parameters())
    out = []
    with torch.inference_mode():
        for r in rows:
            fmap = view.feature_map(r)
            c, h, w = fmap.shape
            tokens = torch.as_tensor(fmap.reshape(c, -1).T, dtype=param.dtype, device=param.device)
            z = sae.encode(tokens)
            if off:
                z[:, torch.as_tensor(off, device=z.device)] = 0
            x_hat = sae.decode(z).T.reshape(1, c, h, w)
            mp = next(model.parameters())
            feats = rest_of_backbone(model, x_hat.to(device=mp.device, dtype=mp.dtype), hook)
            out.append(float(torch.sigmoid(model.forward_head(feats).reshape(-1)[0])))
    return np.asarray(out)
