"""Staging: a corpus streamed into Parquet partitioned by shard (`<stage>/shard=<i>/*.parquet`).

Why: a shard is built by its own task from its own partition, so no process ever holds the corpus —
the driver only lists files and collects per-shard counts. The corpus is read file by file inside the
tasks (Ray Data) with the core readers' record rules; embedding runs in an actor pool (the model loaded
once per actor); `write_parquet(partition_cols=["shard"])` routes each row to `sha1(id) mod N`.

Row columns: id, int_id, content_hash, src_file, src_order (the file's position in the corpus), src_line
(line or row number in that file), then `vector` (embedded stages) and/or `text` (stages that still
need embedding, e.g. re-index before the diff). Duplicate ids land in the same shard, so the shard task
finds them and names the later record's file and line.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index.embed import (
    ACTOR_CALL_BATCHES,
    EmbedConfig,
    content_hash,
    embed_texts_local,
    load_encoder,
    vector_array,
)
from pipeline.index.shards import int_id, shard_of

# rows written per Parquet write call when partitioning (split over the shards): bounds the files per shard
_WRITE_BYTES = 64 << 20


@dataclass(frozen=True)
class Source:
    """One corpus file and how its rows without an id are named (`<prefix>:<n>`, or `<n>`)."""

    path: str
    prefix: str | None
    order: int


def corpus_sources(path: str | os.PathLike) -> list[Source]:
    """The files of a corpus in reading order: a JSONL(.gz) file, a Parquet file or folder, a BEIR folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir() and (p / "corpus.jsonl").exists():
        return [Source(str(p / "corpus.jsonl"), None, 0)]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
        if not files:
            raise ValueError(f"{p}: expected a JSONL/Parquet file, a Parquet folder or a BEIR folder")
        several = len(files) > 1
        return [Source(str(f), f.relative_to(p).as_posix() if several else None, k) for k, f in enumerate(files)]
    return [Source(str(p), None, 0)]


def _doc(obj: dict, f, n: int, q, text_field: str | None, default_id: str, beir: bool = False) -> dict | None:
    """One record -> {"_id", "title", "text"} under the core readers' rules (stages.readers.read_corpus;
    with `beir`, read_beir_corpus's: `_id` required)."""
    from stages.readers import _fields, corpus_doc

    if beir:
        got = _fields(obj, f, n, q, ("_id", {"ids": True}), ("text", {}),
                      ("title", {"required": False, "allow_empty": True}))
        return None if got is None else {"_id": got[0], "title": got[2] or "", "text": got[1]}
    return corpus_doc(obj, f, n, q, text_field, default_id)


def read_source(src: Source, num_shards: int, text_field: str | None = None,
                rows_per_block: int = 2048, beir: bool = False) -> Iterator[pa.Table]:
    """Tables of (id, int_id, shard, content_hash, text, src_*) from one corpus file, `rows_per_block` at a
    time. The first bad record raises BadRecordError with file and line (the build refuses bad input)."""
    from stages.readers import iter_records, make_quarantine
    from stages.text import doc_text

    q = make_quarantine(False, None)
    cols: dict[str, list] = {k: [] for k in ("id", "text", "line")}

    def flush() -> pa.Table:
        ids, texts = cols["id"], cols["text"]
        t = pa.table({
            "id": pa.array(ids, pa.string()),
            "int_id": pa.array([int_id(i) for i in ids], pa.int64()),
            "shard": pa.array([shard_of(i, num_shards) for i in ids], pa.int32()),
            "content_hash": pa.array([content_hash(x) for x in texts], pa.string()),
            "text": pa.array(texts, pa.string()),
            "src_file": pa.array([src.path] * len(ids), pa.string()),
            "src_order": pa.array([src.order] * len(ids), pa.int32()),
            "src_line": pa.array(cols["line"], pa.int64()),
        })
        for v in cols.values():
            v.clear()
        return t

    for f, n, obj in iter_records(src.path, q):
        doc = _doc(obj, f, n, q, text_field, f"{src.prefix}:{n}" if src.prefix else str(n), beir)
        if doc is None:
            continue
        cols["id"].append(doc["_id"])
        cols["text"].append(doc_text(doc))
        cols["line"].append(n)
        if len(cols["id"]) >= rows_per_block:
            yield flush()
    if cols["id"]:
        yield flush()


def _read_sources(batch: dict, num_shards: int, text_field: str | None, rows_per_block: int,
                  beir: bool = False) -> Iterator[pa.Table]:
    """Ray Data generator UDF: one input row per corpus file -> that file's rows, a block at a time."""
    for path, prefix, order in zip(batch["path"], batch["prefix"], batch["order"]):
        yield from read_source(Source(str(path), None if prefix in (None, "") else str(prefix), int(order)),
                               num_shards, text_field, rows_per_block, beir)


def embed_table(encoder, t: pa.Table, batch_size: int, keep_text: bool = False) -> pa.Table:
    """Add `vector` (L2-normalised float32) to a staged table; drop `text` unless `keep_text`."""
    vecs = embed_texts_local(encoder, t.column("text").to_pylist(), batch_size)
    t = t.append_column("vector", vector_array(vecs))
    return t if keep_text else t.drop_columns(["text"])


class _StageEncodeActor:
    """Ray Data callable class: the model is loaded once per actor, then reused for every batch."""

    def __init__(self, model_ref: str, batch_size: int, keep_text: bool, threads: int | None = None):
        if threads and not str(model_ref).startswith("hashing:"):
            # a CPU actor computes with the cores it was given (Ray sets 1 thread for fractional CPUs)
            import torch

            torch.set_num_threads(threads)
        self.encoder = load_encoder(model_ref)
        self.batch_size = batch_size
        self.keep_text = keep_text

    def __call__(self, batch: pa.Table) -> pa.Table:
        return embed_table(self.encoder, batch, self.batch_size, self.keep_text)


def actor_threads(cfg: EmbedConfig, use_gpu: bool) -> int | None:
    return None if use_gpu else max(1, int(cfg.num_cpus_per_actor))


def _rows_per_write(dim: int | None, num_shards: int) -> int:
    row = 4 * (dim or 0) + 200
    return max(4096, min(_WRITE_BYTES // row, 4096 * num_shards))


def unwrap_task_error(e: BaseException) -> BaseException:
    """The user's exception inside a Ray (Data) task error, so a bad record is reported as one line."""
    from ray.exceptions import RayTaskError

    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, RayTaskError):
            cause = getattr(cur, "cause", None)
            if cause is not None:
                return unwrap_task_error(cause)
        elif (isinstance(cur, (ValueError, OSError, LookupError, TypeError))
              and type(cur).__module__.split(".")[0] != "ray"):
            return cur
        cur = cur.__cause__ or cur.__context__
    return e


def stage_corpus(corpus: str | os.PathLike, stage: str | os.PathLike, num_shards: int,
                 model_ref: str | None = None, embed_cfg: EmbedConfig | None = None, use_ray: bool = True,
                 text_field: str | None = None, keep_text: bool = False, dim: int | None = None,
                 beir: bool = False) -> Path:
    """Stream `corpus` into `stage`/shard=<i>/ Parquet files; with `model_ref`, embedded (vector column).

    Ray path: Ray Data reads the files in tasks, embeds in an actor pool and writes the partitions; the
    driver holds only the plan. In-process path (use_ray=False): the same functions in this process, a
    block at a time. Either way nothing larger than a write batch is in memory at once.
    """
    cfg = embed_cfg or EmbedConfig()
    sources = corpus_sources(corpus)
    stage = Path(stage)
    stage.mkdir(parents=True, exist_ok=True)
    per_write = _rows_per_write(dim, num_shards)
    if not use_ray:
        encoder = load_encoder(model_ref) if model_ref is not None else None
        buf: list[pa.Table] = []
        rows = k = 0

        def write():
            nonlocal rows, k
            if buf:
                _write_partitioned(pa.concat_tables(buf), stage, f"local-{k:06d}")
                k += 1
            buf.clear()
            rows = 0

        for src in sources:
            for t in read_source(src, num_shards, text_field, cfg.rows_per_block, beir):
                if encoder is not None:
                    t = embed_table(encoder, t, cfg.batch_size, keep_text)
                buf.append(t)
                rows += len(t)
                if rows >= per_write:
                    write()
        write()
        return stage
    import ray

    from pipeline.cluster import ensure_ray

    ensure_ray()
    items = [{"path": s.path, "prefix": s.prefix or "", "order": s.order} for s in sources]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_read_sources, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"num_shards": num_shards, "text_field": text_field,
                                   "rows_per_block": cfg.rows_per_block, "beir": beir}, num_cpus=0.25)
    if model_ref is not None:
        ds = encode_with_actors(ds, str(model_ref), cfg, keep_text)
    write_partitioned_ray(ds, stage, per_write)
    return stage


def encode_with_actors(ds, model_ref: str, cfg: EmbedConfig, keep_text: bool = False):
    """`ds` (staged rows with `text`) through the embedding actor pool: one model per actor, calls of
    `batch_size * ACTOR_CALL_BATCHES` rows.

    The input is first cut into blocks of at most one call (a streaming repartition, nothing gathered):
    a read task's output is one block per file (Ray Data merges a generator's yields up to its block-size
    target) and an actor-pool task never splits a block, so without the cut a one-file corpus was a single
    task on a single actor however large the pool (measured: 2 actors, 1,541 documents, one task).
    """
    import ray

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": cfg.num_cpus_per_actor}
    call_rows = cfg.batch_size * ACTOR_CALL_BATCHES
    ds = ds.repartition(target_num_rows_per_block=call_rows)
    return ds.map_batches(_StageEncodeActor, fn_constructor_args=(model_ref, cfg.batch_size, keep_text,
                                                                 actor_threads(cfg, use_gpu)),
                          batch_size=call_rows, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=cfg.num_actors), **resources)


def write_partitioned_ray(ds, stage: Path, per_write: int) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*min_rows_per_file.*partition_cols.*")
        try:
            ds.write_parquet(str(stage), partition_cols=["shard"], min_rows_per_file=per_write)
        except Exception as e:
            inner = unwrap_task_error(e)
            if inner is e:
                raise
            raise inner from None


def _write_partitioned(t: pa.Table, stage: Path, name: str) -> None:
    import pyarrow.dataset as pads

    pads.write_dataset(t, str(stage), format="parquet", partitioning=["shard"], partitioning_flavor="hive",
                       basename_template=f"{name}-{{i}}.parquet", existing_data_behavior="overwrite_or_ignore")


def write_staged(stage: str | os.PathLike, t: pa.Table, name: str) -> None:
    """Write an in-memory staged table (it has a `shard` column) into the partitions, under file `name`."""
    Path(stage).mkdir(parents=True, exist_ok=True)
    _write_partitioned(t, Path(stage), name)


def shard_files(stage: str | os.PathLike | None, i: int) -> list[Path]:
    """Partition i's files (none: the shard received no rows)."""
    if stage is None:
        return []
    d = Path(stage) / f"shard={i}"
    return sorted(d.glob("*.parquet")) if d.is_dir() else []


def count_rows(files: list[Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def read_columns(files: list[Path], columns: list[str] | None) -> pa.Table | None:
    """The given columns of a partition (one shard: a task's worth of memory); None when it is empty."""
    tabs = [pq.read_table(f, columns=columns) for f in files]
    tabs = [t for t in tabs if len(t)]
    return pa.concat_tables(tabs) if tabs else None


def iter_batches(files: list[Path], columns: list[str], rows: int = 65536) -> Iterator[pa.RecordBatch]:
    for f in files:
        yield from pq.ParquetFile(f).iter_batches(batch_size=rows, columns=columns)


def sample_keys(int_ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded, order-free pseudo-random key per document (splitmix64 of int_id ^ seed); the training
    sample is the rows with the smallest keys, so it does not depend on file or block order."""
    with np.errstate(over="ignore"):
        z = int_ids.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_shard(files: list[Path], quota: int, seed: int, dim: int) -> np.ndarray:
    """The `quota` vectors of a partition with the smallest sample keys, ordered by key (bounded memory:
    the int_id column, then one batch of vectors at a time)."""
    if quota <= 0 or not files:
        return np.zeros((0, dim), np.float32)
    t = read_columns(files, ["int_id"])
    keys = sample_keys(t.column("int_id").to_numpy(), seed)
    if quota < len(keys):
        thr = np.partition(keys, quota - 1)[quota - 1]
    else:
        thr = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    del t, keys
    got_k, got_v = [], []
    from pipeline.index.embed import vectors_from_column

    for b in iter_batches(files, ["int_id", "vector"]):
        k = sample_keys(b.column(0).to_numpy(), seed)
        sel = np.nonzero(k <= thr)[0]
        if len(sel):
            got_k.append(k[sel])
            got_v.append(vectors_from_column(b.column(1).take(pa.array(sel)), dim))
    if not got_k:
        return np.zeros((0, dim), np.float32)
    k = np.concatenate(got_k)
    order = np.argsort(k, kind="stable")[:quota]
    return np.ascontiguousarray(np.concatenate(got_v)[order])
