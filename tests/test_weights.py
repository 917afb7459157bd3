"""The weights format: config.json + model.safetensors, manifest verification, head-only folders."""

from __future__ import annotations

import json

import pytest
import torch

from napari_mammo_sae.errors import CheckpointError, WeightsIntegrityError
from napari_mammo_sae.models.backbone import create_backbone
from napari_mammo_sae.models.classifier import ConceptClassifier
from napari_mammo_sae.models.sae import SparseAutoencoder
from napari_mammo_sae.models.weights import (
    bundled_weights_dir,
    load_weights,
    save_weights,
    sha256_file,
    verify_folder,
)

torch.set_num_threads(2)


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name else
                        torch.randn(t.shape, generator=g) * 0.1)  # fmt: skip
    return model


@pytest.fixture
def classifier():
    return _randomise(
        ConceptClassifier(create_backbone("test_efficientnet"), concept="mass")
    ).eval()


def _manifest(root, *folders):
    files = {}
    for f in folders:
        for name in ("config.json", "model.safetensors"):
            p = root / f / name
            files[f"{f}/{name}"] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    (root / "MANIFEST.json").write_text(json.dumps({"files": files}))


def test_classifier_round_trip(tmp_path, classifier):
    folder = save_weights(
        tmp_path / "head", classifier, {"variant": "finetuned", "input_size": [64, 64]}
    )
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    model, config = load_weights(folder)
    assert isinstance(model, ConceptClassifier) and not model.training
    assert config["backbone"] == "test_efficientnet" and config["kind"] == "classifier"
    assert config["variant"] == "finetuned" and config["concept"] == "mass"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier(x), rtol=0, atol=0)


def test_static_padding_survives_round_trip(tmp_path):
    model = ConceptClassifier(create_backbone("tf_efficientnet_b0", static_padding=224)).eval()
    save_weights(tmp_path / "b0", model, {})
    back, config = load_weights(tmp_path / "b0")
    assert config["static_padding"] == [224, 224] and back.static_padding == (224, 224)
    x = torch.randn(1, 3, 72, 40)
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), model.forward_features(x))


def test_sae_round_trip_as_train_writes_it(tmp_path):
    from napari_mammo_sae.pipeline.train_sae import save_sae_weights

    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, "topk", k=4)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    folder = save_sae_weights(tmp_path / "sae", sae, {"backbone": "test_efficientnet"})
    back, config = load_weights(folder)
    assert isinstance(back, SparseAutoencoder) and back.kind == "topk" and back.k == 4
    assert config["backbone"] == "test_efficientnet"
    x = torch.randn(5, 16)
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)


def test_float16_storage_loads_into_float32(tmp_path, classifier):
    from safetensors.torch import load_file, save_file

    folder = save_weights(tmp_path / "h", classifier, {})
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
              str(folder / "model.safetensors"))  # fmt: skip
    model, _ = load_weights(folder)
    assert model.head.weight.dtype == torch.float32
    torch.testing.assert_close(model.head.weight, classifier.head.weight.half().float())


def test_head_only_folder_takes_backbone_from_named_folder(tmp_path, classifier):
    from safetensors.torch import load_file, save_file

    save_weights(tmp_path / "backbone-pretext", classifier, {"task": "density"})
    probe = _randomise(ConceptClassifier(create_backbone("test_efficientnet")), seed=3)
    probe.backbone.load_state_dict(classifier.backbone.state_dict())
    folder = save_weights(tmp_path / "pretrained-mass", probe, {"variant": "pretrained"})
    state = load_file(str(folder / "model.safetensors"))
    save_file(
        {k: v for k, v in state.items() if k.startswith("head.")}, str(folder / "model.safetensors")
    )
    config = json.loads((folder / "config.json").read_text())
    config["backbone_weights"] = "../backbone-pretext"
    config["backbone_sha256"] = sha256_file(tmp_path / "backbone-pretext" / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_weights(folder)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), probe.eval()(x))
    # a different backbone in the named folder is refused
    other = _randomise(ConceptClassifier(create_backbone("test_efficientnet")), seed=9)
    save_weights(tmp_path / "backbone-pretext", other, {})
    with pytest.raises(WeightsIntegrityError, match="different backbone"):
        load_weights(folder)


def test_manifest_mismatch_is_refused(tmp_path, classifier):
    save_weights(tmp_path / "finetuned-mass", classifier, {})
    _manifest(tmp_path, "finetuned-mass")
    assert verify_folder(tmp_path / "finetuned-mass")
    load_weights(tmp_path / "finetuned-mass")  # intact: loads
    path = tmp_path / "finetuned-mass" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight, still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="does not match MANIFEST.json") as err:
        load_weights(tmp_path / "finetuned-mass")
    assert "restore" in str(err.value)
    # the same file outside the manifest's folder is not checked, and skipping is explicit
    load_weights(tmp_path / "finetuned-mass", manifest=False)


def test_edited_config_is_refused_too(tmp_path, classifier):
    save_weights(tmp_path / "m", classifier, {})
    _manifest(tmp_path, "m")
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text(cfg.read_text().replace('"mass"', '"calcification"'))
    with pytest.raises(WeightsIntegrityError, match="config.json"):
        load_weights(tmp_path / "m")


def test_explicit_manifest_path(tmp_path, classifier):
    save_weights(tmp_path / "a" / "m", classifier, {})
    _manifest(tmp_path / "a", "m")
    moved = tmp_path / "a" / "MANIFEST.json"
    elsewhere = tmp_path / "a" / "other.json"
    moved.rename(elsewhere)
    assert not verify_folder(tmp_path / "a" / "m")  # no MANIFEST.json beside it: not listed
    assert verify_folder(tmp_path / "a" / "m", elsewhere)


def test_not_a_weights_folder(tmp_path, classifier):
    with pytest.raises(CheckpointError, match="no weights folder"):
        load_weights(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a weights folder"):
        load_weights(tmp_path / "empty")
    folder = save_weights(tmp_path / "x", classifier, {})
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_weights(folder)


def test_config_that_does_not_fit_the_tensors(tmp_path, classifier):
    folder = save_weights(tmp_path / "x", classifier, {})
    config = json.loads((folder / "config.json").read_text())
    config["backbone"] = "tf_efficientnet_b0"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(folder)
    (folder / "config.json").write_text(json.dumps({"kind": "mystery"}))
    with pytest.raises(CheckpointError, match="neither a classifier"):
        load_weights(folder)


def test_bundled_weights_dir_is_the_repository_folder():
    from pathlib import Path

    got = bundled_weights_dir()
    repo = Path(__file__).resolve().parents[1]
    assert got is None or got == repo / "weights"
    if (repo / "weights").is_dir():
        assert got == repo / "weights"


def test_bundled_weights_match_their_manifest():
    """Every bundled weights folder loads and matches weights/MANIFEST.json."""
    root = bundled_weights_dir()  # committed to the repository: absent is a failure, not a skip
    assert root is not None and (root / "MANIFEST.json").is_file(), "weights/MANIFEST.json missing"
    folders = [p for p in sorted(root.iterdir()) if (p / "config.json").is_file()]
    assert folders, "weights/MANIFEST.json exists but no weights folder is bundled"
    for folder in folders:
        assert verify_folder(folder), f"{folder.name} is not listed in weights/MANIFEST.json"
        module, _ = load_weights(folder)
        assert all(torch.isfinite(p).all() for p in module.parameters())
