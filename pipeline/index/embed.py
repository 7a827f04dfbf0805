"""Batch embedding of documents: Ray Data actor pool (jobs) and an in-process loop (tests, bench).

Why two paths: the Ray path streams a large corpus through actors that each load the model once
(GPU actors on a GPU cluster, fractional-CPU actors on a laptop); the in-process path is the
reference the Ray path must match and the baseline the benchmark compares against.

Every document becomes text through `stages.text.doc_text`, and each embedding row carries
`content_hash = sha256(doc_text(doc))` so re-indexing can tell which documents changed.

A model reference is either a model folder (loaded with `LBRModel.from_pretrained`) or the
string ``hashing:<dim>``: a deterministic hashed bag-of-words encoder that needs no model, used to
test and benchmark the plumbing (Ray, Parquet, FAISS) independently of the network.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.text import doc_text

HASHING_PREFIX = "hashing:"


class Encoder(Protocol):
    embedding_dim: int

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray: ...


# rows per Ray Data actor call = EmbedConfig.batch_size x this. The encoder sorts a call's texts by length before
# batching, so a larger call pads less (MedQuAD dev vs one global sort: +14.5 % tokens at 64-row calls, +7.1 % at
# 128, +1.6 % at 512); the call's rows are still encoded batch_size at a time.
ACTOR_CALL_BATCHES = 32


@dataclass(frozen=True)
class EmbedConfig:
    """How the Ray Data embedding pass is sized.

    num_actors: actor-pool size (models loaded once per actor). num_cpus_per_actor is fractional
    so two actors fit a 2-core laptop beside the driver; on a GPU cluster each actor takes one GPU.
    rows_per_block: input is cut into blocks of this many rows so the pool can spread work.
    """

    batch_size: int = 32
    num_actors: int = 2
    num_cpus_per_actor: float = 0.5
    rows_per_block: int = 2048
    use_gpu: bool | None = None  # None: use GPUs when the Ray cluster has any

    def __post_init__(self):
        for name in ("batch_size", "num_actors", "rows_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"EmbedConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.num_cpus_per_actor > 0:
            raise ValueError(f"EmbedConfig.num_cpus_per_actor must be > 0, got {self.num_cpus_per_actor!r}")


class HashingEncoder:
    """Deterministic hashed bag-of-words encoder (no model): L2-normalised float32 vectors."""

    def __init__(self, dim: int = 64):
        if dim < 2:
            raise ValueError(f"HashingEncoder dim must be >= 2, got {dim}")
        self.embedding_dim = dim

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), self.embedding_dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for tok in re.findall(r"\w+", t.lower()):
                h = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=8).digest(), "little")
                out[i, h % self.embedding_dim] += 1.0 if (h >> 63) & 1 else -1.0
            if not out[i].any():
                out[i, 0] = 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _hashing_dim(ref: str) -> int:
    tail = ref[len(HASHING_PREFIX):]
    if not tail.isdigit() or not 2 <= int(tail) <= 65536:
        raise ValueError(f"model {ref!r}: expected hashing:<dim> with 2 <= dim <= 65536")
    return int(tail)


def load_encoder(model_ref: str | os.PathLike) -> Encoder:
    """Model folder (or a run folder holding one in model/) -> LBRModel; ``hashing:<dim>`` -> HashingEncoder."""
    ref = str(model_ref)
    if ref.startswith(HASHING_PREFIX):
        return HashingEncoder(_hashing_dim(ref))
    from pipeline.model_paths import resolve_model_dir

    ref = resolve_model_dir(ref)
    if not Path(ref).is_dir():
        raise FileNotFoundError(f"model folder {ref!r} does not exist")
    from stages import LBRModel

    return LBRModel.from_pretrained(ref)


def model_identity(model_ref: str | os.PathLike) -> dict:
    """{path, fingerprint, dimension} recorded in manifests; the fingerprint is what search/reindex compare.

    Checks the folder (config, weights, tokenizer present) without loading any weights, so entry points
    call it to refuse an unusable --model before starting Ray.
    """
    ref = str(model_ref)
    if ref.startswith(HASHING_PREFIX):
        return {"path": ref, "fingerprint": ref, "dimension": _hashing_dim(ref)}
    from pipeline.model_paths import model_dimension, model_fingerprint, resolve_model_dir

    ref = resolve_model_dir(ref)
    if not Path(ref).exists():
        raise FileNotFoundError(f"model folder {ref!r} does not exist")
    return {"path": str(Path(ref).resolve()), "fingerprint": model_fingerprint(ref),
            "dimension": model_dimension(ref)}


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def doc_texts(docs: Iterable[Mapping]) -> tuple[list[str], list[str]]:
    """(ids, texts) of BEIR docs, rejecting a doc without `_id` by position."""
    ids, texts = [], []
    for i, d in enumerate(docs):
        did = d.get("_id")
        if did is None or str(did) == "":
            raise ValueError(f"document #{i} has no '_id' field")
        ids.append(str(did))
        texts.append(doc_text(d))
    return ids, texts


@dataclass(frozen=True)
class Embeddings:
    ids: list[str]
    vectors: np.ndarray  # (N, d) float32, L2-normalised
    hashes: list[str]


def _as_f32(v: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
    if v.ndim != 2:
        raise ValueError(f"encoder returned shape {v.shape}, expected (N, d)")
    return v


def embed_texts_local(encoder: Encoder, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    if not texts:
        return np.zeros((0, encoder.embedding_dim), dtype=np.float32)
    return _as_f32(encoder.encode(list(texts), batch_size=batch_size))


def embed_docs_local(encoder: Encoder, docs: Iterable[Mapping], batch_size: int = 32) -> Embeddings:
    """In-process reference path: one encoder, one loop."""
    ids, texts = doc_texts(docs)
    return Embeddings(ids, embed_texts_local(encoder, texts, batch_size), [content_hash(t) for t in texts])


def vector_array(vecs: np.ndarray) -> pa.FixedSizeListArray:
    vecs = _as_f32(vecs)
    return pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), type=pa.float32()), vecs.shape[1])


def embeddings_table(ids: Sequence[str], vecs: np.ndarray, hashes: Sequence[str]) -> pa.Table:
    return pa.table({"id": pa.array(list(ids), pa.string()), "vector": vector_array(vecs),
                     "content_hash": pa.array(list(hashes), pa.string())})


def vectors_from_column(col: pa.ChunkedArray | pa.Array, dim: int | None = None) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, dim or 0), dtype=np.float32)
    d = arr.type.list_size if pa.types.is_fixed_size_list(arr.type) else len(arr[0])
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.astype(np.float32, copy=False).reshape(-1, d))


def embed_to_parquet(model_ref: str | os.PathLike, ids: Sequence[str], texts: Sequence[str],
                     out_dir: str | os.PathLike, cfg: EmbedConfig = EmbedConfig()) -> Path:
    """Embed (id, text) pairs with the index build's Ray Data actor pool (`encode_with_actors`); write
    Parquet files of (id, content_hash, vector)."""
    import ray

    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
    from pipeline.cluster import ensure_ray
    from pipeline.index.stage import encode_with_actors  # stage imports this module: imported here

    ensure_ray()
    table = pa.table({"id": pa.array(list(ids), pa.string()),
                      "content_hash": pa.array([content_hash(t) for t in texts], pa.string()),
                      "text": pa.array(list(texts), pa.string())})
    ds = encode_with_actors(ray.data.from_arrow(table), str(model_ref), cfg)     # it cuts call-sized blocks
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds.write_parquet(str(out))
    return out


def read_embeddings(folder: str | os.PathLike) -> Embeddings:
    """Load Parquet embedding shards, sorted by id (Ray writes shards in completion order)."""
    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet embedding shards in {folder}")
    t = pa.concat_tables([pq.read_table(f) for f in files])
    order = np.argsort(np.asarray(t.column("id").to_pylist(), dtype=object), kind="stable")
    t = t.take(pa.array(order))
    return Embeddings(t.column("id").to_pylist(), vectors_from_column(t.column("vector")),
                      t.column("content_hash").to_pylist())


def embed_docs_ray(model_ref: str | os.PathLike, docs: Iterable[Mapping], work_dir: str | os.PathLike,
                   cfg: EmbedConfig = EmbedConfig()) -> Embeddings:
    """Ray path end to end: embed to Parquet under `work_dir`, read back (sorted by id)."""
    ids, texts = doc_texts(docs)
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"duplicate document _id {i!r}")
        seen.add(i)
    return read_embeddings(embed_to_parquet(model_ref, ids, texts, work_dir, cfg))
