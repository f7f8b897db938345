"""The ``gpt2-scratch`` command (and ``python train.py``): parse argv, run, and turn user errors into one line.

The only module that reads ``sys.argv``, prints, or decides exit codes. Flags of ``train`` are generated from the
fields of ``TrainConfig``, so the dataclass, the ``--help`` text and the validation never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import signal
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import TrainConfig
from .errors import GPT2ScratchError, Interrupted, UsageError

log = logging.getLogger("gpt2scratch")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _field_type(hint: Any) -> type:
    """The scalar type of a TrainConfig field's type hint, such as ``int | None`` -> ``int``."""
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with its default, type and help."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
        kind = _field_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
            continue
        default = f.default
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(
            *flags, dest=f.name, type=kind, default=default, choices=f.metadata.get("choices"), help=help_text + shown
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpt2-scratch", description="GPT-2 from scratch: train on your text, generate, export.")
    parser.add_argument("--version", action="version", version=f"gpt2-scratch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train on a text file until the target loss")
    add_train_flags(train)
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")

    gen = commands.add_parser("generate", help="sample text from a checkpoint or GPT-2 weights")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint written by train (final_model.pt or a snapshot)")
    source.add_argument("--pretrained", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a transformers directory")
    gen.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    gen.add_argument("--num-samples", type=int, default=5, help="how many samples (default: 5)")
    gen.add_argument("--max-length", type=int, default=30, help="tokens per sample, prompt included (default: 30)")
    gen.add_argument("--max-new-tokens", type=int, help="tokens to add after the prompt (overrides --max-length)")
    gen.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (default: 50)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set reaching probability p")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: 1.0)")
    gen.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    gen.add_argument("--stop-at-eot", action="store_true", help="end a sample at <|endoftext|>")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come (samples one after another)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    gen.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")

    export = commands.add_parser("export", help="write a checkpoint as a transformers model directory")
    export.add_argument("checkpoint", help="a checkpoint written by train")
    export.add_argument("out_dir", help="directory to write (config.json, model.safetensors, tokenizer files)")
    export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 failure, 2 usage error, 130 interrupted)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    from .distributed import from_env

    info = from_env()
    logging.basicConfig(
        level=logging.INFO if info.is_main else logging.WARNING,
        format="%(message)s",
        stream=sys.stdout,
        force=True,
    )
    try:
        if args.command == "train":
            return run_train(args, info, raw)
        if args.command == "generate":
            return run_generate(args)
        return run_export(args)
    except Interrupted as err:
        # Nothing is left to stop: a further Ctrl-C while the interpreter shuts down must not turn exit 130 into a
        # death by signal (Python restores the default handlers during shutdown).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"training stopped; snapshot: {err}; resume with: {_resume_command(raw, str(err))}", file=sys.stderr)
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


def run_train(args: argparse.Namespace, info: Any, raw: list[str]) -> int:
    from . import convert, train
    from .generate import SamplingConfig, for_inference, generate_text

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    cfg.validate()
    result = train.train(cfg, info, progress=_progress_bar() if info.is_main else None)
    if cfg.no_sample or not info.is_main:
        return 0
    model, _ = convert.load_model(result.model_path)  # load it back, as a user would
    model = for_inference(model, result.device, result.dtype)
    sampling = SamplingConfig()
    print(f"\nsamples from {result.model_path} (top-k {sampling.top_k}, seed {sampling.seed}):")
    for i, text in enumerate(generate_text(model, cfg.sample_prompt, sampling), 1):
        print(f"--- sample {i} ---\n{text}")
    return 0


def _progress_bar() -> Any:
    """A tqdm bar for tokenizing, shown only for inputs large enough to take a while."""
    from tqdm import tqdm

    bar: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bar:
            if total < 20_000_000:
                return
            bar.append(tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr))
        bar[0].n = done
        bar[0].refresh()
        if done >= total:
            bar[0].close()

    return update


def run_generate(args: argparse.Namespace) -> int:
    from . import convert
    from . import device as devices
    from .generate import SamplingConfig, for_inference, generate_text, stream_text

    sampling = SamplingConfig(
        num_samples=args.num_samples,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_at_eot=args.stop_at_eot,
    )
    sampling.validate()
    dev = devices.pick_device(args.device)
    dtype = devices.pick_dtype(args.dtype, dev)
    devices.configure_matmul(dev)
    model, _ = convert.load_model(args.checkpoint or args.pretrained)
    model = for_inference(model, dev, dtype)
    for i in range(sampling.num_samples):
        if not args.stream:
            break
        print(f"--- sample {i + 1} ---")
        one = dataclasses.replace(sampling, num_samples=1, seed=sampling.seed + i)
        for piece in stream_text(model, args.prompt, one):
            print(piece, end="", flush=True)
        print()
    if not args.stream:
        for i, text in enumerate(generate_text(model, args.prompt, sampling), 1):
            print(f"--- sample {i} ---\n{text}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from . import checkpoint, convert

    path = Path(args.checkpoint)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; export takes a checkpoint file written by train")
    checkpoint.load(path)
    model, _ = convert.load_model(path)
    out = Path(args.out_dir)
    convert.export(model, out)
    print(f"wrote {out} (load it with transformers: GPT2LMHeadModel.from_pretrained({str(out)!r}))")
    return 0
