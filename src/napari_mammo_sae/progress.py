"""One progress interface for long work: tqdm at the shell, napari's progress bar in the viewer.

Core functions take ``progress: Progress | None`` and call ``progress.update(n)``; they check
``progress.cancelled`` between units of work and raise :class:`Cancelled` when it is set.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class Cancelled(Exception):
    """Raised by long-running core work when its progress object was cancelled."""


@runtime_checkable
class Progress(Protocol):
    """What core code may call on a progress object."""

    cancelled: bool

    def set_total(self, total: int | None) -> None: ...
    def update(self, n: int = 1) -> None: ...
    def set_description(self, text: str) -> None: ...
    def set_postfix(self, **values: object) -> None: ...
    def close(self) -> None: ...


class TqdmProgress:
    """Progress on the terminal through tqdm."""

    def __init__(self, total: int | None = None, desc: str = "", disable: bool = False) -> None:
        from tqdm.auto import tqdm

        self.cancelled = False
        self._bar = tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True)

    def set_total(self, total: int | None) -> None:
        self._bar.total = total
        self._bar.refresh()

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_description(self, text: str) -> None:
        self._bar.set_description(text)

    def set_postfix(self, **values: object) -> None:
        self._bar.set_postfix(**values)

    def close(self) -> None:
        self._bar.close()


def check_cancelled(progress: Progress | None) -> None:
    """Raise :class:`Cancelled` if the caller asked to stop."""
    if progress is not None and getattr(progress, "cancelled", False):
        raise Cancelled()
