"""The sparse autoencoder: the paper's math, its checkpoint layout, TopK variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mammo_sae.errors import CheckpointError, ConfigError
from napari_mammo_sae.models.sae import SparseAutoencoder, load_mammosae

D, M = 32, 128


def _mammosae_state(rng):
    b = rng.normal(size=(1, D)).astype(np.float32)
    w_enc = rng.normal(size=(1, M, D)).astype(np.float32) * 0.2
    b_enc = rng.normal(size=(1, M)).astype(np.float32) * 0.5
    w_dec = rng.normal(size=(1, D, M)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    tb = torch.from_numpy(b)
    return {
        "tied_bias": tb,
        "pre_encoder_bias._bias_reference": tb,
        "encoder._weight": torch.from_numpy(w_enc),
        "encoder._bias": torch.from_numpy(b_enc),
        "decoder._weight": torch.from_numpy(w_dec),
        "post_decoder_bias._bias_reference": tb,
    }


def test_load_mammosae_matches_formula_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    state = _mammosae_state(rng)
    path = tmp_path / "sparse_autoencoder_final.pt"
    torch.save(state, path)
    sae = load_mammosae(path)
    assert (sae.d_in, sae.d_latent, sae.kind) == (D, M, "relu")
    x = rng.normal(size=(5, D)).astype(np.float32)
    b = state["tied_bias"].numpy()[0]
    we, be = state["encoder._weight"].numpy()[0], state["encoder._bias"].numpy()[0]
    wd = state["decoder._weight"].numpy()[0]
    z_ref = np.maximum((x - b) @ we.T + be, 0)
    xh_ref = z_ref @ wd.T + b
    x_hat, z = sae(torch.from_numpy(x))
    assert (z_ref > 0).mean() > 0.2 and (z_ref == 0).mean() > 0.2  # both regimes exercised
    np.testing.assert_allclose(z.detach().numpy(), z_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat.detach().numpy(), xh_ref, rtol=1e-5, atol=1e-5)
    # the paper's loss: mean over dims of the squared error + 3e-5 * sum |z|, batch-averaged
    out = sae.loss(torch.from_numpy(x))
    ref = ((xh_ref - x) ** 2).mean(1) + 3e-5 * np.abs(z_ref).sum(1)
    assert float(out["loss"]) == pytest.approx(ref.mean(), rel=1e-5)


def test_load_mammosae_rejects_other_layouts(tmp_path):
    rng = np.random.default_rng(1)
    state = _mammosae_state(rng)
    bad = dict(state)
    del bad["encoder._bias"]
    torch.save(bad, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="missing encoder._bias"):
        load_mammosae(tmp_path / "a.pt")
    bad = dict(state)
    bad["decoder._weight"] = torch.zeros(1, D, M + 1)
    torch.save(bad, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="decoder._weight"):
        load_mammosae(tmp_path / "b.pt")
    (tmp_path / "c.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_mammosae(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="no SAE checkpoint"):
        load_mammosae(tmp_path / "missing.pt")


def test_parameters_and_inits():
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(D, M, init="paper", generator=g)
    assert dict((n, tuple(p.shape)) for n, p in sae.named_parameters()) == {
        "W_enc": (M, D), "b_enc": (M,), "W_dec": (D, M), "b_dec": (D,),
    }  # fmt: skip
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(M))
    # the library's kaiming quirk: encoder rows ~sqrt(M) smaller than a fan-in-d init
    assert sae.W_enc.abs().max() <= (6 / (M * D)) ** 0.5
    assert float(sae.b_dec.abs().sum()) == 0.0
    default = SparseAutoencoder(D, M)
    torch.testing.assert_close(default.W_enc, 0.1 * default.W_dec.t())
    assert SparseAutoencoder.from_config(default.config()).config() == default.config()


def test_decoder_constraint_keeps_unit_norm_and_drops_parallel_gradient():
    torch.manual_seed(0)
    sae = SparseAutoencoder(D, M)
    x = torch.randn(16, D)
    sae.loss(x)["loss"].backward()
    sae.project_decoder_grad_()
    dots = (sae.W_dec.grad * sae.W_dec).sum(0)
    assert float(dots.abs().max()) < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalise_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(M))


def test_topk_and_batchtopk_sparsity_and_auxk():
    torch.manual_seed(0)
    x = torch.randn(10, D)
    topk = SparseAutoencoder(D, M, kind="topk", k=4)
    z = topk.encode(x)
    assert ((z > 0).sum(1) <= 4).all() and (z > 0).sum() > 20
    btk = SparseAutoencoder(D, M, kind="batchtopk", k=4)
    zb = btk.encode(x)
    assert int((zb > 0).sum()) <= 40
    dead = torch.zeros(M, dtype=torch.bool)
    dead[:64] = True
    out = topk.loss(x, dead_mask=dead)
    assert float(out["auxk"]) > 0
    out["loss"].backward()
    assert topk.W_dec.grad[:, :64].abs().sum() > 0  # dead latents get a gradient through AuxK
    with pytest.raises(ConfigError, match="needs k"):
        SparseAutoencoder(D, M, kind="topk")
    with pytest.raises(ConfigError, match="unknown SAE kind"):
        SparseAutoencoder(D, M, kind="gated")
