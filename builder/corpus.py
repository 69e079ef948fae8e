"""Ingest: files in, passages out.

Reads JSONL, parquet, folders of .txt/.md files and anything `datasets.load_dataset` reads
from a local path; cuts each record at paragraph boundaries to a token budget; names every
passage by a hash of its normalised text, so the same text gets the same id on any machine
and identical passages are stored once. Nothing is written here: the caller stores the
result in one transaction, so a bad file leaves the workspace as it was.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md"}
DATASETS_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".arrow": "arrow"}
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


class CorpusError(Exception):
    """A corpus file that cannot be read; the message names the file (and line)."""


@dataclass(frozen=True)
class Passage:
    passage_id: str
    source: str  # file (and line or row) the passage came from
    position: int  # chunk index within its record
    text: str
    n_tokens: int


@dataclass
class IngestReport:
    files: int = 0
    records: int = 0
    empty_records: int = 0
    duplicates: int = 0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    skipped_records: list[tuple[str, str]] = field(default_factory=list)


def normalize(text: str) -> str:
    """Canonical form for ids: NFC, Unix newlines, no trailing spaces, no outer blank lines."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def passage_id(text: str) -> str:
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()[:16]


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters a token) for tests and dry runs."""
    return max(1, len(text) // 4)


# ---------------------------------------------------------------- chunking


def _split_long(text: str, budget: int, count: Callable[[str], int]) -> list[str]:
    """Split one over-long paragraph at sentence ends, then at spaces."""
    pieces = _SENTENCE.split(text)
    if len(pieces) == 1:
        pieces = text.split(" ")
        if len(pieces) == 1:  # one enormous word: cut by characters
            step = max(1, len(text) * budget // max(count(text), 1))
            return [text[i : i + step] for i in range(0, len(text), step)]
    return _pack(pieces, budget, count, sep=" ")


def _pack(pieces: list[str], budget: int, count: Callable[[str], int], sep: str) -> list[str]:
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if count(piece) > budget:
            if current:
                chunks.append(current)
                current = ""
            chunks.extend(_split_long(piece, budget, count))
            continue
        candidate = f"{current}{sep}{piece}" if current else piece
        if current and count(candidate) > budget:
            chunks.append(current)
            current = piece
        else:
            current = candidate
    if current:
        chunks.append(current)
    return chunks


def chunk(text: str, budget: int, count: Callable[[str], int] = approx_tokens) -> list[str]:
    """Paragraph-aware chunks of at most `budget` tokens (as counted by `count`)."""
    paragraphs = [p.strip() for p in _PARAGRAPH.split(normalize(text)) if p.strip()]
    return _pack(paragraphs, budget, count, sep="\n\n")


# ---------------------------------------------------------------- reading


def _check_text_bytes(path: Path, data: bytes) -> str:
    if not data.strip():
        raise CorpusError(f"{path}: empty file")
    if b"\x00" in data[:8192]:
        raise CorpusError(f"{path}: binary file (contains NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it with e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text: split at "\n" only. str.splitlines() also splits at U+2028,
    U+2029 and U+0085, which json.dumps(ensure_ascii=False) leaves unescaped inside strings:
    a valid file would be cut mid-record."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """Yields (file:line, row, problem) per non-empty line; row is None where there is a problem."""
    text = _check_text_bytes(path, path.read_bytes())
    for lineno, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield source, None, f"not valid JSON ({exc.msg})"
            continue
        if isinstance(row, dict):
            yield source, row, None
        else:
            yield source, None, "not a JSON object"


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str | None, str | None]]:
    """Yields (source, text, problem) per line."""
    for source, row, problem in jsonl_rows(path):
        if problem:
            yield source, None, problem
        elif text_field not in row:
            yield source, None, f"no '{text_field}' field (set corpus.text_field)"
        elif row[text_field] is not None and not isinstance(row[text_field], str):
            yield source, None, _not_text(text_field, row[text_field])
        else:
            yield source, row[text_field], None


def read_table(path: Path):
    """A parquet file, or anything `datasets` reads from a local path, as a pyarrow Table."""
    if path.is_file() and path.stat().st_size == 0:
        raise CorpusError(f"{path}: empty file")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise CorpusError(f"{path}: not a readable parquet file ({exc})") from None
    import datasets

    try:
        if path.is_dir() and (path / "dataset_info.json").exists():
            ds = datasets.load_from_disk(str(path))
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split="train")
        else:
            ds = datasets.load_dataset(DATASETS_BUILDERS[path.suffix], data_files=str(path), split="train")
    except Exception as exc:
        raise CorpusError(f"{path}: `datasets` could not read it ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    return ds.data.table


def _read_table(path: Path, text_field: str) -> Iterator[tuple[str, str | None, str | None]]:
    table = read_table(path)
    if text_field not in table.column_names:
        raise CorpusError(f"{path}: no column '{text_field}' (columns: {', '.join(table.column_names)}); set corpus.text_field")
    for row, value in enumerate(table.column(text_field).to_pylist()):
        if value is None or isinstance(value, str):
            yield f"{path}#{row}", value, None
        else:
            yield f"{path}#{row}", None, _not_text(text_field, value)


def _not_text(column: str, value) -> str:
    """A number or a struct where the text should be is bad input, not an empty record."""
    return f"column '{column}' holds a {type(value).__name__}, not a string (set corpus.text_field?)"


def _read_file(path: Path, text_field: str):
    suffix = path.suffix.lower()
    if path.is_dir():  # a dataset saved with `save_to_disk`
        yield from _read_table(path, text_field)
    elif suffix in TEXT_SUFFIXES:
        yield str(path), _check_text_bytes(path, path.read_bytes()), None
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, text_field)
    elif suffix == ".parquet" or suffix in DATASETS_BUILDERS:
        yield from _read_table(path, text_field)
    else:
        raise CorpusError(f"{path}: unsupported file type '{suffix}' (use .txt, .md, .jsonl, .parquet, .csv, .json or .arrow)")


def shown_path(path: Path, *bases: Path) -> str:
    """`path` as it may leave the machine (published splits, manifests, cards): relative to the
    first of `bases` that holds it, else its file name. No absolute local path is published."""
    path = Path(path).absolute()
    for base in bases:
        try:
            shown = path.relative_to(Path(base).absolute()).as_posix()
        except ValueError:
            continue
        if shown != ".":
            return shown
    return path.name


def rebased(source: str, path: Path, shown: str) -> str:
    """A source of `path` (`file:line`, `file#row`, the file) with the file as `shown`."""
    return shown + source.removeprefix(str(path))


def corpus_files(root: Path) -> list[Path]:
    """The files a corpus path stands for, in a stable order."""
    if not root.exists():
        raise CorpusError(f"{root}: corpus path does not exist (set corpus.path or pass --corpus)")
    if root.is_file():
        return [root]
    if (root / "dataset_info.json").exists():
        return [root]  # a dataset saved with `save_to_disk`
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise CorpusError(f"{root}: corpus folder holds no files")
    return files


def ingest(
    root: Path,
    text_field: str = "text",
    chunk_tokens: int = 384,
    count_tokens: Callable[[str], int] = approx_tokens,
    on_bad_file: str = "error",
    shown_from: Path | None = None,
) -> tuple[list[Passage], IngestReport]:
    """Read every file under `root` into unique passages. Raises CorpusError on a bad file
    (or, with on_bad_file="skip", records it in the report) before anything is stored. Each
    passage's `source` is its file relative to `shown_from` (the workspace) when it is inside,
    else to the corpus folder (a single file: its name), with the line or row."""
    report = IngestReport()
    passages: dict[str, Passage] = {}
    root = Path(root)
    bases = [b for b in (shown_from, root if root.is_dir() else root.parent) if b is not None]
    for path in corpus_files(root):
        shown = shown_path(path, *bases)
        try:
            records = list(_read_file(path, text_field))
        except CorpusError as exc:
            if on_bad_file != "skip":
                raise
            report.skipped_files.append((str(path), str(exc).removeprefix(f"{path}: ")))
            continue
        report.files += 1
        for source, text, problem in records:
            if problem:
                if on_bad_file != "skip":
                    raise CorpusError(f"{source}: {problem}")
                report.skipped_records.append((source, problem))
                continue
            report.records += 1
            if text is None or not text.strip():
                report.empty_records += 1
                continue
            for position, piece in enumerate(chunk(text, chunk_tokens, count_tokens)):
                pid = passage_id(piece)
                if pid in passages:
                    report.duplicates += 1
                    continue
                passages[pid] = Passage(pid, rebased(source, path, shown), position, piece, count_tokens(piece))
    if not passages:  # nothing to annotate: say so now, not as an empty generation later
        skipped = (f"; {len(report.skipped_records)} record(s) and {len(report.skipped_files)} file(s) skipped"
                   if report.skipped_files or report.skipped_records else "")
        raise CorpusError(f"{root}: no passage to annotate ({report.records} record(s) read from {report.files} "
                          f"file(s), {report.empty_records} of them empty{skipped})")
    return list(passages.values()), report
