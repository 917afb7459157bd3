"""A concept classifier: CNN backbone + :class:`~.heads.ConceptHead` (Mammo-CLIP's downstream model).

State-dict keys are ``backbone.<timm key>`` and ``head.weight`` / ``head.bias``. Variants (the
paper's names): ``pretrained`` = frozen backbone + linear probe (:meth:`ConceptClassifier.freeze_backbone`),
``finetuned`` = backbone and head trained together.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .backbone import backbone_name, feature_dim, static_padding
from .heads import ConceptHead

VARIANTS = ("pretrained", "finetuned")


class ConceptClassifier(nn.Module):
    """Backbone + concept head; ``forward_features`` gives the analysed C x h x w feature map."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | None = None,
        *,
        concept: str | None = None,
        variant: str | None = None,
    ) -> None:
        super().__init__()
        if variant is not None and variant not in VARIANTS:
            raise ConfigError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
        self.backbone = backbone
        self.head = head if head is not None else ConceptHead(feature_dim(backbone))
        self.concept = concept
        self.variant = variant
        self._frozen_bn = False

    @property
    def backbone_name(self) -> str:
        """The timm architecture name of the backbone."""
        return backbone_name(self.backbone)

    @property
    def feature_dim(self) -> int:
        """Channels C of the feature map."""
        return feature_dim(self.backbone)

    @property
    def static_padding(self) -> tuple[int, int] | None:
        """Image size of the backbone's lukemelas static padding (Mammo-CLIP weights), or None."""
        return static_padding(self.backbone)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps (N, C, h, w) of images (N, 3, H, W)."""
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N,) of feature maps (N, C, h, w) or pooled features (N, C)."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N,) of images (N, 3, H, W)."""
        return self.forward_head(self.forward_features(x)).reshape(x.shape[0])

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(logit) of images (N, 3, H, W)."""
        return torch.sigmoid(self.forward(x))

    def freeze_backbone(self, *, freeze_bn_stats: bool = True) -> ConceptClassifier:
        """Linear-probe set-up: backbone weights frozen; with ``freeze_bn_stats`` BN stays in eval.

        (Mammo-CLIP's own probes let BatchNorm statistics drift: ``freeze_bn_stats=False``.)
        """
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self._frozen_bn = bool(freeze_bn_stats)
        if self._frozen_bn:
            self.backbone.eval()
        return self

    def unfreeze_backbone(self) -> ConceptClassifier:
        """Fine-tune set-up: every parameter trainable, BN follows train()/eval()."""
        for p in self.backbone.parameters():
            p.requires_grad_(True)
        self._frozen_bn = False
        self.backbone.train(self.training)
        return self

    def train(self, mode: bool = True) -> ConceptClassifier:
        """As nn.Module.train, but a backbone frozen with its BN statistics stays in eval mode."""
        super().train(mode)
        if self._frozen_bn:
            self.backbone.eval()
        return self

    def describe(self) -> dict[str, Any]:
        """Architecture fields for a weights config (backbone, feature_dim, static_padding...)."""
        out: dict[str, Any] = {
            "kind": "classifier",
            "backbone": self.backbone_name,
            "feature_dim": self.feature_dim,
        }
        pad = self.static_padding
        if pad is not None:
            out["static_padding"] = list(pad)
        if isinstance(self.head, ConceptHead) and self.head.dropout:
            out["head_dropout"] = self.head.dropout
        if self.concept is not None:
            out["concept"] = self.concept
        if self.variant is not None:
            out["variant"] = self.variant
        return out


def build_classifier_from_config(config: dict[str, Any]) -> ConceptClassifier:
    """An (untrained) ConceptClassifier from a weights config (``backbone``, ``static_padding``...)."""
    from .backbone import create_backbone

    name = config.get("backbone")
    if not isinstance(name, str):
        raise ConfigError("the weights config names no backbone: expected a 'backbone' entry")
    pad = config.get("static_padding")
    backbone = create_backbone(name, static_padding=tuple(pad) if pad else None)
    head = ConceptHead(feature_dim(backbone), dropout=float(config.get("head_dropout", 0.0) or 0.0))
    variant = config.get("variant")
    return ConceptClassifier(
        backbone,
        head,
        concept=config.get("concept"),
        variant=variant if variant in VARIANTS else None,
    )
