"""Concept heads: global average pooling + Linear(C, 1); probability = sigmoid(logit)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConceptHead(nn.Linear):
    """Linear(C, 1) on globally average-pooled features (Mammo-CLIP's classification head).

    It *is* the ``Linear``: ``.weight`` (1, C) and ``.bias`` (1,), state-dict keys ``weight`` and
    ``bias``. ``forward`` takes a feature map (N, C, h, w) or already pooled features (N, C) and
    returns the logits (N,). ``dropout`` (Mammo-CLIP: B5 0.4, B2 0.3) acts on the pooled vector in
    training mode only.
    """

    def __init__(self, in_features: int, dropout: float = 0.0) -> None:
        super().__init__(int(in_features), 1)
        self.dropout = float(dropout)

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """Global average pool of (..., C, h, w) maps; (..., C) vectors pass through."""
        return features.mean(dim=(-2, -1)) if features.ndim >= 3 else features

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Logits (N,) of feature maps (N, C, h, w) or pooled features (N, C)."""
        pooled = self.pool(features)
        if self.dropout and self.training:
            pooled = F.dropout(pooled, self.dropout, training=True)
        return F.linear(pooled, self.weight, self.bias)[..., 0]

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """sigmoid(logit)."""
        return torch.sigmoid(self.forward(features))

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", dropout={self.dropout}" if self.dropout else "")
