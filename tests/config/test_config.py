"""Model shapes and presets, the parameter count of GPT-2 124M, and validation that names the bad key or flag."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gpt2scratch.cli.dispatch import build_parser
from gpt2scratch.cli.flags import from_args
from gpt2scratch.config import PRESETS, GPTConfig, TrainConfig, preset
from gpt2scratch.config.commands import (
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    ModelSource,
    PlotConfig,
    SamplingConfig,
)
from gpt2scratch.config.fields import flag
from gpt2scratch.errors import ConfigError, UsageError
from gpt2scratch.model import GPT

# The four published sizes: (n_layer, n_head, n_embd) and their parameter count, the tied head counted once.
PUBLISHED = {
    "gpt2": ((12, 12, 768), 124_439_808),
    "gpt2-medium": ((24, 16, 1024), 354_823_168),
    "gpt2-large": ((36, 20, 1280), 774_030_080),
    "gpt2-xl": ((48, 25, 1600), 1_557_611_200),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_presets(name: str) -> None:
    (n_layer, n_head, n_embd), _ = PUBLISHED[name]
    config = preset(name)
    assert (config.n_layer, config.n_head, config.n_embd) == (n_layer, n_head, n_embd)
    assert (config.block_size, config.vocab_size, config.bias, config.dropout) == (1024, 50257, True, 0.0)


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_parameter_counts(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = GPT(preset(name))
    expected = PUBLISHED[name][1]
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - 1024 * preset(name).n_embd


def test_default_config_is_gpt2_124m() -> None:
    assert GPTConfig() == PRESETS["gpt2"]
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert model.num_params() == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, so counted once


def test_small_presets_are_valid_and_smaller() -> None:
    for name in ("small", "mini", "tiny"):
        config = preset(name)
        assert config.n_embd % config.n_head == 0
        assert config.block_size <= 1024 and config.n_layer < 12


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="gpt2-xl") as info:
        preset("gpt5")
    assert "'gpt5'" in str(info.value)


def test_n_embd_must_be_divisible_by_n_head() -> None:
    with pytest.raises(ConfigError, match=r"n_embd \(100\) must be divisible by n_head \(12\)"):
        GPTConfig(n_embd=100, n_head=12)


@pytest.mark.parametrize("key", ["block_size", "vocab_size", "n_layer", "n_head", "n_embd"])
@pytest.mark.parametrize("value", [0, -1, 2.0, True, None])
def test_sizes_must_be_positive_integers(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"\b{key} must be a positive integer, got {value!r}"):
        GPTConfig(**{key: value})


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_range(dropout: float) -> None:
    with pytest.raises(ConfigError, match="dropout"):
        GPTConfig(dropout=dropout)


def test_config_errors_are_usage_errors() -> None:
    # The CLI maps UsageError to exit code 2; a bad model shape is a usage mistake.
    assert issubclass(ConfigError, UsageError)
    assert ConfigError.exit_code == 2


def test_dict_round_trip_and_unknown_keys() -> None:
    config = GPTConfig(n_layer=3, n_head=4, n_embd=96, block_size=64, vocab_size=1000, dropout=0.1, bias=False)
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="n_ctx, zzz"):
        GPTConfig.from_dict({**config.to_dict(), "zzz": 1, "n_ctx": 64})


def test_default_train_config_is_the_seed_contract() -> None:
    cfg = TrainConfig()  # building it validates it
    assert (cfg.batch_size, cfg.seq_len, cfg.lr, cfg.target_loss) == (4, 32, 3e-4, 0.099999)
    assert (cfg.snapshot_interval, cfg.seed, cfg.preset) == (10, 1337, "gpt2")
    assert SamplingConfig() == SamplingConfig(num_samples=5, max_length=30, top_k=50, seed=42)
    TrainConfig(preset="tiny", seq_len=128, max_steps=1, val_fraction=0.5, grad_clip=1.0, lr_schedule="cosine")


def test_train_config_overrides_the_preset() -> None:
    cfg = TrainConfig(preset="tiny", n_layer=3, n_embd=48, n_head=3, block_size=32, dropout=0.2)
    assert cfg.model_config() == GPTConfig(n_layer=3, n_head=3, n_embd=48, block_size=32, dropout=0.2)
    assert TrainConfig(preset="mini").model_config() == PRESETS["mini"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seq_len": 129, "preset": "tiny"}, r"-T/--seq-len \(129\) is larger than the model's block size \(128\)"),
        ({"seq_len": 65, "preset": "tiny", "block_size": 64}, r"-T/--seq-len \(65\).*block size \(64\)"),
        ({"seq_len": 0}, "-T/--seq-len must be a positive integer, got 0"),
        ({"batch_size": 0}, "-B/--batch-size must be a positive integer, got 0"),
        ({"grad_accum": -2}, "--grad-accum must be a positive integer"),
        ({"eval_interval": 0}, "--eval-interval must be a positive integer"),
        ({"eval_batches": -1}, "--eval-batches must be a positive integer"),
        ({"log_interval": 0}, "--log-interval must be a positive integer"),
        ({"max_steps": 0}, "--max-steps must be a positive integer"),
        ({"max_tokens": -5}, "--max-tokens must be a positive integer"),
        ({"n_layer": 0}, "--n-layer must be a positive integer"),
        ({"n_head": -1}, "--n-head must be a positive integer"),
        ({"block_size": 0}, "--block-size must be a positive integer"),
        ({"snapshot_interval": -1}, "--snapshot-interval must be zero or positive, got -1"),
        ({"keep_snapshots": -3}, "--keep-snapshots must be zero or positive"),
        ({"warmup_steps": -10}, "--warmup-steps must be zero or positive"),
        ({"lr": 0.0}, r"--lr must be in \(0, 10\), got 0.0"),
        ({"lr": -3e-4}, "--lr must be in"),
        ({"lr": float("nan")}, "--lr must be in"),
        ({"lr": float("inf")}, "--lr must be in"),
        ({"min_lr": 1e-3, "lr": 1e-4}, r"--min-lr must be in \[0, --lr\]"),
        ({"min_lr": -1e-5}, "--min-lr"),
        ({"weight_decay": -0.1}, "--weight-decay must be zero or positive"),
        ({"grad_clip": -1.0}, "--grad-clip must be zero or positive"),
        ({"grad_clip": float("nan")}, "--grad-clip must be zero or positive, got nan"),
        ({"weight_decay": float("inf")}, "--weight-decay must be zero or positive, got inf"),
        ({"target_loss": float("nan")}, "--target-loss must be a number"),
        ({"input": ""}, "--input must not be empty"),
        ({"hellaswag": ""}, "--hellaswag must not be empty"),  # the sweep: it was silently ignored
        ({"resume": ""}, "--resume must not be empty"),
        ({"init_from": ""}, "--init-from must not be empty"),
        ({"weight_decay": 1e30}, r"--weight-decay 1e\+30 with --lr 0\.0003 would zero or flip every weight"),
        ({"grad_accum": 10**20}, r"--grad-accum must be below 2\*\*63, got 10{20}"),  # the sweep: an OverflowError
        ({"max_steps": 2**63}, r"--max-steps must be below 2\*\*63"),
        ({"weight_decay": 5000.0}, r"keep it below 3333\.33"),  # the sweep: 1e30 failed only at step 2, as NaN
        ({"val_fraction": 1.0}, r"--val-fraction must be in \[0, 1\)"),
        ({"val_fraction": -0.1}, "--val-fraction"),
        ({"input": "a.txt", "data": "shakespeare"}, "either --input or --data"),
        ({"lr_schedule": "step"}, "--lr-schedule must be one of constant, cosine, linear, wsd"),
        ({"lr_schedule": "wsd"}, "--lr-schedule wsd decays over the run: give --max-steps"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"preset": "tiny", "n_head": 3}, r"n_embd \(64\) must be divisible by n_head \(3\)"),
    ],
)
def test_train_config_rejects_out_of_range_flags(overrides: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        TrainConfig(**overrides)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (lambda: ModelSource(checkpoint=""), "--checkpoint must not be empty"),  # the sweep: an internal assert
        (lambda: ModelSource(pretrained=""), "--pretrained must not be empty"),
        (lambda: EvalConfig(ModelSource(pretrained="gpt2"), hellaswag=""), "--hellaswag must not be empty"),
        (lambda: EvalConfig(ModelSource(pretrained="gpt2"), perplexity=""), "--perplexity must not be empty"),
        (lambda: ExportConfig("", "hf"), "CHECKPOINT must not be empty"),
        (lambda: ExportConfig("final_model.pt", ""), "OUT_DIR must not be empty"),  # "" was the working directory
        (lambda: PlotConfig([""]), "a run to plot must not be empty"),
    ],
    ids=["checkpoint", "pretrained", "hellaswag", "perplexity", "export-checkpoint", "export-out-dir", "plot"],
)
def test_an_empty_path_is_refused_by_every_command(command, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        command()


@pytest.mark.parametrize("config", [*PRESETS.values(), GPTConfig(n_layer=3, n_head=2, n_embd=16, bias=False)])
def test_parameter_count_from_the_config_is_the_model_s(config: GPTConfig) -> None:
    """The count that memory checks use before any model is built."""
    with torch.device("meta"):
        model = GPT(config)
    assert config.num_params() == model.num_params()


def test_flag_spelling() -> None:
    assert flag("batch_size", TrainConfig) == "-B/--batch-size"
    assert flag("seq_len", TrainConfig) == "-T/--seq-len"
    assert flag("warmup_steps", TrainConfig) == "--warmup-steps"


# ---- flags made from the dataclasses ----


def test_train_flags_come_from_train_config() -> None:
    args = build_parser().parse_args(["train", "-B", "8", "--lr", "1e-3", "--compile", "--max-steps", "7"])
    cfg = from_args(TrainConfig, args)
    assert cfg == TrainConfig(batch_size=8, lr=1e-3, compile=True, max_steps=7)
    defaults = from_args(TrainConfig, build_parser().parse_args(["train"]))
    assert defaults == TrainConfig()


def test_generate_flags_come_from_the_sampling_config() -> None:
    argv = ["generate", "--pretrained", "gpt2", "--top-k", "5", "--temperature", "0.5", "--stop-at-eot", "--stream"]
    cfg = from_args(GenerateConfig, build_parser().parse_args(argv))
    assert cfg.sampling == SamplingConfig(top_k=5, temperature=0.5, stop_at_eot=True)
    assert (cfg.model.name, cfg.stream, cfg.prompt) == ("gpt2", True, GenerateConfig.prompt)
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()  # type: ignore[union-attr]
    for field in dataclasses.fields(SamplingConfig):
        assert flag(field.name, SamplingConfig) in help_text, field.name


@pytest.mark.parametrize(
    "argv",
    [["generate"], ["generate", "--checkpoint", "a.pt", "--pretrained", "gpt2"]],
)
def test_generate_needs_exactly_one_model_source(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num_samples": 0}, "--num-samples must be positive"),
        ({"top_k": 0}, "--top-k must be a positive integer"),
        ({"top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
        ({"temperature": -1.0}, "--temperature must be zero"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be positive"),
        # issue 16: nan printed garbage, inf sampled only ids 0-49, a huge seed was an internal error
        ({"temperature": float("nan")}, "--temperature must be zero .* finite"),
        ({"temperature": float("inf")}, "--temperature must be zero .* finite"),
        ({"seed": -1}, r"--seed must be in \[0, 2\*\*64 - 1\]"),
        ({"seed": 2**64}, r"--seed must be in \[0, 2\*\*64 - 1\]"),
        ({"seed": 99999999999999999999999}, "--seed"),
    ],
)
def test_sampling_config_rejects_out_of_range_values(values: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        SamplingConfig(**values)


def test_seed_range_is_torchs() -> None:
    """Both ends of the accepted range seed a generator; one past the end is what torch itself refuses."""
    for seed in (0, 2**64 - 1):
        assert torch.Generator().manual_seed(SamplingConfig(seed=seed).seed).initial_seed() == seed
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(2**64)
