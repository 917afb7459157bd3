"""The SAE training loop: data stream, steps, dead-latent tracking and resampling, logs, checkpoints.

SIGINT/SIGTERM (and ``checkpoint_every``) write the checkpoint; ``resume=True`` continues exactly
(bit for bit on CPU). Under ``torchrun`` every rank takes its 1/world slice of each global batch (so
W ranks x B/W tokens = 1 rank x B tokens), gradients are summed across ranks (nccl on CUDA, gloo on
CPU), and rank 0 writes logs, checkpoints and weights. BatchTopK selects over the global batch and
AuxK uses the global residual variance, so W processes train the same SAE as one (up to float
summation order; tests check 2 gloo processes against one).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError
from ..signals import SignalStop
from .checkpoint import (
    CHECKPOINT_DIR,
    has_checkpoint,
    load_checkpoint,
    restore_rngs,
    save_checkpoint,
    save_sae_weights,
)
from .comm import dist_setup, resolve_device
from .config import METRIC_FIELDS, TrainConfig, TrainResult
from .step import PARAM_NAMES, autograd_grads, make_optimizer, relu_grads

log = logging.getLogger(__name__)


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
    elif has_checkpoint(ckpt_dir) or (out / "model.safetensors").exists():
        raise ConfigError(
            f"{out} already holds a training run: pass --resume to continue it or pick another --out"
        )
    env_world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    device = resolve_device(config.device, env_world)
    rank, world, dist = dist_setup(rank, world, device)
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

    from ...models.sae import SparseAutoencoder
    from .. import store as fs

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
                for name, buf in sae.named_buffers():
                    if f"buffer.{name}" in tensors:
                        buf.copy_(tensors[f"buffer.{name}"].to(device))
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
            restore_rngs(tensors, meta)
            step = int(meta["step"])
        result = TrainResult(out, step, step * B, False)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_config.json").write_text(json.dumps(asdict(config), indent=1))
            (out / "train_config.toml").write_text(config.to_toml())
        logger = _MetricsLog(out, step, enabled=rank == 0)
        if rank == 0 and sae.kind == "batchtopk":
            log.info(
                "BatchTopK: the k x B = %d largest activations of each %d-token batch are kept%s; "
                "the inference threshold is their running minimum (EMA), saved with the weights",
                sae.k * B, B,
                f", selected over all {world} processes' tokens (all-gather)" if world > 1 else "",
            )  # fmt: skip

        if progress is not None:
            progress.set_total(total)
            progress.update(step)
        run_tokens, t0, last = 0, time.perf_counter(), {}
        with SignalStop() as stop:
            while step < total:
                batch = stream.next_global()
                if batch is None:
                    break
                per = B // world
                x = torch.from_numpy(batch[rank * per : (rank + 1) * per]).to(device)
                dead_mask = since_fired >= dead_steps
                if sae.kind == "relu":
                    stats = relu_grads(
                        sae, x, n_total=B, sparse_threshold=config.sparse_threshold,
                        pair_threshold=config.pair_threshold,
                    )  # fmt: skip
                else:
                    stats = autograd_grads(sae, x, n_total=B, dead_mask=dead_mask, comm=dist)
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
                    stats["auxk"] = float(vals[3])  # each rank's share: the sum is the global
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
                    "step_path": stats.get("path", "autograd"),
                    "threshold": sae.inference_threshold,
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
        result.final_metrics = {k: float(v) for k, v in last.items() if isinstance(v, (int, float))}
        result.tokens_per_s = run_tokens / max(time.perf_counter() - t0, 1e-9)
        if not result.interrupted and rank == 0:
            extra = {
                "training": {
                    "steps": step, "tokens": step * B, "store": Path(st.path).name,
                    "backbone": st.backbone, "backbone_signature": st.backbone_signature,
                    "hook": st.hook,  # the backbone layer it was trained on (models.backbone)
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
