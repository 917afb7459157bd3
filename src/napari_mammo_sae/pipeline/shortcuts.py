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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.shortcuts import ShortcutRow, cue_cells, cue_shares, shortcut_row
from ..errors import ConfigError

Box = tuple[float, float, float, float]


def store_hook(view: Any) -> str:
    """The hook point a store's features were taken at (stores from before hooks: ``head``)."""
    meta = getattr(view, "meta", None) or {}
    return str(meta.get("hook") or "head")


@dataclass
class EncodedSplit:
    """What every cue's row of one run shares: the split's images, their labels, the top neurons'
    activations per cell, the pooled latents and (once computed) the probabilities before any
    deactivation - so a report over several cues encodes the split, and at an intermediate layer
    re-runs the backbone for "before", once."""

    hook: str
    rows: list[int]
    labels: np.ndarray
    top: np.ndarray
    acts: list[np.ndarray]  # per image (cells, k)
    pooled: np.ndarray  # (N, m)
    before: np.ndarray | None = None
    cells: dict[int, Any] = field(default_factory=dict)  # row -> geometry (read once)


def encode_split(
    view: Any, sae: Any, concept: str, top_neurons: Sequence[int], split: str = "test"
) -> EncodedSplit:
    """Encode a split of the store once for :func:`shortcut_report_row` (images with an unknown
    label are left out)."""
    import torch

    rows = [int(r) for r in view.rows(split) if view.labels(concept)[int(r)] >= 0]
    if not rows:
        raise ConfigError(f"the store has no {split} images with a known {concept} label")
    top = np.asarray(list(top_neurons), dtype=np.int64)
    labels = np.array([int(view.labels(concept)[r]) for r in rows])
    param = next(sae.parameters())
    acts, pooled = [], []
    with torch.inference_mode():
        for r in rows:
            tokens = torch.as_tensor(view.tokens(r), dtype=param.dtype, device=param.device)
            z = sae.encode(tokens)
            acts.append(z[:, torch.as_tensor(top, device=z.device)].float().cpu().numpy())
            pooled.append(z.mean(dim=0).double().cpu().numpy())
    return EncodedSplit(store_hook(view), rows, labels, top, acts, np.stack(pooled))


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
    encoded: EncodedSplit | None = None,
) -> ShortcutRow:
    """The report row of one cue and concept at the store's layer (see the module docstring).

    ``cue_boxes`` maps image id -> the cue's boxes (original pixels); ``top_neurons`` are the top-k
    class-1 neurons in rank order; ``model`` is the concept classifier the store was extracted with
    (its head; at an intermediate layer its backbone too); ``encoded`` (:func:`encode_split`, same
    concept and neurons) spares re-encoding the split for every cue.
    """
    from ..analysis.interventions import intervened_logits, sigmoid

    if encoded is None:
        encoded = encode_split(view, sae, concept, top_neurons, split)
    elif list(encoded.top) != [int(n) for n in top_neurons]:
        raise ConfigError("the encoded split was made for other top neurons")
    rows, hook = encoded.rows, encoded.hook
    grid = tuple(int(v) for v in view.grid)
    ids = [str(view.index.image_id[r]) for r in rows]
    has_cue = np.array([bool(cue_boxes.get(i)) for i in ids])
    masks = []
    for r, image_id in zip(rows, ids, strict=True):
        if r not in encoded.cells:
            encoded.cells[r] = view.geometry(r)
        masks.append(cue_cells(encoded.cells[r], cue_boxes.get(image_id), grid).reshape(-1))
    shares = cue_shares(encoded.acts, masks)

    def probabilities(off: list[int] | None) -> np.ndarray:
        if not off and encoded.before is not None:
            return encoded.before
        if hook == "head":
            p = sigmoid(intervened_logits(encoded.pooled, sae, model, off, "remove"))
        else:
            p = _rerun_probabilities(view, rows, sae, model, hook, off)
        if not off:
            encoded.before = p
        return p

    return shortcut_row(
        cue=cue, concept=concept, layer=hook, labels=encoded.labels, has_cue=has_cue,
        probabilities=probabilities(None), top_neurons=[int(n) for n in encoded.top],
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


#: the shortcut report's ranking of "top-k class-1 neurons" (the same for every cue and layer)
SHORTCUT_RANKING = "logit"
RANKING_TEXT = {
    "class-mean": "class mean of pooled latents over the class-1 training images (paper eq. 2)",
    "logit": "mean contribution to the concept's logit over the class-1 training images: "
    "gradient x activation of the model's logit on the SAE reconstruction with respect to the "
    "latents, summed over positions (exact at the last layer, where it is (W_dec^T w)_j times the "
    "pooled latent; at a hook point through the rest of the backbone)",
}


def class1_top_neurons(
    view: Any,
    sae: Any,
    concept: str,
    k: int,
    split: str = "training",
    *,
    ranking: str = "class-mean",
    model: Any = None,
) -> list[int]:
    """The top-k class-1 neurons over a split, computed from the store itself.

    ``ranking``: ``class-mean`` (pooled latents, the paper's eq. 2: Table 2 and localisation use
    it) or ``logit`` (each neuron's mean contribution to the concept's logit, ``RANKING_TEXT``: the
    neurons that drive the prediction - a small, strong cue such as a clip carries little pooled
    mass but much of the logit; needs ``model``, the concept classifier).
    """
    import torch

    if ranking not in RANKING_TEXT:
        raise ConfigError(f"unknown ranking {ranking!r}: use {' or '.join(RANKING_TEXT)}")
    if ranking == "logit" and model is None:
        raise ConfigError("the logit ranking needs the concept model")
    labels = view.labels(concept)
    rows = [int(r) for r in view.rows(split) if labels[int(r)] == 1]
    if not rows:
        raise ConfigError(f"the store has no {split} image positive for {concept}: cannot rank")
    param = next(sae.parameters())
    total = None
    for r in rows:
        if ranking == "logit":
            score = _logit_attribution(view, r, sae, model)
        else:
            with torch.inference_mode():
                tokens = torch.as_tensor(view.tokens(r), dtype=param.dtype, device=param.device)
                score = sae.encode(tokens).mean(dim=0).double().cpu().numpy()
        total = score if total is None else total + score
    mean = total / len(rows)
    return [int(n) for n in np.argsort(-mean, kind="stable")[: int(k)]]


def _logit_attribution(view: Any, row: int, sae: Any, model: Any) -> np.ndarray:
    """(m,) gradient x activation of the concept logit on the SAE reconstruction of one stored
    image, summed over positions (the Analyzer's logit contributions, from the store)."""
    import torch

    from ..models.inference import latent_attribution

    fmap = view.feature_map(row)
    c, h, w = fmap.shape
    param = next(sae.parameters())
    with torch.inference_mode():
        z = sae.encode(torch.as_tensor(fmap.reshape(c, -1).T, dtype=param.dtype,
                                       device=param.device))  # fmt: skip
    attr, _ = latent_attribution(sae, model, store_hook(view), z, (h, w))
    return attr.sum(dim=0).double().numpy()


def shortcut_rows(
    runs: Sequence[tuple[Any, Any, Any, str]],
    cue_boxes: Mapping[str, Mapping[str, Sequence[Box]]],
    *,
    k: int = 10,
    progress: Any = None,
) -> list[ShortcutRow]:
    """Every cue x every (store, SAE, model, concept) run: the whole report, same rule and k."""
    from ..progress import check_cancelled

    rows = []
    if progress is not None:
        progress.set_total(len(runs) * len(cue_boxes))
    for view, sae, model, concept in runs:
        top = class1_top_neurons(view, sae, concept, k, ranking=SHORTCUT_RANKING, model=model)
        encoded = encode_split(view, sae, concept, top)
        for cue, boxes in cue_boxes.items():
            check_cancelled(progress)
            rows.append(
                shortcut_report_row(
                    view, sae, model, boxes, cue=cue, concept=concept, top_neurons=top,
                    encoded=encoded,
                )
            )  # fmt: skip
            if progress is not None:
                progress.update(1)
    return rows


# --- command line ------------------------------------------------------------------------------
RUN_HELP = (
    "a feature store (any hook point), the SAE trained on that layer and the concept model the "
    "store was extracted with (train-head folder); repeat for more layers/concepts"
)


def open_run(store: str | Path, sae: str | Path, head: str | Path) -> tuple[Any, Any, Any, str]:
    """One ``--run STORE SAE HEAD`` (``shortcuts`` and ``evaluate``): (view, SAE on the CPU, concept
    model in eval mode, concept), after checking that they belong together - a concept model
    (mass or calcification), the store extracted with its backbone (StoreError otherwise), the SAE
    trained at the store's layer and reading its channels (ConfigError otherwise)."""
    from ..errors import StoreError
    from ..models.folders import backbone_signature, load_model_folder, load_sae, sae_hook
    from ..models.weights import read_config
    from .store import open as open_store

    view = open_store(store)
    try:
        model, config = load_model_folder(head)
        model.eval()
        concept = config.get("concept") or (config.get("provenance") or {}).get("concept")
        if concept not in ("mass", "calcification"):
            raise ConfigError(f"{head} is not a concept model (mass or calcification)")
        if view.backbone_signature and view.backbone_signature != backbone_signature(model):
            raise StoreError(
                f"{store} was not extracted with the backbone of {head}: pass the store "
                "'extract --weights' made with this model"
            )
        model_sae = load_sae(sae).float()
        trained_on = sae_hook(read_config(sae), default=None)  # the config alone: loaded once
        if trained_on and trained_on != view.hook:
            raise ConfigError(
                f"the SAE {sae} was trained at {trained_on}, the store {store} holds "
                f"{view.hook}: pass the SAE trained on this store's layer"
            )
        if int(model_sae.d_in) != int(view.feature_dim):
            raise ConfigError(
                f"the SAE {sae} reads {model_sae.d_in} channels, the store's {view.hook} layer has "
                f"{view.feature_dim}: pass the SAE trained on this store's layer"
            )
    except BaseException:
        view.close()
        raise
    return view, model_sae, model, str(concept)


def open_runs(specs: Sequence[Sequence[str | Path]]) -> list[tuple[Any, Any, Any, str]]:
    """:func:`open_run` for every (STORE, SAE, HEAD); on a refusal the stores opened so far are
    closed before the error goes on."""
    runs: list[tuple[Any, Any, Any, str]] = []
    try:
        for store, sae, head in specs:
            runs.append(open_run(store, sae, head))
    except BaseException:
        for view, *_ in runs:
            view.close()
        raise
    return runs


def add_arguments(parser: Any) -> None:
    """Arguments of ``napari-mammo-sae shortcuts``."""
    parser.add_argument("--data", required=True, help="phantom dataset folder (its phantom.json)")
    parser.add_argument(
        "--run", nargs=3, action="append", required=True, metavar=("STORE", "SAE", "HEAD"),
        help=RUN_HELP,
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="CSV to write (docs/evaluation/shortcuts.csv)")
    parser.add_argument("--k", type=int, default=10, help="top-k class-1 neurons (default 10)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: Any) -> int:
    """Write the shortcut report for every cue of the dataset and every run."""
    from ..analysis.shortcuts import RULE, write_shortcuts_csv
    from ..phantom.cues import load_cue_boxes
    from ..progress import TqdmProgress

    if args.k < 1:
        raise ConfigError("--k must be at least 1")
    cue_boxes = load_cue_boxes(args.data)
    if not cue_boxes:
        raise ConfigError(f"{args.data} carries no cue (no phantom.json or confounder boxes)")
    runs = open_runs(args.run)
    progress = TqdmProgress(desc="shortcuts", disable=args.quiet)
    try:
        rows = shortcut_rows(runs, cue_boxes, k=args.k, progress=progress)
    finally:
        progress.close()
        for view, *_ in runs:
            view.close()
    path = write_shortcuts_csv(rows, args.out)
    print(f"{path}: {len(rows)} rows; rule: {RULE}")
    for r in rows:
        print(
            f"  {r.cue:7s} {r.concept:13s} {r.layer:8s} reliance {r.reliance:+.3f} "
            f"best share {r.best_cue_share:.2f} cue neurons {r.cue_neurons or '-'} "
            f"isolated {str(r.isolated).lower()}"
        )
    return 0
