"""SAE training: every ReLU step path equals autograd, exact and crash-safe resume, DDP equivalence
(ReLU, TopK, BatchTopK), BatchTopK's saved inference threshold, the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from napari_mammo_sae.cli import main
from napari_mammo_sae.errors import ConfigError
from napari_mammo_sae.models.sae import SparseAutoencoder
from napari_mammo_sae.pipeline import store as fs
from napari_mammo_sae.pipeline.sae_train import checkpoint as ckpt
from napari_mammo_sae.pipeline.train_sae import (
    Comm,
    TrainConfig,
    autograd_grads,
    choose_path,
    make_optimizer,
    relu_grads,
    train_sae,
)

D, M, GRID = 32, 128, (4, 5)


def make_store(path, n=12, seed=0):
    """A tiny store of sparse-structured features: each token = a few of 48 non-negative atoms."""
    rng = np.random.default_rng(seed)
    atoms = np.abs(rng.normal(size=(48, D))).astype(np.float32)
    w = fs.create(path, feature_dim=D, grid=GRID, backbone_signature="tiny", dtype="float32")
    for i in range(n):
        codes = rng.exponential(size=(GRID[0] * GRID[1], 48)) * (rng.random((20, 48)) < 0.08)
        tokens = codes @ atoms + 0.05 * rng.normal(size=(20, D))
        w.append(f"im{i}", tokens.T.reshape(D, *GRID), {"split": "training", "study_id": "s"})
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "features.h5")


def small_config(**kw):
    base = dict(
        d_latent=M, batch_size=40, steps=12, fraction=0.5, shuffle_buffer_images=4,
        resample_every_steps=4, resample_dataset_size=80, checkpoint_every=100, log_every=1,
        l1_coefficient=1e-3, lr=1e-3, device="cpu",
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("path", ["dense", "gathered", "sparse"])
def test_every_relu_step_path_equals_autograd(path):
    torch.manual_seed(0)
    ref = SparseAutoencoder(D, M, init="default", l1_coefficient=1e-2)
    with torch.no_grad():
        ref.b_enc[: M // 2] = -50.0  # half the latents never fire: the gathered path gathers
        ref.b_enc[M // 2 :] = -0.3  # the others fire on some tokens only: per-token sparsity
        ref.b_dec.normal_()
    fast = SparseAutoencoder(D, M, l1_coefficient=1e-2)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(24, D) + 1.0
    stats = relu_grads(fast, x, n_total=24, path=path)
    ref_stats = autograd_grads(ref, x, n_total=24)
    assert stats["path"] == path
    assert stats["active_fraction"] <= 0.5 and 0 < stats["l0_sum"] < 24 * M / 4
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(
            getattr(fast, name).grad, getattr(ref, name).grad, rtol=1e-5, atol=1e-7
        )
    assert stats["sq_sum"] == pytest.approx(ref_stats["sq_sum"], rel=1e-5)
    assert stats["l1_sum"] == pytest.approx(ref_stats["l1_sum"], rel=1e-5)
    assert stats["l0_sum"] == ref_stats["l0_sum"]
    first = {n: getattr(fast, n).grad.clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    relu_grads(fast, x, n_total=24, path=path)  # deterministic: what a bit-exact resume needs
    assert all(torch.equal(first[n], getattr(fast, n).grad) for n in first)
    # one full optimizer step keeps them together, decoder columns stay unit norm
    for model in (fast, ref):
        make_optimizer(model, small_config()).step()
        model.normalise_decoder_()
    torch.testing.assert_close(fast.W_dec, ref.W_dec, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.W_enc, ref.W_enc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.W_dec.norm(dim=0), torch.ones(M))


def test_step_path_follows_measured_density():
    kw = dict(sparse_threshold=0.4, pair_threshold=0.03)
    assert choose_path(0.95, 0.005, **kw) == "sparse"  # trained: most latents fire, few per token
    assert choose_path(0.95, 0.3, **kw) == "dense"  # early, dense phase
    assert choose_path(0.05, 0.0005, **kw) == "gathered"  # many dead latents: 5% of the columns
    torch.manual_seed(0)
    sae = SparseAutoencoder(D, M, init="default")
    x = torch.randn(256, D)
    assert relu_grads(sae, x, n_total=256, pair_threshold=0.03)["path"] == "dense"
    with torch.no_grad():
        sae.b_enc.fill_(-0.2)  # a few latents per token, nearly every latent somewhere
    stats = relu_grads(sae, x, n_total=256, pair_threshold=0.05)
    assert 0 < stats["l0_sum"] / (256 * M) <= 0.05 and stats["active_fraction"] > 0.9
    assert stats["path"] == "sparse"
    with torch.no_grad():
        sae.b_enc[8:] = -50.0  # only 8 latents can fire: the gathered columns are cheapest
    assert relu_grads(sae, x, n_total=256, pair_threshold=0.05)["path"] == "gathered"
    with pytest.raises(ValueError, match="unknown ReLU step path"):
        relu_grads(sae, x, n_total=256, path="fast")


def test_training_lowers_loss_and_writes_outputs(tiny_store, tmp_path):
    out = tmp_path / "run"
    res = train_sae(tiny_store, small_config(steps=30), out)
    assert not res.interrupted and res.steps == 30
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[-1]["mse"] < rows[0]["mse"] * 0.7
    assert {"fvu", "l0", "dead_fraction", "tokens_per_s"} <= set(rows[0])
    assert sum(r["resampled"] for r in rows) > 0  # paper init leaves dead latents to resample
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("step,tokens,epoch,tokens_per_s,loss,mse")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["d_in"], cfg["d_latent"], cfg["kind"]) == (D, M, "relu")
    assert TrainConfig.from_toml(out / "train_config.toml") == small_config(steps=30)
    w = _weights(out)
    assert w["W_enc"].shape == (M, D) and w["W_dec"].shape == (D, M)
    torch.testing.assert_close(w["W_dec"].norm(dim=0), torch.ones(M))
    with pytest.raises(ConfigError, match="already holds"):
        train_sae(tiny_store, small_config(), out)


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_sigterm_then_resume_is_bit_for_bit(tiny_store, tmp_path, kind):
    extra = {} if kind == "relu" else {"kind": "topk", "k": 4, "dead_tokens": 80}
    full = tmp_path / "full"
    train_sae(tiny_store, small_config(**extra), full)

    def kill_at_5(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: checkpoint after this step

    part = tmp_path / "part"
    res = train_sae(tiny_store, small_config(**extra), part, on_step=kill_at_5)
    assert res.interrupted and res.steps == 5
    assert not (part / "model.safetensors").exists()
    assert (part / "checkpoint" / "LATEST").read_text().strip() == "step-000000005"
    assert (
        json.loads((part / "checkpoint" / "step-000000005" / "state.json").read_text())["step"] == 5
    )
    res2 = train_sae(tiny_store, small_config(**extra), part, resume=True)
    assert res2.steps == 12 and not res2.interrupted
    a, b = _weights(full), _weights(part)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ma = (full / "metrics.jsonl").read_text().splitlines()
    mb = (part / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["mse"] for r in ma] == [json.loads(r)["mse"] for r in mb]


@pytest.fixture(scope="module")
def full_run(tiny_store, tmp_path_factory):
    """An uninterrupted 12-step ReLU run (checkpoints every 4 steps), the reference for resumes."""
    out = tmp_path_factory.mktemp("full") / "run"
    train_sae(tiny_store, small_config(checkpoint_every=4), out)
    return out


def _assert_same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    ma = [json.loads(r)["mse"] for r in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(r)["mse"] for r in (b / "metrics.jsonl").read_text().splitlines()]
    assert ma == mb and len(ma) == 12


_KILL_BETWEEN_FILES = textwrap.dedent(
    """
    import os, signal, sys
    from napari_mammo_sae.pipeline.sae_train import checkpoint
    from napari_mammo_sae.pipeline.train_sae import TrainConfig, train_sae

    write_meta = checkpoint._write_meta

    def killed_after_the_tensors(path, meta):
        if meta["step"] == 8:  # the second checkpoint: its tensors are on disk, its JSON is not
            os.kill(os.getpid(), signal.SIGKILL)
        write_meta(path, meta)

    checkpoint._write_meta = killed_after_the_tensors
    train_sae(sys.argv[1], TrainConfig(**eval(sys.argv[3])), sys.argv[2])
    """
)


def test_kill_between_the_checkpoint_files_leaves_a_resumable_run(tiny_store, tmp_path, full_run):
    out = tmp_path / "killed"
    cfg = dict(small_config(checkpoint_every=4).__dict__)
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_BETWEEN_FILES, str(tiny_store), str(out), repr(cfg)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    folder = out / "checkpoint"
    assert (folder / "step-000000008" / "state.safetensors").exists()  # the torn new checkpoint
    assert not (folder / "step-000000008" / "state.json").exists()
    assert ckpt.current_name(folder) == "step-000000004"  # the pointer still names the old one
    res = train_sae(tiny_store, small_config(checkpoint_every=4), out, resume=True)
    assert res.steps == 12 and not res.interrupted
    _assert_same_run(full_run, out)
    assert sorted(p.name for p in folder.iterdir()) == ["LATEST", "step-000000012"]


@pytest.mark.parametrize("stage", ["_write_tensors", "_switch_pointer", "_remove_stale"])
def test_crash_at_any_stage_of_a_save_resumes_exactly(
    tiny_store, tmp_path, full_run, monkeypatch, stage
):
    out = tmp_path / stage
    real = getattr(ckpt, stage)
    calls = []

    def crash_on_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # the step-8 save dies here (before, between or after the switch)
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kw)

    monkeypatch.setattr(ckpt, stage, crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_sae(tiny_store, small_config(checkpoint_every=4), out)
    monkeypatch.setattr(ckpt, stage, real)
    expect = "step-000000008" if stage == "_remove_stale" else "step-000000004"
    assert ckpt.current_name(out / "checkpoint") == expect
    train_sae(tiny_store, small_config(checkpoint_every=4), out, resume=True)
    _assert_same_run(full_run, out)


def test_a_checkpoint_in_the_old_single_folder_layout_still_resumes(tiny_store, tmp_path, full_run):
    out = tmp_path / "old"
    train_sae(tiny_store, small_config(checkpoint_every=4), out, stop_after_steps=4)
    folder = out / "checkpoint"
    for f in (folder / "step-000000004").iterdir():
        f.rename(folder / f.name)
    (folder / "step-000000004").rmdir()
    (folder / "LATEST").unlink()
    train_sae(tiny_store, small_config(checkpoint_every=4), out, resume=True)
    _assert_same_run(full_run, out)
    assert not (folder / "state.json").exists()  # the old layout's files are gone after a save


def test_a_pointer_to_a_missing_checkpoint_is_a_clear_error(tiny_store, tmp_path):
    out = tmp_path / "run"
    train_sae(tiny_store, small_config(checkpoint_every=4), out, stop_after_steps=4)
    (out / "checkpoint" / "LATEST").write_text("step-000000099\n")  # edited by hand
    with pytest.raises(ConfigError, match="incomplete"):
        train_sae(tiny_store, small_config(checkpoint_every=4), out, resume=True)
    with pytest.raises(ConfigError, match="already holds"):
        train_sae(tiny_store, small_config(checkpoint_every=4), out)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_KINDS = {
    "relu": {},
    "topk": {"kind": "topk", "k": 4, "dead_tokens": 80},  # AuxK from step 2 (dead = 2 steps)
    "batchtopk": {"kind": "batchtopk", "k": 4, "dead_tokens": 80},
}


def _ddp_worker(rank, world, store_path, out, port, kind="relu"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        train_sae(store_path, small_config(**_KINDS[kind]), out, rank=rank, world=world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk"])
def test_two_process_gloo_matches_single_process(tiny_store, tmp_path, kind):
    single = tmp_path / "single"
    train_sae(tiny_store, small_config(**_KINDS[kind]), single)
    ddp = tmp_path / "ddp"
    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, str(tiny_store), str(ddp), _free_port(), kind), nprocs=2, join=True
    )
    a, b = _weights(single), _weights(ddp)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert not torch.equal(a["W_enc"], SparseAutoencoder(D, M, init="paper").W_enc)
    rows = [json.loads(r) for r in (ddp / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(r) for r in (single / "metrics.jsonl").read_text().splitlines()]
    for key in ("mse", "l0", "auxk"):  # the logged losses are the global batch's, as one process
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in ref], rtol=1e-4)
    if kind != "relu":
        assert max(r["auxk"] for r in rows) > 0  # AuxK (global residual variance) was exercised
    if kind == "batchtopk":
        assert float(a["threshold"]) > 0  # the inference threshold agrees too (compared above)


def test_batchtopk_run_saves_a_threshold_that_makes_encoding_batch_independent(
    tiny_store, tmp_path
):
    from napari_mammo_sae.models.weights import load_weights

    out = tmp_path / "btk"
    train_sae(tiny_store, small_config(**_KINDS["batchtopk"]), out)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    sae, cfg = load_weights(out, manifest=False)
    assert cfg["threshold"] == pytest.approx(rows[-1]["threshold"]) and cfg["threshold"] > 0
    x = torch.from_numpy(fs.open(tiny_store).token_stream(40, split="training").next_global())
    with torch.no_grad():
        together = sae.encode(x)
        alone = torch.cat([sae.encode(x[i : i + 1]) for i in range(len(x))])
    assert int((together > 0).sum()) > 0
    assert torch.equal(together > 0, alone > 0)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


class _LateDist:
    """A stand-in for torch.distributed whose 'worker thread' lets go of tensors late, as gloo does."""

    class ReduceOp:
        MAX = "max"

    def __init__(self):
        import threading

        self.kept, self.calls, self.lock = [], [], threading.Lock()

    def all_reduce(self, tensor, op=None):
        import threading

        self.calls.append(("all_reduce", op))
        held = tensor.view(tensor.shape)  # a C++-side reference: the view keeps the tensor alive
        with self.lock:
            self.kept.append(held)

        def let_go():
            with self.lock:
                self.kept[:] = [t for t in self.kept if t is not held]

        threading.Timer(0.05, let_go).start()

    def barrier(self):
        self.calls.append(("barrier", None))

    def destroy_process_group(self):
        with self.lock:
            self.calls.append(("destroy", len(self.kept)))


def test_collectives_close_only_after_the_backend_let_go_of_every_tensor():
    fake = _LateDist()
    comm = Comm(fake, owned=True)
    for _ in range(3):
        comm.all_reduce(torch.ones(4))  # the caller drops its reference at once
    comm.all_reduce(torch.ones(1), op=comm.ReduceOp.MAX)
    comm.close(clean=True)
    assert fake.calls[-2:] == [("barrier", None), ("destroy", 0)]  # nothing held at destroy
    # a failed run skips the barrier (a dead peer never arrives) but still closes
    fake2 = _LateDist()
    Comm(fake2, owned=True).close(clean=False)
    assert fake2.calls == [("destroy", 0)]
    # a process group the caller made is left open
    fake3 = _LateDist()
    Comm(fake3, owned=False).close(clean=True)
    assert fake3.calls == []


def test_cli_end_to_end_with_toml_and_resume(tiny_store, tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text("[train]\nbatch_size = 40\nfraction = 0.5\nlr = 0.001\nd_latent = 128\n")
    out = tmp_path / "cli"
    args = ["train", "--store", str(tiny_store), "--out", str(out), "--config", str(toml),
            "--steps", "6", "--quiet", "--resample-every-steps", "3"]  # fmt: skip
    assert main(args) == 0
    assert (out / "model.safetensors").exists()
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["steps"] == 6 and saved["batch_size"] == 40 and saved["lr"] == 0.001
    assert main(args) == 2  # refuses to overwrite a run
    assert main(["train", "--store", str(tmp_path / "none.h5"), "--out", str(tmp_path / "x")]) == 6
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 1\n")
    assert main(["train", "--store", str(tiny_store), "--out", str(tmp_path / "y"),
                 "--config", str(bad)]) == 2  # fmt: skip
    assert main(["train", "--store", str(tiny_store), "--out", str(tmp_path / "z"),
                 "--resume"]) == 2  # fmt: skip
