"""The project's one weights format: a folder with ``config.json`` and ``model.safetensors``.

``config.json`` says what to build (a concept classifier: ``"kind": "classifier"`` and ``"backbone"``;
an SAE: ``"model": "SparseAutoencoder"`` and its constructor arguments) plus input size,
normalisation, concept, variant and provenance. Tensors may be stored in float16
(``"stored_dtype"``); they are loaded into float32 modules. A linear-probe folder may hold only its
head and name the folder its backbone comes from (``"backbone_weights": "../backbone-pretext"``,
checked against ``"backbone_sha256"``).

Bundled files are listed in ``weights/MANIFEST.json`` (``{"files": {"<folder>/model.safetensors":
{"sha256": ..., "bytes": ...}}}``); :func:`load_weights` verifies a folder's files against the
manifest one level above it (or the bundled one) and raises :class:`WeightsIntegrityError` on a
mismatch. No pickles anywhere: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, WeightsIntegrityError

CONFIG = "config.json"
MODEL = "model.safetensors"
MANIFEST = "MANIFEST.json"
FORMAT = "napari-mammo-sae/weights/1"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundled_weights_dir() -> Path | None:
    """The bundled demo weights, or None when absent.

    In a source checkout (editable install) the repository's ``weights/`` folder; in an installed
    wheel the copy the build put in the package (``napari_mammo_sae/_bundled_weights``, setup.py).
    """
    here = Path(__file__).resolve()  # repo/src/napari_mammo_sae/models/weights.py
    repo = here.parents[3]
    if (repo / "pyproject.toml").is_file() and (repo / "weights").is_dir():
        return repo / "weights"
    packaged = here.parents[1] / "_bundled_weights"
    return packaged if packaged.is_dir() else None


# --- saving ------------------------------------------------------------------------------------
def _describe(module: Any) -> dict[str, Any]:
    """Architecture fields a module knows about itself (merged under the caller's config)."""
    describe = getattr(module, "describe", None)
    if callable(describe):
        return dict(describe())
    config = getattr(module, "config", None)
    if callable(config):  # SparseAutoencoder.config()
        got = config()
        if isinstance(got, dict):
            return dict(got)
    return {}


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_weights(folder: str | Path, module: Any, config: dict) -> Path:
    """Write ``module`` as ``folder/model.safetensors`` + ``folder/config.json`` (atomic); the folder.

    The module's own architecture fields (classifier: backbone, static padding; SAE: its
    constructor arguments) are filled in where ``config`` does not give them.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    full = {**_describe(module), **dict(config)}
    full.setdefault("format", FORMAT)
    try:
        text = json.dumps(full, indent=1, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the weights config cannot be written as JSON ({exc})") from exc
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    # safetensors refuses tensors sharing memory: give each its own storage
    seen: set[int] = set()
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        if ptr is not None and ptr in seen:
            state[key] = value.clone()
        elif ptr is not None:
            seen.add(ptr)
    _atomic_write_bytes(
        folder / MODEL, lambda p: save_file(state, str(p), metadata={"format": FORMAT})
    )
    _atomic_write_bytes(folder / CONFIG, lambda p: p.write_text(text + "\n"))
    return folder


# --- manifest ----------------------------------------------------------------------------------
def _read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable weights manifest ({exc}): restore it from the repository"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("files", {}), dict):
        raise CheckpointError(f"{path} has no 'files' table: restore it from the repository")
    return data


def _manifest_entries(
    folder: Path, manifest: str | Path | dict | bool | None
) -> tuple[dict[str, dict], str]:
    """{file name in folder: manifest entry} and the manifest's name, for the folder's files."""
    if manifest is False:
        return {}, ""
    candidates: list[tuple[dict, Path, str]] = []
    if isinstance(manifest, dict):
        candidates.append((manifest, folder.parent, MANIFEST))
    elif manifest is not None and manifest is not True:
        path = Path(manifest)
        if not path.is_file():
            raise CheckpointError(f"no weights manifest at {path}: pass a MANIFEST.json file")
        candidates.append((_read_manifest(path), path.parent, str(path)))
    else:
        own = folder.parent / MANIFEST
        if own.is_file():
            candidates.append((_read_manifest(own), folder.parent, str(own)))
        bundled = bundled_weights_dir()
        if bundled is not None and (bundled / MANIFEST).is_file():
            root = bundled.resolve()
            if root != folder.parent and folder.is_relative_to(root):
                candidates.append(
                    (_read_manifest(bundled / MANIFEST), root, str(bundled / MANIFEST))
                )
    for data, root, name in candidates:
        try:
            rel = folder.relative_to(root).as_posix()
        except ValueError:
            continue
        files = data.get("files", {})
        found = {}
        for fname in (MODEL, CONFIG):
            entry = files.get(f"{rel}/{fname}")
            if isinstance(entry, dict) and "sha256" in entry:
                found[fname] = entry
        if found:
            return found, name
    return {}, ""


def verify_folder(folder: str | Path, manifest: str | Path | dict | bool | None = None) -> bool:
    """Check a weights folder's files against its manifest; True if listed, False if not listed.

    Raises :class:`WeightsIntegrityError` when a listed file's size or sha256 differs.
    """
    folder = Path(folder).resolve()
    entries, name = _manifest_entries(folder, manifest)
    for fname, entry in entries.items():
        path = folder / fname
        if not path.is_file():
            raise WeightsIntegrityError(
                f"{folder.name}/{fname} is listed in {Path(name).name} but missing: restore the "
                "weights folder (git checkout weights/ or `make weights`)"
            )
        size = entry.get("bytes")
        actual = sha256_file(path)
        if actual != entry["sha256"] or (size is not None and path.stat().st_size != int(size)):
            raise WeightsIntegrityError(
                f"{folder.name}/{fname} does not match {Path(name).name}: sha256 {actual[:12]}... "
                f"where {entry['sha256'][:12]}... is recorded. The file is corrupt or was changed "
                "after the manifest was written: restore it (git checkout weights/ or "
                "`make weights`), or load a copy outside the manifest's folder"
            )
    return bool(entries)


# --- loading -----------------------------------------------------------------------------------
def _folder_of(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (MODEL, CONFIG):
        path = path.parent
    if not path.exists():
        raise CheckpointError(
            f"no weights folder at {path}: pass a folder with {CONFIG} and {MODEL}"
        )
    if not path.is_dir() or not (path / CONFIG).is_file() or not (path / MODEL).is_file():
        raise CheckpointError(
            f"{path} is not a weights folder: expected {CONFIG} and {MODEL} in it (a Mammo-CLIP "
            ".pth/.tar checkpoint loads with --mammoclip-checkpoint, the Mammo-SAE .pt with "
            "load_mammosae)"
        )
    return path.resolve()


def read_config(folder: str | Path) -> dict:
    """The parsed ``config.json`` of a weights folder (CheckpointError if unreadable)."""
    folder = _folder_of(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder.name}/{CONFIG} is not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder.name}/{CONFIG} does not hold a JSON object")
    return config


def _read_tensors(folder: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(folder / MODEL))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{folder.name}/{MODEL} is not a readable safetensors file ({exc}): restore or "
            "re-create the weights"
        ) from exc


def is_sae_config(config: dict) -> bool:
    """True when a weights config describes a SparseAutoencoder."""
    return config.get("model") == "SparseAutoencoder" or config.get("kind") in ("sae", "SAE")


def build_module(config: dict) -> Any:
    """An untrained module of the architecture a weights config describes."""
    from .classifier import build_classifier_from_config
    from .sae import SparseAutoencoder

    if is_sae_config(config):
        try:
            return SparseAutoencoder.from_config(config)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"the SAE config lacks a field ({exc})") from exc
    if config.get("kind", "classifier") == "classifier" and isinstance(config.get("backbone"), str):
        return build_classifier_from_config(config)
    raise CheckpointError(
        "the weights config describes neither a classifier ('kind': 'classifier' with a "
        "'backbone') nor an SAE ('model': 'SparseAutoencoder'): pass a folder written by "
        "'train-head' or 'train'"
    )


def _backbone_tensors(folder: Path, config: dict, manifest: Any) -> dict:
    """``backbone.*`` tensors of the folder a head-only folder names in ``backbone_weights``."""
    ref = (folder / str(config["backbone_weights"])).resolve()
    try:
        ref = _folder_of(ref)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{folder.name} takes its backbone from {config['backbone_weights']}, which is not a "
            f"weights folder: keep the two folders side by side ({exc})"
        ) from exc
    verify_folder(ref, manifest if manifest is False or isinstance(manifest, str | Path) else None)
    want = config.get("backbone_sha256")
    if want and sha256_file(ref / MODEL) != want:
        raise WeightsIntegrityError(
            f"{folder.name} was trained on a different backbone than the one now in {ref.name} "
            "(backbone_sha256 differs): restore the matching backbone folder"
        )
    state = _read_tensors(ref)
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


def load_weights(
    folder: str | Path, *, manifest: str | Path | dict | bool | None = None
) -> tuple[Any, dict]:
    """(module in eval mode, config) from a weights folder, verified against its manifest.

    ``manifest``: None looks for ``MANIFEST.json`` one level above the folder (and the bundled
    ``weights/MANIFEST.json``); a path or dict uses that one; False skips the check.
    """
    import torch

    folder = _folder_of(folder)
    verify_folder(folder, manifest)
    config = read_config(folder)
    module = build_module(config)
    state = _read_tensors(folder)
    if config.get("backbone_weights") and not any(k.startswith("backbone.") for k in state):
        state = {**_backbone_tensors(folder, config, manifest), **state}
    expected = module.state_dict()
    for key, value in list(state.items()):
        ref = expected.get(key)
        if ref is not None and value.dtype != ref.dtype and value.is_floating_point():
            state[key] = value.to(ref.dtype)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = [
            k
            for k in set(expected) & set(state)
            if tuple(expected[k].shape) != tuple(state[k].shape)
        ]
        detail = "; ".join(
            part
            for part in (
                f"missing {_few(missing)}" if missing else "",
                f"unexpected {_few(unexpected)}" if unexpected else "",
                f"wrong shape {_few(shapes)}" if shapes else "",
            )
            if part
        )
        raise CheckpointError(
            f"the tensors in {folder.name}/{MODEL} do not fit the architecture its {CONFIG} "
            f"describes ({detail or exc}): the folder is inconsistent, re-create it"
        ) from exc
    if isinstance(module, torch.nn.Module):
        module.eval()
    return module, config


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
