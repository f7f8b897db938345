"""Stopping a run cleanly: SIGINT/SIGTERM ask the loop to stop after the current step; a second one exits at once.

Exiting at once is safe: every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


class StopSignals:
    """``requested`` names the first signal received (None until then)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            os._exit(130)
        self.requested = signal.Signals(signum).name
        log.warning("%s received: stopping after this step (again to exit at once)", self.requested)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            if self.requested is None:  # once stopping, a further signal must still exit at once, until the end
                for sig, handler in self._previous.items():
                    signal.signal(sig, handler)
