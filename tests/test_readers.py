"""Readers: every bad-record kind stops the read (file, line, reason), or is quarantined with skip."""
import ast
import json
from pathlib import Path

import pytest

from stages.readers import BadRecordError, beir_pairs, dataset_name, read_beir, read_corpus, read_pairs
from stages.text import doc_text

GOOD_CORPUS = [{"_id": "d1", "title": "Aspirin", "text": "An analgesic."},
               {"_id": "d2", "title": "", "text": "Ibuprofen reduces fever."},
               {"_id": 3, "text": "Integer ids are accepted."}]
GOOD_QUERIES = [{"_id": "q1", "text": "pain killer"}, {"_id": "q2", "text": "fever drug"}]


def write_beir(folder: Path, corpus_lines=None, query_lines=None, qrels=None) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    corpus_lines = corpus_lines or [json.dumps(x) for x in GOOD_CORPUS]
    query_lines = query_lines or [json.dumps(x) for x in GOOD_QUERIES]
    qrels = qrels or ["q1\td1\t2", "q1\td2\t1", "q2\td2\t1"]
    (folder / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n")
    (folder / "queries.jsonl").write_text("\n".join(query_lines) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    return folder


def test_good_beir_keeps_graded_relevance_and_doc_text(tmp_path):
    data = read_beir(write_beir(tmp_path / "set"))
    assert data.qrels == {"q1": {"d1": 2, "d2": 1}, "q2": {"d2": 1}}
    assert set(data.corpus) == {"d1", "d2", "3"}
    assert doc_text(data.corpus["d1"]) == "Aspirin\nAn analgesic."
    assert doc_text(data.corpus["d2"]) == "Ibuprofen reduces fever."       # empty title: text alone
    rows = beir_pairs(data)
    assert {(r["query"], r["positive"]) for r in rows} == {
        ("pain killer", "Aspirin\nAn analgesic."), ("pain killer", "Ibuprofen reduces fever."),
        ("fever drug", "Ibuprofen reduces fever.")}
    assert data.bad["bad_records"] == 0


BAD_CASES = {
    "invalid JSON": {"corpus_lines": [json.dumps(GOOD_CORPUS[0]), "{not json", json.dumps(GOOD_CORPUS[1])]},
    "missing field": {"corpus_lines": [json.dumps(GOOD_CORPUS[0]), json.dumps({"_id": "d9", "title": "x"}),
                                        json.dumps(GOOD_CORPUS[1])]},
    "empty field": {"query_lines": [json.dumps(GOOD_QUERIES[0]), json.dumps({"_id": "q3", "text": "  "}),
                                     json.dumps(GOOD_QUERIES[1])]},
    "wrong type": {"corpus_lines": [json.dumps(GOOD_CORPUS[0]), json.dumps({"_id": "d7", "text": ["a", "b"]}),
                                     json.dumps(GOOD_CORPUS[1])]},
    "duplicate id": {"corpus_lines": [json.dumps(GOOD_CORPUS[0]), json.dumps(GOOD_CORPUS[0]),
                                       json.dumps(GOOD_CORPUS[1])]},
    "unknown document": {"qrels": ["q1\td1\t2", "q1\tnope\t1", "q2\td2\t1"]},
}
WHERE = {"invalid JSON": ("corpus.jsonl", 2), "missing field": ("corpus.jsonl", 2),
         "empty field": ("queries.jsonl", 2), "wrong type": ("corpus.jsonl", 2),
         "duplicate id": ("corpus.jsonl", 2), "unknown document": ("test.tsv", 3)}


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_bad_record_stops_with_file_line_reason(tmp_path, kind):
    folder = write_beir(tmp_path / "set", **BAD_CASES[kind])
    with pytest.raises(BadRecordError) as e:
        read_beir(folder)
    fname, line = WHERE[kind]
    assert Path(e.value.file).name == fname and e.value.line == line
    assert e.value.reason.startswith(kind), e.value.reason
    assert f"{fname}:{line}: {kind}" in str(e.value)


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_bad_record_quarantined_with_skip(tmp_path, kind):
    folder = write_beir(tmp_path / "set", **BAD_CASES[kind])
    qfile = tmp_path / "quarantine.jsonl"
    data = read_beir(folder, skip_bad_records=True, quarantine=qfile)
    assert data.bad["bad_records"] == 1 and data.bad["by_reason"] == {kind: 1}
    rows = [json.loads(x) for x in qfile.read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["reason"].startswith(kind) and rows[0]["line"] == WHERE[kind][1]
    assert Path(rows[0]["file"]).name == WHERE[kind][0]
    # the good records all survived
    assert {"d1", "d2"} <= set(data.corpus) and "q1" in data.queries and data.qrels["q2"] == {"d2": 1}


def test_text_corpus_and_pairs_readers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join(json.dumps({"id": f"x{i}", "question": f"q{i}?", "answer": f"a{i}"}) for i in range(3)))
    docs = read_corpus(p, text_field="answer")
    assert [d["_id"] for d in docs] == ["x0", "x1", "x2"] and docs[0]["text"] == "a0"
    pairs = read_pairs(p, query_field="question", positive_field="answer")
    assert pairs[1] == {"query": "q1?", "positive": "a1", "negatives": []}
    pq.write_table(pa.table({"query": ["a", "b"], "positive": ["pa", "pb"], "negatives": [["n1"], ["n2", "n3"]]}),
                   tmp_path / "neg.parquet")
    rows = read_pairs(tmp_path / "neg.parquet")
    assert rows[1]["negatives"] == ["n2", "n3"]
    pq.write_table(pa.table({"query": ["a"], "positive": ["pa"], "negatives": [[""]]}), tmp_path / "bad.parquet")
    with pytest.raises(BadRecordError, match="negatives"):
        read_pairs(tmp_path / "bad.parquet")


def test_missing_beir_files_and_dataset_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a BEIR folder"):
        read_beir(tmp_path)
    assert dataset_name(tmp_path / "medquad" / "dev") == "medquad"
    assert dataset_name(tmp_path / "cosqa_dev") == "cosqa_dev"


def test_real_shared_beir_folder_reads_cleanly(shared_data):
    data = read_beir(shared_data / "medical" / "pubmedqa_pqal")
    assert len(data.corpus) == 1000 and len(data.queries) == 1000 and data.bad["bad_records"] == 0


def test_stages_never_import_ray_deepspeed_or_distributed():
    root = Path(__file__).resolve().parents[1] / "stages"
    banned = ("ray", "deepspeed", "torch.distributed")
    offenders = []
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if any(n == b or n.startswith(b + ".") for b in banned):
                    offenders.append(f"{f.name}:{node.lineno} imports {n}")
    assert not offenders, offenders
