"""Settings from files: a TOML file of a command's fields (``--config``), the recipes shipped in ``recipes/``
(``--recipe``), and the TOML that writes a run's settings back out (``--print-plan``).

A file sets fields by their names (``adam_beta2 = 0.95``, the flag ``--adam-beta2``); the CLI lays the flags given
on the command line over it, so a file is a run's defaults. Every mistake in a file is one line that names the file
and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

from gpt2scratch.config.fields import SWITCH
from gpt2scratch.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RECIPE_DIR = Path(__file__).with_name("recipes")
RECIPES = tuple(sorted(path.stem for path in RECIPE_DIR.glob("*.toml")))

MAX_FILE_BYTES = 1 << 20  # a file of settings is a few hundred bytes; a larger one is something else
# Fields a file does not set: which files to read, and what this invocation does with them.
NOT_IN_FILES = ("recipe", "config", "print_plan")


def recipe_path(name: str) -> Path:
    """The shipped file of recipe ``name``; UsageError listing the recipes for another name."""
    if name not in RECIPES:
        raise UsageError(f"--recipe: no recipe {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPE_DIR / f"{name}.toml"


def read_settings(path: Path, command: type, what: str | None = None) -> dict[str, Any]:
    """The fields a TOML file sets, checked against the dataclass ``command``: each key one of its fields, each value
    of the field's type (an int is taken for a float). UsageError naming ``what`` (default: the path) and the key."""
    what = what or str(path)
    if path.is_dir():
        raise UsageError(f"{what} is a directory, not a TOML file of settings")
    if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
        raise UsageError(f"{what} is not a regular file; give a TOML file of settings")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UsageError(f"{what} is {path.stat().st_size:,} bytes, not a file of settings (at most 1 MB)")
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is not a key
    except FileNotFoundError:
        raise UsageError(f"{what}: no such file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} is not TOML: it is not UTF-8 text") from None
    except OSError as err:
        raise UsageError(f"{what} cannot be read: {err.strerror or err}") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{what} is not TOML: {str(err).splitlines()[0]}") from None
    except RecursionError:  # tomllib parses nested arrays and tables by recursion
        raise UsageError(f"{what} is not a file of settings: its values are nested too deeply") from None
    return check_settings(table, command, what)


def check_settings(table: dict[str, Any], command: type, what: str) -> dict[str, Any]:
    """``table`` (key -> value) as field values of ``command``; UsageError naming the first bad key."""
    hints = typing.get_type_hints(command)
    fields = {f.name: f for f in dataclasses.fields(command)}
    names = [name for name in fields if name not in NOT_IN_FILES]
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in names:
            if key in NOT_IN_FILES:
                raise UsageError(f"{what}: {key} cannot be set in a file; give --{key.replace('_', '-')} instead")
            close = difflib.get_close_matches(key.replace("-", "_"), names, n=1)
            hint = f"; did you mean {close[0]}?" if close else " (keys are the flags' names, with underscores)"
            raise UsageError(f"{what}: unknown setting {key!r}{hint}")
        if fields[key].metadata.get("choices") == SWITCH:  # compile = true: a switch's on or off
            if type(value) not in (bool, str):
                raise UsageError(f'{what}: {key} must be "auto", "on" or "off" (or true or false), got {value!r}')
            value = ("on" if value else "off") if type(value) is bool else value
        values[key] = _typed(value, _scalar(hints[key]), f"{what}: {key}")
    return values


def _scalar(hint: Any) -> type:
    """``int | None`` -> int: the type a field holds when it is set."""
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.cast(type, hint)


def _typed(value: Any, kind: type, where: str) -> Any:
    """``value`` as a ``kind``, or UsageError: TOML's types already match Python's, so only ints widen to floats."""
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string in quotes"}
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        shown = "a table" if isinstance(value, dict) else "a list" if isinstance(value, list) else repr(value)
        raise UsageError(f"{where} must be {names.get(kind, kind.__name__)}, got {shown}")
    return value


def to_toml(values: dict[str, Any], header: str = "") -> str:
    """``values`` (scalars) as TOML that ``read_settings`` reads back to the same values; None (unset) is left out,
    as TOML has no null."""
    lines = [f"# {line}" for line in header.splitlines()]
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, float):
            shown = repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else f"{value:+}")
        elif isinstance(value, int):
            shown = str(value)
        else:
            shown = json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML's basic string
        lines.append(f"{key} = {shown}")
    return "\n".join(lines) + "\n"
