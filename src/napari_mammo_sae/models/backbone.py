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
