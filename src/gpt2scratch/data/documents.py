"""Documents: what text, JSON-lines, Parquet and Arrow files hold, read in order and in bounded memory.

A ``Source`` is one file read one way. A text file is one document, read in chunks cut where GPT-2's pre-tokenizer
cuts anyway (so the ids of the chunks are those of the whole text). A JSON-lines file (``.jsonl``, ``.jsonl.gz``)
holds one document per line, in a field of its object; a Parquet or Arrow file one per row, in a column (a folder
written by Hugging Face ``datasets``' ``save_to_disk`` is Arrow files, listed in its ``state.json``). ``pieces`` reads
sources one after another as ``Piece``s: a document, or a chunk of one, with the place it came from, so that an error
names the file and line and a resumed ``prepare`` can start again at any document.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from gpt2scratch.errors import DataError, UsageError

TEXT, JSONL, PARQUET, ARROW = "text", "jsonl", "parquet", "arrow"
SUFFIXES = {".txt": TEXT, ".jsonl": JSONL, ".jsonl.gz": JSONL, ".parquet": PARQUET, ".arrow": ARROW}
KNOWN = ".txt, .jsonl, .jsonl.gz, .parquet or .arrow files, or datasets.save_to_disk folders"
CHUNK_CHARS = 1 << 22  # ~4 MB of a text file per piece
ROWS_PER_BATCH = 1024  # rows of a Parquet file decoded at a time


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # TEXT, JSONL, PARQUET or ARROW


class Piece(NamedTuple):
    text: str
    starts: bool  # the first piece of a document
    source: int  # the index of its source
    item: int  # its document's line (JSON lines) or row (Parquet, Arrow) in the source, from 0; 0 in a text file
    position: int  # bytes of the source read once it is read (for progress)


def kind_of(path: Path) -> str | None:
    """TEXT, JSONL, PARQUET or ARROW by the file's name, or None for another file."""
    name = path.name.lower()
    return next((kind for suffix, kind in SUFFIXES.items() if name.endswith(suffix)), None)


def resolve_sources(specs: list[str]) -> list[Source]:
    """The sources of INPUT arguments, in order: a file (of a known kind; any other is a text), a save_to_disk
    folder, a directory searched recursively in sorted order for both (other and hidden files skipped), or a glob.
    DataError for an input that does not exist or holds nothing to read."""
    sources: list[Source] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = list(_walk(path, set()))
            if not found:
                raise DataError(f"the directory {path} holds no {KNOWN}")
            sources += found
        elif path.is_file():
            sources.append(Source(path, kind_of(path) or TEXT))
        elif path.exists():
            raise DataError(f"input {spec} is not a regular file (a FIFO, socket or device)")
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
            if not matches:
                raise DataError(f"no file matches {spec!r}")
            sources += resolve_sources([str(p) for p in matches])
        else:
            raise DataError(f"input {spec} does not exist; give {KNOWN}, or a directory of them")
    return sources


def _walk(folder: Path, seen: set[Path]) -> Iterator[Source]:
    """The sources under ``folder``, each folder read once (``seen``: those read, resolved), however links lead
    back to it: a link to a parent once read the files under it 40 times over, until the kernel refused the path."""
    if folder.resolve() in seen:
        return
    seen.add(folder.resolve())
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise DataError(
            f"{folder} holds a DatasetDict (splits {', '.join(splits)}); give one split's folder, such as "
            f"{folder / splits[0] if splits else folder}"
        )
    if (folder / "state.json").is_file():
        yield from saved_dataset(folder)
        return
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue  # .cache/ of a Hugging Face download, editors' files
        if entry.is_dir():
            yield from _walk(entry, seen)
        elif (kind := kind_of(entry)) is not None and entry.is_file():
            yield Source(entry, kind)


def saved_dataset(folder: Path) -> list[Source]:
    """The Arrow files of a folder written by ``datasets.Dataset.save_to_disk``, in the order its state.json lists."""
    try:
        state = json.loads((folder / "state.json").read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{folder}/state.json is not that of a datasets.save_to_disk folder ({err})") from None
    for name in names:
        if not (folder / name).is_file():
            raise DataError(f"{folder}/state.json lists {name}, which is not in the folder; save the dataset again")
    return [Source(folder / name, ARROW) for name in names]


def where(source: Source, item: int) -> str:
    """The place of a document, for messages: ``FILE line N`` (from 1), ``FILE row N`` (from 0) or ``FILE``."""
    if source.kind == JSONL:
        return f"{source.path} line {item + 1}"
    if source.kind in (PARQUET, ARROW):
        return f"{source.path} row {item}"
    return str(source.path)


def pieces(sources: list[Source], text_field: str, start: tuple[int, int] = (0, 0)) -> Iterator[Piece]:
    """Every document of ``sources`` in order, from the document at (source, item) ``start`` on."""
    first_source, first_item = start
    for index in range(first_source, len(sources)):
        skip = first_item if index == first_source else 0
        yield from read(sources[index], index, text_field, skip)


def read(source: Source, index: int, text_field: str, skip: int = 0, digest: Any = None) -> Iterator[Piece]:
    """The pieces of one source (numbered ``index``), from its document ``skip`` on; DataError naming the file (and
    line or row) for what cannot be read. The bytes of a text file also go into ``digest``, if given."""
    try:
        if source.kind == TEXT:
            yield from _text(source, index, digest)
        elif source.kind == JSONL:
            yield from _json_lines(source, index, text_field, skip)
        else:
            yield from _table(source, index, text_field, skip)
    except OSError as err:  # opening or reading it
        raise DataError(f"cannot read {source.path}: {err.strerror or err}") from None


def _text(source: Source, index: int, digest: Any) -> Iterator[Piece]:
    position = 0
    starts = True
    for chunk in text_chunks(source.path, digest):
        position += len(chunk.encode("utf-8"))
        yield Piece(chunk, starts, index, 0, position)
        starts = False
    if starts:  # an empty file is an empty document
        yield Piece("", True, index, 0, 0)


def _json_lines(source: Source, index: int, text_field: str, skip: int) -> Iterator[Piece]:
    path = source.path
    with open(path, "rb") as raw:
        lines = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.lower().endswith(".gz") else raw
        try:
            for number, line in enumerate(lines):
                if number < skip or not line.strip():
                    continue
                yield Piece(_field(line, text_field, source, number), True, index, number, raw.tell())
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"cannot read {path}: {err} (a damaged or truncated gzip file?)") from None


def _field(line: bytes, text_field: str, source: Source, number: int) -> str:
    """The text in the field ``text_field`` of the JSON object on a line."""
    place = where(source, number)
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise DataError(f"{place} is not UTF-8 text; convert the file to UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{place} is not valid JSON ({err.msg.removesuffix(' at')}, at column {err.colno})") from None
    except RecursionError:  # json's decoder recurses once per level of [ or {
        raise DataError(f"{place} is JSON nested too deeply to read (arrays or objects inside each other)") from None
    if not isinstance(record, dict):
        raise DataError(f"{place} is a JSON {type(record).__name__}, not an object with a {text_field!r} field")
    if text_field not in record:
        fields = ", ".join(list(record)[:8]) or "none"
        raise DataError(f"{place} has no field {text_field!r} (its fields: {fields}); name the text's: --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"the field {text_field!r} at {place} is {json.dumps(text)[:40]}, not a string")
    return text


def _table(source: Source, index: int, text_field: str, skip: int) -> Iterator[Piece]:
    """The rows of a Parquet or Arrow file: the column ``text_field``, a batch of rows at a time."""
    try:
        import pyarrow as pa
    except ImportError:
        raise UsageError(f'reading {source.path} needs pyarrow: pip install -e ".[data]"') from None

    try:
        for first, column, position in _columns(source, text_field, skip):
            if first + len(column) <= skip:
                continue
            binary = pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)
            for row, text in enumerate(column.to_pylist(), start=first):
                if row < skip:
                    continue
                if binary and text is not None:
                    text = _decode(text, source, row)
                if text is None:
                    raise DataError(f"{where(source, row)} has no text: its {text_field!r} is null")
                yield Piece(text, True, index, row, position)
    except (pa.ArrowException, OSError) as err:
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise DataError(f"cannot read {source.path} as {source.kind.capitalize()} ({detail})") from None


def _columns(source: Source, text_field: str, skip: int) -> Iterator[tuple[int, Any, int]]:
    """(its first row, the column ``text_field`` of a batch of rows, bytes of the file read after it) for each batch,
    from the batch that holds row ``skip`` on (Parquet row groups before it are not even decoded)."""
    import pyarrow as pa

    size = source.path.stat().st_size
    if source.kind == PARQUET:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(source.path)
        _check_column(source, parquet.schema_arrow, text_field)
        total, first, groups = max(1, parquet.metadata.num_rows), 0, list[int]()
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if not groups and first + rows <= skip:
                first += rows
            else:
                groups.append(group)
        if not groups:
            return
        for batch in parquet.iter_batches(ROWS_PER_BATCH, row_groups=groups, columns=[text_field], use_threads=False):
            yield first, batch.column(0), size * (first + batch.num_rows) // total
            first += batch.num_rows
        return
    with pa.OSFile(str(source.path)) as stream:  # read, not memory-mapped: the pages read do not stay in memory
        try:
            reader: Any = pa.ipc.open_stream(stream)  # what datasets writes
            batches = ((batch, stream.tell()) for batch in reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(stream)  # the Arrow file format
            count = reader.num_record_batches
            batches = ((reader.get_batch(i), size * (i + 1) // count) for i in range(count))
        _check_column(source, reader.schema, text_field)
        first = 0
        for batch, position in batches:
            yield first, batch.column(text_field), position
            first += batch.num_rows


def _check_column(source: Source, schema: Any, text_field: str) -> None:
    import pyarrow as pa

    if text_field not in schema.names:
        columns = ", ".join(schema.names[:8])
        raise DataError(f"{source.path} has no column {text_field!r} (its columns: {columns}); name it: --text-field")
    kind = schema.field(text_field).type
    text_types = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    if not any(check(kind) for check in text_types):
        raise DataError(f"the column {text_field!r} of {source.path} holds {kind}, not text")


def _decode(value: bytes | None, source: Source, row: int) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{where(source, row)} is not UTF-8 text") from None


def text_chunks(path: Path, digest: Any = None) -> Iterator[str]:
    """The file's text in pieces of about CHUNK_CHARS, cut only where GPT-2's pre-tokenizer always cuts; every byte
    read also goes into ``digest`` (if given), so a hash can be of exactly the text tokenized. DataError if it is not
    text."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_CHARS)
            if digest is not None:
                digest.update(block)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                bad = offset - pending + err.start
                raise DataError(f"{path} is not UTF-8 text (bad byte at offset {bad}); convert it to UTF-8") from None
            offset += len(block)
            if "\x00" in text:
                raise DataError(f"{path} looks like a binary file (it contains NUL bytes); give a text file")
            if not block:
                break
            cut = _last_safe_cut(text, len(text) - CHUNK_CHARS // 2)
            if cut is None:
                carry = text  # no safe cut yet: keep reading
            else:
                yield text[:cut]
                carry = text[cut:]
    if carry:
        yield carry


def _last_safe_cut(text: str, lowest: int) -> int | None:
    """A position at or after ``lowest`` where GPT-2's pre-tokenizer always ends a piece, or None: just after the
    last newline with non-space characters on both sides, else (text without such newlines, which would otherwise be
    held whole in memory) just before the last single space between two non-space characters, where the piece on
    the left ends and the one on the right starts with that space (`` ?\\p{L}+``, `` ?\\p{N}+`` or punctuation)."""
    for mark, after in (("\n", 1), (" ", 0)):
        end = len(text) - 1  # a mark at the very end has an unknown right neighbour
        while (pos := text.rfind(mark, max(1, lowest), end)) > 0:
            if not text[pos - 1].isspace() and not text[pos + 1].isspace():
                return pos + after
            end = pos
    return None
