"""Closed-form interventions against the explicit decode -> pool -> classify path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mammo_sae.analysis.interventions import (
    InterventionEngine,
    explicit_intervened_logits,
    intervened_logits,
    neuron_mask,
    reconstruction_cam,
    reconstruction_logits,
    topk_union,
)
from napari_mammo_sae.errors import ConfigError
from napari_mammo_sae.models.sae import SparseAutoencoder

D, M, P, N = 16, 64, 12, 5


@pytest.fixture(scope="module")
def sae():
    g = torch.Generator().manual_seed(0)
    s = SparseAutoencoder(D, M, init="paper", generator=g).double().eval()
    with torch.no_grad():
        s.b_dec.normal_(0, 1.0, generator=g)  # a non-zero decoder bias must pass through
    return s


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(1)
    lin = torch.nn.Linear(D, 1).double()
    with torch.no_grad():
        lin.bias.fill_(-0.7)
    return lin


@pytest.fixture(scope="module")
def latents(sae):
    """Per-position latents (N, P, m) of random features: sparse-ish ReLU codes."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, P, D, generator=g, dtype=torch.float64) * 3
    with torch.no_grad():
        z = sae.encode(x)
    assert 0 < (z > 0).double().mean() < 1
    return z.numpy()


def _explicit_loop(latents, sae, head, mask):
    """Independent reference: per image, decode every position with the SAE, average, apply head."""
    out = []
    for img in latents:
        with torch.no_grad():
            x_hat = sae.decode(torch.as_tensor(img * mask))  # (P, d)
            out.append(float(head(x_hat.mean(0))))
    return np.array(out)


def test_topk_union_is_union_of_each_class_topk():
    s0 = np.array([5.0, 4.0, 0.0, 0.0, 1.0])
    s1 = np.array([0.0, 0.0, 9.0, 8.0, 4.5])
    assert topk_union(s0, s1, 0).tolist() == []
    assert topk_union(s0, s1, 1).tolist() == [0, 2]
    assert topk_union(s0, s1, 2).tolist() == [0, 1, 2, 3]
    assert topk_union(s0, s1, 3).tolist() == [0, 1, 2, 3, 4]
    assert topk_union(s0, s1, 99).tolist() == [0, 1, 2, 3, 4]
    assert topk_union(s0, s0, 2).tolist() == [0, 1]  # overlapping sets count once
    with pytest.raises(ConfigError):
        topk_union(s0, s1[:3], 1)


@pytest.mark.parametrize("mode", ["keep", "remove"])
@pytest.mark.parametrize("neurons", [[], [3], [0, 5, 17, 40, 63], list(range(M))])
def test_closed_form_equals_explicit_decode_pool_classify(sae, head, latents, neurons, mode):
    closed = intervened_logits(latents.mean(1), sae, head, neurons, mode)
    ref = _explicit_loop(latents, sae, head, neuron_mask(M, neurons, mode))
    assert closed.shape == (N,)
    np.testing.assert_allclose(closed, ref, atol=1e-5, rtol=0)
    # the library's explicit path (used by the benchmark) agrees too
    np.testing.assert_allclose(
        explicit_intervened_logits(latents, sae, head, neurons, mode), ref, atol=1e-5, rtol=0
    )


def test_interventions_change_the_logit_and_limits_are_right(sae, head, latents):
    pooled = latents.mean(1)
    full = reconstruction_logits(pooled, sae, head)
    w = head.weight.detach().numpy().reshape(-1)
    bias_only = float(w @ sae.b_dec.detach().numpy()) + float(head.bias.detach())
    # removing nothing = keeping everything = the reconstruction; keeping nothing = only the biases
    np.testing.assert_allclose(intervened_logits(pooled, sae, head, [], "remove"), full)
    np.testing.assert_allclose(intervened_logits(pooled, sae, head, range(M), "keep"), full)
    np.testing.assert_allclose(intervened_logits(pooled, sae, head, [], "keep"), bias_only)
    active = np.flatnonzero(pooled[0])
    assert not np.allclose(intervened_logits(pooled, sae, head, active[:3], "remove"), full)


def test_closed_form_accepts_classifier_and_pair(sae, head, latents):
    pooled = latents.mean(1)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Conv2d(3, D, 1)  # has no Linear: must not be mistaken for one
            self.head = head

    w = head.weight.detach().numpy().reshape(-1)
    a = intervened_logits(pooled, sae, Classifier(), [1, 2], "keep")
    b = intervened_logits(pooled, sae, (w, float(head.bias.detach())), [1, 2], "keep")
    np.testing.assert_allclose(a, intervened_logits(pooled, sae, head, [1, 2], "keep"))
    np.testing.assert_allclose(a, b)
    assert np.ndim(intervened_logits(pooled[0], sae, head, [1], "remove")) == 0


def test_bad_inputs_raise_config_errors(sae, head, latents):
    pooled = latents.mean(1)
    with pytest.raises(ConfigError, match="mode"):
        intervened_logits(pooled, sae, head, [1], "clamp")
    with pytest.raises(ConfigError, match="neuron indices"):
        intervened_logits(pooled, sae, head, [M], "keep")
    with pytest.raises(ConfigError, match="neurons but the SAE"):
        intervened_logits(pooled[:, :10], sae, head, [1], "keep")
    with pytest.raises(ConfigError, match="features"):
        intervened_logits(pooled, sae, torch.nn.Linear(D + 1, 1), [1], "keep")
    mlp = torch.nn.Sequential(torch.nn.Linear(D, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    with pytest.raises(ConfigError, match="exactly one Linear"):
        intervened_logits(pooled, sae, mlp, [1], "keep")


def test_engine_matches_closed_form_in_every_mode(sae, head, latents):
    pooled = latents.mean(1)[0]
    eng = InterventionEngine(pooled, sae, head)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, M))
    for k in (0, 1, 5, 20, M):
        nset = topk_union(scores[0], scores[1], k)
        act = eng.topk_activated(scores, k)
        deact = eng.topk_deactivated(scores, k)
        assert act.neurons.tolist() == nset.tolist()
        assert act.logit == pytest.approx(
            float(intervened_logits(pooled, sae, head, nset, "keep")), abs=1e-9
        )
        assert deact.logit == pytest.approx(
            float(intervened_logits(pooled, sae, head, nset, "remove")), abs=1e-9
        )
        assert act.probability == pytest.approx(1 / (1 + np.exp(-act.logit)))
    one = int(np.flatnonzero(pooled)[0])
    assert eng.single(one).logit == pytest.approx(
        float(intervened_logits(pooled, sae, head, [one], "keep"))
    )
    off = eng.single(one, "remove")
    assert off.logit == pytest.approx(float(intervened_logits(pooled, sae, head, [one], "remove")))
    assert off.delta_probability != 0
    custom = eng.custom([2, 7, 2], "keep")  # duplicates count once
    assert custom.neurons.tolist() == [2, 7]
    assert custom.reconstruction_logit == pytest.approx(
        float(reconstruction_logits(pooled, sae, head))
    )
    # scaling a latent by s: explicit decode with z_j * s
    scaled = pooled.copy()
    scaled[one] *= 3.0
    assert eng.scaled({one: 3.0}) == pytest.approx(float(reconstruction_logits(scaled, sae, head)))


def test_engine_slider_sweep_at_paper_size_matches_closed_form():
    # the slider's speed is benchmarks/bench_interventions.py's; here its answers at m = 16384
    m, d = 16384, 256
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(d, m, generator=g).eval()
    head = torch.nn.Linear(d, 1)
    pooled = np.abs(np.random.default_rng(0).normal(size=m)) * (np.arange(m) % 7 == 0)
    scores = np.random.default_rng(1).normal(size=(2, m))
    eng = InterventionEngine(pooled, sae, head)
    eng.topk_activated(scores, 10)  # first call sorts the ranking once
    for k in (1, 10, 100, 1000, 10000, m):
        got = eng.topk_activated(scores, k)
        want = topk_union(scores[0], scores[1], k)
        np.testing.assert_array_equal(np.sort(got.neurons), want)
        expect = float(intervened_logits(pooled, sae, head, want, "keep"))
        assert got.logit == pytest.approx(expect, rel=1e-5, abs=1e-6)
    assert got.logit == pytest.approx(got.reconstruction_logit, rel=1e-5, abs=1e-6)  # k = m: all


def test_reconstruction_cam_equals_explicit_decode_then_head(sae, head, latents):
    import scipy.sparse

    z = latents[0]  # (P, m), P = 12 = 3 x 4
    grid = (3, 4)
    for neurons, mode in (([], "remove"), ([1, 9, 30], "keep"), ([1, 9, 30], "remove")):
        mask = neuron_mask(M, neurons, mode)
        with torch.no_grad():
            ref = head(sae.decode(torch.as_tensor(z * mask))).numpy().reshape(grid)
        cam = reconstruction_cam(z, sae, head, grid, neurons, mode)
        assert cam.shape == grid and cam.dtype == np.float32
        np.testing.assert_allclose(cam, ref, atol=1e-5)
        np.testing.assert_allclose(
            reconstruction_cam(scipy.sparse.csr_matrix(z), sae, head, grid, neurons, mode),
            ref,
            atol=1e-5,
        )
        np.testing.assert_allclose(
            reconstruction_cam(z.reshape(3, 4, M), sae, head, None, neurons, mode), ref, atol=1e-5
        )
        # the mean of the map is the intervened logit
        assert float(cam.mean()) == pytest.approx(
            float(intervened_logits(z.mean(0), sae, head, neurons, mode)), abs=1e-5
        )
    eng = InterventionEngine(z.mean(0), sae, head)
    np.testing.assert_allclose(
        eng.cam(z, grid, [1], "keep"), reconstruction_cam(z, sae, head, grid, [1], "keep")
    )


def test_memoised_weights_follow_in_place_changes_and_float32_is_accurate(latents):
    g = torch.Generator().manual_seed(5)
    sae = SparseAutoencoder(D, M, generator=g).double().eval()
    lin = torch.nn.Linear(D, 1).double()
    pooled = latents.mean(1)
    mask = neuron_mask(M, [1, 2, 3], "remove")
    before = intervened_logits(pooled, sae, lin, [1, 2, 3], "remove")
    np.testing.assert_allclose(before, _explicit_loop(latents, sae, lin, mask), atol=1e-9)
    with torch.no_grad():
        sae.W_dec.mul_(2.0)  # in place: the memoised W_dec^T w must not be reused
        lin.weight.add_(0.5)
    after = intervened_logits(pooled, sae, lin, [1, 2, 3], "remove")
    assert not np.allclose(after, before)
    np.testing.assert_allclose(after, _explicit_loop(latents, sae, lin, mask), atol=1e-9)
    # float32 pooled latents (what stores hold) stay within 1e-5 of the float64 explicit path
    got32 = intervened_logits(pooled.astype(np.float32), sae, lin, [1, 2, 3], "remove")
    np.testing.assert_allclose(
        got32,
        _explicit_loop(latents.astype(np.float32).astype(np.float64), sae, lin, mask),
        atol=1e-5,
    )
