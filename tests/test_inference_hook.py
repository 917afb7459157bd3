"""The Analyzer at an intermediate hook point: the SAE reads stage3, the rest of the backbone is
re-run for the prediction and for every intervention (no closed form there)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_helpers import breast_image, tiny_classifier, write_mammogram
from napari_mammo_sae.dicom import read_mammogram
from napari_mammo_sae.errors import ConfigError
from napari_mammo_sae.models.backbone import features_at, rest_of_backbone
from napari_mammo_sae.models.folders import sae_hook
from napari_mammo_sae.models.inference import Analyzer, RerunEngine
from napari_mammo_sae.models.sae import SparseAutoencoder
from napari_mammo_sae.preprocess import preprocess_mammoclip

SIZE = (192, 128)  # stage3 of test_efficientnet (stride 16, 48 channels) -> a 12 x 8 grid
HOOK = "stage3"
M = 40

torch.set_num_threads(2)


def _classifier():
    return tiny_classifier()


def _sae(d: int) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(3)
    sae = SparseAutoencoder(d, M, generator=g).eval()
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
        sae.b_dec.normal_(0, 0.1, generator=g)
    return sae


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    root = tmp_path_factory.mktemp("hook")
    px = breast_image(rows=240, cols=160, chest_wall="left", seed=4)
    return read_mammogram(write_mammogram(root / "img.dcm", pixels=px, chest_wall="left"))


@pytest.fixture()
def models():
    return _classifier(), _sae(48)


def _head_logit(clf, fmap_at_hook):
    feats = rest_of_backbone(clf, fmap_at_hook, HOOK)
    return float(clf.head(feats.mean(dim=(2, 3))).reshape(-1)[0])


def test_hook_analysis_equals_explicit_computation(models, record):
    clf, sae = models
    a = Analyzer(clf, sae, size=SIZE, device="cpu", hook=HOOK, runtime="torch").analyse(record)
    x = preprocess_mammoclip(record, SIZE).tensor()
    with torch.no_grad():
        full_logit = float(clf(x).reshape(-1)[0])
        act = features_at(clf, x, HOOK)  # (1, 48, 12, 8)
        c, h, w = act.shape[1:]
        z = sae.encode(act[0].reshape(c, -1).T)
        rec = _head_logit(clf, sae.decode(z).T.reshape(1, c, h, w))
    assert a.hook == HOOK and a.grid == (12, 8) and not a.closed_form
    # the model's own prediction: the whole network, not the reconstruction
    assert a.logit == pytest.approx(full_logit, abs=1e-5)
    # stored compactly: float16 when dense (this SAE fires everywhere)
    np.testing.assert_allclose(a.latents.toarray(), z.numpy(), rtol=2e-3, atol=1e-4)
    assert a.reconstruction_logit == pytest.approx(rec, abs=1e-5)
    # gradient x activation: contributions plus the remainder are the reconstruction logit, and
    # the CAM's mean is that logit (as the last layer's closed-form CAM)
    assert a.logit_contributions.sum() + a.cam_bias == pytest.approx(rec, abs=1e-6)
    assert float(a.cam.mean()) == pytest.approx(rec, abs=1e-4)
    assert a.reconstruction_cam(None).shape == (12, 8)


def test_rerun_engine_runs_the_rest_of_the_backbone_for_each_set(models, record):
    clf, sae = models
    a = Analyzer(clf, sae, size=SIZE, device="cpu", hook=HOOK, runtime="torch").analyse(record)
    engine = a.intervention()
    assert isinstance(engine, RerunEngine) and a.intervention() is engine
    z = torch.as_tensor(a.latents.toarray())
    active = np.flatnonzero(a.pooled_latents > 0)
    assert active.size >= 4, "the test SAE must have active neurons to switch off"
    off = [int(n) for n in active[:3]]
    for mode in ("remove", "keep"):
        mask = torch.ones(M) if mode == "remove" else torch.zeros(M)
        mask[off] = 0.0 if mode == "remove" else 1.0
        with torch.no_grad():
            x_hat = sae.decode(z * mask).T.reshape(1, 48, 12, 8)
        explicit = _head_logit(clf, x_hat)
        result = engine.apply(off, mode)
        assert result.logit == pytest.approx(explicit, abs=1e-5), mode
        assert result.reconstruction_logit == pytest.approx(a.reconstruction_logit, abs=1e-9)
    runs = engine.reruns
    assert runs == 2
    engine.apply(off, "remove")  # the slider came back: remembered, nothing re-run
    assert engine.reruns == runs
    assert engine.apply([], "remove").logit == pytest.approx(a.reconstruction_logit)
    assert engine.reruns == runs
    # the paper's top-k modes go through the same re-run
    scores = np.stack([-a.logit_contributions, a.logit_contributions])
    k_set = engine.topk_set(scores, 2)
    assert engine.topk_deactivated(scores, 2).neurons.tolist() == k_set.tolist()
    # a linear estimate of a large removal must not be passed off as the re-run value
    with pytest.raises(ConfigError):
        engine.apply([M + 1], "remove")


def test_onnx_runtime_at_the_hook_agrees_with_torch(models, record, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MAMMO_SAE_CACHE_DIR", str(tmp_path))
    clf, sae = models
    t = Analyzer(clf, sae, size=SIZE, device="cpu", hook=HOOK, runtime="torch").analyse(record)
    o = Analyzer(clf, sae, size=SIZE, device="cpu", hook=HOOK, runtime="onnx").analyse(record)
    assert o.runtime == "onnx" and t.runtime == "torch"
    np.testing.assert_allclose(o.features, t.features, rtol=1e-4, atol=1e-4)
    assert o.probability == pytest.approx(t.probability, abs=1e-4)
    assert o.reconstruction_logit == pytest.approx(t.reconstruction_logit, abs=1e-3)
    # the exported graph stops at the hook: its own cache entry, not the full backbone's
    head = Analyzer(clf, _sae(256), size=SIZE, device="cpu", runtime="onnx").analyse(record)
    assert head.features.shape[0] == 256 and o.features.shape[0] == 48
    assert len(list(tmp_path.rglob("*.onnx"))) == 2


def test_hook_checks_and_cache_keys(models, record):
    clf, sae = models
    with pytest.raises(ConfigError, match="stage3"):
        Analyzer(clf, _sae(256), size=SIZE, device="cpu", hook=HOOK, runtime="torch")
    with pytest.raises(ConfigError, match="unknown hook point"):
        Analyzer(clf, sae, size=SIZE, device="cpu", hook="stage9", runtime="torch")
    head = Analyzer(clf, _sae(256), size=SIZE, device="cpu", runtime="torch")
    hooked = Analyzer(clf, sae, size=SIZE, device="cpu", hook=HOOK, runtime="torch",
                      cache=head.cache)  # fmt: skip
    a, b = head.analyse(record), hooked.analyse(record)
    # one shared cache, two layers: never each other's features
    assert a.features.shape != b.features.shape and not b.cached
    assert a.probability == pytest.approx(b.probability, abs=1e-5)  # the same model's prediction
    sibling = hooked.with_models(sae=_sae(48))
    assert sibling.hook == HOOK and sibling.analyse(record).cached


def test_from_weights_reads_the_hook_from_the_sae_config(models, record, tmp_path):
    from napari_mammo_sae.models.weights import save_weights

    clf, sae = models
    assert sae_hook({"training": {"hook": "stage3"}}) == "stage3"
    assert sae_hook({}) == "head"
    save_weights(tmp_path / "clf", clf, {"kind": "classifier", "backbone": "test_efficientnet"})
    save_weights(tmp_path / "sae", sae, {"training": {"hook": HOOK}})
    cfg = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert sae_hook(cfg) == HOOK
    analyzer = Analyzer.from_weights(tmp_path / "clf", tmp_path / "sae", size=SIZE,
                                     device="cpu", runtime="torch")  # fmt: skip
    assert analyzer.hook == HOOK
    assert analyzer.analyse(record).grid == (12, 8)


def test_region_intervention_zeroes_every_latent_on_the_cells(models, record):
    clf, sae = models
    cells = np.zeros((12, 8), bool)
    cells[3:6, 2:5] = True
    a = Analyzer(clf, sae, size=SIZE, device="cpu", hook=HOOK, runtime="torch").analyse(record)
    z = torch.as_tensor(a.latents.toarray())
    z[torch.as_tensor(cells.reshape(-1))] = 0
    with torch.no_grad():
        explicit = _head_logit(clf, sae.decode(z).T.reshape(1, 48, 12, 8))
    result = a.region_intervention(cells)
    assert result.mode == "region" and result.neurons.size == 0
    assert result.logit == pytest.approx(explicit, abs=1e-5)
    assert result.reconstruction_logit == pytest.approx(a.reconstruction_logit)
    # nothing switched off: the reconstruction itself
    assert a.region_intervention(np.zeros_like(cells)).logit == pytest.approx(
        a.reconstruction_logit, abs=1e-5
    )
    # at the last layer: the closed form through the CAM equals decoding with those rows zeroed
    head_sae = _sae(256)
    h = Analyzer(clf, head_sae, size=SIZE, device="cpu", runtime="torch").analyse(record)
    mask = np.zeros(h.grid, bool)
    mask[1:3, 1:3] = True
    zh = torch.as_tensor(h.latents.toarray())
    zh[torch.as_tensor(mask.reshape(-1))] = 0
    with torch.no_grad():
        closed = float(clf.head(head_sae.decode(zh).mean(0, keepdim=True)).reshape(-1)[0])
    assert h.region_intervention(mask).logit == pytest.approx(closed, abs=1e-4)
    with pytest.raises(ConfigError, match="cell mask"):
        h.region_intervention(np.zeros((2, 2), bool))
