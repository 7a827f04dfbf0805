"""Readers under hostile input (issue 11, items 6, 8, 10): one located error or a quarantined record,
never a raw traceback, a silent coercion or a silent drop."""
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.readers import BadRecordError, Quarantine, read_beir, read_corpus, read_pairs

DOCS = [{"_id": f"d{i}", "text": f"document number {i}"} for i in range(6)]


def _jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _beir(folder: Path, qrels: str = "q1\td1\t1\n", queries: bytes | None = None) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_bytes(_jsonl(DOCS))
    (folder / "queries.jsonl").write_bytes(queries or _jsonl([{"_id": "q1", "text": "number one"}]))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return folder


def test_truncated_gzip_is_a_located_error_or_quarantined(tmp_path):
    import random

    rng = random.Random(0)
    rows = [{"_id": f"d{i}", "text": " ".join(str(rng.random()) for _ in range(20))} for i in range(400)]
    full = gzip.compress(_jsonl(rows))
    f = tmp_path / "c.jsonl.gz"
    f.write_bytes(full[: len(full) // 2])
    with pytest.raises(BadRecordError, match=r"c\.jsonl\.gz:\d+: corrupt gzip"):
        read_corpus(f)
    q = Quarantine(skip=True, path=tmp_path / "q.jsonl")
    docs = read_corpus(f, quarantine=q)
    assert docs and q.count >= 1 and "corrupt gzip" in (tmp_path / "q.jsonl").read_text()
    f.write_bytes(b"not gzip at all")
    with pytest.raises(BadRecordError, match=r"c\.jsonl\.gz:1: corrupt gzip"):
        read_corpus(f)


@pytest.mark.parametrize(("grade", "why"), [("inf", "not a finite number"), ("nan", "not a finite number"),
                                            ("1.7", "not an integer grade"), ("x", "not a number")])
def test_qrels_grades_must_be_integers(tmp_path, grade, why):
    folder = _beir(tmp_path / "b", qrels=f"q1\td1\t{grade}\n")
    with pytest.raises(BadRecordError, match=rf"test\.tsv:2: wrong type: score '{grade}' is {why}"):
        read_beir(folder)
    data = read_beir(folder, skip_bad_records=True)
    assert data.qrels == {} and data.bad["bad_records"] == 1
    assert read_beir(_beir(tmp_path / "ok", qrels="q1\td1\t2.0\n")).qrels == {"q1": {"d1": 2}}


def test_qrels_path_that_is_a_directory(tmp_path):
    folder = _beir(tmp_path / "b")
    (folder / "qrels" / "test.tsv").unlink()
    (folder / "qrels" / "test.tsv").mkdir()
    with pytest.raises(FileNotFoundError, match=r"test\.tsv is not a file"):
        read_beir(folder)


def test_non_utf8_lines_are_located_and_quarantinable(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(_jsonl(DOCS[:2]) + b'{"_id": "bad", "text": "caf\xe9"}\n' + _jsonl(DOCS[2:]))
    with pytest.raises(BadRecordError, match=r"c\.jsonl:3: invalid UTF-8"):
        read_corpus(f)
    q = Quarantine(skip=True)
    assert [d["_id"] for d in read_corpus(f, quarantine=q)] == [d["_id"] for d in DOCS] and q.count == 1
    folder = _beir(tmp_path / "b", queries=b'{"_id": "q1", "text": "\xff\xfe"}\n')
    with pytest.raises(BadRecordError, match=r"queries\.jsonl:1: invalid UTF-8"):
        read_beir(folder)
    (folder / "qrels" / "test.tsv").write_bytes(b"q1\td1\t1\nq\xff\td1\t1\n")
    (folder / "queries.jsonl").write_bytes(_jsonl([{"_id": "q1", "text": "fine"}]))
    with pytest.raises(BadRecordError, match=r"test\.tsv:2: invalid UTF-8"):
        read_beir(folder)


def _parquet_with_groups(path: Path, groups: int = 3, per: int = 4) -> Path:
    rows = [{"_id": f"d{i}", "text": f"text {i}"} for i in range(groups * per)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=per, compression="none", use_dictionary=False)
    return path


def _corrupt_group(path: Path, g: int) -> None:
    md = pq.ParquetFile(path).metadata
    col = md.row_group(g).column(1)
    start = col.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start, start + col.total_compressed_size):
        data[i] = 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_parquet_row_group_is_located_or_quarantined(tmp_path):
    f = _parquet_with_groups(tmp_path / "c.parquet")
    _corrupt_group(f, 1)
    with pytest.raises(BadRecordError, match=r"c\.parquet:5: corrupt Parquet: row group 1 \(rows 5-8\)"):
        read_corpus(f)
    q = Quarantine(skip=True, path=tmp_path / "q.jsonl")
    docs = read_corpus(f, quarantine=q)
    assert [d["_id"] for d in docs] == [f"d{i}" for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    assert q.count == 1 and "row group 1" in (tmp_path / "q.jsonl").read_text()
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(BadRecordError, match=r"junk\.parquet:0: corrupt Parquet"):
        read_corpus(tmp_path / "junk.parquet")


@pytest.mark.parametrize("negs", [False, 0, {}, "", "a string", [""], [1], True, {"a": 1}])
def test_negatives_of_the_wrong_type_are_refused(tmp_path, negs):
    f = tmp_path / "p.jsonl"
    f.write_bytes(_jsonl([{"query": "q", "positive": "p", "negatives": negs}]))
    with pytest.raises(BadRecordError, match=r"p\.jsonl:1: wrong type: field 'negatives'"):
        read_pairs(f)
    f.write_bytes(_jsonl([{"query": "q", "positive": "p", "negatives": None}, {"query": "q", "positive": "p"},
                          {"query": "q", "positive": "p", "negatives": []}]))
    assert [r["negatives"] for r in read_pairs(f)] == [[], [], []]


def test_a_rerun_replaces_its_quarantine_file(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(_jsonl(DOCS) + b"{broken\n" * 3)
    qf = tmp_path / "run" / "quarantine.jsonl"
    for _ in range(2):
        read_corpus(f, quarantine=Quarantine(skip=True, path=qf))
        assert len(qf.read_text().splitlines()) == 3
