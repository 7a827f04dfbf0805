"""Hard-negative selection: never a positive, margin and rank window respected, deterministic."""
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.index.mining import NoNegativesError, check_report, mine_from_vectors
from stages.negatives import NegativeConfig, select_negatives


def _ranked(rng: random.Random, n: int):
    scores = sorted((rng.uniform(-1, 1) for _ in range(n)), reverse=True)
    return [f"d{rng.randrange(10_000)}" for _ in range(n)], scores


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="range_min"):
        NegativeConfig(range_min=10, range_max=5)
    with pytest.raises(ValueError, match="margin"):
        NegativeConfig(margin=-0.1)
    with pytest.raises(ValueError, match="top_k"):
        NegativeConfig(top_k=2, range_min=3)


def test_selection_rules_hold_on_random_rankings():
    rng = random.Random(0)
    for trial in range(500):
        cfg = NegativeConfig(top_k=30, num_negatives=rng.randint(1, 6), margin=rng.choice([0.0, 0.05, 0.2]),
                             range_min=rng.randint(1, 10), range_max=rng.randint(10, 40), seed=trial)
        ids, scores = _ranked(rng, 30)
        positives = set(rng.sample(ids, 3))
        pos_score = rng.uniform(-0.5, 1)
        sel = select_negatives(f"q{trial}", "p", pos_score, ids, scores, positives, cfg)
        rank = {}
        for r, d in enumerate(ids, start=1):
            rank.setdefault(d, r)
        assert len(sel.negatives) <= cfg.num_negatives
        assert len(set(sel.negatives)) == len(sel.negatives)
        for n in sel.negatives:
            assert n not in positives
            assert cfg.range_min <= rank[n] <= min(cfg.range_max, cfg.top_k)
            assert scores[rank[n] - 1] <= pos_score - cfg.margin
        # returned in rank order
        assert [rank[n] for n in sel.negatives] == sorted(rank[n] for n in sel.negatives)
        # the reported false-negative count is exactly the in-window, non-positive, too-close candidates
        seen, expect = set(), 0
        for r, (d, s) in enumerate(zip(ids, scores), start=1):
            if cfg.range_min <= r <= min(cfg.range_max, cfg.top_k) and d not in positives and d not in seen:
                seen.add(d)
                expect += s > pos_score - cfg.margin
        assert sel.filtered_false_negatives == expect
        assert len(sel.negatives) == min(cfg.num_negatives, sel.eligible)
        # deterministic for the same (seed, query, positive)
        assert select_negatives(f"q{trial}", "p", pos_score, ids, scores, positives, cfg) == sel


def test_seed_changes_the_draw_but_not_the_pool():
    ids = [f"d{i}" for i in range(50)]
    scores = list(np.linspace(0.5, -0.5, 50))
    draws = {tuple(select_negatives("q", "p", 0.9, ids, scores, set(), NegativeConfig(seed=s)).negatives)
             for s in range(10)}
    assert len(draws) > 1


def _clustered(seed=0, n_docs=400, d=16):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, d))
    label = rng.integers(0, 20, n_docs)
    dv = centers[label] + 0.3 * rng.standard_normal((n_docs, d))
    dv = (dv / np.linalg.norm(dv, axis=1, keepdims=True)).astype(np.float32)
    doc_ids = [f"d{i}" for i in range(n_docs)]
    qrels, qv = {}, []
    for q in range(60):
        first = int(rng.integers(n_docs))
        second = int(rng.choice([j for j in np.flatnonzero(label == label[first]) if j != first]))
        pos = [first, second]
        v = dv[first] + 0.05 * rng.standard_normal(d)
        qv.append(v / np.linalg.norm(v))
        qrels[f"q{q}"] = {doc_ids[pos[0]]: 1, doc_ids[pos[1]]: 2, doc_ids[(pos[0] + 1) % n_docs]: 0}
    return [f"q{q}" for q in range(60)], np.asarray(qv, np.float32), doc_ids, dv, qrels


def test_mine_from_vectors_excludes_positives_and_respects_margin_and_window():
    qids, qv, dids, dv, qrels = _clustered()
    cfg = NegativeConfig(top_k=40, num_negatives=4, margin=0.05, range_min=3, range_max=30)
    rows, report = mine_from_vectors(qids, qv, dids, dv, qrels, cfg)
    assert report.rows == len(rows.query_ids) > 0
    assert report.filtered_false_negatives > 0  # clustered data: many near-duplicates get filtered
    dpos = {d: i for i, d in enumerate(dids)}
    qpos = {q: i for i, q in enumerate(qids)}
    for q, p, negs in zip(rows.query_ids, rows.positive_ids, rows.negative_ids):
        positives = {d for d, g in qrels[q].items() if g > 0}
        assert p in positives and 1 <= len(negs) <= 4
        order = np.argsort(-(dv @ qv[qpos[q]]), kind="stable")
        rank = {dids[j]: r for r, j in enumerate(order, start=1)}
        pos_score = float(qv[qpos[q]] @ dv[dpos[p]])
        for n in negs:
            assert n not in positives
            assert 3 <= rank[n] <= 30
            assert float(qv[qpos[q]] @ dv[dpos[n]]) <= pos_score - 0.05 + 1e-6
    check_report(report, cfg)


def test_no_negatives_fails_loudly():
    qids, qv, dids, dv, qrels = _clustered()
    cfg = NegativeConfig(top_k=10, margin=1.5, range_min=3, range_max=10)  # every candidate is "too close"
    _, report = mine_from_vectors(qids, qv, dids, dv, qrels, cfg)
    assert report.rows == 0 and len(report.queries_without_negatives) == 60
    with pytest.raises(NoNegativesError, match=r"60 of 60 queries got fewer than 4 hard negatives.*filtered"):
        check_report(report, cfg)
    with pytest.raises(NoNegativesError, match="60 of 60"):
        check_report(report, cfg, max_without=0.5)       # a tolerance below the observed fraction still fails


def test_bounded_fraction_without_negatives_is_reported_not_fatal():
    qids, qv, dids, dv, qrels = _clustered()
    cfg = NegativeConfig(top_k=10, margin=0.05, range_min=3, range_max=10)
    rows, report = mine_from_vectors(qids, qv, dids, dv, qrels, cfg)
    # make a few queries impossible: their only eligible candidates become "too close"
    few = NegativeConfig(top_k=10, margin=0.05, range_min=10, range_max=10, num_negatives=1)
    rows, report = mine_from_vectors(qids, qv, dids, dv, qrels, few)
    n_without = len(report.queries_without_negatives)
    assert report.rows + n_without >= report.queries and report.rows > 0
    frac = n_without / report.queries
    check_report(report, few, max_without=min(1.0, frac + 1e-9))          # within the bound: no error
    assert set(report.queries_without_negatives).isdisjoint(rows.query_ids)  # left out, and listed
    if n_without:
        with pytest.raises(NoNegativesError):
            check_report(report, few, max_without=frac / 2)


def _write_beir(folder, n_queries=12):
    """Small BEIR folder where each query shares its words with its positive (lexical encoder works)."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    folder.mkdir(parents=True)
    (folder / "qrels").mkdir()
    docs, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for i in range(150):
        docs.append({"_id": f"doc{i}", "title": "", "text": " ".join(rng.sample(vocab, 12))})
    for q in range(n_queries):
        words = docs[q]["text"].split()[:6]
        queries.append({"_id": f"q{q}", "text": " ".join(words)})
        qrels.append(f"q{q}\tdoc{q}\t1")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(d) + "\n" for d in queries))
    (folder / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return folder


def test_mine_job_writes_rows_and_exits_nonzero_when_nothing_survives(tmp_path, capsys):
    from jobs.mine_negatives import main

    data = _write_beir(tmp_path / "beir")
    out = tmp_path / "neg.parquet"
    args = ["--model", "hashing:256", "--data", str(data), "--out", str(out), "--no-ray",
            "--top-k", "40", "--range-min", "2", "--range-max", "40", "--margin", "0.05"]
    assert main(args) == 0
    t = pq.read_table(out).to_pylist()
    assert len(t) == 12
    for row in t:
        assert row["positive_id"] not in row["negative_ids"] and len(row["negatives"]) == 4
        assert row["positive"].startswith(row["query"])
    assert "filtered as likely false negatives" in capsys.readouterr().out
    bad = tmp_path / "bad.parquet"
    rc = main(["--model", "hashing:256", "--data", str(data), "--out", str(bad), "--no-ray", "--margin", "2.5"])
    assert rc == 3 and not bad.exists()
    assert "12 of 12 queries got fewer than 4 hard negatives" in capsys.readouterr().err
