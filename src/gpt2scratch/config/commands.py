"""One dataclass per command besides training (that one, ``TrainConfig``, is in ``config/train.py``): ``GenerateConfig``
with its ``SamplingConfig``, ``EvalConfig``, ``ExportConfig``, ``ConsolidateConfig``, ``PlotConfig``, ``ServeConfig``
and ``PrepareConfig``; ``ModelSource`` is the --checkpoint/--pretrained pair that generate, eval and serve share; and
``Console`` and ``Progress``, what a command's runner is given to show its results and how far it is.

Each validates itself once, when the CLI builds it from the parsed flags (``config/fields.py`` tells how fields
become flags).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Protocol

from gpt2scratch.config.fields import (
    GGUF_TYPES,
    INFERENCE_DTYPES,
    QUANTIZE,
    QUANTIZE_HELP,
    TRAIN_DTYPES,
    flag,
    option,
    refuse_beyond_64_bits,
    refuse_empty,
)
from gpt2scratch.errors import UsageError


class Progress(Protocol):
    """Told how far a long job is: ``done`` of ``total`` units (bytes, windows, questions), and a note to show."""

    def __call__(self, done: int, total: int, note: str = "", /) -> None: ...


class Bar(Progress, Protocol):
    def close(self) -> None:
        """End the bar's line, so that what is printed next starts on a line of its own."""


class Console(Protocol):
    """What a command's runner is given to talk to the person who ran it: the CLI decides how it is shown."""

    def say(self, text: str = "", end: str = "\n") -> None:
        """Show ``text`` (a result, a sample), followed by ``end``."""

    def progress(self, desc: str, unit: str = "B", least: int = 20_000_000) -> contextlib.AbstractContextManager[Bar]:
        """A progress bar for the work inside the ``with``, shown only if its total reaches ``least`` units."""


SEEDS = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (and negatives, which alias those)


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. ``max_length`` counts the prompt (as the original script did); ``max_new_tokens`` does not
    and wins when given. The defaults are the original's: 5 samples of 30 tokens, top-k 50, seed 42."""

    num_samples: int = field(default=5, metadata=option("how many samples"))
    max_length: int = field(default=30, metadata=option("tokens per sample, prompt included"))
    max_new_tokens: int | None = field(
        default=None, metadata=option("tokens to add after the prompt (overrides --max-length)")
    )
    top_k: int | None = field(default=50, metadata=option("sample from the k most likely tokens"))
    top_p: float | None = field(
        default=None, metadata=option("nucleus sampling: the smallest set reaching probability p")
    )
    temperature: float = field(default=1.0, metadata=option("0 is greedy"))
    seed: int = field(default=42, metadata=option("random seed"))
    stop_at_eot: bool = field(default=False, metadata=option("end a sample at <|endoftext|>"))

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
        refuse_beyond_64_bits(self, "seed")  # seeds are 64-bit unsigned, checked above


@dataclass(frozen=True)
class ModelSource:
    """The model a command loads: one of --checkpoint or --pretrained (argparse requires exactly one)."""

    checkpoint: str | None = field(
        default=None, metadata=option("a checkpoint written by train (final_model.pt or a snapshot)", group="source")
    )
    pretrained: str | None = field(
        default=None,
        metadata=option("gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a transformers directory", group="source"),
    )

    def __post_init__(self) -> None:
        refuse_empty(self, "checkpoint", "pretrained")

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
    prompt: str = field(default="Hello, I'm a language model,", metadata=option("text to continue"))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stream: bool = field(default=False, metadata=option("print tokens as they come (samples one after another)"))
    device: str = field(default="auto", metadata=option("auto, cpu, cuda, cuda:N or mps"))
    dtype: str = field(default="auto", metadata=option("compute dtype", choices=INFERENCE_DTYPES))
    quantize: str = field(default="none", metadata=option(QUANTIZE_HELP, choices=QUANTIZE))


@dataclass(frozen=True)
class EvalConfig:
    """``gpt2-scratch eval``: a model's perplexity on a text and/or its accuracy on multiple-choice questions."""

    model: ModelSource = field(default_factory=ModelSource)
    perplexity: str | None = field(
        default=None, metadata=option("a text file, a directory of .txt files or a glob to measure the perplexity of")
    )
    hellaswag: str | None = field(
        default=None,
        metadata=option("a JSONL of questions: HellaSwag's (ctx, endings, label) or generic (context, choices, label)"),
    )
    context: int | None = field(default=None, metadata=option("tokens per perplexity window (default: the block size)"))
    stride: int | None = field(default=None, metadata=option("tokens the window advances by (default: half of it)"))
    limit: int | None = field(default=None, metadata=option("score only the first N questions"))
    batch_size: int = field(default=8, metadata=option("windows or endings per forward pass"))
    output: str | None = field(default=None, metadata=option("also write the results to this JSON file"))
    device: str = field(default="auto", metadata=option("auto, cpu, cuda, cuda:N or mps"))
    dtype: str = field(default="auto", metadata=option("compute dtype", choices=TRAIN_DTYPES))

    def __post_init__(self) -> None:
        refuse_empty(self, "perplexity", "hellaswag", "output")
        if self.perplexity is None and self.hellaswag is None:
            raise UsageError("nothing to evaluate: give --perplexity FILE|DIR|GLOB and/or --hellaswag FILE.jsonl")
        for name in ("context", "stride", "limit", "batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        refuse_beyond_64_bits(self)


@dataclass(frozen=True)
class ExportConfig:
    """``gpt2-scratch export``: a checkpoint of ours written as a transformers model directory, or as a GGUF file
    for llama.cpp and the tools built on it."""

    checkpoint: str = field(metadata=option("a checkpoint written by train", positional=True))
    out_dir: str = field(
        metadata=option(
            "what to write: a directory (--format hf: config.json, model.safetensors, tokenizer files) or a .gguf "
            "file (--format gguf)",
            positional=True,
        )
    )
    format: str = field(
        default="hf",
        metadata=option("hf: a transformers directory; gguf: one file for llama.cpp/Ollama", choices=("hf", "gguf")),
    )
    outtype: str | None = field(
        default=None,
        metadata=option(
            "with --format gguf, the matrices' type: f32 (the default, the weights as trained), f16, bf16 or q8_0; "
            "vectors and norms stay f32, as llama.cpp's converter keeps them",
            choices=GGUF_TYPES,
        ),
    )
    force: bool = field(
        default=False,
        metadata=option(
            "replace OUT_DIR if it holds nothing but a model directory's files (they are deleted), or a .gguf file"
        ),
    )

    def __post_init__(self) -> None:
        refuse_empty(self, "checkpoint", "out_dir")
        if self.format not in ("hf", "gguf"):
            raise UsageError(f"--format must be hf or gguf, got {self.format!r}")
        if self.outtype is not None and self.format != "gguf":
            raise UsageError("--outtype applies to --format gguf; a transformers directory keeps the weights in fp32")
        if self.outtype is not None and self.outtype not in GGUF_TYPES:
            raise UsageError(f"--outtype must be one of {', '.join(GGUF_TYPES)}, got {self.outtype!r}")


@dataclass(frozen=True)
class ConsolidateConfig:
    """``gpt2-scratch consolidate``: a sharded snapshot (a directory written under --parallel fsdp) as one checkpoint
    file, which every command reads and training resumes from."""

    snapshot: str = field(metadata=option("a sharded snapshot: OUT/snapshots/snapshot_step_N/", positional=True))
    output: str = field(metadata=option("the checkpoint file to write, e.g. snapshot_step_N.pt", positional=True))
    force: bool = field(default=False, metadata=option("replace OUTPUT if it is a file already"))


@dataclass(frozen=True)
class PlotConfig:
    """``gpt2-scratch plot``: the metrics of one run, or of several overlaid, drawn as curves in a PNG."""

    runs: list[str] = field(
        metadata=option(
            "a run's out dir or its metrics.jsonl; give several to compare them", positional=True, nargs="+"
        )
    )
    output: str = field(default="loss.png", metadata=option("the PNG to write", "-o", "--output"))

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
        default="127.0.0.1", metadata=option("address to listen on (0.0.0.0: every interface; set an API key then)")
    )
    port: int = field(default=8000, metadata=option("TCP port (0: any free one, printed at start)"))
    device: str = field(default="auto", metadata=option("auto, cpu, cuda, cuda:N or mps"))
    dtype: str = field(default="auto", metadata=option("compute dtype", choices=INFERENCE_DTYPES))
    quantize: str = field(default="none", metadata=option(QUANTIZE_HELP, choices=QUANTIZE))
    max_batch: int = field(default=16, metadata=option("sequences decoded together (1: no batching)"))
    max_queue: int = field(
        default=256, metadata=option("sequences that may wait for a place in the batch; beyond, requests get 429")
    )
    api_key: str | None = field(
        default=None,
        metadata=option(f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, which ps cannot see)"),
    )
    shutdown_timeout: float = field(
        default=30.0, metadata=option("seconds that SIGTERM/Ctrl-C waits for requests in flight before cutting them")
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

    inputs: list[str] = field(metadata=option(DOCUMENT_INPUTS, positional=True, nargs="+"))
    out: str = field(metadata=option("the directory for the shards and manifest.json"))
    text_field: str = field(default="text", metadata=option("the JSON field or Parquet/Arrow column holding the text"))
    shard_tokens: int = field(default=100_000_000, metadata=option("tokens per shard"))
    val_tokens: int = field(default=0, metadata=option("the first N tokens go to val_000000.bin, the rest to train_*"))
    workers: int | None = field(
        default=None, metadata=option("threads or processes that tokenize (default: one per core)")
    )
    parallel: str = field(
        default="auto",
        metadata=option(
            "threads, processes, or auto: time both on the first 4 MB of text and keep the faster",
            choices=("auto", "threads", "processes"),
        ),
    )

    def __post_init__(self) -> None:
        for name, lowest in (("shard_tokens", 1), ("val_tokens", 0)):
            if not lowest <= getattr(self, name) <= MAX_SHARD_TOKENS:
                raise UsageError(
                    f"{flag(name, PrepareConfig)} must be in [{lowest}, {MAX_SHARD_TOKENS}], got {getattr(self, name)}"
                )
        if self.workers is not None and self.workers <= 0:
            raise UsageError(f"--workers must be a positive integer, got {self.workers}")
        if not self.text_field:
            raise UsageError("--text-field must not be empty; give the field that holds the text (default: text)")
        if not self.out:
            raise UsageError("--out must not be empty; give the directory for the shards")
