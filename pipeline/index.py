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
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.embed import embeddings_table, vectors_from_column
from stages.io import folder_checksums, write_json

FORMAT = "lbr-faiss-shards/1"
MANIFEST = "manifest.json"
TRAINED = "trained.faiss"
CURRENT = "current"
VERSIONS = "versions"
READ_LOCK = ".lock"
WRITE_LOCK = ".writer.lock"
MAX_SHARDS = 65536
_VERSION_RE = re.compile(r"^[0-9]{6,}$")
_SHARD_RE = re.compile(r"^shard_[0-9]{5,}$")


class IndexIntegrityError(RuntimeError):
    """An index folder does not match its manifest (missing/tampered file, wrong count)."""


class ModelMismatchError(RuntimeError):
    """The model offered for queries/re-index is not the one the index was built with."""


class IndexBusyError(RuntimeError):
    """Another build or re-index is publishing to the same index folder."""


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


def library_versions() -> dict:
    out = {"python": platform.python_version(), "faiss": faiss.__version__}
    for pkg in ("torch", "ray", "numpy", "pyarrow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def normalize(vecs: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(np.asarray(vecs, dtype=np.float32))
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D (N, d), got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if len(v) and not np.all(norms > 0):
        raise ValueError(f"vector row {int(np.argmin(norms[:, 0]))} has zero norm")
    return v / np.where(norms > 0, norms, 1)


# ----------------------------------------------------------------------------------------- build


def _is_ivf(index) -> bool:
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


def make_trained_index(factory: str, vectors: np.ndarray, cfg: IndexConfig):
    """Empty index for `factory` (inner product), trained once on a seeded sample when it needs it."""
    d = vectors.shape[1]
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS factory string {factory!r}: {str(e).splitlines()[-1]}") from None
    if not _is_ivf(index):
        index = faiss.IndexIDMap2(index)  # Flat/HNSW/PQ need an id map; IVF stores ids itself
    if not index.is_trained:
        n = len(vectors)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and n < ivf.nlist:
            raise ValueError(f"factory {factory!r} needs at least nlist={ivf.nlist} training vectors, "
                             f"corpus has {n}")
        take = min(n, cfg.train_size)
        idx = np.sort(np.random.default_rng(cfg.seed).choice(n, take, replace=False)) if take < n else None
        sample = vectors if idx is None else vectors[idx]
        try:
            index = _train(index, np.ascontiguousarray(sample))
        except RuntimeError as e:
            why = re.sub(r"^Error in .*? at \S+:[0-9]+: (Error: )?", "", str(e).strip().splitlines()[-1])
            raise ValueError(f"factory {factory!r} cannot be trained on {len(sample)} vectors: {why}") from None
    return index


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


def _build_shard_bytes(trained_bytes: np.ndarray, ids: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """Clone the trained empty index, add one shard's vectors, return it serialised (Ray-friendly)."""
    index = faiss.deserialize_index(trained_bytes)
    if len(ids):
        if faiss.get_num_gpus() > 0 and _is_ivf(index):
            try:
                gpu = faiss.index_cpu_to_all_gpus(index)
                gpu.add_with_ids(vecs, ids)
                index = faiss.index_gpu_to_cpu(gpu)
            except RuntimeError:  # no GPU implementation for this index type
                index.add_with_ids(vecs, ids)
        else:
            index.add_with_ids(vecs, ids)
    return faiss.serialize_index(index)


def _ray_enabled(cfg: IndexConfig) -> bool:
    if cfg.use_ray is False:
        return False
    import ray

    if cfg.use_ray:
        from pipeline.cluster import ensure_ray

        ensure_ray()
    return ray.is_initialized()


def _build_shards(trained_bytes: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]],
                  cfg: IndexConfig) -> list[np.ndarray]:
    """Build shard indexes: Ray tasks in parallel when Ray is up, else in this process."""
    if not parts:
        return []
    if not _ray_enabled(cfg):
        return [_build_shard_bytes(trained_bytes, ids, vecs) for ids, vecs in parts]
    import ray

    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_build_shard_bytes)
    ref = ray.put(trained_bytes)
    return ray.get([task.remote(ref, ids, vecs) for ids, vecs in parts])


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


def _content_digest(rows: ShardRows) -> str:
    h = hashlib.sha256()
    for i, c in sorted(zip(rows.ids, rows.hashes)):
        h.update(f"{i}\t{c}\n".encode())
    return h.hexdigest()


def _check_ids(ids: Sequence[str]) -> None:
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


def _write_shard_files(folder: Path, i: int, rows: ShardRows, index_bytes: np.ndarray) -> None:
    pq.write_table(rows.table(), folder / f"{shard_name(i)}.parquet")
    faiss.write_index(faiss.deserialize_index(index_bytes), str(folder / f"{shard_name(i)}.faiss"))


def _manifest(folder: Path, cfg: IndexConfig, model: dict, dim: int, shard_meta: list[dict]) -> dict:
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
        "files": folder_checksums(folder, exclude=(MANIFEST,)),
        "versions": library_versions(),
    }


def _split(ids: Sequence[str], hashes: Sequence[str], vecs: np.ndarray, n: int, dim: int) -> list[ShardRows]:
    buckets: list[list[int]] = [[] for _ in range(n)]
    for pos, i in enumerate(ids):
        buckets[shard_of(i, n)].append(pos)
    return [ShardRows.make([ids[p] for p in b], [hashes[p] for p in b], vecs[b] if b else vecs[:0], dim)
            for b in buckets]


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


def is_index_dir(path: str | os.PathLike) -> bool:
    """True when `path` is an index folder this module wrote (a readable manifest of our format)."""
    try:
        load_manifest(path)
        return True
    except (IndexIntegrityError, OSError):
        return False


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
    _check_ids(ids)
    vecs = normalize(vectors)
    dim = vecs.shape[1]
    trained = make_trained_index(cfg.factory, vecs, cfg)
    rows = _split(ids, list(hashes), vecs, cfg.shards, dim)
    return _publish(Path(out_dir), cfg, model, dim, trained, {i: r for i, r in enumerate(rows)}, reuse=None)


def _publish(out: Path, cfg: IndexConfig, model: dict, dim: int, trained,
             rebuild: dict[int, ShardRows], reuse: tuple[Path, dict] | None, locked: bool = False) -> dict:
    """Write rebuilt shards (+ hard-link untouched ones from `reuse`), verify, publish one version."""
    trained_bytes = faiss.serialize_index(trained)
    order = sorted(rebuild)
    built = _build_shards(trained_bytes, [(rebuild[i].int_ids, rebuild[i].vectors) for i in order], cfg)
    existed, fresh = out.exists(), not is_index_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.nullcontext() if locked else writer_lock(out):
            (out / READ_LOCK).touch()        # before anything is published: every reader takes it
            _remove_stale_temps(out)
            vdir = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=_versions(out, create=True)))
            try:
                if reuse is None:
                    faiss.write_index(trained, str(vdir / TRAINED))
                else:
                    _link(reuse[0] / TRAINED, vdir / TRAINED)
                meta: list[dict] = []
                for i in range(cfg.shards):
                    name = shard_name(i)
                    if i in rebuild:
                        _write_shard_files(vdir, i, rebuild[i], built[order.index(i)])
                        meta.append({"name": name, "count": len(rebuild[i].ids),
                                     "content_digest": _content_digest(rebuild[i])})
                    else:
                        for ext in (".faiss", ".parquet"):
                            _link(reuse[0] / f"{name}{ext}", vdir / f"{name}{ext}")
                        meta.append(dict(reuse[1]["shards"][i]))
                manifest = _manifest(vdir, cfg, model, dim, meta)
                write_json(vdir / MANIFEST, manifest)
                verify_index(vdir, load=True)
                final = _versions(out) / _next_version(out)
                (_versions(out) / f"{final.name}.lock").touch()
                os.rename(vdir, final)
            except BaseException:
                shutil.rmtree(vdir, ignore_errors=True)
                raise
            legacy = _legacy_files(out)
            _point(out, CURRENT, f"{VERSIONS}/{final.name}")       # THE publication: one rename
            _point(out, MANIFEST, f"{CURRENT}/{MANIFEST}")
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


def _versions(out: Path, create: bool = False) -> Path:
    v = out / VERSIONS
    if create:
        v.mkdir(exist_ok=True)
    return v


def _temp_prefix() -> str:
    return f".tmp-{socket.gethostname()}-{os.getpid()}-"


def _next_version(out: Path) -> str:
    nums = [int(e) for e in os.listdir(_versions(out)) if _VERSION_RE.match(e)]
    return f"{max(nums, default=0) + 1:06d}"


def _point(out: Path, name: str, target: str) -> None:
    """Make out/name a symlink to `target` (relative) with one atomic rename over the old entry."""
    tmp = out / f".{name}.new-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, out / name)


def _legacy_files(out: Path) -> list[Path]:
    """Top-level files of a folder written by an earlier release (replaced by the versioned layout)."""
    if (out / CURRENT).is_symlink():
        return []
    return [out / e for e in os.listdir(out)
            if e != MANIFEST and (e == TRAINED or _SHARD_RE.match(e.rsplit(".", 1)[0]))
            and (out / e).is_file() and not (out / e).is_symlink()]


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


@contextlib.contextmanager
def _read_lock(root: Path, exclusive: bool = False, wait: bool = True):
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


def _remove_stale_temps(out: Path) -> None:
    """Temp versions of interrupted builds (the writer lock is held: no other build is running)."""
    v = _versions(out)
    if v.is_dir():
        for e in os.listdir(v):
            if e.startswith(".tmp-"):
                shutil.rmtree(v / e, ignore_errors=True)
    for e in os.listdir(out):
        if e.startswith((f".{CURRENT}.new-", f".{MANIFEST}.new-")) or (e.startswith(".work-") and _dead(e)):
            p = out / e
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()


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


def cleanup_versions(out: str | os.PathLike, legacy: Sequence[Path] = ()) -> list[str]:
    """Delete every version but the published one that no reader is opening right now.

    A reader holds `versions/<n>.lock` shared from the moment it resolved `current` to <n> until its
    files are read; a version is removed only under that lock held exclusively (never waiting), so it
    never vanishes under an open. A version still being opened is kept; the next publication retries.
    Readers wait on nothing: publishing and cleaning never block an open.
    """
    out = Path(out)
    cur = os.readlink(out / CURRENT).split("/")[-1]
    v = _versions(out)
    removed = []
    if legacy:
        with _read_lock(out, exclusive=True, wait=False) as held:
            if held:
                for p in legacy:
                    p.unlink(missing_ok=True)
    for e in sorted(os.listdir(v)):
        name = e.removesuffix(".lock")
        if not _VERSION_RE.match(name) or name == cur or (e != name and (v / name).exists()):
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


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ------------------------------------------------------------------------------- verify / read


def version_dir(index_dir: str | os.PathLike) -> Path:
    """The folder holding the published version's files: `current` resolved once (or the folder itself
    for a version folder or an index written by an earlier release)."""
    root = Path(index_dir)
    cur = root / CURRENT
    if not cur.is_symlink():
        return root
    target = os.readlink(cur)
    parts = target.split("/")
    if len(parts) != 2 or parts[0] != VERSIONS or not _VERSION_RE.match(parts[1]):
        raise IndexIntegrityError(f"{cur} points to {target!r}, not to a version folder inside the index")
    return root / VERSIONS / parts[1]


@contextlib.contextmanager
def open_version(index_dir: str | os.PathLike):
    """Yield the published version folder, held so that no cleanup removes it meanwhile: every file
    read inside the block comes from that one version. Never waits on a publisher."""
    root = Path(index_dir)
    if not (root / CURRENT).is_symlink():
        with _read_lock(root):           # a version folder, or an index written by an earlier release
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


def verify_index(index_dir: str | os.PathLike, load: bool = False) -> dict:
    """Check every file's sha256 against the manifest (and, with load=True, shard counts)."""
    with open_version(index_dir) as folder:
        return _verify(folder, load)


def _verify(folder: Path, load: bool) -> dict:
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


def read_shard_rows(index_dir: str | os.PathLike, i: int, vectors: bool = True) -> ShardRows:
    """One shard's rows; `index_dir` is an index or (inside `open_version`) a version folder."""
    cols = ["id", "int_id", "content_hash"] + (["vector"] if vectors else [])
    t = pq.read_table(version_dir(index_dir) / f"{shard_name(i)}.parquet", columns=cols)
    vec = vectors_from_column(t.column("vector")) if vectors else np.zeros((0, 0), np.float32)
    return ShardRows(t.column("id").to_pylist(), t.column("int_id").to_numpy().astype(np.int64),
                     t.column("content_hash").to_pylist(), vec)


def _check_fingerprint_version(index_dir: Path, fingerprint: str | None) -> None:
    """Indexes from before the tokenizer was fingerprinted cannot prove their query model matches."""
    if isinstance(fingerprint, str) and re.fullmatch(r"[0-9a-f]{64}", fingerprint):   # bare sha256: before v2
        raise ModelMismatchError(f"index {index_dir} was built by an earlier release whose model fingerprint "
                                 "does not cover the tokenizer, so no query model can be checked against it; "
                                 "rebuild it: python -m jobs.build_index ... --overwrite")


class Hit(NamedTuple):
    id: str
    score: float


def _set_search_params(index, nprobe: int, ef_search: int) -> None:
    ps = faiss.ParameterSpace()
    if faiss.try_extract_index_ivf(index) is not None:
        ps.set_index_parameter(index, "nprobe", nprobe)
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efSearch = ef_search


class Searcher:
    """Serve a published index: checksums verified on open, shards merged by IndexShards.

    `model`: folder of the query encoder; defaults to the manifest's. A model whose fingerprint
    differs from the manifest's is refused (its vectors live in another space).
    """

    def __init__(self, index_dir: str | os.PathLike, model: str | os.PathLike | None = None,
                 nprobe: int | None = None, ef_search: int | None = None, verify: bool = True):
        for name, v in (("nprobe", nprobe), ("ef_search", ef_search)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.dir = Path(index_dir)
        with open_version(self.dir) as vdir:       # every file below comes from this one version
            self.version = vdir
            self.manifest = _verify(vdir, load=False) if verify else load_manifest(vdir)
            m = self.manifest
            self.dim = int(m["dimension"])
            self.nprobe = nprobe if nprobe is not None else m["config"]["nprobe"]
            self.ef_search = ef_search if ef_search is not None else m["config"]["ef_search"]
            self.index = faiss.IndexShards(self.dim, True, False)  # successive_ids=False: ids are global
            self._shards = []
            int_ids, str_ids = [], []
            for i, s in enumerate(m["shards"]):
                idx = faiss.read_index(str(vdir / f"{shard_name(i)}.faiss"))
                if idx.ntotal != s["count"]:
                    raise IndexIntegrityError(f"{self.dir}: shard {s['name']} has {idx.ntotal} vectors, "
                                              f"manifest says {s['count']}")
                _set_search_params(idx, self.nprobe, self.ef_search)
                self._shards.append(idx)  # keep Python refs alive: IndexShards does not own them
                self.index.add_shard(idx)
                rows = read_shard_rows(vdir, i, vectors=False)
                int_ids.append(rows.int_ids)
                str_ids.extend(rows.ids)
        iids = np.concatenate(int_ids) if int_ids else np.zeros(0, np.int64)
        order = np.argsort(iids)
        self._int_ids = iids[order]
        self._str_ids = np.asarray(str_ids, dtype=object)[order]
        self._model_ref = str(model) if model is not None else m["model"]["path"]
        self._encoder = None
        if model is not None:
            self._check_model(self._model_ref)

    def _check_model(self, ref: str) -> None:
        from pipeline.embed import model_identity

        want = self.manifest["model"]["fingerprint"]
        _check_fingerprint_version(self.dir, want)
        got = model_identity(ref)["fingerprint"]
        if got != want:
            raise ModelMismatchError(f"model {ref!r} has fingerprint {got}, but index {self.dir} was built "
                                     f"with {self.manifest['model']['path']!r} (fingerprint {want}); "
                                     "query vectors would be in a different space — use that model or re-build")

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change IVF nprobe / HNSW efSearch on every shard without re-opening the index."""
        for name, v in (("nprobe", nprobe), ("ef_search", ef_search)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.nprobe = nprobe if nprobe is not None else self.nprobe
        self.ef_search = ef_search if ef_search is not None else self.ef_search
        for idx in self._shards:
            _set_search_params(idx, self.nprobe, self.ef_search)

    @property
    def encoder(self):
        if self._encoder is None:
            from pipeline.embed import load_encoder

            self._check_model(self._model_ref)
            self._encoder = load_encoder(self._model_ref)
        return self._encoder

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        q = normalize(vectors)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have dimension {q.shape[1]}, index has {self.dim}")
        scores, ids = self.index.search(q, int(min(k, max(len(self), 1))))   # more than ntotal adds nothing
        out = []
        for srow, irow in zip(scores, ids):
            keep = irow >= 0
            pos = np.searchsorted(self._int_ids, irow[keep])
            out.append([Hit(str(s), float(v)) for s, v in zip(self._str_ids[pos], srow[keep])])
        return out

    def search(self, texts: Sequence[str], k: int = 10, batch_size: int = 32) -> list[list[Hit]]:
        from pipeline.embed import embed_texts_local

        return self.search_vectors(embed_texts_local(self.encoder, list(texts), batch_size), k)


# ------------------------------------------------------------------------------------- reindex


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
        _check_fingerprint_version(root, m["model"]["fingerprint"])
    if model is not None and model["fingerprint"] != m["model"]["fingerprint"]:
        raise ModelMismatchError(f"model {model['path']!r} (fingerprint {model['fingerprint']}) differs from the "
                                 f"index's {m['model']['path']!r} ({m['model']['fingerprint']}); re-indexing "
                                 "would mix embedding spaces — run jobs.build_index for a full rebuild")
    ids = list(ids)
    if len(ids) != len(hashes):
        raise ValueError(f"{len(ids)} ids but {len(hashes)} content hashes")
    _check_ids(ids)
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
    _publish(root, cfg, m["model"], m["dimension"], trained, rebuild, reuse=(folder, m), locked=True)
    return report


def index_vectors(index_dir: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """All (id, stored vector) pairs of an index, sorted by id (for comparisons and tests)."""
    with open_version(index_dir) as vdir:
        return _index_vectors(vdir)


def _index_vectors(index_dir: Path) -> tuple[list[str], np.ndarray]:
    m = load_manifest(index_dir)
    ids, vecs = [], []
    for i in range(m["config"]["shards"]):
        r = read_shard_rows(index_dir, i)
        ids.extend(r.ids)
        vecs.append(r.vectors.reshape(len(r.ids), m["dimension"]))
    v = np.concatenate(vecs)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return [ids[j] for j in order], v[order]
