"""What every command's dataclass is made with: ``option`` (a field's help text and flag spelling), ``flag`` (its
spelling in messages), the shared checks, and the choices several commands offer.

Configuration flows one way: the CLI makes each command's flags from its dataclass, parses ``argv`` into it, and
hands it to the command's code. A command's dataclass validates itself once, when it is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gpt2scratch.errors import UsageError

TRAIN_DTYPES = ("auto", "float32", "bfloat16", "float16")
INFERENCE_DTYPES = (*TRAIN_DTYPES, "float64")  # float64: exact comparisons (tests), never fast
QUANTIZE = ("none", "int8")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's converter writes GPT-2's matrices in
SWITCH = ("auto", "on", "off")  # an optimization: on, off, or as the device and the run call for
QUANTIZE_HELP = "int8: weights stored in int8 (one scale per output channel), computed in --dtype; CPU only"


def option(help: str, *flags: str, **extra: Any) -> dict[str, Any]:
    """Field metadata for the CLI: the help text and, when not derived from the name, the flags. ``extra`` may hold
    ``choices``, ``group`` (one of the fields of a group is required, and only one), ``positional`` and, for a
    positional list, ``nargs``, and ``const``: the value of the flag given without one (``--compile`` is on)."""
    return {"help": help, "flags": flags, **extra}


def refuse_empty(command: Any, *names: str) -> None:
    """UsageError naming the first of these flags given as an empty string: a path (or a list) left out, say by an
    unset shell variable, must not silently mean the working directory or nothing at all."""
    for name in names:
        if getattr(command, name) == "":
            raise UsageError(f"{flag(name, type(command))} must not be empty")


def refuse_beyond_64_bits(command: Any, *exempt: str) -> None:
    """UsageError naming the first whole-number flag of 2**63 or more: torch computes with 64-bit integers (a
    --grad-accum of 10**20 overflowed at the first step), and no count a run uses comes near."""
    for f in dataclasses.fields(command):
        value = getattr(command, f.name)
        if f.name not in exempt and type(value) is int and abs(value) >= 2**63:
            raise UsageError(f"{flag(f.name, type(command))} must be below 2**63, got {value}")


def flag(name: str, command: type) -> str:
    """The command-line spelling of a field of a command's dataclass, as users see it in messages."""
    for f in dataclasses.fields(command):
        if f.name == name and f.metadata.get("positional"):
            return name.upper()  # as argparse's usage line shows it
        if f.name == name and f.metadata.get("flags"):
            return "/".join(f.metadata["flags"])
    return "--" + name.replace("_", "-")
