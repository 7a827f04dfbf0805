"""Serving a published index: Searcher (checksums verified on open, shards merged by IndexShards)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

from pipeline.index.layout import IndexIntegrityError, ModelMismatchError, open_version
from pipeline.index.manifest import check_fingerprint_version, load_manifest, verify_folder
from pipeline.index.shards import normalize, read_shard_rows, shard_name


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
            self.manifest = verify_folder(vdir, load=False) if verify else load_manifest(vdir)
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
        from pipeline.index.embed import model_identity

        want = self.manifest["model"]["fingerprint"]
        check_fingerprint_version(self.dir, want)
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
            from pipeline.index.embed import load_encoder

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
        from pipeline.index.embed import embed_texts_local

        return self.search_vectors(embed_texts_local(self.encoder, list(texts), batch_size), k)


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
