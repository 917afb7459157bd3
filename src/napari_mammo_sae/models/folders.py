"""Loading the folders our commands write: a classifier weights folder ('train-head'), an SAE folder
('train'), or a released Mammo-CLIP classifier checkpoint; and the identities they are matched by
(the backbone's signature, the SAE file's sha256).

Every caller (the pipeline commands, :class:`models.inference.Analyzer`, the widgets) loads weights
through these functions, so ``models`` never imports ``pipeline``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError


def load_model_folder(folder: str | Path) -> tuple[Any, dict]:
    """(module, config) from a weights folder (:func:`models.weights.load_weights`)."""
    from .weights import load_weights

    return load_weights(folder)


def load_sae(folder: str | Path) -> Any:
    """The SAE module of a weights folder written by 'train', in eval mode."""
    path = Path(folder)
    if not (path / "model.safetensors").exists():
        raise ConfigError(f"no SAE weights in {path}: pass the folder written by 'train'")
    from .weights import load_weights

    sae, _ = load_weights(path)
    return sae.eval()


def sae_hook(config: dict | None, default: str | None = "head") -> str | None:
    """The backbone layer an SAE folder's config says it was trained at (``train`` records
    ``training.hook``); ``default`` when it says none (SAEs from before hook points, or saved by
    hand: the analysis then reads the last layer, and the channel check catches a mismatch)."""
    training = (config or {}).get("training") or {}
    hook = training.get("hook") or (config or {}).get("hook")
    return str(hook) if hook else default


def sae_sha256(folder: str | Path) -> str:
    """sha256 of an SAE folder's model.safetensors (the key the GUI looks probes up by)."""
    from .weights import sha256_file

    path = Path(folder)
    path = path / "model.safetensors" if path.is_dir() else path
    if not path.exists():
        raise ConfigError(f"no SAE weights at {path}: pass the folder written by 'train'")
    return sha256_file(path)


def load_classifier(
    weights: str | Path | None = None,
    mammoclip_checkpoint: str | Path | None = None,
    *,
    trust_pickle: bool = False,
) -> tuple[Any, dict]:
    """A classifier (backbone + head) from our weights folder or a Mammo-CLIP .pth, and its config."""
    if (weights is None) == (mammoclip_checkpoint is None):
        raise ConfigError("pass exactly one of --weights FOLDER or --mammoclip-checkpoint PATH")
    if weights is not None:
        if not Path(weights).exists():
            raise ConfigError(
                f"no weights folder at {weights}: pass a folder written by 'train-head'"
            )
        model, config = load_model_folder(weights)
        return model, dict(config)
    from .checkpoints import load_mammoclip_classifier

    model = load_mammoclip_classifier(mammoclip_checkpoint, trust_pickle=trust_pickle)
    return model, {"source": Path(mammoclip_checkpoint).name}


def backbone_signature(model: Any) -> str:
    """sha256 over the backbone's tensors (names, shapes, fp32 bytes): equal iff same features."""
    import hashlib

    import torch

    backbone = getattr(model, "backbone", model)
    h = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            continue
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
