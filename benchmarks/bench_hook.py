"""One intervention slider step at an intermediate layer (the rest of the backbone re-run) against
the last layer's closed form, at the demo model's size.

Usage::

    .venv/bin/python benchmarks/bench_hook.py [--backbone tinynet_d] [--size 768x480]
        [--hook stage3] [--latents 512] [--head-latents 2560] [--repeats 20]

The demo architecture (``tinynet_d`` at 768 x 480, as ``make weights`` builds it) with random
weights - the time does not depend on the values. One image:

* intermediate layer (``--hook``): the SAE latents at every cell of the hook's grid, a set of
  neurons switched off, decoded (W_dec z + b_dec), then the rest of the backbone
  (``models.backbone.rest_of_backbone``), average pooling and the concept head - what a slider step
  must do there, since no closed form exists;
* last layer: ``analysis.interventions.intervened_logits`` on the pooled latents (the closed form the
  interventions dock uses), with a ``--head-latents`` SAE on the head features;
* for scale: one full backbone forward.

The three are timed interleaved (one of each per round, ``--repeats`` rounds after a warm-up), so
a machine that other jobs load slows them alike; medians, and the median per-round ratio of the
intermediate step to the full forward. PyTorch eager on the CPU (OMP_NUM_THREADS=2 unless set;
``--threads 1`` on a machine other jobs load: two OpenMP threads then spin-wait for each other and
times swing by 10x).
Prints a table and one markdown line for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _interleaved_ms(fns, repeats: int) -> list[list[float]]:
    """Per function, its times in ms over ``repeats`` rounds of one call each (after a warm-up)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(1000.0 * (time.perf_counter() - t0))
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tinynet_d")
    ap.add_argument("--size", default="768x480")
    ap.add_argument("--hook", default="stage3")
    ap.add_argument("--latents", type=int, default=512, help="SAE latents at the hook point")
    ap.add_argument("--head-latents", type=int, default=2560, help="SAE latents at the head")
    ap.add_argument("--off", type=int, default=10, help="neurons switched off per step")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--threads", type=int, default=0,
        help="torch threads (0: torch's default); 1 avoids OpenMP spin-waits on a loaded machine",
    )  # fmt: skip
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from napari_mammo_sae.analysis.interventions import intervened_logits
    from napari_mammo_sae.models.backbone import (
        create_backbone,
        features_at,
        resolve_hook,
        rest_of_backbone,
    )
    from napari_mammo_sae.models.classifier import ConceptClassifier
    from napari_mammo_sae.models.sae import SparseAutoencoder

    torch.manual_seed(0)
    h, w = (int(v) for v in args.size.lower().split("x"))
    model = ConceptClassifier(create_backbone(args.backbone)).eval()
    point = resolve_hook(model, args.hook)
    x = torch.randn(1, 3, h, w)
    with torch.inference_mode():
        acts = features_at(model, x, point)
        head_feats = model.forward_features(x)
    c, gh, gw = acts.shape[1:]
    sae = SparseAutoencoder(c, args.latents, "relu").eval()
    off = torch.arange(args.off)
    with torch.inference_mode():
        z = sae.encode(acts[0].reshape(c, -1).T)

    # the code a slider step runs in the interventions dock at a hook point: RerunEngine.logit ->
    # the neuron mask on the image's latents, then Analyzer._logit_of_latents (decode, the rest of
    # the backbone, pooling, head); checked once against the plain computation
    from napari_mammo_sae.analysis.interventions import neuron_mask
    from napari_mammo_sae.models.inference import Analyzer

    analyzer = Analyzer(model, sae, size=(h, w), device="cpu", runtime="torch", hook=point.name)
    z_np = z.float().numpy()
    m = z_np.shape[1]

    def intermediate_step() -> float:
        mask = neuron_mask(m, off.numpy(), "remove").astype(np.float32)
        return analyzer._logit_of_latents((gh, gw), z_np * mask[None, :])

    with torch.inference_mode():
        zz = z.clone()
        zz[:, off] = 0
        plain = model.forward_head(rest_of_backbone(model, sae.decode(zz).T.reshape(1, c, gh, gw),
                                                    point))  # fmt: skip
    assert abs(intermediate_step() - float(plain.reshape(-1)[0])) < 1e-3

    head_sae = SparseAutoencoder(head_feats.shape[1], args.head_latents, "relu").eval()
    with torch.inference_mode():
        zh = head_sae.encode(head_feats[0].reshape(head_feats.shape[1], -1).T)
    pooled = zh.mean(dim=0).numpy()[None].astype(np.float32)
    neurons = np.arange(args.off)

    def closed_form_step() -> float:
        return float(intervened_logits(pooled, head_sae, model, neurons, "remove")[0])

    def full_forward() -> None:
        with torch.inference_mode():
            model(x)

    mid, closed, full = _interleaved_ms(
        [intermediate_step, closed_form_step, full_forward], args.repeats
    )
    t_mid, t_closed, t_full = (statistics.median(t) for t in (mid, closed, full))
    share = statistics.median(a / b for a, b in zip(mid, full, strict=True))
    print(f"{args.backbone} at {h}x{w}, hook {point.name} ({c} channels, {gh}x{gw} grid), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")  # fmt: skip
    print(f"  intermediate-layer step (decode + rest of backbone + head): {t_mid:8.2f} ms")
    print(
        f"  last-layer closed form (pooled latents, m={args.head_latents}):     {t_closed:8.3f} ms"
    )
    print(f"  full backbone forward, for scale:                           {t_full:8.2f} ms")
    print(f"  intermediate step / full forward (median per round):        {share:8.3f}")
    cmd = ".venv/bin/python benchmarks/bench_hook.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(
        f"| {args.backbone} {h}x{w}, {point.name} ({gh}x{gw}x{c}, {args.latents} latents) | "
        f"{t_mid:.1f} ms | {t_closed:.3f} ms | {t_full:.0f} ms | {share:.3f} | "
        f"`{cmd.strip()}` |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
