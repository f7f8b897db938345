"""training/plot.py: ``gpt2-scratch plot`` and the ``loss.png`` a run leaves in its out dir."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, skip_without, temporaries

from gpt2scratch.config.commands import PlotConfig
from gpt2scratch.errors import DataError, UsageError
from gpt2scratch.training.plot import plot_runs, read_run, write_run_plot

needs_matplotlib = skip_without("matplotlib")

# matplotlib's first three default colours, C0 C1 C2, as RGB in [0, 1]
BLUE, ORANGE, GREEN = (np.array([r, g, b]) / 255 for r, g, b in [(31, 119, 180), (255, 127, 14), (44, 160, 44)])


def write_run(folder: Path, steps: int = 20, scale: float = 1.0, tokens: bool = True) -> Path:
    """An out dir whose metrics.jsonl holds ``steps`` records, a validation loss every 5th."""
    folder.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": scale * 10 / step, "lr": 1e-3 * step / steps, "tokens_per_sec": 1000.0 + step}
        record |= {"tokens": 64 * step} if tokens else {}
        record |= {"val_loss": scale * 11 / step} if step % 5 == 0 else {}
        lines.append(json.dumps(record) + "\n")
    (folder / "metrics.jsonl").write_text("".join(lines))
    return folder


def pixels_of(image: np.ndarray, colour: np.ndarray) -> int:
    return int((np.abs(image[..., :3] - colour) < 0.02).all(axis=-1).sum())


@needs_matplotlib
def test_several_runs_are_drawn_in_their_own_colours_and_named_in_the_legend(tmp_path: Path) -> None:
    from matplotlib.image import imread

    alpha, beta = write_run(tmp_path / "alpha"), write_run(tmp_path / "beta", scale=2.0)
    output = tmp_path / "compare.png"
    fig = plot_runs([alpha, beta / "metrics.jsonl"], output)  # an out dir or its metrics.jsonl
    by_step, by_tokens, lr, speed = fig.axes
    legend = [text.get_text() for text in by_step.get_legend().get_texts()]
    assert legend == ["alpha", "alpha (val)", "beta", "beta (val)"]
    train_line, val_markers = by_step.lines[:2]
    assert list(train_line.get_xdata()) == list(range(1, 21)) and list(val_markers.get_xdata()) == [5, 10, 15, 20]
    assert list(by_tokens.lines[0].get_xdata()) == [64 * step for step in range(1, 21)]
    assert [len(ax.lines) for ax in (by_step, by_tokens, lr, speed)] == [4, 4, 2, 2]
    image = imread(output)
    assert image.shape == (800, 1200, 4)  # 12 x 8 inches at 100 dpi
    assert pixels_of(image, BLUE) > 200 and pixels_of(image, ORANGE) > 200  # both runs are in the PNG
    assert pixels_of(image, GREEN) == 0  # a third run's colour is not: the count tells colours apart
    assert not temporaries(tmp_path)


@needs_matplotlib
def test_the_tokens_panel_draws_only_the_records_that_hold_tokens(tmp_path: Path) -> None:
    old = write_run(tmp_path / "old", tokens=False)  # metrics of a version that did not log tokens
    fig = plot_runs([old], tmp_path / "old.png")
    by_tokens = fig.axes[1]
    assert not by_tokens.lines
    assert [text.get_text() for text in by_tokens.texts] == ["not in these metrics"]
    assert len(fig.axes[0].lines) == 2  # the loss against steps is still drawn


def test_a_torn_line_is_skipped_and_a_run_without_records_has_no_metrics(tmp_path: Path) -> None:
    run = write_run(tmp_path / "killed", steps=3)
    with open(run / "metrics.jsonl", "a") as file:
        file.write('{"step": 4, "lo')  # killed mid-write
    assert [r["step"] for r in read_run(run).records] == [1, 2, 3]
    assert read_run(run).name == "killed"
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match=r"killed has no metrics: .*metrics\.jsonl holds no step yet"):
        read_run(run)


def test_plot_of_a_run_without_metrics_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("plot", "empty", "-o", "out.png", cwd=tmp_path)
    assert_one_line_error(result.returncode, result.stderr, 1, "empty has no metrics: no empty/metrics.jsonl")
    assert not (tmp_path / "out.png").exists()


@needs_matplotlib
def test_plot_through_the_cli_writes_the_png(tmp_path: Path) -> None:
    write_run(tmp_path / "a")
    write_run(tmp_path / "b")
    result = run_cli("plot", "a", "b", "-o", "both.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "wrote both.png\n"
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_output_must_be_a_png() -> None:
    with pytest.raises(UsageError, match=r"-o/--output must name a \.png file, got 'loss\.jpg'"):
        PlotConfig(runs=["run"], output="loss.jpg")


def test_plot_without_matplotlib_is_a_usage_error_naming_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    with pytest.raises(UsageError, match=r'^plotting needs matplotlib: pip install -e "\.\[plot\]" \(or pip install'):
        plot_runs([run], tmp_path / "loss.png")


def test_a_run_ends_without_loss_png_when_matplotlib_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec gives None, as when it is not installed
    with caplog.at_level(logging.DEBUG):
        write_run_plot(run)
    assert not (run / "loss.png").exists()
    assert not caplog.records  # silently


@needs_matplotlib
def test_a_failed_run_plot_is_a_warning_not_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = write_run(tmp_path / "run")
    (run / "loss.png").mkdir()  # the PNG cannot be renamed over a directory
    with caplog.at_level(logging.WARNING):
        write_run_plot(run)  # does not raise: the run's own result must come through
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert caplog.records[0].getMessage().startswith(f"could not draw {run / 'loss.png'}: could not write")
    assert not temporaries(run)


@needs_matplotlib
def test_a_run_that_logged_no_step_leaves_no_plot_and_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        write_run_plot(tmp_path)
    assert not (tmp_path / "loss.png").exists() and not caplog.records


@needs_matplotlib
def test_a_run_leaves_loss_png_in_its_out_dir(trained_snapshot: Path) -> None:
    from matplotlib.image import imread

    out = trained_snapshot.parent.parent
    image = imread(out / "loss.png")
    assert image.shape == (800, 1200, 4)
    assert pixels_of(image, BLUE) > 0  # its curves are drawn


@needs_matplotlib
def test_values_that_are_not_numbers_of_a_sane_size_are_not_drawn(tmp_path: Path) -> None:
    """The sweep: a record with text for step and loss was drawn (as categories) and the command said it wrote it;
    steps of 1e308 were an internal error of matplotlib's that left .p.png.tmp-PID behind."""
    lines = ['{"step": "a", "loss": "b"}', '{"step": 1, "loss": NaN}', '{"step": 2, "loss": 3.5, "lr": true}']
    lines += ['{"step": 1e308, "loss": 1e308}', '{"step": 3, "loss": -1e300}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert [r["step"] for r in read_run(tmp_path).records] == [1, 2, 3]
    by_step, _, lr, _ = plot_runs([tmp_path], tmp_path / "p.png").axes
    assert len(by_step.lines) == 1 and by_step.lines[0].get_xydata().tolist() == [[2.0, 3.5]]
    assert not lr.lines
    (tmp_path / "metrics.jsonl").write_text('{"step": "a", "loss": "b"}\n{"step": 1e308, "loss": 1}\n')
    result = run_cli("plot", "metrics.jsonl", "-o", "q.png", cwd=tmp_path)
    assert_one_line_error(result.returncode, result.stderr, 1, "holds no step yet")
    assert not (tmp_path / "q.png").exists() and not temporaries(tmp_path)


@needs_matplotlib
def test_a_run_without_a_drawable_loss_is_drawn_without_a_warning(tmp_path: Path) -> None:
    """The sweep: a run whose every loss was NaN (it diverged at once) made matplotlib warn on stderr about an
    empty legend."""
    import warnings

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": NaN, "lr": 0.001}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_step, _, lr, _ = plot_runs([tmp_path], tmp_path / "p.png").axes
    assert by_step.get_legend() is None and not by_step.lines and len(lr.lines) == 1
