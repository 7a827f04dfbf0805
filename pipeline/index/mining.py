"""Hard-negative mining: embed corpus + queries, exact top-k, select with the false-negative filter.

Why exact search (inner product over every document): an approximate retriever would silently change
which documents count as "hard". The selection rule lives in `stages.negatives` (pure, unit-tested);
this module only feeds it.

Streaming (like an index build): the corpus is staged as Parquet partitioned by `sha1(id) mod P` with
its vectors and texts (Ray Data read tasks -> embedding actors); one task per partition searches every
query against that partition a batch at a time and keeps its top-k per query plus the scores of the
qrels' positives found there; the driver merges P × top-k per query (queries, their vectors and the
qrels stay in memory; documents never do), selects, and fetches only the texts of the selected
documents (one task per partition).

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

from pipeline.index.embed import EmbedConfig, embed_texts_local, load_encoder, vectors_from_column
from stages.negatives import NegativeConfig, select_negatives


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
    """Rank every doc for every query (exact inner product, in memory), then select per (query, positive)."""
    doc_ids = list(doc_ids)
    pos_of = {d: i for i, d in enumerate(doc_ids)}
    qpos = {q: i for i, q in enumerate(query_ids)}
    dv = np.ascontiguousarray(doc_vecs, dtype=np.float32)
    qv = np.ascontiguousarray(query_vecs, dtype=np.float32)
    index = faiss.IndexFlatIP(dv.shape[1])
    index.add(dv)
    k = min(cfg.top_k, len(doc_ids))
    work = [q for q in qrels if q in qpos and any(g > 0 for g in qrels[q].values())]
    scores, idx = index.search(qv[[qpos[q] for q in work]], k) if work else (np.zeros((0, k)), np.zeros((0, k)))
    ranked = [[doc_ids[j] if j >= 0 else "" for j in row] for row in idx]
    pos_scores = {(q, p): float(qv[qpos[q]] @ dv[pos_of[p]])
                  for q in work for p, g in qrels[q].items() if g > 0 and p in pos_of}
    return select_rows(work, ranked, [list(map(float, r)) for r in scores], pos_scores, qrels, cfg,
                       skipped_q=sum(1 for q in qrels if q not in qpos))


def select_rows(work: list[str], ranked: list[list[str]], scores: list[list[float]],
                pos_scores: Mapping[tuple[str, str], float], qrels: Mapping[str, Mapping[str, int]],
                cfg: NegativeConfig, skipped_q: int = 0) -> tuple[MinedRows, MiningReport]:
    """The selection for every (query, positive): `ranked`/`scores` are each query's exact top-k;
    `pos_scores` holds (query, positive) scores for the positives present in the corpus."""
    rows = MinedRows([], [], [])
    filtered = skipped_p = 0
    without: list[str] = []
    for r, q in enumerate(work):
        positives = {d for d, g in qrels[q].items() if g > 0}
        got_any = False
        for p in sorted(positives):
            if (q, p) not in pos_scores:
                skipped_p += 1
                continue
            sel = select_negatives(q, p, pos_scores[(q, p)], ranked[r], scores[r], positives, cfg)
            filtered += sel.filtered_false_negatives
            # a row needs the full n negatives: stage 2 batches them as a fixed (B, n) block
            if len(sel.negatives) >= cfg.num_negatives:
                got_any = True
                rows.query_ids.append(q)
                rows.positive_ids.append(p)
                rows.negative_ids.append(sel.negatives)
        if not got_any and any((q, p) in pos_scores for p in positives):
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
               texts: Mapping[str, str]) -> Path:
    """Write the mined rows atomically (temp file + rename); `texts`: doc_text of every document named."""
    table = pa.table({
        "query_id": pa.array(rows.query_ids, pa.string()),
        "positive_id": pa.array(rows.positive_ids, pa.string()),
        "negative_ids": pa.array(rows.negative_ids, pa.list_(pa.string())),
        "query": pa.array([queries[q] for q in rows.query_ids], pa.string()),
        "positive": pa.array([texts[p] for p in rows.positive_ids], pa.string()),
        "negatives": pa.array([[texts[n] for n in ns] for ns in rows.negative_ids], pa.list_(pa.string())),
    })
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------ partition tasks


def _embed_queries(model_ref: str, texts: list[str], batch_size: int) -> np.ndarray:
    return embed_texts_local(load_encoder(model_ref), texts, batch_size)


def search_partition(files: list[str], qv: np.ndarray, k: int, positives: dict[str, list[int]]
                     ) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, str], float]]:
    """Exact top-k of every query over one partition, a batch of documents at a time.

    Returns (scores (Q, k'), ids (Q, k') object array, {(query row, positive id): score} for the
    positives found in this partition). Duplicate ids (same partition by construction) fail here."""
    from pipeline.index.build import _duplicate_error
    from pipeline.index.stage import iter_batches, read_columns

    paths = [Path(f) for f in files]
    meta = read_columns(paths, ["id", "src_file", "src_order", "src_line"])
    if meta is not None:
        _duplicate_error(meta)
    del meta
    nq = len(qv)
    best_s = np.full((nq, 0), -np.inf, np.float32)
    best_i = np.empty((nq, 0), dtype=object)
    pos: dict[tuple[int, str], float] = {}
    for b in iter_batches(paths, ["id", "vector"]):
        ids = np.asarray(b.column(0).to_pylist(), dtype=object)
        dv = vectors_from_column(b.column(1), qv.shape[1])
        index = faiss.IndexFlatIP(dv.shape[1])
        index.add(dv)
        s, j = index.search(qv, min(k, len(ids)))
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, ids[j]], axis=1)
        if best_s.shape[1] > k:
            keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
            best_s = np.take_along_axis(best_s, keep, 1)
            best_i = np.take_along_axis(best_i, keep, 1)
        for r, d in enumerate(ids):
            for qi in positives.get(d, ()):
                pos[(qi, d)] = float(qv[qi] @ dv[r])
    return best_s, best_i, pos


def partition_texts(files: list[str], needed: set[str]) -> dict[str, str]:
    from pipeline.index.stage import iter_batches

    out = {}
    for b in iter_batches([Path(f) for f in files], ["id", "text"]):
        for d, t in zip(b.column(0).to_pylist(), b.column(1).to_pylist()):
            if d in needed:
                out[d] = t
    return out


def mine_negatives(model_ref: str, data_dir: str | os.PathLike, out: str | os.PathLike, cfg: NegativeConfig,
                   embed_cfg: EmbedConfig | None = None, use_ray: bool = True,
                   split: str = "test", max_without: float = 0.0, partitions: int = 8) -> MiningReport:
    """BEIR folder -> mined Parquet, the corpus streamed (see the module docstring). Raises
    NoNegativesError (nothing written) if a query gets none."""
    from pipeline.index.build import run_tasks
    from pipeline.index.stage import count_rows, shard_files, stage_corpus
    from stages.readers import make_quarantine, qrels_doc_ids, read_beir_queries, read_qrels

    embed_cfg = embed_cfg or EmbedConfig()
    folder = Path(data_dir)
    files = {"corpus": folder / "corpus.jsonl", "queries": folder / "queries.jsonl",
             "qrels": folder / "qrels" / f"{split}.tsv"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if not folder.is_dir() or missing:
        raise FileNotFoundError(f"{folder} is not a BEIR folder: missing {', '.join(missing) or 'the folder'}")
    q = make_quarantine(False, None)
    queries_all = read_beir_queries(files["queries"], q)
    if use_ray:
        from pipeline.cluster import ensure_ray

        ensure_ray()
    with tempfile.TemporaryDirectory(prefix="lbr-mine-") as tmp:
        stage = stage_corpus(files["corpus"], Path(tmp) / "emb", partitions, model_ref, embed_cfg, use_ray,
                             keep_text=True, beir=True)
        pfiles = [[str(f) for f in shard_files(stage, i)] for i in range(partitions)]
        total = sum(count_rows([Path(f) for f in fs]) for fs in pfiles)
        named = qrels_doc_ids(files["qrels"])
        # which qrels documents exist: partition ids only, one task each (found ids <= qrels size)
        found = set().union(*run_tasks(_ids_in, [(fs, named) for fs in pfiles], use_ray)) if named else set()
        qrels = read_qrels(files["qrels"], q, found, queries_all)
        queries = {qid: t for qid, t in queries_all.items() if qid in qrels}
        if not queries:
            raise ValueError(f"{data_dir}: no query of qrels/{split}.tsv appears in queries.jsonl")
        work = [x for x in queries if any(g > 0 for g in qrels[x].values())]
        texts = [queries[x] for x in work]
        qv = (run_tasks(_embed_queries, [(str(model_ref), texts, embed_cfg.batch_size)], use_ray)[0] if texts
              else np.zeros((0, 1), np.float32))
        qv = np.ascontiguousarray(qv, dtype=np.float32)
        k = min(cfg.top_k, total)
        positives: dict[str, list[int]] = {}
        for r, x in enumerate(work):
            for d, g in qrels[x].items():
                if g > 0:
                    positives.setdefault(d, []).append(r)
        parts = run_tasks(search_partition, [(fs, qv, k, positives) for fs in pfiles if fs], use_ray) if work else []
        ranked, scores, pos_scores = _merge(parts, len(work), k)
        pos = {(work[r], d): s for (r, d), s in pos_scores.items()}
        rows, report = select_rows(work, ranked, scores, pos, qrels, cfg,
                                   skipped_q=sum(1 for x in qrels if x not in queries_all))
        check_report(report, cfg, max_without)
        needed = set(rows.positive_ids) | {n for ns in rows.negative_ids for n in ns}
        doc_texts: dict[str, str] = {}
        for part in run_tasks(partition_texts, [(fs, needed) for fs in pfiles if fs], use_ray):
            doc_texts.update(part)
        write_rows(out, rows, queries, doc_texts)
    return report


def _ids_in(files: list[str], named: set[str]) -> set[str]:
    from pipeline.index.stage import iter_batches

    return {d for b in iter_batches([Path(f) for f in files], ["id"]) for d in b.column(0).to_pylist()
            if d in named}


def _merge(parts: list, nq: int, k: int) -> tuple[list[list[str]], list[list[float]], dict]:
    """Each query's exact top-k over all partitions (ties: higher score first, then partition order)."""
    pos: dict = {}
    if not parts:
        return [[] for _ in range(nq)], [[] for _ in range(nq)], pos
    s = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    for p in parts:
        pos.update(p[2])
    keep = np.argsort(-s, axis=1, kind="stable")[:, :k]
    s, ids = np.take_along_axis(s, keep, 1), np.take_along_axis(ids, keep, 1)
    return [list(r) for r in ids], [list(map(float, r)) for r in s], pos
