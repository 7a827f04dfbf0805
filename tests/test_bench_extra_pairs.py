"""bench.quality --extra-pairs: another BEIR folder's judged pairs become stage-2 rows; a dev set never does."""
import json

import pytest

from bench.quality import DATASETS, extra_pair_rows


def _beir(folder, n=5, judged=3):
    folder.mkdir(parents=True)
    (folder / "qrels").mkdir()
    with open(folder / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"d{i}", "title": f"T{i}" if i % 2 else "", "text": f"text {i}"}) + "\n" for i in range(n))
    with open(folder / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"q{i}", "text": f"question {i}"}) + "\n" for i in range(n))
    rows = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(judged)] + ["q4\td0\t0"]
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return folder


def test_judged_pairs_become_rows_of_their_group(tmp_path):
    folder = _beir(tmp_path / "sci")
    name, rows = extra_pair_rows(f"{folder}:sciqa", per_domain_s2=100, seed=0)
    assert name == "extra_sci"
    # grade-0 judgments are not pairs; the title leads the document as in the eval corpus text
    assert sorted((r["query"], r["positive"]) for r in rows) == [
        ("question 0", "text 0"), ("question 1", "T1\ntext 1"), ("question 2", "text 2")]
    assert {r["domain"] for r in rows} == {"sciqa"}
    _, capped = extra_pair_rows(f"{folder}:sciqa", per_domain_s2=2, seed=0)
    assert len(capped) == 2 and capped == extra_pair_rows(f"{folder}:sciqa", per_domain_s2=2, seed=0)[1]


def test_dev_sets_and_bad_specs_are_refused(tmp_path):
    dev = DATASETS["chemrxivquest"]
    with pytest.raises(ValueError, match="chemrxivquest dev set"):
        extra_pair_rows(f"{dev}:chem", 100, 0)
    with pytest.raises(ValueError, match="chemrxivquest dev set"):       # a folder above it holds it too
        extra_pair_rows(f"{dev.parent}:chem", 100, 0)
    with pytest.raises(ValueError, match="expected DIR:GROUP"):
        extra_pair_rows(str(tmp_path), 100, 0)
    empty = _beir(tmp_path / "empty", judged=0)
    with pytest.raises(ValueError, match="no judged"):
        extra_pair_rows(f"{empty}:x", 100, 0)
