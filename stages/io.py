"""Small file helpers shared by every writer: checksums and atomic folder publication.

Why: a crash must never leave a half-written checkpoint or index that looks complete, so every
output folder is built under a temporary sibling and renamed into place only once it is whole.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def folder_checksums(folder: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every regular file under `folder`, keyed by its relative POSIX path, sorted."""
    root = Path(folder)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """Write JSON deterministically (sorted keys) via a temp file + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _alive(host: str, pid: int) -> bool:
    if host != socket.gethostname():
        return True                       # another machine's process: not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(final: str | os.PathLike) -> list[str]:
    """Remove `.NAME.tmp-<host>-<pid>-*` / `.NAME.old-<host>-<pid>-*` siblings of `final` left by a
    process on this host that is gone (a killed save); a running writer's temp folder is kept."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    pat = re.compile(rf"^\.{re.escape(final.name)}\.(tmp|old)-(.+)-([0-9]+)(-.*)?$")
    for e in os.listdir(final.parent):
        m = pat.match(e)
        if m and not _alive(m.group(2), int(m.group(3))):
            shutil.rmtree(final.parent / e, ignore_errors=True)
            removed.append(e)
    return removed


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder next to `final`; on success it replaces `final` in one rename.

    On an exception the temp folder is removed and `final` (if it existed) is untouched.
    When replacing, the old folder is moved aside first and deleted only after the new one is in place.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{_owner()}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{_owner()}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
