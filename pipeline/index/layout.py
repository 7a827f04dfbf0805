"""Sharded FAISS index: build, verify, search, incremental re-index, atomic publication.

Layout of an index folder::

    current -> versions/000003   the published version: ONE symlink, replaced atomically (rename)
    manifest.json -> current/manifest.json   (convenience link for tools that read the manifest)
    versions/000003/             one complete, verified version (everything but manifest.json is
        manifest.json            checksummed in the manifest): model fingerprint, dim, metric, factory,
        trained.faiss            config, counts, sha256, library versions; the trained *empty* index
        shard_00000.faiss        every shard was cloned from; one FAISS index per shard (int64 ids);
        shard_00000.parquet      id, int_id, content_hash, vector — the id map, the hashes re-index
                                 compares and the exact vectors (a touched shard is rebuilt without
                                 re-embedding its unchanged documents)
    .lock                        readers hold it shared while opening; old versions are deleted only
                                 under an exclusive hold, so no open ever sees a version vanish
    .writer.lock                 one build / re-index publishes at a time

Publication (why): readers open files one by one, so swapping files or folders under them (two
renames) made concurrent opens fail or see a mix of versions. A version is written under
versions/.tmp-*, verified, renamed to its number, and published by replacing the `current` symlink —
one atomic rename. A reader resolves `current` once and reads every file from that version folder.
Folders written by earlier releases (files at the top level) are read as they are and converted in
place at their next publication.

Why these choices:
* shard = sha1(id) mod N and int_id = first 8 bytes of sha1(id) (63 bits): both are stable across
  processes and runs (Python's hash() is salted), so a re-indexed index and a fresh build assign
  every document to the same shard with the same int64 id;
* IVF/PQ are trained once on a sample and the trained empty index is cloned to every shard, so the
  shards share one coarse quantizer and re-index can rebuild a single shard consistently;
* inner product on L2-normalised vectors (cosine), whatever the factory string;
* a build goes into a temp folder inside the index, is re-loaded and checksummed, and only then
  published; the previous version stays servable until (and, for readers already opening it, after)
  that moment;
* manifest.json has no timestamps, so re-running a re-index on an unchanged corpus is a no-op and
  the manifest stays byte-identical.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

FORMAT = "lbr-faiss-shards/1"
MANIFEST = "manifest.json"
TRAINED = "trained.faiss"
CURRENT = "current"
VERSIONS = "versions"
READ_LOCK = ".lock"
WRITE_LOCK = ".writer.lock"
MAX_SHARDS = 65536
VERSION_RE = re.compile(r"^[0-9]{6,}$")
SHARD_RE = re.compile(r"^shard_[0-9]{5,}$")


class IndexIntegrityError(RuntimeError):
    """An index folder does not match its manifest (missing/tampered file, wrong count)."""


class ModelMismatchError(RuntimeError):
    """The model offered for queries/re-index is not the one the index was built with."""


class IndexBusyError(RuntimeError):
    """Another build or re-index is publishing to the same index folder."""


def version_dir(index_dir: str | os.PathLike) -> Path:
    """The folder holding the published version's files: `current` resolved once (or the folder itself
    for a version folder or an index written by an earlier release)."""
    root = Path(index_dir)
    cur = root / CURRENT
    if not cur.is_symlink():
        return root
    target = os.readlink(cur)
    parts = target.split("/")
    if len(parts) != 2 or parts[0] != VERSIONS or not VERSION_RE.match(parts[1]):
        raise IndexIntegrityError(f"{cur} points to {target!r}, not to a version folder inside the index")
    return root / VERSIONS / parts[1]


@contextlib.contextmanager
def open_version(index_dir: str | os.PathLike):
    """Yield the published version folder, held so that no cleanup removes it meanwhile: every file
    read inside the block comes from that one version. Never waits on a publisher."""
    root = Path(index_dir)
    if not (root / CURRENT).is_symlink():
        with read_lock(root):           # a version folder, or an index written by an earlier release
            yield root
        return
    for _ in range(1000):
        vdir = version_dir(root)
        lock = root / VERSIONS / f"{vdir.name}.lock"
        try:
            f = open(lock)  # noqa: SIM115 — closed by the `with f` below
        except FileNotFoundError:
            if vdir.is_dir() and version_dir(root) == vdir and not lock.exists():
                yield vdir               # a copy without lock files (e.g. read-only): nothing cleans it
                return
            continue                     # removed after we resolved `current`: resolve again
        with f:
            fcntl.flock(f, fcntl.LOCK_SH)
            if (vdir / MANIFEST).is_file():
                try:
                    yield vdir
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
                return
    raise IndexIntegrityError(f"{root}: the published version kept changing while opening it")


@contextlib.contextmanager
def read_lock(root: Path, exclusive: bool = False, wait: bool = True):
    """Shared while a reader opens a version; exclusive (never waiting) while old versions are deleted.

    Yields True when held. A read-only index folder without a lock file is read without one.
    """
    path = root / READ_LOCK
    try:
        f = open(path, "a" if exclusive else "r") if (exclusive or path.exists()) else None  # noqa: SIM115
    except OSError:
        f = None
    if f is None:
        yield not exclusive
        return
    with f:
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(f, flags)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def writer_lock(out: Path):
    """One publisher per index folder (a build or re-index already running makes the next one fail)."""
    with open(out / WRITE_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusyError(f"{out}: another build or re-index is publishing to this index") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def work_dir(out: str | os.PathLike) -> Path:
    """A scratch folder inside the index folder (embeddings before a build), named after this process
    so a later build removes it if this one is killed."""
    return Path(tempfile.mkdtemp(prefix=f".work-{socket.gethostname()}-{os.getpid()}-", dir=out))


def _dead(name: str) -> bool:
    """`.work-<host>-<pid>-*` of a process on this host that is gone (other hosts' entries are kept)."""
    m = re.match(r"^\.work-(.+)-([0-9]+)-[^-]*$", name)
    if not m or m.group(1) != socket.gethostname():
        return False
    try:
        os.kill(int(m.group(2)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def versions_dir(out: Path, create: bool = False) -> Path:
    v = out / VERSIONS
    if create:
        v.mkdir(exist_ok=True)
    return v


def temp_prefix() -> str:
    return f".tmp-{socket.gethostname()}-{os.getpid()}-"


def next_version(out: Path) -> str:
    nums = [int(e) for e in os.listdir(versions_dir(out)) if VERSION_RE.match(e)]
    return f"{max(nums, default=0) + 1:06d}"


def point(out: Path, name: str, target: str) -> None:
    """Make out/name a symlink to `target` (relative) with one atomic rename over the old entry."""
    tmp = out / f".{name}.new-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, out / name)


def legacy_files(out: Path) -> list[Path]:
    """Top-level files of a folder written by an earlier release (replaced by the versioned layout)."""
    if (out / CURRENT).is_symlink():
        return []
    return [out / e for e in os.listdir(out)
            if e != MANIFEST and (e == TRAINED or SHARD_RE.match(e.rsplit(".", 1)[0]))
            and (out / e).is_file() and not (out / e).is_symlink()]


def remove_stale_temps(out: Path) -> None:
    """Temp versions of interrupted builds (the writer lock is held: no other build is running)."""
    v = versions_dir(out)
    if v.is_dir():
        for e in os.listdir(v):
            if e.startswith(".tmp-"):
                shutil.rmtree(v / e, ignore_errors=True)
    for e in os.listdir(out):
        if e.startswith((f".{CURRENT}.new-", f".{MANIFEST}.new-")) or (e.startswith(".work-") and _dead(e)):
            p = out / e
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()


def cleanup_versions(out: str | os.PathLike, legacy: Sequence[Path] = ()) -> list[str]:
    """Delete every version but the published one that no reader is opening right now.

    A reader holds `versions/<n>.lock` shared from the moment it resolved `current` to <n> until its
    files are read; a version is removed only under that lock held exclusively (never waiting), so it
    never vanishes under an open. A version still being opened is kept; the next publication retries.
    Readers wait on nothing: publishing and cleaning never block an open.
    """
    out = Path(out)
    cur = os.readlink(out / CURRENT).split("/")[-1]
    v = versions_dir(out)
    removed = []
    if legacy:
        with read_lock(out, exclusive=True, wait=False) as held:
            if held:
                for p in legacy:
                    p.unlink(missing_ok=True)
    for e in sorted(os.listdir(v)):
        name = e.removesuffix(".lock")
        if not VERSION_RE.match(name) or name == cur or (e != name and (v / name).exists()):
            continue                      # (a version's lock file goes together with its folder)
        with open(v / f"{name}.lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue                                     # a reader is opening it: keep it for now
            shutil.rmtree(v / name, ignore_errors=True)
            (v / f"{name}.lock").unlink(missing_ok=True)     # still held: late readers see it gone
            removed.append(name)
    return removed


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
