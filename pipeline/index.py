"""Sharded FAISS index: build, verify, search, incremental re-index, atomic publication.

Layout of an index folder (everything but manifest.json is checksummed in the manifest)::

    manifest.json            model fingerprint, dim, metric, factory, config, counts, sha256, versions
    trained.faiss            the trained *empty* index every shard was cloned from
    shard_00000.faiss        one FAISS index per shard (ids are int64)
    shard_00000.parquet      id (str), int_id (int64), content_hash, vector — the id map, the
                             content hashes re-index compares, and the exact vectors so a touched
                             shard can be rebuilt without re-embedding its unchanged documents

Why these choices:
* shard = sha1(id) mod N and int_id = first 8 bytes of sha1(id) (63 bits): both are stable across
  processes and runs (Python's hash() is salted), so a re-indexed index and a fresh build assign
  every document to the same shard with the same int64 id;
* IVF/PQ are trained once on a sample and the trained empty index is cloned to every shard, so the
  shards share one coarse quantizer and re-index can rebuild a single shard consistently;
* inner product on L2-normalised vectors (cosine), whatever the factory string;
* a build goes into a temp folder, is re-loaded and checksummed, and only then renamed over the
  previous version, which stays servable until that moment;
* manifest.json has no timestamps, so re-running a re-index on an unchanged corpus is a no-op and
  the manifest stays byte-identical.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.embed import embeddings_table, vectors_from_column
from stages.io import atomic_dir, folder_checksums, write_json

FORMAT = "lbr-faiss-shards/1"
MANIFEST = "manifest.json"
TRAINED = "trained.faiss"


class IndexIntegrityError(RuntimeError):
    """An index folder does not match its manifest (missing/tampered file, wrong count)."""


class ModelMismatchError(RuntimeError):
    """The model offered for queries/re-index is not the one the index was built with."""


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
        if self.shards < 1:
            raise ValueError(f"IndexConfig.shards must be >= 1, got {self.shards}")
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
        index = _train(index, np.ascontiguousarray(sample))
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


def build_index(out_dir: str | os.PathLike, ids: Sequence[str], vectors: np.ndarray,
                hashes: Sequence[str], cfg: IndexConfig, model: dict) -> dict:
    """Fresh build from (id, vector, content_hash); publishes atomically; returns the manifest."""
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
             rebuild: dict[int, ShardRows], reuse: tuple[Path, dict] | None) -> dict:
    """Write rebuilt shards (+ hard-link untouched ones from `reuse`), verify, rename into place."""
    trained_bytes = faiss.serialize_index(trained)
    order = sorted(rebuild)
    built = _build_shards(trained_bytes, [(rebuild[i].int_ids, rebuild[i].vectors) for i in order], cfg)
    with atomic_dir(out) as tmp:
        if reuse is None:
            faiss.write_index(trained, str(tmp / TRAINED))
        else:
            _link(reuse[0] / TRAINED, tmp / TRAINED)
        meta: list[dict] = []
        for i in range(cfg.shards):
            name = shard_name(i)
            if i in rebuild:
                _write_shard_files(tmp, i, rebuild[i], built[order.index(i)])
                meta.append({"name": name, "count": len(rebuild[i].ids),
                             "content_digest": _content_digest(rebuild[i])})
            else:
                for ext in (".faiss", ".parquet"):
                    _link(reuse[0] / f"{name}{ext}", tmp / f"{name}{ext}")
                meta.append(dict(reuse[1]["shards"][i]))
        manifest = _manifest(tmp, cfg, model, dim, meta)
        write_json(tmp / MANIFEST, manifest)
        verify_index(tmp, load=True)
    return manifest


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ------------------------------------------------------------------------------- verify / read


def load_manifest(index_dir: str | os.PathLike) -> dict:
    p = Path(index_dir) / MANIFEST
    if not p.is_file():
        raise IndexIntegrityError(f"{index_dir} is not an index folder: {MANIFEST} is missing")
    m = json.loads(p.read_text())
    if m.get("format") != FORMAT:
        raise IndexIntegrityError(f"{p}: format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def verify_index(index_dir: str | os.PathLike, load: bool = False) -> dict:
    """Check every file's sha256 against the manifest (and, with load=True, shard counts)."""
    folder = Path(index_dir)
    m = load_manifest(folder)
    actual = folder_checksums(folder, exclude=(MANIFEST,))
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
    cols = ["id", "int_id", "content_hash"] + (["vector"] if vectors else [])
    t = pq.read_table(Path(index_dir) / f"{shard_name(i)}.parquet", columns=cols)
    vec = vectors_from_column(t.column("vector")) if vectors else np.zeros((0, 0), np.float32)
    return ShardRows(t.column("id").to_pylist(), t.column("int_id").to_numpy().astype(np.int64),
                     t.column("content_hash").to_pylist(), vec)


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
        self.dir = Path(index_dir)
        self.manifest = verify_index(self.dir) if verify else load_manifest(self.dir)
        m = self.manifest
        self.dim = int(m["dimension"])
        self.nprobe = nprobe or m["config"]["nprobe"]
        self.ef_search = ef_search or m["config"]["ef_search"]
        self.index = faiss.IndexShards(self.dim, True, False)  # successive_ids=False: ids are global
        self._shards = []
        int_ids, str_ids = [], []
        for i, s in enumerate(m["shards"]):
            idx = faiss.read_index(str(self.dir / f"{s['name']}.faiss"))
            if idx.ntotal != s["count"]:
                raise IndexIntegrityError(f"{self.dir}: shard {s['name']} has {idx.ntotal} vectors, "
                                          f"manifest says {s['count']}")
            _set_search_params(idx, self.nprobe, self.ef_search)
            self._shards.append(idx)  # keep Python refs alive: IndexShards does not own them
            self.index.add_shard(idx)
            rows = read_shard_rows(self.dir, i, vectors=False)
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
        got = model_identity(ref)["fingerprint"]
        if got != want:
            raise ModelMismatchError(f"model {ref!r} has fingerprint {got}, but index {self.dir} was built "
                                     f"with {self.manifest['model']['path']!r} (fingerprint {want}); "
                                     "query vectors would be in a different space — use that model or re-build")

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change IVF nprobe / HNSW efSearch on every shard without re-opening the index."""
        self.nprobe = nprobe or self.nprobe
        self.ef_search = ef_search or self.ef_search
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
        q = normalize(vectors)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have dimension {q.shape[1]}, index has {self.dim}")
        scores, ids = self.index.search(q, k)
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
    folder = Path(index_dir)
    m = verify_index(folder)
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
    _publish(folder, cfg, m["model"], m["dimension"], trained, rebuild, reuse=(folder, m))
    return report


def index_vectors(index_dir: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """All (id, stored vector) pairs of an index, sorted by id (for comparisons and tests)."""
    m = load_manifest(index_dir)
    ids, vecs = [], []
    for i in range(m["config"]["shards"]):
        r = read_shard_rows(index_dir, i)
        ids.extend(r.ids)
        vecs.append(r.vectors.reshape(len(r.ids), m["dimension"]))
    v = np.concatenate(vecs)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return [ids[j] for j in order], v[order]
