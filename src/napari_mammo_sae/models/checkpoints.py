"""Load the published Mammo-CLIP checkpoints (and the Mammo-SAE one) into our modules.

Mammo-CLIP's image encoders are efficientnet-pytorch ("lukemelas") EfficientNets (SPEC 1). On load
the lukemelas keys are renamed to timm's (:func:`lukemelas_to_timm`) and the timm ``tf_`` model's
dynamic "same" padding is replaced by lukemelas' static padding (:func:`~.backbone.set_static_same_padding`),
so ``forward_features`` equals the reference ``extract_features`` to float rounding at any size.

Files:

- downstream classifier ``.pth`` (:func:`load_mammoclip_classifier`): ``{"model": state_dict, ...}``
  with ``image_encoder.<lukemelas key>`` and ``classifier.classification_head.{weight,bias}``.
  Always take the encoder from this file (its BatchNorm statistics differ from the CLIP file's).
- pretrained CLIP ``.tar`` (:func:`load_mammoclip_clip`): ``{"model": ..., "config": ...}`` with
  ``image_encoder.*``, ``text_encoder.*``, projections and ``logit_scale``.

``torch.load`` runs with ``weights_only=True`` and exactly the numpy array/scalar reconstruction
allow-listed, so released downstream files (``{"model": state_dict, "predictions": ndarray, "epoch":
int, "auroc": float}``) load as they are. Files that need more (optimizer/scheduler or config objects)
are refused with :class:`UnsafePickleError` unless ``trust_pickle=True`` (``--trust-pickle``):
unpickling can run arbitrary code hidden in the file. A corrupt or truncated file is never unpickled.
"""

from __future__ import annotations

import io
import logging
import pickle
import pickletools
import re
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, UnsafePickleError
from .backbone import LUKEMELAS_IMAGE_SIZE, create_backbone
from .classifier import ConceptClassifier
from .heads import ConceptHead
from .sae import load_mammosae

log = logging.getLogger(__name__)

__all__ = [
    "MAMMOCLIP_ENCODERS",
    "identify_efficientnet",
    "load_checkpoint_file",
    "load_mammoclip_classifier",
    "load_mammoclip_clip",
    "load_mammosae",
    "lukemelas_to_timm",
]

#: Mammo-CLIP's encoder names (their configs) -> timm architecture (SPEC 1)
MAMMOCLIP_ENCODERS = {
    "tf_efficientnet_b5_ns-detect": "tf_efficientnet_b5",
    "tf_efficientnetv2-detect": "tf_efficientnet_b2",
}

#: (blocks, stem channels, head channels) of efficientnet-pytorch B0-B7 -> timm name
_EFFICIENTNETS = {
    (16, 32, 1280): "tf_efficientnet_b0",
    (23, 32, 1280): "tf_efficientnet_b1",
    (23, 32, 1408): "tf_efficientnet_b2",
    (26, 40, 1536): "tf_efficientnet_b3",
    (32, 48, 1792): "tf_efficientnet_b4",
    (39, 48, 2048): "tf_efficientnet_b5",
    (45, 56, 2304): "tf_efficientnet_b6",
    (55, 64, 2560): "tf_efficientnet_b7",
}

#: Mammo-CLIP's head dropout (inactive in eval mode)
_HEAD_DROPOUT = {"tf_efficientnet_b5": 0.4, "tf_efficientnet_b2": 0.3}

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
_DS_BLOCK = {  # expand ratio 1 (no _expand_conv): timm DepthwiseSeparableConv
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_IR_BLOCK = {  # timm InvertedResidual
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_CLASSIFIER_KEYS = ("classifier.classification_head.weight", "classifier.classification_head.bias")
_CLIP_PREFIXES = ("text_encoder.", "image_projection.", "text_projection.", "logit_scale")


# --- safe file loading ---------------------------------------------------------------------------
#: numpy dtype codes whose dtype objects a released checkpoint's arrays may carry (no object/void)
_NUMPY_DTYPE_CODES = "?bhilqBHILQefdgFDGSU" + "Mm"


def _numpy_safe_globals() -> list[Any]:
    """What unpickling a plain numpy array or scalar needs, and nothing more.

    ``_reconstruct`` and ``scalar`` under both module paths numpy has pickled them with (numpy 1:
    ``numpy.core.multiarray``, numpy 2: ``numpy._core.multiarray``), ``ndarray``, ``dtype`` and the
    dtype classes of numeric, bool, bytes, str and datetime dtypes (their BUILD step needs them).
    Object and structured (void) dtypes are left out: their state can hold arbitrary objects.
    """
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    out: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out.append((multiarray._reconstruct, f"{module}._reconstruct"))
        out.append((multiarray.scalar, f"{module}.scalar"))
    dtype_classes = {type(np.dtype(code)) for code in _NUMPY_DTYPE_CODES}
    out.extend(cls for cls in dtype_classes if cls is not np.dtype)
    return out


def _safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with numpy arrays/scalars allow-listed (nothing else)."""
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _allowed_global_names() -> set[str]:
    """Names torch's weights-only loader accepts here (its defaults + the numpy allow-list)."""
    ours = {
        f[1] if isinstance(f, tuple) else f"{f.__module__}.{f.__qualname__}"
        for f in _numpy_safe_globals()
    }
    try:  # torch's own default list is private; without it every other global counts as unsafe
        from torch import _weights_only_unpickler as wou

        return ours | set(wou._get_allowed_globals())
    except (ImportError, AttributeError):
        return ours


def _python3_name(module: str, name: str) -> str:
    """module.name as unpickling resolves it (protocol 2 writes Python 2 names, e.g. __builtin__)."""
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _pickle_globals(data: bytes, *, count: int = 1) -> tuple[list[str], int]:
    """(module.name of every GLOBAL, end offset) of ``count`` complete pickles at the start of ``data``.

    Reads the opcodes only (``pickletools``): nothing is unpickled. Raises ValueError when a pickle is
    truncated or malformed.
    """
    names: list[str] = []
    pos = 0
    for _ in range(count):
        stream = io.BytesIO(data[pos:])
        strings: list[str] = []
        stopped = False
        for op, arg, _offset in pickletools.genops(stream):
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                names.append(_python3_name(module, name))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
            elif op.name == "STOP":
                stopped = True
        if not stopped:
            raise ValueError("pickle without STOP")
        pos += stream.tell()
    return names, pos


#: the pickles at the start of a legacy (pre-zip) torch file: magic, protocol, sys info, object, keys
_LEGACY_PICKLES = 5


def _intact_globals(path: Path) -> list[str]:
    """Globals the checkpoint's pickle names, after checking the file is whole; raises on corruption.

    A torch zip must pass every member's CRC and hold one complete ``data.pkl`` with nothing after
    its STOP; a legacy file must start with complete pickles. Nothing is unpickled.
    """
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
                if bad is not None:
                    raise ValueError(f"member {bad} fails its CRC")
                pickles = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
                if len(pickles) != 1:
                    raise ValueError("no single data.pkl: not a torch.save file")
                data = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise ValueError(str(exc)) from exc
        names, end = _pickle_globals(data)
        if end != len(data):
            raise ValueError("bytes after the end of data.pkl")
        return names
    names, _ = _pickle_globals(path.read_bytes(), count=_LEGACY_PICKLES)
    return names


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path.name} is not a readable torch checkpoint ({why[:200]}): the file is corrupt, "
        "truncated or another format; download it again"
    )


def _refusal(path: Path, needs: list[str]) -> UnsafePickleError:
    what = f" (it stores {', '.join(needs[:4])}{' ...' if len(needs) > 4 else ''})" if needs else ""
    return UnsafePickleError(
        f"{path.name} is a pickled checkpoint that torch's safe loader cannot read{what}. Loading "
        "it means unpickling, and unpickling can run arbitrary code hidden in the file with your "
        "permissions. Only if you trust where the file came from (e.g. the official Mammo-CLIP "
        "release), load it with trust_pickle=True (command line: --trust-pickle); otherwise do "
        "not load it."
    )


def load_checkpoint_file(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """Load a torch checkpoint safely; full unpickling only with ``trust_pickle=True``.

    First ``torch.load(weights_only=True)`` with exactly the numpy array/scalar reconstruction
    allow-listed (released Mammo-CLIP files hold their predictions as a numpy array). When that
    refuses the file, the file is checked without unpickling (zip CRCs, complete pickle): a corrupt
    file raises :class:`CheckpointError` and never reaches the full unpickler, whatever
    ``trust_pickle`` says; an intact file whose pickle needs other globals raises
    :class:`UnsafePickleError` unless ``trust_pickle=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}: check the path")
    try:
        return _safe_load(path)
    except Exception as exc:  # noqa: BLE001 - torch raises many types; sorted out below
        safe_error = exc
    try:
        names = _intact_globals(path)
    except (ValueError, OSError) as exc:
        raise _corrupt(path, str(exc) or exc.__class__.__name__) from safe_error
    allowed = _allowed_global_names()
    needs = sorted({n for n in names if n not in allowed})
    msg = str(safe_error)
    if not needs and not any(
        s in msg for s in ("Unsupported global", "allowlisted", "unrecognized function")
    ):
        first = msg.splitlines()[0] if msg else safe_error.__class__.__name__
        raise _corrupt(path, first) from safe_error
    if not trust_pickle:
        raise _refusal(path, needs) from None
    log.warning("unpickling %s with trust_pickle=True (can run code from the file)", path.name)
    stubbed: list[str] = []
    try:
        obj = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle(stubbed)
        )
    except Exception as exc:  # noqa: BLE001 - anything the pickle does is the file's fault
        raise CheckpointError(
            f"{path.name} could not be unpickled ({exc.__class__.__name__}: {exc})"
        ) from exc
    if stubbed:
        log.info("%s: classes not importable here were skipped: %s", path.name, ", ".join(stubbed))
    return obj


class _Missing:
    """Stand-in for a class a trusted pickle names but this environment cannot import."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _lenient_pickle(stubbed: list[str]) -> Any:
    """A pickle module whose Unpickler replaces unimportable classes (e.g. a training framework's
    config objects around the tensors) by :class:`_Missing` stubs. Only used with trust_pickle."""
    import types

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (ModuleNotFoundError, AttributeError):
                stubbed.append(f"{module}.{name}")
                return type(name, (_Missing,), {"__module__": module})

    lenient = types.ModuleType("lenient_pickle")
    lenient.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    lenient.Unpickler = Unpickler
    return lenient


def _state_and_meta(obj: Any, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor state dict, scalar metadata) of a loaded checkpoint object."""
    meta: dict[str, Any] = {}
    state = obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj:
                state = obj[key]
                break
        for key, value in obj.items():
            if isinstance(value, int | float | str) and not isinstance(value, bool):
                meta[key] = value
            elif isinstance(value, torch.Tensor) and value.numel() == 1 and key != "logit_scale":
                meta[key] = value.item()
        config = obj.get("config")
        if isinstance(config, Mapping):
            try:
                meta["encoder_name"] = str(config["model"]["image_encoder"]["name"])
            except (KeyError, TypeError):
                pass
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            f"{name} does not hold a state dict (found {type(obj).__name__}): pass a Mammo-CLIP "
            "checkpoint"
        )
    tensors = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            key = str(key)
            tensors[key[len("module.") :] if key.startswith("module.") else key] = value
    if not tensors:
        raise CheckpointError(f"{name} holds no tensors: pass a Mammo-CLIP checkpoint")
    return tensors, meta


# --- key conversion ------------------------------------------------------------------------------
def identify_efficientnet(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The timm name (tf_efficientnet_b0..b7) of a lukemelas EfficientNet state dict."""
    try:
        stem = int(state_dict["_conv_stem.weight"].shape[0])
        head = int(state_dict["_conv_head.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointError(
            f"the image encoder lacks {exc.args[0]}: not an efficientnet-pytorch EfficientNet"
        ) from exc
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    n = max(blocks) + 1 if blocks else 0
    name = _EFFICIENTNETS.get((n, stem, head))
    if name is None:
        raise CheckpointError(
            f"the image encoder ({n} blocks, {stem} stem and {head} head channels) is none of "
            "EfficientNet-B0..B7: not a Mammo-CLIP EfficientNet checkpoint"
        )
    return name


def lukemelas_to_timm(
    state_dict: Mapping[str, torch.Tensor], depths: Sequence[int] | nn.Module
) -> dict[str, torch.Tensor]:
    """Rename efficientnet-pytorch keys to timm EfficientNet keys (SPEC 1.2).

    ``depths``: blocks per stage (B5 [3, 5, 5, 7, 7, 9, 3]) or the timm model itself. ``_fc.*`` is
    dropped. A block without ``_expand_conv`` is a depthwise-separable block (timm names differ).
    """
    if isinstance(depths, nn.Module):
        depths = [len(stage) for stage in depths.blocks]
    where: list[tuple[int, int]] = [(s, j) for s, d in enumerate(depths) for j in range(int(d))]
    expanded = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("_fc."):
            continue
        top, _, param = key.partition(".")
        if top in _TOP and "." not in param:
            out[f"{_TOP[top]}.{param}"] = value
            continue
        m = _BLOCK_KEY.match(key)
        if m is None:
            raise CheckpointError(
                f"unexpected key {key!r} in the image encoder: not an efficientnet-pytorch "
                "EfficientNet"
            )
        n, sub, param = int(m.group(1)), m.group(2), m.group(3)
        if n >= len(where):
            raise CheckpointError(
                f"the image encoder has block {n} but the architecture has {len(where)} blocks: "
                "the checkpoint is from another EfficientNet size"
            )
        table = _IR_BLOCK if n in expanded else _DS_BLOCK
        if sub not in table:
            raise CheckpointError(f"unexpected key {key!r} in the image encoder")
        stage, j = where[n]
        out[f"blocks.{stage}.{j}.{table[sub]}.{param}"] = value
    return out


def _build_encoder(encoder: Mapping[str, torch.Tensor], name: str) -> nn.Module:
    """A timm backbone with lukemelas static padding holding the converted encoder weights."""
    arch = identify_efficientnet(encoder)
    backbone = create_backbone(arch, static_padding=LUKEMELAS_IMAGE_SIZE[arch])
    converted = lukemelas_to_timm(encoder, backbone)
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shapes = sorted(
        k for k in set(expected) & set(converted) if expected[k].shape != converted[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if shapes:
            parts.append(f"wrong shape {_few(shapes)}")
        raise CheckpointError(
            f"the image encoder in {name} does not fit {arch} ({'; '.join(parts)}): the file is "
            "incomplete or not a Mammo-CLIP EfficientNet checkpoint"
        )
    backbone.load_state_dict(converted, strict=True)
    return backbone.eval()


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _encoder_part(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "image_encoder."
    encoder = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder and "_conv_stem.weight" in state:  # a bare efficientnet-pytorch state dict
        encoder = {
            k: v for k, v in state.items() if k.startswith(("_conv", "_bn", "_blocks", "_fc"))
        }
    return encoder


def _variant_from_name(name: str) -> str | None:
    """'pretrained' for Mammo-CLIP's linear-probe file names (``_lp_``), 'finetuned' for ``_ft_``."""
    tokens = set(re.split(r"[_\-.]", Path(name).name.lower()))
    if "lp" in tokens or "linear" in tokens:
        return "pretrained"
    if "ft" in tokens or "finetune" in tokens or "fine" in tokens:
        return "finetuned"
    return None


# --- public loaders ------------------------------------------------------------------------------
def load_mammoclip_classifier(path: str | Path, *, trust_pickle: bool = False) -> ConceptClassifier:
    """A Mammo-CLIP downstream classifier ``.pth`` as a ConceptClassifier (eval mode)."""
    path = Path(path)
    obj = load_checkpoint_file(path, trust_pickle=trust_pickle)
    state, meta = _state_and_meta(obj, path.name)
    if any(k.startswith(_CLIP_PREFIXES) for k in state) and _CLASSIFIER_KEYS[0] not in state:
        raise CheckpointError(
            f"{path.name} is a Mammo-CLIP pretrained CLIP checkpoint (image and text encoders), not a "
            "downstream classifier: pass a downstream classifier .pth (e.g. upmc_breast_clip_det_"
            "b5_period_n_ft_..._ver084.pth); its image encoder alone loads with load_mammoclip_clip"
        )
    if "encoder._weight" in state and "tied_bias" in state:
        raise CheckpointError(
            f"{path.name} is a Mammo-SAE sparse autoencoder, not a Mammo-CLIP classifier: load it "
            "as the SAE (load_mammosae / --sae)"
        )
    encoder = _encoder_part(state)
    if not encoder:
        raise CheckpointError(
            f"{path.name} has no image_encoder.* tensors: not a Mammo-CLIP downstream classifier"
        )
    missing_head = [k for k in _CLASSIFIER_KEYS if k not in state]
    if missing_head:
        raise CheckpointError(
            f"{path.name} has no concept head ({', '.join(missing_head)} missing): pass a "
            "Mammo-CLIP downstream classifier .pth, not an encoder-only file"
        )
    backbone = _build_encoder(encoder, path.name)
    weight, bias = (state[k] for k in _CLASSIFIER_KEYS)
    channels = int(backbone.num_features)
    if tuple(weight.shape) != (1, channels) or tuple(bias.shape) != (1,):
        raise CheckpointError(
            f"{path.name}: the classification head has shape {tuple(weight.shape)} / "
            f"{tuple(bias.shape)}, expected (1, {channels}) / (1,) - a one-output concept head"
        )
    head = ConceptHead(channels, dropout=_HEAD_DROPOUT.get(backbone.backbone_name, 0.0))
    with torch.no_grad():
        head.weight.copy_(weight.float())
        head.bias.copy_(bias.float())
    model = ConceptClassifier(backbone, head, variant=_variant_from_name(path.name))
    model.checkpoint_info = {"source": path.name, "format": "mammoclip-classifier", **meta}
    return model.eval()


def load_mammoclip_clip(path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """The image encoder of a Mammo-CLIP pretrained ``.tar`` as a timm backbone (eval mode).

    For analysis prefer the downstream classifier's encoder (:func:`load_mammoclip_classifier`):
    its BatchNorm statistics are the ones the concept heads were trained with.
    """
    path = Path(path)
    obj = load_checkpoint_file(path, trust_pickle=trust_pickle)
    state, meta = _state_and_meta(obj, path.name)
    if "encoder._weight" in state and "tied_bias" in state:
        raise CheckpointError(
            f"{path.name} is a Mammo-SAE sparse autoencoder, not a Mammo-CLIP checkpoint"
        )
    encoder = _encoder_part(state)
    if not encoder:
        raise CheckpointError(
            f"{path.name} has no image_encoder.* tensors: not a Mammo-CLIP checkpoint"
        )
    if _CLASSIFIER_KEYS[0] in state:
        log.info("%s is a downstream classifier: using its image encoder", path.name)
    backbone = _build_encoder(encoder, path.name)
    name = meta.get("encoder_name")
    if isinstance(name, str) and name in MAMMOCLIP_ENCODERS:
        if MAMMOCLIP_ENCODERS[name] != backbone.backbone_name:
            log.warning(
                "%s: config names %s but the weights are %s",
                path.name,
                name,
                backbone.backbone_name,
            )
    backbone.checkpoint_info = {"source": path.name, "format": "mammoclip-clip", **meta}
    return backbone
