"""The one signal-stop helper of the training loops (``train``, ``train-head``, its lesion pretext).

``with SignalStop() as stop:`` turns SIGINT/SIGTERM into ``stop.requested = True`` (and
``stop.signum``) instead of an exception mid-step: the loop checks the flag after each step, writes
its checkpoint and returns. The previous handlers come back on exit. Outside the main thread Python
cannot install handlers; the context then does nothing and the flag stays False.
"""

from __future__ import annotations

import signal
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalStop:
    """Context manager: ``requested`` becomes True once SIGINT or SIGTERM arrives."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalStop:
        for sig in SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested, self.signum = True, signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
