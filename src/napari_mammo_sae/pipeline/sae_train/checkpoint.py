"""Crash-safe training checkpoints and the final SAE weights.

Layout of ``<out>/checkpoint/``::

    LATEST                      the name of the current checkpoint folder (one line)
    step-000001000/             state.safetensors (weights, Adam state, tracking, torch RNG)
                                state.json (step, data position, config, numpy/python RNG)

A new checkpoint is written completely into its own ``step-N`` folder beside the current one (each
file fsync'd, then the folder), and only then does ``LATEST`` switch to it: ``LATEST.tmp`` is
written and fsync'd and ``os.replace``'d over ``LATEST`` (atomic on POSIX and Windows), then the
checkpoint folder is fsync'd. Older ``step-*`` folders are removed after the switch. A kill at any
instant therefore leaves ``LATEST`` naming a complete checkpoint (the old one until the switch, the
new one after it); half-written folders are never read and are removed by the next save.
Runs written before this layout (``state.safetensors`` + ``state.json`` directly in the folder)
still resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError
from .step import PARAM_NAMES

CHECKPOINT_DIR = "checkpoint"
POINTER = "LATEST"
TENSORS, META = "state.safetensors", "state.json"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (new files, renames) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensors(path: Path, tensors: dict, step: int) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"step": str(step)})
    _fsync_file(path)


def _write_meta(path: Path, meta: dict) -> None:
    with open(path, "w") as fh:
        fh.write(json.dumps(meta, indent=1))
        fh.flush()
        os.fsync(fh.fileno())


def _switch_pointer(folder: Path, name: str) -> None:
    tmp = folder / (POINTER + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / POINTER)
    _fsync_dir(folder)


def current_name(folder: Path) -> str | None:
    """The checkpoint folder ``LATEST`` names, or None when there is no pointer."""
    try:
        name = (folder / POINTER).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def has_checkpoint(folder: Path) -> bool:
    """True when ``folder`` holds a checkpoint (either layout)."""
    return (folder / POINTER).exists() or (folder / META).exists()


def save_checkpoint(folder: Path, sae: Any, opt: Any, tracking: dict, meta: dict) -> Path:
    """Weights, Adam state, dead-latent tracking, RNG states and data position; crash-safe.

    Returns the new checkpoint's folder (see the module docstring for the protocol).
    """
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    tensors = {f"sae.{n}": getattr(sae, n).detach().cpu().contiguous() for n in PARAM_NAMES}
    for name, buf in sae.named_buffers():
        tensors[f"buffer.{name}"] = buf.detach().cpu().contiguous()
    for n in PARAM_NAMES:
        state = opt.state.get(getattr(sae, n), {})
        for key, value in state.items():
            tensors[f"adam.{n}.{key}"] = value.detach().cpu().reshape(value.shape).contiguous()
    for key, value in tracking.items():
        tensors[f"track.{key}"] = value.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        **meta,
        "rng_numpy": _np_state_json(np.random.get_state()),  # noqa: NPY002
        "rng_python": _py_state_json(random.getstate()),
    }
    keep = current_name(folder)
    name = f"step-{step:09d}"
    if name == keep:  # the same step again (nothing new): the current checkpoint stays
        return folder / name
    target = folder / name
    if target.exists():  # a half-written folder of an earlier, killed save
        shutil.rmtree(target)
    target.mkdir()
    _write_tensors(target / TENSORS, tensors, step)
    _write_meta(target / META, meta)
    _fsync_dir(target)
    _fsync_dir(folder)
    _switch_pointer(folder, name)
    _remove_stale(folder, keep=name)
    return target


def _remove_stale(folder: Path, keep: str) -> None:
    """Remove every other checkpoint folder and the old single-folder layout's files."""
    for child in folder.iterdir():
        if child.is_dir() and child.name.startswith("step-") and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)
    for old in (TENSORS, META, TENSORS + ".tmp", META + ".tmp"):
        (folder / old).unlink(missing_ok=True)


def load_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(tensors, meta) of the current checkpoint; ConfigError when missing or unreadable."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    name = current_name(folder)
    where = folder / name if name is not None else folder
    tf, jf = where / TENSORS, where / META
    if not tf.exists() or not jf.exists():
        if name is not None:
            raise ConfigError(
                f"the checkpoint {folder / POINTER} names ({name}) is incomplete: the folder was "
                "changed by hand; restore it or start a new run"
            )
        raise ConfigError(f"nothing to resume in {folder.parent}: no checkpoint there")
    try:
        meta = json.loads(jf.read_text())
        with safe_open(str(tf), "pt") as fh:
            step = int((fh.metadata() or {}).get("step", -1))
        tensors = load_file(str(tf))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the checkpoint in {where} is unreadable ({exc})") from exc
    if step != int(meta.get("step", -2)):
        raise ConfigError(f"the checkpoint in {where} is torn (interrupted while saving)")
    return tensors, meta


def _np_state_json(state: tuple) -> list:
    return [state[0], state[1].tolist(), *state[2:]]


def _py_state_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def restore_rngs(tensors: dict, meta: dict) -> None:
    """Put torch's, numpy's and Python's RNGs back as a checkpoint saved them."""
    import torch

    torch.set_rng_state(tensors["rng.torch"])
    s = meta["rng_numpy"]
    np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), *s[2:]))  # noqa: NPY002
    p = meta["rng_python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_sae_weights(folder: Path, sae: Any, extra: dict | None = None) -> Path:
    """Final weights in the project format: config.json + model.safetensors (models/weights.py)."""
    from ...models.weights import save_weights

    return Path(save_weights(folder, sae, {**sae.config(), **(extra or {})}))
