"""Typed configuration: the model's shape (``GPTConfig``), its named presets, and one dataclass per command
(``TrainConfig``, ``GenerateConfig`` with its ``SamplingConfig``, ``EvalConfig``, ``ExportConfig``, ``PlotConfig``,
``ServeConfig``, ``PrepareConfig``, ``ConsolidateConfig``; ``ModelSource`` is the --checkpoint/--pretrained pair that
generate, eval and serve share).

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


def _opt(help: str, *flags: str, **extra: Any) -> dict[str, Any]:
    """Field metadata for the CLI: the help text and, when not derived from the name, the flags. ``extra`` may hold
    ``choices``, ``group`` (one of the fields of a group is required, and only one), ``positional`` and, for a
    positional list, ``nargs``."""
    return {"help": help, "flags": flags, **extra}


@dataclass
class TrainConfig:
    """Everything a training run is told. Field names are the CLI flags (``batch_size`` -> ``--batch-size``)."""

    input: str | None = field(
        default=None,
        metadata=_opt(
            "a text file, a directory of .txt files or a glob; a .jsonl/.jsonl.gz/.parquet file; or a directory of "
            "token shards, train_*.bin and val_*.bin (default: input.txt)"
        ),
    )
    text_field: str = field(default="text", metadata=_opt("the field of a .jsonl/.parquet input that holds the text"))
    shuffle_shards: bool = field(
        default=False, metadata=_opt("read the shards of each epoch in an order drawn from --seed and the epoch")
    )
    data: str | None = field(
        default=None, metadata=_opt("train on a built-in corpus instead of --input: shakespeare", choices=None)
    )
    max_tokens: int | None = field(default=None, metadata=_opt("use only the first N tokens of the corpus"))
    out_dir: str = field(
        default=".",
        metadata=_opt("where snapshots/, final_model.pt, metrics.jsonl and token_cache/ go (default: this directory)"),
    )
    preset: str = field(default="gpt2", metadata=_opt("model shape: " + ", ".join(PRESETS)))
    n_layer: int | None = field(default=None, metadata=_opt("override the preset's number of layers"))
    n_head: int | None = field(default=None, metadata=_opt("override the preset's number of heads"))
    n_embd: int | None = field(default=None, metadata=_opt("override the preset's width"))
    block_size: int | None = field(default=None, metadata=_opt("override the preset's context length"))
    dropout: float = field(default=0.0, metadata=_opt("dropout probability"))
    batch_size: int = field(default=4, metadata=_opt("sequences per micro-batch (per process)", "-B", "--batch-size"))
    seq_len: int = field(default=32, metadata=_opt("tokens per sequence", "-T", "--seq-len"))
    grad_accum: int = field(default=1, metadata=_opt("micro-batches per optimizer step"))
    lr: float = field(default=3e-4, metadata=_opt("peak learning rate"))
    min_lr: float = field(default=0.0, metadata=_opt("final learning rate of the cosine schedule"))
    lr_schedule: str = field(default="constant", metadata=_opt("constant or cosine", choices=("constant", "cosine")))
    warmup_steps: int = field(default=0, metadata=_opt("linear warm-up steps"))
    weight_decay: float = field(default=0.01, metadata=_opt("AdamW weight decay, on matrices only"))
    grad_clip: float = field(default=0.0, metadata=_opt("clip the gradient norm to this (0: off)"))
    target_loss: float = field(default=0.099999, metadata=_opt("stop when a step's loss is at or below this"))
    max_steps: int | None = field(default=None, metadata=_opt("stop after this many steps (default: no limit)"))
    val_fraction: float = field(default=0.0, metadata=_opt("hold out this tail fraction of tokens for validation"))
    eval_interval: int = field(default=100, metadata=_opt("steps between validation losses"))
    eval_batches: int = field(default=20, metadata=_opt("batches per validation loss"))
    hellaswag: str | None = field(
        default=None, metadata=_opt("also score these multiple-choice questions (JSONL) every --eval-interval steps")
    )
    hellaswag_limit: int | None = field(default=None, metadata=_opt("score only the first N of --hellaswag"))
    snapshot_interval: int = field(default=10, metadata=_opt("steps between snapshots (0: none)"))
    keep_snapshots: int = field(default=3, metadata=_opt("keep the newest K snapshots (0: keep all)"))
    resume: str | None = field(default=None, metadata=_opt("continue from a snapshot or final model, or 'auto'"))
    allow_changed: str | None = field(
        default=None,
        metadata=_opt("resume although these differ from the checkpoint, comma-separated (e.g. lr,batch_size,input)"),
    )
    init_from: str | None = field(
        default=None, metadata=_opt("start from weights: gpt2[-medium|-large|-xl], a dir or a checkpoint")
    )
    device: str = field(default="auto", metadata=_opt("auto, cpu, cuda, cuda:N or mps"))
    dtype: str = field(default="auto", metadata=_opt("auto, float32, bfloat16 or float16", choices=TRAIN_DTYPES))
    compile: bool = field(default=False, metadata=_opt("torch.compile the model (costs ~20-30 s of warm-up)"))
    parallel: str = field(
        default="ddp",
        metadata=_opt(
            "under torchrun: ddp (every rank holds the whole model) or fsdp (weights, gradients and optimizer state "
            "sharded across ranks; snapshots become directories written by every rank)",
            choices=("ddp", "fsdp"),
        ),
    )
    activation_checkpointing: bool = field(
        default=False, metadata=_opt("recompute each block's activations in backward: less memory, more compute")
    )
    seed: int = field(default=1337, metadata=_opt("random seed for initialisation and dropout"))
    log_interval: int = field(default=1, metadata=_opt("steps between progress lines"))
    tensorboard: bool = field(
        default=False, metadata=_opt("also write the metrics as TensorBoard events to tensorboard/")
    )
    sample_prompt: str = field(
        default="Hello, I'm a language model,", metadata=_opt("prompt for the samples after training")
    )
    no_sample: bool = field(default=False, metadata=_opt("do not print samples after training"))
    no_plot: bool = field(default=False, metadata=_opt("do not draw loss.png when the run ends"))

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
        _refuse_empty(self, "input", "hellaswag", "resume", "init_from", "allow_changed")
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
        _refuse_beyond_64_bits(self)
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


def _refuse_empty(command: Any, *names: str) -> None:
    """UsageError naming the first of these flags given as an empty string: a path (or a list) left out, say by an
    unset shell variable, must not silently mean the working directory or nothing at all."""
    for name in names:
        if getattr(command, name) == "":
            raise UsageError(f"{flag(name, type(command))} must not be empty")


def _refuse_beyond_64_bits(command: Any, *exempt: str) -> None:
    """UsageError naming the first whole-number flag of 2**63 or more: torch computes with 64-bit integers (a
    --grad-accum of 10**20 overflowed at the first step), and no count a run uses comes near."""
    for f in dataclasses.fields(command):
        value = getattr(command, f.name)
        if f.name not in exempt and type(value) is int and abs(value) >= 2**63:
            raise UsageError(f"{flag(f.name, type(command))} must be below 2**63, got {value}")


SEEDS = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (and negatives, which alias those)


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. ``max_length`` counts the prompt (as the original script did); ``max_new_tokens`` does not
    and wins when given. The defaults are the original's: 5 samples of 30 tokens, top-k 50, seed 42."""

    num_samples: int = field(default=5, metadata=_opt("how many samples"))
    max_length: int = field(default=30, metadata=_opt("tokens per sample, prompt included"))
    max_new_tokens: int | None = field(
        default=None, metadata=_opt("tokens to add after the prompt (overrides --max-length)")
    )
    top_k: int | None = field(default=50, metadata=_opt("sample from the k most likely tokens"))
    top_p: float | None = field(
        default=None, metadata=_opt("nucleus sampling: the smallest set reaching probability p")
    )
    temperature: float = field(default=1.0, metadata=_opt("0 is greedy"))
    seed: int = field(default=42, metadata=_opt("random seed"))
    stop_at_eot: bool = field(default=False, metadata=_opt("end a sample at <|endoftext|>"))

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise UsageError(f"--num-samples must be positive, got {self.num_samples}")
        if self.top_k is not None and self.top_k <= 0:
            raise UsageError(f"--top-k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"--temperature must be zero (greedy) or a finite positive number, got {self.temperature}")
        if not 0 <= self.seed < SEEDS:
            raise UsageError(f"--seed must be in [0, 2**64 - 1] (torch's generator seeds), got {self.seed}")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise UsageError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        _refuse_beyond_64_bits(self, "seed")  # seeds are 64-bit unsigned, checked above


@dataclass(frozen=True)
class ModelSource:
    """The model a command loads: one of --checkpoint or --pretrained (argparse requires exactly one)."""

    checkpoint: str | None = field(
        default=None, metadata=_opt("a checkpoint written by train (final_model.pt or a snapshot)", group="source")
    )
    pretrained: str | None = field(
        default=None,
        metadata=_opt("gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a transformers directory", group="source"),
    )

    def __post_init__(self) -> None:
        _refuse_empty(self, "checkpoint", "pretrained")

    @property
    def name(self) -> str:
        """The checkpoint path, or the published name or transformers directory."""
        name = self.checkpoint if self.checkpoint is not None else self.pretrained
        assert name is not None, "argparse requires one of --checkpoint/--pretrained"
        return name


@dataclass(frozen=True)
class GenerateConfig:
    """``gpt2-scratch generate``: which model, which prompt, where to run it, and how to sample."""

    model: ModelSource = field(default_factory=ModelSource)
    prompt: str = field(default="Hello, I'm a language model,", metadata=_opt("text to continue"))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stream: bool = field(default=False, metadata=_opt("print tokens as they come (samples one after another)"))
    device: str = field(default="auto", metadata=_opt("auto, cpu, cuda, cuda:N or mps"))
    dtype: str = field(default="auto", metadata=_opt("compute dtype", choices=INFERENCE_DTYPES))
    quantize: str = field(default="none", metadata=_opt(QUANTIZE_HELP, choices=QUANTIZE))


@dataclass(frozen=True)
class EvalConfig:
    """``gpt2-scratch eval``: a model's perplexity on a text and/or its accuracy on multiple-choice questions."""

    model: ModelSource = field(default_factory=ModelSource)
    perplexity: str | None = field(
        default=None, metadata=_opt("a text file, a directory of .txt files or a glob to measure the perplexity of")
    )
    hellaswag: str | None = field(
        default=None,
        metadata=_opt("a JSONL of questions: HellaSwag's (ctx, endings, label) or generic (context, choices, label)"),
    )
    context: int | None = field(default=None, metadata=_opt("tokens per perplexity window (default: the block size)"))
    stride: int | None = field(default=None, metadata=_opt("tokens the window advances by (default: half of it)"))
    limit: int | None = field(default=None, metadata=_opt("score only the first N questions"))
    batch_size: int = field(default=8, metadata=_opt("windows or endings per forward pass"))
    output: str | None = field(default=None, metadata=_opt("also write the results to this JSON file"))
    device: str = field(default="auto", metadata=_opt("auto, cpu, cuda, cuda:N or mps"))
    dtype: str = field(default="auto", metadata=_opt("compute dtype", choices=TRAIN_DTYPES))

    def __post_init__(self) -> None:
        _refuse_empty(self, "perplexity", "hellaswag", "output")
        if self.perplexity is None and self.hellaswag is None:
            raise UsageError("nothing to evaluate: give --perplexity FILE|DIR|GLOB and/or --hellaswag FILE.jsonl")
        for name in ("context", "stride", "limit", "batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        _refuse_beyond_64_bits(self)


@dataclass(frozen=True)
class ExportConfig:
    """``gpt2-scratch export``: a checkpoint of ours written as a transformers model directory."""

    checkpoint: str = field(metadata=_opt("a checkpoint written by train", positional=True))
    out_dir: str = field(
        metadata=_opt("directory to write (config.json, model.safetensors, tokenizer files)", positional=True)
    )
    force: bool = field(
        default=False,
        metadata=_opt("replace OUT_DIR if it holds nothing but a model directory's files (they are deleted)"),
    )

    def __post_init__(self) -> None:
        _refuse_empty(self, "checkpoint", "out_dir")


@dataclass(frozen=True)
class ConsolidateConfig:
    """``gpt2-scratch consolidate``: a sharded snapshot (a directory written under --parallel fsdp) as one checkpoint
    file, which every command reads and training resumes from."""

    snapshot: str = field(metadata=_opt("a sharded snapshot: OUT/snapshots/snapshot_step_N/", positional=True))
    output: str = field(metadata=_opt("the checkpoint file to write, e.g. snapshot_step_N.pt", positional=True))
    force: bool = field(default=False, metadata=_opt("replace OUTPUT if it is a file already"))


@dataclass(frozen=True)
class PlotConfig:
    """``gpt2-scratch plot``: the metrics of one run, or of several overlaid, drawn as curves in a PNG."""

    runs: list[str] = field(
        metadata=_opt("a run's out dir or its metrics.jsonl; give several to compare them", positional=True, nargs="+")
    )
    output: str = field(default="loss.png", metadata=_opt("the PNG to write", "-o", "--output"))

    def __post_init__(self) -> None:
        if "" in self.runs:
            raise UsageError("a run to plot must not be empty; give its out dir or its metrics.jsonl")
        if not self.output.lower().endswith(".png"):
            raise UsageError(f"-o/--output must name a .png file, got {self.output!r}")


API_KEY_ENV = "GPT2SCRATCH_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """``gpt2-scratch serve``: a model behind an OpenAI-compatible HTTP API, requests decoded as one batch."""

    model: ModelSource = field(default_factory=ModelSource)
    host: str = field(
        default="127.0.0.1", metadata=_opt("address to listen on (0.0.0.0: every interface; set an API key then)")
    )
    port: int = field(default=8000, metadata=_opt("TCP port (0: any free one, printed at start)"))
    device: str = field(default="auto", metadata=_opt("auto, cpu, cuda, cuda:N or mps"))
    dtype: str = field(default="auto", metadata=_opt("compute dtype", choices=INFERENCE_DTYPES))
    quantize: str = field(default="none", metadata=_opt(QUANTIZE_HELP, choices=QUANTIZE))
    max_batch: int = field(default=16, metadata=_opt("sequences decoded together (1: no batching)"))
    max_queue: int = field(
        default=256, metadata=_opt("sequences that may wait for a place in the batch; beyond, requests get 429")
    )
    api_key: str | None = field(
        default=None,
        metadata=_opt(f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, which ps cannot see)"),
    )
    shutdown_timeout: float = field(
        default=30.0, metadata=_opt("seconds that SIGTERM/Ctrl-C waits for requests in flight before cutting them")
    )

    def __post_init__(self) -> None:
        if not self.host:
            raise UsageError("--host must not be empty; 127.0.0.1 serves this machine only")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in [0, 65535], got {self.port}")
        for name in ("max_batch", "max_queue"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if not (math.isfinite(self.shutdown_timeout) and self.shutdown_timeout >= 0):
            raise UsageError(f"--shutdown-timeout must be zero or a positive number, got {self.shutdown_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key must not be empty")


MAX_SHARD_TOKENS = 2**31 - 1  # a shard's header holds its token count as an int32
DOCUMENT_INPUTS = ".txt (a document each), .jsonl(.gz), .parquet, .arrow files, datasets.save_to_disk folders, or dirs"


@dataclass(frozen=True)
class PrepareConfig:
    """``gpt2-scratch prepare``: documents (text, JSON lines, Parquet, a datasets folder) tokenized into llm.c's token
    shards, which ``train --input DIR`` reads."""

    inputs: list[str] = field(metadata=_opt(DOCUMENT_INPUTS, positional=True, nargs="+"))
    out: str = field(metadata=_opt("the directory for the shards and manifest.json"))
    text_field: str = field(default="text", metadata=_opt("the JSON field or Parquet/Arrow column holding the text"))
    shard_tokens: int = field(default=100_000_000, metadata=_opt("tokens per shard"))
    val_tokens: int = field(default=0, metadata=_opt("the first N tokens go to val_000000.bin, the rest to train_*"))
    workers: int | None = field(
        default=None, metadata=_opt("threads or processes that tokenize (default: one per core)")
    )
    parallel: str = field(
        default="auto",
        metadata=_opt(
            "threads, processes, or auto: time both on the first 4 MB of text and keep the faster",
            choices=("auto", "threads", "processes"),
        ),
    )

    def __post_init__(self) -> None:
        for name, lowest in (("shard_tokens", 1), ("val_tokens", 0)):
            if not lowest <= getattr(self, name) <= MAX_SHARD_TOKENS:
                raise UsageError(f"{flag(name)} must be in [{lowest}, {MAX_SHARD_TOKENS}], got {getattr(self, name)}")
        if self.workers is not None and self.workers <= 0:
            raise UsageError(f"--workers must be a positive integer, got {self.workers}")
        if not self.text_field:
            raise UsageError("--text-field must not be empty; give the field that holds the text (default: text)")
        if not self.out:
            raise UsageError("--out must not be empty; give the directory for the shards")


def flag(name: str, command: type = TrainConfig) -> str:
    """The command-line spelling of a field of a command's dataclass, as users see it in messages."""
    for f in dataclasses.fields(command):
        if f.name == name and f.metadata.get("positional"):
            return name.upper()  # as argparse's usage line shows it
        if f.name == name and f.metadata.get("flags"):
            return "/".join(f.metadata["flags"])
    return "--" + name.replace("_", "-")
