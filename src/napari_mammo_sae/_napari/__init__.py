"""napari adapters: reader, sample data, layers and widgets. Only this sub-package imports Qt/napari.

Importing this package first makes torch safe to import inside a napari process (see
:func:`guard_triton`).
"""

from __future__ import annotations

import importlib.util
import logging
import sys

log = logging.getLogger(__name__)


def _llvm_already_loaded() -> bool:
    """True when a system libLLVM (Mesa's llvmpipe OpenGL driver) is mapped into this process."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            return "libLLVM" in fh.read()
    except OSError:  # not Linux: no /proc, and no known clash
        return False


def guard_triton() -> str:
    """Keep torch's optional ``triton`` import from crashing napari; returns what was done.

    CUDA builds of torch ship ``triton``, which bundles its own LLVM. torch and torchvision import
    it lazily (``torch._dynamo``), e.g. the first time timm builds a model. When Mesa's software
    OpenGL (llvmpipe, used under Xvfb and on machines without a GPU driver) has already loaded the
    system libLLVM for napari's canvas, loading triton's LLVM afterwards kills the process with a
    segmentation fault. Loaded in the other order both work. So: if libLLVM is not there yet,
    import triton now (about 0.1 s); if it is, hide triton from torch (``torch.compile`` is then
    unavailable in this napari process - the plugin does not use it).
    """
    if "triton" in sys.modules:
        return "already-imported" if sys.modules["triton"] is not None else "blocked"
    try:
        present = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        present = False
    if not present:
        return "absent"
    if _llvm_already_loaded():
        sys.modules["triton"] = None  # `import triton` now raises ImportError; torch falls back
        log.info("triton hidden from torch: OpenGL's libLLVM is loaded and the two LLVMs clash")
        return "blocked"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken triton install must not stop the plugin
        sys.modules["triton"] = None
        log.info("triton hidden from torch: importing it failed (%s)", type(exc).__name__)
        return "blocked"
    return "imported"


guard_triton()

# fresh large numpy arrays (every mammogram read) can stall on huge-page compaction: see hugepages
from ..hugepages import avoid_hugepage_stalls  # noqa: E402

avoid_hugepage_stalls()
