import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builder.corpus import CorpusError, approx_tokens, chunk, ingest, passage_id


def test_passage_id_is_stable_and_ignores_line_endings_and_trailing_space():
    assert passage_id("Hello world.\r\nSecond line.  ") == passage_id("Hello world.\nSecond line.")
    assert passage_id("a") != passage_id("b")


def test_passage_id_matches_sha256_of_normalised_text():
    import hashlib

    assert passage_id("  Hello world.\n") == hashlib.sha256(b"Hello world.").hexdigest()[:16]


def test_chunk_respects_paragraphs_and_budget():
    paragraphs = [" ".join(["word"] * 30) + "." for _ in range(6)]  # ~37 tokens each by approx_tokens
    chunks = chunk("\n\n".join(paragraphs), budget=80)
    assert all(approx_tokens(c) <= 80 for c in chunks)
    assert len(chunks) == 3  # two paragraphs per chunk
    assert all(c.count("\n\n") == 1 for c in chunks)  # cut between paragraphs, never inside


def test_chunk_splits_an_overlong_paragraph_at_sentences():
    text = " ".join(f"Sentence number {i} is here." for i in range(60))
    chunks = chunk(text, budget=40)
    assert len(chunks) > 1
    assert all(approx_tokens(c) <= 40 for c in chunks)
    assert all(c.endswith(".") for c in chunks)
    assert " ".join(chunks) == text


def test_jsonl_folder_parquet_and_datasets_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "First passage."}) + "\n" + json.dumps({"body": "Second."}) + "\n")
    (tmp_path / "b.md").write_text("# Title\n\nA markdown passage.")
    (tmp_path / "c.txt").write_text("A text passage.")
    pq.write_table(pa.table({"body": ["From parquet.", "   "]}), tmp_path / "d.parquet")
    (tmp_path / "e.csv").write_text("body,other\nFrom csv via datasets.,1\n")
    passages, report = ingest(tmp_path, text_field="body")
    texts = {p.text for p in passages}
    assert {"First passage.", "Second.", "# Title\n\nA markdown passage.", "A text passage.", "From parquet.",
            "From csv via datasets."} == texts
    assert report.files == 5
    assert report.empty_records == 1


def test_saved_dataset_directory(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["saved one", "saved two"]}).save_to_disk(str(tmp_path / "ds"))
    passages, _ = ingest(tmp_path / "ds")
    assert [p.text for p in passages] == ["saved one", "saved two"]


def test_identical_passages_stored_once_and_empty_records_counted(tmp_path):
    rows = ["Same text.", "Same text.", "", "   ", "Other text."]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    passages, report = ingest(tmp_path)
    assert [p.text for p in passages] == ["Same text.", "Other text."]
    assert report.duplicates == 1
    assert report.empty_records == 2


def test_jsonl_with_unicode_line_separators_inside_strings_is_read_whole(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 unescaped; str.splitlines()
    # would cut these records in two.
    rows = ["First\u2028line and a second.", "Para\u2029graph and next line\u0085here."]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": r}, ensure_ascii=False) + "\n" for r in rows),
                                      encoding="utf-8")
    passages, report = ingest(tmp_path)
    assert len(passages) == 2 and report.records == 2 and not report.skipped_records


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "empty file"),
    ("blank.md", b"  \n\n ", "empty file"),
    ("binary.txt", b"abc\x00\x01\x02def", "binary file"),
    ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 3)"),
    ("empty.jsonl", b"", "empty file"),
    ("empty.parquet", b"", "empty file"),
    ("broken.parquet", b"PAR1 not really", "not a readable parquet file"),
    ("data.xyz", b"hello", "unsupported file type"),
])
def test_bad_file_is_an_error_naming_the_file(tmp_path, name, content, message):
    (tmp_path / "good.txt").write_text("A good passage.")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorpusError) as exc:
        ingest(tmp_path)
    assert str(tmp_path / name) in str(exc.value)
    assert message in str(exc.value)


def test_bad_file_skipped_and_reported_when_config_says_so(tmp_path):
    (tmp_path / "good.txt").write_text("A good passage.")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01")
    passages, report = ingest(tmp_path, on_bad_file="skip")
    assert [p.text for p in passages] == ["A good passage."]
    assert report.skipped_files == [(str(tmp_path / "binary.txt"), "binary file (contains NUL bytes), not text")]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: not valid JSON"):
        ingest(tmp_path)
    passages, report = ingest(tmp_path, on_bad_file="skip")
    assert [p.text for p in passages] == ["ok"]
    assert report.skipped_records[0][0].endswith("c.jsonl:2")


def test_missing_text_column_names_the_columns(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: body\)"):
        ingest(tmp_path)


def test_missing_corpus_path(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        ingest(tmp_path / "nope")


def test_huge_record_is_chunked_not_rejected(tmp_path):
    text = "\n\n".join(f"Paragraph {i}. " + "lorem ipsum dolor sit amet " * 20 for i in range(2000))  # ~1.1 MB
    (tmp_path / "big.txt").write_text(text)
    passages, _ = ingest(tmp_path, chunk_tokens=256)
    assert len(passages) > 500
    assert all(p.n_tokens <= 256 for p in passages)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_non_string_text_is_an_error_naming_column_row_and_type(tmp_path, fmt):
    """A number where the text should be is bad input, not an "empty" record (#15.8)."""
    if fmt == "jsonl":
        (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": 42}\n')
        where = r"c\.jsonl:2"
    else:
        pq.write_table(pa.table({"text": pa.array([{"a": 1}, {"a": 2}])}), tmp_path / "c.parquet")
        where = r"c\.parquet#0"
    with pytest.raises(CorpusError, match=where + r": column 'text' holds a (int|dict), not a string"):
        ingest(tmp_path)
    if fmt == "jsonl":
        passages, report = ingest(tmp_path, on_bad_file="skip")
        assert [p.text for p in passages] == ["ok"]
        assert report.empty_records == 0 and report.skipped_records[0][0].endswith("c.jsonl:2")
    else:  # every row skipped: nothing left to annotate is an error too
        with pytest.raises(CorpusError, match=r"no passage to annotate \(0 record\(s\) read from 1 file\(s\), 0 of "
                                              r"them empty; 2 record\(s\) and 0 file\(s\) skipped\)"):
            ingest(tmp_path, on_bad_file="skip")


def test_a_corpus_of_empty_records_is_an_error_before_anything_is_stored(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": ""}\n{"text": "   "}\n{"text": null}\n')
    with pytest.raises(CorpusError, match=r"no passage to annotate \(3 record\(s\) read from 1 file\(s\), 3 of them empty\)"):
        ingest(tmp_path)


def test_sources_are_relative_to_the_workspace_or_the_corpus_never_absolute(tmp_path):
    """What a published split's `source` column says (#15.9): no local absolute path."""
    corpus = tmp_path / "ws" / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "c.jsonl").write_text('{"text": "First."}\n{"text": "Second."}\n')
    passages, _ = ingest(corpus, shown_from=tmp_path / "ws")
    assert [p.source for p in passages] == ["corpus/sub/c.jsonl:1", "corpus/sub/c.jsonl:2"]
    passages, _ = ingest(corpus)  # outside any workspace: relative to the corpus folder
    assert [p.source for p in passages] == ["sub/c.jsonl:1", "sub/c.jsonl:2"]
    passages, _ = ingest(corpus / "sub" / "c.jsonl", shown_from=tmp_path / "elsewhere")  # one file: its name
    assert [p.source for p in passages] == ["c.jsonl:1", "c.jsonl:2"]
