"""Incremental re-index: embed only new/changed documents, drop deleted ones, rebuild touched shards."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from pipeline.index.layout import TRAINED, ModelMismatchError, version_dir, writer_lock
from pipeline.index.manifest import check_fingerprint_version, is_index_dir, verify_index
from pipeline.index.publish import publish
from pipeline.index.shards import IndexConfig, ShardRows, check_ids, normalize, read_shard_rows, shard_of


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
    """Bring the index in line with a corpus given as (id, content_hash) pairs.

    `embed(ids)` is called once, only for new or changed documents, and returns their vectors in
    that order. Deleted documents are dropped; only shards that gained, lost or changed a document
    are rebuilt (from the stored trained index and stored vectors); untouched shard files are
    hard-linked. Nothing to do -> nothing is written.
    """
    root = Path(index_dir)
    with writer_lock(root) if root.is_dir() and is_index_dir(root) else contextlib.nullcontext():
        return _reindex(root, ids, hashes, embed, model, use_ray)


def _reindex(root: Path, ids, hashes, embed, model, use_ray) -> ReindexReport:
    folder = version_dir(root)              # writers are serialised: this version stays until we publish
    m = verify_index(folder)
    if model is not None:
        check_fingerprint_version(root, m["model"]["fingerprint"])
    if model is not None and model["fingerprint"] != m["model"]["fingerprint"]:
        raise ModelMismatchError(f"model {model['path']!r} (fingerprint {model['fingerprint']}) differs from the "
                                 f"index's {m['model']['path']!r} ({m['model']['fingerprint']}); re-indexing "
                                 "would mix embedding spaces — run jobs.build_index for a full rebuild")
    ids = list(ids)
    if len(ids) != len(hashes):
        raise ValueError(f"{len(ids)} ids but {len(hashes)} content hashes")
    check_ids(ids)
    cfg = IndexConfig(**m["config"], use_ray=use_ray)
    n = cfg.shards
    want = dict(zip(ids, hashes))
    old: dict[str, tuple[int, str]] = {}
    for i in range(n):
        r = read_shard_rows(folder, i, vectors=False)
        old.update({d: (i, h) for d, h in zip(r.ids, r.hashes)})
    new_ids = [d for d in ids if d not in old]
    changed = [d for d in ids if d in old and old[d][1] != want[d]]
    deleted = [d for d in old if d not in want]
    touched = sorted({shard_of(d, n) for d in new_ids + changed} | {old[d][0] for d in deleted})
    report = ReindexReport(len(new_ids), len(changed), len(deleted),
                           len(ids) - len(new_ids) - len(changed), touched, bool(touched))
    if not touched:
        return report
    todo = new_ids + changed
    fresh = normalize(embed(todo)) if todo else np.zeros((0, m["dimension"]), np.float32)
    if fresh.shape != (len(todo), m["dimension"]):
        raise ValueError(f"embed() returned shape {fresh.shape}, expected {(len(todo), m['dimension'])}")
    fresh_by_id = {d: fresh[j] for j, d in enumerate(todo)}
    rebuild: dict[int, ShardRows] = {}
    for i in touched:
        r = read_shard_rows(folder, i)
        keep = [j for j, d in enumerate(r.ids) if d in want and d not in fresh_by_id]
        sid = [r.ids[j] for j in keep] + [d for d in todo if shard_of(d, n) == i]
        vec = np.concatenate([r.vectors[keep].reshape(-1, m["dimension"]),
                              np.asarray([fresh_by_id[d] for d in sid[len(keep):]], np.float32)
                              .reshape(-1, m["dimension"])])
        rebuild[i] = ShardRows.make(sid, [want[d] for d in sid], vec, m["dimension"])
    trained = faiss.read_index(str(folder / TRAINED))
    publish(root, cfg, m["model"], m["dimension"], trained, rebuild, reuse=(folder, m), locked=True)
    return report
