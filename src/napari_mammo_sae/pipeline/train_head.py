"""``napari-mammo-sae train-head``: fit a concept head (linear probe or fine-tune) or a pretext task.

Variants (the paper's naming):

- ``pretrained``: linear probe. The backbone's weights are frozen and it runs in eval mode, so its
  BatchNorm running statistics stay as they were. (Mammo-CLIP's own linear probes left BN in train
  mode, so their statistics drifted - SPEC 1.1; ``--update-bn-stats`` reproduces that.) Freezing
  the statistics keeps the backbone of every pretrained head identical, so one feature store serves
  the mass and the calcification probe alike. Without augmentation the frozen backbone runs once per
  image and the head trains on the cached pooled features.
- ``finetuned``: backbone and head trained end to end (BN in train mode).

Tasks: ``concept`` (mass or calcification, per-image labels), and pretext tasks to give a backbone
something to learn before it is frozen: ``view`` (MLO = 1 vs CC = 0), ``density`` (dense C/D = 1
vs A/B = 0) and ``lesion`` (a patch classifier, crops on the finding boxes versus breast tissue;
``lesion_pretext.py``). Loss: BCE with pos_weight = negatives / positives of the training split (Mammo-CLIP).
Optional training augmentation (``--augment``): Mammo-CLIP's flips, affine and elastic (SPEC 2).

Inference passes (the frozen backbone's features, the final train/test scores) run the backbone
through ``--runtime`` (models/runtime.py: ``auto`` = ONNX Runtime on a CPU, PyTorch on a GPU; a
fine-tuned backbone is exported once, at scoring). Training itself always runs in PyTorch.

Checkpoints (``checkpoint.pt`` in the output folder, loadable with ``weights_only=True``) are
written after every epoch and when SIGINT/SIGTERM arrives; ``--resume`` continues from one. The
result is a weights folder (``save_weights``) whose config records the task, concept, variant,
backbone, its signature and the train/test AUROC.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..models.folders import backbone_signature
from .dataset import PreprocessedImages, make_loader, parse_size, resolve_device
from .head_training import (
    TASKS,
    HeadConfig,
    TrainHeadResult,
    build_classifier,
    finite_auroc,
    optimise,
    pos_weight,
    restore,
    save_model,
    save_state,
    stop_now,
    task_items,
    weights_config,
)
from .signals import SignalStop

log = logging.getLogger(__name__)


# --- augmentation (SPEC 2) -------------------------------------------------------------------
def augment_image(image: Any, generator: Any) -> Any:
    """Mammo-CLIP's training augmentation on a (3, H, W) tensor; each transform with p = 0.5."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    def coin() -> bool:
        return bool(torch.rand((), generator=generator) < 0.5)

    def uniform(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=generator))

    if coin():
        image = torch.flip(image, dims=[-1])
    if coin():
        image = torch.flip(image, dims=[-2])
    if coin():
        h, w = image.shape[-2:]
        fill = float(image.min())
        image = TF.affine(
            image,
            angle=uniform(-20, 20),
            translate=[round(uniform(-0.1, 0.1) * w), round(uniform(-0.1, 0.1) * h)],
            scale=uniform(0.8, 1.2),
            shear=[uniform(-20, 20), 0.0],
            fill=fill,
        )
    if coin():
        h, w = image.shape[-2:]
        noise = torch.rand((1, h, w, 2), generator=generator) * 2 - 1
        kernel = 2 * int(4 * 15) + 1
        sigma = 15.0
        disp = TF.gaussian_blur(noise.permute(0, 3, 1, 2), [min(kernel, 2 * (h // 2) - 1),
                                                             min(kernel, 2 * (w // 2) - 1)],
                                [sigma, sigma]).permute(0, 2, 3, 1)  # fmt: skip
        disp = disp * 10.0 / torch.tensor([w, h], dtype=disp.dtype)  # alpha 10 px, normalised
        image = TF.elastic(image, displacement=disp, fill=float(image.min()))
    return image


class _Images:
    """Dataset of (index, image, label) with optional seeded augmentation."""

    def __init__(self, base: Any, labels: np.ndarray, augment: bool, seed: int, epoch: int = 0):
        self.base, self.labels, self.augment, self.seed, self.epoch = (
            base,
            labels,
            augment,
            seed,
            epoch,
        )

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        import torch

        got = self.base[i]
        if got is None:
            return None
        image = torch.from_numpy(got[1])
        if self.augment:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
            image = augment_image(image, g)
        return i, image, float(self.labels[i])


def _collate(batch):
    import torch

    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    idx, images, labels = zip(*batch, strict=True)
    return list(idx), torch.stack(images), torch.tensor(labels, dtype=torch.float32)


# --- training ----------------------------------------------------------------------------------
def _backbone_runtime(model: Any, cfg: HeadConfig, device: str, progress: Any = None) -> Any:
    """What runs the (eval-mode) backbone for inference passes: ``cfg.runtime`` on ``device``."""
    from ..models.runtime import create_runtime

    model.eval()
    return create_runtime(
        model.backbone, cfg.runtime, size=cfg.input_size, device=device, progress=progress
    )


def _scores(model: Any, dataset: Any, runtime: Any, batch_size: int, workers: int) -> np.ndarray:
    import torch

    out = np.full(len(dataset), np.nan, dtype=np.float64)
    device = next(model.parameters()).device
    model.eval()
    for batch in make_loader(dataset, batch_size=batch_size, workers=workers):
        if batch is None:
            continue
        idx, images, _, _ = batch
        with torch.inference_mode():
            logits = model.forward_head(runtime(images).to(device))
            out[idx] = logits.reshape(-1).float().cpu().numpy()
    return out


def _pooled(model: Any, dataset: Any, runtime: Any, batch_size: int, workers: int, progress) -> Any:
    """Pooled backbone features (N, C) of a dataset, frozen backbone in eval mode."""
    import torch

    feats = None
    model.eval()
    for batch in make_loader(dataset, batch_size=batch_size, workers=workers):
        if batch is None:
            continue
        idx, images, _, _ = batch
        with torch.inference_mode():
            f = runtime(images).float().mean(dim=(-2, -1)).cpu()
        if feats is None:
            feats = torch.full((len(dataset), f.shape[1]), float("nan"))
        feats[idx] = f
        if progress is not None:
            progress.update(len(idx))
    return feats


def train_head(
    cfg: HeadConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: Any = None,
    stop_after_steps: int | None = None,
) -> TrainHeadResult:
    """Train a head (or a fine-tune) per ``cfg`` and write our weights format to ``out``."""
    import torch

    cfg.validate()
    out = Path(out)
    if cfg.task == "lesion":
        from .lesion_pretext import train_lesion_pretext

        return train_lesion_pretext(
            cfg, out, resume=resume, progress=progress, stop_after_steps=stop_after_steps
        )
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    train_items, y_train = task_items(cfg, "training")
    test_items, y_test = task_items(cfg, "test")
    pw = pos_weight(y_train)
    model = build_classifier(cfg.backbone, cfg.init_weights).to(device)
    head = model.head
    frozen = cfg.variant == "pretrained"
    if frozen:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    params = [p for p in (head.parameters() if frozen else model.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate(), weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pw, device=device))

    start_epoch, start_step, history = restore(cfg, out, resume, model, optimizer)

    base_train = PreprocessedImages(train_items, cfg.preprocess, cfg.input_size)
    base_test = PreprocessedImages(test_items, cfg.preprocess, cfg.input_size)
    cached = frozen and not cfg.augment and not cfg.update_bn_stats
    n_batches = math.ceil(len(train_items) / cfg.batch_size)
    if progress is not None:
        progress.set_total(cfg.epochs * n_batches + (len(train_items) if cached else 0))
        progress.update(start_epoch * n_batches + start_step)
    pooled = None
    if cached:
        if progress is not None:
            progress.set_description("backbone features")
        runtime = _backbone_runtime(model, cfg, device, progress)
        pooled = _pooled(model, base_train, runtime, cfg.batch_size, cfg.workers, progress)
        pooled = pooled.to(device)

    def checkpoint(epoch: int, step: int) -> None:
        save_state(out, cfg, model, optimizer, epoch, step, history)

    stopped = False
    steps_done = 0
    with SignalStop() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            if progress is not None:
                progress.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
            g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
            order = torch.randperm(len(train_items), generator=g)
            if not frozen or cfg.update_bn_stats:
                model.train()
                if frozen:  # BN statistics update, weights stay frozen
                    head.train()
            else:
                model.eval()
            data = _Images(base_train, y_train, cfg.augment, cfg.seed, epoch)
            losses = []
            for step in range(start_step if epoch == start_epoch else 0, n_batches):
                idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size].tolist()
                if cached:
                    logits = head(pooled[idx])
                    target = torch.as_tensor(y_train[idx], device=device)
                else:
                    got = _collate([data[i] for i in idx])
                    if got is None:
                        continue
                    _, images, target = got
                    logits = model(images.to(device))
                    target = target.to(device)
                loss = loss_fn(logits.reshape(-1), target.reshape(-1))
                optimise(loss, optimizer, losses, progress)
                steps_done += 1
                if stop_now(stop, steps_done, stop_after_steps):
                    checkpoint(epoch, step + 1)
                    stopped = True
                    break
            if stopped:
                break
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None})
            checkpoint(epoch + 1, 0)
    if stopped:
        if stop.signum is not None:
            raise KeyboardInterrupt
        return TrainHeadResult(out, len(history), math.nan, math.nan, stopped=True)

    if progress is not None:
        progress.set_description("scoring")
    runtime = _backbone_runtime(model, cfg, device, progress)
    if cached:
        with torch.inference_mode():
            s_train = head(pooled).reshape(-1).float().cpu().numpy()
    else:
        s_train = _scores(model, base_train, runtime, cfg.batch_size, cfg.workers)
    s_test = (
        _scores(model, base_test, runtime, cfg.batch_size, cfg.workers)
        if test_items
        else np.zeros(0)
    )
    train_auc = finite_auroc(y_train, s_train)
    test_auc = finite_auroc(y_test, s_test) if test_items else math.nan
    model = model.cpu()
    provenance = {
        **asdict(cfg),
        "input_size": list(cfg.input_size),
        "data": Path(cfg.data).name,
        "lr": cfg.learning_rate(),
        "pos_weight": pw,
        "backbone_signature": backbone_signature(model),
        "train_auroc": train_auc,
        "test_auroc": test_auc,
        "n_train": len(train_items),
        "n_test": len(test_items),
        "history": history,
        "bn_stats": "updated" if (not frozen or cfg.update_bn_stats) else "frozen",
    }
    save_model(out, model, weights_config(cfg, provenance))
    return TrainHeadResult(out, len(history), train_auc, test_auc)


# --- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``napari-mammo-sae train-head``."""
    parser.add_argument("--data", required=True, help="dataset folder (VinDr layout)")
    parser.add_argument("--task", default="concept", choices=TASKS, help="what to predict")
    parser.add_argument("--concept", help="mass | calcification (task concept)")
    parser.add_argument(
        "--variant", default="pretrained", help="pretrained (linear probe) | finetuned"
    )
    parser.add_argument("--backbone", default="tf_efficientnet_b5", help="timm backbone name")
    parser.add_argument("--init-weights", help="weights folder to take the backbone from")
    parser.add_argument("--input-size", default="1520x912", help="model input HxW")
    parser.add_argument("--preprocess", default="mammoclip", choices=("mammoclip", "robust"))
    parser.add_argument("--out", required=True, help="output weights folder")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--lr", type=float, help="learning rate (default 1e-3 probe, 5e-5 fine-tune)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--augment", action="store_true", help="Mammo-CLIP training augmentation")
    parser.add_argument(
        "--update-bn-stats", action="store_true",
        help="pretrained: let BN running statistics update as Mammo-CLIP's probes did",
    )  # fmt: skip
    parser.add_argument(
        "--patch-size", type=int, default=128, help="lesion task: crop side, model-input pixels"
    )
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for scoring")
    parser.add_argument("--limit", type=int, help="at most this many images per split")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--runtime", default="auto", choices=("auto", "torch", "onnx"),
        help="what runs the backbone for inference passes: auto = ONNX Runtime on a CPU",
    )  # fmt: skip
    parser.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in --out"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``train-head`` from parsed arguments; returns the exit status."""
    from ..progress import TqdmProgress

    cfg = HeadConfig(
        data=args.data,
        task=args.task,
        concept=args.concept,
        variant=args.variant,
        backbone=args.backbone,
        init_weights=args.init_weights,
        input_size=parse_size(args.input_size),
        preprocess=args.preprocess,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        augment=args.augment,
        update_bn_stats=args.update_bn_stats,
        seed=args.seed,
        workers=args.workers,
        limit=args.limit,
        device=args.device,
        patch_size=args.patch_size,
        runtime=args.runtime,
    )
    progress = TqdmProgress(desc="train-head")
    try:
        result = train_head(cfg, args.out, resume=args.resume, progress=progress)
    finally:
        progress.close()
    print(
        f"{result.folder}: {result.epochs_run} epochs, train AUROC {result.train_auroc:.3f}, "
        f"test AUROC {result.test_auroc:.3f}"
    )
    return 0
