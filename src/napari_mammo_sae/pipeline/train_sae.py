"""``napari-mammo-sae train``: train a sparse autoencoder on a feature store (the paper's recipe).

Defaults are the paper's: ReLU + L1 3e-5 (loss averaged over dims), expansion 8, Adam lr 5e-4
(0.9, 0.999, 1e-8), constant lr, batch 4096 tokens, seed 49, 25% of patch positions per image,
dead-latent resampling every 10 epochs (not in the last 10). ``--kind topk|batchtopk --k K`` trains
the Gao et al. variants with the AuxK loss instead.

Output folder::

    config.json + model.safetensors   final SAE (project weights format)
    train_config.json / .toml         the TrainConfig of the run
    metrics.csv, metrics.jsonl        step, tokens, tokens/s, loss, MSE, FVU, L0, dead fraction, ...
    checkpoint/LATEST + step-N/{state.safetensors, state.json}   weights, Adam state, data
                                         position, RNG states (crash-safe: sae_train/checkpoint.py)

SIGINT/SIGTERM (and checkpoint_every) write the checkpoint; ``--resume`` continues exactly (bit for
bit on CPU). Under ``torchrun`` every rank takes its 1/world slice of each global batch, gradients
are summed across ranks, BatchTopK selects over the global batch, and rank 0 writes logs,
checkpoints and weights. A BatchTopK SAE saves its inference threshold with the weights.

The ReLU step has a hand-written backward that equals autograd (tests check it): only the encoder
pre-activation is dense; the rest runs on the active (token, latent) pairs, on the latents active
somewhere in the batch, or densely, by the measured density (sae_train/step.py).

This module is the command line; the training code lives in :mod:`.sae_train` (re-exported here).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

from .sae_train import (
    CHECKPOINT_DIR,
    METRIC_FIELDS,
    PARAM_NAMES,
    Comm,
    TrainConfig,
    TrainResult,
    autograd_grads,
    choose_path,
    load_checkpoint,
    make_optimizer,
    relu_grads,
    save_checkpoint,
    save_sae_weights,
    train_sae,
)

__all__ = [
    "CHECKPOINT_DIR", "METRIC_FIELDS", "PARAM_NAMES", "Comm", "TrainConfig", "TrainResult",
    "add_arguments", "autograd_grads", "choose_path", "config_from_args", "load_checkpoint",
    "make_optimizer", "relu_grads", "run", "save_checkpoint", "save_sae_weights", "train_sae",
]  # fmt: skip


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
    "pair_threshold": (float, "active (token, latent) fraction up to which the sparse step runs"),
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
