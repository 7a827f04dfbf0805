"""Metrics against a hand-computed example with graded relevance.

nDCG@10 (Järvelin, linear gain, as trec_eval/BEIR):  DCG = sum_{i<=10} rel_i / log2(i + 1),
nDCG = DCG / IDCG where IDCG is the DCG of the qrels sorted by grade.
Recall@100 = |relevant in top 100| / |relevant|;  MRR@10 = 1 / rank of first relevant (0 if > 10).
"relevant" = grade >= 1; grade 0 is judged non-relevant.
"""
from math import log2

import pytest

from stages.metrics import retrieval_metrics

QRELS = {
    "q1": {"d1": 2, "d2": 1, "d3": 0},
    "q2": {"d5": 1},
    "q3": {"d7": 3},
    "q4": {"d9": 0},            # no relevant doc -> excluded
    "q6": {"d1": 1},            # judged but missing from the run -> zeros
}
RUN = {
    # ranks: d3 (grade 0), d1 (2), d4 (unjudged), d2 (1)
    "q1": {"d3": 0.9, "d1": 0.8, "d4": 0.7, "d2": 0.6},
    # the relevant doc at rank 11: outside @10, inside @100
    "q2": {**{f"x{i}": 1.0 - i / 100 for i in range(10)}, "d5": 0.5},
    "q3": {"d7": 2.0, "d1": 1.0},
    "q4": {"d9": 1.0},
    "q5": {"d1": 1.0},          # not in qrels -> ignored
}


def test_graded_hand_computed():
    dcg_q1 = 0 / log2(2) + 2 / log2(3) + 0 / log2(4) + 1 / log2(5)
    idcg_q1 = 2 / log2(2) + 1 / log2(3)
    ndcg = [dcg_q1 / idcg_q1, 0.0, 1.0, 0.0]        # q1, q2, q3, q6
    recall = [2 / 2, 1 / 1, 1 / 1, 0.0]
    mrr = [1 / 2, 0.0, 1.0, 0.0]                   # q2: first relevant at rank 11 > 10
    got = retrieval_metrics(QRELS, RUN)
    assert got["num_queries"] == 4
    assert got["ndcg@10"] == pytest.approx(sum(ndcg) / 4, abs=1e-9)
    assert got["recall@100"] == pytest.approx(sum(recall) / 4, abs=1e-9)
    assert got["mrr@10"] == pytest.approx(sum(mrr) / 4, abs=1e-9)
    assert dcg_q1 / idcg_q1 == pytest.approx(0.6433, abs=1e-4)


def test_grades_matter():
    # same ranking, grades swapped: d1 (now 1) at rank 2, d2 (now 2) at rank 4
    q = {"q1": {"d1": 1, "d2": 2, "d3": 0}}
    got = retrieval_metrics(q, {"q1": RUN["q1"]})
    expected = (1 / log2(3) + 2 / log2(5)) / (2 / log2(2) + 1 / log2(3))
    assert got["ndcg@10"] == pytest.approx(expected, abs=1e-9)


def test_empty_run_and_bad_input():
    assert retrieval_metrics({"q": {"d": 1}}, {}) == {
        "ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0, "num_queries": 1}
    with pytest.raises(ValueError, match="no query has a relevant"):
        retrieval_metrics({"q": {"d": 0}}, {"q": {"d": 1.0}})
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics({"q": {"d": 0.5}}, {"q": {"d": 1.0}})
