"""Stop signals: every command stops in one line with 128 + the signal, nothing swallows the stop, a signal the
parent ignores stays ignored, and two renames are never parted by one. Signals are real (sent to this process or
to a child), nothing is mocked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import child_env

from gpt2scratch.errors import Stopped
from gpt2scratch.signals import deferred, stopping_at_once


@pytest.fixture
def own_handlers() -> Iterator[None]:
    """This test may change the stop signals' handlers: they are put back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def deliver(sig: int) -> None:
    """``sig`` to this process, handled before this returns (Python runs handlers between bytecodes)."""
    os.kill(os.getpid(), sig)
    time.sleep(0.01)


@pytest.mark.usefixtures("own_handlers")
def test_a_stop_is_not_swallowed_by_except_exception_and_later_signals_are_ignored() -> None:
    """The sweep: an ordinary exception raised by the handler was caught by a broad except on the way (generate
    went on sampling for minutes); then the handlers ignored every further signal."""
    with pytest.raises(Stopped) as stopped, stopping_at_once():
        try:
            deliver(signal.SIGTERM)
        except Exception:  # what a library on the way might do
            pytest.fail("the stop was caught as an ordinary exception")
    assert stopped.value.exit_code == 128 + signal.SIGTERM and str(stopped.value) == "stopped by SIGTERM"
    assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))


@pytest.mark.usefixtures("own_handlers")
def test_the_handlers_are_put_back_when_nothing_stopped_and_an_ignored_signal_stays_ignored() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    before = signal.getsignal(signal.SIGTERM)
    with stopping_at_once():
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not before
        deliver(signal.SIGHUP)  # ignored: nothing is raised
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.usefixtures("own_handlers")
def test_a_signal_inside_deferred_is_handled_when_the_block_ends() -> None:
    received: list[tuple[int, bool]] = []
    inside = False
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append((signum, inside)))
    with deferred():
        inside = True
        deliver(signal.SIGTERM)
        assert not received, "handled between the two steps the block keeps together"
        inside = False
    time.sleep(0.01)
    assert received == [(signal.SIGTERM, False)]


def test_importing_the_command_line_does_not_import_torch() -> None:
    """So the command takes over the stop signals within milliseconds, not after the second torch takes to load
    (a SIGTERM then killed generate by the signal, with no message)."""
    code = "import sys, gpt2scratch.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=child_env(), timeout=60)  # fmt: skip
    assert result.stdout.strip() == "False", result.stderr


@pytest.fixture(scope="module")
def checkpoint(trained_snapshot: Path) -> Path:
    return trained_snapshot


def streaming(checkpoint: Path, ignore: tuple[int, ...] = ()) -> subprocess.Popen:
    """``generate --stream`` of many samples, started once it streams; ``ignore``: signals the parent ignores."""

    def preexec() -> None:
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)

    command = [sys.executable, "-m", "gpt2scratch", "generate", "--checkpoint", str(checkpoint), "--stream",
               "--num-samples", "100000", "--max-new-tokens", "8", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    env = child_env({"OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=preexec)  # fmt: skip
    assert proc.stdout is not None
    while "--- sample 2 ---" not in proc.stdout.readline():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["TERM", "HUP", "INT"])
def test_a_signal_stops_generate_in_one_line_with_128_plus_the_signal(sig: int, checkpoint: Path) -> None:
    """The sweep: SIGTERM during `generate --stream` killed it by the signal, with no message."""
    proc = streaming(checkpoint)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert err == f"error: stopped by {signal.Signals(sig).name}\n"


def test_a_hangup_ignored_by_the_parent_does_not_stop_generate(checkpoint: Path) -> None:
    """`nohup gpt2-scratch generate ...`: a closed terminal must not stop it; SIGTERM still does."""
    proc = streaming(checkpoint, ignore=(signal.SIGHUP,))
    proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert proc.poll() is None, "a hangup the parent ignores stopped the command"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and err == "error: stopped by SIGTERM\n", err
