"""What a person sees of a command: lines on stdout and, for work that takes a while, a progress bar on stderr."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


class Terminal:
    """The ``Console`` (config/commands.py) that the command line gives a command: stdout and tqdm bars."""

    def say(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, flush=True)

    @contextlib.contextmanager
    def progress(self, desc: str, unit: str = "B", least: int = 20_000_000) -> Iterator[ProgressBar]:
        bar = ProgressBar(desc, unit, least)
        try:
            yield bar
        finally:
            bar.close()


class ProgressBar:
    """A tqdm bar with an ETA, shown only for work large enough to take a while (``total`` of at least ``least``);
    ``close`` ends its line, so that a message printed after it (an error, say) starts on a line of its own."""

    def __init__(self, desc: str = "tokenizing", unit: str = "B", least: int = 20_000_000):
        self.desc, self.unit, self.least = desc, unit, least
        self._bar: Any = None

    def __call__(self, done: int, total: int, note: str = "") -> None:
        if self._bar is None:
            if total < self.least:
                return
            from tqdm import tqdm

            scale = self.unit == "B"
            self._bar = tqdm(total=total, unit=self.unit, unit_scale=scale, desc=self.desc, file=sys.stderr)
        self._bar.n = done
        if note:
            self._bar.set_postfix_str(note, refresh=False)
        self._bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
