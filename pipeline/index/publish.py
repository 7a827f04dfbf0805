"""Publication: write rebuilt shards (hard-link untouched ones) into a temp version, verify it, and
publish it by replacing the `current` symlink; a fresh build from vectors goes through the same path."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from pipeline.index.layout import (
    CURRENT,
    MANIFEST,
    READ_LOCK,
    TRAINED,
    VERSIONS,
    WRITE_LOCK,
    cleanup_versions,
    legacy_files,
    link_or_copy,
    next_version,
    point,
    remove_stale_temps,
    temp_prefix,
    versions_dir,
    writer_lock,
)
from pipeline.index.manifest import check_out, is_index_dir, make_manifest, verify_index
from pipeline.index.shards import (
    IndexConfig,
    ShardRows,
    build_shards,
    check_ids,
    content_digest,
    make_trained_index,
    normalize,
    shard_name,
    split_rows,
    write_shard_files,
)
from stages.io import write_json


def build_index(out_dir: str | os.PathLike, ids: Sequence[str], vectors: np.ndarray,
                hashes: Sequence[str], cfg: IndexConfig, model: dict, overwrite: bool = False) -> dict:
    """Fresh build from (id, vector, content_hash); publishes atomically; returns the manifest.

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
    trained = make_trained_index(cfg.factory, vecs, cfg)
    rows = split_rows(ids, list(hashes), vecs, cfg.shards, dim)
    return publish(Path(out_dir), cfg, model, dim, trained, {i: r for i, r in enumerate(rows)}, reuse=None)


def publish(out: Path, cfg: IndexConfig, model: dict, dim: int, trained,
             rebuild: dict[int, ShardRows], reuse: tuple[Path, dict] | None, locked: bool = False) -> dict:
    """Write rebuilt shards (+ hard-link untouched ones from `reuse`), verify, publish one version."""
    trained_bytes = faiss.serialize_index(trained)
    order = sorted(rebuild)
    built = build_shards(trained_bytes, [(rebuild[i].int_ids, rebuild[i].vectors) for i in order], cfg)
    existed, fresh = out.exists(), not is_index_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.nullcontext() if locked else writer_lock(out):
            (out / READ_LOCK).touch()        # before anything is published: every reader takes it
            remove_stale_temps(out)
            vdir = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=versions_dir(out, create=True)))
            try:
                if reuse is None:
                    faiss.write_index(trained, str(vdir / TRAINED))
                else:
                    link_or_copy(reuse[0] / TRAINED, vdir / TRAINED)
                meta: list[dict] = []
                for i in range(cfg.shards):
                    name = shard_name(i)
                    if i in rebuild:
                        write_shard_files(vdir, i, rebuild[i], built[order.index(i)])
                        meta.append({"name": name, "count": len(rebuild[i].ids),
                                     "content_digest": content_digest(rebuild[i])})
                    else:
                        for ext in (".faiss", ".parquet"):
                            link_or_copy(reuse[0] / f"{name}{ext}", vdir / f"{name}{ext}")
                        meta.append(dict(reuse[1]["shards"][i]))
                manifest = make_manifest(vdir, cfg, model, dim, meta)
                write_json(vdir / MANIFEST, manifest)
                verify_index(vdir, load=True)
                final = versions_dir(out) / next_version(out)
                (versions_dir(out) / f"{final.name}.lock").touch()
                os.rename(vdir, final)
            except BaseException:
                shutil.rmtree(vdir, ignore_errors=True)
                raise
            legacy = legacy_files(out)
            point(out, CURRENT, f"{VERSIONS}/{final.name}")       # THE publication: one rename
            point(out, MANIFEST, f"{CURRENT}/{MANIFEST}")
            cleanup_versions(out, legacy)
    except BaseException:
        if fresh and not existed:
            shutil.rmtree(out, ignore_errors=True)       # nothing of ours is left behind
        elif fresh:
            for e in (VERSIONS, READ_LOCK, WRITE_LOCK):
                p = out / e
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise
    return manifest
