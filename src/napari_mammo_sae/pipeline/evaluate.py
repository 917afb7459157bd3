"""``napari-mammo-sae evaluate``: the paper's analyses on the test split, written as a report folder.

For every concept head (``--heads``), paired with the feature store extracted by the same backbone:

(a) Table 1 - AUROC of the head on the original features vs on the SAE reconstruction;
(b) Figure 2 - AUROC vs k with only the top-k union kept ("activated") or removed ("deactivated"),
    computed in closed form from pooled latents (``analysis/interventions.py``);
(c) Table 2 - AP@0.25 of the top-10 class-1 neurons' heatmap boxes against the annotation boxes,
    under two protocols (``analysis.localisation.AP_PROTOCOLS``): ``finding-images`` (the paper's:
    only test images with a box of the concept) and ``whole-split`` (every test image; boxes on
    images without a finding are false positives);
(d) Figure 4 - class-wise mean latents (training split), positive vs negative;
(e) on phantom data (``confounder_annotations.csv`` in ``--data``), the confounder check: which top
    neurons' boxes land on the planted cue rather than on the lesions (``analysis.confounder.RULE``),
    and what deactivating them does to the probability of cue-only negatives;
(f), (g) with ``--run STORE SAE HEAD`` (repeatable, as ``shortcuts`` takes it: a store at any hook
    point, the SAE trained on that layer, the concept model): the shortcut report
    (``shortcuts.csv``, ``pipeline.shortcuts``; needs a phantom with cues, top ``--shortcut-k``) and
    localisation by layer (``localisation.csv``, ``pipeline.layer_localisation``: both box rules
    side by side with the grid's cell size and the findings' span in cells). The runs' stores, SAEs
    and models are checked (``shortcuts.open_run``) before any analysis and run on the CPU.

Neurons are ranked over the store's training split by ``--ranking`` (default ``class-mean``, the
paper; ``analysis.ranking``). A concept whose training split lacks a class gets Table 1 only, and a
note: its class means, and so every ranking, are undefined.
AUROCs carry seeded bootstrap 95% CIs; ``--protocol image|row`` picks the label protocol.

Exit codes: 2 unknown split/concept/protocol or a feature dimension that does not match the SAE
(ConfigError); 4 unreadable annotations (AnnotationError); 5 unreadable weights (CheckpointError);
6 missing, incomplete or corrupt store, or heads whose backbone does not match any store (StoreError).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.confounder import RULE as CONFOUNDER_RULE
from ..analysis.confounder import confounder_check
from ..analysis.interventions import (
    head_parts,
    intervened_logits,
    reconstruction_logits,
    sigmoid,
    topk_union,
)
from ..analysis.localisation import AP_PROTOCOLS
from ..analysis.ranking import ClassMeans, ranking_name
from ..errors import ConfigError, StoreError
from .dataset import CONCEPTS
from .layer_localisation import localisation_table, neuron_boxes
from .probe import check_dims, pool_map, sae_dims, top_neurons

log = logging.getLogger(__name__)

K_VALUES: tuple[int | str, ...] = (0, 1, 2, 5, 10, 20, 50, 100, 250, 500, 1000, 5000, 10000, "all")
LOCALISATION_TOP = 10


@dataclass
class StoreSummary:
    """What one pass over a store gives: pooled test latents/features and train class sums."""

    view: Any
    test_rows: np.ndarray
    pooled_z: np.ndarray  # (N_test, m)
    pooled_x: np.ndarray  # (N_test, C)
    means: dict[str, ClassMeans] = field(default_factory=dict)  # concept -> training class means


def summarise_store(
    view: Any, sae: Any, *, device: str = "cpu", progress: Any = None
) -> StoreSummary:
    """One pass: class sums of pooled latents over training, pooled latents/features over test."""
    from ..progress import check_cancelled

    _, m = sae_dims(sae)
    train_rows = view.rows("training")
    test_rows = view.rows("test")
    if len(test_rows) == 0:
        raise ConfigError("the store holds no test-split images: extract the test split too")
    labels = {c: view.labels(c) for c in CONCEPTS}
    sums = {c: np.zeros((2, m)) for c in CONCEPTS}
    counts = {c: np.zeros(2, dtype=np.int64) for c in CONCEPTS}
    pooled_z = np.zeros((len(test_rows), m), dtype=np.float32)
    pooled_x = np.zeros((len(test_rows), view.feature_dim), dtype=np.float32)
    test_pos = {int(r): i for i, r in enumerate(test_rows)}
    rows = np.concatenate([train_rows, test_rows])
    if progress is not None:
        progress.set_description("encoding store")
        progress.set_total(len(rows))
    for row, fmap in view.iter_maps(rows):
        check_cancelled(progress)
        z, x = pool_map(sae, fmap, device=device)
        i = test_pos.get(int(row))
        if i is not None:
            pooled_z[i] = z
            pooled_x[i] = x
        else:
            for c in CONCEPTS:
                y = int(labels[c][row])
                if y in (0, 1):  # -1: label unknown
                    sums[c][y] += z
                    counts[c][y] += 1
        if progress is not None:
            progress.update(1)
    summary = StoreSummary(view, test_rows, pooled_z, pooled_x)
    for c in CONCEPTS:
        summary.means[c] = ClassMeans.from_sums(sums[c], counts[c])
    return summary


@dataclass
class LabelSource:
    """Per-image row labels and boxes from the dataset's annotation files."""

    rows: dict[str, dict[str, list[int]]]  # concept -> image_id -> per-row labels
    boxes: dict[
        str, dict[str, list[tuple[float, float, float, float]]]
    ]  # concept -> image -> boxes
    cue_boxes: dict[str, list[tuple[float, float, float, float]]] | None = None


def load_label_source(data_dir: str | Path) -> LabelSource:
    """Row labels, concept boxes and (phantom) cue boxes from a VinDr-layout folder."""
    from .dataset import load_dataset

    root = Path(data_dir)
    images = load_dataset(root)
    rows = {c: {im.image_id: list(im.rows[c]) for im in images} for c in CONCEPTS}
    boxes = {c: {im.image_id: list(im.boxes[c]) for im in images} for c in CONCEPTS}
    return LabelSource(rows, boxes, _cue_boxes(root))


def _cue_boxes(root: Path) -> dict[str, list[tuple[float, float, float, float]]] | None:
    """image_id -> planted-cue boxes from the phantom's confounder_annotations.csv (None if absent)."""
    path = root / "confounder_annotations.csv"
    if not path.exists():
        return None
    out: dict[str, list] = {}
    with path.open(newline="") as fh:
        for rec in csv.DictReader(fh):
            try:
                box = tuple(float(rec[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (KeyError, ValueError):
                continue
            out.setdefault(rec["image_id"], []).append(box)
    return out


# --- the analyses ------------------------------------------------------------------------------
def _samples(
    summary: StoreSummary, scores: np.ndarray, labels: LabelSource, concept: str, protocol: str
):
    from ..analysis.metrics import protocol_samples

    ids = [str(summary.view.index.image_id[r]) for r in summary.test_rows]
    if protocol == "image":
        own = summary.view.labels(concept)
        lab = {i: [int(own[r])] for i, r in zip(ids, summary.test_rows, strict=True) if own[r] >= 0}
    else:
        lab = labels.rows[concept]
    return protocol_samples(ids, scores, lab, protocol)


def _metrics(summary, logits, labels, concept, protocol, n_bootstrap, seed) -> dict:
    from ..analysis.metrics import classification_report

    y, p, g = _samples(summary, sigmoid(logits), labels, concept, protocol)
    rep = classification_report(y, p, n_bootstrap=n_bootstrap, seed=seed, groups=g)
    return rep.to_dict()


def topk_curves(
    summary: StoreSummary,
    sae: Any,
    head_model: Any,
    scores: np.ndarray,
    labels: LabelSource,
    concept: str,
    protocol: str,
    *,
    n_bootstrap: int,
    seed: int,
    k_values: Sequence[int | str] = K_VALUES,
) -> list[dict]:
    """AUROC vs k for top-k activated (keep) and top-k deactivated (remove), closed form."""
    _, m = sae_dims(sae)
    out = []
    for mode, name in (("keep", "activated"), ("remove", "deactivated")):
        aucs, cis, unions, ks = [], [], [], []
        for k in k_values:
            kk = m if k == "all" else min(int(k), m)
            neurons = np.asarray(topk_union(scores[0], scores[1], kk), dtype=np.int64)
            logits = intervened_logits(summary.pooled_z, sae, head_parts(head_model), neurons, mode)
            met = _metrics(summary, logits, labels, concept, protocol, n_bootstrap, seed)
            ks.append(k)
            unions.append(int(neurons.size))
            aucs.append(met["auroc"])
            cis.append(met["auroc_ci"])
        out.append({"mode": name, "k": ks, "union_size": unions, "auroc": aucs, "auroc_ci": cis})
    return out


def localisation_panels(
    summary: StoreSummary,
    sae: Any,
    neurons: list[int],
    image_ids: Sequence[str],
    data_dir: str | Path,
    gt: dict[str, list],
    boxes: dict[int, dict[str, list]],
    *,
    device: str = "cpu",
    max_side: int = 384,
) -> list[dict]:
    """Panels (image, heatmap, boxes) of the top neurons on a few test images, for the report."""
    import torch

    from ..analysis.localisation import upsample_heatmap
    from ..dicom import read_mammogram
    from .dataset import image_path
    from .probe import encode_latents

    view = summary.view
    rows = {str(view.index.image_id[r]): int(r) for r in summary.test_rows}
    panels = []
    for image_id in image_ids:
        row = rows[image_id]
        study = str(getattr(view.index, "study_id", view.index.image_id)[row])
        try:
            record = read_mammogram(image_path(Path(data_dir), study, image_id))
        except Exception as exc:  # noqa: BLE001 - a missing picture must not sink the report
            log.warning("no localisation picture for %s: %s", image_id, exc)
            continue
        pixels = record.display_pixels()
        step = max(1, int(np.ceil(max(pixels.shape) / max_side)))
        geometry = view.geometry(row)
        fmap = view.feature_map(row)
        c, h, w = fmap.shape
        tokens = torch.as_tensor(fmap, device=device).reshape(c, -1).T
        with torch.inference_mode():
            z = encode_latents(sae, tokens, neurons).float().cpu().numpy()
        r0, c0, r1, c1 = geometry.crop_box
        size = (max(1, round((r1 - r0) / step)), max(1, round((c1 - c0) / step)))
        for col, n in enumerate(neurons):
            pred = boxes.get(n, {}).get(image_id, [])
            panels.append(
                {
                    "image": pixels[::step, ::step],
                    "shape": tuple(pixels.shape),
                    "limits": record.display_limits(),
                    "heatmap": upsample_heatmap(z[:, col].reshape(h, w), size),
                    "crop_box": geometry.crop_box,
                    "gt": gt.get(image_id, []),
                    "pred": [b.box for b in pred[:3]],
                    "label": f"neuron {n} - {record.name}",
                }
            )
    return panels


# --- pairing heads with stores -------------------------------------------------------------------
def _head_info(folder: str | Path) -> tuple[Any, dict]:
    from ..models.folders import load_model_folder

    path = Path(folder)
    if not path.exists():
        raise ConfigError(f"no head weights at {path}: pass folders written by 'train-head'")
    model, config = load_model_folder(path)
    return model.eval(), dict(config)


def _provenance(config: dict) -> dict:
    prov = config.get("provenance")
    return prov if isinstance(prov, dict) else config


def pair_heads(
    views: list[Any], heads: list[tuple[str, Any, dict]]
) -> list[tuple[Any, str, Any, dict]]:
    """Match each head to the store extracted with its backbone (StoreError if none matches)."""
    pairs = []
    from ..models.folders import backbone_signature

    for folder, model, config in heads:
        # the signature of the weights as loaded (a float16 copy differs from its float32 source)
        sig = backbone_signature(model)
        match = [v for v in views if sig and v.backbone_signature == sig]
        if not match:
            if len(views) == 1 and (not sig or not views[0].backbone_signature):
                log.warning(
                    "head %s has no backbone signature; pairing it with the only store", folder
                )
                match = views
            else:
                raise StoreError(
                    f"the head {Path(folder).name} was trained on a backbone that matches none of the "
                    "stores: run 'extract --weights' with this head's folder and pass that store"
                )
        pairs.append((match[0], folder, model, config))
    return pairs


# --- the whole evaluation ----------------------------------------------------------------------
def evaluate(
    stores: Sequence[str | Path],
    sae_folder: str | Path,
    head_folders: Sequence[str | Path],
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    protocol: str = "image",
    n_bootstrap: int = 1000,
    seed: int = 0,
    k_values: Sequence[int | str] = K_VALUES,
    localisation: str = "percentile",
    ranking: str = "class-mean",
    box_score: str = "max",
    device: str = "cpu",
    progress: Any = None,
    runs: Sequence[Sequence[str | Path]] = (),
    shortcut_k: int = 10,
) -> Path:
    """Run analyses (a)-(e) and write the report folder; returns the path of its index.html.

    ``runs`` (``--run STORE SAE HEAD``, as ``shortcuts`` takes them) add :func:`layer_reports`:
    ``shortcuts.csv`` (when ``data_dir`` is a phantom with cues; top ``shortcut_k``) and
    ``localisation.csv`` in ``out_dir``, and both tables in the report."""
    from ..analysis.metrics import PROTOCOLS
    from ..analysis.ranking import rank_scores
    from ..models.folders import load_sae, sae_sha256
    from .probe import open_view
    from .report import write_report
    from .shortcuts import open_runs

    ranking = ranking_name(ranking)  # ConfigError for an unknown name; aliases accepted
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown label protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if not head_folders:
        raise ConfigError("pass at least one concept head folder with --heads")
    if runs and shortcut_k < 1:
        raise ConfigError("--shortcut-k must be at least 1")
    views = [open_view(s) for s in stores]
    from .dataset import resolve_device

    device = resolve_device(device)  # "auto" -> cuda when available, else cpu
    sae = load_sae(sae_folder).to(device)
    for v in views:
        check_dims(v.store, sae)
    heads = [(str(f), *_head_info(f)) for f in head_folders]
    pairs = pair_heads(views, heads)
    labels = load_label_source(data_dir)

    # --run: refused (store/SAE/head mismatch) before any analysis; closed whatever happens
    opened = open_runs(runs) if runs else []
    try:
        box_kw = {"method": localisation, "score": box_score}
        summaries: dict[int, StoreSummary] = {}
        results: dict[str, Any] = {
            "meta": {
                "stores": [Path(s).name for s in stores],
                "sae_sha256": sae_sha256(sae_folder),
                "protocol": protocol,
                "bootstrap": n_bootstrap,
                "seed": seed,
                "ranking": {
                    "class-mean": "class mean of pooled latents over the training split (paper eq. 2)",
                    "class-centred": "class mean minus the mean over all training images",
                    "logit": "mean contribution to the head's logit, signed toward the class",
                }[ranking],
                "ranking_name": ranking,
                "localisation": (
                    f"heatmaps upsampled bilinearly to the model input, thresholded "
                    f"({'95th percentile, 8-connected components' if localisation == 'percentile' else '0.3 x max, contours >= 10 px'}), "
                    f"boxes mapped to original pixels; box score = heatmap {box_score}; AP at IoU 0.25 "
                    "(VOC all-point) under two protocols - "
                    + "; ".join(f"{k}: {v}" for k, v in AP_PROTOCOLS.items())
                ),
                "confounder_rule": CONFOUNDER_RULE,
            },
            "table1": [],
            "figure2": [],
            "table2": [],
            "figure4": [],
            "notes": [],
        }
        arrays: dict[str, np.ndarray] = {}
        figure4_done: set[tuple[int, str, str]] = set()
        for view, folder, model, config in pairs:
            prov = _provenance(config)
            concept = prov.get("concept") or config.get("concept")
            variant = str(prov.get("variant") or config.get("variant") or Path(folder).name)
            if concept not in CONCEPTS:
                raise ConfigError(
                    f"the head {Path(folder).name} is not a concept head (task {prov.get('task')!r}): "
                    f"pass heads trained with --task concept"
                )
            key = id(view)
            if key not in summaries:
                summaries[key] = summarise_store(view, sae, device=device, progress=progress)
            summary = summaries[key]
            w, c = head_parts(model)
            if w.size != view.feature_dim:
                raise StoreError(
                    f"the head {Path(folder).name} takes {w.size} features but the store holds "
                    f"{view.feature_dim}: extract the store with this head's backbone"
                )
            logits_x = summary.pooled_x @ w + c
            logits_sae = reconstruction_logits(summary.pooled_z, sae, (w, c))
            results["table1"].append(
                {
                    "variant": variant,
                    "concept": concept,
                    "head": Path(folder).name,
                    "without": _metrics(
                        summary, logits_x, labels, concept, protocol, n_bootstrap, seed
                    ),
                    "with": _metrics(
                        summary, logits_sae, labels, concept, protocol, n_bootstrap, seed
                    ),
                }
            )
            class_means = summary.means[concept]
            if not class_means.complete:
                counts = class_means.count
                results["notes"].append(
                    f"{concept}, {variant}: the training split has {counts[1]} positive and "
                    f"{counts[0]} negative images, so the class means and every neuron ranking are "
                    "undefined: Figure 2, Table 2, Figure 4 and the confounder check are left out"
                )
                continue
            means = class_means.mean
            scores = rank_scores(class_means, sae, (w, c))[ranking]
            curves = topk_curves(
                summary, sae, model, scores, labels, concept, protocol,
                n_bootstrap=min(n_bootstrap, 200), seed=seed, k_values=k_values,
            )  # fmt: skip
            baseline = results["table1"][-1]["with"]["auroc"]
            for curve in curves:
                results["figure2"].append(
                    {"variant": variant, "concept": concept, "baseline": baseline, **curve}
                )

            top = top_neurons(scores[1], LOCALISATION_TOP)
            f4key = (key, concept, variant)
            if f4key not in figure4_done:
                figure4_done.add(f4key)
                pos_key, neg_key = f"{variant}_{concept}_pos", f"{variant}_{concept}_neg"
                arrays[pos_key], arrays[neg_key] = means[1], means[0]
                results["figure4"].append(
                    {
                        "variant": variant,
                        "concept": concept,
                        "top_neurons": top,
                        "counts": class_means.count.tolist(),
                        "mean_positive": pos_key,
                        "mean_negative": neg_key,
                    }
                )

            test_ids = [str(view.index.image_id[r]) for r in summary.test_rows]
            gt = labels.boxes[concept]
            with_boxes = [i for i in test_ids if gt.get(i)]
            cue = labels.cue_boxes or {}
            # every test image: the whole-split AP scores boxes on images without a finding too
            boxes = neuron_boxes(summary, sae, top, summary.test_rows, device=device, **box_kw)
            if with_boxes:
                arrays[f"panels_{variant}_{concept}".replace(" ", "-").replace("/", "-")] = (
                    localisation_panels(
                        summary, sae, top[:5], with_boxes[:2], data_dir, gt, boxes, device=device
                    )
                )
                results["table2"].append(
                    {
                        "variant": variant,
                        "concept": concept,
                        **localisation_table(boxes, gt, top, test_ids),
                    }
                )
            else:
                results["notes"].append(f"{concept}, {variant}: no test image has a {concept} box")
            if labels.cue_boxes is not None:
                results.setdefault("confounder", []).append(
                    _confounder(
                        summary, sae, model, boxes, gt, cue, top, test_ids, concept, variant
                    )
                )
        results["meta"]["images_test"] = {
            Path(stores[i]).name: int(len(summaries[id(v)].test_rows))
            for i, v in enumerate(views)
            if id(v) in summaries
        }
        if opened:
            layer_reports(opened, labels, data_dir, out_dir, results, shortcut_k=shortcut_k,
                          box_score=box_score, progress=progress)  # fmt: skip
        return write_report(results, out_dir, arrays)
    finally:
        for view, *_ in opened:
            view.close()


def _confounder(summary, sae, model, boxes, gt, cue, top, test_ids, concept, variant) -> dict:
    """Which top neurons sit on the planted cue, and their effect on cue-only negatives."""
    ids = [i for i in test_ids if cue.get(i) or gt.get(i)]
    neurons = confounder_check(boxes, gt, cue, top, ids)
    cue_neurons = [n["neuron"] for n in neurons if n["on_cue"]]
    own = summary.view.labels(concept)
    pos = {i: k for k, i in enumerate(test_ids)}
    cue_neg = [pos[i] for i in test_ids if cue.get(i) and not own[summary.test_rows[pos[i]]]]
    clean_neg = [pos[i] for i in test_ids if not cue.get(i) and not own[summary.test_rows[pos[i]]]]
    head = head_parts(model)
    base = sigmoid(reconstruction_logits(summary.pooled_z, sae, head))
    removed = base
    if cue_neurons:
        removed = sigmoid(intervened_logits(summary.pooled_z, sae, head, cue_neurons, "remove"))

    def _mean(values: np.ndarray, idx: list[int]) -> float:
        return float(np.mean(values[idx])) if idx else math.nan

    return {
        "variant": variant,
        "concept": concept,
        "neurons": neurons,
        "cue_negatives": {
            "n": len(cue_neg),
            "n_clean": len(clean_neg),
            "neurons": cue_neurons,
            "mean_probability": _mean(base, cue_neg),
            "mean_probability_without_cue_neurons": _mean(removed, cue_neg),
            "mean_probability_clean": _mean(base, clean_neg),
        },
    }


def layer_reports(
    runs: Sequence[tuple[Any, Any, Any, str]],
    labels: LabelSource,
    data_dir: str | Path,
    out_dir: str | Path,
    results: dict[str, Any],
    *,
    shortcut_k: int = 10,
    box_score: str = "max",
    progress: Any = None,
) -> None:
    """(f) and (g) for the ``--run`` runs (``shortcuts.open_runs``): the shortcut report
    (``shortcuts.csv``, every cue of a phantom x every run, top ``shortcut_k``; a note instead when
    ``data_dir`` carries no cue) and localisation by layer (``localisation.csv``: both box rules,
    top-10 class-1 neurons), written into ``out_dir`` and added to ``results``."""
    from ..analysis.shortcuts import RULE as SHORTCUT_RULE
    from ..analysis.shortcuts import write_shortcuts_csv
    from ..phantom.cues import load_cue_boxes
    from .layer_localisation import localisation_rows, write_localisation_csv
    from .shortcuts import shortcut_rows

    out = Path(out_dir)
    results["meta"]["runs"] = [
        {"store": Path(view.path).name, "layer": view.hook, "concept": concept}
        for view, _sae, _model, concept in runs
    ]
    cue_boxes = load_cue_boxes(data_dir)
    if cue_boxes:
        if progress is not None:
            progress.set_description("shortcuts")
        rows = shortcut_rows(runs, cue_boxes, k=shortcut_k, progress=progress)
        write_shortcuts_csv(rows, out / "shortcuts.csv")
        results["meta"]["shortcut_rule"] = SHORTCUT_RULE
        results["shortcuts"] = [r.as_dict() for r in rows]
    else:
        results["notes"].append(
            "--run: the data carries no planted cue (no phantom.json or confounder boxes), so "
            "there is no shortcut report (shortcuts.csv)"
        )
    if progress is not None:
        progress.set_description("localisation by layer")
    loc = localisation_rows(runs, labels.boxes, k=LOCALISATION_TOP, box_score=box_score,
                            progress=progress)  # fmt: skip
    write_localisation_csv(loc, out / "localisation.csv")
    results["localisation"] = [r.as_dict() for r in loc]


# --- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``napari-mammo-sae evaluate``."""
    from .shortcuts import RUN_HELP

    parser.add_argument(
        "--store", required=True, nargs="+", help="feature store(s); each head is paired with the "
        "store extracted by its backbone"
    )  # fmt: skip
    parser.add_argument("--sae", required=True, help="SAE weights folder written by 'train'")
    parser.add_argument(
        "--heads", required=True, nargs="+", help="concept head folders ('train-head')"
    )
    parser.add_argument("--data", required=True, help="dataset folder (annotation CSVs)")
    parser.add_argument("--out", required=True, help="report folder to write")
    parser.add_argument("--protocol", default="image", help="label protocol: image | row")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--localisation", default="percentile", choices=("percentile", "contour"),
        help="box extraction: 95th percentile (paper text) or 0.3 x max contours (paper code)",
    )  # fmt: skip
    parser.add_argument(
        "--ranking", default="class-mean",
        help="neuron ranking for top-k, Table 2 and the confounder check: class-mean (paper), "
        "class-centred or logit (class_mean / class_centred accepted too)",
    )  # fmt: skip
    parser.add_argument("--box-score", default="max", choices=("max", "mean"), help="AP box score")
    parser.add_argument(
        "--k", help="comma-separated k values for Figure 2 (default: the paper's list)"
    )
    parser.add_argument(
        "--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 ..."
    )
    parser.add_argument(
        "--run", nargs=3, action="append", default=None, metavar=("STORE", "SAE", "HEAD"),
        help=f"as in 'shortcuts': {RUN_HELP}; adds shortcuts.csv (a phantom with cues) and "
        "localisation.csv (both box rules at each run's layer) to the report",
    )  # fmt: skip
    parser.add_argument(
        "--shortcut-k", type=int, default=10,
        help="top-k class-1 neurons of the shortcut report (--run; default 10)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run ``evaluate`` from parsed arguments; returns the exit status."""
    from ..progress import TqdmProgress

    k_values: Sequence[int | str] = K_VALUES
    if args.k:
        try:
            k_values = [k if k == "all" else int(k) for k in args.k.split(",")]
        except ValueError as exc:
            raise ConfigError(f"--k takes integers or 'all', comma-separated: {args.k!r}") from exc
    progress = TqdmProgress(desc="evaluate")
    try:
        index = evaluate(
            args.store,
            args.sae,
            args.heads,
            args.data,
            args.out,
            protocol=args.protocol,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            k_values=k_values,
            localisation=args.localisation,
            ranking=args.ranking,
            box_score=args.box_score,
            device=args.device,
            progress=progress,
            runs=args.run or (),
            shortcut_k=args.shortcut_k,
        )
    finally:
        progress.close()
    print(f"report: {index}")
    return 0
