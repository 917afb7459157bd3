"""SAE training speed at the paper's size vs the matmul peak and the paper's library.

Measures in ONE run on this machine:
1. fp32 matmul throughput (4096x2048 @ 2048x16384);
2. our training step (``train_sae.relu_grads`` + fused Adam + decoder renorm) at d 2048, 16,384
   latents, batch 4096, fp32: tokens/s and the fraction of the matmul peak it would need to do
   the dense work (12*d*m FLOPs per token);
3. the same steps with the paper's library ``sparse-autoencoder`` 1.10.0 (its SparseAutoencoder,
   LossReducer(L1, L2) and AdamWithReset, forward/backward/step/post_backwards_hook exactly as its
   Pipeline.train_autoencoder) on the same start state and batches, run by ``--library-python``
   (a throwaway venv: see below); without it, a faithful in-process re-implementation;
4. the loss of both on the steps' batches and on a held-out batch after the same number of tokens.

Two start states: ``start`` = the paper's initialisation (half the latents fire on every token:
our dense path) and ``trained`` = a trained-like SAE whose ~5% live latents (the released Mammo-SAE:
~200-850 of 16,384 ever fire on VinDr) fire sparsely on sparse-structured synthetic features
(non-negative codes over 2,048 atoms + noise): our gathered sparse path.

Library venv (keeps .venv untouched)::

    .venv/bin/python -m venv /tmp/saevenv
    echo $PWD/.venv/lib/python3.11/site-packages > /tmp/saevenv/lib/python3.11/site-packages/main.pth
    /tmp/saevenv/bin/pip install einops jaxtyping strenum
    /tmp/saevenv/bin/pip install --no-deps sparse-autoencoder==1.10.0

Usage: ``.venv/bin/python benchmarks/bench_sae_train.py [--steps 3] [--library-python PY]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()


# --- data and start states ------------------------------------------------------------------------
def make_batches(n: int, batch: int, d: int, seed: int = 0) -> np.ndarray:
    """Sparse-structured non-negative features: ~12 of 2,048 atoms per token + noise, (n, B, d)."""
    rng = np.random.default_rng(seed)
    atoms = np.abs(rng.normal(size=(2048, d))).astype(np.float32) / np.sqrt(d)
    out = np.empty((n, batch, d), dtype=np.float32)
    for i in range(n):
        for lo in range(0, batch, 512):
            hi = min(batch, lo + 512)
            codes = np.zeros((hi - lo, 2048), dtype=np.float32)
            idx = rng.integers(0, 2048, size=(hi - lo, 12))
            np.put_along_axis(codes, idx, rng.exponential(size=idx.shape).astype(np.float32), 1)
            out[i, lo:hi] = codes @ atoms + 0.02 * rng.normal(size=(hi - lo, d))
    return out


def start_state(kind: str, d: int, m: int, batches: np.ndarray) -> dict[str, torch.Tensor]:
    """W_enc, b_enc, W_dec, b_dec of the 'start' (paper init) or 'trained' state."""
    from napari_mammo_sae.models.sae import SparseAutoencoder

    g = torch.Generator().manual_seed(49)
    sae = SparseAutoencoder(d, m, init="paper", generator=g)
    if kind == "trained":
        with torch.no_grad():
            live = m // 20
            x = torch.from_numpy(batches[0][: 4 * live])
            dirs = x[::4] - x.mean(0)
            dirs = dirs / dirs.norm(dim=1, keepdim=True)
            sae.b_dec.copy_(x.mean(0))
            sae.W_dec[:, :live] = dirs.t()
            sae.W_enc[:live] = dirs
            pre = (x - sae.b_dec) @ dirs.t()
            # thresholds so a live latent fires on ~1% of tokens; dead latents never fire
            sae.b_enc[:live] = -torch.quantile(pre, 0.99, dim=0)
            sae.b_enc[live:] = -10.0
    return {n: getattr(sae, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}


# --- our step -------------------------------------------------------------------------------------
def run_ours(state: dict, batches: np.ndarray, held: np.ndarray, warmup: int, lr: float) -> dict:
    """Time our training step; losses per step and on the held-out batch."""
    from napari_mammo_sae.models.sae import SparseAutoencoder
    from napari_mammo_sae.pipeline.train_sae import TrainConfig, make_optimizer, relu_grads

    d, m = state["W_dec"].shape
    sae = SparseAutoencoder(d, m)
    with torch.no_grad():
        for n, t in state.items():
            getattr(sae, n).copy_(t)
    opt = make_optimizer(sae, TrainConfig(lr=lr))
    times, losses, active = [], [], []
    for i, batch in enumerate(batches):
        x = torch.from_numpy(batch)
        t0 = time.perf_counter()
        stats = relu_grads(sae, x, n_total=x.shape[0])
        opt.step()
        sae.normalise_decoder_()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        losses.append(
            stats["sq_sum"] / (x.shape[0] * d) + sae.l1_coefficient * stats["l1_sum"] / x.shape[0]
        )
        active.append(stats["active_fraction"])
    with torch.no_grad():
        held_loss = float(sae.loss(torch.from_numpy(held))["loss"])
    return {"times": times, "losses": losses, "held_loss": held_loss, "active": active}


# --- the paper's library --------------------------------------------------------------------------
def _import_library():
    """Import sparse_autoencoder's model/loss/optimizer without its wandb/datasets front door."""
    import importlib.util
    import types
    import typing

    import torch.optim.optimizer as _opt
    import torch.serialization

    torch.serialization.FILE_LIKE = typing.Any  # names newer torch dropped; used only in hints
    _opt.params_t = typing.Any
    spec = importlib.util.find_spec("sparse_autoencoder")
    if spec is None:
        raise ImportError("sparse_autoencoder is not installed in this interpreter")
    pkg = types.ModuleType("sparse_autoencoder")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["sparse_autoencoder"] = pkg

    class _Any(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    for name in ("wandb", "huggingface_hub"):
        sys.modules.setdefault(name, _Any(name))
    sys.modules["wandb"].data_types = _Any("data_types")
    from sparse_autoencoder.autoencoder.model import SparseAutoencoder, SparseAutoencoderConfig
    from sparse_autoencoder.loss.abstract_loss import LossReductionType
    from sparse_autoencoder.loss.decoded_activations_l2 import L2ReconstructionLoss
    from sparse_autoencoder.loss.learned_activations_l1 import LearnedActivationsL1Loss
    from sparse_autoencoder.loss.reducer import LossReducer
    from sparse_autoencoder.optimizer.adam_with_reset import AdamWithReset

    return (SparseAutoencoder, SparseAutoencoderConfig, LossReductionType, L2ReconstructionLoss,
            LearnedActivationsL1Loss, LossReducer, AdamWithReset)  # fmt: skip


def library_worker(state_path: str, batches_path: str, out_path: str, warmup: int, lr: float,
                   l1: float, threads: int) -> None:  # fmt: skip
    """Run the library's training step (its Pipeline.train_autoencoder body) and write timings."""
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    (SAE, Config, Reduction, L2, L1, Reducer, AdamWithReset) = _import_library()
    state = load_file(state_path)
    data = np.load(batches_path)
    batches, held = data[:-1], data[-1]
    d, m = state["W_dec"].shape
    model = SAE(Config(n_input_features=d, n_learned_features=m, n_components=1))
    with torch.no_grad():
        model.tied_bias.copy_(state["b_dec"][None])
        model.encoder.weight.copy_(state["W_enc"][None])
        model.encoder.bias.copy_(state["b_enc"][None])
        model.decoder.weight.copy_(state["W_dec"][None])
    loss_fn = Reducer(L1(l1_coefficient=l1), L2())
    opt = AdamWithReset(
        params=model.parameters(), named_parameters=model.named_parameters(), lr=lr,
        betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, has_components_dim=True,
    )  # fmt: skip
    fired_count = torch.zeros((1, m), dtype=torch.int64)
    times, losses = [], []
    for i, batch in enumerate(batches):
        x = torch.from_numpy(batch)[:, None, :]
        t0 = time.perf_counter()
        opt.zero_grad()
        learned, decoded = model.forward(x)
        total, _ = loss_fn.scalar_loss_with_log(
            x, learned, decoded, component_reduction=Reduction.MEAN
        )
        with torch.no_grad():
            fired_count.add_((learned > 0).sum(dim=0))
        total.backward()
        opt.step()
        model.post_backwards_hook()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        losses.append(float(total))
    with torch.no_grad():
        x = torch.from_numpy(held)[:, None, :]
        learned, decoded = model.forward(x)
        held_loss, _ = loss_fn.scalar_loss_with_log(
            x, learned, decoded, component_reduction=Reduction.MEAN
        )
    Path(out_path).write_text(
        json.dumps(
            {
                "times": times,
                "losses": losses,
                "held_loss": float(held_loss),
                "impl": "sparse-autoencoder 1.10.0 (PyPI)",
            }
        )  # fmt: skip
    )


def reimplementation(state: dict, batches: np.ndarray, held: np.ndarray, warmup: int, lr: float,
                     l1: float) -> dict:  # fmt: skip
    """Fallback: the library's step re-implemented (3-D einsum tensors, grad hook, plain Adam)."""
    W_enc = torch.nn.Parameter(state["W_enc"][None].clone())
    b_enc = torch.nn.Parameter(state["b_enc"][None].clone())
    W_dec = torch.nn.Parameter(state["W_dec"][None].clone())
    bias = torch.nn.Parameter(state["b_dec"][None].clone())

    def hook(grad):
        dot = torch.einsum("cif,cif->cf", grad, W_dec)
        unit = W_dec / W_dec.norm(dim=-2, keepdim=True)
        return grad - torch.einsum("cf,cif->cif", dot, unit)

    W_dec.register_hook(hook)
    opt = torch.optim.Adam([bias, W_enc, b_enc, W_dec], lr=lr, betas=(0.9, 0.999), eps=1e-8)

    def loss_of(x):
        z = torch.relu(torch.einsum("bci,cfi->bcf", x - bias, W_enc) + b_enc)
        x_hat = torch.einsum("bcf,cif->bci", z, W_dec) + bias
        return ((x_hat - x).pow(2).mean(-1) + l1 * z.abs().sum(-1)).mean()

    times, losses = [], []
    for i, batch in enumerate(batches):
        x = torch.from_numpy(batch)[:, None, :]
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_of(x)
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=-2, keepdim=True))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    with torch.no_grad():
        held_loss = float(loss_of(torch.from_numpy(held)[:, None, :]))
    return {"times": times, "losses": losses, "held_loss": held_loss,
            "impl": "re-implementation of sparse-autoencoder's step"}  # fmt: skip


def run_library(state, batches, held, warmup, lr, l1, threads, python) -> dict:
    """The library's step in a subprocess of ``python`` (or the re-implementation without it)."""
    if not python or not Path(python).exists():
        return reimplementation(state, batches, held, warmup, lr, l1)
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        sp, bp, op = (str(Path(tmp) / n) for n in ("state.safetensors", "b.npy", "out.json"))
        save_file({k: v.contiguous() for k, v in state.items()}, sp)
        np.save(bp, np.concatenate([batches, held[None]]))
        cmd = [python, str(HERE), "--_worker", sp, bp, op, str(warmup), str(lr), str(l1),
               str(threads)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print("library run failed: using the re-implementation", file=sys.stderr)
            return reimplementation(state, batches, held, warmup, lr, l1)
        return json.loads(Path(op).read_text())


def matmul_gflops(reps: int = 3) -> float:
    """fp32 GFLOP/s of 4096x2048 @ 2048x16384 (best of reps)."""
    a, b = torch.randn(4096, 2048), torch.randn(2048, 16384)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096 * 2048 * 16384 / best / 1e9


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--l1", type=float, default=3e-5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--states", default="start,trained")
    p.add_argument("--library-python", default="/tmp/saevenv/bin/python")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    d, m, B = args.d, args.m, args.batch
    n = args.warmup + args.steps
    data = make_batches(n + 1, B, d)
    batches, held = data[:n], data[n]
    peak = matmul_gflops() if (d, m, B) == (2048, 16384, 4096) else float("nan")
    flops_tok = 12 * d * m
    rows = []
    for kind in args.states.split(","):
        state = start_state(kind, d, m, batches)
        ours = run_ours(state, batches, held, args.warmup, args.lr)
        lib = run_library(state, batches, held, args.warmup, args.lr, args.l1, args.threads,
                          args.library_python)  # fmt: skip
        t_ours, t_lib = float(np.mean(ours["times"])), float(np.mean(lib["times"]))
        tok_ours, tok_lib = B / t_ours, B / t_lib
        rows.append((kind, ours, lib, tok_ours, tok_lib))
        max_dloss = max(
            abs(a - b) / abs(b) for a, b in zip(ours["losses"], lib["losses"], strict=True)
        )
        print(f"[{kind}] active latents per batch {np.mean(ours['active']):.3f}; "
              f"per-step loss rel. diff ours vs library <= {max_dloss:.1e}", flush=True)  # fmt: skip
    print()
    print(f"Machine fp32 matmul (4096x2048 @ 2048x16384): {peak:.1f} GFLOP/s; "
          f"threads {args.threads}; torch {torch.__version__}")  # fmt: skip
    print(f"SAE d={d}, latents={m}, batch={B}, fp32, Adam lr {args.lr}, L1 {args.l1}; "
          f"{args.steps} timed steps after {args.warmup} warm-up; library: {rows[0][2]['impl']}")  # fmt: skip
    print()
    print("| start state | active latents | ours tokens/s | library tokens/s | ours / library | "
          "ours x 12dm FLOP / peak | library x 12dm / peak | held-out loss ours | held-out loss library |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, ours, lib, tok_ours, tok_lib in rows:
        print(f"| {kind} | {np.mean(ours['active']):.3f} | {tok_ours:.0f} | {tok_lib:.0f} | "
              f"{tok_ours / tok_lib:.2f}x | {tok_ours * flops_tok / 1e9 / peak:.2f} | "
              f"{tok_lib * flops_tok / 1e9 / peak:.2f} | {ours['held_loss']:.6g} | "
              f"{lib['held_loss']:.6g} |")  # fmt: skip
    print()
    print(
        "command: .venv/bin/python benchmarks/bench_sae_train.py " + " ".join(argv or sys.argv[1:])
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        a = sys.argv[2:]
        library_worker(a[0], a[1], a[2], int(a[3]), float(a[4]), float(a[5]), int(a[6]))
        sys.exit(0)
    sys.exit(main())
