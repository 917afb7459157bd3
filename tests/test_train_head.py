"""train-head: linear probe and fine-tune on a tiny VinDr-layout set; checkpoints, signals, resume."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from napari_mammo_sae.cli import main
from napari_mammo_sae.errors import ConfigError
from napari_mammo_sae.models.folders import load_model_folder
from napari_mammo_sae.pipeline.train_head import HeadConfig, train_head
from test_extract import write_vindr_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vindr")
    write_vindr_dataset(root, studies=3)
    return root


def _cfg(data, **kw):
    base = dict(
        data=str(data), concept="calcification", variant="finetuned", backbone="test_efficientnet",
        input_size=(128, 80), epochs=2, batch_size=4, lr=1e-3, device="cpu",
    )  # fmt: skip
    base.update(kw)
    return HeadConfig(**base)


def _state(folder):
    model, config = load_model_folder(folder)
    return model.state_dict(), config


def test_finetune_writes_weights_with_provenance(data, tmp_path):
    out = tmp_path / "ft"
    rc = main(
        ["train-head", "--data", str(data), "--concept", "calcification", "--variant", "finetuned",
         "--backbone", "test_efficientnet", "--input-size", "128x80", "--epochs", "2",
         "--batch-size", "4", "--lr", "1e-3", "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    state, config = _state(out)
    prov = config["provenance"]
    assert (prov["task"], prov["concept"], prov["variant"]) == (
        "concept",
        "calcification",
        "finetuned",
    )
    assert 0.0 <= prov["train_auroc"] <= 1.0 and 0.0 <= prov["test_auroc"] <= 1.0
    assert prov["pos_weight"] == pytest.approx(6 / 2)  # 8 training images, 2 with calcification
    assert len(prov["history"]) == 2 and prov["bn_stats"] == "updated"
    assert len(prov["backbone_signature"]) == 64


def test_linear_probe_keeps_the_backbone_frozen(data, tmp_path):
    from napari_mammo_sae.models.folders import backbone_signature

    init = tmp_path / "init"
    train_head(_cfg(data, epochs=1), init)
    out = tmp_path / "lp"
    result = train_head(
        _cfg(data, concept="mass", variant="pretrained", init_weights=str(init), epochs=3), out
    )
    init_model, _ = load_model_folder(init)
    model, config = load_model_folder(out)
    # weights and BN statistics identical: the probe's store is the backbone's store
    assert config["provenance"]["backbone_signature"] == backbone_signature(init_model)
    for (k, a), b in zip(init_model.backbone.state_dict().items(), model.backbone.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), k
    assert not torch.equal(init_model.head.weight, model.head.weight)
    assert result.epochs_run == 3 and config["provenance"]["bn_stats"] == "frozen"


def test_pretext_task_view(data, tmp_path):
    result = train_head(_cfg(data, task="view", concept=None, epochs=1), tmp_path / "view")
    _, config = load_model_folder(tmp_path / "view")
    assert config["task"] == "view" and result.train_auroc == result.train_auroc  # not NaN


class _Killer:
    """A progress object that sends SIGTERM to this process at the given update."""

    cancelled = False

    def __init__(self, at: int) -> None:
        self.at, self.n = at, 0

    def update(self, n: int = 1) -> None:
        self.n += 1
        if self.n == self.at:
            os.kill(os.getpid(), signal.SIGTERM)

    def set_total(self, total) -> None: ...
    def set_description(self, text) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(data, tmp_path):
    full = tmp_path / "full"
    train_head(_cfg(data, epochs=2), full)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train_head(_cfg(data, epochs=2), cut, progress=_Killer(at=4))  # mid epoch 2
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 1)
    assert not (cut / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="--resume"):
        train_head(_cfg(data, epochs=2), cut)
    with pytest.raises(ConfigError, match="made with"):
        train_head(_cfg(data, epochs=2, seed=99), cut, resume=True)
    train_head(_cfg(data, epochs=2), cut, resume=True)
    a, _ = _state(full)
    b, _ = _state(cut)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_arguments_exit_with_config_code(data, tmp_path):
    base = [
        "train-head",
        "--data",
        str(data),
        "--backbone",
        "test_efficientnet",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main([*base, "--concept", "density"]) == ConfigError.exit_code
    assert main([*base, "--concept", "mass", "--variant", "frozen"]) == ConfigError.exit_code
    assert main([*base, "--concept", "mass", "--input-size", "big"]) == ConfigError.exit_code


# --- the lesion (patch) pretext ------------------------------------------------------------------
def test_lesion_patches_sit_on_findings_and_negatives_avoid_them():
    import numpy as np

    from napari_mammo_sae.pipeline import lesion_pretext as lp

    img = np.full((200, 120), -1.0, np.float32)
    img[20:180, :100] = 1.0  # the breast
    centres = np.array([[60.0, 40.0]])
    crops = lp.sample_patches(img, centres, 32, np.random.default_rng(0))
    pos = [(r, c) for r, c, y in crops if y == 1]
    neg = [(r, c) for r, c, y in crops if y == 0]
    assert len(pos) == lp.POSITIVES_PER_FINDING and len(neg) == lp.NEGATIVES_PER_IMAGE
    for r, c in pos:  # the finding's centre lies in every positive crop, away from its edge
        assert r + 8 <= 60 <= r + 24 and c + 8 <= 40 <= c + 24
    for r, c in neg:  # negatives: tissue at the centre, the finding outside the crop
        assert img[r + 16, c + 16] > 0
        assert not (r <= 60 < r + 32 and c <= 40 < c + 32)
    for r, c, _ in crops:
        assert 0 <= r <= 200 - 32 and 0 <= c <= 120 - 32
    # the epoch's list depends only on (seed, epoch)
    a = lp.epoch_patches([img, img], [centres, np.zeros((0, 2))], 32, 5, 0)
    assert a == lp.epoch_patches([img, img], [centres, np.zeros((0, 2))], 32, 5, 0)
    assert a != lp.epoch_patches([img, img], [centres, np.zeros((0, 2))], 32, 5, 1)


def test_lesion_pretext_trains_resumes_exactly_and_initialises_a_concept_head(data, tmp_path):
    lesion = dict(task="lesion", concept=None, patch_size=32, epochs=2, batch_size=4)
    full = tmp_path / "full"
    rc = main(
        ["train-head", "--data", str(data), "--task", "lesion", "--variant", "finetuned",
         "--backbone", "test_efficientnet", "--input-size", "128x80", "--patch-size", "32",
         "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--device", "cpu", "--out", str(full)]
    )  # fmt: skip
    assert rc == 0
    state, config = _state(full)
    prov = config["provenance"]
    assert prov["task"] == "lesion" and prov["patch_size"] == 32
    assert [h["epoch"] for h in prov["history"]] == [1, 2] and prov["history"][0]["patches"] > 0
    assert 0.0 <= prov["train_auroc"] <= 1.0
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train_head(_cfg(data, **lesion), cut, progress=_Killer(at=3))
    train_head(_cfg(data, **lesion), cut, resume=True)
    b, _ = _state(cut)
    for k in state:
        assert torch.equal(state[k], b[k]), k
    # a backbone for --init-weights like any other
    ft = tmp_path / "ft"
    train_head(_cfg(data, epochs=1, init_weights=str(full)), ft)
    ft_state, _ = _state(ft)
    assert ft_state["backbone.conv_stem.weight"].shape == state["backbone.conv_stem.weight"].shape
    with pytest.raises(ConfigError, match="--variant finetuned"):
        train_head(_cfg(data, **lesion, variant="pretrained"), tmp_path / "x")
    with pytest.raises(ConfigError, match="--patch-size"):
        train_head(_cfg(data, **{**lesion, "patch_size": 500}), tmp_path / "y")


def test_signal_stop_turns_sigterm_into_a_flag_and_restores_the_handler():
    import threading

    from napari_mammo_sae.pipeline.signals import SignalStop

    before = signal.getsignal(signal.SIGTERM)
    with SignalStop() as stop:
        assert not stop.requested and stop.signum is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    # outside the main thread no handler can be installed: the context changes nothing
    seen = {}

    def worker():
        with SignalStop() as s:
            seen["requested"] = s.requested
        seen["handler"] = signal.getsignal(signal.SIGTERM)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"requested": False, "handler": before}
