"""Property-based fuzzing of the readers and of the command lines' argument and input checks.

Property (issue 11): on any generated input a reader returns records or raises one error located at
`file:line: reason`; with skip_bad_records every non-blank line is either a record or one quarantined
record with its reason (nothing vanishes). A command exits 0, or 2 (3 for mining without negatives)
with exactly one `error:` line and no traceback, and never changes anything outside its --out (nor
--out itself when it fails).

Bounded for CI (fixed seed, derandomized, LBR_FUZZ_EXAMPLES examples per property, default 20:
well under a minute); run longer with e.g. `LBR_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py`.
"""
import contextlib
import gzip
import io
import json
import os
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.readers import BadRecordError, Quarantine, read_beir, read_corpus, read_pairs

EXAMPLES = int(os.environ.get("LBR_FUZZ_EXAMPLES", "20"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------------------------------ inputs
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=8), st.just(""), st.just("   "))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                     max_size=3), max_leaves=6)
record = st.fixed_dictionaries({}, optional={"_id": st.one_of(st.text(max_size=6), st.integers(0, 50), values),
                                             "id": values, "text": st.one_of(st.text(max_size=20), values),
                                             "title": st.one_of(st.text(max_size=5), values)})
good = st.builds(lambda i, t: {"_id": f"d{i}", "text": t or "x"}, st.integers(0, 30), st.text(min_size=1, max_size=20))


def _line(draw_obj) -> bytes:
    return json.dumps(draw_obj).encode()


line = st.one_of(good.map(_line), record.map(_line), values.map(_line),
                 st.binary(max_size=30).filter(lambda b: b"\n" not in b),
                 st.sampled_from([b"", b"   ", b"{", b"[1,2]", b'{"_id": "a", "text": "caf\xe9"}', b"\xff\xfe",
                                  b'{"_id": "x", "text": "ok"}', b"null", b"\x00"]))
lines = st.lists(line, min_size=0, max_size=15)


def _nonblank(content: bytes) -> list[int]:
    out = []
    for n, raw in enumerate(content.split(b"\n")[: -1 if content.endswith(b"\n") else None], 1):
        try:
            blank = not raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            blank = False
        if not blank:
            out.append(n)
    return out


def _located(e: BaseException, path: Path) -> int:
    m = re.match(rf"^{re.escape(str(path))}:(\d+): \S", str(e))
    assert m, f"not located: {e}"
    assert "\n" not in str(e)
    return int(m.group(1))


# ----------------------------------------------------------------------------------------- readers
@FUZZ
@given(lines=lines, gz=st.booleans(), cut=st.one_of(st.none(), st.floats(0.05, 0.95)))
def test_jsonl_corpus_reader(lines, gz, cut):
    with tempfile.TemporaryDirectory() as d:
        content = b"\n".join(lines) + (b"\n" if lines else b"")
        f = Path(d) / ("c.jsonl.gz" if gz else "c.jsonl")
        data = gzip.compress(content) if gz else content
        truncated = cut is not None and gz
        f.write_bytes(data[: max(1, int(len(data) * cut))] if truncated else data)
        try:
            docs = read_corpus(f)
            assert len(docs) == len(_nonblank(content)) and not truncated
        except BadRecordError as e:
            _located(e, f)
        q = Quarantine(skip=True, path=Path(d) / "q.jsonl")
        docs = read_corpus(f, quarantine=q)
        recs = [json.loads(x) for x in q.path.read_text().splitlines()] if q.path.exists() else []
        assert len(recs) == q.count and all(r["reason"] and r["file"] == str(f) for r in recs)
        if not truncated:                   # every non-blank line: one document or one quarantined record
            assert len(docs) + q.count == len(_nonblank(content))
            lines_q = [r["line"] for r in recs]
            assert len(set(lines_q)) == len(lines_q) and set(lines_q) <= set(_nonblank(content))
        assert len({x["_id"] for x in docs}) == len(docs)


grade = st.one_of(st.integers(-3, 5).map(str), st.sampled_from(["inf", "-inf", "nan", "1.7", "2.0", "1e400", "",
                                                                 "x", " 1", "0x1", "1_0", "١"]),
                  st.floats(allow_nan=True).map(repr), st.text(max_size=4))
qrel_line = st.one_of(st.tuples(st.sampled_from(["q1", "q2", "qx", ""]), st.sampled_from(["d0", "d1", "dz"]), grade)
                      .map(lambda t: "\t".join(t)), st.text(max_size=12).filter(lambda s: "\n" not in s and "\r" not in s))


def _num(t: str) -> float | None:
    try:
        return float(t)
    except ValueError:
        return None


@FUZZ
@given(rows=st.lists(qrel_line, max_size=12))
def test_qrels_reader(rows):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "b"
        (folder / "qrels").mkdir(parents=True)
        (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": "t"}) + "\n" for i in range(3)))
        (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "b"}\n')
        qf = folder / "qrels" / "test.tsv"
        qf.write_text("query-id\tcorpus-id\tscore\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
        try:
            data = read_beir(folder)
            assert all(isinstance(g, int) for rel in data.qrels.values() for g in rel.values())
        except BadRecordError as e:
            assert _located(e, qf) >= 2
        data = read_beir(folder, skip_bad_records=True)
        kept = sum(len(r) for r in data.qrels.values())
        assert kept + data.bad["bad_records"] == len([r for r in rows if r.strip()])
        texts: dict = {}
        for r in rows:
            c = r.split("\t")
            if len(c) == 3:
                texts.setdefault((c[0], c[1]), []).append(c[2])
        for qid, rel in data.qrels.items():   # no silent coercion: every kept grade is exactly one row's text
            for did, g in rel.items():
                assert isinstance(g, int) and any(_num(t) == g for t in texts[(qid, did)])


@FUZZ
@given(negs=st.lists(st.one_of(values, st.lists(st.text(max_size=5), max_size=3)), min_size=1, max_size=8))
def test_pairs_reader_negatives(negs):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "p.jsonl"
        f.write_text("".join(json.dumps({"query": "q", "positive": "p", "negatives": n}) + "\n" for n in negs))
        q = Quarantine(skip=True)
        rows = read_pairs(f, quarantine=q)
        assert len(rows) + q.count == len(negs)
        for r, n in zip(rows, [n for n in negs if n is None or (isinstance(n, list) and all(
                isinstance(x, str) and x.strip() for x in n))]):
            assert r["negatives"] == (n or [])


col = st.one_of(st.lists(st.one_of(st.none(), st.text(max_size=6)), min_size=4, max_size=4).map(
    lambda v: pa.array(v, pa.string())), st.lists(st.one_of(st.none(), st.integers(-5, 5)), min_size=4, max_size=4)
    .map(lambda v: pa.array(v, pa.int64())))


@FUZZ
@given(cols=st.dictionaries(st.sampled_from(["_id", "id", "text", "title", "other"]), col, max_size=4),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4))
def test_parquet_reader(cols, flips):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "c.parquet"
        table = pa.table(cols) if cols else pa.table({"x": pa.array([1, 2, 3, 4])})
        pq.write_table(table, f, row_group_size=2)
        data = bytearray(f.read_bytes())
        for pos, byte in flips:
            data[int(pos * (len(data) - 1))] = byte
        f.write_bytes(bytes(data))
        try:
            read_corpus(f)
        except BadRecordError as e:
            _located(e, f)
        q = Quarantine(skip=True)
        docs = read_corpus(f, quarantine=q)
        assert len({x["_id"] for x in docs}) == len(docs)


# --------------------------------------------------------------------------------------- commands
def _snapshot(root: Path, skip: Path | None = None) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else None
    return out


def _run(main, argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def _check(rc, err, allowed=(0, 2)):
    assert "Traceback" not in err, err
    assert rc in allowed, (rc, err)
    if rc != 0:
        errors = [x for x in err.splitlines() if x.startswith("error:")]
        others = [x for x in err.splitlines() if x.strip() and not x.startswith(("error:", "note:"))]
        assert len(errors) == 1 and not others, err


num = st.one_of(st.integers(-3, 6).map(str), st.sampled_from(["abc", "", "1.5", "1e3", "nan", "inf", "-0", "0x2",
                                                              "99999999999999999999"]))
factory = st.one_of(st.sampled_from(["Flat", "IVF2,Flat", "IVFgarbage", "HNSW8", "PQ3", "PQ4", "", "IVF99999,Flat",
                                     "Flat,Flat", "IVF2,PQ2x4", "IDMap,Flat", "LSH", "SQ8", "IVF4096,Flat"]),
                    st.text(max_size=10))
corpus_lines = st.lists(st.one_of(good.map(_line), line), min_size=0, max_size=12)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(clines=corpus_lines, opts=st.dictionaries(st.sampled_from(["--shards", "--nprobe", "--ef-search", "--train-size",
                                                                   "--batch-size"]), num, max_size=3),
       fac=factory, out_kind=st.sampled_from(["new", "foreign", "file", "index", "corpus"]),
       overwrite=st.booleans())
def test_build_index_cli(fuzz_root, clines, opts, fac, out_kind, overwrite):
    from jobs import build_index

    with tempfile.TemporaryDirectory(dir=fuzz_root) as d:
        root = Path(d)
        corpus = root / "data" / "corpus.jsonl"
        corpus.parent.mkdir()
        corpus.write_bytes(b"\n".join(clines) + b"\n")
        (root / "foreign").mkdir()
        (root / "foreign" / "x.txt").write_text("keep")
        (root / "file").write_text("keep")
        ix = root / "index"
        (root / "ok.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"w{i} t"}) + "\n" for i in range(9)))
        assert build_index.main(["--model", "hashing:8", "--corpus", str(root / "ok.jsonl"), "--out", str(ix),
                                 "--no-ray", "--shards", "2"]) == 0
        out = {"new": root / "new", "foreign": root / "foreign", "file": root / "file", "index": ix,
               "corpus": corpus.parent}[out_kind]
        before, before_out = _snapshot(root, skip=out), _snapshot(out) if out.is_dir() else None
        argv = ["--model", "hashing:8", "--corpus", str(corpus), "--out", str(out), "--no-ray", "--factory", fac]
        argv += [x for kv in opts.items() for x in kv] + (["--overwrite"] if overwrite else [])
        rc, err = _run(build_index.main, argv)
        _check(rc, err)
        assert _snapshot(root, skip=out) == before            # nothing outside --out changes
        if rc != 0 and before_out is not None:
            assert _snapshot(out) == before_out               # a failed command leaves --out as it was
        if out_kind in ("foreign", "file", "corpus"):
            assert rc == 2


@FUZZ
@given(qlines=st.lists(st.one_of(st.builds(lambda i, t: json.dumps({"_id": i, "text": t}).encode(),
                                           st.one_of(st.text(max_size=3), st.integers(0, 9), values),
                                           st.one_of(st.text(max_size=8), values)), line), max_size=6),
       opts=st.dictionaries(st.sampled_from(["-k", "--nprobe", "--ef-search", "--batch-size"]), num, max_size=3),
       index_kind=st.sampled_from(["index", "foreign", "missing"]))
def test_search_cli(fuzz_root, qlines, opts, index_kind):
    from jobs import build_index, search

    with tempfile.TemporaryDirectory(dir=fuzz_root) as d:
        root = Path(d)
        (root / "c.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"w{i} t"}) + "\n" for i in range(9)))
        assert build_index.main(["--model", "hashing:8", "--corpus", str(root / "c.jsonl"), "--out", str(root / "ix"),
                                 "--no-ray", "--shards", "2"]) == 0
        (root / "q.jsonl").write_bytes(b"\n".join(qlines) + b"\n")
        (root / "foreign").mkdir()
        index = {"index": root / "ix", "foreign": root / "foreign", "missing": root / "nope"}[index_kind]
        before = _snapshot(root, skip=root / "run.jsonl")
        argv = ["--index", str(index), "--queries", str(root / "q.jsonl"), "--out", str(root / "run.jsonl")]
        rc, err = _run(search.main, argv + [x for kv in opts.items() for x in kv])
        _check(rc, err)
        assert _snapshot(root, skip=root / "run.jsonl") == before


@FUZZ
@given(clines=corpus_lines, qrels=st.lists(qrel_line, max_size=6),
       opts=st.dictionaries(st.sampled_from(["--top-k", "--num-negatives", "--range-min", "--range-max", "--margin",
                                             "--max-without-negatives", "--batch-size"]), num, max_size=3),
       model=st.sampled_from(["hashing:8", "/nope", "hashing:x", "hashing:1"]))
def test_mine_negatives_cli(fuzz_root, clines, qrels, opts, model):
    from jobs import mine_negatives

    with tempfile.TemporaryDirectory(dir=fuzz_root) as d:
        root = Path(d)
        b = root / "b"
        (b / "qrels").mkdir(parents=True)
        (b / "corpus.jsonl").write_bytes(b"\n".join(clines) + b"\n")
        (b / "queries.jsonl").write_text('{"_id": "q1", "text": "w1"}\n{"_id": "q2", "text": "w2"}\n')
        (b / "qrels" / "test.tsv").write_text("".join(r + "\n" for r in qrels))
        out = root / "neg.parquet"
        before = _snapshot(root, skip=out)
        argv = ["--model", model, "--data", str(b), "--out", str(out), "--no-ray"]
        rc, err = _run(mine_negatives.main, argv + [x for kv in opts.items() for x in kv])
        _check(rc, err, allowed=(0, 2, 3))
        assert _snapshot(root, skip=out) == before
        assert out.exists() == (rc == 0)


@FUZZ
@given(plines=st.lists(st.one_of(st.builds(lambda q, p, n: json.dumps({"query": q, "positive": p, "negatives": n})
                                           .encode(), st.one_of(st.text(max_size=5), values),
                                           st.one_of(st.text(max_size=5), values), values), line), max_size=8),
       opts=st.dictionaries(st.sampled_from(["--steps", "--workers", "--max-failures", "--zero"]), num, max_size=2),
       skip=st.booleans())
def test_train_cli_inputs(fuzz_root, plines, opts, skip):
    """Malformed pair files and arguments fail before any model is loaded (the model path does not exist)."""
    from jobs import train

    with tempfile.TemporaryDirectory(dir=fuzz_root) as d:
        root = Path(d)
        (root / "pairs.jsonl").write_bytes(b"\n".join(plines) + b"\n")
        out = root / "run"
        before = _snapshot(root, skip=out)
        argv = ["--stage", "contrastive", "--model", str(root / "nope"), "--data", str(root / "pairs.jsonl"),
                "--out", str(out), "engine.kind=torch", "batch_size=1", f"data.skip_bad_records={str(skip).lower()}"]
        rc, err = _run(train.main, argv + [x for kv in opts.items() for x in kv])
        _check(rc, err)
        assert rc == 2 and _snapshot(root, skip=out) == before and not out.exists()
