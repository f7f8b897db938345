"""Curves of runs: ``gpt2-scratch plot`` draws the ``metrics.jsonl`` of one run, or of several overlaid, as a PNG of
four panels (loss against steps and against tokens seen, learning rate, tokens/s), and a run leaves its own
``loss.png`` when it ends. matplotlib is an optional extra (``pip install -e ".[plot]"``), imported only here.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2scratch.config import PlotConfig
from gpt2scratch.config.commands import Console
from gpt2scratch.errors import DataError, UsageError
from gpt2scratch.files import replace_atomically
from gpt2scratch.training import rundir

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

SIZE, DPI = (12, 8), 100  # inches and dots per inch: a 1200 x 800 PNG


@dataclass
class Run:
    name: str  # the legend's label
    records: list[dict[str, Any]]


def read_run(run: str | Path) -> Run:
    """The records of a run's ``metrics.jsonl`` (``run`` is its out dir or the file), named after its directory;
    DataError if there are none. A torn line (a run killed mid-write) is skipped."""
    path = Path(run)
    metrics = path / rundir.METRICS_NAME if path.is_dir() else path
    if not metrics.is_file():
        raise DataError(f"{run} has no metrics: no {metrics}; give a run's --out-dir or its {rundir.METRICS_NAME}")
    records = []
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # a torn line, or one nested past json's recursion limit
            continue
        if isinstance(record, dict) and _is_number(record.get("step")):
            records.append(record)
    if not records:
        raise DataError(f"{run} has no metrics: {metrics} holds no step yet")
    return Run(metrics.resolve().parent.name, records)


def plot_runs(runs: Sequence[str | Path], output: Path) -> Figure:
    """Draw ``runs`` (out dirs or metrics.jsonl files) overlaid into the PNG ``output``, written atomically; return
    the figure. DataError for a run without metrics, UsageError without matplotlib, OutDirError if the write fails."""
    found = [read_run(run) for run in runs]
    if len({run.name for run in found}) < len(found):  # two runs/out dirs: the legend tells them apart by path
        for run, given in zip(found, runs, strict=True):
            run.name = str(given)
    fig = figure(found)
    save_png(fig, output)
    return fig


def figure(runs: list[Run]) -> Figure:
    """Four panels, one colour per run: loss (val loss as markers) against steps and against tokens seen, the
    learning rate, tokens/s."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError('plotting needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib)') from None
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")  # no pyplot: no global state; a PNG is drawn by Agg
    (by_step, by_tokens), (lr, speed) = fig.subplots(2, 2)
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"  # matplotlib's default cycle of ten colours
        _draw(by_step, run.records, "step", "loss", colour, run.name)
        _draw(by_step, run.records, "step", "val_loss", colour, f"{run.name} (val)", marker="o")
        _draw(by_tokens, run.records, "tokens", "loss", colour, run.name)
        _draw(by_tokens, run.records, "tokens", "val_loss", colour, f"{run.name} (val)", marker="o")
        _draw(lr, run.records, "step", "lr", colour, run.name)
        _draw(speed, run.records, "step", "tokens_per_sec", colour, run.name)
    panels = [
        (by_step, "loss", "step", "loss"),
        (by_tokens, "loss against tokens seen", "tokens seen", "loss"),
        (lr, "learning rate", "step", "learning rate"),
        (speed, "speed", "step", "tokens/s"),
    ]
    for ax, title, xlabel, ylabel in panels:
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "not in these metrics", ha="center", va="center", transform=ax.transAxes)
    if by_step.lines:  # records without a drawable loss: no legend (matplotlib warns on an empty one)
        by_step.legend()
    return fig


def _draw(ax: Axes, records: list[dict[str, Any]], x: str, y: str, colour: str, label: str, marker: str = "") -> None:
    """``y`` against ``x`` over the records that hold both (as a line, or as markers); nothing if none does."""
    points = [(r[x], r[y]) for r in records if _is_number(r.get(x)) and _is_number(r.get(y))]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker=marker, linestyle="none" if marker else "-", color=colour, label=label)


def _is_number(value: Any) -> bool:
    """Whether ``value`` can be drawn: an int or float of a size a metric can have (a torn or foreign record may
    hold anything; near 1e308 matplotlib's axes overflow)."""
    return type(value) in (int, float) and abs(value) < 1e18  # nan fails too


def save_png(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path``: under a temporary name, then renamed into place. DataError if matplotlib
    cannot draw the values (too large for its axes, say)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            try:
                fig.savefig(file, format="png")
            except (ValueError, OverflowError) as err:
                raise DataError(f"cannot draw {path}: {err} (are the metrics' values sane?)") from None
            file.flush()
            os.fsync(file.fileno())

    replace_atomically(path, 0, write)


def write_run_plot(out_dir: Path) -> None:
    """``OUT/loss.png`` from the run's metrics, if matplotlib is installed and a step was logged. Never raises: a
    picture that fails must not hide how the run itself ended, so a failure is a warning."""
    if importlib.util.find_spec("matplotlib") is None:
        return
    path = out_dir / rundir.PLOT_NAME
    try:
        save_png(figure([read_run(out_dir)]), path)
    except DataError:
        return  # stopped before its first step: nothing to draw
    except Exception as err:
        log.warning("could not draw %s: %s", path, err)


def run(cfg: PlotConfig, console: Console) -> None:
    """``gpt2-scratch plot``."""
    plot_runs(cfg.runs, Path(cfg.output))
    console.say(f"wrote {cfg.output}")
