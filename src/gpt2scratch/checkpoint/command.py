"""``gpt2-scratch export`` (a checkpoint as a transformers directory or a GGUF file) and ``gpt2-scratch
consolidate`` (a sharded snapshot as one checkpoint file)."""

from __future__ import annotations

import shlex
from pathlib import Path

from gpt2scratch.checkpoint.gguf_export import export_gguf
from gpt2scratch.checkpoint.hf import export as export_to
from gpt2scratch.checkpoint.load import model_from_checkpoint, read_state
from gpt2scratch.checkpoint.sharded import consolidate as consolidate_into
from gpt2scratch.checkpoint.sharded import is_sharded_snapshot
from gpt2scratch.config import ConsolidateConfig, ExportConfig
from gpt2scratch.config.commands import Console
from gpt2scratch.errors import UsageError
from gpt2scratch.model import GPT


def export(cfg: ExportConfig, console: Console) -> None:
    path, out = Path(cfg.checkpoint), Path(cfg.out_dir)
    if path.is_dir() and not is_sharded_snapshot(path):
        raise UsageError(f"{path} is a directory; export takes a checkpoint file or sharded snapshot written by train")
    if cfg.format == "gguf" and out.resolve() == path.resolve():
        raise UsageError(f"{out} is the checkpoint being exported; give the GGUF file another name")
    model = model_from_checkpoint(GPT, read_state(path), str(path))
    if cfg.format == "gguf":
        outtype = cfg.outtype or "f32"
        export_gguf(model, out, outtype, force=cfg.force)
        console.say(f"wrote {out} ({outtype}; run it with llama.cpp: llama-cli -m {shlex.quote(str(out))})")
        return
    export_to(model, out, force=cfg.force, source=path)
    console.say(f"wrote {out} (load it with transformers: GPT2LMHeadModel.from_pretrained({str(out)!r}))")


def consolidate(cfg: ConsolidateConfig, console: Console) -> None:
    state = consolidate_into(Path(cfg.snapshot), Path(cfg.output), cfg.force)
    console.say(f"wrote {cfg.output} (step {state['step']}); resume with --resume {shlex.quote(cfg.output)}")
