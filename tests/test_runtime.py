"""Backbone runtimes: ONNX Runtime agrees with PyTorch, its export cache is never stale or trusted corrupt."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from data_helpers import breast_image, write_mammogram
from napari_mammo_sae.dicom import read_mammogram
from napari_mammo_sae.errors import BackboneRuntimeError, ConfigError
from napari_mammo_sae.models import runtime as rt
from napari_mammo_sae.models.backbone import create_backbone
from napari_mammo_sae.models.classifier import ConceptClassifier
from napari_mammo_sae.models.inference import Analyzer
from napari_mammo_sae.models.sae import SparseAutoencoder

SIZE = (96, 64)
torch.set_num_threads(2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone("test_efficientnet").eval()


def _image(n: int = 1, size=SIZE, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _eager(module, x) -> torch.Tensor:
    with torch.inference_mode():
        return module.forward_features(x)


class Recorder:
    """A progress object that remembers its descriptions."""

    def __init__(self):
        self.cancelled = False
        self.texts: list[str] = []

    def set_total(self, total):
        pass

    def update(self, n=1):
        pass

    def set_description(self, text):
        self.texts.append(text)

    def set_postfix(self, **values):
        pass

    def close(self):
        pass


# --- choosing ------------------------------------------------------------------------------------
def test_auto_is_onnx_on_cpu_and_torch_on_gpus(monkeypatch):
    monkeypatch.delenv(rt.ENV_RUNTIME, raising=False)
    assert rt.resolve_runtime("auto", "cpu") == "onnx"
    assert rt.resolve_runtime(None, "cpu") == "onnx"
    assert rt.resolve_runtime("auto", "cuda") == "torch"
    assert rt.resolve_runtime("auto", "cuda", "bfloat16") == "torch"
    assert rt.resolve_runtime("torch", "cpu") == "torch"
    monkeypatch.setenv(rt.ENV_RUNTIME, "torch")
    assert rt.resolve_runtime(None, "cpu") == "torch"
    monkeypatch.setattr(rt, "onnxruntime_available", lambda: False)
    assert rt.resolve_runtime("auto", "cpu") == "torch"  # no onnxruntime: torch, no error
    with pytest.raises(ConfigError, match="pip install onnxruntime"):
        rt.resolve_runtime("onnx", "cpu")


def test_bad_runtime_choices_are_config_errors():
    with pytest.raises(ConfigError, match="unknown runtime"):
        rt.resolve_runtime("tensorrt", "cpu")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        rt.resolve_runtime("onnx", "cuda")
    with pytest.raises(ConfigError, match="float32 only"):
        rt.resolve_runtime("onnx", "cpu", "bfloat16")


def test_onnx_threads_follow_omp_num_threads(monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert rt.ort_threads() == 1
    runtime = rt.create_runtime(_tiny(), "onnx", size=SIZE, folder=tmp_path)
    assert runtime.threads == 1
    assert runtime.session.get_session_options().intra_op_num_threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert rt.ort_threads() == torch.get_num_threads()


# --- agreement with torch ------------------------------------------------------------------------
def test_onnx_matches_torch_on_random_b5_weights(tmp_path):
    """Mammo-CLIP's backbone (B5 with lukemelas static pads), random weights, small input."""
    torch.manual_seed(0)
    size = (160, 96)
    b5 = create_backbone("tf_efficientnet_b5", static_padding=size).eval()
    runtime = rt.create_runtime(b5, "auto", size=size, folder=tmp_path)
    assert runtime.name == "onnx" and runtime.exported
    x = _image(2, size)  # the export has a dynamic batch axis
    expect = _eager(b5, x)
    got = runtime(x)
    assert got.shape == expect.shape == (2, 2048, 5, 3)
    assert float(expect.abs().max()) > 0
    assert _rel(got, expect) <= 1e-4
    assert runtime.meta["max_relative_difference"] <= 1e-4  # checked on export, recorded


def test_onnx_analysis_matches_torch_with_the_bundled_demo_model(tmp_path, monkeypatch):
    from napari_mammo_sae.models.weights import bundled_weights_dir, load_weights

    monkeypatch.setenv(rt.ENV_CACHE, str(tmp_path / "cache"))
    root = bundled_weights_dir()
    assert root is not None, "the bundled demo weights (weights/) are part of the repository"
    clf, config = load_weights(root / "finetuned-calcification")
    sae, _ = load_weights(root / "sae-finetuned-calcification")
    px = breast_image(rows=600, cols=400, chest_wall="left", seed=4)
    record = read_mammogram(write_mammogram(tmp_path / "a.dcm", pixels=px, chest_wall="left"))
    fast = Analyzer(clf, sae, config=config, device="cpu")
    assert fast.runtime_name == "onnx"
    a = fast.analyse(record)
    b = Analyzer(clf, sae, config=config, device="cpu", runtime="torch").analyse(record)
    assert (a.runtime, b.runtime) == ("onnx", "torch")
    assert _rel(torch.as_tensor(a.features), torch.as_tensor(b.features)) <= 1e-4
    assert a.logit == pytest.approx(b.logit, rel=1e-4, abs=1e-4)
    assert a.probability == pytest.approx(b.probability, abs=1e-4)
    np.testing.assert_allclose(
        a.pooled_latents, b.pooled_latents, atol=1e-4 * float(b.pooled_latents.max())
    )
    top = b.top_neurons(10)
    np.testing.assert_array_equal(a.top_neurons(10)[:3], top[:3])


def test_torch_runtime_channels_last_and_autocast_paths_run_on_cpu(tmp_path):
    """The GPU path's code (channels_last, autocast) exercised on the CPU."""
    bb = _tiny()
    x = _image(2)
    expect = _eager(bb, x)
    cl = rt.TorchRuntime(_tiny(), channels_last=True)
    assert cl.describe() == "torch (cpu, channels_last)"
    assert _rel(cl(x), expect) <= 1e-4
    bf = rt.TorchRuntime(_tiny(), dtype="bfloat16")
    out = bf(x)
    assert out.dtype == torch.float32 and _rel(out, expect) <= 0.1  # bfloat16: ~3 digits
    with pytest.raises(ConfigError):
        rt.TorchRuntime(bb, dtype="int8")


# --- the export cache ------------------------------------------------------------------------------
def test_export_is_cached_and_redone_when_weights_or_size_change(tmp_path):
    folder = tmp_path / "cache"
    progress = Recorder()
    first = rt.OnnxRuntime.from_module(_tiny(0), SIZE, folder=folder, progress=progress)
    assert first.exported and any("exporting the backbone to ONNX" in t for t in progress.texts)
    again_progress = Recorder()
    again = rt.OnnxRuntime.from_module(_tiny(0), SIZE, folder=folder, progress=again_progress)
    assert not again.exported and again.path == first.path and again_progress.texts == []
    other = _tiny(1)  # other weights: another export
    changed = rt.OnnxRuntime.from_module(other, SIZE, folder=folder)
    assert changed.exported and changed.path != first.path
    x = _image()
    assert _rel(changed(x), _eager(other, x)) <= 1e-4
    assert _rel(first(x), _eager(_tiny(0), x)) <= 1e-4
    bigger = rt.OnnxRuntime.from_module(_tiny(0), (128, 64), folder=folder)
    assert bigger.exported and bigger.path != first.path
    with pytest.raises(ConfigError, match="96x64"):
        first(_image(1, (128, 64)))
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".json", ".json"] + [".onnx"] * 3


def test_corrupt_or_stale_cache_files_are_exported_again(tmp_path, caplog):
    folder = tmp_path / "cache"
    bb = _tiny()
    x = _image()
    first = rt.OnnxRuntime.from_module(bb, SIZE, folder=folder)
    # flipped bytes in the graph: caught by its sha256, exported again, never used
    data = bytearray(first.path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    first.path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=rt.__name__):
        redone = rt.OnnxRuntime.from_module(bb, SIZE, folder=folder)
    assert redone.exported and "corrupt" in caplog.text
    assert _rel(redone(x), _eager(bb, x)) <= 1e-4
    # a truncated graph
    first.path.write_bytes(first.path.read_bytes()[:100])
    assert rt.OnnxRuntime.from_module(bb, SIZE, folder=folder).exported
    # an unreadable or foreign sidecar
    sidecar = first.path.with_suffix(".json")
    sidecar.write_text("{not json")
    assert rt.OnnxRuntime.from_module(bb, SIZE, folder=folder).exported
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "key": "0" * 64}))
    assert rt.OnnxRuntime.from_module(bb, SIZE, folder=folder).exported
    assert not rt.OnnxRuntime.from_module(bb, SIZE, folder=folder).exported
    assert not list(folder.glob(".*.tmp"))  # no half-written files left behind


def test_a_graph_onnx_runtime_cannot_load_is_exported_again(tmp_path, caplog):
    """A file whose sidecar vouches for it but that ONNX Runtime refuses: re-exported, no crash."""
    folder = tmp_path / "cache"
    bb = _tiny()
    first = rt.OnnxRuntime.from_module(bb, SIZE, folder=folder)
    other_folder = tmp_path / "other"
    other_folder.mkdir()
    bad = other_folder / first.path.name
    bad.write_bytes(b"this is not an ONNX graph")
    meta = dict(first.meta, onnx_sha256=rt._sha256_file(bad))
    bad.with_suffix(".json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger=rt.__name__):
        redone = rt.OnnxRuntime.from_module(bb, SIZE, folder=other_folder)
    assert redone.exported and "unusable" in caplog.text
    x = _image()
    assert _rel(redone(x), _eager(bb, x)) <= 1e-4


def test_failed_export_is_a_typed_error_and_auto_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(torch.onnx, "export", broken)
    bb = _tiny()
    with pytest.raises(BackboneRuntimeError, match="use runtime torch"):
        rt.create_runtime(bb, "onnx", size=SIZE, folder=tmp_path)
    with caplog.at_level(logging.WARNING, logger=rt.__name__):
        fallback = rt.create_runtime(bb, "auto", size=SIZE, folder=tmp_path)
    assert fallback.name == "torch" and "using PyTorch" in caplog.text
    x = _image()
    assert torch.equal(fallback(x), _eager(bb, x))
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*.tmp"))


def test_unwritable_cache_folder_is_a_typed_error(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(BackboneRuntimeError, match="NAPARI_MAMMO_SAE_CACHE_DIR"):
        rt.create_runtime(_tiny(), "onnx", size=SIZE, folder=blocker / "onnx")


def test_export_that_disagrees_with_torch_is_refused(tmp_path):
    with pytest.raises(BackboneRuntimeError, match="differs from PyTorch"):
        rt.export_onnx(_tiny(), SIZE, tmp_path / "x.onnx", tolerance=-1.0)
    assert not list(tmp_path.iterdir())


def test_cache_folder_is_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(rt.ENV_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert rt.cache_dir() == tmp_path / "napari-mammo-sae" / "onnx"
    monkeypatch.setenv(rt.ENV_CACHE, str(tmp_path / "mine"))
    assert rt.cache_dir() == tmp_path / "mine"


# --- the Analyzer ------------------------------------------------------------------------------------
@pytest.fixture()
def analyser_parts(tmp_path, monkeypatch):
    monkeypatch.setenv(rt.ENV_CACHE, str(tmp_path / "cache"))
    torch.manual_seed(0)
    clf = ConceptClassifier(create_backbone("test_efficientnet")).eval()
    sae = SparseAutoencoder(clf.feature_dim, 32, generator=torch.Generator().manual_seed(1))
    px = breast_image(rows=240, cols=160, chest_wall="right", seed=2)
    record = read_mammogram(write_mammogram(tmp_path / "a.dcm", pixels=px, chest_wall="right"))
    return clf, sae.eval(), record


def test_analyzer_runs_the_backbone_through_the_runtime(analyser_parts):
    clf, sae, record = analyser_parts
    an = Analyzer(clf, sae, size=(192, 128), device="cpu")
    progress = Recorder()
    res = an.analyse(record, progress=progress)
    assert an.runtime_name == "onnx" and res.runtime == "onnx"
    assert isinstance(an.prepare_runtime(), rt.OnnxRuntime)
    assert any("ONNX" in t for t in progress.texts)  # the first export shows on the progress
    ref = Analyzer(clf, sae, size=(192, 128), device="cpu", runtime="torch").analyse(record)
    assert ref.runtime == "torch"
    assert _rel(torch.as_tensor(res.features), torch.as_tensor(ref.features)) <= 1e-4
    assert res.probability == pytest.approx(ref.probability, abs=1e-5)
    # a sibling with another SAE reuses the same runtime (and the cached features)
    sib = an.with_models(sae=SparseAutoencoder(clf.feature_dim, 16))
    assert sib.prepare_runtime() is an.prepare_runtime()
    assert sib.analyse(record).cached


def test_analyzer_never_runs_a_stale_export_after_the_weights_change(analyser_parts):
    clf, sae, record = analyser_parts
    an = Analyzer(clf, sae, size=(192, 128), device="cpu", runtime="onnx")
    before = an.analyse(record)
    old = an.prepare_runtime()
    with torch.no_grad():
        next(clf.backbone.parameters()).mul_(1.5)
    after = an.analyse(record)
    assert an.prepare_runtime() is not old and an.prepare_runtime().exported
    ref = Analyzer(clf, sae, size=(192, 128), device="cpu", runtime="torch").analyse(record)
    assert not np.allclose(after.features, before.features)
    assert _rel(torch.as_tensor(after.features), torch.as_tensor(ref.features)) <= 1e-4


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_analysing_an_exam_at_once_gives_each_view_its_own_analysis(
    analyser_parts, tmp_path, runtime
):
    """analyse_many (batched backbone, one SAE encode) == analyse per view, and shares the cache."""
    clf, sae, record = analyser_parts
    other = read_mammogram(
        write_mammogram(tmp_path / "b.dcm", pixels=breast_image(rows=200, cols=150, seed=9))
    )
    records = [record, other, record]  # a repeated view is analysed once
    many_an = Analyzer(clf, sae, size=(192, 128), device="cpu", runtime=runtime)
    many = many_an.analyse_many(records, neurons=[1, 2], batch_size=2)
    one_an = Analyzer(clf, sae, size=(192, 128), device="cpu", runtime=runtime)
    single = [one_an.analyse(r, neurons=[1, 2]) for r in records]
    assert [a.runtime for a in many] == [runtime] * 3 and many_an.cache_len == 2
    for a, b in zip(many, single, strict=True):
        assert a.probability == pytest.approx(b.probability, abs=1e-5)
        assert a.reconstruction_logit == pytest.approx(b.reconstruction_logit, abs=1e-4)
        np.testing.assert_allclose(a.pooled_latents, b.pooled_latents, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.cam, b.cam, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.heatmaps[2], b.heatmaps[2], rtol=1e-4, atol=1e-6)
        assert a.geometry == b.geometry and a.timings["backbone"] > 0
    assert not np.allclose(many[0].pooled_latents, many[1].pooled_latents)
    again = many_an.analyse_many(records[:2])  # served from the cache, no backbone
    assert all(a.cached and a.timings["backbone"] == 0.0 for a in again)
    assert many_an.analyse(other).cached


def test_hooks_on_the_backbone_need_the_torch_runtime(analyser_parts):
    """Forward hooks (and gradients) run only in PyTorch; the ONNX graph does not call them."""
    clf, sae, record = analyser_parts
    seen = []
    handle = clf.backbone.conv_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        Analyzer(clf, sae, size=(192, 128), device="cpu", runtime="torch").analyse(record)
        assert len(seen) == 1
        onnx = Analyzer(clf, sae, size=(192, 128), device="cpu", runtime="onnx")
        onnx.prepare_runtime()  # exporting traces through the hook once
        seen.clear()
        onnx.analyse(record)
        assert seen == []
    finally:
        handle.remove()
    x = _image(1, (192, 128)).requires_grad_(True)
    rt.TorchRuntime(clf.backbone)  # inference mode inside, but the module itself stays trainable
    clf.backbone.forward_features(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_analyzer_rejects_half_precision_on_cpu(analyser_parts):
    clf, sae, _ = analyser_parts
    for dtype in ("float16", "bfloat16"):
        with pytest.raises(ConfigError, match="GPU"):
            Analyzer(clf, sae, size=(192, 128), device="cpu", dtype=dtype)


# --- the pipeline ------------------------------------------------------------------------------------
def test_extract_runtime_option_stores_the_same_maps(tmp_path, monkeypatch, capsys):
    from napari_mammo_sae.cli import main
    from napari_mammo_sae.pipeline.head_training import build_classifier, save_model
    from napari_mammo_sae.pipeline.probe import open_view
    from test_extract import write_vindr_dataset

    monkeypatch.setenv(rt.ENV_CACHE, str(tmp_path / "cache"))
    write_vindr_dataset(tmp_path / "data", studies=1)
    torch.manual_seed(0)
    weights = tmp_path / "clf"
    config = {"kind": "classifier", "backbone": "test_efficientnet", "input_size": [128, 80]}
    save_model(weights, build_classifier("test_efficientnet"), config)

    def extract(out, *extra):
        argv = ["extract", "--data", str(tmp_path / "data"), "--weights", str(weights), "--out",
                str(tmp_path / out), "--workers", "0", "--device", "cpu", "--dtype", "fp32", *extra]  # fmt: skip
        return main(argv), capsys.readouterr().out

    code, text = extract("onnx.h5", "--runtime", "onnx")
    assert code == 0 and "backbone runtime onnx" in text
    code, text = extract("torch.h5", "--runtime", "torch")
    assert code == 0 and "backbone runtime torch" in text
    a, b = open_view(tmp_path / "onnx.h5"), open_view(tmp_path / "torch.h5")
    assert list(a.index.image_id) == list(b.index.image_id) and len(a.index.image_id) == 4
    for row in range(4):
        fa, fb = torch.as_tensor(a.feature_map(row)), torch.as_tensor(b.feature_map(row))
        assert _rel(fa, fb) <= 1e-4
    assert extract("bf16.h5", "--amp", "bf16")[0] == 2  # autocast is for GPUs: ConfigError
