"""Ray Data embedding == in-process encode; the model path end to end (build, search, reindex, mine)."""
import json
import random

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.index.embed import (
    EmbedConfig,
    HashingEncoder,
    content_hash,
    embed_docs_local,
    embed_docs_ray,
    embed_texts_local,
)
from stages.text import doc_text

faiss.omp_set_num_threads(1)
WORDS = ["cell", "protein", "gene", "tumor", "blood", "insulin", "dose", "trial", "patient", "receptor", "enzyme", "kinase", "liver", "heart", "lung", "brain", "virus", "vaccine", "antibody", "therapy", "risk", "cohort", "outcome", "mortality"]


def _docs(n, seed=0):
    rng = random.Random(seed)
    return [{"_id": f"d{i}", "title": rng.choice(["", "Study " + rng.choice(WORDS)]),
             "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 25)))} for i in range(n)]


@pytest.fixture(scope="module")
def model_dir(tiny_backbone, tmp_path_factory):
    from stages import LBRModel

    return LBRModel.from_backbone(tiny_backbone, num_bottleneck=4).save_pretrained(
        tmp_path_factory.mktemp("lbr") / "model")


@pytest.fixture(scope="module")
def other_model_dir(tiny_backbone, tmp_path_factory):
    from stages import LBRModel

    return LBRModel.from_backbone(tiny_backbone, num_bottleneck=2).save_pretrained(
        tmp_path_factory.mktemp("lbr2") / "model")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ray_data_embedding_matches_in_process_encode(model_dir, ray_session, tmp_path):
    from stages import LBRModel

    docs = _docs(70)
    ray_emb = embed_docs_ray(str(model_dir), docs, tmp_path / "emb",
                             EmbedConfig(batch_size=8, num_actors=2, rows_per_block=16))
    assert len(list((tmp_path / "emb").glob("*.parquet"))) >= 1
    local = embed_docs_local(LBRModel.from_pretrained(model_dir), docs, batch_size=5)
    order = np.argsort(local.ids)
    assert ray_emb.ids == [local.ids[i] for i in order]
    np.testing.assert_allclose(ray_emb.vectors, local.vectors[order], atol=1e-5)
    assert ray_emb.hashes == [content_hash(doc_text(docs[i])) for i in order]
    np.testing.assert_allclose(np.linalg.norm(ray_emb.vectors, axis=1), 1.0, atol=1e-5)


def test_model_path_build_search_reindex(model_dir, other_model_dir, ray_session, tmp_path, capsys):
    from jobs import build_index, reindex, search
    from pipeline.index.manifest import load_manifest
    from pipeline.index.search import index_vectors
    from pipeline.model_paths import model_fingerprint

    docs = _docs(60, seed=1)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", docs)
    ix = tmp_path / "ix"
    assert build_index.main(["--model", str(model_dir), "--corpus", str(corpus), "--out", str(ix),
                             "--shards", "3", "--factory", "Flat", "--batch-size", "8"]) == 0
    m = load_manifest(ix)
    assert m["model"]["fingerprint"] == model_fingerprint(model_dir) and m["num_docs"] == 60

    # each document's own text retrieves itself first (same encoder, same doc_text)
    queries = _write_jsonl(tmp_path / "q.jsonl", [{"_id": f"q{i}", "text": doc_text(docs[i])} for i in range(10)])
    assert search.main(["--index", str(ix), "--queries", str(queries), "--out", str(tmp_path / "run.jsonl"),
                        "-k", "5"]) == 0
    run = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [r["query_id"] for r in run] == [f"q{i}" for i in range(10)]
    for i, r in enumerate(run):
        assert len(r["hits"]) == 5 and r["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert doc_text(docs[int(r["hits"][0]["id"][1:])]) == doc_text(docs[i])
    capsys.readouterr()
    assert search.main(["--index", str(ix), "--model", str(other_model_dir), "--query", "x"]) == 2
    assert "fingerprint" in capsys.readouterr().err

    # change 3, delete 2, add 4 -> re-index embeds 7 docs and equals a fresh build
    new = [dict(d) for d in docs if d["_id"] not in ("d7", "d8")]
    for d in new[:3]:
        d["text"] += " revised"
    new += _docs(4, seed=9)
    for j, d in enumerate(new[-4:]):
        d["_id"] = f"n{j}"
    corpus2 = _write_jsonl(tmp_path / "corpus2.jsonl", new)
    assert reindex.main(["--index", str(ix), "--corpus", str(corpus2), "--batch-size", "8"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (rep["added"], rep["changed"], rep["deleted"]) == (4, 3, 2)
    assert build_index.main(["--model", str(model_dir), "--corpus", str(corpus2), "--out", str(tmp_path / "fresh"),
                             "--shards", "3", "--factory", "Flat", "--no-ray"]) == 0
    a_ids, a_vec = index_vectors(ix)
    b_ids, b_vec = index_vectors(tmp_path / "fresh")
    assert a_ids == b_ids and len(a_ids) == 62
    np.testing.assert_allclose(a_vec, b_vec, atol=1e-5)

    before = (ix / "manifest.json").read_bytes()
    assert reindex.main(["--index", str(ix), "--corpus", str(corpus2), "--no-ray"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["published"] is False
    assert (ix / "manifest.json").read_bytes() == before
    assert reindex.main(["--index", str(ix), "--corpus", str(corpus2), "--model", str(other_model_dir)]) == 2
    assert "full rebuild" in capsys.readouterr().err


def test_mining_through_ray_data(ray_session, tmp_path):
    """Mining with the Ray Data embedding path (lexical hashing encoder so positives rank high)."""
    from pipeline.index.mining import mine_negatives
    from stages.negatives import NegativeConfig

    rng = random.Random(3)
    vocab = [f"t{i}" for i in range(400)]
    docs = [{"_id": f"doc{i}", "title": "", "text": " ".join(rng.sample(vocab, 10))} for i in range(120)]
    data = tmp_path / "beir"
    (data / "qrels").mkdir(parents=True)
    _write_jsonl(data / "corpus.jsonl", docs)
    _write_jsonl(data / "queries.jsonl", [{"_id": f"q{i}", "text": " ".join(docs[i]["text"].split()[:5])}
                                          for i in range(10)])
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                              + "".join(f"q{i}\tdoc{i}\t1\n" for i in range(10)))
    cfg = NegativeConfig(top_k=30, num_negatives=3, margin=0.05, range_min=2, range_max=30)
    out = tmp_path / "neg.parquet"
    report = mine_negatives("hashing:128", data, out, cfg, EmbedConfig(batch_size=16, rows_per_block=40))
    rows = pq.read_table(out).to_pylist()
    assert report.rows == len(rows) == 10
    enc = HashingEncoder(128)
    dv = embed_texts_local(enc, [doc_text(d) for d in docs])
    for r in rows:  # same rules as the pure selection, checked against an in-process embedding
        qv = embed_texts_local(enc, [r["query"]])[0]
        pos_score = float(qv @ dv[int(r["positive_id"][3:])])
        assert r["positive_id"] not in r["negative_ids"] and len(r["negative_ids"]) == 3
        assert all(float(qv @ dv[int(n[3:])]) <= pos_score - 0.05 + 1e-6 for n in r["negative_ids"])
