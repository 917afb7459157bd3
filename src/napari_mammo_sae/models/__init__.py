"""Backbones, concept heads, sparse autoencoders, checkpoint conversion and weight files.

Names are re-exported lazily, so importing one submodule (e.g. ``models.sae``) does not import timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_backbone": "backbone",
    "feature_dim": "backbone",
    "set_static_same_padding": "backbone",
    "ConceptHead": "heads",
    "ConceptClassifier": "classifier",
    "SparseAutoencoder": "sae",
    "load_mammosae": "sae",
    "load_mammoclip_classifier": "checkpoints",
    "load_mammoclip_clip": "checkpoints",
    "lukemelas_to_timm": "checkpoints",
    "save_weights": "weights",
    "load_weights": "weights",
    "sha256_file": "weights",
    "bundled_weights_dir": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
