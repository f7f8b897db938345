"""Flags from dataclasses: one flag per field of a command's dataclass, with its type, default and help, and the
dataclass filled back from the parsed flags. The only way flags are made, so a dataclass, its ``--help`` and its
validation never drift apart.

The parsed namespace holds only the flags given on the command line (every default is ``argparse.SUPPRESS``), so
that they can be laid over settings from a file; the dataclass fills in its own defaults for the rest."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


class Parser(argparse.ArgumentParser):
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
            target.add_argument(*flags, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        shown = "" if f.default is None or required else f" (default: {f.default})"
        optional_value = {"nargs": "?", "const": f.metadata["const"]} if "const" in f.metadata else {}
        target.add_argument(
            *flags, dest=f.name, type=kind, default=argparse.SUPPRESS, required=required,
            choices=f.metadata.get("choices"), help=help_text + shown, **optional_value,
        )  # fmt: skip


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, by field name."""
    return {name: value for name, value in vars(args).items() if name not in ("command", "debug")}


def from_args(command: Callable[..., T], args: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """The dataclass ``command`` filled from parsed flags, laid over ``base`` (settings from a file), over the
    dataclass's defaults; building it validates it (UsageError)."""
    hints = typing.get_type_hints(command)
    values: dict[str, Any] = dict(base or {})
    for f in dataclasses.fields(command):  # type: ignore[arg-type]
        kind = _field_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            values[f.name] = from_args(typing.cast(type, kind), args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return command(**values)
