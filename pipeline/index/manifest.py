"""manifest.json: what it records, reading and checking it, verifying a version folder against it,
and what an --out folder may be replaced with.

The manifest has no timestamps, so re-running a re-index on an unchanged corpus is a no-op and the
manifest stays byte-identical.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path

import faiss

from pipeline.index.layout import (
    CURRENT,
    FORMAT,
    MANIFEST,
    READ_LOCK,
    TRAINED,
    VERSIONS,
    WRITE_LOCK,
    IndexIntegrityError,
    ModelMismatchError,
    open_version,
    version_dir,
)
from pipeline.index.shards import IndexConfig, shard_name
from stages.io import folder_checksums


def library_versions() -> dict:
    out = {"python": platform.python_version(), "faiss": faiss.__version__}
    for pkg in ("torch", "ray", "numpy", "pyarrow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def make_manifest(files: dict[str, str], cfg: IndexConfig, model: dict, dim: int, shard_meta: list[dict]) -> dict:
    """`files`: sha256 of every file of the version but manifest.json (computed where each was written)."""
    return {
        "format": FORMAT,
        "model": {"path": model.get("path"), "fingerprint": model.get("fingerprint")},
        "dimension": dim,
        "metric": "inner_product",
        "normalized": True,
        "factory": cfg.factory,
        "config": cfg.manifest_dict(),
        "num_docs": int(sum(s["count"] for s in shard_meta)),
        "shards": shard_meta,
        "trained_index": TRAINED,
        "files": dict(sorted(files.items())),
        "versions": library_versions(),
    }


def load_manifest(index_dir: str | os.PathLike) -> dict:
    folder = version_dir(index_dir)
    p = folder / MANIFEST
    if not p.is_file():
        raise IndexIntegrityError(f"{index_dir} is not an index folder: {MANIFEST} is missing")
    try:
        m = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexIntegrityError(f"{p}: not a valid manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise IndexIntegrityError(f"{p}: format {m.get('format') if isinstance(m, dict) else None!r}, "
                                  f"expected {FORMAT!r}")
    _check_manifest(p, m)
    return m


def _check_manifest(p: Path, m: dict) -> None:
    """Structure a reader relies on; every name that becomes a path must stay inside the folder."""
    try:
        shards, files, cfg = m["shards"], m["files"], m["config"]
        ok = (isinstance(shards, list) and isinstance(files, dict) and isinstance(cfg, dict)
              and cfg.get("shards") == len(shards) and isinstance(m["dimension"], int) and m["dimension"] > 0)
    except KeyError as e:
        raise IndexIntegrityError(f"{p}: manifest lacks {e}") from None
    if not ok:
        raise IndexIntegrityError(f"{p}: malformed manifest (shards/files/config/dimension)")
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or s.get("name") != shard_name(i) or not isinstance(s.get("count"), int):
            name = s.get("name") if isinstance(s, dict) else s
            raise IndexIntegrityError(f"{p}: shard {i} is named {name!r}, expected {shard_name(i)!r} "
                                      "(names in a manifest never point outside the index folder)")
    for rel in files:
        if not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/") or "/" in rel:
            raise IndexIntegrityError(f"{p}: file name {rel!r} is not a plain name inside the index folder")


def check_listing(folder: Path, m: dict) -> None:
    """The version folder holds exactly the manifest's files (their checksums were taken from disk by the
    tasks that wrote them; `verify_index` re-reads them all)."""
    actual = {e for e in os.listdir(folder) if e != MANIFEST and not e.startswith(".")}
    missing, extra = sorted(set(m["files"]) - actual), sorted(actual - set(m["files"]))
    if missing or extra:
        raise IndexIntegrityError(f"{folder}: files missing {missing} / not in the manifest {extra}")


def verify_index(index_dir: str | os.PathLike, load: bool = False) -> dict:
    """Check every file's sha256 against the manifest (and, with load=True, shard counts)."""
    with open_version(index_dir) as folder:
        return verify_folder(folder, load)


def verify_folder(folder: Path, load: bool) -> dict:
    m = load_manifest(folder)
    # (a folder written by an earlier release also holds this layout's lock files while it is converted)
    actual = {k: v for k, v in folder_checksums(folder, exclude=(MANIFEST,)).items()
              if k not in (READ_LOCK, WRITE_LOCK, CURRENT) and not k.startswith((f"{VERSIONS}/", "."))}
    for rel, digest in sorted(m["files"].items()):
        if rel not in actual:
            raise IndexIntegrityError(f"{folder}: file {rel} listed in the manifest is missing")
        if actual[rel] != digest:
            raise IndexIntegrityError(f"{folder}: checksum mismatch for {rel} (manifest {digest[:12]}…, "
                                      f"file {actual[rel][:12]}…): the file was modified or corrupted")
    extra = sorted(set(actual) - set(m["files"]))
    if extra:
        raise IndexIntegrityError(f"{folder}: files not in the manifest: {extra}")
    if load:
        for s in m["shards"]:
            idx = faiss.read_index(str(folder / f"{s['name']}.faiss"))
            if idx.ntotal != s["count"] or idx.d != m["dimension"]:
                raise IndexIntegrityError(f"{folder}: shard {s['name']} has ntotal={idx.ntotal}, d={idx.d}; "
                                          f"manifest says count={s['count']}, d={m['dimension']}")
    return m


def is_index_dir(path: str | os.PathLike) -> bool:
    """True when `path` is an index folder this module wrote (a readable manifest of our format)."""
    try:
        load_manifest(path)
        return True
    except (IndexIntegrityError, OSError):
        return False


def check_out(out_dir: str | os.PathLike, overwrite: bool) -> str:
    """What publishing to `out_dir` would replace: "new" (absent or an empty folder) or "index".

    Anything else — a file, a folder of other files, a corpus — is refused whatever `overwrite` says;
    an existing index is refused unless `overwrite`. Nothing is changed here.
    """
    out = Path(out_dir)
    if out.is_symlink() and not out.exists():
        raise FileExistsError(f"--out {out} is a dangling symlink; refusing to write through it")
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder; refusing to replace it")
    if is_index_dir(out):
        if not overwrite:
            raise FileExistsError(f"--out {out} holds an index; pass --overwrite to publish a new version over it")
        return "index"
    entries = [e for e in os.listdir(out) if e not in (READ_LOCK, WRITE_LOCK, VERSIONS)
               and not e.startswith((".work-", f".{CURRENT}.new-", f".{MANIFEST}.new-"))]
    versions = out / VERSIONS
    if entries or (versions.is_dir() and any(not e.startswith(".tmp-") for e in os.listdir(versions))):
        raise FileExistsError(f"--out {out} is not an index folder (no {MANIFEST}) and is not empty; "
                              "refusing to replace it — pick a new or empty folder")
    return "new"


def check_fingerprint_version(index_dir: Path, fingerprint: str | None) -> None:
    """Indexes from before the tokenizer was fingerprinted cannot prove their query model matches."""
    if isinstance(fingerprint, str) and re.fullmatch(r"[0-9a-f]{64}", fingerprint):   # bare sha256: before v2
        raise ModelMismatchError(f"index {index_dir} was built by an earlier release whose model fingerprint "
                                 "does not cover the tokenizer, so no query model can be checked against it; "
                                 "rebuild it: python -m jobs.build_index ... --overwrite")
