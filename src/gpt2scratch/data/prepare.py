"""``gpt2-scratch prepare``: documents in, llm.c token shards out, on every core, in bounded memory, resumable.

The documents of the inputs (data/documents.py) are read in one fixed order, each tokenized after an <|endoftext|> on a
pool of threads or processes (``tokenizer.encode_in_order``), and their ids written in that same order: the first
--val-tokens to ``val_000000.bin``, then --shard-tokens to each of ``train_000000.bin``, ``train_000001.bin``, ...
(data/shards.py). A shard is written under a temporary name and renamed once whole; ``manifest.json``, rewritten after
each, lists the finished shards with their sha256 and the place in the inputs where each ends. What a shard holds
is fixed by the arguments alone, whatever the parallelism, so a killed prepare run again with the same arguments keeps
the shards it finished, starts again where the last one ends, and writes byte for byte what an uninterrupted run
writes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2scratch.config.commands import Console, PrepareConfig, Progress
from gpt2scratch.data.documents import Piece, Source, pieces, resolve_sources, where
from gpt2scratch.data.shards import HEADER_BYTES, HEADER_INTS, MAGIC, MANIFEST_NAME, VERSION, ShardWriter, shard_name
from gpt2scratch.errors import DataError, OutDirError, UsageError
from gpt2scratch.files import OutDirLock, replace_atomically, write_failure_reason
from gpt2scratch.tokenizer import NotUnicode, encode_in_order, encode_pieces, encoder_pool, get_encoding

log = logging.getLogger(__name__)

BATCH_CHARS = 1 << 18  # characters of documents per batch handed to a worker
SAMPLE_CHARS = 1 << 22  # characters timed on threads and on processes before choosing between them ("auto")
WORKERS_PER_CORE = 8  # --workers beyond this many per core is refused: each forks a process or starts a thread


@dataclass
class PrepareResult:
    out: Path
    shards: list[dict[str, Any]]  # as manifest.json lists them
    documents: int
    train_tokens: int
    val_tokens: int
    already: bool  # an earlier run had finished: nothing was written


@dataclass
class Cursor:
    """The place of the next token: ``token`` ids into the document at ``item`` of source ``source`` (its
    <|endoftext|> is id 0), with ``documents`` begun before it."""

    source: int = 0
    item: int = 0
    token: int = 0
    documents: int = 0


def prepare(cfg: PrepareConfig, progress: Progress | None = None) -> PrepareResult:
    """Write the shards and manifest.json of ``cfg.inputs`` into ``cfg.out``, or finish an interrupted run's.
    DataError for inputs that cannot be read or hold no documents, OutDirError for an out dir that holds other
    shards or cannot be written; the finished shards of an interrupted run are kept."""
    cores = available_cores()
    if cfg.workers is not None and cfg.workers > WORKERS_PER_CORE * cores:
        raise UsageError(
            f"--workers {cfg.workers} is more than {WORKERS_PER_CORE} per core ({cores} here); tokenizing gains "
            "nothing past one per core, and each worker holds batches of text in memory"
        )
    sources = resolve_sources(cfg.inputs)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutDirError(f"cannot create --out {out}: {err.strerror or err}") from None
    head = manifest_head(cfg, sources)
    lock = OutDirLock(out, "prepare", "--out")
    lock.acquire()
    try:
        for stale in [*out.glob(".*.bin.tmp-*"), *out.glob(f".{MANIFEST_NAME}.tmp-*")]:
            stale.unlink(missing_ok=True)  # a killed run's: only ours, by name
        done, complete = finished_shards(out, head, cfg.val_tokens)
        if not complete:
            if done:
                log.info("resuming: %d finished shard(s) kept, from %s on", len(done), done[-1]["name"])
            Sharder(cfg, out, head, sources, done, progress).run()
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    finally:
        lock.release()
    tokens = manifest["tokens"]
    return PrepareResult(out, manifest["shards"], manifest["documents"], tokens["train"], tokens["val"], complete)


def manifest_head(cfg: PrepareConfig, sources: list[Source]) -> dict[str, Any]:
    """What makes a prepare the same prepare: the format, tokenizer, arguments and input files."""
    return {
        "format": {"magic": MAGIC, "version": VERSION, "header_int32s": HEADER_INTS, "token_dtype": "uint16"},
        "tokenizer": "gpt2",
        "arguments": {
            "inputs": list(cfg.inputs),
            "text_field": cfg.text_field,
            "shard_tokens": cfg.shard_tokens,
            "val_tokens": cfg.val_tokens,
        },
        "sources": [{"path": str(s.path), "kind": s.kind, "bytes": s.path.stat().st_size} for s in sources],
    }


def finished_shards(out: Path, head: dict[str, Any], val_tokens: int) -> tuple[list[dict[str, Any]], bool]:
    """The shards an earlier run of this prepare finished (those still on disk whole), and whether it finished them
    all. OutDirError if ``out`` holds another prepare's shards, shards without a manifest, or a damaged manifest."""
    path = out / MANIFEST_NAME
    damaged = f"{path} is damaged or not prepare's; give another --out"
    manifest = None
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise OutDirError(f"{damaged} ({err})") from None
        except RecursionError:
            raise OutDirError(damaged) from None
        if not isinstance(manifest, dict):
            raise OutDirError(damaged)
    # A prepare that stopped before its first shard (a bad line, --val-tokens beyond the inputs) kept nothing: its
    # manifest does not tie the out dir to its arguments, so the command run again as corrected starts afresh.
    if manifest is None or (manifest.get("shards") == [] and manifest.get("format") == head["format"]):
        foreign = sorted(p.name for p in out.glob("*.bin"))
        if foreign:
            raise OutDirError(
                f"{out} holds shards ({foreign[0]}, ...) but no {MANIFEST_NAME} that lists them, so not this "
                "prepare's; give another --out, or move them away"
            )
        return [], False
    differences = _differences(manifest, head)
    if differences:
        raise OutDirError(
            f"{out} holds the shards of another prepare ({differences}); give another --out, or delete {out} to "
            "start again"
        )
    try:
        listed = manifest["shards"]
        for index, entry in enumerate(listed):
            Cursor(**entry["end"])
            if entry["name"] != name_at(index, val_tokens) or type(entry["tokens"]) is not int:
                raise ValueError(f"its shard {index} is {entry['name']!r} of {entry['tokens']!r} tokens")
    except (ValueError, KeyError, TypeError) as err:
        raise OutDirError(f"{damaged} ({err})") from None
    done = []
    for entry in listed:
        shard = out / entry["name"]
        if not shard.is_file() or shard.stat().st_size != HEADER_BYTES + 2 * entry["tokens"]:
            log.warning("%s is missing or damaged: writing it again, and the shards after it", shard)
            break
        done.append(entry)
    return done, bool(manifest.get("complete")) and len(done) == len(listed)


def _differences(manifest: dict[str, Any], head: dict[str, Any]) -> str:
    """How the prepare that wrote ``manifest`` differs from this one, in words ("" if it does not)."""
    found = []
    old = manifest.get("arguments")
    old = old if isinstance(old, dict) else {}
    for name, value in head["arguments"].items():
        if old.get(name) != value:
            what = "inputs" if name == "inputs" else "--" + name.replace("_", "-")
            found.append(f"{what} {old.get(name)!r}, not {value!r}")
    if not found and manifest.get("sources") != head["sources"]:
        found.append("its input files have changed since (another list of files, or other sizes)")
    if manifest.get("format") != head["format"] or manifest.get("tokenizer") != head["tokenizer"]:
        found.append("another format or tokenizer")
    return "; ".join(found)


def name_at(index: int, val_tokens: int) -> str:
    """The name of the shard written ``index``-th: val_000000.bin first if there are --val-tokens."""
    if val_tokens:
        return shard_name("val", 0) if index == 0 else shard_name("train", index - 1)
    return shard_name("train", index)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Sharder:
    """Cuts the stream of token ids into shards at their sizes, and rewrites the manifest after each shard."""

    def __init__(
        self, cfg: PrepareConfig, out: Path, head: dict[str, Any], sources: list[Source], done: list[dict[str, Any]],
        progress: Progress | None,
    ):  # fmt: skip
        self.cfg, self.out, self.head, self.sources, self.shards = cfg, out, head, sources, list(done)
        self.progress = progress
        self.cursor = Cursor(**done[-1]["end"]) if done else Cursor()
        self.drop = self.cursor.token  # ids of the first document that the finished shards hold already
        self.cursor.documents -= self.cursor.token > 0  # that document is begun again, and counted again
        self.before = np.cumsum([0, *(s["bytes"] for s in head["sources"])]).tolist()  # for progress
        self.writer: ShardWriter | None = None

    def run(self) -> None:
        self.write_manifest(complete=False)
        workers = self.cfg.workers or available_cores()
        stream = pieces(self.sources, self.cfg.text_field, start=(self.cursor.source, self.cursor.item))
        sample = list(_first_chars(stream, SAMPLE_CHARS))
        pool = choose_pool(self.cfg.parallel, workers, sample)
        try:
            self.writer = self.next_writer()
            for batch, ids, lengths in encode_in_order(itertools.chain(sample, stream), pool, workers, BATCH_CHARS):
                self.take(batch, ids, lengths)
                self.report(batch[-1])
            self.finish()
        except NotUnicode as err:
            assert isinstance(err.piece, Piece)
            place = where(self.sources[err.piece.source], err.piece.item)
            raise DataError(f"{place} is not valid Unicode (it holds a lone surrogate such as \\ud800)") from None
        except OSError as err:
            raise OutDirError(
                f"could not write the shards in {self.out}: {write_failure_reason(err)}; the finished shards are "
                "kept: run the same command again to go on"
            ) from None
        finally:
            if self.writer is not None:
                self.writer.abort()
            pool.shutdown(cancel_futures=True)

    def next_writer(self) -> ShardWriter:
        name = name_at(len(self.shards), self.cfg.val_tokens)
        return ShardWriter(self.out / name, self.cfg.val_tokens if name.startswith("val") else self.cfg.shard_tokens)

    def take(self, batch: list[Piece], ids: np.ndarray, lengths: np.ndarray) -> None:
        """Write the ids of a batch of pieces, finishing each shard they fill; ``ids[start:i]`` are counted into
        the current shard but not yet written."""
        cursor, writer = self.cursor, self.writer
        assert writer is not None
        start = i = 0
        for piece, n in zip(batch, lengths.tolist(), strict=True):
            if piece.starts:
                cursor.source, cursor.item, cursor.token = piece.source, piece.item, 0
                cursor.documents += 1
            stop = i + n
            while i < stop:
                if self.drop:  # resuming inside a document: its first ids are in the last finished shard
                    k = min(self.drop, stop - i)
                    self.drop -= k
                    i += k
                    cursor.token += k
                    start = i
                    continue
                k = min(stop - i, writer.room - (i - start))
                i += k
                cursor.token += k
                if i - start == writer.room:
                    writer.write(ids[start:i])
                    start = i
                    self.finish_shard()
                    writer = self.writer = self.next_writer()
        writer.write(ids[start:])

    def finish_shard(self) -> None:
        writer = self.writer
        assert writer is not None
        sha256 = writer.finish()
        self.writer = None
        entry = {"name": writer.path.name, "tokens": writer.count, "sha256": sha256}
        self.shards.append({**entry, "end": dataclasses.asdict(self.cursor)})
        self.write_manifest(complete=False)

    def finish(self) -> None:
        """The last shard, and the manifest marked complete; DataError if there was nothing to train on."""
        assert self.writer is not None
        if self.cursor.documents == 0:
            raise DataError(f"the inputs ({', '.join(self.cfg.inputs)}) hold no documents")
        last = self.writer
        if last.count and not last.path.name.startswith("val"):
            self.finish_shard()
        if not any(shard["name"].startswith("train") for shard in self.shards):
            tokens = sum(shard["tokens"] for shard in self.shards) + last.count
            raise DataError(
                f"the inputs hold {tokens:,} tokens, no more than --val-tokens {self.cfg.val_tokens:,}: none are "
                "left to train on; lower --val-tokens"
            )
        self.write_manifest(complete=True)

    def write_manifest(self, complete: bool) -> None:
        tokens = {"train": 0, "val": 0}
        for shard in self.shards:
            tokens["val" if shard["name"].startswith("val") else "train"] += shard["tokens"]
        documents = self.shards[-1]["end"]["documents"] if self.shards else 0
        manifest = {**self.head, "complete": complete, "documents": documents, "tokens": tokens}
        text = json.dumps({**manifest, "shards": self.shards}, indent=1) + "\n"

        def write(tmp: Path) -> None:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

        replace_atomically(self.out / MANIFEST_NAME, len(text), write, space_hint="free some space")

    def report(self, last: Piece) -> None:
        if self.progress is None:
            return
        written = sum(s["tokens"] for s in self.shards) + (self.writer.count if self.writer else 0)
        done = self.before[last.source] + last.position
        self.progress(done, self.before[-1], f"{self.cursor.documents:,} docs, {written:,} tokens")


def _first_chars(stream: Iterator[Piece], chars: int) -> Iterator[Piece]:
    """Pieces of ``stream`` until they hold ``chars`` characters (the rest stays in ``stream``)."""
    total = 0
    for piece in stream:
        yield piece
        total += len(piece.text)
        if total >= chars:
            return


def choose_pool(parallel: str, workers: int, sample: list[Piece]) -> Executor:
    """A pool of ``workers`` threads or processes as ``parallel`` says; "auto" times both on ``sample`` (when it
    is big enough to tell; threads otherwise) and keeps the faster."""
    get_encoding()  # built once here: forked processes inherit it
    if parallel != "auto":
        return encoder_pool(workers, processes=parallel == "processes")
    if workers == 1 or sum(len(p.text) for p in sample) < SAMPLE_CHARS:
        return encoder_pool(workers)
    seconds: dict[str, float] = {}
    pools: dict[str, Executor] = {}
    for kind in ("processes", "threads"):  # processes first: forked before any thread of a pool exists
        pool = pools[kind] = encoder_pool(workers, processes=kind == "processes")
        list(pool.map(encode_pieces, [["warm up"]] * workers, [[False]] * workers))  # started, not timed
        started = time.perf_counter()
        for _ in encode_in_order(sample, pool, workers, BATCH_CHARS):
            pass
        seconds[kind] = time.perf_counter() - started
    best = min(seconds, key=lambda kind: seconds[kind])
    for kind, pool in pools.items():
        if kind != best:
            pool.shutdown()
    chars = sum(len(p.text) for p in sample)
    rates = ", ".join(f"{kind} {chars / 1e6 / s:.1f} M chars/s" for kind, s in seconds.items())
    log.info("tokenizing on %d %s (timed on the first documents: %s)", workers, best, rates)
    return pools[best]


def run(cfg: PrepareConfig, console: Console) -> None:
    """``gpt2-scratch prepare``."""
    with console.progress("preparing") as bar:
        result = prepare(cfg, bar)
    done = "already prepared" if result.already else "wrote"
    console.say(
        f"{done} {result.out}: {len(result.shards)} shards, {result.train_tokens:,} train and {result.val_tokens:,} "
        f"val tokens from {result.documents:,} documents (manifest.json lists them with their sha256)"
    )
