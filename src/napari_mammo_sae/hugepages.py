"""Turn numpy's transparent-huge-page advice off for this process, where it stalls allocations.

numpy asks the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``) on every array of
4 MB or more. Where the kernel's THP ``defrag`` policy compacts memory on such a fault (``madvise``,
the default on Debian and Ubuntu, ``always``, ``defer+madvise``), each fresh large array can wait
for compaction. A mammogram is several such arrays (decoded, modality-mapped, display copy,
preprocessed), so on the development box reading and preparing the four views of a CBIS-DDSM exam
took 1.55-1.65 s with the advice and 0.41-0.43 s without it (same process, arrays kept alive as
napari's layers keep them). torch's own tensors are not affected. Set
``NAPARI_MAMMO_SAE_NUMPY_HUGEPAGES=1`` to keep numpy's default.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFRAG = Path("/sys/kernel/mm/transparent_hugepage/defrag")


def compacts_on_fault(policy: str) -> bool:
    """True when the THP ``defrag`` policy text (its selected value in brackets) makes a fault in an
    madvised region compact memory synchronously."""
    chosen = policy[policy.find("[") + 1 : policy.find("]")] if "[" in policy else policy.strip()
    return chosen in ("always", "madvise", "defer+madvise")


def avoid_hugepage_stalls() -> bool:
    """Switch numpy's huge-page advice off when the kernel would stall on it; True when switched."""
    if os.environ.get("NAPARI_MAMMO_SAE_NUMPY_HUGEPAGES", "") == "1" or sys.platform != "linux":
        return False
    try:
        policy = DEFRAG.read_text(encoding="ascii")
    except OSError:
        return False
    if not compacts_on_fault(policy):
        return False
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    setter = getattr(core.multiarray, "_set_madvise_hugepage", None)
    if setter is None:
        return False
    setter(False)
    return True
