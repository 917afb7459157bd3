"""Local cache of retrieved DICOM instances, keyed by SOP Instance UID, written atomically.

A file appears under its final name only once it is complete (written to a temporary name in the
same folder, flushed to disk, then renamed), so an interrupted retrieve leaves no half file and the
next retrieve fetches only what is missing.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ..errors import PacsResponseError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PARTIAL_SUFFIX = ".part"


def default_cache_dir() -> Path:
    """``<user cache dir>/napari-mammo-sae/pacs``."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-mammo-sae", appauthor=False)) / "pacs"


def check_uid(uid: str) -> str:
    """A UID fit to be a file name (digits and dots, at most 64 characters)."""
    uid = str(uid).strip().rstrip("\x00")
    if not (uid and len(uid) <= 64 and _UID.match(uid)):
        raise PacsResponseError("the server sent an invalid UID (not digits and dots)")
    return uid


class InstanceCache:
    """DICOM files by SOP Instance UID under ``root`` (default: the user cache folder)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()  # made on first write

    def path(self, sop_instance_uid: str) -> Path:
        uid = check_uid(sop_instance_uid)
        return self.root / uid[-2:].replace(".", "_") / f"{uid}.dcm"

    def has(self, sop_instance_uid: str) -> bool:
        p = self.path(sop_instance_uid)
        return p.is_file() and p.stat().st_size > 0

    def write(self, sop_instance_uid: str, dataset: Any) -> Path:
        """Write a pydicom Dataset (or raw Part-10 bytes) under its UID, atomically."""
        final = self.path(sop_instance_uid)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{final.stem}.", suffix=PARTIAL_SUFFIX, dir=final.parent
        )
        try:
            with os.fdopen(fd, "wb") as fh:
                if isinstance(dataset, (bytes, bytearray, memoryview)):
                    fh.write(dataset)
                else:
                    dataset.save_as(fh, enforce_file_format=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return final

    def partials(self) -> list[Path]:
        """Leftover temporary files (a process killed mid-write); never read as instances."""
        return sorted(self.root.rglob(f"*{PARTIAL_SUFFIX}"))

    def clean_partials(self, older_than_s: float = 0.0) -> int:
        """Delete leftover temporary files older than ``older_than_s`` (another process may be
        writing the newer ones); returns how many."""
        import time

        n = 0
        now = time.time()
        for p in self.partials():
            try:
                if now - p.stat().st_mtime >= older_than_s:
                    p.unlink(missing_ok=True)
                    n += 1
            except OSError:
                continue
        return n
