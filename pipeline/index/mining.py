"""Hard-negative mining: embed corpus + queries, exact FAISS top-k, select with the false-negative filter.

Why exact search (IndexFlatIP) here: mining corpora are small next to serving corpora, and an
approximate retriever would silently change which documents count as "hard". The selection rule
lives in `stages.negatives` (pure, unit-tested); this module only feeds it.

Output Parquet, one row per (query, positive) pair: query_id, positive_id, negative_ids (list),
query, positive, negatives (list) — texts via `stages.text.doc_text`, ready for stage 2.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index.embed import (
    EmbedConfig,
    embed_texts_local,
    embed_to_parquet,
    load_encoder,
    read_embeddings,
)
from stages.negatives import NegativeConfig, select_negatives
from stages.text import doc_text


class NoNegativesError(RuntimeError):
    """Some queries got no hard negative at all (the filter or window left nothing)."""


@dataclass(frozen=True)
class MinedRows:
    query_ids: list[str]
    positive_ids: list[str]
    negative_ids: list[list[str]]


@dataclass(frozen=True)
class MiningReport:
    queries: int
    rows: int
    negatives: int
    filtered_false_negatives: int
    skipped_unknown_query: int = 0
    skipped_unknown_positive: int = 0
    queries_without_negatives: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def mine_from_vectors(query_ids: Sequence[str], query_vecs: np.ndarray, doc_ids: Sequence[str],
                      doc_vecs: np.ndarray, qrels: Mapping[str, Mapping[str, int]],
                      cfg: NegativeConfig) -> tuple[MinedRows, MiningReport]:
    """Rank every doc for every query (exact inner product), then select per (query, positive)."""
    doc_ids = list(doc_ids)
    pos_of = {d: i for i, d in enumerate(doc_ids)}
    qpos = {q: i for i, q in enumerate(query_ids)}
    dv = np.ascontiguousarray(doc_vecs, dtype=np.float32)
    qv = np.ascontiguousarray(query_vecs, dtype=np.float32)
    index = faiss.IndexFlatIP(dv.shape[1])
    index.add(dv)
    k = min(cfg.top_k, len(doc_ids))
    work = [q for q in qrels if q in qpos and any(g > 0 for g in qrels[q].values())]
    skipped_q = sum(1 for q in qrels if q not in qpos)
    scores, idx = index.search(qv[[qpos[q] for q in work]], k) if work else (np.zeros((0, k)), np.zeros((0, k)))
    rows = MinedRows([], [], [])
    filtered = skipped_p = 0
    without: list[str] = []
    for r, q in enumerate(work):
        positives = {d for d, g in qrels[q].items() if g > 0}
        ranked = [doc_ids[j] if j >= 0 else "" for j in idx[r]]
        got_any = False
        for p in sorted(positives):
            if p not in pos_of:
                skipped_p += 1
                continue
            pos_score = float(qv[qpos[q]] @ dv[pos_of[p]])
            sel = select_negatives(q, p, pos_score, ranked, scores[r].tolist(), positives, cfg)
            filtered += sel.filtered_false_negatives
            # a row needs the full n negatives: stage 2 batches them as a fixed (B, n) block
            if len(sel.negatives) >= cfg.num_negatives:
                got_any = True
                rows.query_ids.append(q)
                rows.positive_ids.append(p)
                rows.negative_ids.append(sel.negatives)
        if not got_any and any(p in pos_of for p in positives):
            without.append(q)
    report = MiningReport(len(work), len(rows.query_ids), sum(map(len, rows.negative_ids)), filtered,
                          skipped_q, skipped_p, without)
    return rows, report


def check_report(report: MiningReport, cfg: NegativeConfig, max_without: float = 0.0) -> None:
    """Fail when more than `max_without` (a fraction) of the queries got fewer than n negatives.

    Below that bound those queries are left out of the output and listed in the report, never dropped
    silently; the default 0.0 fails on the first one.
    """
    n_without = len(report.queries_without_negatives)
    if n_without and n_without > max_without * report.queries:
        ex = ", ".join(repr(q) for q in report.queries_without_negatives[:5])
        raise NoNegativesError(
            f"{n_without} of {report.queries} queries got fewer than {cfg.num_negatives} hard negatives "
            f"(allowed: {max_without:.0%}) "
            f"(e.g. {ex}); {report.filtered_false_negatives} candidates were filtered as likely false "
            f"negatives. Widen the window (range_min={cfg.range_min}, range_max={cfg.range_max}), raise "
            f"top_k={cfg.top_k} or lower margin={cfg.margin}.")
    if report.rows == 0:
        raise NoNegativesError(f"no training rows were produced from {report.queries} queries "
                               f"(unknown positives: {report.skipped_unknown_positive})")


def write_rows(out: str | os.PathLike, rows: MinedRows, queries: Mapping[str, str],
               corpus: Mapping[str, Mapping]) -> Path:
    """Write the mined rows atomically (temp file + rename)."""
    table = pa.table({
        "query_id": pa.array(rows.query_ids, pa.string()),
        "positive_id": pa.array(rows.positive_ids, pa.string()),
        "negative_ids": pa.array(rows.negative_ids, pa.list_(pa.string())),
        "query": pa.array([queries[q] for q in rows.query_ids], pa.string()),
        "positive": pa.array([doc_text(corpus[p]) for p in rows.positive_ids], pa.string()),
        "negatives": pa.array([[doc_text(corpus[n]) for n in ns] for ns in rows.negative_ids],
                              pa.list_(pa.string())),
    })
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return out


def embed_queries_and_docs(model_ref: str, query_texts: Mapping[str, str], corpus: Mapping[str, Mapping],
                           use_ray: bool, embed_cfg: EmbedConfig) -> tuple[np.ndarray, np.ndarray]:
    """(query vectors in query_texts order, doc vectors in corpus order), one pass over both."""
    qids, dids = list(query_texts), list(corpus)
    texts = [query_texts[q] for q in qids] + [doc_text(corpus[d]) for d in dids]
    if not use_ray:
        v = embed_texts_local(load_encoder(model_ref), texts, embed_cfg.batch_size)
        return v[: len(qids)], v[len(qids):]
    keys = [f"q:{q}" for q in qids] + [f"d:{d}" for d in dids]  # query and doc ids may collide
    with tempfile.TemporaryDirectory(prefix="lbr-mine-emb-") as tmp:
        emb = read_embeddings(embed_to_parquet(model_ref, keys, texts, tmp, embed_cfg))
    row = {k: i for i, k in enumerate(emb.ids)}
    v = emb.vectors[[row[k] for k in keys]]
    return v[: len(qids)], v[len(qids):]


def mine_negatives(model_ref: str, data_dir: str | os.PathLike, out: str | os.PathLike, cfg: NegativeConfig,
                   embed_cfg: EmbedConfig | None = None, use_ray: bool = True,
                   split: str = "test", max_without: float = 0.0) -> MiningReport:
    """BEIR folder -> mined Parquet. Raises NoNegativesError (nothing written) if a query gets none."""
    from stages.readers import read_beir

    embed_cfg = embed_cfg or EmbedConfig()
    data = read_beir(data_dir, split=split)
    queries = {q: t for q, t in data.queries.items() if q in data.qrels}
    if not queries:
        raise ValueError(f"{data_dir}: no query of qrels/{split}.tsv appears in queries.jsonl")
    qv, dv = embed_queries_and_docs(model_ref, queries, data.corpus, use_ray, embed_cfg)
    rows, report = mine_from_vectors(list(queries), qv, list(data.corpus), dv, data.qrels, cfg)
    report = MiningReport(**{**report.as_dict(),
                             "skipped_unknown_query": sum(1 for q in data.qrels if q not in data.queries)})
    check_report(report, cfg, max_without)
    write_rows(out, rows, queries, data.corpus)
    return report
