"""probe: class-wise means (eq. 2), rankings, top-activating images, the probe file and its lookup."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_mammo_sae.errors import ConfigError, StoreError
from napari_mammo_sae.pipeline import probe


class _IdentitySAE(torch.nn.Module):
    """A ReLU 'SAE' whose latents are the features themselves (m = d): easy to reason about."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.eye(d))
        self.b_enc = torch.nn.Parameter(torch.zeros(d))
        self.W_dec = torch.nn.Parameter(torch.eye(d))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.kind = "relu"

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)


def _maps(n: int, d: int = 4, h: int = 3, w: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.random((d, h, w)).astype(np.float32) for _ in range(n)]


def test_class_means_are_equation_2():
    sae = _IdentitySAE(4)
    maps = _maps(6)
    labels = np.array([0, 1, 0, 1, 1, 0])
    means = probe.class_means(enumerate(maps), labels, sae)
    pooled = np.stack([m.reshape(4, -1).mean(1) for m in maps])
    np.testing.assert_allclose(means.mean[1], pooled[labels == 1].mean(0), rtol=1e-6)
    np.testing.assert_allclose(means.mean[0], pooled[labels == 0].mean(0), rtol=1e-6)
    assert means.count.tolist() == [3, 3]


def test_class_means_refuse_an_empty_class():
    labels = np.array([1, 1, -1])  # no negative image (and one unknown label)
    with pytest.raises(ConfigError, match="0 negative images"):
        probe.class_means(enumerate(_maps(3)), labels, _IdentitySAE(4))


def test_encode_selected_neurons_matches_full_encode():
    sae = _IdentitySAE(5)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(5, 5))
        sae.b_enc.copy_(torch.randn(5))
    x = torch.randn(7, 5)
    full = sae.encode(x)
    part = probe.encode_latents(sae, x, [3, 1])
    torch.testing.assert_close(part, full[:, [3, 1]])


def test_top_activations_find_the_cell_and_order_images():
    sae = _IdentitySAE(3)
    maps = [np.zeros((3, 4, 5), np.float32) for _ in range(4)]
    maps[2][1, 3, 4] = 9.0  # neuron 1 fires most in image 2 at cell (3, 4)
    maps[0][1, 0, 1] = 2.0
    maps[3][1, 2, 2] = 5.0
    index = SimpleNamespace(
        image_id=np.array(["a", "b", "c", "d"]),
        sop_instance_uid=np.array(["1.1", "1.2", "1.3", "1.4"]),
        split=np.array(["training"] * 4),
    )
    tops = probe.top_activations(enumerate(maps), index, sae, [1, 2], n_images=2)
    assert [t.image_id for t in tops[1]] == ["c", "d"]
    assert tops[1][0].cell == (3, 4) and tops[1][0].activation == 9.0
    assert tops[1][0].sop_instance_uid == "1.3"
    assert tops[2] == []  # never fires


def test_probe_file_roundtrip_and_lookup(tmp_path):
    result = probe.ProbeResult(
        sae_sha256="ab" * 32,
        concept="mass",
        class_means=np.array([[0.1, 0.2, 0.0], [0.3, 0.0, 0.5]]),
        class_counts=np.array([5, 2]),
        scores={"class_mean": np.array([[0.1, 0.2, 0.0], [0.3, 0.0, 0.5]])},
        rankings={"class_mean": {0: [1, 0], 1: [2, 0]}},
        top_images={2: [probe.TopActivation(0.5, "img", "1.2.3", (1, 2), 7, "test")]},
        meta={"store": "s.h5"},
    )
    path = probe.save_probe(result, tmp_path / "p.npz")
    back = probe.load_probe(path)
    assert back.sae_sha256 == result.sae_sha256 and back.concept == "mass"
    np.testing.assert_allclose(back.class_means, result.class_means, rtol=1e-6)
    assert back.rankings["class_mean"][1] == [2, 0]
    assert back.top(1, k=1) == [2]
    # written under the one spelling; the old spelling still answers (files from before too)
    assert list(back.scores) == ["class-mean"] and list(back.rankings) == ["class-mean"]
    with np.load(path) as data:
        assert "scores_class-mean" in data.files
    assert back.rankings["class-mean"] is back.rankings["class_mean"]
    assert "class_centred" not in back.scores and "no-such-ranking" not in back.scores
    (t,) = back.top_images[2]
    assert (t.image_id, t.cell, t.row) == ("img", (1, 2), 7)
    assert probe.find_probe(tmp_path, "ab" * 32) == path
    assert probe.find_probe(tmp_path, "ab" * 32, "calcification") is None
    assert probe.find_probe(tmp_path, "cd" * 32) is None
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(StoreError):
        probe.load_probe(tmp_path / "junk.npz")
    with pytest.raises(StoreError):
        probe.load_probe(tmp_path / "missing.npz")
