"""Stopping a run cleanly on SIGINT, SIGTERM or SIGHUP (a closed terminal).

While the run is being prepared (tokenizing, loading) a signal stops it at once, raising ``Stopped``: temporary files
are removed on the way out. Once training runs, a signal asks the loop to stop after the current step and write a
snapshot; a second one exits at once. Exiting at once is safe: every file is written under a temporary name and
renamed into place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from .errors import Stopped

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """``requested`` names the first signal received (None until then); ``training`` switches from stopping at
    once (set-up) to stopping after the step."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.training = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            os.write(2, b"error: a second stop signal: exiting at once (every file on disk is complete)\n")
            os._exit(130)
        self.requested = signal.Signals(signum).name
        if not self.training:
            raise Stopped(signum)
        log.warning("%s received: stopping after this step (again to exit at once)", self.requested)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            if self.requested is None:  # once stopping, a further signal must still exit at once, until the end
                for sig, handler in self._previous.items():
                    signal.signal(sig, handler)
