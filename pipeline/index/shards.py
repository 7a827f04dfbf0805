"""Shards: which document goes where, the shared trained (empty) index, building one shard's FAISS index.

* shard = sha1(id) mod N and int_id = first 8 bytes of sha1(id) (63 bits): both are stable across
  processes and runs (Python's hash() is salted), so a re-indexed index and a fresh build assign
  every document to the same shard with the same int64 id;
* IVF/PQ are trained once on a sample and the trained empty index is cloned to every shard, so the
  shards share one coarse quantizer and re-index can rebuild a single shard consistently;
* inner product on L2-normalised vectors (cosine), whatever the factory string.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index.embed import embeddings_table, vectors_from_column
from pipeline.index.layout import MAX_SHARDS, version_dir


@dataclass(frozen=True)
class IndexConfig:
    """factory: any FAISS index_factory string (Flat, IVF1024,Flat, IVF1024,PQ32, HNSW32, ...).

    nprobe / ef_search are search-time defaults stored in the manifest (overridable on open);
    train_size caps the sample IVF/PQ is trained on; use_ray: None = use Ray tasks when Ray is up.
    """

    factory: str = "Flat"
    shards: int = 4
    nprobe: int = 16
    ef_search: int = 64
    train_size: int = 100_000
    seed: int = 0
    use_ray: bool | None = field(default=None, compare=False)

    def __post_init__(self):
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"IndexConfig.shards must be in [1, {MAX_SHARDS}], got {self.shards}")
        for name in ("nprobe", "ef_search", "train_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.factory.strip():
            raise ValueError("IndexConfig.factory must be a FAISS factory string, got ''")

    def manifest_dict(self) -> dict:
        d = asdict(self)
        d.pop("use_ray")
        return d


def _sha1(doc_id: str) -> bytes:
    return hashlib.sha1(doc_id.encode("utf-8")).digest()


def shard_of(doc_id: str, num_shards: int) -> int:
    return int.from_bytes(_sha1(doc_id), "big") % num_shards


def int_id(doc_id: str) -> int:
    return int.from_bytes(_sha1(doc_id)[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def normalize(vecs: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(np.asarray(vecs, dtype=np.float32))
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D (N, d), got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if len(v) and not np.all(norms > 0):
        raise ValueError(f"vector row {int(np.argmin(norms[:, 0]))} has zero norm")
    return v / np.where(norms > 0, norms, 1)


def is_ivf(index) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


_BIG = 1 << 24


def check_factory(factory: str, dim: int, num_vectors: int | None = None) -> None:
    """Fail now, before any embedding, when `factory` is not a usable FAISS factory string for `dim`
    dimensions (or, given the corpus size, cannot be trained on it)."""
    if not isinstance(factory, str) or not factory.strip() or any(c.isspace() for c in factory.strip()):
        raise ValueError(f"invalid FAISS factory string {factory!r}")
    if any(int(n) > _BIG for n in re.findall(r"[0-9]+", factory)):
        raise ValueError(f"invalid FAISS factory string {factory!r}: a parameter is larger than {_BIG}")
    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        why = re.sub(r"^Error in .*? at \S+:[0-9]+: (Error: )?", "", str(e).strip().splitlines()[-1])
        raise ValueError(f"invalid FAISS factory string {factory!r} for dimension {dim}: {why}") from None
    ivf = faiss.try_extract_index_ivf(index)
    if num_vectors is not None and ivf is not None and num_vectors < ivf.nlist:
        raise ValueError(f"factory {factory!r} needs at least nlist={ivf.nlist} training vectors, "
                         f"corpus has {num_vectors}")


def make_trained_index(factory: str, dim: int, sample: np.ndarray, num_vectors: int):
    """Empty index for `factory` (inner product), trained on `sample` when it needs training.

    `num_vectors` is the corpus size (an IVF needs at least nlist vectors); the sample is drawn by the
    caller (bounded: `IndexConfig.train_size` rows, see `pipeline.index.stage.sample_shard`).
    """
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS factory string {factory!r}: {str(e).splitlines()[-1]}") from None
    if not is_ivf(index):
        index = faiss.IndexIDMap2(index)  # Flat/HNSW/PQ need an id map; IVF stores ids itself
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and num_vectors < ivf.nlist:
            raise ValueError(f"factory {factory!r} needs at least nlist={ivf.nlist} training vectors, "
                             f"corpus has {num_vectors}")
        try:
            index = _train(index, np.ascontiguousarray(sample, dtype=np.float32))
        except RuntimeError as e:
            why = re.sub(r"^Error in .*? at \S+:[0-9]+: (Error: )?", "", str(e).strip().splitlines()[-1])
            raise ValueError(f"factory {factory!r} cannot be trained on {len(sample)} vectors: {why}") from None
    return index


def needs_training(factory: str, dim: int) -> bool:
    return not faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT).is_trained


def _train(index, sample: np.ndarray):
    """Train on the GPU(s) when faiss-gpu sees any (k-means dominates build time), else on CPU."""
    if faiss.get_num_gpus() > 0:
        try:
            gpu = faiss.index_cpu_to_all_gpus(index)
            gpu.train(sample)
            return faiss.index_gpu_to_cpu(gpu)
        except RuntimeError:  # index type without a GPU implementation (e.g. HNSW): train on CPU
            index.train(sample)
            return index
    index.train(sample)
    return index


def add_vectors(index, ids: np.ndarray, vecs: np.ndarray, batch: int = 262144):
    """Add one shard's vectors to a clone of the trained index (GPU when faiss-gpu sees one)."""
    if not len(ids):
        return index
    if faiss.get_num_gpus() > 0 and is_ivf(index):
        try:
            gpu = faiss.index_cpu_to_all_gpus(index)
            for s in range(0, len(ids), batch):
                gpu.add_with_ids(vecs[s:s + batch], ids[s:s + batch])
            return faiss.index_gpu_to_cpu(gpu)
        except RuntimeError:  # no GPU implementation for this index type
            pass
    for s in range(0, len(ids), batch):
        index.add_with_ids(vecs[s:s + batch], ids[s:s + batch])
    return index


def ray_enabled(cfg: IndexConfig) -> bool:
    """use_ray False: this process; True: start/join Ray; None: Ray when it is already up."""
    if cfg.use_ray is False:
        return False
    import ray

    if cfg.use_ray:
        from pipeline.cluster import ensure_ray

        ensure_ray()
    return ray.is_initialized()


@dataclass(frozen=True)
class ShardRows:
    """One shard's rows, sorted by int_id (so the same set of docs always gives the same file)."""

    ids: list[str]
    int_ids: np.ndarray
    hashes: list[str]
    vectors: np.ndarray

    @staticmethod
    def make(ids: Sequence[str], hashes: Sequence[str], vectors: np.ndarray, dim: int) -> ShardRows:
        iids = np.fromiter((int_id(i) for i in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(iids, kind="stable")
        vec = vectors[order] if len(ids) else np.zeros((0, dim), np.float32)
        return ShardRows([ids[i] for i in order], iids[order], [hashes[i] for i in order],
                         np.ascontiguousarray(vec, dtype=np.float32))

    def table(self) -> pa.Table:
        t = embeddings_table(self.ids, self.vectors.reshape(len(self.ids), -1), self.hashes)
        return t.add_column(1, "int_id", pa.array(self.int_ids, pa.int64()))


def content_digest(rows: ShardRows) -> str:
    h = hashlib.sha256()
    for i, c in sorted(zip(rows.ids, rows.hashes)):
        h.update(f"{i}\t{c}\n".encode())
    return h.hexdigest()


def check_ids(ids: Sequence[str]) -> None:
    seen: dict[int, str] = {}
    for i in ids:
        if not isinstance(i, str) or i == "":
            raise ValueError(f"document id {i!r} is not a non-empty string")
        k = int_id(i)
        if k in seen:
            if seen[k] == i:
                raise ValueError(f"duplicate document id {i!r}")
            raise ValueError(f"int64 id collision between documents {seen[k]!r} and {i!r}")
        seen[k] = i


def write_shard_files(folder: Path, i: int, rows: ShardRows, index) -> None:
    pq.write_table(rows.table(), folder / f"{shard_name(i)}.parquet")
    faiss.write_index(index, str(folder / f"{shard_name(i)}.faiss"))


def read_shard_rows(index_dir: str | os.PathLike, i: int, vectors: bool = True) -> ShardRows:
    """One shard's rows; `index_dir` is an index or (inside `open_version`) a version folder."""
    cols = ["id", "int_id", "content_hash"] + (["vector"] if vectors else [])
    t = pq.read_table(version_dir(index_dir) / f"{shard_name(i)}.parquet", columns=cols)
    vec = vectors_from_column(t.column("vector")) if vectors else np.zeros((0, 0), np.float32)
    return ShardRows(t.column("id").to_pylist(), t.column("int_id").to_numpy().astype(np.int64),
                     t.column("content_hash").to_pylist(), vec)
