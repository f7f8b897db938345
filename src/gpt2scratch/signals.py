"""Stopping cleanly on SIGINT, SIGTERM or SIGHUP (a closed terminal).

Every command stops at once on the first signal, raising ``Stopped``: the exception unwinds through the ``finally``
clauses that remove temporary files, and further signals are ignored meanwhile (``stopping_at_once``). A training
run, once it trains, instead asks the loop to stop after the current step and write a snapshot; a second signal then
exits at once (``StopSignals``), after removing the run's temporary files. Exiting at once is safe: every file is
written under a temporary name and renamed into place. A signal the parent process ignores (``nohup``, a shell's
background job) stays ignored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from gpt2scratch.errors import Stopped

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
BEFORE_FIRST_STEP = (
    "while preparing the run (before the first step): nothing was saved and no temporary file was left; run the "
    "same command again"
)


@contextlib.contextmanager
def _handled(handler: Callable[[int, Any], None], restore: Callable[[], bool]) -> Iterator[None]:
    """``handler`` for the stop signals the process does not ignore; the previous handlers come back at the end if
    ``restore()`` says so, where ``handler`` is still in place (one left on purpose by an inner block stays). Only
    the main thread can set handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig, before in previous.items():
        if before is not signal.SIG_IGN:
            signal.signal(sig, handler)
    try:
        yield
    finally:
        if restore():
            for sig, before in previous.items():
                if signal.getsignal(sig) == handler:
                    signal.signal(sig, before)


def ignore_stop_signals() -> None:
    """Ignore every stop signal from now on: once a stop is reported, nothing may turn its exit code into a death
    by signal (Python restores default handlers while it shuts down)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def stopping_at_once(detail: str = "") -> Iterator[None]:
    """Until the end of the block, a stop signal raises ``Stopped`` (with ``detail`` in its message) and further ones
    are ignored, so that the unwinding it starts (removing temporaries) finishes; after a stop they stay ignored
    until the process ends."""

    def handle(signum: int, frame: Any) -> None:
        ignore_stop_signals()
        raise Stopped(signum, detail)

    with _handled(handle, restore=lambda: True):
        yield


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Stop signals arriving inside the block are handled when it ends: for steps that must not be parted (moving a
    directory aside and another into its place)."""
    received: list[int] = []
    try:
        with _handled(lambda signum, frame: received.append(signum), restore=lambda: True):
            yield
    finally:
        if received:
            signal.raise_signal(received[0])  # now, to the handler the block would have interrupted


class StopSignals:
    """A training run's stop signals. ``requested`` names the first signal received (None until then); ``training``
    switches from stopping at once (set-up) to stopping after the step. ``at_exit`` runs before a second signal
    exits at once: it removes the run's temporary files and ends a progress bar's line."""

    def __init__(self, at_exit: Callable[[], None] | None = None) -> None:
        self.requested: str | None = None
        self.training = False
        self.at_exit = at_exit

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            self._exit_at_once()
        self.requested = signal.Signals(signum).name
        if not self.training:
            raise Stopped(signum, BEFORE_FIRST_STEP)
        log.warning("%s received: stopping after this step (again to exit at once)", self.requested)

    def _exit_at_once(self) -> None:
        with contextlib.suppress(Exception):  # nothing may keep the process from exiting
            if self.at_exit is not None:
                self.at_exit()
        os.write(2, b"error: a second stop signal: exiting at once (every file on disk is complete)\n")
        os._exit(130)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        # Once stopping, a further signal must still exit at once, until the end: the handlers stay.
        with _handled(self._handle, restore=lambda: self.requested is None):
            yield self
