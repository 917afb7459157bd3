"""CNN backbones from timm (always ``pretrained=False``) and the analysed feature map.

The analysed feature is the head activation before pooling, timm's ``forward_features``:
``Swish(BN(conv_head(...)))`` for EfficientNets, ``2048 x 48 x 29`` for ``tf_efficientnet_b5`` at
1520 x 912 (SPEC 1).

Mammo-CLIP's encoders are the ``efficientnet-pytorch`` ("lukemelas") EfficientNets, whose strided
convolutions pad *statically* with pads computed for the architecture's nominal image size (456 for
B5, 260 for B2), while timm's ``tf_`` models pad dynamically for the real input ("same"). At
1520 x 912 the two differ at a few convolutions (B5: ``blocks.3.0.conv_dw``). :func:`set_static_same_padding`
makes every dynamic-"same" convolution of a timm model pad exactly as lukemelas does, so converted
Mammo-CLIP weights give the reference features at any input size (SPEC 1.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

DEFAULT_BACKBONE = "tf_efficientnet_b5"

#: nominal image size of each EfficientNet in efficientnet-pytorch (its static padding is computed
#: for this size): efficientnet_params() of the reference package
LUKEMELAS_IMAGE_SIZE = {
    "tf_efficientnet_b0": 224,
    "tf_efficientnet_b1": 240,
    "tf_efficientnet_b2": 260,
    "tf_efficientnet_b3": 300,
    "tf_efficientnet_b4": 380,
    "tf_efficientnet_b5": 456,
    "tf_efficientnet_b6": 528,
    "tf_efficientnet_b7": 600,
}


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    static_padding: int | tuple[int, int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm CNN by name, random weights (never downloads), classifier removed.

    ``static_padding``: image size whose lukemelas static "same" pads every dynamic-"same"
    convolution should use (see :func:`set_static_same_padding`); None keeps timm's padding.
    Extra keyword arguments go to ``timm.create_model`` (``num_classes`` defaults to 0).
    """
    import timm

    if kwargs.pop("pretrained", False):
        raise ConfigError(
            "backbones are always built with pretrained=False (no downloads): load weights from a "
            "weights folder or a Mammo-CLIP checkpoint instead"
        )
    kwargs.setdefault("num_classes", 0)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ConfigError(
            f"unknown backbone {name!r}: use a timm model name such as tf_efficientnet_b5, "
            "tf_efficientnet_b2 or test_efficientnet"
        ) from exc
    model.backbone_name = name
    if static_padding is not None:
        set_static_same_padding(model, static_padding)
    return model


def backbone_name(model: nn.Module) -> str:
    """The timm architecture name a backbone was built from."""
    name = getattr(model, "backbone_name", None)
    if isinstance(name, str):
        return name
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return str(cfg.get("architecture", type(model).__name__))


def feature_dim(model: nn.Module) -> int:
    """Channels C of the backbone's feature map (``forward_features``)."""
    if isinstance(model, HookedBackbone):
        return model.point.channels
    model = getattr(model, "backbone", model)
    n = getattr(model, "num_features", None)
    if isinstance(n, int) and n > 0:
        return n
    info = getattr(model, "feature_info", None)
    if info:
        try:
            return int(info[-1]["num_chs"])
        except (KeyError, TypeError, IndexError):
            pass
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.forward_features(torch.zeros(1, 3, 64, 64, device=param.device))
    model.train(was_training)
    return int(out.shape[1])


def feature_grid(input_shape: tuple[int, int], stride: int = 32) -> tuple[int, int]:
    """(h, w) of the feature map of an (H, W) input for a stride-32 CNN ("same" pads: ceil)."""
    return (math.ceil(input_shape[0] / stride), math.ceil(input_shape[1] / stride))


# --- lukemelas static "same" padding ------------------------------------------------------------
class StaticSameConv2d(nn.Conv2d):
    """Conv2d with fixed zero pads (left, right, top, bottom), like efficientnet-pytorch's."""

    def __init__(self, conv: nn.Conv2d, pads: tuple[int, int, int, int]) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=0,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        self.weight = conv.weight
        if conv.bias is not None:
            self.bias = conv.bias
        self.pads = tuple(int(p) for p in pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad statically, then convolve without padding."""
        if any(self.pads):
            x = F.pad(x, self.pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", static_pads={self.pads}"


def lukemelas_pads(
    image_size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], dilation=(1, 1)
) -> tuple[int, int, int, int]:
    """efficientnet-pytorch's Conv2dStaticSamePadding pads (left, right, top, bottom)."""
    ih, iw = image_size
    oh, ow = math.ceil(ih / stride[0]), math.ceil(iw / stride[1])
    pad_h = max((oh - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1 - ih, 0)
    pad_w = max((ow - 1) * stride[1] + (kernel[1] - 1) * dilation[1] + 1 - iw, 0)
    return (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)


def set_static_same_padding(model: nn.Module, image_size: int | tuple[int, int]) -> nn.Module:
    """Make every timm dynamic-"same" conv pad as efficientnet-pytorch does for ``image_size``.

    The image size is tracked through the strided convolutions in definition order (EfficientNet
    order: stem, blocks, head), as efficientnet-pytorch's ``calculate_output_image_size`` does.
    Parameters (and state-dict keys) are unchanged. Returns the model.
    """
    from timm.layers import Conv2dSame

    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    size = nominal = (int(size[0]), int(size[1]))
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Conv2d):
            continue
        stride = tuple(module.stride)
        if isinstance(module, Conv2dSame | StaticSameConv2d):
            pads = lukemelas_pads(size, tuple(module.kernel_size), stride, tuple(module.dilation))
            new = StaticSameConv2d(module, pads)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            replaced += 1
        if stride != (1, 1):
            size = (math.ceil(size[0] / stride[0]), math.ceil(size[1] / stride[1]))
    if replaced == 0:
        raise ConfigError(
            f"{backbone_name(model)} has no TF 'same' padded convolutions: static lukemelas padding "
            "only applies to timm tf_efficientnet_* models"
        )
    model.static_padding = nominal
    return model


def static_padding(model: nn.Module) -> tuple[int, int] | None:
    """The image size of a backbone's lukemelas static padding, or None (timm's own padding)."""
    model = getattr(model, "backbone", model)
    pad = getattr(model, "static_padding", None)
    return None if pad is None else (int(pad[0]), int(pad[1]))


# --- hook points: features at an intermediate layer, and the rest of the backbone ----------------
#: the analysed layer of every model so far: ``forward_features``'s output (after conv_head + BN)
HEAD = "head"


@dataclass(frozen=True)
class HookPoint:
    """A named place in the backbone's feature path whose activations an SAE can read.

    ``name`` is ``"head"`` (the output of ``forward_features``), ``"stageN"`` (timm's
    ``feature_info[N]``, the stage ``features_only=True, out_indices=(N,)`` returns: ``stage3`` is
    the stride-16 stage of an EfficientNet), ``"blocks.i"`` (after stage ``i``) or ``"blocks.i.j"``
    (after block ``j`` of stage ``i``). ``module`` is the timm module path it follows, ``index`` the
    number of leaf steps of the feature path run to reach it.
    """

    name: str
    module: str
    index: int
    channels: int
    stride: int


def _feature_path(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaf steps of an EfficientNet-style ``forward_features``: stem, BN, each block, head."""
    model = getattr(model, "backbone", model)
    names = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")
    if not all(hasattr(model, n) for n in names) or not isinstance(model.blocks, nn.Sequential):
        raise ConfigError(
            f"{backbone_name(model)} has no hook points: intermediate layers need an EfficientNet-"
            "style timm model (conv_stem, blocks, conv_head); use --hook head"
        )
    steps: list[tuple[str, nn.Module]] = [("conv_stem", model.conv_stem), ("bn1", model.bn1)]
    for i, stage in enumerate(model.blocks):
        blocks = stage if isinstance(stage, nn.Sequential) else [stage]
        steps.extend((f"blocks.{i}.{j}", block) for j, block in enumerate(blocks))
    steps += [("conv_head", model.conv_head), ("bn2", model.bn2)]
    return steps


def _out_channels(module: nn.Module, default: int) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels) if convs else default


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Every hook point of a backbone (or classifier), in feature-path order, ``head`` last."""
    steps = _feature_path(model)
    backbone = getattr(model, "backbone", model)
    points: dict[str, HookPoint] = {}
    stride, channels = 1, 3
    last_of: dict[str, int] = {}
    for k, (name, module) in enumerate(steps):
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                stride *= int(m.stride[0])
        channels = _out_channels(module, channels)
        if name.startswith("blocks."):
            stage = name.rsplit(".", 1)[0]
            points[name] = HookPoint(name, name, k + 1, channels, stride)
            last_of[stage] = k
            points[stage] = HookPoint(stage, stage, k + 1, channels, stride)
    for n, info in enumerate(getattr(backbone, "feature_info", None) or []):
        module = info.get("module") if isinstance(info, dict) else None
        if module in points:
            p = points[module]
            points[f"stage{n}"] = HookPoint(f"stage{n}", module, p.index, p.channels, p.stride)
    points[HEAD] = HookPoint(HEAD, "bn2", len(steps), feature_dim(backbone), stride)
    return points


def resolve_hook(model: nn.Module, name: str | None) -> HookPoint:
    """The hook point called ``name`` (None: ``head``); ConfigError listing the valid names."""
    name = HEAD if name in (None, "") else str(name)
    points = hook_points(model)
    if name not in points:
        stages = [n for n in points if n.startswith("stage")]
        raise ConfigError(
            f"unknown hook point {name!r}: use head, {', '.join(stages)} or blocks.i / blocks.i.j "
            f"(this backbone has {sum(n.count('.') == 1 for n in points)} stages)"
        )
    return points[name]


def features_at(model: nn.Module, x: torch.Tensor, hook: str | HookPoint | None) -> torch.Tensor:
    """Activations (N, C, h, w) at a hook point; ``head`` is ``forward_features``."""
    point = hook if isinstance(hook, HookPoint) else resolve_hook(model, hook)
    if point.name == HEAD:
        return getattr(model, "backbone", model).forward_features(x)
    for _, module in _feature_path(model)[: point.index]:
        x = module(x)
    return x


def rest_of_backbone(
    model: nn.Module, activations: torch.Tensor, hook: str | HookPoint | None
) -> torch.Tensor:
    """The head feature map (``forward_features``'s output) from (edited) activations at a hook
    point: the layers after it, re-run. At ``head`` this is the identity (the closed form applies)."""
    point = hook if isinstance(hook, HookPoint) else resolve_hook(model, hook)
    x = activations
    for _, module in _feature_path(model)[point.index :]:
        x = module(x)
    return x


def hook_grid(
    model: nn.Module, hook: str | HookPoint | None, input_shape: tuple[int, int]
) -> tuple[int, int]:
    """(h, w) of the activations at a hook point for an (H, W) input ("same" pads: ceil per strided
    convolution, in feature-path order)."""
    point = hook if isinstance(hook, HookPoint) else resolve_hook(model, hook)
    h, w = (int(v) for v in input_shape)
    for _, module in _feature_path(model)[: point.index]:
        for m in module.modules():
            if isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1):
                h, w = math.ceil(h / m.stride[0]), math.ceil(w / m.stride[1])
    return h, w


class HookedBackbone(nn.Module):
    """A backbone whose ``forward_features`` stops at a hook point, so whatever runs backbones
    (``models.runtime``: PyTorch or an ONNX export) runs it unchanged; ``rest`` re-runs the layers
    after the hook. Its repr names the hook, so cached exports of different hooks never mix."""

    def __init__(self, backbone: nn.Module, hook: str) -> None:
        super().__init__()
        self.backbone = getattr(backbone, "backbone", backbone)
        self.point = resolve_hook(self.backbone, hook)
        self.backbone_name = backbone_name(self.backbone)
        self.num_features = self.point.channels
        # the backbone's mode, not nn.Module's default (training): whoever saves and restores the
        # mode around a call (an ONNX export) must not put the shared backbone in training mode
        self.train(self.backbone.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Activations (N, C, h, w) at the hook point."""
        return features_at(self.backbone, x, self.point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_features` (what an export traces)."""
        return self.forward_features(x)

    def rest(self, activations: torch.Tensor) -> torch.Tensor:
        """The head feature map from (edited) activations at the hook point."""
        return rest_of_backbone(self.backbone, activations, self.point)

    def extra_repr(self) -> str:
        return f"hook={self.point.name}, stride={self.point.stride}"


def at_hook(backbone: nn.Module, hook: str | None) -> nn.Module:
    """The backbone itself for ``head`` (None), else a :class:`HookedBackbone` stopping at ``hook``."""
    if hook in (None, "", HEAD):
        return getattr(backbone, "backbone", backbone)
    return HookedBackbone(backbone, hook)
