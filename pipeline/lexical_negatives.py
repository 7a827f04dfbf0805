"""Hard negatives for a stage-2 pairs file, mined lexically (BM25) before any model exists.

Why: at a CPU budget stage 2 sees each training pair about once, and most same-domain in-batch
negatives are easy (another disease, another module). A negative that shares the query's rare words —
the same disease's *other* question, a sibling function, a related molecule — is what makes the
embedding read the terms that decide relevance. BM25 needs no model, so these negatives exist before
stage 2 starts (the pipeline's model-mined negatives, `pipeline.e2e`, need an in-batch warm-up first).

Candidates for a row are the other rows of its group (`group_field`, e.g. the domain), each indexed as
its query + positive text: the query side makes the ranking work where a positive alone shares no words
with any query (description -> SMILES). A row's negative is a candidate's *positive*. The selection is
`stages.negatives.select_negatives`: a rank window that skips the top, never a row whose positive is
the same text, and no candidate that scores above ``own score - margin`` (the row's own query + positive
scored for its query: a candidate that looks at least as relevant is likely a false negative). A row
left with fewer than `num_negatives` negatives is reported, never silently padded.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.evaluate import BM25Config, BM25Retriever
from stages.negatives import NegativeConfig, select_negatives


@dataclass(frozen=True)
class LexicalMiningReport:
    rows: int
    filtered_false_negatives: int    # candidates in the window dropped as scoring like the positive
    short: list[int]                 # indices of rows left with fewer than num_negatives

    @property
    def with_negatives(self) -> int:
        """Rows that got all num_negatives negatives."""
        return self.rows - len(self.short)


def mine_bm25_negatives(rows: Sequence[dict], cfg: NegativeConfig, group_field: str | None = "domain",
                        query_field: str = "query", positive_field: str = "positive",
                        bm25: BM25Config | None = None) -> tuple[list[dict], LexicalMiningReport]:
    """Copies of `rows` with `negatives` (a list of texts, rank order) added; see the module doc.

    `cfg.margin` is in BM25 score units here (0: drop only candidates scoring above the row's own pair).
    Deterministic: the same rows and cfg give the same negatives in any process and order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        for f in (query_field, positive_field):
            if not isinstance(r.get(f), str) or not r[f].strip():
                raise ValueError(f"row {i}: field {f!r} must be a non-empty string to mine negatives")
        groups[str(r.get(group_field, "")) if group_field else ""].append(i)
    out = [dict(r) for r in rows]
    filtered, short = 0, []
    for g in sorted(groups):
        idx = groups[g]
        ids = [str(i) for i in idx]
        retriever = BM25Retriever(bm25 or BM25Config())
        retriever.index(ids, [rows[i][query_field] + "\n" + rows[i][positive_field] for i in idx])
        # top_k + 1: the candidates and, where it ranks among them, the row's own pair (O(rows x top_k) memory)
        ranked = retriever.search(ids, [rows[i][query_field] for i in idx], k=cfg.top_k + 1)
        by_text: dict[str, set[str]] = defaultdict(set)
        for i in idx:
            by_text[rows[i][positive_field]].add(str(i))
        for i, rid in zip(idx, ids):
            hits = ranked.get(rid, {})
            # the own pair below every candidate (or sharing no word with its query): each of them outscores it
            own = hits.get(rid, float("-inf"))
            cand = [(d, s) for d, s in hits.items() if d != rid][: cfg.top_k]
            sel = select_negatives(rid, rid, own, [d for d, _ in cand], [s for _, s in cand],
                                   by_text[rows[i][positive_field]], cfg)
            filtered += sel.filtered_false_negatives
            out[i]["negatives"] = [rows[int(d)][positive_field] for d in sel.negatives]
            if len(sel.negatives) < cfg.num_negatives:
                short.append(i)
    return out, LexicalMiningReport(len(rows), filtered, short)
