"""The pieces every ``train-head`` loop shares: the run's config, labels per task, the classifier
it trains, checkpoints (resume), one optimiser step, the stop check and the weights config.

``train_head.py`` (concept, view and density heads) and ``lesion_pretext.py`` (the patch
classifier) both build on this module, so neither imports the other's internals.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..models.folders import load_model_folder
from .dataset import list_images

log = logging.getLogger(__name__)

TASKS = ("concept", "view", "density", "lesion")
VARIANTS = ("pretrained", "finetuned")
CHECKPOINT = "checkpoint.pt"


@dataclass
class HeadConfig:
    """Everything that defines a train-head run (saved in the checkpoint and the weights config)."""

    data: str
    task: str = "concept"
    concept: str | None = None
    variant: str = "pretrained"
    backbone: str = "tf_efficientnet_b5"
    init_weights: str | None = None
    input_size: tuple[int, int] = (1520, 912)
    preprocess: str = "mammoclip"
    epochs: int = 10
    lr: float | None = None
    batch_size: int = 8
    weight_decay: float = 0.0
    augment: bool = False
    update_bn_stats: bool = False
    seed: int = 10
    workers: int = 0
    limit: int | None = None
    device: str = "cpu"
    patch_size: int = 128  # the lesion task's crops, model-input pixels
    runtime: str = "auto"  # what runs the backbone for inference passes (models/runtime.py)

    def learning_rate(self) -> float:
        """The given lr, else 1e-3 for a linear probe and 5e-5 for fine-tuning."""
        if self.lr is not None:
            return float(self.lr)
        return 1e-3 if self.variant == "pretrained" else 5e-5

    def validate(self) -> None:
        """ConfigError for unknown task/variant/concept or bad numbers."""
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}: use one of {', '.join(TASKS)}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}: use one of {', '.join(VARIANTS)}")
        if self.task == "concept" and self.concept not in ("mass", "calcification"):
            raise ConfigError(
                f"unknown concept {self.concept!r}: use --concept mass or --concept calcification"
            )
        if self.task == "lesion" and self.variant != "finetuned":
            raise ConfigError("the lesion task trains the backbone: use --variant finetuned")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("--epochs and --batch-size must be at least 1")

    def identity(self) -> dict:
        """The fields a resumed run must share with the checkpoint."""
        keys = ("task", "concept", "variant", "backbone", "input_size", "preprocess", "seed")
        if self.task == "lesion":
            keys += ("patch_size",)
        return {k: _jsonable(getattr(self, k)) for k in keys}


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# --- labels ----------------------------------------------------------------------------------
def task_label(item: Any, task: str, concept: str | None) -> int | None:
    """The binary label of an image for a task; None when the image does not take part."""
    if task == "concept":
        return int(item.labels[concept])
    if task == "view":
        view = (item.view or "").upper()
        return 1 if view == "MLO" else 0 if view == "CC" else None
    if task == "density":
        d = (item.density or "").upper().replace("DENSITY", "").strip()
        return 1 if d in ("C", "D") else 0 if d in ("A", "B") else None
    if task == "lesion":  # whole-image score of the patch classifier: any finding
        return int(any(item.labels.values()))
    raise ConfigError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


def pos_weight(labels: np.ndarray) -> float:
    """negatives / positives (Mammo-CLIP's BCE weight); ConfigError without positives."""
    pos = int(np.sum(labels == 1))
    neg = int(np.sum(labels == 0))
    if pos == 0 or neg == 0:
        raise ConfigError(
            f"the training split has {pos} positive and {neg} negative images for this task: "
            "both are needed"
        )
    return neg / pos


# --- model -------------------------------------------------------------------------------------
def build_classifier(backbone: str, init_weights: str | None = None) -> Any:
    """A ConceptClassifier (backbone + Linear(C, 1) head), backbone optionally from a weights folder."""
    from ..models.backbone import create_backbone
    from ..models.classifier import ConceptClassifier

    model = ConceptClassifier(create_backbone(backbone))
    if init_weights:
        if not Path(init_weights).exists():
            raise ConfigError(
                f"no weights folder at {init_weights}: pass a 'train-head' output folder"
            )
        source, _ = load_model_folder(init_weights)
        src = getattr(source, "backbone", source)
        try:
            model.backbone.load_state_dict(src.state_dict())
        except RuntimeError as exc:
            raise CheckpointError(
                f"the weights in {Path(init_weights).name} do not fit backbone {backbone!r}: "
                "pass the --backbone they were trained with"
            ) from exc
    return model


def save_model(folder: str | Path, model: Any, config: dict) -> Path:
    """Write a classifier in our weights format (models/weights.py save_weights)."""
    from ..models.weights import save_weights

    return save_weights(folder, model, config)


# --- checkpoints and signals -------------------------------------------------------------------
def _save_checkpoint(folder: Path, state: dict) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    tmp.replace(folder / CHECKPOINT)


def _load_checkpoint(folder: Path) -> dict | None:
    import torch

    path = folder / CHECKPOINT
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means the same to the user
        raise CheckpointError(
            f"{path} is not a readable train-head checkpoint ({exc}): delete it to start over"
        ) from exc


@dataclass
class TrainHeadResult:
    """Where the weights went and how well the head does."""

    folder: Path
    epochs_run: int
    train_auroc: float
    test_auroc: float
    stopped: bool = False


def restore(cfg: HeadConfig, out: Path, resume: bool, model: Any, optimizer: Any) -> tuple:
    """(start epoch, start step, history): from the checkpoint in ``out`` when resuming.

    ConfigError when the checkpoint was made with other settings, or when one exists and
    ``resume`` was not asked for (nothing is overwritten silently).
    """
    if not resume:
        if (out / CHECKPOINT).exists():
            raise ConfigError(
                f"{out} holds a checkpoint: pass --resume to continue it, or another --out"
            )
        return 0, 0, []
    state = _load_checkpoint(out)
    if state is None:
        log.warning("no checkpoint in %s: starting from scratch", out)
        return 0, 0, []
    saved = json.loads(state["identity"])
    if saved != cfg.identity():
        raise ConfigError(
            f"the checkpoint in {out} was made with {saved}, not {cfg.identity()}: "
            "use the same settings to resume, or another --out"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), int(state["step"]), json.loads(state["history"])


def save_state(out: Path, cfg: HeadConfig, model: Any, optimizer: Any, epoch: int, step: int,
               history: list) -> None:  # fmt: skip
    """Checkpoint everything a resumed run needs (weights, optimiser, position, identity)."""
    _save_checkpoint(out, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
        "step": step, "identity": json.dumps(cfg.identity()), "history": json.dumps(history),
    })  # fmt: skip


def optimise(loss: Any, optimizer: Any, losses: list, progress: Any) -> None:
    """One optimiser step on ``loss``; records it and moves the progress bar."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses.append(float(loss.detach()))
    if progress is not None:
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.4f}")


def stop_now(stop: Any, steps_done: int, stop_after_steps: int | None) -> bool:
    """True after a SIGINT/SIGTERM (``stop``: a :class:`signals.SignalStop`) or once
    ``stop_after_steps`` steps are done (tests)."""
    return bool(stop.requested) or (stop_after_steps is not None and steps_done >= stop_after_steps)


def task_items(cfg: HeadConfig, split: str):
    try:
        items = list_images(cfg.data, split=split, limit=cfg.limit)
    except Exception as exc:  # a missing split is fine for test
        if split == "test":
            log.warning("no test images: %s", exc)
            return [], np.zeros(0)
        raise
    pairs = [(it, task_label(it, cfg.task, cfg.concept)) for it in items]
    pairs = [(it, y) for it, y in pairs if y is not None]
    return [p[0] for p in pairs], np.asarray([p[1] for p in pairs], dtype=np.float32)


def finite_auroc(y: np.ndarray, s: np.ndarray) -> float:
    from ..analysis.metrics import auroc

    ok = np.isfinite(s)
    return auroc(y[ok], s[ok]) if ok.any() else math.nan


def weights_config(cfg: HeadConfig, provenance: dict) -> dict:
    """Config for save_weights: what load_weights needs to rebuild the classifier, plus provenance."""
    return {
        "kind": "classifier",
        "backbone": cfg.backbone,
        "input_size": list(cfg.input_size),
        "preprocess": cfg.preprocess,
        "task": cfg.task,
        "concept": cfg.concept,
        "variant": cfg.variant,
        "provenance": provenance,
    }
