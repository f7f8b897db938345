"""The ``gpt2-scratch`` command (and ``python train.py``): parse argv, run, and turn user errors into one line.

The only module that reads ``sys.argv``, prints, or decides exit codes. Every command's flags are generated from
the fields of its dataclass (``COMMANDS``), so the dataclass, the ``--help`` text and the validation never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import re
import shlex
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from . import __version__
from .commands import (
    ConsolidateConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    PlotConfig,
    PrepareConfig,
    SamplingConfig,
    ServeConfig,
)
from .config import TrainConfig
from .errors import GPT2ScratchError, Interrupted, Stopped, UsageError
from .signals import ignore_stop_signals, stopping_at_once

if typing.TYPE_CHECKING:
    from .distributed import World as World

log = logging.getLogger("gpt2scratch")
T = TypeVar("T")

COMMANDS = (
    ("train", TrainConfig, "train on a text file until the target loss"),
    ("generate", GenerateConfig, "sample text from a checkpoint or GPT-2 weights"),
    ("export", ExportConfig, "write a checkpoint as a transformers model directory"),
    ("eval", EvalConfig, "measure a model: perplexity on a text, accuracy on HellaSwag-style questions"),
    ("plot", PlotConfig, "draw the loss, learning-rate and speed curves of runs in a PNG"),
    ("serve", ServeConfig, "serve a model over HTTP: OpenAI-compatible completions, batched across requests"),
    ("prepare", PrepareConfig, "tokenize text, JSON lines, Parquet or a datasets folder into token shards"),
    ("consolidate", ConsolidateConfig, "write a sharded snapshot (--parallel fsdp) as one checkpoint file"),
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _field_type(hint: Any) -> Any:
    """The scalar type of a field's type hint, such as ``int | None`` -> ``int``."""
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def add_flags(parser: argparse.ArgumentParser, command: Any) -> None:
    """One flag per field of the dataclass ``command`` (recursively for nested dataclasses), with its default, type
    and help: the only way flags are made, so a dataclass, its ``--help`` and its validation never drift apart."""
    hints = typing.get_type_hints(command)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(command):
        kind = _field_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            add_flags(parser, kind)
            continue
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, help=help_text, nargs=f.metadata.get("nargs"))  # "+": a list
            continue
        target = parser
        if group := f.metadata.get("group"):
            if group not in groups:
                groups[group] = parser.add_mutually_exclusive_group(required=True)
            target = groups[group]
        flags = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
        if kind is bool:
            target.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        shown = "" if f.default is None or required else f" (default: {f.default})"
        target.add_argument(
            *flags, dest=f.name, type=kind, default=None if required else f.default, required=required,
            choices=f.metadata.get("choices"), help=help_text + shown,
        )  # fmt: skip


def from_args(command: Callable[..., T], args: argparse.Namespace) -> T:
    """The dataclass ``command`` filled from parsed flags; building it validates it (UsageError)."""
    hints = typing.get_type_hints(command)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(command):  # type: ignore[arg-type]
        kind = _field_type(hints[f.name])
        nested = dataclasses.is_dataclass(kind)
        values[f.name] = from_args(kind, args) if nested else getattr(args, f.name)
    return command(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gpt2-scratch",
        description="GPT-2 from scratch: train on your text, generate, evaluate, serve, plot, export.",
    )
    parser.add_argument("--version", action="version", version=f"gpt2-scratch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command, help_text in COMMANDS:
        sub = commands.add_parser(name, help=help_text)
        add_flags(sub, command)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 failure, 2 usage error, 130 interrupted)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if isinstance(sys.stdout, io.TextIOWrapper):  # a sample in a terminal that cannot show it: escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(raw)
    with stopping_at_once():  # a training run installs its own handlers once it starts (signals.py)
        try:
            return _run(args, raw)
        except Stopped as err:  # a signal that came while the command's own error was being reported
            ignore_stop_signals()
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code


def _run(args: argparse.Namespace, raw: list[str]) -> int:
    """Run the parsed command; a user's error becomes one line on stderr and its exit code."""
    try:
        # The command's dataclass first: a bad flag is refused at once, before the second that importing torch takes.
        cfg: Any = from_args(next(command for name, command, _ in COMMANDS if name == args.command), args)
        _check_thread_count()
        from .distributed import World, from_env

        world = from_env() if args.command == "train" else World()  # only training runs as several processes
        logging.basicConfig(
            level=logging.INFO if world.is_main else logging.WARNING,
            format="%(message)s",
            stream=sys.stdout,
            force=True,
        )
        if args.command == "train":
            return run_train(cfg, world)
        if args.command == "generate":
            return run_generate(cfg)
        if args.command == "eval":
            return run_eval(cfg)
        if args.command == "plot":
            return run_plot(cfg)
        if args.command == "serve":
            return run_serve(cfg)
        if args.command == "prepare":
            return run_prepare(cfg)
        if args.command == "consolidate":
            return run_consolidate(cfg)
        return run_export(cfg)
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


def run_train(cfg: TrainConfig, world: World) -> int:
    from .generate import for_inference, generate_text
    from .train import train
    from .weights import load_model

    bar = ProgressBar()
    try:
        result = train(cfg, world, progress=bar if world.is_main else None, at_exit=bar.close)
    finally:
        bar.close()
    if cfg.no_sample or not world.is_main:
        return 0
    model = for_inference(load_model(result.model_path), result.device, result.dtype)  # loaded back, as a user would
    sampling = SamplingConfig()
    print(f"\nsamples from {result.model_path} (top-k {sampling.top_k}, seed {sampling.seed}):")
    for i, text in enumerate(generate_text(model, cfg.sample_prompt, sampling), 1):
        print(f"--- sample {i} ---\n{text}")
    return 0


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


def run_generate(cfg: GenerateConfig) -> int:
    from .commands import SEEDS
    from .device import configure_matmul, pick_device, pick_dtype
    from .generate import for_inference, generate_text, stream_text
    from .tokenizer import check_vocabulary
    from .weights import load_model

    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    configure_matmul(device)
    model = load_model(cfg.model.name)
    check_vocabulary(model.config.vocab_size, cfg.model.name)  # generate_text checks too; here the message names it
    model = for_inference(model, device, dtype, cfg.quantize)
    sampling = cfg.sampling
    if not cfg.stream:
        for i, text in enumerate(generate_text(model, cfg.prompt, sampling), 1):
            print(f"--- sample {i} ---\n{text}")
        return 0
    for i in range(sampling.num_samples):
        print(f"--- sample {i + 1} ---")
        one = dataclasses.replace(sampling, num_samples=1, seed=(sampling.seed + i) % SEEDS)
        for piece in stream_text(model, cfg.prompt, one):
            print(piece, end="", flush=True)
        print()
    return 0


def run_serve(cfg: ServeConfig) -> int:
    from .serve import serve

    serve(cfg)  # until SIGTERM or Ctrl-C, after which the requests in flight are finished
    return 0


def run_plot(cfg: PlotConfig) -> int:
    from .plot import plot_runs

    plot_runs(cfg.runs, Path(cfg.output))
    print(f"wrote {cfg.output}")
    return 0


def run_prepare(cfg: PrepareConfig) -> int:
    from .prepare import prepare

    bar = ProgressBar("preparing")
    try:
        result = prepare(cfg, bar)
    finally:
        bar.close()
    done = "already prepared" if result.already else "wrote"
    print(
        f"{done} {result.out}: {len(result.shards)} shards, {result.train_tokens:,} train and {result.val_tokens:,} "
        f"val tokens from {result.documents:,} documents (manifest.json lists them with their sha256)"
    )
    return 0


def run_consolidate(cfg: ConsolidateConfig) -> int:
    from .sharded import consolidate

    state = consolidate(Path(cfg.snapshot), Path(cfg.output), cfg.force)
    print(f"wrote {cfg.output} (step {state['step']}); resume with --resume {shlex.quote(cfg.output)}")
    return 0


def run_export(cfg: ExportConfig) -> int:
    from .checkpoint import model_from_checkpoint
    from .convert import export
    from .sharded import is_snapshot, load_checkpoint

    path = Path(cfg.checkpoint)
    if path.is_dir() and not is_snapshot(path):
        raise UsageError(f"{path} is a directory; export takes a checkpoint file or sharded snapshot written by train")
    model = model_from_checkpoint(load_checkpoint(path), str(path))
    out = Path(cfg.out_dir)
    export(model, out, force=cfg.force, source=path)
    print(f"wrote {out} (load it with transformers: GPT2LMHeadModel.from_pretrained({str(out)!r}))")
    return 0


def run_eval(cfg: EvalConfig) -> int:
    import json

    from . import evaluate
    from .data import resolve_inputs
    from .device import configure_matmul, pick_device, pick_dtype
    from .generate import for_inference
    from .tokenizer import check_vocabulary
    from .weights import load_model

    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    configure_matmul(device)
    model = load_model(cfg.model.name)
    check_vocabulary(model.config.vocab_size, cfg.model.name)
    model = for_inference(model, device, dtype)
    results: dict[str, dict[str, Any]] = {}
    rows: list[tuple[str, str, str]] = []
    if cfg.perplexity is not None:
        files = resolve_inputs(cfg.perplexity)
        texts = list(evaluate.read_texts(files))
        bar = ProgressBar("perplexity", "window", least=50)
        try:
            result = evaluate.perplexity(
                model, [t for t, _ in texts], sum(n for _, n in texts), cfg.context, cfg.stride, cfg.batch_size,
                dtype, bar,
            )  # fmt: skip
        finally:
            bar.close()
        results["perplexity"] = {"source": cfg.perplexity, **evaluate.describe(result)}
        rows += [
            ("perplexity", "loss (nats/token)", f"{result.loss:.4f}"),
            ("", "perplexity", f"{result.perplexity:.3f}"),
        ]
        rows += [
            ("", "bits per byte", f"{result.bits_per_byte:.4f}"),
            ("", "tokens predicted", f"{result.predicted_tokens:,}"),
        ]
    if cfg.hellaswag is not None:
        choices = evaluate.read_choices(cfg.hellaswag, cfg.limit)
        bar = ProgressBar("questions", "ending", least=200)
        try:
            scored = evaluate.multiple_choice(model, choices, cfg.batch_size, dtype, bar)
        finally:
            bar.close()
        results["multiple_choice"] = {"source": cfg.hellaswag, **evaluate.describe(scored)}
        rows += [("multiple choice", "acc", f"{scored.acc:.4f}"), ("", "acc_norm", f"{scored.acc_norm:.4f}")]
        rows += [("", "questions", f"{scored.n:,}")]
    print(f"{cfg.model.name} ({str(dtype).removeprefix('torch.')}, {device})")
    width = max(len(a) for a, _, _ in rows)
    for task, metric, value in rows:
        print(f"  {task:<{width}}  {metric:<18} {value:>10}")
    if cfg.output is not None:
        try:
            Path(cfg.output).write_text(json.dumps({"model": cfg.model.name, **results}, indent=2) + "\n")
        except OSError as err:
            raise UsageError(f"cannot write --output {cfg.output}: {err.strerror or err}") from None
    return 0
