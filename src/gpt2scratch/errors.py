"""Errors a user can cause, each with a message that says what went wrong and how to fix it.

Bugs in our own code are ``assert``s; everything here is a mistake in the input, the flags, the files or the
machine, and the CLI prints it as one line with an exit code (2 for usage, 1 for failures) and no traceback.
"""

from __future__ import annotations


class GPT2ScratchError(Exception):
    """Base class: a failure the user can understand and fix. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(GPT2ScratchError):
    """A flag or argument is out of range or inconsistent with another."""

    exit_code = 2


class ConfigError(UsageError):
    """A model configuration we cannot build (bad sizes, unknown preset, unsupported HF option)."""


class DeviceError(UsageError):
    """The requested device or dtype is not available on this machine."""


class DataError(GPT2ScratchError):
    """The training text is missing, empty, not UTF-8 text, or too short."""


class CheckpointError(GPT2ScratchError):
    """A checkpoint or weights file is missing, truncated, corrupt, unsafe, foreign or of another shape."""


class OutDirError(GPT2ScratchError):
    """The output directory cannot be written, is full, or is in use by another run."""


class TrainingDiverged(GPT2ScratchError):
    """The loss became NaN or infinite."""


class Interrupted(GPT2ScratchError):
    """Training was stopped by a signal after writing a snapshot; the message says how to resume."""

    exit_code = 130


class Stopped(BaseException):
    """A signal stopped a command where there was nothing to save; exit code 128 + the signal. ``detail`` says what
    the command was doing and what that means. Like KeyboardInterrupt, not an Exception: raised by a signal handler
    wherever the program happens to be, it must not be swallowed by an ``except Exception`` on the way out."""

    def __init__(self, signum: int, detail: str = ""):
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name}" + (f" {detail}" if detail else ""))
        self.exit_code = 128 + signum


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters; "" when it has none. For the one-line
    warnings of a fallback (a compiler, a CUDA graph, W&B) that quote an error from a library we called."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else ""
