"""Building an index from staged partitions, one task per shard; the driver holds only the manifest.

    corpus --(Ray Data: read tasks -> embedding actors)--> <out>/.work-*/emb/shard=<i>/*.parquet
           --(one task per shard: counts)--> the training sample: each shard's share of `train_size`
              rows, those with the smallest seeded key (stage.sample_shard) --(one task)--> trained.faiss
           --(one task per shard: read its partition, check ids, sort, add to a clone of the trained
              index, write shard_<i>.faiss/.parquet into the temp version, checksum them from disk)-->
           publish (manifest from the tasks' counts and checksums, `current` swapped)

Peak memory is one shard per task (its vectors and its FAISS index) and one write batch per embedding
actor; the driver lists files and collects per-shard metadata. On a multi-node cluster `--out` must be
shared storage (tasks on every node read the partitions and write the shard files there).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from pipeline.index.embed import EmbedConfig, model_identity, vectors_from_column
from pipeline.index.layout import work_dir
from pipeline.index.manifest import check_out
from pipeline.index.publish import publish
from pipeline.index.shards import (
    IndexConfig,
    ShardRows,
    add_vectors,
    check_factory,
    check_ids,
    content_digest,
    int_id,
    make_trained_index,
    needs_training,
    normalize,
    ray_enabled,
    shard_name,
    shard_of,
)
from pipeline.index.stage import (
    corpus_sources,
    count_rows,
    read_columns,
    read_source,
    sample_shard,
    shard_files,
    stage_corpus,
    unwrap_task_error,
    write_staged,
)
from stages.io import sha256_file

STAGED = ["id", "int_id", "content_hash", "vector", "src_file", "src_order", "src_line"]


# ------------------------------------------------------------------------------------ tasks


def run_tasks(fn: Callable, calls: Sequence[tuple], use_ray: bool, refs: bool = False) -> list:
    """fn(*call) for every call: Ray tasks (1 CPU, 1 GPU where there are GPUs) or in this process.

    With refs=True the Ray object refs are returned unfetched (to pass to another task)."""
    if not use_ray:
        return [fn(*c) for c in calls]
    import ray

    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(fn)
    out = [task.remote(*c) for c in calls]
    if refs:
        return out
    try:
        return ray.get(out)
    except Exception as e:
        inner = unwrap_task_error(e)
        if inner is e:
            raise
        raise inner from None


def _count(files: list[str]) -> int:
    return count_rows([Path(f) for f in files])


def _sample(files: list[str], quota: int, seed: int, dim: int) -> np.ndarray:
    return sample_shard([Path(f) for f in files], quota, seed, dim)


def _train_to(path: str, factory: str, dim: int, num_vectors: int, *samples: np.ndarray) -> int:
    sample = np.concatenate(samples) if samples else np.zeros((0, dim), np.float32)
    index = make_trained_index(factory, dim, sample, num_vectors)
    faiss.write_index(index, path)
    return len(sample)


def _duplicate_error(t: pa.Table) -> None:
    """A shard's rows hold every copy of an id: name the later record (file order, then line)."""
    from stages.readers import BadRecordError

    ids = t.column("id").to_pylist()
    if len(set(ids)) == len(ids):
        return
    order = sorted(range(len(ids)), key=lambda j: (t.column("src_order")[j].as_py(), t.column("src_line")[j].as_py()))
    seen = set()
    for j in order:
        if ids[j] in seen:
            raise BadRecordError(t.column("src_file")[j].as_py(), t.column("src_line")[j].as_py(),
                                 f"duplicate id: '{ids[j]}'")
        seen.add(ids[j])


def build_shard(i: int, vdir: str, trained: str, dim: int, new_files: list[str],
                old_parquet: str | None = None, want_files: list[str] | None = None) -> dict:
    """One shard, from its own partition (plus, on re-index, the kept rows of its previous version).

    Rows: the partition's (new or changed) rows, and from `old_parquet` those whose id is still in the
    corpus (`want_files`) and not among the new ones. Writes shard_<i>.parquet/.faiss into `vdir`;
    returns its manifest entry with the files' sha256 read back from disk."""
    new = read_columns([Path(f) for f in new_files], STAGED)
    parts_ids, parts_iids, parts_hashes, parts_vecs = [], [], [], []
    new_ids: set[str] = set()
    if new is not None:
        _duplicate_error(new)
        new_ids = set(new.column("id").to_pylist())
        parts_ids.append(new.column("id").to_pylist())
        parts_iids.append(new.column("int_id").to_numpy())
        parts_hashes.append(new.column("content_hash").to_pylist())
        parts_vecs.append(normalize(vectors_from_column(new.column("vector"), dim)))
        del new
    if old_parquet is not None:
        import pyarrow.parquet as pq

        want = read_columns([Path(f) for f in want_files or []], ["id"])
        want_ids = set(want.column("id").to_pylist()) if want is not None else set()
        old = pq.read_table(old_parquet, columns=["id", "int_id", "content_hash", "vector"])
        oid = old.column("id").to_pylist()
        keep = np.asarray([d in want_ids and d not in new_ids for d in oid], dtype=bool)
        if keep.any():
            sel = pa.array(np.nonzero(keep)[0])
            parts_ids.append([oid[j] for j in np.nonzero(keep)[0]])
            parts_iids.append(old.column("int_id").to_numpy()[keep])
            parts_hashes.append(old.column("content_hash").take(sel).to_pylist())
            parts_vecs.append(vectors_from_column(old.column("vector").take(sel), dim))
        del old
    ids = [d for p in parts_ids for d in p]
    iids = np.concatenate(parts_iids).astype(np.int64) if parts_iids else np.zeros(0, np.int64)
    hashes = [h for p in parts_hashes for h in p]
    vecs = np.concatenate(parts_vecs) if parts_vecs else np.zeros((0, dim), np.float32)
    order = np.argsort(iids, kind="stable")
    iids = iids[order]
    if len(iids) > 1 and np.any(iids[1:] == iids[:-1]):
        j = int(np.nonzero(iids[1:] == iids[:-1])[0][0])
        raise ValueError(f"int64 id collision between documents {ids[order[j]]!r} and {ids[order[j + 1]]!r}")
    rows = ShardRows([ids[j] for j in order], iids, [hashes[j] for j in order],
                     np.ascontiguousarray(vecs[order] if len(order) else vecs, dtype=np.float32))
    del vecs
    index = add_vectors(faiss.read_index(trained), rows.int_ids, rows.vectors)
    if index.ntotal != len(rows.ids):
        raise RuntimeError(f"shard {i}: index holds {index.ntotal} vectors, expected {len(rows.ids)}")
    from pipeline.index import shards

    folder = Path(vdir)
    shards.write_shard_files(folder, i, rows, index)   # (looked up at call time: tests inject failures)
    name = shard_name(i)
    return {"name": name, "count": len(rows.ids), "content_digest": content_digest(rows),
            "files": {f"{name}{ext}": sha256_file(folder / f"{name}{ext}") for ext in (".faiss", ".parquet")}}


# ------------------------------------------------------------------------------ stage -> index


@contextlib.contextmanager
def scratch(out: str | os.PathLike) -> Iterator[Path]:
    """A scratch folder inside `out` (created if needed), removed afterwards; on failure a folder this
    created is removed whole (a killed run's scratch is removed by the next build: `.work-<host>-<pid>`)."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = work_dir(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(out if created else tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def train_from_stage(stage: Path, cfg: IndexConfig, dim: int, counts: list[int], use_ray: bool) -> Path:
    """trained.faiss in `stage`: trained on at most `train_size` staged vectors (each shard's share, by
    seeded key) by one task; factories that need no training are written as they are."""
    path = stage / "trained.faiss"
    total = sum(counts)
    if not needs_training(cfg.factory, dim):
        faiss.write_index(make_trained_index(cfg.factory, dim, np.zeros((0, dim), np.float32), total), str(path))
        return path
    if total <= cfg.train_size:
        quotas = list(counts)
    else:
        quotas = [round(cfg.train_size * c / total) for c in counts]
    files = [[str(f) for f in shard_files(stage, i)] for i in range(cfg.shards)]
    calls = [(files[i], quotas[i], cfg.seed, dim) for i in range(cfg.shards) if quotas[i] > 0]
    samples = run_tasks(_sample, calls, use_ray, refs=True)
    run_tasks(_train_to, [(str(path), cfg.factory, dim, total, *samples)], use_ray)
    return path


def build_from_stage(out: str | os.PathLike, stage: Path, cfg: IndexConfig, model: dict, dim: int) -> dict:
    """Publish an index built from `stage`/shard=<i>/ partitions (one task per shard)."""
    use_ray = ray_enabled(cfg)
    files = [[str(f) for f in shard_files(stage, i)] for i in range(cfg.shards)]
    counts = run_tasks(_count, [(f,) for f in files], use_ray)
    if sum(counts) == 0:
        raise ValueError("cannot build an index from an empty corpus")
    check_factory(cfg.factory, dim, sum(counts))
    trained = train_from_stage(stage, cfg, dim, counts, use_ray)

    def write_shards(vdir: Path) -> dict[int, dict]:
        calls = [(i, str(vdir), str(trained), dim, files[i]) for i in range(cfg.shards)]
        return dict(enumerate(run_tasks(build_shard, calls, use_ray)))

    return publish(Path(out), cfg, model, dim, trained, write_shards, reuse=None)


def build_index(out_dir: str | os.PathLike, ids: Sequence[str], vectors: np.ndarray,
                hashes: Sequence[str], cfg: IndexConfig, model: dict, overwrite: bool = False) -> dict:
    """Build from in-memory (id, vector, content_hash) (tests, benchmarks): staged, then the same
    per-shard path as a corpus build. Publishes atomically; returns the manifest.

    `out_dir` must be absent, empty, or (with overwrite=True) an index: a new version is published
    over it. Any other folder or file is refused before any work.
    """
    check_out(out_dir, overwrite)
    ids = list(ids)
    if not ids:
        raise ValueError("cannot build an index from an empty corpus")
    if len(ids) != len(vectors) or len(ids) != len(hashes):
        raise ValueError(f"{len(ids)} ids, {len(vectors)} vectors, {len(hashes)} content hashes: must match")
    check_ids(ids)
    vecs = normalize(vectors)
    dim = vecs.shape[1]
    check_factory(cfg.factory, dim, len(ids))
    with scratch(out_dir) as work:
        write_staged(work / "emb", staged_table(ids, list(hashes), cfg.shards, vecs), "mem")
        return build_from_stage(out_dir, work / "emb", cfg, model, dim)


def staged_table(ids: list[str], hashes: list[str], num_shards: int, vecs: np.ndarray | None = None) -> pa.Table:
    """In-memory rows in the staged layout (src_line = position, 1-based)."""
    from pipeline.index.embed import vector_array

    cols = {"id": pa.array(ids, pa.string()),
            "int_id": pa.array([int_id(i) for i in ids], pa.int64()),
            "shard": pa.array([shard_of(i, num_shards) for i in ids], pa.int32()),
            "content_hash": pa.array(hashes, pa.string()),
            "src_file": pa.array(["<memory>"] * len(ids), pa.string()),
            "src_order": pa.array(np.zeros(len(ids), np.int32)),
            "src_line": pa.array(np.arange(1, len(ids) + 1, dtype=np.int64))}
    if vecs is not None:
        cols["vector"] = vector_array(vecs)
    return pa.table(cols)


# ----------------------------------------------------------------------------- corpus -> index


def count_docs_upto(corpus: str | os.PathLike, limit: int, text_field: str | None = None) -> int:
    """Documents of `corpus`, counted up to `limit`, before Ray starts: Parquet row counts from the
    footers (an upper bound: the tasks validate the rows), JSONL records read one line at a time (a bad
    record among them fails here). Never more than a line in memory."""
    n = 0
    for src in corpus_sources(corpus):
        if src.path.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                n += pq.ParquetFile(src.path).metadata.num_rows
            except Exception:
                next(read_source(src, 1, text_field, rows_per_block=1), None)
                raise
        else:
            for t in read_source(src, 1, text_field, rows_per_block=1):
                n += len(t)
                if n >= limit:
                    return n
        if n >= limit:
            return n
    return n


def build_from_corpus(model_ref: str | os.PathLike, corpus: str | os.PathLike, out: str | os.PathLike,
                      cfg: IndexConfig, embed_cfg: EmbedConfig | None = None, overwrite: bool = False,
                      text_field: str | None = None) -> dict:
    """Embed `corpus` with `model_ref` and publish a sharded index at `out`; returns the manifest.

    Checked before Ray starts or a model loads, in order of cost: what `out` holds (new, empty, or an
    index with overwrite), the model folder, the factory string, the corpus's first documents (as many
    as an IVF needs lists). Then the corpus streams: see the module docstring.
    """
    embed_cfg = embed_cfg or EmbedConfig()
    check_out(out, overwrite)
    model = model_identity(model_ref)  # the model folder is complete (config, weights, tokenizer)
    dim = model["dimension"]
    check_factory(cfg.factory, dim)
    ivf = faiss.try_extract_index_ivf(faiss.index_factory(dim, cfg.factory, faiss.METRIC_INNER_PRODUCT))
    need = max(1, ivf.nlist if ivf is not None else 1)
    have = count_docs_upto(corpus, need, text_field)
    if have == 0:
        raise ValueError(f"corpus {corpus} has no usable documents")
    check_factory(cfg.factory, dim, have if have < need else None)
    model = {"path": model["path"], "fingerprint": model["fingerprint"]}
    use_ray = ray_enabled(cfg)
    with scratch(out) as work:
        stage_corpus(corpus, work / "emb", cfg.shards, model["path"], embed_cfg, use_ray, text_field, dim=dim)
        return build_from_stage(out, work / "emb", cfg, model, dim)
