"""Which model the widgets run: the bundled default or user-chosen files, loaded once and cached.

Qt-free (the widgets call it from worker threads). Sources:

* ``bundled``: ``weights/<variant>-<concept>`` (classifier), ``weights/sae-finetuned-calcification``
  (the one SAE, as in the paper) and ``weights/probes/<concept>.npz`` (dataset rankings, gallery);
* ``custom``: a classifier - our weights folder or a Mammo-CLIP downstream ``.pth`` (pickled: needs
  the trust switch) - and an SAE - our folder or the paper's ``sparse_autoencoder_final.pt``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError

SAE_FOLDER = "sae-finetuned-calcification"


@dataclass(frozen=True)
class ModelChoice:
    """What to load: classifier and SAE locations (+ optional probe file)."""

    classifier: Path
    sae: Path
    probe: Path | None = None
    trust_pickle: bool = False
    device: str = "auto"


@dataclass
class LoadedModels:
    """Loaded classifier + SAE, their Analyzer, the SAE's hash and the matching probe result."""

    choice: ModelChoice
    analyzer: Any
    sae_hash: str
    probe: Any  # ProbeResult | None
    config: dict


def bundled_choice(concept: str, variant: str, device: str = "auto") -> ModelChoice:
    """The bundled demo weights for a concept and variant (ConfigError when not built)."""
    from ..models.weights import bundled_weights_dir

    root = bundled_weights_dir()
    clf = root / f"{variant}-{concept}" if root else None
    if root is None or not (root / "MANIFEST.json").exists() or not clf.is_dir():
        raise ConfigError(
            "the bundled demo weights are not there (run `make weights`), or choose a classifier "
            "and an SAE by path"
        )
    probe = root / "probes" / f"{concept}.npz"
    return ModelChoice(clf, root / SAE_FOLDER, probe if probe.exists() else None, False, device)


def _sha256(path: Path) -> str:
    from ..models.weights import sha256_file

    target = path / "model.safetensors" if path.is_dir() else path
    return sha256_file(target)


def _load_classifier(path: Path, trust_pickle: bool) -> tuple[Any, dict]:
    if not path.exists():
        raise CheckpointError(f"no classifier at {path}: choose a weights folder or a .pth file")
    if path.is_dir():
        from ..models.weights import load_weights

        model, config = load_weights(path)
        return model, dict(config)
    from ..models.checkpoints import load_mammoclip_classifier

    return load_mammoclip_classifier(path, trust_pickle=trust_pickle), {"source": path.name}


def _load_sae(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"no SAE at {path}: choose a folder written by 'train' or a .pt file")
    if path.is_dir():
        from ..models.weights import load_weights

        sae, _ = load_weights(path)
        return sae
    from ..models.sae import load_mammosae

    return load_mammosae(path)


_CACHE: dict[ModelChoice, LoadedModels] = {}
_LOCK = threading.Lock()


def load_models(choice: ModelChoice) -> LoadedModels:
    """Load (or reuse) the models of a choice; the Analyzer's image cache is kept across runs."""
    with _LOCK:
        if choice in _CACHE:
            return _CACHE[choice]
        from ..models.inference import Analyzer

        classifier, config = _load_classifier(choice.classifier, choice.trust_pickle)
        sae = _load_sae(choice.sae)
        analyzer = Analyzer(classifier, sae, config=config, device=choice.device)
        sae_hash = _sha256(choice.sae)
        probe = None
        if choice.probe is not None and choice.probe.exists():
            from ..pipeline.probe import load_probe

            candidate = load_probe(choice.probe)
            if candidate.sae_sha256 == sae_hash:
                probe = candidate
        loaded = LoadedModels(choice, analyzer, sae_hash, probe, config)
        _CACHE[choice] = loaded
        return loaded
