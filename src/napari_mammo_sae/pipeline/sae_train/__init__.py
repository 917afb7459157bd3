"""SAE training (``napari-mammo-sae train``), split at its seams.

- :mod:`.config`: :class:`TrainConfig` (options, TOML round trip) and :class:`TrainResult`;
- :mod:`.step`: one step's gradients (the hand-written ReLU + L1 step and its dense, gathered and
  per-token sparse paths; autograd for TopK / BatchTopK) and the optimiser;
- :mod:`.comm`: the collectives under ``torchrun`` (:class:`Comm`, safe at interpreter exit);
- :mod:`.checkpoint`: crash-safe checkpoints and the final weights;
- :mod:`.loop`: :func:`train_sae`, the loop itself (resampling, metrics log).

The command line lives in :mod:`napari_mammo_sae.pipeline.train_sae`, which re-exports these.
"""

from __future__ import annotations

from .checkpoint import CHECKPOINT_DIR, load_checkpoint, save_checkpoint, save_sae_weights
from .comm import Comm
from .config import METRIC_FIELDS, TrainConfig, TrainResult
from .loop import train_sae
from .step import PARAM_NAMES, autograd_grads, choose_path, make_optimizer, relu_grads

__all__ = [
    "CHECKPOINT_DIR", "METRIC_FIELDS", "PARAM_NAMES", "Comm", "TrainConfig", "TrainResult",
    "autograd_grads", "choose_path", "load_checkpoint", "make_optimizer", "relu_grads",
    "save_checkpoint", "save_sae_weights", "train_sae",
]  # fmt: skip
