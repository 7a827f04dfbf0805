"""Retrieval metrics (nDCG@10, Recall@100, MRR@10) computed by ranx from plain dicts.

Why ranx: it is the reference implementation the project reports against, and its `ndcg` is the
Järvelin–Kekäläinen form (linear gain `rel / log2(rank + 1)`, as trec_eval/BEIR), so graded qrels
keep their integer grades. ranx imports numba (tens of seconds on a cold cache), so it is imported
lazily inside `retrieval_metrics`, never at module import.

Queries are judged only when they have at least one qrel with grade >= 1; the others are excluded
(their nDCG is undefined) and `num_queries` reports how many were judged. A judged query missing
from the run counts as zero on every metric; run queries without qrels are ignored.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

METRICS: tuple[str, ...] = ("ndcg@10", "recall@100", "mrr@10")


def _clean_qrels(qrels: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for qid, docs in qrels.items():
        judged = {}
        for did, grade in docs.items():
            if isinstance(grade, bool) or int(grade) != grade:
                raise ValueError(f"qrels[{qid!r}][{did!r}] = {grade!r}: grade must be an integer")
            judged[str(did)] = int(grade)
        if any(g >= 1 for g in judged.values()):
            out[str(qid)] = judged
    return out


def retrieval_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    metrics: tuple[str, ...] = METRICS,
) -> dict[str, float | int]:
    """Mean of each metric over judged queries, plus `num_queries` (how many were judged).

    `qrels`: {qid: {doc_id: integer grade}} (grade 0 = judged non-relevant).
    `run`:   {qid: {doc_id: score}}, higher score = better rank.
    """
    clean = _clean_qrels(qrels)
    if not clean:
        raise ValueError("qrels: no query has a relevant (grade >= 1) document; nothing to evaluate")
    from ranx import Qrels, Run, evaluate  # lazy: numba compile on first import

    run_d = {str(q): {str(d): float(s) for d, s in docs.items()}
             for q, docs in run.items() if str(q) in clean and docs}
    if not run_d:  # ranx cannot build an empty Run: every judged query scores zero
        return {**{m: 0.0 for m in metrics}, "num_queries": len(clean)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba's uint64->int64 cast warning on ids
        scores = evaluate(Qrels(clean), Run(run_d), list(metrics), make_comparable=True)
    if len(metrics) == 1:
        scores = {metrics[0]: scores}
    return {**{m: float(scores[m]) for m in metrics}, "num_queries": len(clean)}
