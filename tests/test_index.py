"""Sharded FAISS index: exactness, IVF recall, re-index == fresh build, atomic publish, checksums."""
import os

import faiss
import numpy as np
import pytest

from pipeline.index import layout, shards
from pipeline.index.build import build_index
from pipeline.index.layout import IndexIntegrityError, ModelMismatchError
from pipeline.index.manifest import verify_index
from pipeline.index.reindex import reindex
from pipeline.index.search import Searcher, index_vectors
from pipeline.index.shards import IndexConfig, shard_of

faiss.omp_set_num_threads(1)
MODEL = {"path": "hashing:32", "fingerprint": "hashing:32"}


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n, d, n_clusters, seed=0, noise=0.15):
    rng = np.random.default_rng(seed)
    centers = _unit(rng.standard_normal((n_clusters, d)))
    return _unit(centers[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, d)))


def _build(path, vecs, cfg, ids=None, hashes=None, model=MODEL, overwrite=True):
    ids = ids or [f"doc-{i}" for i in range(len(vecs))]
    hashes = hashes or [f"h{i}" for i in range(len(vecs))]
    return build_index(path, ids, vecs, hashes, cfg, model, overwrite=overwrite)


def test_shard_assignment_is_stable_and_spread():
    assert shard_of("doc-1", 4) == shard_of("doc-1", 4)  # sha1, not salted hash()
    counts = np.bincount([shard_of(f"doc-{i}", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 800


def test_sharded_flat_equals_bruteforce(tmp_path):
    rng = np.random.default_rng(1)
    x = _unit(rng.standard_normal((3000, 32)))
    q = _unit(rng.standard_normal((50, 32)))
    m = _build(tmp_path / "ix", x, IndexConfig(factory="Flat", shards=4, use_ray=False))
    assert m["num_docs"] == 3000 and len(m["shards"]) == 4 and m["metric"] == "inner_product"
    assert set(m["versions"]) >= {"faiss", "torch", "ray", "python"}
    hits = Searcher(tmp_path / "ix").search_vectors(q, 10)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    for h, e, qq in zip(hits, exact, q):
        assert [x.id for x in h] == [f"doc-{j}" for j in e]
        np.testing.assert_allclose([x.score for x in h], x[e] @ qq, atol=1e-5)


def test_ivf_recall_at_10_on_clustered_20k(tmp_path):
    x = clustered(20_000, 32, 64, seed=2)
    # queries: perturbed corpus points, so they follow the corpus's clusters
    q = _unit(x[np.random.default_rng(4).choice(len(x), 200, replace=False)]
              + 0.1 * np.random.default_rng(5).standard_normal((200, 32)))
    _build(tmp_path / "ivf", x, IndexConfig(factory="IVF64,Flat", shards=4, nprobe=8, use_ray=False))
    got = Searcher(tmp_path / "ivf").search_vectors(q, 10)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recall = np.mean([len({h.id for h in g} & {f"doc-{j}" for j in e}) / 10 for g, e in zip(got, exact)])
    assert recall >= 0.95, recall
    # nprobe=1 must be worse: the parameter really reaches every shard
    low = Searcher(tmp_path / "ivf", nprobe=1).search_vectors(q, 10)
    low_recall = np.mean([len({h.id for h in g} & {f"doc-{j}" for j in e}) / 10 for g, e in zip(low, exact)])
    assert low_recall < recall


@pytest.mark.parametrize(("factory", "min_hit_rate"), [("HNSW16", 0.95), ("IVF8,PQ8x4", 0.6)])
def test_other_factories_build_and_search(tmp_path, factory, min_hit_rate):
    x = clustered(2000, 16, 8, seed=6)
    _build(tmp_path / "ix", x, IndexConfig(factory=factory, shards=2, nprobe=8, use_ray=False))
    hits = Searcher(tmp_path / "ix").search_vectors(x[:40], 5)
    assert np.mean([f"doc-{i}" in {y.id for y in h} for i, h in enumerate(hits)]) >= min_hit_rate


def test_bad_factory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="invalid FAISS factory string 'IVFoops'"):
        _build(tmp_path / "ix", clustered(100, 8, 2), IndexConfig(factory="IVFoops", shards=2, use_ray=False))
    with pytest.raises(ValueError, match="nlist=256"):
        _build(tmp_path / "ix", clustered(100, 8, 2), IndexConfig(factory="IVF256,Flat", use_ray=False))


def test_reindex_after_random_batches_equals_fresh_build(tmp_path):
    rng = np.random.default_rng(7)
    d = 16
    docs = {f"doc-{i}": (_unit(rng.standard_normal((1, d)))[0], f"v0-{i}") for i in range(600)}
    cfg = IndexConfig(factory="Flat", shards=3, use_ray=False)
    ids = sorted(docs)
    _build(tmp_path / "ix", np.stack([docs[i][0] for i in ids]), cfg, ids, [docs[i][1] for i in ids])
    next_id = 600
    for batch in range(20):
        keys = sorted(docs)
        updated = set(rng.choice(keys, 10, replace=False).tolist())
        for k in updated:  # updates
            docs[k] = (_unit(rng.standard_normal((1, d)))[0], f"v{batch + 1}-{k}")
        for k in rng.choice(sorted(set(keys) - updated), 8, replace=False):  # deletes
            del docs[k]
        for _ in range(int(rng.integers(0, 15))):  # adds
            docs[f"doc-{next_id}"] = (_unit(rng.standard_normal((1, d)))[0], f"v{batch + 1}-{next_id}")
            next_id += 1
        asked: list[str] = []

        def embed(todo, asked=asked):
            asked.extend(todo)
            return np.stack([docs[t][0] for t in todo])

        ids = list(docs)
        rep = reindex(tmp_path / "ix", ids, [docs[i][1] for i in ids], embed)
        assert rep.changed == 10 and rep.deleted == 8 and len(asked) == rep.added + rep.changed
        assert rep.published and rep.unchanged == len(ids) - rep.added - rep.changed
    ids = sorted(docs)
    _build(tmp_path / "fresh", np.stack([docs[i][0] for i in ids]), cfg, ids, [docs[i][1] for i in ids])
    a_ids, a_vec = index_vectors(tmp_path / "ix")
    b_ids, b_vec = index_vectors(tmp_path / "fresh")
    assert a_ids == b_ids == ids
    np.testing.assert_allclose(a_vec, b_vec, atol=1e-6)
    ma, mb = verify_index(tmp_path / "ix", load=True), verify_index(tmp_path / "fresh", load=True)
    assert ma["shards"] == mb["shards"] and ma["files"] == mb["files"]  # byte-identical shard files
    q = _unit(rng.standard_normal((20, d)))
    assert Searcher(tmp_path / "ix").search_vectors(q, 10) == Searcher(tmp_path / "fresh").search_vectors(q, 10)

    # idempotent: same corpus again -> nothing embedded, manifest byte-identical
    before = (tmp_path / "ix" / "manifest.json").read_bytes()
    rep = reindex(tmp_path / "ix", ids, [docs[i][1] for i in ids], lambda todo: pytest.fail(f"embedded {todo}"))
    assert not rep.published and rep.touched_shards == []
    assert (tmp_path / "ix" / "manifest.json").read_bytes() == before


def test_reindex_rebuilds_only_touched_shards(tmp_path):
    x = clustered(400, 8, 4, seed=8)
    ids = [f"doc-{i}" for i in range(400)]
    hashes = [f"h{i}" for i in range(400)]
    m0 = _build(tmp_path / "ix", x, IndexConfig(factory="IVF4,Flat", shards=4, use_ray=False), ids, hashes)
    hashes[5] = "changed"
    rep = reindex(tmp_path / "ix", ids, hashes, lambda todo: _unit(np.ones((len(todo), 8))))
    touched = shard_of("doc-5", 4)
    assert rep.touched_shards == [touched] and rep.changed == 1
    m1 = verify_index(tmp_path / "ix", load=True)
    for i in range(4):
        same = m0["files"][f"shard_{i:05d}.faiss"] == m1["files"][f"shard_{i:05d}.faiss"]
        assert same == (i != touched)
    assert m1["files"]["trained.faiss"] == m0["files"]["trained.faiss"]  # quantizer reused, not retrained
    hit = Searcher(tmp_path / "ix").search_vectors(_unit(np.ones((1, 8))), 1)[0][0]
    assert hit.id == "doc-5" and hit.score == pytest.approx(1.0, abs=1e-5)


def test_failed_build_leaves_previous_index_servable(tmp_path, monkeypatch):
    x = clustered(500, 8, 4, seed=9)
    _build(tmp_path / "ix", x, IndexConfig(factory="Flat", shards=3, use_ray=False))
    before = Searcher(tmp_path / "ix").search_vectors(x[:5], 3)
    manifest = (tmp_path / "ix" / "manifest.json").read_bytes()
    real = shards.write_shard_files
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real(*a, **k)

    monkeypatch.setattr(shards, "write_shard_files", flaky)
    with pytest.raises(OSError, match="injected"):
        _build(tmp_path / "ix", clustered(700, 8, 4, seed=10), IndexConfig(factory="Flat", shards=3, use_ray=False))
    assert (tmp_path / "ix" / "manifest.json").read_bytes() == manifest
    assert Searcher(tmp_path / "ix").search_vectors(x[:5], 3) == before
    assert sorted(os.listdir(tmp_path)) == ["ix"]  # no temp folder left behind
    # the same for a re-index that fails midway
    calls.clear()
    with pytest.raises(OSError, match="injected"):
        reindex(tmp_path / "ix", [f"doc-{i}" for i in range(500)], ["new"] * 500, lambda t: x[: len(t)], use_ray=False)
    assert (tmp_path / "ix" / "manifest.json").read_bytes() == manifest


def test_tampered_or_missing_shard_is_detected(tmp_path):
    _build(tmp_path / "ix", clustered(300, 8, 4, seed=11), IndexConfig(factory="Flat", shards=2, use_ray=False))
    f = layout.version_dir(tmp_path / "ix") / "shard_00001.faiss"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match="checksum mismatch for shard_00001.faiss"):
        Searcher(tmp_path / "ix")
    f.unlink()
    with pytest.raises(IndexIntegrityError, match="shard_00001.faiss listed in the manifest is missing"):
        Searcher(tmp_path / "ix")


def test_model_mismatch_is_refused(tmp_path):
    x = clustered(200, 32, 4, seed=12)
    _build(tmp_path / "ix", x, IndexConfig(factory="Flat", shards=2, use_ray=False))
    with pytest.raises(ModelMismatchError, match="fingerprint hashing:16"):
        Searcher(tmp_path / "ix", model="hashing:16")
    other = {"path": "hashing:16", "fingerprint": "hashing:16"}
    with pytest.raises(ModelMismatchError, match="full rebuild"):
        reindex(tmp_path / "ix", ["doc-0"], ["h"], lambda t: x[:1], model=other)
    s = Searcher(tmp_path / "ix")  # default: the manifest's model (the hashing encoder here)
    assert len(s.search(["some text"], 3)[0]) == 3


def test_shards_built_as_ray_tasks_match_in_process(tmp_path, ray_session):
    x = clustered(3000, 16, 16, seed=13)
    a = _build(tmp_path / "ray", x, IndexConfig(factory="IVF16,Flat", shards=3, use_ray=True))
    b = _build(tmp_path / "local", x, IndexConfig(factory="IVF16,Flat", shards=3, use_ray=False))
    assert a["files"] == b["files"]
