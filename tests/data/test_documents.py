"""Reading documents: JSON lines (plain and gzipped), Parquet, Arrow and datasets.save_to_disk folders, directory
trees in sorted order, starting at any document, and a one-line DataError naming the file and line for bad input."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from conftest import SAMPLE_TEXT, skip_without

from gpt2scratch.data import documents
from gpt2scratch.data.documents import ARROW, JSONL, PARQUET, TEXT, Source
from gpt2scratch.errors import DataError

DOCS = ["First document.\n", "", "naïve café — «quoted» 日本語 🙂", SAMPLE_TEXT, "<|endoftext|> is plain text here"]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    lines = "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts))
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def write_parquet(path: Path, texts: list[str], rows_per_group: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path, row_group_size=rows_per_group)
    return path


def texts_of(sources: list[Source], start: tuple[int, int] = (0, 0), field: str = "text") -> list[str]:
    """Each document's whole text (its pieces joined)."""
    texts: list[str] = []
    for piece in documents.pieces(sources, field, start):
        if piece.starts:
            texts.append("")
        texts[-1] += piece.text
    return texts


def read_error(source: Source, field: str = "text") -> str:
    with pytest.raises(DataError) as failure:
        list(documents.read(source, 0, field))
    message = str(failure.value)
    assert "\n" not in message
    return message


def test_json_lines_plain_and_gzipped(tmp_path: Path) -> None:
    for name in ("a.jsonl", "a.jsonl.gz"):
        path = write_jsonl(tmp_path / name, DOCS)
        assert documents.kind_of(path) == JSONL
        assert texts_of([Source(path, JSONL)]) == DOCS


def test_blank_lines_are_skipped_and_items_are_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n   \n{"text": "two"}\n', encoding="utf-8")
    found = list(documents.read(Source(path, JSONL), 7, "text"))
    assert [(p.text, p.starts, p.source, p.item) for p in found] == [("one", True, 7, 0), ("two", True, 7, 3)]
    assert found[-1].position == path.stat().st_size


@skip_without("pyarrow")
def test_parquet_rows_in_order(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", DOCS)
    assert documents.kind_of(path) == PARQUET
    found = list(documents.read(Source(path, PARQUET), 0, "text"))
    assert [p.text for p in found] == DOCS and [p.item for p in found] == list(range(len(DOCS)))
    assert found[-1].position == path.stat().st_size


@skip_without("datasets")
def test_a_save_to_disk_folder_reads_as_datasets_loads_it(tmp_path: Path) -> None:
    import datasets

    texts = [f"{i}: {t}" for i, t in enumerate(DOCS * 5)]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(
        str(tmp_path / "saved"), num_shards=3
    )
    sources = documents.resolve_sources([str(tmp_path / "saved")])
    assert [s.kind for s in sources] == [ARROW] * 3
    assert texts_of(sources) == list(datasets.load_from_disk(str(tmp_path / "saved"))["text"]) == texts


@skip_without("pyarrow")
def test_reading_starts_at_any_document(tmp_path: Path) -> None:
    """What a resumed prepare does: from (source, item) on, the same documents as reading from the start."""
    sources = [
        Source(write_jsonl(tmp_path / "a.jsonl.gz", DOCS), JSONL),
        Source(write_parquet(tmp_path / "b.parquet", DOCS, rows_per_group=2), PARQUET),
        Source(write_jsonl(tmp_path / "c.jsonl", DOCS), JSONL),
    ]
    every = [(p.source, p.item, p.text) for p in documents.pieces(sources, "text")]
    for k, (source, item, _) in enumerate(every):
        assert [(p.source, p.item, p.text) for p in documents.pieces(sources, "text", (source, item))] == every[k:]


def test_a_text_file_is_one_document_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(documents, "CHUNK_CHARS", 64)
    path = tmp_path / "a.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    found = list(documents.pieces([Source(path, TEXT), Source(tmp_path / "empty.txt", TEXT)], "text"))
    assert len(found) > 3 and [p.starts for p in found] == [True] + [False] * (len(found) - 2) + [True]
    assert "".join(p.text for p in found) == SAMPLE_TEXT and found[-1].text == ""


@skip_without("datasets")
def test_a_directory_tree_in_sorted_order(tmp_path: Path) -> None:
    import datasets

    tree = tmp_path / "tree"
    (tree / "b" / "deeper").mkdir(parents=True)
    (tree / ".cache" / "huggingface").mkdir(parents=True)
    write_jsonl(tree / "b" / "deeper" / "z.jsonl", ["z"])
    write_jsonl(tree / "b" / "a.jsonl.gz", ["b/a"])
    write_parquet(tree / "a.parquet", ["a"])
    (tree / "c.txt").write_text("c", encoding="utf-8")
    datasets.Dataset.from_dict({"text": ["d0", "d1"]}).save_to_disk(str(tree / "d_saved"))
    (tree / "README.md").write_text("not read\n")
    write_jsonl(tree / ".cache" / "huggingface" / "hidden.jsonl", ["hidden"])
    assert texts_of(documents.resolve_sources([str(tree)])) == ["a", "b/a", "z", "c", "d0", "d1"]


def test_a_link_back_up_the_tree_is_read_once(tmp_path: Path) -> None:
    """Once, ``again -> .`` read a.jsonl 41 times (until the kernel's limit of links in a path); a link to another
    folder is still followed."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "other").mkdir()
    write_jsonl(tmp_path / "tree" / "a.jsonl", ["a"])
    write_jsonl(tmp_path / "other" / "b.jsonl", ["b"])
    (tmp_path / "tree" / "again").symlink_to(".")
    (tmp_path / "tree" / "b_link").symlink_to(tmp_path / "other")
    (tmp_path / "other" / "up").symlink_to(tmp_path / "tree")
    assert texts_of(documents.resolve_sources([str(tmp_path / "tree")])) == ["a", "b"]


@skip_without("datasets")
def test_a_dataset_dict_names_its_splits(tmp_path: Path) -> None:
    import datasets

    one = datasets.Dataset.from_dict({"text": ["x"]})
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds a DatasetDict \(splits test, train\); give one split's folder"):
        documents.resolve_sources([str(tmp_path / "dd")])


@pytest.mark.parametrize(
    ("spec", "message"),
    [("missing.jsonl", "does not exist"), ("empty_dir", "holds no .txt, .jsonl"), ("*.nothing", "no file matches")],
)
def test_inputs_that_name_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=message):
        documents.resolve_sources([spec])


BAD_LINES = {
    "malformed": (
        b'{"text": "fine"}\n{"text": "no end\n',
        r"a\.jsonl line 2 is not valid JSON \(Invalid control character, at column 17\)$",
    ),
    "missing-field": (
        b'{"text": "x"}\n{"body": "x", "id": 3}\n',
        r"line 2 has no field 'text' \(its fields: body, id\)",
    ),
    "not-a-string": (b'{"text": null}\n', r"the field 'text' at .*a\.jsonl line 1 is null, not a string"),
    "not-an-object": (b'["text"]\n', r"line 1 is a JSON list, not an object with a 'text' field"),
    "latin-1": ('{"text": "caf\u00e9"}\n'.encode("latin-1"), r"a\.jsonl line 1 is not UTF-8 text"),
    "nested-too-deeply": (  # json recurses once per level: a RecursionError, once reported as an internal error
        b'{"text": "x"}\n{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
        r"a\.jsonl line 2 is JSON nested too deeply to read",
    ),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_json_line_names_the_file_and_line(tmp_path: Path, case: str) -> None:
    content, message = BAD_LINES[case]
    (tmp_path / "a.jsonl").write_bytes(content)
    assert re.search(message, read_error(Source(tmp_path / "a.jsonl", JSONL)))


def test_a_damaged_gzip_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl.gz", DOCS * 50)
    path.write_bytes(path.read_bytes()[:-40])
    assert "cannot read" in read_error(Source(path, JSONL)) and "gzip" in read_error(Source(path, JSONL))


@skip_without("pyarrow")
def test_bad_parquet_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet at all")
    assert read_error(Source(garbage, PARQUET)).startswith(f"cannot read {garbage} as Parquet (")
    good = write_parquet(tmp_path / "good.parquet", DOCS)
    assert "has no column 'body' (its columns: id, text); name it: --text-field" in read_error(
        Source(good, PARQUET), "body"
    )
    assert "the column 'id' of" in read_error(Source(good, PARQUET), "id") and "int64, not text" in read_error(
        Source(good, PARQUET), "id"
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    assert read_error(Source(tmp_path / "null.parquet", PARQUET)).endswith(
        "null.parquet row 1 has no text: its 'text' is null"
    )
