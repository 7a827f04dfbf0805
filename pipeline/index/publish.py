"""Publication: fill a temp version folder (the caller writes the rebuilt shards, untouched ones are
hard-linked from the previous version), write the manifest, check it, and publish by replacing the
`current` symlink (one atomic rename). The driver writes nothing larger than the manifest."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

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
from pipeline.index.manifest import check_listing, is_index_dir, make_manifest
from pipeline.index.shards import IndexConfig, shard_name
from stages.io import sha256_file, write_json

# write_shards(version folder) -> {shard number: {"name", "count", "content_digest", "files": {name: sha256}}}
ShardWriter = Callable[[Path], dict[int, dict]]


def publish(out: Path, cfg: IndexConfig, model: dict, dim: int, trained: Path, write_shards: ShardWriter,
            reuse: tuple[Path, dict] | None, locked: bool = False) -> dict:
    """Write a new version (rebuilt shards by `write_shards`, the rest hard-linked from `reuse`), check
    it, publish it; returns the manifest. On failure nothing is published and the temp version is gone."""
    out = Path(out)
    existed, fresh = out.exists(), not is_index_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.nullcontext() if locked else writer_lock(out):
            (out / READ_LOCK).touch()        # before anything is published: every reader takes it
            remove_stale_temps(out)
            vdir = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=versions_dir(out, create=True)))
            try:
                link_or_copy(trained, vdir / TRAINED)
                files = {TRAINED: (reuse[1]["files"][TRAINED] if reuse is not None and trained == reuse[0] / TRAINED
                                   else sha256_file(vdir / TRAINED))}
                built = write_shards(vdir)
                meta: list[dict] = []
                for i in range(cfg.shards):
                    name = shard_name(i)
                    if i in built:
                        b = dict(built[i])
                        files.update(b.pop("files"))
                        meta.append(b)
                    else:
                        for ext in (".faiss", ".parquet"):
                            link_or_copy(reuse[0] / f"{name}{ext}", vdir / f"{name}{ext}")
                            files[f"{name}{ext}"] = reuse[1]["files"][f"{name}{ext}"]
                        meta.append(dict(reuse[1]["shards"][i]))
                manifest = make_manifest(files, cfg, model, dim, meta)
                write_json(vdir / MANIFEST, manifest)
                check_listing(vdir, manifest)
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
