"""The ``gpt2-scratch`` command (and ``python train.py``): parse argv, run, and turn user errors into one line.

The only code that reads ``sys.argv`` or decides exit codes. ``COMMANDS`` drives it: a row per command, holding the
command's dataclass (its flags, made by flags.py), its help, and the runner that does the work, which lives with the
code it runs and is imported only once the flags are known to be good.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2scratch import __version__
from gpt2scratch.cli.console import Terminal
from gpt2scratch.cli.flags import Parser, add_flags, from_args, given
from gpt2scratch.config import (
    ConsolidateConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    PlotConfig,
    PrepareConfig,
    ServeConfig,
    TrainConfig,
)
from gpt2scratch.errors import GPT2ScratchError, Interrupted, Stopped, UsageError
from gpt2scratch.signals import ignore_stop_signals, stopping_at_once


@dataclass(frozen=True)
class Command:
    """A row of the dispatch table: ``run`` is ``"module:function"``, called with the filled dataclass and a
    Console; ``many_processes`` if torchrun may start it as several; ``settings``, where files can hold the
    command's settings, the ``"module:function"`` that reads them from the flags given (the flags override them)."""

    name: str
    config: type
    help: str
    run: str
    many_processes: bool = False
    settings: str | None = None


COMMANDS = (
    Command("train", TrainConfig, "train on a text file until the target loss", "gpt2scratch.training.command:run",
            many_processes=True, settings="gpt2scratch.training.settings:from_files"),
    Command("generate", GenerateConfig, "sample text from a checkpoint or GPT-2 weights",
            "gpt2scratch.inference.command:run"),
    Command("export", ExportConfig, "write a checkpoint as a transformers model directory",
            "gpt2scratch.checkpoint.command:export"),
    Command("eval", EvalConfig, "measure a model: perplexity on a text, accuracy on HellaSwag-style questions",
            "gpt2scratch.eval.command:run"),
    Command("plot", PlotConfig, "draw the loss, learning-rate and speed curves of runs in a PNG",
            "gpt2scratch.training.plot:run"),
    Command("serve", ServeConfig, "serve a model over HTTP: OpenAI-compatible completions, batched across requests",
            "gpt2scratch.serve.server:run"),
    Command("prepare", PrepareConfig, "tokenize text, JSON lines, Parquet or a datasets folder into token shards",
            "gpt2scratch.data.prepare:run"),
    Command("consolidate", ConsolidateConfig, "write a sharded snapshot (--parallel fsdp) as one checkpoint file",
            "gpt2scratch.checkpoint.command:consolidate"),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """``gpt2-scratch``'s parser: a sub-command per row of ``COMMANDS``, its flags made from the row's dataclass."""
    parser = Parser(
        prog="gpt2-scratch",
        description="GPT-2 from scratch: train on your text, generate, evaluate, serve, plot, export.",
    )
    parser.add_argument("--version", action="version", version=f"gpt2-scratch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help)
        add_flags(sub, command.config)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")
    return parser


def main(argv: Sequence[str] | None = None, exiting: bool | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 failure, 2 usage error, 130 interrupted).

    ``exiting`` (default: when ``argv`` is None, i.e. the console script and ``python -m gpt2scratch``): the process
    ends once this returns, so stop signals are ignored from then on. The exit code is decided; without this, a
    SIGTERM that lands while Python tears down (torch's modules take a moment) would end the process by the signal,
    and its parent would see a death instead of the command's code."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if isinstance(sys.stdout, io.TextIOWrapper):  # a sample in a terminal that cannot show it: escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(raw)
    with stopping_at_once():  # a training run installs its own handlers once it starts (signals.py)
        try:
            code = _run(args, raw)
        except Stopped as err:  # a signal that came while the command's own error was being reported
            ignore_stop_signals()
            print(f"error: {err}", file=sys.stderr)
            code = err.exit_code
        if argv is None if exiting is None else exiting:
            ignore_stop_signals()  # inside the block: no moment is left between its handlers and SIG_IGN
    return code


def _run(args: argparse.Namespace, raw: list[str]) -> int:
    """Run the parsed command; a user's error becomes one line on stderr and its exit code."""
    try:
        # The command's dataclass first: a bad flag is refused at once, before the second that importing torch takes.
        command, cfg = command_config(args)
        _check_thread_count()
        from gpt2scratch.distributed.world import World, from_env

        world = from_env() if command.many_processes else World()
        logging.basicConfig(
            level=logging.INFO if world.is_main else logging.WARNING,
            format="%(message)s",
            stream=sys.stdout,
            force=True,
        )
        _function(command.run)(cfg, Terminal())
        return 0
    except Interrupted as err:
        ignore_stop_signals()  # nothing is left to stop: a further Ctrl-C must not turn exit 130 into a death by signal
        print(f"training stopped; snapshot: {err}; resume with: {_resume_command(raw, str(err))}", file=sys.stderr)
        return err.exit_code
    except Stopped as err:
        ignore_stop_signals()
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except GPT2ScratchError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as err:
        if args.debug:
            raise
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug of ours: still one line, with the way to see more
        if args.debug:
            raise
        print(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def command_config(args: argparse.Namespace) -> tuple[Command, Any]:
    """The row of the command ``args`` name, and its dataclass filled: the flags given over the settings of the
    files they name (a recipe, a --config file), over the defaults. UsageError for a bad flag or file."""
    command = next(row for row in COMMANDS if row.name == args.command)
    files = _function(command.settings)(given(args)) if command.settings else {}
    return command, from_args(command.config, args, files)


def _function(name: str) -> Any:
    """The function a ``"module:function"`` of the table names, its module imported now."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def _check_thread_count() -> None:
    """UsageError for a malformed OMP_NUM_THREADS, before torch is imported: its OpenMP library reads the variable
    as it loads and, on a value it cannot use, prints two lines of its own and picks a thread count itself."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value is not None and not re.fullmatch(r"\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*", value):
        raise UsageError(
            f"OMP_NUM_THREADS={value!r} in the environment is not a number of threads; set it to a positive whole "
            "number (or a comma-separated list of them), or unset it"
        )


def _resume_command(raw: list[str], snapshot: str) -> str:
    """The command line that continues an interrupted run: the same flags, --resume pointing at the snapshot."""
    args, skip = [], False
    for arg in raw[1:]:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        if not arg.startswith("--resume="):
            args.append(arg)
    program = "python train.py" if Path(sys.argv[0]).name == "train.py" else "gpt2-scratch train"
    return " ".join([program, *map(shlex.quote, args), "--resume", shlex.quote(snapshot)])
