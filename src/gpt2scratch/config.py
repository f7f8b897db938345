"""Typed configuration: the model's shape (``GPTConfig``), its named presets, training's command (``TrainConfig``),
and what every command's dataclass is made with (``option``, ``flag``, the shared checks); the other commands'
dataclasses are in ``commands.py``.

Configuration flows one way: the CLI makes each command's flags from its dataclass, parses ``argv`` into it, and
hands it to the training or generation code. A command's dataclass validates itself once, when it is built. Each
field's ``metadata`` holds the text ``--help`` shows and, where the name does not give it, the flag's spelling.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UsageError


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 model. Defaults are the 124M model of the GPT-2 paper."""

    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    def num_params(self) -> int:
        """The parameters of a model of this shape (the tied head counted once), known before one is built."""
        C, biases = self.n_embd, 1 + self.bias  # a LayerNorm has a gain, and a bias where Linears have them
        block = 12 * C * C + (9 * C if self.bias else 0) + 2 * biases * C  # attention, MLP, two LayerNorms
        return (self.vocab_size + self.block_size) * C + self.n_layer * block + biases * C

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {', '.join(unknown)}")
        return cls(**values)


PRESETS: dict[str, GPTConfig] = {
    # The four published GPT-2 sizes.
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # Small shapes that train in minutes on a laptop CPU.
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "mini": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128),
}


def preset(name: str) -> GPTConfig:
    """The named preset, or a ConfigError listing the known names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


MAX_SEED = 2**63 - 1 - 4096  # torch seeds are 64-bit; training adds the rank to the seed
TRAIN_DTYPES = ("auto", "float32", "bfloat16", "float16")
INFERENCE_DTYPES = (*TRAIN_DTYPES, "float64")  # float64: exact comparisons (tests), never fast
QUANTIZE = ("none", "int8")
QUANTIZE_HELP = "int8: weights stored in int8 (one scale per output channel), computed in --dtype; CPU only"


def option(help: str, *flags: str, **extra: Any) -> dict[str, Any]:
    """Field metadata for the CLI: the help text and, when not derived from the name, the flags. ``extra`` may hold
    ``choices``, ``group`` (one of the fields of a group is required, and only one), ``positional`` and, for a
    positional list, ``nargs``."""
    return {"help": help, "flags": flags, **extra}


@dataclass
class TrainConfig:
    """Everything a training run is told. Field names are the CLI flags (``batch_size`` -> ``--batch-size``)."""

    input: str | None = field(
        default=None,
        metadata=option(
            "a text file, a directory of .txt files or a glob; a .jsonl/.jsonl.gz/.parquet file; or a directory of "
            "token shards, train_*.bin and val_*.bin (default: input.txt)"
        ),
    )
    text_field: str = field(default="text", metadata=option("the field of a .jsonl/.parquet input that holds the text"))
    shuffle_shards: bool = field(
        default=False, metadata=option("read the shards of each epoch in an order drawn from --seed and the epoch")
    )
    data: str | None = field(
        default=None, metadata=option("train on a built-in corpus instead of --input: shakespeare", choices=None)
    )
    max_tokens: int | None = field(default=None, metadata=option("use only the first N tokens of the corpus"))
    out_dir: str = field(
        default=".",
        metadata=option(
            "where snapshots/, final_model.pt, metrics.jsonl and token_cache/ go (default: this directory)"
        ),
    )
    preset: str = field(default="gpt2", metadata=option("model shape: " + ", ".join(PRESETS)))
    n_layer: int | None = field(default=None, metadata=option("override the preset's number of layers"))
    n_head: int | None = field(default=None, metadata=option("override the preset's number of heads"))
    n_embd: int | None = field(default=None, metadata=option("override the preset's width"))
    block_size: int | None = field(default=None, metadata=option("override the preset's context length"))
    dropout: float = field(default=0.0, metadata=option("dropout probability"))
    batch_size: int = field(default=4, metadata=option("sequences per micro-batch (per process)", "-B", "--batch-size"))
    seq_len: int = field(default=32, metadata=option("tokens per sequence", "-T", "--seq-len"))
    grad_accum: int = field(default=1, metadata=option("micro-batches per optimizer step"))
    lr: float = field(default=3e-4, metadata=option("peak learning rate"))
    min_lr: float = field(default=0.0, metadata=option("final learning rate of the cosine schedule"))
    lr_schedule: str = field(default="constant", metadata=option("constant or cosine", choices=("constant", "cosine")))
    warmup_steps: int = field(default=0, metadata=option("linear warm-up steps"))
    weight_decay: float = field(default=0.01, metadata=option("AdamW weight decay, on matrices only"))
    grad_clip: float = field(default=0.0, metadata=option("clip the gradient norm to this (0: off)"))
    target_loss: float = field(default=0.099999, metadata=option("stop when a step's loss is at or below this"))
    max_steps: int | None = field(default=None, metadata=option("stop after this many steps (default: no limit)"))
    val_fraction: float = field(default=0.0, metadata=option("hold out this tail fraction of tokens for validation"))
    eval_interval: int = field(default=100, metadata=option("steps between validation losses"))
    eval_batches: int = field(default=20, metadata=option("batches per validation loss"))
    hellaswag: str | None = field(
        default=None, metadata=option("also score these multiple-choice questions (JSONL) every --eval-interval steps")
    )
    hellaswag_limit: int | None = field(default=None, metadata=option("score only the first N of --hellaswag"))
    snapshot_interval: int = field(default=10, metadata=option("steps between snapshots (0: none)"))
    keep_snapshots: int = field(default=3, metadata=option("keep the newest K snapshots (0: keep all)"))
    resume: str | None = field(default=None, metadata=option("continue from a snapshot or final model, or 'auto'"))
    allow_changed: str | None = field(
        default=None,
        metadata=option("resume although these differ from the checkpoint, comma-separated (e.g. lr,batch_size,input)"),
    )
    init_from: str | None = field(
        default=None, metadata=option("start from weights: gpt2[-medium|-large|-xl], a dir or a checkpoint")
    )
    device: str = field(default="auto", metadata=option("auto, cpu, cuda, cuda:N or mps"))
    dtype: str = field(default="auto", metadata=option("auto, float32, bfloat16 or float16", choices=TRAIN_DTYPES))
    compile: bool = field(default=False, metadata=option("torch.compile the model (costs ~20-30 s of warm-up)"))
    parallel: str = field(
        default="ddp",
        metadata=option(
            "under torchrun: ddp (every rank holds the whole model) or fsdp (weights, gradients and optimizer state "
            "sharded across ranks; snapshots become directories written by every rank)",
            choices=("ddp", "fsdp"),
        ),
    )
    activation_checkpointing: bool = field(
        default=False, metadata=option("recompute each block's activations in backward: less memory, more compute")
    )
    seed: int = field(default=1337, metadata=option("random seed for initialisation and dropout"))
    log_interval: int = field(default=1, metadata=option("steps between progress lines"))
    tensorboard: bool = field(
        default=False, metadata=option("also write the metrics as TensorBoard events to tensorboard/")
    )
    sample_prompt: str = field(
        default="Hello, I'm a language model,", metadata=option("prompt for the samples after training")
    )
    no_sample: bool = field(default=False, metadata=option("do not print samples after training"))
    no_plot: bool = field(default=False, metadata=option("do not draw loss.png when the run ends"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UsageError naming the first flag that is out of range."""
        positive = ("batch_size", "seq_len", "grad_accum", "eval_interval", "eval_batches", "log_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"{flag(name)} must be a positive integer, got {getattr(self, name)}")
        for name in ("max_tokens", "max_steps", "n_layer", "n_head", "n_embd", "block_size", "hellaswag_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{flag(name)} must be a positive integer, got {value}")
        for name in ("snapshot_interval", "keep_snapshots", "warmup_steps"):
            if getattr(self, name) < 0:
                raise UsageError(f"{flag(name)} must be zero or positive, got {getattr(self, name)}")
        if not (self.lr > 0 and self.lr < 10):
            raise UsageError(f"--lr must be in (0, 10), got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise UsageError(f"--min-lr must be in [0, --lr], got {self.min_lr}")
        for name in ("weight_decay", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:  # nan fails too
                raise UsageError(f"{flag(name)} must be zero or positive, got {getattr(self, name)}")
        if self.lr * self.weight_decay >= 1:  # AdamW scales the weights by 1 - lr x weight decay at every step
            raise UsageError(
                f"--weight-decay {self.weight_decay} with --lr {self.lr} would zero or flip every weight at each step "
                f"(AdamW scales them by 1 - lr x weight decay); keep it below {1 / self.lr:g} (typical: 0 to 0.1)"
            )
        if math.isnan(self.target_loss):
            raise UsageError(f"--target-loss must be a number, got {self.target_loss}")
        refuse_empty(self, "input", "hellaswag", "resume", "init_from", "allow_changed")
        if not self.text_field:
            raise UsageError("--text-field must not be empty; give the field that holds the text (default: text)")
        if not 0 <= self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed must be in [0, {MAX_SEED}], got {self.seed}")
        if not self.out_dir:
            raise UsageError("--out-dir must not be empty; give . for the current directory")
        if self.input is not None and self.data is not None:
            raise UsageError("give either --input or --data, not both")
        if self.dtype not in TRAIN_DTYPES:  # float64 is offered to inference only
            raise UsageError(f"--dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise UsageError(f"--parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UsageError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:  # now, not after tokenizing
            raise UsageError('--tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"')
        refuse_beyond_64_bits(self)
        model = self.model_config()
        if self.seq_len > model.block_size:
            raise UsageError(
                f"-T/--seq-len ({self.seq_len}) is larger than the model's block size ({model.block_size})"
            )

    def model_config(self) -> GPTConfig:
        """The preset with any --n-layer/--n-head/--n-embd/--block-size overrides applied."""
        base = preset(self.preset)
        overrides = {
            name: getattr(self, name)
            for name in ("n_layer", "n_head", "n_embd", "block_size")
            if getattr(self, name) is not None
        }
        return dataclasses.replace(base, dropout=self.dropout, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def flag(name: str, command: type = TrainConfig) -> str:
    """The command-line spelling of a field of a command's dataclass, as users see it in messages."""
    for f in dataclasses.fields(command):
        if f.name == name and f.metadata.get("positional"):
            return name.upper()  # as argparse's usage line shows it
        if f.name == name and f.metadata.get("flags"):
            return "/".join(f.metadata["flags"])
    return "--" + name.replace("_", "-")
