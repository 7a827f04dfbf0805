"""Incremental re-index: embed only new/changed documents, drop deleted ones, rebuild touched shards.

Streams like a build: the corpus is staged by shard without embedding (id, content hash, text); one
task per shard compares its partition with the shard's stored (id, content_hash) and writes the rows to
embed; those are embedded (Ray Data actors) into partitions; one task per touched shard rebuilds it from
its kept rows and its new ones. The driver holds per-shard counts only.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index.build import build_shard, run_tasks, scratch, staged_table
from pipeline.index.embed import EmbedConfig, model_identity
from pipeline.index.layout import TRAINED, IndexIntegrityError, ModelMismatchError, version_dir, writer_lock
from pipeline.index.manifest import check_fingerprint_version, is_index_dir, load_manifest
from pipeline.index.publish import publish
from pipeline.index.shards import IndexConfig, check_ids, normalize, ray_enabled, shard_name
from pipeline.index.stage import (
    count_rows,
    embed_table,
    read_columns,
    shard_files,
    stage_corpus,
    write_partitioned_ray,
    write_staged,
)
from stages.io import sha256_file


@dataclass(frozen=True)
class ReindexReport:
    added: int
    changed: int
    deleted: int
    unchanged: int
    touched_shards: list[int]
    published: bool

    def as_dict(self) -> dict:
        return asdict(self)


def reindex(index_dir: str | os.PathLike, ids: Sequence[str], hashes: Sequence[str],
            embed: Callable[[list[str]], np.ndarray], model: dict | None = None,
            use_ray: bool | None = None) -> ReindexReport:
    """Bring the index in line with a corpus given in memory as (id, content_hash) pairs.

    `embed(ids)` is called once, only for new or changed documents (in corpus order), and returns their
    vectors in that order. Deleted documents are dropped; only shards that gained, lost or changed a
    document are rebuilt (from the stored trained index and stored vectors); untouched shard files are
    hard-linked. Nothing to do -> nothing is written. (`reindex_corpus` streams a corpus instead.)
    """
    root = Path(index_dir)
    ids = list(ids)
    with writer_lock(root) if root.is_dir() and is_index_dir(root) else contextlib.nullcontext():
        folder, m, cfg = _open(root, model, use_ray)
        if len(ids) != len(hashes):
            raise ValueError(f"{len(ids)} ids but {len(hashes)} content hashes")
        check_ids(ids)
        dim = m["dimension"]

        def embed_todo(todo_files: list[Path], emb: Path) -> None:
            t = read_columns(todo_files, ["id", "int_id", "shard", "content_hash", "src_file", "src_order",
                                          "src_line"])
            t = t.take(pa.array(np.argsort(t.column("src_line").to_numpy(), kind="stable")))
            todo = t.column("id").to_pylist()
            fresh = normalize(embed(todo)) if todo else np.zeros((0, dim), np.float32)
            if fresh.shape != (len(todo), dim):
                raise ValueError(f"embed() returned shape {fresh.shape}, expected {(len(todo), dim)}")
            from pipeline.index.embed import vector_array

            write_staged(emb, t.append_column("vector", vector_array(fresh)), "mem")

        with scratch(root) as work:
            write_staged(work / "want", staged_table(ids, list(hashes), cfg.shards), "mem")
            return _reindex_staged(root, folder, m, cfg, work, embed_todo)


def reindex_corpus(index_dir: str | os.PathLike, corpus: str | os.PathLike, model_ref: str | None = None,
                   embed_cfg: EmbedConfig | None = None, use_ray: bool | None = True,
                   text_field: str | None = None) -> ReindexReport:
    """`reindex` for a corpus on disk, streamed (see the module docstring)."""
    root = Path(index_dir)
    m0 = load_manifest(root)
    ident = model_identity(model_ref or m0["model"]["path"])
    model = {"path": ident["path"], "fingerprint": ident["fingerprint"]}
    ecfg = embed_cfg or EmbedConfig()
    with writer_lock(root):
        folder, m, cfg = _open(root, model, use_ray)
        run_ray = ray_enabled(cfg)

        def embed_todo(todo_files: list[Path], emb: Path) -> None:
            if not run_ray:
                from pipeline.index.embed import load_encoder
                from pipeline.index.stage import _write_partitioned

                enc = load_encoder(model["path"])
                for k, f in enumerate(todo_files):
                    t = pq.read_table(f)
                    if len(t):
                        _write_partitioned(embed_table(enc, t, ecfg.batch_size), emb, f"todo-{k:06d}")
                return
            import ray

            from pipeline.index.stage import _rows_per_write, encode_with_actors

            ds = ray.data.read_parquet([str(f) for f in todo_files], num_cpus=0.25)
            ds = encode_with_actors(ds, model["path"], ecfg)
            write_partitioned_ray(ds, emb, _rows_per_write(m["dimension"], cfg.shards))

        with scratch(root) as work:
            stage_corpus(corpus, work / "want", cfg.shards, None, ecfg, run_ray, text_field, keep_text=True)
            if not any(count_rows(shard_files(work / "want", i)) for i in range(cfg.shards)):
                raise ValueError(f"corpus {corpus} has no usable documents (refusing to delete the whole index)")
            return _reindex_staged(root, folder, m, cfg, work, embed_todo)


def _open(root: Path, model: dict | None, use_ray: bool | None) -> tuple[Path, dict, IndexConfig]:
    folder = version_dir(root)              # writers are serialised: this version stays until we publish
    m = load_manifest(folder)
    if sha256_file(folder / TRAINED) != m["files"].get(TRAINED):
        raise IndexIntegrityError(f"{folder}: checksum mismatch for {TRAINED}: the file was modified or corrupted")
    if model is not None:
        check_fingerprint_version(root, m["model"]["fingerprint"])
    if model is not None and model["fingerprint"] != m["model"]["fingerprint"]:
        raise ModelMismatchError(f"model {model['path']!r} (fingerprint {model['fingerprint']}) differs from the "
                                 f"index's {m['model']['path']!r} ({m['model']['fingerprint']}); re-indexing "
                                 "would mix embedding spaces — run jobs.build_index for a full rebuild")
    return folder, m, IndexConfig(**m["config"], use_ray=use_ray)


def diff_shard(i: int, folder: str, files: dict[str, str], want_files: list[str], todo: str) -> dict:
    """Compare shard i's stored (id, content_hash) with its corpus partition; write the rows to embed
    (new or changed) to `todo`. The stored shard files are checked against the manifest first."""
    from pipeline.index.build import _duplicate_error

    name = shard_name(i)
    for ext in (".parquet", ".faiss"):
        p = Path(folder) / f"{name}{ext}"
        if not p.is_file():
            raise IndexIntegrityError(f"{folder}: file {name}{ext} listed in the manifest is missing")
        if sha256_file(p) != files.get(f"{name}{ext}"):
            raise IndexIntegrityError(f"{folder}: checksum mismatch for {name}{ext}: the file was modified "
                                      "or corrupted")
    old = pq.read_table(Path(folder) / f"{name}.parquet", columns=["id", "content_hash"])
    old_hash = dict(zip(old.column("id").to_pylist(), old.column("content_hash").to_pylist()))
    del old
    want = read_columns([Path(f) for f in want_files], None) if want_files else None
    added = changed = 0
    want_ids: set[str] = set()
    if want is not None:
        _duplicate_error(want)
        wid, wh = want.column("id").to_pylist(), want.column("content_hash").to_pylist()
        want_ids = set(wid)
        todo_rows = []
        for j, (d, h) in enumerate(zip(wid, wh)):
            if d not in old_hash:
                added += 1
                todo_rows.append(j)
            elif old_hash[d] != h:
                changed += 1
                todo_rows.append(j)
        if todo_rows:
            t = want.take(pa.array(todo_rows, pa.int64()))
            t = t.append_column("shard", pa.array(np.full(len(t), i, np.int32)))
            pq.write_table(t, Path(todo) / f"todo-{i:05d}.parquet")
    deleted = sum(1 for d in old_hash if d not in want_ids)
    unchanged = len(want_ids) - added - changed
    return {"added": added, "changed": changed, "deleted": deleted, "unchanged": unchanged,
            "touched": bool(added or changed or deleted)}


def _reindex_staged(root: Path, folder: Path, m: dict, cfg: IndexConfig, work: Path,
                    embed_todo: Callable[[list[Path], Path], None]) -> ReindexReport:
    use_ray = ray_enabled(cfg)
    want = [[str(f) for f in shard_files(work / "want", i)] for i in range(cfg.shards)]
    todo = work / "todo"
    todo.mkdir()
    diffs = run_tasks(diff_shard, [(i, str(folder), m["files"], want[i], str(todo)) for i in range(cfg.shards)],
                      use_ray)
    touched = [i for i, d in enumerate(diffs) if d["touched"]]
    report = ReindexReport(*(sum(d[k] for d in diffs) for k in ("added", "changed", "deleted", "unchanged")),
                           touched, bool(touched))
    if not touched:
        return report
    todo_files = sorted(todo.glob("*.parquet"))
    emb = work / "emb"
    emb.mkdir()
    if todo_files:
        embed_todo(todo_files, emb)
    trained = folder / TRAINED

    def write_shards(vdir: Path) -> dict[int, dict]:
        calls = [(i, str(vdir), str(trained), m["dimension"], [str(f) for f in shard_files(emb, i)],
                  str(folder / f"{shard_name(i)}.parquet"), want[i]) for i in touched]
        return dict(zip(touched, run_tasks(build_shard, calls, use_ray)))

    publish(root, cfg, m["model"], m["dimension"], trained, write_shards, reuse=(folder, m), locked=True)
    return report
