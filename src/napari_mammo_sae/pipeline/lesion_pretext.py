"""The ``lesion`` pretext task of ``train-head``: a patch classifier, lesion versus breast tissue.

Whole-image training learns slowly from a few hundred screening images: one label per image, the
finding a few hundred pixels of a million. Patch-level pretraining - classify crops centred on the
annotated findings against crops of normal tissue, then train on whole images from that backbone -
is the standard remedy in screening mammography (Shen et al., "Deep learning to improve breast
cancer detection on screening mammography", Sci. Rep. 2019). Mammo-CLIP's own backbone learned
what findings look like from the reports that describe them; on data without reports this task
plays that part.

Each training image is preprocessed once (the model input, one channel kept in memory as float16:
about 0.7 MB per image at 768 x 480, 2.8 MB at Mammo-CLIP's 1520 x 912 - phantom and CBIS-scale
sets fit, a VinDr-scale split (16,000 images, 44 GB at 1520 x 912) needs ``--limit`` or a streaming
loader this module does not have yet).
An epoch draws, from a generator seeded by (seed, epoch): ``POSITIVES_PER_FINDING`` crops around
each finding box (mass or calcification; the centre jittered by up to a quarter patch) and
``NEGATIVES_PER_IMAGE`` crops of breast tissue whose centre keeps half a patch away from every
finding. The crop list is fixed before the epoch starts, so a run stopped mid-epoch resumes on the
same batches. The network is the usual classifier (backbone, global average pooling, Linear(C, 1)):
the saved folder is a backbone for ``--init-weights`` like any other train-head output. Its train
and test AUROC are the patch classifier's, on a fresh draw of crops from each split.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..models.folders import backbone_signature
from . import head_training as th
from .dataset import (
    PreprocessedImages,
    geometry_from_json,
    load_dataset,
    make_loader,
    resolve_device,
)
from .signals import SignalStop

POSITIVES_PER_FINDING = 2
NEGATIVES_PER_IMAGE = 3
#: normalised intensity above the background that counts as breast (Mammo-CLIP normalisation)
TISSUE_MARGIN = 0.25


def finding_centres(geometry: Any, boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Centres (N, 2) in model-input (row, col) of boxes given as original (xmin, ymin, xmax, ymax)."""
    if not boxes:
        return np.zeros((0, 2))
    b = np.asarray(boxes, dtype=np.float64)
    centres = np.stack([(b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2], axis=1)
    return geometry.original_to_input(centres)


def _corner(centre: np.ndarray, patch: int, shape: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a patch x patch window around ``centre``, kept inside the image."""
    h, w = shape
    r = int(round(centre[0] - patch / 2))
    c = int(round(centre[1] - patch / 2))
    return min(max(r, 0), max(h - patch, 0)), min(max(c, 0), max(w - patch, 0))


def sample_patches(
    image: np.ndarray, centres: np.ndarray, patch: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """(row0, col0, label) crops of one image: jittered crops on findings, tissue crops away."""
    h, w = image.shape
    out = []
    for centre in centres:
        for _ in range(POSITIVES_PER_FINDING):
            jitter = rng.uniform(-patch / 4, patch / 4, size=2)
            out.append((*_corner(centre + jitter, patch, (h, w)), 1))
    level = float(image.min()) + TISSUE_MARGIN  # float16 images compare exactly as float32
    for _ in range(NEGATIVES_PER_IMAGE):
        for _try in range(200):  # rejection sampling: a uniform point of the breast
            centre = rng.uniform((0, 0), (h, w))
            if float(image[int(centre[0]), int(centre[1])]) <= level:
                continue  # background
            if len(centres) and np.min(np.abs(centres - centre).max(axis=1)) < patch:
                continue  # the crop would hold (part of) a finding
            out.append((*_corner(centre, patch, (h, w)), 0))
            break
    return out


def epoch_patches(
    images: list[np.ndarray], centres: list[np.ndarray], patch: int, seed: int, epoch: int
) -> list[tuple[int, int, int, int]]:
    """The epoch's shuffled crop list: (image index, row0, col0, label); depends on seed and epoch."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x1E51]))
    crops = [
        (i, r, c, y)
        for i in range(len(images))
        for r, c, y in sample_patches(images[i], centres[i], patch, rng)
    ]
    order = rng.permutation(len(crops))
    return [crops[k] for k in order]


def _batch(images: list[Any], crops: list[tuple[int, int, int, int]], patch: int):
    """(N, 3, patch, patch) float32 tensor and (N,) targets of a list of crops."""
    import torch

    x = torch.stack([images[i][r : r + patch, c : c + patch] for i, r, c, _ in crops]).float()
    y = torch.tensor([float(label) for *_, label in crops])
    return x.unsqueeze(1).expand(-1, 3, -1, -1), y


def _load(items: list[Any], cfg: Any, boxes: dict, progress: Any) -> tuple[list, list]:
    """(images (H, W) float16 tensors, finding centres (N, 2) in input pixels) of readable items."""
    import torch

    data = PreprocessedImages(items, cfg.preprocess, cfg.input_size)
    images: list[Any] = [None] * len(items)
    centres: list[np.ndarray] = [np.zeros((0, 2))] * len(items)
    for batch in make_loader(data, batch_size=8, workers=cfg.workers):
        if batch is None:
            continue
        idx, imgs, geoms, _ = batch
        for k, i in enumerate(idx):
            images[i] = imgs[k, 0].to(torch.float16)
            found = boxes.get(items[i].image_id, {})
            all_boxes = [b for concept in ("mass", "calcification") for b in found.get(concept, [])]
            centres[i] = finding_centres(geometry_from_json(geoms[k]), all_boxes)
        if progress is not None:
            progress.update(len(idx))
    keep = [i for i, im in enumerate(images) if im is not None]
    return [images[i] for i in keep], [centres[i] for i in keep]


def patch_auroc(
    model: Any, images: list, centres: list, patch: int, seed: int, device: str
) -> float:
    """AUROC of the patch classifier on a fresh draw of crops (findings vs tissue)."""
    import torch

    from ..analysis.metrics import auroc

    arrays = [im.numpy() for im in images]  # float16 views, no copies
    crops = epoch_patches(arrays, centres, patch, seed, 1_000_003)
    if not crops:
        return math.nan
    scores, labels = [], []
    model.eval()
    with torch.inference_mode():
        for k in range(0, len(crops), 64):
            x, y = _batch(images, crops[k : k + 64], patch)
            scores.append(model(x.to(device)).reshape(-1).float().cpu().numpy())
            labels.append(y.numpy())
    y, s = np.concatenate(labels), np.concatenate(scores)
    return auroc(y, s) if 0 < y.sum() < len(y) else math.nan


def train_lesion_pretext(
    cfg: Any, out: Path, *, resume: bool, progress: Any, stop_after_steps: int | None
) -> Any:
    """``train-head --task lesion``: the patch classifier (see the module docstring)."""
    import torch

    patch = int(cfg.patch_size)
    h, w = cfg.input_size
    if not 16 <= patch <= min(h, w):
        raise ConfigError(
            f"--patch-size must be between 16 and {min(h, w)} (the input's short side)"
        )
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    train_items, _ = th.task_items(cfg, "training")
    test_items, _ = th.task_items(cfg, "test")
    boxes = {d.image_id: d.boxes for d in load_dataset(cfg.data)}
    model = th.build_classifier(cfg.backbone, cfg.init_weights).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.learning_rate(), weight_decay=cfg.weight_decay
    )
    start_epoch, start_step, history = th.restore(cfg, out, resume, model, optimizer)

    # every training image preprocessed once, one channel, float16
    if progress is not None:
        progress.set_total(len(train_items))
        progress.set_description("preprocessing")
    images, centres = _load(train_items, cfg, boxes, progress)
    arrays = [im.numpy() for im in images]  # float16 views: the split is held in memory once
    n_pos = sum(len(c) for c in centres) * POSITIVES_PER_FINDING
    if n_pos == 0:
        raise ConfigError("the training split has no finding boxes: the lesion task needs some")
    pw = NEGATIVES_PER_IMAGE * len(images) / n_pos
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pw, device=device))

    def checkpoint(epoch: int, step: int) -> None:
        th.save_state(out, cfg, model, optimizer, epoch, step, history)

    stopped, steps_done, shown = False, 0, len(train_items)
    with SignalStop() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            crops = epoch_patches(arrays, centres, patch, cfg.seed, epoch)
            n_batches = math.ceil(len(crops) / cfg.batch_size)
            first = start_step if epoch == start_epoch else 0
            if progress is not None:
                shown += n_batches
                progress.set_total(shown)
                progress.set_description(f"epoch {epoch + 1}/{cfg.epochs} (patches)")
                progress.update(first)
            model.train()
            losses = []
            for step in range(first, n_batches):
                x, y = _batch(
                    images, crops[step * cfg.batch_size : (step + 1) * cfg.batch_size], patch
                )
                loss = loss_fn(model(x.to(device)).reshape(-1), y.to(device))
                th.optimise(loss, optimizer, losses, progress)
                steps_done += 1
                if th.stop_now(stop, steps_done, stop_after_steps):
                    checkpoint(epoch, step + 1)
                    stopped = True
                    break
            if stopped:
                break
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                            "patches": len(crops)})  # fmt: skip
            checkpoint(epoch + 1, 0)
    if stopped:
        if stop.signum is not None:
            raise KeyboardInterrupt
        return th.TrainHeadResult(out, len(history), math.nan, math.nan, stopped=True)

    if progress is not None:
        progress.set_description("scoring")
    test_images, test_centres = _load(test_items, cfg, boxes, None)
    train_auc = patch_auroc(model, images, centres, patch, cfg.seed, device)
    test_auc = patch_auroc(model, test_images, test_centres, patch, cfg.seed, device)
    model = model.cpu()
    provenance = {
        **asdict(cfg), "input_size": list(cfg.input_size), "data": Path(cfg.data).name,
        "lr": cfg.learning_rate(), "pos_weight": pw, "backbone_signature": backbone_signature(model),
        "train_auroc": train_auc, "test_auroc": test_auc, "auroc_of": "patches: crops on findings vs breast tissue",
        "n_train": len(train_items), "n_test": len(test_items), "history": history,
        "bn_stats": "updated",
    }  # fmt: skip
    th.save_model(out, model, th.weights_config(cfg, provenance))
    return th.TrainHeadResult(out, len(history), train_auc, test_auc)
