"""``napari-mammo-sae train``: train a sparse autoencoder on a feature store (the paper's recipe).

Defaults are the paper's: ReLU + L1 3e-5 (loss averaged over dims), expansion 8, Adam lr 5e-4
(0.9, 0.999, 1e-8), constant lr, batch 4096 tokens, seed 49, 25% of patch positions per image,
dead-latent resampling every 10 epochs (not in the last 10). ``--kind topk|batchtopk --k K`` trains
the Gao et al. variants with the AuxK loss instead.

Output folder::

    config.json + model.safetensors   final SAE (project weights format)
    train_config.json / .toml         the TrainConfig of the run
    metrics.csv, metrics.jsonl        step, tokens, tokens/s, loss, MSE, FVU, L0, dead fraction, ...
    checkpoint/state.safetensors + state.json   weights, Adam state, data position, RNG states

SIGINT/SIGTERM (and checkpoint_every) write the checkpoint; ``--resume`` continues exactly (bit for
bit on CPU). Under ``torchrun`` every rank takes its 1/world slice of each global batch (so W ranks
x B/W tokens = 1 rank x B tokens), gradients are summed across ranks (nccl on CUDA, gloo on CPU),
and rank 0 writes logs, checkpoints and weights.

The ReLU step has a hand-written backward that equals autograd (tests check it): only the encoder
forward touches every latent; the decoder forward, the decoder gradient and the encoder gradient
use the columns of latents active somewhere in the batch (a dense path runs when most are active).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
METRIC_FIELDS = (
    "step", "tokens", "epoch", "tokens_per_s", "loss", "mse", "l1", "auxk", "fvu", "l0",
    "dead_fraction", "active_fraction", "resampled", "elapsed_s",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything that defines an SAE training run (saved beside the weights)."""

    kind: str = "relu"
    k: int | None = None
    l1_coefficient: float = 3e-5
    expansion: int = 8
    d_latent: int | None = None  # overrides expansion
    init: str = "paper"  # paper | default
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 4096
    epochs: float = 200.0
    steps: int | None = None  # overrides epochs
    seed: int = 49
    split: str = "training"
    fraction: float = 0.25
    shuffle_buffer_images: int = 64
    resample: bool = True  # ReLU: the paper's dead-latent resampling
    resample_every_epochs: float = 10.0
    resample_every_steps: int | None = None  # overrides resample_every_epochs
    resample_dataset_size: int = 20480
    k_aux: int | None = None  # TopK/BatchTopK AuxK (default d/2)
    auxk_coefficient: float = 1 / 32
    dead_tokens: int = 1_000_000  # a latent silent this many tokens counts as dead
    sparse_threshold: float = 0.4  # active-latent fraction above which the dense path runs
    checkpoint_every: int = 1000
    log_every: int = 10
    device: str = "auto"

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if self.kind not in ("relu", "topk", "batchtopk"):
            raise ConfigError(f"unknown SAE kind {self.kind!r}: use relu, topk or batchtopk")
        if self.kind != "relu" and not self.k:
            raise ConfigError(f"--kind {self.kind} needs --k (latents kept per token)")
        if self.batch_size < 1 or self.lr <= 0 or not 0 < self.fraction <= 1:
            raise ConfigError("batch size and lr must be positive and fraction in (0, 1]")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (TOML/JSON); ConfigError names unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown training option(s) {', '.join(unknown)}: valid are {', '.join(sorted(names))}"
            )
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read a TOML file (flat keys, or a [train] table)."""
        import tomllib

        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read training config {path}: {exc}") from exc
        return cls.from_dict(data.get("train", data))

    def to_toml(self) -> str:
        """The config as TOML text (None values left out)."""
        lines = []
        for key, value in asdict(self).items():
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = json.dumps(value)
            elif isinstance(value, (tuple, list)):
                text = "[" + ", ".join(repr(float(v)) for v in value) + "]"
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        return "\n".join(lines) + "\n"


@dataclass
class TrainResult:
    """What a training run did."""

    out_dir: Path
    steps: int
    tokens: int
    interrupted: bool
    final_metrics: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = float("nan")
    weights: Path | None = None


# --- the training step -------------------------------------------------------------------------
def relu_grads(sae: Any, x: Any, *, n_total: int, sparse_threshold: float = 0.4) -> dict[str, Any]:
    """Gradients of the paper's ReLU loss (summed over x's rows, divided by n_total), hand-written.

    Sets ``sae.<param>.grad`` (decoder gradient already projected orthogonal to its columns) and
    returns the batch's statistics (sums over x's rows, for all-reduce).
    """
    import torch

    with torch.no_grad():
        return _relu_grads(sae, x, n_total=n_total, sparse_threshold=sparse_threshold)


def _relu_grads(sae: Any, x: Any, *, n_total: int, sparse_threshold: float) -> dict[str, Any]:
    import torch

    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    B, d = x.shape
    lam = sae.l1_coefficient
    xc = x - b_dec
    pre = torch.addmm(b_enc, xc, W_enc.t())  # (B, m): the one dense pass over all latents
    mask = pre > 0
    fired = mask.any(0)
    active = fired.nonzero().squeeze(1)
    a = int(active.numel())
    dense = a > sparse_threshold * sae.d_latent
    z = pre.clamp_min_(0.0)
    if not dense:
        z = z.index_select(1, active)
        mask = mask.index_select(1, active)
        Wd = W_dec.index_select(1, active)  # (d, a)
        We = W_enc.index_select(0, active)  # (a, d)
    else:
        Wd, We = W_dec, W_enc
    x_hat = torch.addmm(b_dec, z, Wd.t())
    err = x_hat.sub_(x)  # (B, d)
    sq = err.pow(2)
    sq_sum = float(sq.sum())
    l1_sum = float(z.sum())
    l0_sum = float(mask.sum())
    dxh = err.mul_(2.0 / (n_total * d))
    gz = dxh @ Wd  # (B, a)
    gz.add_(lam / n_total).mul_(mask)
    g_dec = dxh.t() @ z  # (d, a)
    g_dec.sub_(
        (g_dec * Wd).sum(0, keepdim=True) * (Wd / Wd.norm(dim=0, keepdim=True).clamp_min(1e-12))
    )
    g_enc = gz.t() @ xc  # (a, d)
    g_benc = gz.sum(0)
    g_bdec = dxh.sum(0) - g_benc @ We
    if dense:
        W_dec.grad, W_enc.grad, b_enc.grad = g_dec, g_enc, g_benc
    else:
        W_dec.grad = torch.zeros_like(W_dec).index_copy_(1, active, g_dec)
        W_enc.grad = torch.zeros_like(W_enc).index_copy_(0, active, g_enc)
        b_enc.grad = torch.zeros_like(b_enc).index_copy_(0, active, g_benc)
    b_dec.grad = g_bdec
    return {
        "sq_sum": sq_sum,
        "l1_sum": l1_sum,
        "l0_sum": l0_sum,
        "fired": fired,
        "active_fraction": a / sae.d_latent,
    }


def autograd_grads(sae: Any, x: Any, *, n_total: int, dead_mask: Any = None) -> dict[str, Any]:
    """Gradients by autograd (TopK/BatchTopK, and the reference for the ReLU fast path)."""
    for p in sae.parameters():
        p.grad = None
    out = sae.loss(x, dead_mask=dead_mask)
    (out["loss"] * (x.shape[0] / n_total)).backward()
    sae.project_decoder_grad_()
    z = out["z"].detach()
    err = (out["x_hat"] - x).detach()
    return {
        "sq_sum": float(err.pow(2).sum()),
        "l1_sum": float(z.abs().sum()),
        "l0_sum": float((z > 0).sum()),
        "auxk": float(out["auxk"].detach()) if "auxk" in out else 0.0,
        "fired": (z > 0).any(0),
        "active_fraction": float((z > 0).any(0).float().mean()),
    }


def make_optimizer(sae: Any, config: TrainConfig) -> Any:
    """Adam as in the paper (fused where this torch supports it)."""
    import torch

    kw = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=0.0)
    try:
        return torch.optim.Adam(list(sae.parameters()), fused=True, **kw)
    except (RuntimeError, TypeError):  # pragma: no cover - older torch / unsupported device
        return torch.optim.Adam(list(sae.parameters()), **kw)


PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


class _Stop:
    """Set by SIGINT/SIGTERM: the loop checkpoints after the current step and returns."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(folder: Path, sae: Any, opt: Any, tracking: dict, meta: dict) -> None:
    """Weights, Adam state, dead-latent tracking, RNG states and data position (atomic)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"sae.{n}": getattr(sae, n).detach().cpu().contiguous() for n in PARAM_NAMES}
    for n in PARAM_NAMES:
        state = opt.state.get(getattr(sae, n), {})
        for key, value in state.items():
            tensors[f"adam.{n}.{key}"] = value.detach().cpu().reshape(value.shape).contiguous()
    for key, value in tracking.items():
        tensors[f"track.{key}"] = value.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        **meta,
        "rng_numpy": _np_state_json(np.random.get_state()),  # noqa: NPY002
        "rng_python": _py_state_json(random.getstate()),
    }
    tmp_t = folder / "state.safetensors.tmp"
    tmp_j = folder / "state.json.tmp"
    save_file(tensors, str(tmp_t), metadata={"step": str(meta["step"])})
    tmp_j.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_t, folder / "state.safetensors")
    os.replace(tmp_j, folder / "state.json")


def load_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(tensors, meta) of a checkpoint; ConfigError when missing or torn."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tf, jf = folder / "state.safetensors", folder / "state.json"
    if not tf.exists() or not jf.exists():
        raise ConfigError(f"nothing to resume in {folder.parent}: no checkpoint there")
    meta = json.loads(jf.read_text())
    with safe_open(str(tf), "pt") as fh:
        step = int((fh.metadata() or {}).get("step", -1))
    if step != int(meta["step"]):
        raise ConfigError(f"the checkpoint in {folder} is torn (interrupted while saving)")
    return load_file(str(tf)), meta


def _np_state_json(state: tuple) -> list:
    return [state[0], state[1].tolist(), *state[2:]]


def _py_state_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _restore_rngs(tensors: dict, meta: dict) -> None:
    import torch

    torch.set_rng_state(tensors["rng.torch"])
    s = meta["rng_numpy"]
    np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), *s[2:]))  # noqa: NPY002
    p = meta["rng_python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# --- weights -------------------------------------------------------------------------------------
def save_sae_weights(folder: Path, sae: Any, extra: dict | None = None) -> Path:
    """Final weights in the project format: config.json + model.safetensors."""
    config = {**sae.config(), **(extra or {})}
    try:
        from ..models.weights import save_weights
    except ImportError:
        save_weights = None
    if save_weights is not None:
        return Path(save_weights(folder, sae, config))
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: getattr(sae, n).detach().cpu().contiguous() for n in PARAM_NAMES}
    save_file(tensors, str(folder / "model.safetensors.tmp"))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    return folder


# --- distributed ---------------------------------------------------------------------------------
class _Comm:
    """The collectives a run uses (``torch.distributed`` under another name), made safe to exit.

    Gloo finishes a collective on its own worker thread and drops its record of the work (which
    holds the tensors) a moment after ``wait()`` has returned. If Python has let go of such a
    tensor, that last drop needs the GIL; when it comes after the interpreter began to shut down,
    the worker thread is killed inside a destructor and the process aborts (SIGABRT, "terminate
    called without an active exception") although the run had finished and saved. So every tensor
    handed to a collective is kept here until gloo has released it, and :meth:`close` waits for
    that (GIL released while it waits) before destroying the process group.
    """

    def __init__(self, dist: Any, owned: bool) -> None:
        self.dist = dist
        self.owned = owned  # this run created the process group and closes it
        self.ReduceOp = dist.ReduceOp
        self._held: list[Any] = []

    def _hold(self, tensor: Any) -> None:
        self._prune()
        self._held.append(tensor)

    def _prune(self) -> None:
        """Forget the tensors gloo has let go of (only our reference is left)."""
        self._held = [t for t in self._held if getattr(t, "_use_count", lambda: 2)() > 1]

    def all_reduce(self, tensor: Any, op: Any = None) -> None:
        self._hold(tensor)
        if op is None:
            self.dist.all_reduce(tensor)
        else:
            self.dist.all_reduce(tensor, op=op)

    def broadcast(self, tensor: Any, src: int) -> None:
        self._hold(tensor)
        self.dist.broadcast(tensor, src=src)

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until gloo holds none of our tensors; True when it let go of all of them."""
        deadline = time.monotonic() + timeout
        while True:
            self._prune()
            if not self._held or time.monotonic() > deadline:
                return not self._held
            time.sleep(0.001)  # releases the GIL: gloo's threads may need it to let go

    def close(self, clean: bool) -> None:
        """Close a process group this run created.

        After a clean run every rank first meets at a barrier (rank 0 may still be writing the
        weights) and waits until gloo has let go of every tensor; after a failure there is no
        barrier, since a dead peer would never arrive.
        """
        if not self.owned:
            return
        try:
            if clean:
                self.dist.barrier()
                if not self.settle():
                    log.warning("the process group still held tensors after 10 s; closing anyway")
        finally:
            self.dist.destroy_process_group()
            self._held.clear()


def _dist_setup(rank: int | None, world: int | None, device: str) -> tuple[int, int, _Comm | None]:
    """(rank, world, collectives or None); initialises the process group under torchrun.

    A process group the caller made is used and left open; one made here is closed at the end.
    """
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    if world <= 1:
        return 0, 1, None
    if dist.is_initialized():
        return rank, world, _Comm(dist, owned=False)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    return rank, world, _Comm(dist, owned=True)


def _resolve_device(device: str, world: int) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if world > 1 else "cuda"
        return "cpu"
    return device


# --- the training loop ---------------------------------------------------------------------------
def train_sae(
    store: Any,
    config: TrainConfig,
    out_dir: str | Path,
    progress: Any = None,
    *,
    resume: bool = False,
    stop_after_steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
    rank: int | None = None,
    world: int | None = None,
) -> TrainResult:
    """Train an SAE on a store (path or opened FeatureStore); returns what the run did.

    ``stop_after_steps`` behaves like a SIGTERM after that step (checkpoint, return interrupted).
    """
    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    tensors, meta = ({}, {})
    if resume:
        tensors, meta = load_checkpoint(ckpt_dir)
        saved = TrainConfig.from_dict(meta["config"])
        if asdict(saved) != asdict(config):
            log.warning("resuming with the checkpoint's training config, not the one given")
        config = saved
    elif (ckpt_dir / "state.json").exists() or (out / "model.safetensors").exists():
        raise ConfigError(
            f"{out} already holds a training run: pass --resume to continue it or pick another --out"
        )
    env_world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    device = _resolve_device(config.device, env_world)
    rank, world, dist = _dist_setup(rank, world, device)
    clean = False
    try:
        result = _train_loop(store, config, out, ckpt_dir, tensors, meta, resume, progress,
                             stop_after_steps, on_step, rank, world, dist, device)  # fmt: skip
        clean = True
        return result
    finally:
        if dist is not None:
            dist.close(clean)


def _train_loop(
    store: Any, config: TrainConfig, out: Path, ckpt_dir: Path, tensors: dict, meta: dict,
    resume: bool, progress: Any, stop_after_steps: int | None,
    on_step: Callable[[int], None] | None, rank: int, world: int, dist: Any, device: str,
) -> TrainResult:  # fmt: skip
    """The body of :func:`train_sae` once the config and the process group are settled."""
    import torch

    from ..models.sae import SparseAutoencoder
    from . import store as fs

    if config.batch_size % world:
        raise ConfigError(f"batch size {config.batch_size} must divide by the {world} processes")
    opened = isinstance(store, (str, Path))
    st = fs.open(store) if opened else store
    try:
        d = st.feature_dim
        m = config.d_latent or config.expansion * d
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)  # noqa: NPY002
        random.seed(config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        sae = SparseAutoencoder(
            d, m, config.kind, config.k, config.l1_coefficient, k_aux=config.k_aux,
            auxk_coefficient=config.auxk_coefficient, init=config.init, generator=gen,
        )  # fmt: skip
        sae.to(device)
        opt = make_optimizer(sae, config)
        B = config.batch_size
        stream_kw = dict(
            split=config.split, fraction=config.fraction, seed=config.seed,
            shuffle_buffer_images=config.shuffle_buffer_images,
        )  # fmt: skip
        stream = st.token_stream(B, start_position=meta.get("position"), **stream_kw)
        steps_per_epoch = max(1, stream.epoch_tokens // B)
        total = config.steps if config.steps is not None else int(config.epochs * steps_per_epoch)
        if config.resample_every_steps is not None:
            resample_every = config.resample_every_steps
        else:
            resample_every = max(1, int(config.resample_every_epochs * steps_per_epoch))
        dead_steps = max(1, math.ceil(config.dead_tokens / B))
        since_fired = torch.zeros(m, dtype=torch.int64, device=device)
        fired_since_resample = torch.zeros(m, dtype=torch.bool, device=device)
        step = 0
        if resume:
            with torch.no_grad():
                for n in PARAM_NAMES:
                    getattr(sae, n).copy_(tensors[f"sae.{n}"].to(device))
            for n in PARAM_NAMES:
                p = getattr(sae, n)
                state = {
                    key.split(".")[-1]: t.to(device)
                    for key, t in tensors.items()
                    if key.startswith(f"adam.{n}.")
                }
                if state:
                    opt.state[p] = state
            since_fired = tensors["track.since_fired"].to(device)
            fired_since_resample = tensors["track.fired_since_resample"].to(device)
            _restore_rngs(tensors, meta)
            step = int(meta["step"])
        result = TrainResult(out, step, step * B, False)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_config.json").write_text(json.dumps(asdict(config), indent=1))
            (out / "train_config.toml").write_text(config.to_toml())
        logger = _MetricsLog(out, step, enabled=rank == 0)
        if progress is not None:
            progress.set_total(total)
            progress.update(step)
        run_tokens, t0, last = 0, time.perf_counter(), {}
        with _Stop() as stop:
            while step < total:
                batch = stream.next_global()
                if batch is None:
                    break
                per = B // world
                x = torch.from_numpy(batch[rank * per : (rank + 1) * per]).to(device)
                dead_mask = since_fired >= dead_steps
                if sae.kind == "relu":
                    stats = relu_grads(sae, x, n_total=B, sparse_threshold=config.sparse_threshold)
                else:
                    stats = autograd_grads(sae, x, n_total=B, dead_mask=dead_mask)
                fired = stats.pop("fired")
                if dist is not None:
                    grads = [getattr(sae, n).grad for n in PARAM_NAMES]
                    flat = torch.cat([g.reshape(-1) for g in grads])
                    dist.all_reduce(flat)
                    offset = 0
                    for g in grads:
                        g.copy_(flat[offset : offset + g.numel()].view_as(g))
                        offset += g.numel()
                    f8 = fired.to(torch.uint8)
                    dist.all_reduce(f8, op=dist.ReduceOp.MAX)
                    fired = f8.bool()
                    vals = torch.tensor(
                        [stats["sq_sum"], stats["l1_sum"], stats["l0_sum"], stats.get("auxk", 0.0)],
                        dtype=torch.float64, device=device,
                    )  # fmt: skip
                    dist.all_reduce(vals)
                    stats["sq_sum"], stats["l1_sum"], stats["l0_sum"] = (float(v) for v in vals[:3])
                    stats["auxk"] = float(vals[3]) / world
                opt.step()
                sae.normalise_decoder_()
                step += 1
                run_tokens += B
                since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + 1)
                fired_since_resample |= fired
                resampled = 0
                if (
                    sae.kind == "relu"
                    and config.resample
                    and step % resample_every == 0
                    and step <= total - resample_every
                ):
                    resampled = _resample(
                        sae, opt, st, config, step, ~fired_since_resample, rank, dist, device
                    )
                    fired_since_resample.zero_()
                x_var = float(x.double().var(0, unbiased=False).sum()) * per
                if dist is not None:
                    xv = torch.tensor([x_var], dtype=torch.float64, device=device)
                    dist.all_reduce(xv)
                    x_var = float(xv)  # sum of per-rank variances: FVU approximate under DDP
                last = {
                    "step": step,
                    "tokens": step * B,
                    "epoch": round(step * B / stream.epoch_tokens, 4),
                    "tokens_per_s": run_tokens / max(time.perf_counter() - t0, 1e-9),
                    "mse": stats["sq_sum"] / (B * d),
                    "l1": stats["l1_sum"] / B,
                    "auxk": stats.get("auxk", 0.0),
                    "fvu": stats["sq_sum"] / max(x_var, 1e-30),
                    "l0": stats["l0_sum"] / B,
                    "dead_fraction": float((since_fired >= dead_steps).float().mean()),
                    "active_fraction": stats["active_fraction"],
                    "resampled": resampled,
                    "elapsed_s": time.perf_counter() - t0,
                }
                last["loss"] = (
                    last["mse"] + sae.l1_coefficient * last["l1"]
                    if sae.kind == "relu"
                    else last["mse"] + sae.auxk_coefficient * last["auxk"]
                )
                if step % config.log_every == 0 or step == total or resampled:
                    logger.write(last)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(
                        tok_s=f"{last['tokens_per_s']:.0f}", mse=f"{last['mse']:.4g}",
                        fvu=f"{last['fvu']:.3f}", l0=f"{last['l0']:.1f}",
                        dead=f"{last['dead_fraction']:.2f}",
                    )  # fmt: skip
                if on_step is not None:
                    on_step(step)
                cancelled = progress is not None and getattr(progress, "cancelled", False)
                interrupt = stop.requested or cancelled
                interrupt = interrupt or (stop_after_steps is not None and step >= stop_after_steps)
                if dist is not None:
                    flag = torch.tensor([int(interrupt)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    interrupt = bool(flag.item())
                if interrupt or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    if rank == 0:
                        logger.flush()
                        save_checkpoint(
                            ckpt_dir, sae, opt,
                            {"since_fired": since_fired, "fired_since_resample": fired_since_resample},
                            {"step": step, "position": stream.position, "config": asdict(config)},
                        )  # fmt: skip
                    if interrupt:
                        result.interrupted = True
                        break
        logger.close()
        result.steps, result.tokens = step, step * B
        result.final_metrics = {k: float(v) for k, v in last.items()}
        result.tokens_per_s = run_tokens / max(time.perf_counter() - t0, 1e-9)
        if not result.interrupted and rank == 0:
            extra = {
                "training": {
                    "steps": step, "tokens": step * B, "store": Path(st.path).name,
                    "backbone": st.backbone, "backbone_signature": st.backbone_signature,
                }
            }  # fmt: skip
            result.weights = save_sae_weights(out, sae.cpu(), extra)
        return result
    finally:
        if opened:
            st.close()


def _resample(
    sae: Any, opt: Any, st: Any, config: TrainConfig, step: int, dead: Any, rank: int, dist: Any,
    device: str,
) -> int:  # fmt: skip
    """The paper's code: dead latents restart on high-loss inputs; returns how many were reset."""
    import torch

    with torch.no_grad():
        return _resample_impl(sae, opt, st, config, step, dead, rank, dist, device)


def _resample_impl(
    sae: Any, opt: Any, st: Any, config: TrainConfig, step: int, dead: Any, rank: int, dist: Any,
    device: str,
) -> int:  # fmt: skip
    import torch

    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    if rank == 0:
        B = config.batch_size
        stream = st.token_stream(
            B, split=config.split, fraction=config.fraction, seed=config.seed + 7919 * step,
            shuffle_buffer_images=config.shuffle_buffer_images,
        )  # fmt: skip
        xs, losses = [], []
        while sum(len(v) for v in xs) < config.resample_dataset_size:
            batch = stream.next_global()
            if batch is None:
                break
            x = torch.from_numpy(batch).to(device)
            x_hat, _ = sae(x)
            xs.append(x)
            losses.append((x_hat - x).pow(2).mean(1))
        x = torch.cat(xs)[: config.resample_dataset_size]
        loss = torch.cat(losses)[: config.resample_dataset_size].double()
        g = torch.Generator(device="cpu").manual_seed(config.seed * 1_000_003 + step)
        probs = loss.pow(2).cpu()
        if float(probs.sum()) <= 0:
            probs = torch.ones_like(probs)
        pick = torch.multinomial(probs, n_dead, replacement=n_dead > len(probs), generator=g)
        idx = dead.nonzero().squeeze(1)
        inputs = x[pick.to(device)]
        unit = inputs / inputs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        alive = ~dead
        enc_norm = sae.W_enc[alive].norm(dim=1).mean() if bool(alive.any()) else torch.tensor(1.0)
        sae.W_dec[:, idx] = unit.t()
        sae.W_enc[idx] = unit * (0.2 * enc_norm)
        sae.b_enc[idx] = 0.0
        for p, dim in ((sae.W_enc, 0), (sae.b_enc, 0), (sae.W_dec, 1)):
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].index_fill_(dim, idx, 0.0)
    if dist is not None:
        tensors = [sae.W_enc, sae.b_enc, sae.W_dec]
        for p in (sae.W_enc, sae.b_enc, sae.W_dec):
            st_ = opt.state.get(p, {})
            tensors += [st_[k] for k in ("exp_avg", "exp_avg_sq") if k in st_]
        for t in tensors:
            dist.broadcast(t.data, src=0)
    return n_dead


class _MetricsLog:
    """metrics.csv + metrics.jsonl; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, out: Path, start_step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.csv_path, self.json_path = out / "metrics.csv", out / "metrics.jsonl"
        rows = []
        if start_step > 0 and self.json_path.exists():
            for line in self.json_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= start_step:
                    rows.append(row)
        self._json = self.json_path.open("w")
        self._csvf = self.csv_path.open("w", newline="")
        self._csv = csv.DictWriter(self._csvf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        self._csv.writeheader()
        for row in rows:
            self.write(row)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._json.write(json.dumps(row) + "\n")
        self._csv.writerow(row)

    def flush(self) -> None:
        if self.enabled:
            self._json.flush()
            self._csvf.flush()

    def close(self) -> None:
        if self.enabled:
            self._json.close()
            self._csvf.close()


# --- command line --------------------------------------------------------------------------------
_FLAGS: dict[str, tuple[type, str]] = {
    "kind": (str, "relu (paper) | topk | batchtopk"),
    "k": (int, "latents kept per token (topk/batchtopk)"),
    "l1_coefficient": (float, "L1 weight (paper 3e-5)"),
    "expansion": (int, "latents = expansion x feature dim (paper 8)"),
    "d_latent": (int, "number of latents (overrides --expansion)"),
    "init": (str, "paper | default"),
    "lr": (float, "Adam learning rate (paper 5e-4)"),
    "batch_size": (int, "tokens per step, summed over processes (paper 4096)"),
    "epochs": (float, "passes over the kept tokens (paper 200)"),
    "steps": (int, "optimizer steps (overrides --epochs)"),
    "seed": (int, "seed (paper 49)"),
    "split": (str, "store split to train on"),
    "fraction": (float, "fraction of patch positions kept per image (paper 0.25)"),
    "shuffle_buffer_images": (int, "images shuffled together (memory bound)"),
    "resample_every_epochs": (float, "ReLU dead-latent resampling interval (paper 10)"),
    "resample_every_steps": (int, "resampling interval in steps (overrides epochs)"),
    "resample_dataset_size": (int, "inputs scored for resampling (~20k)"),
    "k_aux": (int, "AuxK latents (topk/batchtopk)"),
    "auxk_coefficient": (float, "AuxK loss weight (1/32)"),
    "dead_tokens": (int, "a latent silent this many tokens counts as dead"),
    "sparse_threshold": (float, "active fraction above which the dense step runs"),
    "checkpoint_every": (int, "checkpoint every N steps"),
    "log_every": (int, "metrics row every N steps"),
    "device": (str, "auto | cpu | cuda | cuda:1"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``napari-mammo-sae train``."""
    parser.add_argument("--store", required=True, help="feature store (.h5) written by 'extract'")
    parser.add_argument("--out", required=True, help="output folder (weights, logs, checkpoints)")
    parser.add_argument("--config", help="TOML file of training options (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    parser.add_argument("--no-resample", action="store_true", help="no dead-latent resampling")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, (typ, help_text) in _FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=typ, dest=name, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from --config TOML and flags (flags win)."""
    data = asdict(TrainConfig.from_toml(args.config)) if args.config else {}
    for name in _FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    if getattr(args, "no_resample", False):
        data["resample"] = False
    return TrainConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    """Run ``train`` from parsed arguments; returns the exit status."""
    from ..progress import TqdmProgress

    config = config_from_args(args)
    rank = int(os.environ.get("RANK", "0"))
    progress = TqdmProgress(desc="train SAE", disable=args.quiet or rank != 0)
    try:
        result = train_sae(args.store, config, args.out, progress, resume=args.resume)
    finally:
        progress.close()
    if rank != 0:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(
            f"stopped at step {result.steps}; checkpoint saved in {Path(args.out) / CHECKPOINT_DIR}:"
            f" run the same command with --resume to continue"
        )
        return 130
    fm = result.final_metrics
    print(
        f"{result.weights}: {result.steps} steps, {result.tokens} tokens "
        f"({result.tokens_per_s:.0f} tokens/s); MSE {fm.get('mse', float('nan')):.4g}, "
        f"FVU {fm.get('fvu', float('nan')):.3f}, L0 {fm.get('l0', float('nan')):.1f}, "
        f"dead {fm.get('dead_fraction', float('nan')):.2f}"
    )
    return 0
