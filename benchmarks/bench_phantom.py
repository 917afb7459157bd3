"""Phantom generation speed: images per second at the default (full) size, 1 and 2 worker processes.

Usage::

    .venv/bin/python benchmarks/bench_phantom.py [--studies 12] [--size full] [--append BENCHMARKS.md]

Each run writes ``--studies`` x 4 uncompressed DICOM files (plus the CSVs) to a temporary folder through
the same function the ``phantom`` command calls, once with one worker and once with two; the figure is
wall-clock images per second including planning, rendering, DICOM writing and the CSVs. The issue's
target is a 1,000-study (4,000-image) dataset at the default size within 10 minutes on 2 cores, i.e.
at least 6.7 images/s; the projected time for 4,000 images is printed. Prints one markdown table row
and the command that reproduces it (``--append FILE`` appends the row).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _rate(cfg, workers: int) -> tuple[float, float]:
    """(images per wall-clock second, CPU seconds per image) of one dataset."""
    from napari_mammo_sae.phantom.dataset import write_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-phantom-"))
    try:
        c0, t0 = _cpu_seconds(), time.perf_counter()
        write_dataset(cfg, tmp / "data", workers=workers)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        n = cfg.studies * 4
        return n / wall, cpu / n
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the markdown row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--size", choices=("small", "medium", "full"), default="full")
    parser.add_argument("--append", type=Path, help="append the markdown row to this file")
    args = parser.parse_args(argv)

    from napari_mammo_sae.phantom.dataset import SIZES, PhantomConfig

    h, w, sp = SIZES[args.size]
    cfg = PhantomConfig(studies=args.studies, seed=0, height=h, width=w, spacing_mm=sp)
    _rate(PhantomConfig(studies=1, seed=1, height=h, width=w, spacing_mm=sp), 1)  # warm-up
    one, cpu1 = _rate(cfg, 1)
    two, cpu2 = _rate(cfg, 2)
    projected = 4000 / two / 60
    idle = 4000 * cpu2 / 2 / 60  # two idle cores: CPU time shared by two processes
    load = os.getloadavg()[0]
    cmd = f"python benchmarks/bench_phantom.py --studies {args.studies} --size {args.size}"
    print(f"{args.size} ({h}x{w} @ {sp} mm), {cfg.studies * 4} images per run")
    print(f"1 worker : {one:6.2f} images/s")
    print(
        f"2 workers: {two:6.2f} images/s  ({two / one:.2f}x; 4,000 images in {projected:.1f} min)"
    )
    print(f"CPU time : {cpu1:.3f} s/image (1 worker), {cpu2:.3f} s/image (2 workers)")
    print(f"4,000 images on two idle cores (CPU time / 2): {idle:.1f} min; load average {load:.1f}")
    row = (
        f"| phantom generation, {args.size} {h}x{w}, uncompressed | {one:.2f} img/s (1 worker), "
        f"{two:.2f} img/s (2 workers); {cpu2:.3f} CPU s/image | 4,000 images: {projected:.1f} min "
        f"measured, {idle:.1f} min from CPU time on 2 idle cores (target <= 10) | "
        f"{os.cpu_count()} CPUs, load average {load:.1f} | `{cmd}` |"
    )
    print(row)
    if args.append:
        with args.append.open("a") as fh:
            fh.write(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
