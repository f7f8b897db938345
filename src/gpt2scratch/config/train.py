"""Training's command: ``TrainConfig``, everything a run is told (its fields are the flags of ``train``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

from gpt2scratch.config.fields import SWITCH, TRAIN_DTYPES, flag, option, refuse_beyond_64_bits, refuse_empty
from gpt2scratch.config.model import PRESETS, GPTConfig, preset
from gpt2scratch.config.runfile import RECIPES
from gpt2scratch.errors import UsageError

MAX_SEED = 2**63 - 1 - 4096  # torch seeds are 64-bit; training adds the rank to the seed
SCHEDULES = ("constant", "cosine", "linear", "wsd")


@dataclass
class TrainConfig:
    """Everything a training run is told. Field names are the CLI flags (``batch_size`` -> ``--batch-size``) and the
    keys of a ``--config`` file or a recipe (config/runfile.py)."""

    recipe: str | None = field(
        default=None,
        metadata=option(
            "start from a shipped recipe: " + ", ".join(RECIPES) + " (see README); --config and flags override it"
        ),
    )
    config: str | None = field(
        default=None,
        metadata=option(
            "a TOML file of training settings by field name (adam_beta2 = 0.95), or a snapshot whose settings to "
            "repeat; flags given here override it"
        ),
    )
    print_plan: bool = field(
        default=False, metadata=option("print the resolved settings and the plan (tokens, FLOPs, time), then exit")
    )
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
    batch_tokens: int | None = field(
        default=None,
        metadata=option(
            "tokens per optimizer step over all processes (e.g. 524288); --grad-accum then follows from -B, -T and "
            "the number of processes (a --grad-accum given beside it must agree, 1 aside)"
        ),
    )
    lr: float = field(default=3e-4, metadata=option("peak learning rate"))
    min_lr: float = field(default=0.0, metadata=option("final learning rate of a decaying schedule"))
    lr_schedule: str = field(
        default="constant",
        metadata=option(
            "constant; cosine or linear from --lr to --min-lr over --max-steps; wsd: --lr held, then linear to "
            "--min-lr over the last --decay-fraction of --max-steps (all after --warmup-steps)",
            choices=SCHEDULES,
        ),
    )
    decay_fraction: float = field(default=0.2, metadata=option("the share of --max-steps that wsd decays over"))
    warmup_steps: int = field(default=0, metadata=option("linear warm-up steps"))
    weight_decay: float = field(default=0.01, metadata=option("AdamW weight decay, on matrices only"))
    adam_beta1: float = field(default=0.9, metadata=option("AdamW beta1 (GPT-2 recipes: 0.9)"))
    adam_beta2: float = field(default=0.999, metadata=option("AdamW beta2 (GPT-2 recipes: 0.95)"))
    adam_eps: float = field(default=1e-8, metadata=option("AdamW epsilon"))
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
    defer_snapshots: str = field(
        default="auto",
        metadata=option(
            "when a snapshot falls due while the previous one is still being written, take it once that write ends "
            "instead of waiting for it: auto (on CUDA, where the GPU must not wait for the disk; off elsewhere, "
            "where snapshots stay at exact multiples of --snapshot-interval), on or off",
            choices=SWITCH,
        ),
    )
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
    peak_flops: float | None = field(
        default=None,
        metadata=option(
            "the device's peak FLOP/s in this dtype, for MFU (e.g. 989e12 for an H100's bf16); default: looked up "
            "by GPU name"
        ),
    )
    compile: str = field(
        default="auto",
        metadata=option(
            "torch.compile the model: auto (on for CUDA runs long enough to repay its ~30-60 s of warm-up, off on "
            "CPUs and MPS), on (also as a bare --compile) or off",
            choices=SWITCH,
            const="on",
        ),
    )
    pad_vocab: str = field(
        default="auto",
        metadata=option(
            "compute the output head over the vocabulary padded to a multiple of 64 (50,304 rows), which GPU "
            "matmuls prefer; the padded logits are never used and every file keeps 50,257: auto (on CUDA), on, off",
            choices=SWITCH,
        ),
    )
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
    wandb: bool = field(
        default=False,
        metadata=option(
            "also log the metrics to Weights & Biases (pip install wandb; WANDB_MODE=offline keeps them on this "
            "machine)"
        ),
    )
    wandb_project: str = field(default="gpt2-scratch", metadata=option("the W&B project of --wandb"))
    wandb_run_name: str | None = field(default=None, metadata=option("the W&B run's name (default: W&B's)"))
    sample_interval: int = field(
        default=0, metadata=option("steps between samples during training, printed and logged (0: only at the end)")
    )
    sample_prompt: str = field(
        default="Hello, I'm a language model,", metadata=option("prompt for the samples during and after training")
    )
    no_sample: bool = field(default=False, metadata=option("do not print samples after training"))
    no_plot: bool = field(default=False, metadata=option("do not draw loss.png when the run ends"))

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # the flag was a switch before auto: True/False in older train_args
            self.compile = "on" if self.compile else "off"
        self.validate()

    def validate(self) -> None:
        """Raise UsageError naming the first flag that is out of range."""
        positive = ("batch_size", "seq_len", "grad_accum", "eval_interval", "eval_batches", "log_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"{flag(name, TrainConfig)} must be a positive integer, got {getattr(self, name)}")
        for name in (
            "max_tokens", "max_steps", "n_layer", "n_head", "n_embd", "block_size", "hellaswag_limit", "batch_tokens"
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{flag(name, TrainConfig)} must be a positive integer, got {value}")
        for name in ("snapshot_interval", "keep_snapshots", "warmup_steps", "sample_interval"):
            if getattr(self, name) < 0:
                raise UsageError(f"{flag(name, TrainConfig)} must be zero or positive, got {getattr(self, name)}")
        if not (self.lr > 0 and self.lr < 10):
            raise UsageError(f"--lr must be in (0, 10), got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise UsageError(f"--min-lr must be in [0, --lr], got {self.min_lr}")
        for name in ("weight_decay", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:  # nan fails too
                raise UsageError(f"{flag(name, TrainConfig)} must be zero or positive, got {getattr(self, name)}")
        if self.lr * self.weight_decay >= 1:  # AdamW scales the weights by 1 - lr x weight decay at every step
            raise UsageError(
                f"--weight-decay {self.weight_decay} with --lr {self.lr} would zero or flip every weight at each step "
                f"(AdamW scales them by 1 - lr x weight decay); keep it below {1 / self.lr:g} (typical: 0 to 0.1)"
            )
        if math.isnan(self.target_loss):
            raise UsageError(f"--target-loss must be a number, got {self.target_loss}")
        refuse_empty(self, "input", "hellaswag", "resume", "init_from", "allow_changed", "config")
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
        self._validate_optimizer()
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:  # now, not after tokenizing
            raise UsageError('--tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"')
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise UsageError('--wandb needs the wandb package: pip install -e ".[wandb]"')
        if not self.wandb_project:
            raise UsageError("--wandb-project must not be empty")
        refuse_beyond_64_bits(self)
        model = self.model_config()
        if self.seq_len > model.block_size:
            raise UsageError(
                f"-T/--seq-len ({self.seq_len}) is larger than the model's block size ({model.block_size})"
            )
        if self.batch_tokens is not None:  # the part of the check that needs no number of processes, now
            unit = self.batch_size * self.seq_len * self.grad_accum
            _refuse_indivisible(self.batch_tokens, unit, "-B x -T" + (" x --grad-accum" if self.grad_accum > 1 else ""))

    def _validate_optimizer(self) -> None:
        """The schedule, AdamW's settings, the recipe's name and the peak FLOP/s."""
        if self.lr_schedule not in SCHEDULES:
            raise UsageError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.lr_schedule in ("linear", "wsd") and self.max_steps is None:
            raise UsageError(f"--lr-schedule {self.lr_schedule} decays over the run: give --max-steps")
        if not 0 < self.decay_fraction <= 1:
            raise UsageError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UsageError(f"{flag(name, TrainConfig)} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.adam_eps < math.inf:
            raise UsageError(f"--adam-eps must be a positive number, got {self.adam_eps}")
        for name in ("compile", "pad_vocab", "defer_snapshots"):
            if getattr(self, name) not in SWITCH:
                raise UsageError(f"{flag(name, TrainConfig)} must be auto, on or off, got {getattr(self, name)!r}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise UsageError(f"--recipe: no recipe {self.recipe!r}; choose from {', '.join(RECIPES)}")
        if self.peak_flops is not None and not 0 < self.peak_flops < math.inf:
            raise UsageError(f"--peak-flops must be a positive number of FLOP/s (e.g. 989e12), got {self.peak_flops}")

    def for_world(self, world_size: int) -> TrainConfig:
        """This config on ``world_size`` processes: with --batch-tokens, --grad-accum becomes the tokens per step
        over -B x -T x processes. UsageError, naming the nearest valid values, where that does not divide or
        disagrees with a --grad-accum given beside it."""
        if self.batch_tokens is None:
            return self
        per_micro = self.batch_size * self.seq_len * world_size
        where = f"-B x -T x {world_size} process{'es' if world_size > 1 else ''}"
        _refuse_indivisible(self.batch_tokens, per_micro, where)
        accum = self.batch_tokens // per_micro
        if self.grad_accum not in (1, accum):
            raise UsageError(
                f"--grad-accum {self.grad_accum} disagrees with --batch-tokens {self.batch_tokens:,}, which needs "
                f"{accum} with {where}; give one of them"
            )
        return dataclasses.replace(self, grad_accum=accum)

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


def _refuse_indivisible(tokens: int, unit: int, what: str) -> None:
    """UsageError naming the nearest valid values unless ``tokens`` (--batch-tokens) is a multiple of ``unit``."""
    if tokens % unit:
        below = tokens // unit * unit
        nearest = " or ".join(f"{n:,}" for n in (below, below + unit) if n > 0)
        raise UsageError(
            f"--batch-tokens {tokens:,} is not a multiple of {what} = {unit:,} tokens; nearest valid: {nearest}"
        )
