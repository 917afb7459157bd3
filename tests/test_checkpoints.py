"""Mammo-CLIP checkpoints: conformance with efficientnet-pytorch, safe loading, helpful errors."""

from __future__ import annotations

import os
import pickle
import shlex
import struct
import zipfile

import numpy as np
import pytest
import torch
from efficientnet_pytorch import EfficientNet

from napari_mammo_sae.errors import CheckpointError, UnsafePickleError
from napari_mammo_sae.models.backbone import create_backbone
from napari_mammo_sae.models.checkpoints import (
    identify_efficientnet,
    load_checkpoint_file,
    load_mammoclip_classifier,
    load_mammoclip_clip,
    lukemelas_to_timm,
)
from napari_mammo_sae.models.classifier import ConceptClassifier

torch.set_num_threads(2)


def image(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth random structure plus noise, 3 equal channels (like a normalised mammogram)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 1, max(2, h // 32), max(2, w // 32), generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (img + 0.3 * torch.randn(n, 1, h, w, generator=g)).repeat(1, 3, 1, 1)


def reference(name: str, seed: int = 0) -> EfficientNet:
    """efficientnet-pytorch model with random weights and random non-trivial BatchNorm statistics.

    The statistics start from one train-mode pass (so activations neither vanish nor saturate and
    the feature map keeps its spatial structure: a padding offset then shows), then are perturbed.
    """
    torch.manual_seed(seed)
    model = EfficientNet.from_name(name)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.momentum = None  # cumulative average: one pass sets the statistics
            m.reset_running_stats()
        model.train().extract_features(image(2, 256, 160, seed))
        for m in bns:
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.2 + 0.9)
            noise = torch.randn(m.running_mean.shape, generator=g) * 0.05
            m.running_mean.add_(noise * m.running_var.sqrt())
            m.momentum = 0.01
    return model.eval()


def head_tensors(channels: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "classifier.classification_head.weight": torch.randn(1, channels, generator=g) * 0.05,
        "classifier.classification_head.bias": torch.tensor([0.3]),
    }


def encoder_tensors(ref: EfficientNet) -> dict[str, torch.Tensor]:
    """image_encoder.* as Mammo-CLIP stores it (its EfficientNet has no _fc layer)."""
    return {f"image_encoder.{k}": v for k, v in ref.state_dict().items() if not k.startswith("_fc")}


def save_downstream(path, ref: EfficientNet, **extra) -> dict[str, torch.Tensor]:
    """A downstream classifier .pth in Mammo-CLIP's layout (SPEC 1.1), numpy predictions included."""
    state = {**encoder_tensors(ref), **head_tensors(ref._conv_head.out_channels)}
    ckpt = {"model": state, "predictions": np.linspace(0, 1, 7), "epoch": 4, "auroc": 0.81}
    ckpt.update(extra)
    torch.save(ckpt, path)
    return state


def save_clip(path, ref: EfficientNet, name: str) -> None:
    """A pretrained CLIP .tar in Mammo-CLIP's layout (text side shrunk to a few tensors)."""
    channels = ref._conv_head.out_channels
    model = {
        **encoder_tensors(ref),
        "text_encoder.text_encoder.embeddings.word_embeddings.weight": torch.zeros(8, 4),
        "image_projection.projection.weight": torch.zeros(512, channels),
        "image_projection.projection.bias": torch.zeros(512),
        "text_projection.projection.weight": torch.zeros(512, 768),
        "text_projection.projection.bias": torch.zeros(512),
        "logit_scale": torch.tensor(2.6),
    }
    config = {"model": {"image_encoder": {"name": name, "source": "cnn"}}}
    torch.save({"model": model, "optimizer": {"state": {}}, "config": config, "epoch": 7,
                "train_loss": 1.5}, path)  # fmt: skip


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- conformance at 1520 x 912 (SPEC 1: <= 1e-4 relative max error) -----------------------------
@pytest.mark.parametrize(
    ("name", "arch"),
    [
        ("efficientnet-b2", "tf_efficientnet_b2"),
        # about 25 s alone, over a minute on a busy 2-core machine (marked, never skipped)
        pytest.param("efficientnet-b5", "tf_efficientnet_b5", marks=pytest.mark.slow),
    ],
)
def test_conformance_with_efficientnet_pytorch(tmp_path, name, arch):
    ref = reference(name)
    path = tmp_path / "upmc_breast_clip_det_b5_period_n_ft_seed_10_fold0_best_aucroc_ver084.pth"
    state = save_downstream(path, ref)
    model = load_mammoclip_classifier(path)  # numpy predictions load without the trust switch
    assert isinstance(model, ConceptClassifier) and model.backbone_name == arch
    assert model.variant == "finetuned" and model.checkpoint_info["epoch"] == 4
    x = image(1, 1520, 912, seed=5)
    with torch.inference_mode():
        expect = ref.extract_features(x)
        got = model.forward_features(x)
        assert got.shape == expect.shape == (1, ref._conv_head.out_channels, 48, 29)
        assert float(expect.std(dim=(-2, -1)).min()) > 0  # every channel varies over the map
        assert rel_err(got, expect) <= 1e-4
        pooled = expect.mean(dim=(-2, -1))
        logit = pooled @ state["classifier.classification_head.weight"][0] + 0.3
        torch.testing.assert_close(model.head(got), logit, rtol=1e-4, atol=1e-5)
        if arch == "tf_efficientnet_b2":  # timm's own padding does NOT match (SPEC 1.3)
            plain = create_backbone(arch)
            plain.load_state_dict(model.backbone.state_dict())
            assert rel_err(plain.eval().forward_features(x), expect) > 1e-2
    # the CLIP .tar's image encoder loads to the same backbone (same weights, same padding)
    tar = tmp_path / "b-model-best-epoch-7.tar"
    save_clip(
        tar, ref, "tf_efficientnet_b5_ns-detect" if "b5" in name else "tf_efficientnetv2-detect"
    )
    encoder = load_mammoclip_clip(tar)  # plain tensors and dicts: no trust needed
    assert encoder.static_padding == model.static_padding
    mine = model.backbone.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in encoder.state_dict().items())
    assert str(encoder) == str(model.backbone)


def test_key_map_covers_every_b5_key():
    """SPEC 1.2: all 852 lukemelas keys map one to one onto timm's tf_efficientnet_b5."""
    lk = {k: v for k, v in EfficientNet.from_name("efficientnet-b5").state_dict().items()
          if not k.startswith("_fc")}  # fmt: skip
    assert len(lk) == 852 and identify_efficientnet(lk) == "tf_efficientnet_b5"
    timm_keys = create_backbone("tf_efficientnet_b5").state_dict()
    mapped = lukemelas_to_timm(lk, [3, 5, 5, 7, 7, 9, 3])
    assert set(mapped) == set(timm_keys)
    assert all(mapped[k].shape == timm_keys[k].shape for k in mapped)
    assert mapped["blocks.0.0.conv_pw.weight"] is lk["_blocks.0._project_conv.weight"]
    assert mapped["blocks.2.0.conv_pwl.weight"] is lk["_blocks.8._project_conv.weight"]
    assert mapped["blocks.3.0.conv_dw.weight"] is lk["_blocks.13._depthwise_conv.weight"]
    assert mapped["bn2.running_var"] is lk["_bn1.running_var"]


# --- small and fast: B0 at a small input -----------------------------------------------------
@pytest.fixture(scope="module")
def b0():
    return reference("efficientnet-b0", seed=3)


def test_b0_conformance_any_size_and_weights_round_trip(tmp_path, b0):
    from napari_mammo_sae.models.weights import load_weights, save_weights

    path = tmp_path / "upmc_breast_clip_det_b0_period_n_lp_seed_10_fold0.pth"
    save_downstream(path, b0)
    model = load_mammoclip_classifier(path)
    assert model.variant == "pretrained"
    x = image(2, 224, 160, seed=6)
    with torch.inference_mode():
        expect = b0.extract_features(x)
        assert rel_err(model.forward_features(x), expect) <= 1e-4
    save_weights(tmp_path / "converted", model, {"source": path.name})
    back, config = load_weights(tmp_path / "converted")
    assert config["static_padding"] == [224, 224] and config["backbone"] == "tf_efficientnet_b0"
    with torch.inference_mode():
        assert rel_err(back.forward_features(x), expect) <= 1e-4
        torch.testing.assert_close(back(x), model(x))


def test_refuses_code_running_pickle_without_the_switch(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload(), "epoch": 1}, path)
    for loader in (load_mammoclip_classifier, load_mammoclip_clip):
        with pytest.raises(UnsafePickleError) as err:
            loader(path)
        msg = str(err.value)
        assert "arbitrary code" in msg and "trust_pickle=True" in msg and "--trust-pickle" in msg
        assert "evil.pth" in msg and "builtins.exec" in msg
        assert not marker.exists()
    # the switch really unpickles (the payload runs); the result is then no checkpoint
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_mammoclip_classifier(path, trust_pickle=True)
    assert marker.read_text() == "ran"


class SystemPayload:
    """Unpickles into os.system(touch marker): what a malicious checkpoint would hide."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def rewrite_pickle(path, old: bytes, new: bytes) -> None:
    """Rewrite a torch zip with ``old`` replaced by ``new`` inside data.pkl (other members kept)."""
    with zipfile.ZipFile(path) as src:
        members = [(info, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info, data in members:
            if info.filename.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            dst.writestr(info, data)


def test_released_layout_loads_without_trust(tmp_path, b0):
    """{'model', 'predictions' (ndarray), 'epoch', 'auroc'} as Mammo-CLIP releases it: no switch."""
    path = tmp_path / "upmc_breast_clip_det_b0_period_n_ft_seed_10_fold0_best_aucroc_ver084.pth"
    predictions = np.array([[0.1, 0.9], [0.7, 0.2]], dtype=np.float32)
    state = save_downstream(path, b0, predictions=predictions, auroc=np.float64(0.8125),
                            labels=np.array([0, 1], dtype=np.int64))  # fmt: skip
    obj = load_checkpoint_file(path)
    np.testing.assert_array_equal(obj["predictions"], predictions)
    assert obj["predictions"].dtype == np.float32 and obj["labels"].dtype == np.int64
    assert obj["auroc"] == 0.8125 and obj["epoch"] == 4
    model = load_mammoclip_classifier(path)
    assert model.checkpoint_info["epoch"] == 4 and model.checkpoint_info["auroc"] == 0.8125
    key = "classifier.classification_head.weight"
    torch.testing.assert_close(model.head.weight, state[key])
    # files written under numpy 1 name the reconstruction numpy.core.multiarray: they load too
    rewrite_pickle(path, b"numpy._core.multiarray", b"numpy.core.multiarray")
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        assert b"numpy._core" not in archive.read(pkl)
    np.testing.assert_array_equal(load_checkpoint_file(path)["predictions"], predictions)


def test_released_layout_with_code_is_refused(tmp_path, b0):
    """The numpy allow-list opens nothing else: code beside the arrays is still refused."""
    marker = tmp_path / "payload-ran"
    cases = {
        "scheduler": {"scheduler": SystemPayload(marker)},
        "object-array": {"predictions": np.array([SystemPayload(marker)], dtype=object)},
    }
    for name, extra in cases.items():
        path = tmp_path / f"{name}.pth"
        save_downstream(path, b0, **extra)
        with pytest.raises(UnsafePickleError, match=r"posix\.system"):
            load_mammoclip_classifier(path)
        assert not marker.exists(), name


def test_corrupt_file_is_never_unpickled_even_when_trusted(tmp_path, b0):
    """A damaged file with code in it: typed error with --trust-pickle, and the code never runs."""
    marker = tmp_path / "payload-ran"
    good = tmp_path / "good.pth"
    save_downstream(good, b0, scheduler=SystemPayload(marker))
    raw = good.read_bytes()
    with zipfile.ZipFile(good) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    data_at = info.header_offset + 30 + name_len + extra_len + 8  # local header, then the data
    flipped = bytearray(raw)
    flipped[data_at] ^= 0xFF  # one byte of a tensor's storage: the member's CRC no longer matches
    payload_pickle = pickle.dumps({"model": SystemPayload(marker)}, protocol=2)
    files = {
        "bit-flip.pth": bytes(flipped),
        "truncated-zip.pth": raw[: len(raw) * 2 // 3],
        "truncated-pickle.pth": payload_pickle[:-1],  # legacy (non-zip) stream cut before STOP
        "bare-pickle.pth": payload_pickle,  # one pickle is not a torch file either
    }
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        for trust in (False, True):
            with pytest.raises(CheckpointError) as err:
                load_mammoclip_classifier(path, trust_pickle=trust)
            assert not isinstance(err.value, UnsafePickleError), name
            assert "corrupt" in str(err.value) and name in str(err.value)
            assert not marker.exists(), (name, trust)
    # the intact file with the same content is refused without the switch, runs with it
    with pytest.raises(UnsafePickleError):
        load_mammoclip_classifier(good)
    assert not marker.exists()
    load_mammoclip_classifier(good, trust_pickle=True)
    assert marker.exists()


def test_clip_file_passed_as_classifier(tmp_path, b0):
    tar = tmp_path / "b0-model-best-epoch-7.tar"
    save_clip(tar, b0, "tf_efficientnet_b0")
    with pytest.raises(CheckpointError, match="CLIP checkpoint.*not a downstream classifier"):
        load_mammoclip_classifier(tar)


def test_incomplete_and_mismatched_checkpoints(tmp_path, b0):
    state = {**encoder_tensors(b0), **head_tensors(1280)}
    cases = {
        "missing-key": ({k: v for k, v in state.items() if k != "image_encoder._blocks.3._bn1.weight"}, "missing"),
        "wrong-shape": ({**state, "image_encoder._blocks.3._bn1.weight": torch.zeros(7)}, "wrong shape"),
        "no-head": ({k: v for k, v in state.items() if not k.startswith("classifier.")}, "no concept head"),
        "two-outputs": ({**state, "classifier.classification_head.weight": torch.zeros(2, 1280),
                         "classifier.classification_head.bias": torch.zeros(2)}, "one-output"),
        "other-net": ({k: v for k, v in state.items() if "_blocks.15." not in k}, "none of"),
        "no-encoder": (head_tensors(1280), "no image_encoder"),
    }  # fmt: skip
    for name, (tensors, match) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save({"model": tensors, "epoch": 1}, path)
        with pytest.raises(CheckpointError, match=match):
            load_mammoclip_classifier(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_mammoclip_classifier(tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 20)
    with pytest.raises(CheckpointError) as err:
        load_mammoclip_classifier(garbage)
    assert not isinstance(err.value, UnsafePickleError)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_mammoclip_classifier(tensor)


def test_mammosae_file_passed_as_classifier(tmp_path):
    path = tmp_path / "sparse_autoencoder_final.pt"
    d, m = 8, 16
    torch.save({"tied_bias": torch.zeros(1, d), "pre_encoder_bias._bias_reference": torch.zeros(1, d),
                "encoder._weight": torch.zeros(1, m, d), "encoder._bias": torch.zeros(1, m),
                "decoder._weight": torch.zeros(1, d, m),
                "post_decoder_bias._bias_reference": torch.zeros(1, d)}, path)  # fmt: skip
    with pytest.raises(CheckpointError, match="Mammo-SAE"):
        load_mammoclip_classifier(path)
    from napari_mammo_sae.models.checkpoints import load_mammosae

    assert load_mammosae(path).d_latent == m


def test_trusted_file_with_objects_from_missing_modules(tmp_path, b0, monkeypatch):
    """A trusted checkpoint whose config object comes from a package not installed here loads."""
    import sys
    import types

    fake = types.ModuleType("fake_training_framework")

    class DictConfig:
        def __init__(self, items):
            self.items = items

    DictConfig.__module__, DictConfig.__qualname__ = fake.__name__, "DictConfig"
    fake.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    path = tmp_path / "upmc_breast_clip_det_b0_period_n_ft_seed_10.pth"
    save_downstream(path, b0, config=DictConfig({"lr": 1e-4}))
    monkeypatch.delitem(sys.modules, fake.__name__)
    with pytest.raises(UnsafePickleError, match="fake_training_framework.DictConfig"):
        load_mammoclip_classifier(path)
    model = load_mammoclip_classifier(path, trust_pickle=True)
    assert model.backbone_name == "tf_efficientnet_b0" and model.variant == "finetuned"
