"""Mammo-CLIP B5 backbone on this CPU: forward_features at 1520x912 and the conformance check.

Usage::

    .venv/bin/python benchmarks/bench_backbone.py [--runs 3] [--threads N] [--arch b5|b2]
        [--append BENCHMARKS.md]

Figures (batch 1, fp32, eval mode, ``torch.inference_mode``; median of ``--runs`` after one warm-up):

* ours: ``tf_efficientnet_b5`` with Mammo-CLIP weights converted from the efficientnet-pytorch layout
  (lukemelas static padding), ``forward_features`` -> 2048 x 48 x 29;
* reference: efficientnet-pytorch's ``extract_features`` on the same weights;
* conformance: build the reference with random weights and BN statistics, save it in Mammo-CLIP's
  downstream ``.pth`` layout, load it with ``load_mammoclip_classifier``, compare the feature maps
  (max relative error, target <= 1e-4) - wall time of the whole check.

Prints one markdown row for BENCHMARKS.md and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]


def _median(fn, runs: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]))
    parser.add_argument("--arch", default="b5", choices=("b5", "b2"))
    parser.add_argument("--append", type=Path, help="append the markdown row to this file")
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from napari_mammo_sae.models.checkpoints import load_mammoclip_classifier
    from test_checkpoints import image, reference, save_downstream

    torch.set_num_threads(args.threads)
    name = f"efficientnet-{args.arch}"
    x = image(1, 1520, 912, seed=5)

    t0 = time.perf_counter()
    ref = reference(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upmc_breast_clip_det_{args.arch}_period_n_ft_bench.pth"
        save_downstream(path, ref)
        model = load_mammoclip_classifier(path, trust_pickle=True)
    with torch.inference_mode():
        expect = ref.extract_features(x)
        got = model.forward_features(x)
    err = float((got - expect).abs().max() / expect.abs().max())
    conformance_s = time.perf_counter() - t0

    with torch.inference_mode():
        ours_s, feats = _median(lambda: model.forward_features(x), args.runs)
        ref_s, _ = _median(lambda: ref.extract_features(x), args.runs)
    shape = "x".join(str(s) for s in feats.shape[1:])
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads"
    print(f"\n{args.arch.upper()} at 1520x912, batch 1, fp32, median of {args.runs}; {cpu}\n")
    print("| stage | seconds |")
    print("|---|---:|")
    print(f"| ours forward_features ({shape}) | {ours_s:.2f} |")
    print(f"| efficientnet-pytorch extract_features | {ref_s:.2f} |")
    print(f"| conformance check (build, save, load, 2 forwards) | {conformance_s:.1f} |")
    print(f"| max relative error | {err:.1e} |")

    command = (
        f".venv/bin/python benchmarks/bench_backbone.py --runs {args.runs} "
        f"--threads {args.threads} --arch {args.arch}"
    )
    verdict = "meets" if err <= 1e-4 else "MISSES"
    row = (
        f"| Mammo-CLIP {args.arch.upper()} `forward_features` at 1520x912 ({shape}), batch 1, CPU "
        f"{args.threads} threads | ours {ours_s:.2f} s, efficientnet-pytorch {ref_s:.2f} s; "
        f"conformance check {conformance_s:.1f} s, max rel. error {err:.1e} ({verdict} <= 1e-4) "
        f"| <= 1e-4 | `{command}` |"
    )
    print("\nBENCHMARKS.md row:\n")
    print(row)
    print(f"\nreproduce with: {command}")
    if args.append is not None:
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write(row + "\n")
        print(f"appended to {args.append}")
    return 0 if err <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
