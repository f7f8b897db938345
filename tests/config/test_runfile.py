"""Settings from files: a TOML file (``--config``) under the flags given, the shipped recipes (``--recipe``), the TOML
that --print-plan writes back, and a one-line error for every kind of bad file."""

from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_main

from gpt2scratch.cli.dispatch import build_parser, command_config
from gpt2scratch.config import TrainConfig
from gpt2scratch.config.runfile import NOT_IN_FILES, RECIPES, read_settings, to_toml, tomllib
from gpt2scratch.errors import UsageError

README = Path(__file__).resolve().parents[2] / "README.md"


def train_config(*argv: str) -> TrainConfig:
    """The TrainConfig that ``gpt2-scratch train ARGV`` runs with."""
    _, cfg = command_config(build_parser().parse_args(["train", *argv]))
    return cfg


def test_a_file_sets_fields_by_name_and_flags_given_override_it(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('adam_beta2 = 0.95\nlr = 1e-3\nbatch_size = 8\nlr_schedule = "wsd"\nmax_steps = 100\n')
    cfg = train_config("--config", str(path), "--lr", "2e-3", "-B", "4")
    assert (cfg.adam_beta2, cfg.lr_schedule, cfg.max_steps) == (0.95, "wsd", 100)  # from the file
    assert (cfg.lr, cfg.batch_size) == (2e-3, 4)  # the flags win
    assert cfg.adam_beta1 == TrainConfig.adam_beta1 and cfg.seq_len == TrainConfig.seq_len  # neither: the defaults
    assert cfg.config == str(path)


def test_an_int_is_taken_for_a_float_and_a_file_may_say_false(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_bytes("\ufeffweight_decay = 0\ncompile = false\nmin_lr = 0\n".encode())  # with a byte-order mark
    cfg = train_config("--config", str(path), "--compile")
    assert cfg.weight_decay == 0.0 and type(cfg.weight_decay) is float and cfg.compile == "on"


def test_the_config_file_overrides_the_recipe(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("max_steps = 50\n")
    cfg = train_config("--recipe", "gpt2-124m", "--config", str(path), "-B", "16")
    assert (cfg.max_steps, cfg.batch_size, cfg.adam_beta2, cfg.batch_tokens) == (50, 16, 0.95, 524288)
    assert cfg.recipe == "gpt2-124m"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("adam_beta3 = 0.9\n", ["run.toml: unknown setting 'adam_beta3'; did you mean adam_beta2?"]),
        ("adam-beta2 = 0.9\n", ["unknown setting 'adam-beta2'; did you mean adam_beta2?"]),
        ("zzz = 1\n", ["unknown setting 'zzz' (keys are the flags' names"]),
        ('lr = "fast"\n', ["run.toml: lr must be a number, got 'fast'"]),
        ("batch_size = 8.5\n", ["run.toml: batch_size must be a whole number, got 8.5"]),
        ("no_plot = 1\n", ["run.toml: no_plot must be true or false, got 1"]),
        ("compile = 1\n", ['run.toml: compile must be "auto", "on" or "off" (or true or false), got 1']),
        ('compile = "yes"\n', ["--compile must be auto, on or off, got 'yes'"]),
        ("input = 3\n", ["run.toml: input must be a string in quotes, got 3"]),
        ("max_steps = [1, 2]\n", ["max_steps must be a whole number, got a list"]),
        ("[train]\nlr = 1e-3\n", ["unknown setting 'train'"]),
        ('recipe = "gpt2-124m"\n', ["run.toml: recipe cannot be set in a file; give --recipe instead"]),
        ("lr = \n", ["run.toml is not TOML: "]),
        ("lr = 1e-3\nlr = 2e-3\n", ["run.toml is not TOML: "]),
        ("adam_beta2 = 1.5\n", ["--adam-beta2 must be in [0, 1), got 1.5"]),  # the dataclass's own checks
    ],
)
def test_a_bad_file_is_one_line_naming_the_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    (tmp_path / "run.toml").write_text(text)
    code, _, err = run_main("train", "--config", "run.toml", "--print-plan", cwd=tmp_path)
    assert_one_line_error(code, err, 2, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml"]


def test_missing_binary_and_directory_files_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00lr")
    (tmp_path / "folder").mkdir()
    for name, fragment in (
        ("missing.toml", "missing.toml: no such file"),
        ("binary.toml", "binary.toml is not TOML: it is not UTF-8 text"),
        ("folder", "folder is a directory, not a TOML file of settings"),
    ):
        code, _, err = run_main("train", "--config", name, "--print-plan", cwd=tmp_path)
        assert_one_line_error(code, err, 2, fragment)
    for name in ("--config", "--recipe"):
        code, _, err = run_main("train", name, "", "--print-plan", cwd=tmp_path)
        assert_one_line_error(code, err, 2, f"{name} must not be empty")
    code, _, err = run_main("train", "--recipe", "gpt3", "--print-plan", cwd=tmp_path)
    assert_one_line_error(code, err, 2, "--recipe: no recipe 'gpt3'; choose from gpt2-124m, gpt2-1558m")


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_is_a_valid_run(name: str) -> None:
    cfg = train_config("--recipe", name)
    assert cfg.recipe == name and (cfg.input or cfg.data)
    assert cfg.for_world(1).grad_accum >= 1 and cfg.for_world(8).grad_accum >= 1  # one GPU or eight


def test_the_gpt2_recipes_are_llm_c_s_settings() -> None:
    small, xl = train_config("--recipe", "gpt2-124m"), train_config("--recipe", "gpt2-1558m")
    for cfg in (small, xl):
        assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay, cfg.grad_clip) == (
            0.9, 0.95, 1e-8, 0.1, 1.0,
        )  # fmt: skip
        assert (cfg.seq_len, cfg.lr_schedule, cfg.warmup_steps) == (1024, "cosine", 700)
    assert (small.preset, small.batch_tokens, small.lr, small.min_lr, small.max_steps) == (
        "gpt2", 524288, 6e-4, 0.0, 18865,
    )  # fmt: skip
    assert (xl.preset, xl.batch_tokens, xl.lr, xl.min_lr, xl.max_steps) == ("gpt2-xl", 1048576, 6e-4, 6e-5, 32000)
    assert small.for_world(8).grad_accum == 1 and small.for_world(1).grad_accum == 8  # 64 x 1024 x 8 = 2**19


def test_the_shakespeare_recipe_is_the_readme_s_first_run() -> None:
    block = README.read_text().split("## First run", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    command = shlex.split(block.replace("\\\n", " ").split("gpt2-scratch train", 1)[1])
    assert dataclasses.replace(
        train_config("--recipe", "shakespeare", "--out-dir", "runs/shakespeare"), recipe=None
    ) == (train_config(*command))


def test_print_plan_of_the_124m_recipe_prints_the_recipe_and_writes_nothing(tmp_path: Path) -> None:
    code, out, err = run_main("train", "--recipe", "gpt2-124m", "--print-plan", cwd=tmp_path)
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []  # no snapshots/, no lock, no token cache, no metrics
    plan = out.split("plan:", 1)[1]
    assert "tokens per step  524,288 = -B 64 x -T 1024 x 1 process x 8 micro-batches" in plan
    assert "AdamW betas 0.9/0.95, eps 1e-08, weight decay 0.1" in plan
    assert "steps            18,865" in plan and "9,890,693,120" in plan  # 18,865 x 524,288
    assert "time             unknown" in plan  # no GPU here
    settings = tomllib.loads(out.split("plan:", 1)[0])
    assert settings["adam_beta2"] == 0.95 and settings["batch_tokens"] == 524288


def test_print_plan_with_a_peak_gives_the_time_at_40_percent_mfu(tmp_path: Path) -> None:
    code, out, err = run_main("train", "--recipe", "gpt2-124m", "--print-plan", "--peak-flops", "1e15", cwd=tmp_path)
    assert code == 0, err
    flops_per_token = 6 * 123_653_376 + 12 * 12 * 768 * 1024  # N without the position embeddings
    assert f"{flops_per_token:.3e}" in out
    seconds = int(18865 * 524288 * flops_per_token / (0.4 * 1e15))
    assert f"time at 40% MFU  {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" in out


def test_the_printed_settings_repeat_the_run(tmp_path: Path) -> None:
    code, out, err = run_main("train", "--recipe", "gpt2-350m", "-B", "8", "--adam-eps", "1e-6", "--print-plan")
    assert code == 0, err
    (tmp_path / "run.toml").write_text(out.split("plan:", 1)[0])
    repeated = train_config("--config", str(tmp_path / "run.toml"))
    original = train_config("--recipe", "gpt2-350m", "-B", "8", "--adam-eps", "1e-6")
    assert dataclasses.replace(repeated, config=None) == dataclasses.replace(original, recipe=None)


def test_to_toml_reads_back_to_the_same_values(tmp_path: Path) -> None:
    odd = 'a "quote", a \\ backslash,\na newline, a tab\t, é, \u2028, \x7f, \x01 and 🎉'
    cfg = TrainConfig(sample_prompt=odd, lr=3e-4, adam_eps=1e-12, target_loss=-math.inf, max_steps=7)
    values = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IN_FILES}
    path = tmp_path / "run.toml"
    path.write_text(to_toml(values, "a header\nof two lines"), encoding="utf-8")
    read = read_settings(path, TrainConfig)
    assert read == {k: v for k, v in values.items() if v is not None}
    assert TrainConfig(**read) == cfg


def test_read_settings_names_what_it_reads() -> None:
    with pytest.raises(UsageError, match=r"^recipe x: no such file$"):
        read_settings(Path("/nonexistent/x.toml"), TrainConfig, "recipe x")


def test_files_that_are_not_settings_are_refused_without_reading_them_whole(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "fifo")  # opened, it would block until a writer came
    (tmp_path / "nested.toml").write_text("x = " + "[" * 100_000 + "]" * 100_000)
    (tmp_path / "huge.toml").write_text("# a comment\n" * 200_000)
    for name, fragment in (
        ("fifo", "fifo is not a regular file; give a TOML file of settings"),
        ("nested.toml", "nested.toml is not a file of settings: its values are nested too deeply"),
        ("huge.toml", "huge.toml is 2,400,000 bytes, not a file of settings (at most 1 MB)"),
        ("/dev/null", "/dev/null is not a regular file"),
    ):
        code, _, err = run_main("train", "--config", name, "--print-plan", cwd=tmp_path)
        assert_one_line_error(code, err, 2, fragment)


def test_a_checkpoint_without_settings_is_one_line(trained_snapshot: Path, tmp_path: Path) -> None:
    import torch

    state = torch.load(trained_snapshot, weights_only=True)
    torch.save({**state, "train_args": "not a dict"}, tmp_path / "odd.pt")
    code, _, err = run_main("train", "--config", "odd.pt", "--print-plan", cwd=tmp_path)
    assert_one_line_error(code, err, 1, "odd.pt holds no training settings (train_args) to repeat")
    torch.save({**state, "train_args": {"lr": "fast", "no_such_setting": 1}}, tmp_path / "typed.pt")
    code, _, err = run_main("train", "--config", "typed.pt", "--print-plan", cwd=tmp_path)
    assert_one_line_error(code, err, 2, "the settings of typed.pt: lr must be a number, got 'fast'")
    torch.save({"train_args": {"lr": 1.0}}, tmp_path / "foreign.pt")
    code, _, err = run_main("train", "--config", "foreign.pt", "--print-plan", cwd=tmp_path)
    assert_one_line_error(code, err, 1, "foreign.pt is not a gpt2-scratch checkpoint")
