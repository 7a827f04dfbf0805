"""Index publication (issue 11, items 1, 2, 10): what a build may replace, atomic versions for readers,
cleanup of old versions and of interrupted builds, manifest names that stay inside the folder."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from pipeline.index import layout, manifest, shards
from pipeline.index.build import build_index
from pipeline.index.layout import IndexIntegrityError
from pipeline.index.reindex import reindex
from pipeline.index.search import Searcher
from pipeline.index.shards import IndexConfig

faiss.omp_set_num_threads(1)
MODEL = {"path": "hashing:8", "fingerprint": "hashing:8"}
ROOT = Path(__file__).resolve().parents[1]


def _vecs(n, d=8, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _build(path, n=120, overwrite=False, shards=3):
    return build_index(path, [f"doc-{i}" for i in range(n)], _vecs(n), [f"h{i}" for i in range(n)],
                       IndexConfig(factory="Flat", shards=shards, use_ray=False), MODEL, overwrite=overwrite)


def _tree(p: Path) -> dict:
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def test_build_never_replaces_a_folder_it_did_not_write(tmp_path):
    foreign = tmp_path / "corpus"
    foreign.mkdir()
    (foreign / "corpus.jsonl").write_text('{"_id": "1", "text": "keep me"}\n')
    (foreign / "notes.txt").write_text("mine")
    before = _tree(foreign)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not an index folder"):
            _build(foreign, overwrite=overwrite)
        assert _tree(foreign) == before
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        _build(f, overwrite=True)
    assert f.read_text() == "x"


def test_existing_index_is_replaced_only_with_overwrite(tmp_path):
    ix = tmp_path / "ix"
    m0 = _build(ix)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _build(ix, n=60)
    assert manifest.load_manifest(ix)["num_docs"] == m0["num_docs"]
    _build(ix, n=60, overwrite=True)
    assert manifest.load_manifest(ix)["num_docs"] == 60 and len(Searcher(ix)) == 60
    # an empty folder is fine (nothing to lose)
    (tmp_path / "empty").mkdir()
    _build(tmp_path / "empty")


def test_cli_build_index_refuses_corpus_folder_as_out(tmp_path, capsys):
    from jobs import build_index as job

    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": str(i), "text": f"doc {i} words"}) + "\n"
                                               for i in range(20)))
    before = _tree(data)
    args = ["--model", "hashing:16", "--corpus", str(data / "corpus.jsonl"), "--shards", "2", "--no-ray"]
    for extra in ([], ["--overwrite"]):
        assert job.main([*args, "--out", str(data), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not an index folder" in err[0], err
        assert _tree(data) == before
    assert job.main([*args, "--out", str(tmp_path / "ix")]) == 0
    assert job.main([*args, "--out", str(tmp_path / "ix")]) == 2          # an index: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert job.main([*args, "--out", str(tmp_path / "ix"), "--overwrite"]) == 0


def test_publication_is_one_pointer_swap_and_old_versions_go(tmp_path):
    ix = tmp_path / "ix"
    _build(ix)
    assert (ix / "current").is_symlink() and os.readlink(ix / "current") == "versions/000001"
    assert json.loads((ix / "manifest.json").read_text())["num_docs"] == 120     # convenience link
    ids = [f"doc-{i}" for i in range(120)]
    for r in range(3):
        reindex(ix, ids, [f"h{i}-{r}" for i in range(120)], lambda t, r=r: _vecs(len(t), seed=r + 1))
    assert os.readlink(ix / "current") == "versions/000004"
    assert sorted(os.listdir(ix / "versions")) == ["000004", "000004.lock"]
    assert sorted(os.listdir(ix)) == [".lock", ".writer.lock", "current", "manifest.json", "versions"]


def test_a_version_being_opened_is_kept_until_the_reader_is_done(tmp_path):
    ix = tmp_path / "ix"
    _build(ix)
    ids = [f"doc-{i}" for i in range(120)]
    with layout.open_version(ix) as v:                       # a reader in the middle of opening v1
        reindex(ix, ids, ["new"] * 120, lambda t: _vecs(len(t), seed=5))
        assert v.is_dir() and manifest.verify_index(v, load=True)["num_docs"] == 120
    reindex(ix, ids, ["newer"] * 120, lambda t: _vecs(len(t), seed=6))
    assert not v.exists() and sorted(os.listdir(ix / "versions")) == ["000003", "000003.lock"]


WRITER = r"""
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[2])
from pipeline.index.reindex import reindex
ix, until = sys.argv[1], time.time() + float(sys.argv[3])
ids = [f"doc-{i}" for i in range(120)]
r = 0
while time.time() < until:
    r += 1
    x = np.random.default_rng(r).standard_normal((120, 8)).astype(np.float32)
    reindex(ix, ids, [f"h{i}-{r}" for i in range(120)], lambda t: x[: len(t)])
print(r)
"""


def test_concurrent_opens_during_continuous_reindexing_never_fail(tmp_path):
    ix = tmp_path / "ix"
    _build(ix)
    seconds = 4.0
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(ix), str(ROOT), str(seconds)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    opens, failures = 0, []
    q = _vecs(3, seed=99)
    t_end = time.time() + seconds + 5
    while w.poll() is None and time.time() < t_end:
        try:
            s = Searcher(ix)
            assert len(s) == 120 and s.manifest["num_docs"] == 120
            assert all(len(h) == 5 for h in s.search_vectors(q, 5))
            opens += 1
        except Exception as e:  # noqa: BLE001 — every failure counts
            failures.append(f"{type(e).__name__}: {e}")
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0, err[-2000:]
    publishes = int(out.strip().splitlines()[-1])
    assert publishes >= 5 and opens >= 20, (publishes, opens)
    assert failures == [], f"{len(failures)} of {opens + len(failures)} opens failed: {failures[:3]}"
    layout.cleanup_versions(ix)
    assert len([e for e in os.listdir(ix / "versions") if not e.endswith(".lock")]) == 1


def test_interrupted_builds_leave_nothing_behind(tmp_path, monkeypatch):
    ix = tmp_path / "ix"
    _build(ix)
    # what a killed build leaves: a temp version and a scratch folder of a dead process
    (ix / "versions" / ".tmp-host-1-abc").mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (ix / f".work-{socket.gethostname()}-{dead}-x").mkdir()
    live = ix / f".work-{socket.gethostname()}-{os.getpid()}-y"
    live.mkdir()
    reindex(ix, [f"doc-{i}" for i in range(120)], ["z"] * 120, lambda t: _vecs(len(t), seed=3))
    assert not (ix / "versions" / ".tmp-host-1-abc").exists()
    assert not (ix / f".work-{socket.gethostname()}-{dead}-x").exists()
    assert live.exists()                                     # a running build's scratch is left alone
    # a failing fresh build removes what it created
    monkeypatch.setattr(shards, "write_shard_files", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        _build(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_manifest_names_never_leave_the_index_folder(tmp_path):
    ix = tmp_path / "ix"
    _build(ix)
    v = layout.version_dir(ix)
    (tmp_path / "outside.faiss").write_bytes((v / "shard_00000.faiss").read_bytes())
    m = json.loads((v / "manifest.json").read_text())
    m["shards"][0]["name"] = "../../outside"
    (v / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexIntegrityError, match="expected 'shard_00000'"):
        Searcher(ix, verify=False)
    os.replace(ix / "current", ix / "old")
    os.symlink("../../..", ix / "current")
    with pytest.raises(IndexIntegrityError, match="not to a version folder"):
        Searcher(ix)


def test_index_written_by_an_earlier_release_is_read_and_converted(tmp_path):
    ix = tmp_path / "ix"
    _build(ix)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in layout.version_dir(ix).iterdir():
        (legacy / f.name).write_bytes(f.read_bytes())
    assert len(Searcher(legacy)) == 120
    reindex(legacy, [f"doc-{i}" for i in range(100)], [f"h{i}" for i in range(100)], lambda t: _vecs(len(t)))
    assert (legacy / "current").is_symlink() and len(Searcher(legacy)) == 100
    assert not list(legacy.glob("shard_*")) and not (legacy / "trained.faiss").exists()


def test_killed_saves_leave_no_temp_folders_next_to_a_model(tmp_path):
    from stages.io import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    stale = [tmp_path / f".model.tmp-{host}-{dead}-abc", tmp_path / f".model.old-{host}-{dead}"]
    live = tmp_path / f".model.tmp-{host}-{os.getpid()}-xyz"
    other_host = tmp_path / f".model.tmp-elsewhere-{dead}-q"
    for p in [*stale, live, other_host]:
        p.mkdir()
    with atomic_dir(tmp_path / "model") as d:
        (d / "f").write_text("x")
    assert not any(p.exists() for p in stale) and live.exists() and other_host.exists()
    assert (tmp_path / "model" / "f").read_text() == "x"


def test_index_with_a_pre_tokenizer_fingerprint_asks_for_a_rebuild(tmp_path):
    from pipeline.index.layout import ModelMismatchError

    legacy = {"path": "/old/model", "fingerprint": "ab" * 32}
    build_index(tmp_path / "ix", ["a", "b"], _vecs(2), ["1", "2"], IndexConfig(shards=1, use_ray=False), legacy)
    with pytest.raises(ModelMismatchError, match="rebuild it"):
        Searcher(tmp_path / "ix", model="hashing:8")
    with pytest.raises(ModelMismatchError, match="rebuild it"):
        reindex(tmp_path / "ix", ["a"], ["1"], lambda t: _vecs(len(t)), model=MODEL)
