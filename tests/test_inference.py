"""The Analyzer on a tiny configuration: timm test_efficientnet, a 64-latent SAE, a small input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_helpers import PATIENT_VALUES, breast_image, tiny_classifier, write_mammogram
from napari_mammo_sae.dicom import read_mammogram
from napari_mammo_sae.errors import ConfigError
from napari_mammo_sae.models.inference import Analyzer, PositionLatents, resolve_device
from napari_mammo_sae.models.sae import SparseAutoencoder
from napari_mammo_sae.preprocess import preprocess_mammoclip, preprocess_robust
from napari_mammo_sae.progress import Cancelled

SIZE = (192, 128)  # model input; test_efficientnet's stride 32 -> a 6 x 4 feature grid
M = 64

torch.set_num_threads(2)


def _classifier():
    return tiny_classifier()


def _feature_dim(clf) -> int:
    return int(
        clf.head.in_features if hasattr(clf.head, "in_features") else clf.head.linear.in_features
    )


def _sae(d: int, b_enc: float = 0.0, seed: int = 1) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d, M, generator=g).eval()
    with torch.no_grad():
        sae.b_enc.fill_(b_enc)
        sae.b_dec.normal_(0, 0.1, generator=g)
    return sae


class CountingClassifier(torch.nn.Module):
    """Wraps a classifier and counts backbone runs."""

    def __init__(self, clf):
        super().__init__()
        self.inner = clf
        self.head = clf.head
        self.calls = 0

    def forward_features(self, x):
        self.calls += 1
        return self.inner.forward_features(x)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inf")
    out = []
    for i, side in enumerate(("left", "right")):
        px = breast_image(rows=240, cols=160, chest_wall=side, seed=i)
        out.append(write_mammogram(root / f"img{i}.dcm", pixels=px, chest_wall=side))
    return out


@pytest.fixture(scope="module")
def records(files):
    return [read_mammogram(f) for f in files]


@pytest.fixture()
def setup():
    clf = _classifier()
    sae = _sae(_feature_dim(clf))
    return clf, sae


def _features(clf, pre):
    with torch.no_grad():
        return clf.forward_features(pre.tensor())[0]


def test_probability_latents_and_maps_match_direct_computation(setup, records):
    clf, sae = setup
    an = Analyzer(clf, sae, size=SIZE, device="cpu")
    res = an.analyse(records[0], neurons=[3, 10, 63])
    pre = preprocess_mammoclip(records[0], SIZE)
    with torch.no_grad():
        direct = torch.sigmoid(clf(pre.tensor())).item()
        fmap = _features(clf, pre)
        c, h, w = fmap.shape
        z = sae.encode(fmap.reshape(c, -1).T)  # (P, m)
    assert res.probability == pytest.approx(direct, abs=1e-6)
    assert res.logit == pytest.approx(
        float(torch.logit(torch.tensor(direct, dtype=torch.float64))), abs=1e-4
    )
    assert res.grid == (h, w) == (6, 4)
    assert res.geometry == pre.geometry
    np.testing.assert_allclose(res.pooled_latents, z.mean(0).numpy(), atol=1e-6)
    assert res.pooled_latents.dtype == np.float32 and res.pooled_latents.shape == (M,)
    maps = res.latent_maps([3, 10, 63])
    assert maps.shape == (3, h, w) and maps.dtype == np.float32
    ref = z[:, [3, 10, 63]].T.reshape(3, h, w).numpy()
    tol = 0 if res.latents.is_sparse else 2e-3 * max(1.0, float(np.abs(ref).max()))  # fp16 if dense
    np.testing.assert_allclose(maps, ref, atol=tol + 1e-6)
    np.testing.assert_allclose(res.heatmaps[10], maps[1])
    assert res.features.shape == (c, h, w)
    assert set(res.timings) >= {"decode", "preprocess", "backbone", "sae", "heatmaps", "total"}
    assert res.timings["backbone"] > 0 and res.timings["sae"] > 0 and not res.cached


def test_reconstruction_logit_and_cam_equal_explicit_decode(setup, records):
    clf, sae = setup
    res = Analyzer(clf, sae, size=SIZE, device="cpu").analyse(records[0])
    pre = preprocess_mammoclip(records[0], SIZE)
    with torch.no_grad():
        fmap = _features(clf, pre)
        c, h, w = fmap.shape
        x_hat = sae.decode(sae.encode(fmap.reshape(c, -1).T))  # (P, C): decode every position
        explicit_logit = float(clf.head(x_hat.mean(0)))
        explicit_cam = clf.head(x_hat).reshape(h, w).numpy()
    assert res.reconstruction_logit == pytest.approx(explicit_logit, abs=1e-5)
    assert res.reconstruction_probability == pytest.approx(
        1 / (1 + np.exp(-explicit_logit)), abs=1e-6
    )
    np.testing.assert_allclose(res.cam, explicit_cam, atol=1e-5)
    np.testing.assert_allclose(res.reconstruction_cam(), explicit_cam, atol=1e-3)
    # contributions sum to the reconstruction logit minus the bias terms
    eng = res.intervention()
    assert eng.reconstruction_logit == pytest.approx(res.reconstruction_logit, abs=1e-9)
    top = res.top_neurons(3)
    assert np.all(np.diff(res.logit_contributions[top]) <= 0)
    keep = eng.apply(top, "keep").logit
    with torch.no_grad():
        z = sae.encode(fmap.reshape(c, -1).T)
        mask = torch.zeros(M)
        mask[torch.as_tensor(top)] = 1
        explicit_keep = float(clf.head(sae.decode(z * mask).mean(0)))
    assert keep == pytest.approx(explicit_keep, abs=1e-5)


def test_repeat_analysis_uses_cache_and_never_stale(setup, records):
    clf, sae = setup
    counting = CountingClassifier(clf)
    counting.backbone = clf.backbone  # what the cache keys features by
    an = Analyzer(counting, sae, size=SIZE, device="cpu", cache_size=4, runtime="torch")
    first = an.analyse(records[0])
    assert counting.calls == 1
    again = an.analyse(records[0], neurons=[5])
    assert counting.calls == 1 and again.cached
    assert again.timings["backbone"] == 0.0 and again.timings["sae"] == 0.0
    assert again.heatmaps[5].shape == first.grid
    assert again.probability == first.probability and again.signature == first.signature
    an.analyse(records[1])
    assert counting.calls == 2 and an.cache_len == 2
    # a changed head: new signature and logit, but the backbone features are reused
    with torch.no_grad():
        clf.head.bias.add_(1.0)
    changed = an.analyse(records[0])
    assert counting.calls == 2 and changed.signature != first.signature
    assert changed.logit == pytest.approx(first.logit + 1.0, abs=1e-5)
    assert changed.reconstruction_logit == pytest.approx(first.reconstruction_logit + 1.0, abs=1e-5)
    # a changed SAE: the SAE reruns on the cached features, the backbone does not
    with torch.no_grad():
        sae.b_enc.add_(0.05)
    after_sae = an.analyse(records[0])
    assert counting.calls == 2 and after_sae.timings["sae"] > 0
    assert after_sae.signature != changed.signature
    assert not np.allclose(after_sae.pooled_latents, changed.pooled_latents)
    with torch.no_grad():
        ref = sae.encode(
            torch.as_tensor(after_sae.features).reshape(after_sae.features.shape[0], -1).T
        )
    np.testing.assert_allclose(after_sae.pooled_latents, ref.mean(0).numpy(), atol=1e-6)
    # a changed backbone: never the stale features
    with torch.no_grad():
        next(clf.backbone.parameters()).mul_(1.5)
    after_bb = an.analyse(records[0])
    assert counting.calls == 3 and not after_bb.cached
    assert not np.allclose(after_bb.features, after_sae.features)
    with pytest.raises(ValueError):
        after_bb.features[0, 0, 0] = 1.0  # the cache's memory is read-only
    an.clear_cache()
    an.analyse(records[0])
    assert counting.calls == 4


def test_sibling_analyzer_shares_backbone_results(setup, records):
    clf, sae = setup
    counting = CountingClassifier(clf)
    an = Analyzer(counting, sae, size=SIZE, device="cpu", runtime="torch")
    a = an.analyse(records[0])
    other_sae = _sae(_feature_dim(clf), seed=7)
    sib = an.with_models(sae=other_sae)
    b = sib.analyse(records[0])
    assert counting.calls == 1 and b.cached and b.timings["sae"] > 0
    assert b.probability == a.probability and b.signature != a.signature
    assert not np.allclose(a.pooled_latents, b.pooled_latents)
    assert an.analyse(records[0]).timings["sae"] == 0.0  # the first SAE's latents are still there


def test_cache_is_bounded_and_keyed_by_preprocessing(setup, records):
    clf, sae = setup
    counting = CountingClassifier(clf)
    an = Analyzer(counting, sae, size=SIZE, device="cpu", cache_size=1, runtime="torch")
    an.analyse(records[0])
    an.analyse(records[1])
    an.analyse(records[0])  # evicted by records[1]
    assert counting.calls == 3 and an.cache_len == 1
    robust = Analyzer(counting, sae, preprocess="robust", size=SIZE, device="cpu", runtime="torch")
    res = robust.analyse(records[0])
    assert res.preprocess == "robust" and "robust" in res.signature
    assert res.geometry == preprocess_robust(records[0], SIZE).geometry
    # a config (weights folder) gives size and preprocessing
    cfg = Analyzer(clf, sae, device="cpu", config={"input_size": [160, 96], "preprocess": "robust"})
    assert cfg.size == (160, 96) and cfg.preprocess == "robust"


def test_cancel_between_stages_caches_nothing(setup, records):
    clf, sae = setup

    class CancelAfter:
        def __init__(self, n):
            self.n, self.cancelled = n, False

        def set_total(self, total):
            pass

        def set_description(self, text):
            pass

        def set_postfix(self, **kw):
            pass

        def close(self):
            pass

        def update(self, k=1):
            self.n -= k
            self.cancelled = self.n <= 0

    counting = CountingClassifier(clf)
    an = Analyzer(counting, sae, size=SIZE, device="cpu", runtime="torch")
    with pytest.raises(Cancelled):
        an.analyse(records[0], progress=CancelAfter(1))  # after preprocessing
    assert counting.calls == 0 and an.cache_len == 0
    with pytest.raises(Cancelled):
        an.analyse(records[0], progress=CancelAfter(2))  # after the backbone
    assert counting.calls == 1 and an.cache_len == 0


def test_sparse_and_dense_latent_storage(setup, records):
    clf, _ = setup
    d = _feature_dim(clf)
    pre = preprocess_mammoclip(records[0], SIZE)
    fmap = _features(clf, pre)
    tokens = fmap.reshape(fmap.shape[0], -1).T
    for b_enc, sparse in ((-0.02, True), (1.0, False)):
        sae = _sae(d, b_enc)
        with torch.no_grad():
            z = sae.encode(tokens)
        density = float((z > 0).float().mean())
        assert (density <= 0.25) == sparse, density
        res = Analyzer(clf, sae, size=SIZE, device="cpu").analyse(records[0])
        assert res.latents.is_sparse == sparse
        assert res.latents.density == pytest.approx(density)
        np.testing.assert_allclose(res.latents.toarray(), z.numpy(), rtol=1e-3, atol=1e-6)
        if sparse:
            assert res.latents.nbytes < z.numel() * 2
    st = PositionLatents.from_tensor(torch.tensor([[0.0, 1.5], [0.0, 0.0], [2.0, 0.0]]))
    assert st.is_sparse is False  # 2/6 > 25%
    st = PositionLatents.from_tensor(torch.tensor([[0.0] * 7 + [1.5]] * 2))
    assert st.is_sparse and st.columns([7]).ravel().tolist() == [1.5, 1.5]
    with pytest.raises(ConfigError):
        st.columns([8])


def test_kept_latent_buffer_is_reused_and_never_leaks_into_a_result(setup, records):
    clf, _ = setup
    sae = _sae(_feature_dim(clf), -0.02)
    an = Analyzer(clf, sae, size=SIZE, device="cpu")
    first = an.analyse(records[0], neurons=[3])
    buffer = an._workspace
    assert buffer is not None and buffer.shape == (24, M)
    kept = (first.latents.toarray().copy(), first.pooled_latents.copy(), first.cam.copy())
    second = an.analyse(records[1], neurons=[3])
    assert an._workspace is buffer  # the same buffer, not a fresh one per image
    for got, want in zip(
        (first.latents.toarray(), first.pooled_latents, first.cam), kept, strict=True
    ):
        np.testing.assert_array_equal(got, want)  # the second encode did not overwrite the first
    fmap = torch.from_numpy(second.features.copy())  # the backbone features the analyzer used
    with torch.no_grad():
        z = sae.encode(fmap.reshape(fmap.shape[0], -1).T)
    np.testing.assert_array_equal(second.latents.toarray(), z.numpy())
    # while another thread holds the buffer, an encode gets a fresh array
    assert an._take_workspace(z[:, :1]) is not None
    try:
        assert an._take_workspace(z[:, :1]) is None
    finally:
        an._workspace_lock.release()


def test_analyse_path_times_decode_and_has_no_patient_data(setup, records, files):
    clf, sae = setup
    an = Analyzer(clf, sae, size=SIZE, device="cpu")
    res = an.analyse_path(files[0], neurons=[1])
    assert res.timings["decode"] > 0
    assert res.timings["total"] >= sum(
        res.timings[k] for k in ("decode", "preprocess", "backbone", "sae")
    )
    assert res.sop_instance_uid == records[0].sop_instance_uid
    text = repr(res) + res.signature
    assert not any(v in text for v in PATIENT_VALUES)


def test_device_dtype_and_dimension_checks(setup):
    clf, sae = setup
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="bfloat16"):
        Analyzer(clf, sae, size=SIZE, device="cpu", dtype="bfloat16")
    with pytest.raises(ConfigError, match="dtype"):
        Analyzer(clf, sae, size=SIZE, device="cpu", dtype="float16")
    with pytest.raises(ConfigError, match="SAE trained"):
        Analyzer(clf, _sae(_feature_dim(clf) + 1), size=SIZE, device="cpu")
    with pytest.raises(ConfigError, match="preprocessing"):
        Analyzer(clf, sae, preprocess="nope", device="cpu")


def test_from_weights_folders_uses_their_config(setup, records, tmp_path):
    from napari_mammo_sae.models.weights import save_weights

    clf, sae = setup
    save_weights(
        tmp_path / "head",
        clf,
        {
            "kind": "classifier",
            "backbone": "test_efficientnet",
            "input_size": [160, 96],
            "preprocess": "robust",
        },
    )
    save_weights(tmp_path / "sae", sae, {})
    an = Analyzer.from_weights(tmp_path / "head", tmp_path / "sae", device="cpu")
    assert an.size == (160, 96) and an.preprocess == "robust"
    res = an.analyse(records[0])
    direct = Analyzer(clf, sae, size=(160, 96), preprocess="robust", device="cpu").analyse(
        records[0]
    )
    assert res.probability == pytest.approx(direct.probability, abs=1e-6)
    np.testing.assert_allclose(res.pooled_latents, direct.pooled_latents, atol=1e-6)
    assert res.signature == direct.signature  # same weights, same signature
