"""evaluate: closed-form logits equal the explicit decode, Table 2 and the confounder check."""

from __future__ import annotations

import math

import numpy as np
import torch

from napari_mammo_sae.analysis.localisation import ScoredBox
from napari_mammo_sae.pipeline import evaluate


class _SAE(torch.nn.Module):
    def __init__(self, d: int, m: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(m, d, generator=g))
        self.b_enc = torch.nn.Parameter(torch.randn(m, generator=g) * 0.1)
        self.W_dec = torch.nn.Parameter(torch.randn(d, m, generator=g))
        self.b_dec = torch.nn.Parameter(torch.randn(d, generator=g))

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)

    def decode(self, z):
        return z @ self.W_dec.T + self.b_dec


def test_reconstruction_logits_equal_explicit_decode_then_pool():
    sae = _SAE(6, 12)
    w = np.random.default_rng(0).normal(size=6)
    c = 0.3
    fmap = torch.randn(6, 4, 3)
    tokens = fmap.reshape(6, -1).T
    with torch.no_grad():
        z = sae.encode(tokens)
        explicit = float(sae.decode(z).mean(0).numpy() @ w + c)
    closed = evaluate.reconstruction_logits(z.mean(0).numpy()[None], sae, w, c)
    assert closed.shape == (1,)
    assert math.isclose(float(closed[0]), explicit, rel_tol=1e-5, abs_tol=1e-5)


def test_localisation_table_mean_ignores_undefined():
    boxes = {
        1: {"a": [ScoredBox((0, 0, 10, 10), 1.0)], "b": []},
        2: {"a": [ScoredBox((50, 50, 60, 60), 1.0)], "b": []},
    }
    gt = {"a": [(0, 0, 10, 10)], "b": [(0, 0, 5, 5)]}
    row = evaluate.localisation_table(boxes, gt, [1, 2], ["a", "b"])
    assert row["neurons"] == [1, 2]
    assert row["ap"][0] == 0.5  # one of two lesions found, at precision 1
    assert row["ap"][1] == 0.0
    assert row["mean_ap"] == 0.25


def test_confounder_check_flags_the_cue_neuron():
    cue = {"a": [(0, 0, 10, 10)], "b": [(0, 0, 10, 10)]}
    lesion = {"a": [(40, 40, 60, 60)], "b": [(40, 40, 60, 60)]}
    boxes = {
        7: {k: [ScoredBox((0, 0, 11, 11), 1.0)] for k in "ab"},  # sits on the cue
        8: {k: [ScoredBox((41, 41, 60, 60), 1.0)] for k in "ab"},  # sits on the lesion
    }
    rows = evaluate.confounder_check(boxes, lesion, cue, [7, 8], ["a", "b"])
    by = {r["neuron"]: r for r in rows}
    assert by[7]["on_cue"] and not by[7]["on_lesion"]
    assert by[8]["on_lesion"] and not by[8]["on_cue"]
    assert by[7]["iou_cue"] > 0.8 and by[7]["iou_lesion"] == 0.0
