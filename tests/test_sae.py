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


def _batchtopk(k=4, seed=0):
    torch.manual_seed(seed)
    return SparseAutoencoder(D, M, kind="batchtopk", k=k)


def test_batchtopk_keeps_the_k_times_b_largest_of_the_batch_not_k_per_row():
    sae = _batchtopk(k=4)
    torch.manual_seed(1)
    x = torch.randn(6, D)
    x[0] *= 6.0  # one token with much larger activations: it takes more than k of the k * B slots
    pre = torch.relu(sae.pre_activation(x)).detach()
    z = sae.encode(x, batch_select=True).detach()
    kept = z > 0
    assert int(kept.sum()) == 4 * 6  # exactly k * B kept (an all-zero output fails here)
    counts = kept.sum(1)
    assert int(counts[0]) > 4 and int(counts.min()) < 4  # not k per row
    # the kept values are the k * B largest of the whole batch, unchanged
    top = pre.reshape(-1).topk(24).values
    torch.testing.assert_close(z[kept].sort(descending=True).values, top)
    torch.testing.assert_close(z[kept], pre[kept])


def test_batchtopk_inference_threshold_makes_latents_independent_of_batch_mates():
    sae = _batchtopk(k=4)
    torch.manual_seed(2)
    x = torch.randn(64, D) * torch.linspace(0.5, 3.0, 64)[:, None]
    assert sae.inference_threshold is None
    first = sae.loss(x[:32])  # train mode: the loss moves theta towards the smallest kept value
    theta0 = float(first["z"][first["z"] > 0].min())
    assert sae.inference_threshold == pytest.approx(theta0)
    sae.loss(x[32:])
    z2 = sae.encode(x[32:], batch_select=True).detach()
    expected = 0.99 * theta0 + 0.01 * float(z2[z2 > 0].min())
    assert sae.inference_threshold == pytest.approx(expected, rel=1e-6)
    sae.eval()
    with torch.no_grad():
        together = sae.encode(x)
        alone = torch.cat([sae.encode(x[i : i + 1]) for i in range(len(x))])
        halves = torch.cat([sae.encode(x[:7]), sae.encode(x[7:])])
        batch_rule = torch.cat(
            [sae.encode(x[:7], batch_select=True), sae.encode(x[7:], batch_select=True)]
        )
    for other in (alone, halves):  # same latents (values up to the matmul's rounding per batch)
        assert torch.equal(together > 0, other > 0)
        torch.testing.assert_close(together, other, rtol=1e-5, atol=1e-6)
    assert int((together > 0).sum()) > 0
    pre = torch.relu(sae.pre_activation(x)).detach()
    torch.testing.assert_close(together, pre * (pre > sae.inference_threshold))
    # the batch rule would have given a different code for the same tokens
    assert not torch.equal(sae.encode(x, batch_select=True), batch_rule)


def test_batchtopk_threshold_is_saved_and_an_old_file_without_one_is_refused_in_eval(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from napari_mammo_sae.models.weights import load_weights, save_weights

    sae = _batchtopk(k=4)
    x = torch.randn(32, D)
    sae.loss(x)
    theta = sae.inference_threshold
    save_weights(tmp_path / "new", sae, sae.config())
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    assert cfg["threshold"] == pytest.approx(theta)
    loaded, _ = load_weights(tmp_path / "new", manifest=False)
    assert not loaded.training and loaded.inference_threshold == pytest.approx(theta)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.eval().encode(x))
    # an SAE written before thresholds were recorded: no buffer, no config key
    old = tmp_path / "old"
    old.mkdir()
    tensors = load_file(str(tmp_path / "new" / "model.safetensors"))
    del tensors["threshold"]
    save_file(tensors, str(old / "model.safetensors"))
    del cfg["threshold"]
    (old / "config.json").write_text(json.dumps(cfg))
    legacy, _ = load_weights(old, manifest=False)
    assert legacy.inference_threshold is None
    with pytest.raises(CheckpointError, match="no inference threshold"):
        legacy.encode(x)
    assert int((legacy.encode(x, batch_select=True) > 0).sum()) == 4 * 32  # asked for knowingly
    got = legacy.calibrate_threshold([x[:16], x[16:]])
    assert got > 0 and legacy.inference_threshold == pytest.approx(got)
    assert int((legacy.encode(x) > 0).sum()) > 0
    with pytest.raises(ConfigError, match="only a BatchTopK"):
        SparseAutoencoder(D, M).calibrate_threshold([x])
    # ReLU and TopK state dicts carry no threshold (bundled weights unchanged)
    assert "threshold" not in SparseAutoencoder(D, M).state_dict()
    assert "threshold" not in SparseAutoencoder(D, M, kind="topk", k=4).config()


def test_encode_into_a_kept_buffer_gives_the_same_latents():
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(16, 48, generator=g).eval()
    x = torch.randn(10, 16, generator=g)
    out = torch.full((10, 48), float("nan"))
    with torch.no_grad():
        want = sae.encode(x)
        got = sae.encode(x, out=out)
    assert got is out and torch.equal(got, want) and (got >= 0).all()
    # recording gradients, or a buffer of the wrong shape: a fresh array, the buffer untouched
    spare = torch.full((10, 48), -1.0)
    assert sae.encode(x, out=spare) is not spare and (spare == -1).all()
    with torch.no_grad():
        assert sae.encode(x, out=torch.empty(9, 48)).shape == (10, 48)
