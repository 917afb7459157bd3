"""Intervention sweep over the paper's k values: closed form vs explicit decode -> pool -> classify.

Usage::

    .venv/bin/python benchmarks/bench_interventions.py [--n 1000] [--m 16384] [--d 2048]
        [--repeats 3] [--positions 1392] [--append BENCHMARKS.md]

A random SAE (d inputs, m latents, unit-norm decoder, random decoder bias) and a random Linear(d, 1)
head; N rows of pooled latents (non-negative, ~5% non-zero, float32, as a feature store holds them);
per-class scores from random labels (class means). For every k of the paper (0 ... 10000, all) and
both modes (top-k activated = keep, top-k deactivated = remove) the neuron set is the union of each
class's top-k (shared by both paths, not timed), then:

* closed form: ``analysis.interventions.intervened_logits`` - (W_dec^T w) . (mask * mean_p z) + w.b + c;
* explicit: mask the latents, decode them with the SAE (W_dec z + b_dec, torch float32), apply the
  head - decoding the pooled latents, which equals decoding every position and then pooling since
  both maps are linear; a second check does it per position for a few images (``--positions``
  positions each, the B5 grid's 48 x 29 = 1,392) to show that the two agree on the literal path too.

Times are medians over ``--repeats`` runs (default 3: keep the whole run under ~2 minutes on 2 cores).
The slider latency is :class:`InterventionEngine`'s top-k update for one image (median over the k
values). Prints a table and one markdown row for BENCHMARKS.md with the command line.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")

K_VALUES = (0, 1, 2, 5, 10, 20, 50, 100, 250, 500, 1000, 5000, 10000, "all")


def _median(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="images (rows of pooled latents)")
    ap.add_argument("--m", type=int, default=16384, help="SAE latents")
    ap.add_argument("--d", type=int, default=2048, help="feature dimension")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--positions", type=int, default=1392, help="positions per image, literal check"
    )
    ap.add_argument("--literal-images", type=int, default=2)
    ap.add_argument("--append", default=None, help="append the markdown row to this file")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from napari_mammo_sae.analysis.interventions import (
        InterventionEngine,
        explicit_intervened_logits,
        intervened_logits,
        neuron_mask,
        topk_union,
    )
    from napari_mammo_sae.models.sae import SparseAutoencoder

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(args.d, args.m, generator=g).eval()
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1, generator=g)
    head = torch.nn.Linear(args.d, 1)
    with torch.no_grad():
        head.weight.mul_(3.0)  # logits of order 1-10, like a trained head
    rng = np.random.default_rng(0)
    active = rng.random((args.n, args.m)) < 0.05
    pooled = (np.abs(rng.normal(size=(args.n, args.m))) * active).astype(np.float32)
    labels = rng.random(args.n) < 0.3
    scores = np.stack([pooled[~labels].mean(0), pooled[labels].mean(0)])

    w_t = head.weight.detach().reshape(-1)
    c = float(head.bias.detach())
    z_t = torch.from_numpy(pooled)

    def explicit(neurons, mode):
        mask = torch.from_numpy(neuron_mask(args.m, neurons, mode).astype(np.float32))
        with torch.inference_mode():
            return (sae.decode(z_t * mask) @ w_t + c).double().numpy()

    rows = []
    t_closed_all = t_explicit_all = 0.0
    max_diff = 0.0
    print(f"N={args.n} m={args.m} d={args.d}; medians over {args.repeats} runs")
    print(
        f"{'k':>6} {'|set|':>6} {'mode':>7} {'closed ms':>10} {'explicit ms':>12} {'ratio':>8} {'max|diff|':>10}"
    )
    for k in K_VALUES:
        kk = args.m if k == "all" else min(int(k), args.m)
        neurons = topk_union(scores[0], scores[1], kk)
        for mode in ("keep", "remove"):
            tc, closed = _median(
                lambda n=neurons, md=mode: intervened_logits(pooled, sae, head, n, md), args.repeats
            )
            te, ref = _median(lambda n=neurons, md=mode: explicit(n, md), args.repeats)
            diff = float(np.abs(np.asarray(closed) - np.asarray(ref)).max())
            max_diff = max(max_diff, diff)
            t_closed_all += tc
            t_explicit_all += te
            rows.append((k, neurons.size, mode, tc, te, diff))
            print(
                f"{k!s:>6} {neurons.size:>6} {mode:>7} {tc * 1e3:>10.2f} {te * 1e3:>12.1f} "
                f"{te / tc:>8.0f} {diff:>10.2e}"
            )
    ratio = t_explicit_all / t_closed_all

    # literal per-position check on a few images: decode every position, pool, classify
    n_lit = max(1, args.literal_images)
    z_pos = np.abs(rng.normal(size=(n_lit, args.positions, args.m))).astype(np.float32)
    z_pos *= rng.random(z_pos.shape) < 0.01
    neurons = topk_union(scores[0], scores[1], 100)
    t0 = time.perf_counter()
    lit = explicit_intervened_logits(z_pos, sae, head, neurons, "remove")
    t_lit = (time.perf_counter() - t0) / n_lit
    pooled_lit = z_pos.mean(1)
    closed_lit = intervened_logits(pooled_lit, sae, head, neurons, "remove")
    lit_diff = float(np.abs(closed_lit - lit).max())
    t_pooled, _ = _median(
        lambda: intervened_logits(pooled_lit[0], sae, head, neurons, "remove"), args.repeats
    )
    print(
        f"per-position explicit ({args.positions} positions): {t_lit:.3f} s/image; closed form on "
        f"the pooled latents {t_pooled * 1e6:.0f} us/image; max|diff| {lit_diff:.2e}"
    )

    # slider: one image, InterventionEngine
    eng = InterventionEngine(pooled[0], sae, head)
    eng.topk_activated(scores, 10)  # sorts the ranking once
    lat = []
    for k in K_VALUES:
        kk = args.m if k == "all" else int(k)
        for fn in (eng.topk_activated, eng.topk_deactivated):
            t0 = time.perf_counter()
            res = fn(scores, kk)
            lat.append(time.perf_counter() - t0)
            ref = intervened_logits(pooled[0], sae, head, res.neurons, res.mode)
            max_diff = max(max_diff, abs(res.logit - float(ref)))
    slider = statistics.median(lat)
    print(
        f"slider update (InterventionEngine, one image): median {slider * 1e6:.0f} us, max {max(lat) * 1e3:.2f} ms"
    )

    cmd = "python benchmarks/bench_interventions.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    row = (
        f"| intervention sweep, {len(K_VALUES)} k values x keep/remove, N={args.n}, m={args.m}, "
        f"d={args.d}, {platform.machine()} {os.cpu_count()} cores | closed form "
        f"{t_closed_all * 1e3:.0f} ms vs explicit {t_explicit_all:.1f} s: **{ratio:.0f}x**, max abs diff "
        f"{max(max_diff, lit_diff):.1e} (per-position literal path {lit_diff:.1e}); slider update median "
        f"{slider * 1e6:.0f} us | >= 100x, <= 1e-5, <= 50 ms | `{cmd.strip()}` |"
    )
    print(row)
    if args.append:
        with open(args.append, "a") as fh:
            fh.write(row + "\n")
    ok = ratio >= 100 and max(max_diff, lit_diff) <= 1e-5 and slider <= 0.05
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
