"""The command line: ``gpt2-scratch`` (and ``python train.py``) parsed, dispatched and turned into exit codes."""

from gpt2scratch.cli.dispatch import main

__all__ = ["main"]
