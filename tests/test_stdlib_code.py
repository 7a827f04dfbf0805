"""The stdlib code set: module-disjoint split, eval code kept out of stage-1 text, docstrings
removed from documents, sensible counts, deterministic output."""
import ast
import json
import shutil
import sys

import pytest

from pipeline.stdlib_code import StdlibCodeConfig, build_stdlib_code, extract_functions, stdlib_dir


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    paths = build_stdlib_code(tmp_path_factory.mktemp("stdc") / "stdlib_code", eval_fraction=0.2, seed=0)
    return paths, json.loads(paths.meta.read_text())


def _norm(code: str, skip: int = 0) -> str:
    """Non-blank lines (after the first `skip`), stripped: comparable across indentation levels."""
    return "\n".join(ln.strip() for ln in code.splitlines()[skip:] if ln.strip())


def test_split_is_module_disjoint(built):
    paths, meta = built
    train_tops = {r["module"].split(".")[0] for r in _rows(paths.train_pairs)}
    eval_tops = {d["_id"].split(".")[0] for d in _rows(paths.eval_dir / "corpus.jsonl")}
    assert train_tops and eval_tops and not train_tops & eval_tops
    assert not set(meta["train_modules"]) & set(meta["eval_modules"])
    assert eval_tops <= set(meta["eval_modules"]) and train_tops <= set(meta["train_modules"])
    stage1_tops = {r["_id"].split("#")[0].split(".")[0] for r in _rows(paths.stage1_text)}
    assert not stage1_tops & set(meta["eval_modules"])
    for bad in ("test", "idlelib", "lib2to3", "turtledemo"):
        assert bad not in meta["train_modules"] + meta["eval_modules"]


def test_no_eval_code_in_stage1_text(built):
    paths, _ = built
    stage1 = "\n".join("\n".join(ln.strip() for ln in r["text"].splitlines() if ln.strip())
                       for r in _rows(paths.stage1_text))
    docs = _rows(paths.eval_dir / "corpus.jsonl")
    leaked = [d["_id"] for d in docs if _norm(d["text"]) in stage1]        # signature + body
    assert not leaked, leaked[:5]
    # bodies of 3+ lines are specific enough to never occur in other code (1-liners like
    # `return line` do, harmlessly)
    leaked = [d["_id"] for d in docs if _norm(d["text"], 1).count("\n") >= 2 and _norm(d["text"], 1) in stage1]
    assert not leaked, leaked[:5]


def test_docstrings_removed_and_pairs_consistent(built):
    paths, _ = built
    docs = {d["_id"]: d["text"] for d in _rows(paths.eval_dir / "corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in _rows(paths.eval_dir / "queries.jsonl")}
    qrels = [ln.split("\t") for ln in (paths.eval_dir / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    assert len(qrels) == len(queries) == len(docs)
    assert all(d in docs and q in queries and s == "1" for q, d, s in qrels)
    train = _rows(paths.train_pairs)
    for text, query in [(docs[d], queries[q]) for q, d, _ in qrels] + [(r["positive"], r["query"]) for r in train]:
        fn = ast.parse(text).body[0]
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(fn) is None, text[:200]
        assert len(query.split()) >= 4
    assert len({r["positive"] for r in train}) == len(train)      # duplicated bodies dropped


def test_counts_and_meta(built):
    _, meta = built
    c = meta["counts"]
    assert meta["python_version"] == ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] == (3, 11):
        assert 3000 <= c["functions"] <= 3800, c       # README: about 3,400 on 3.11
    else:
        assert c["functions"] > 1000, c
    assert c["train_pairs"] + c["eval_queries"] == c["functions"]
    assert 100 < c["eval_queries"] < c["train_pairs"]
    assert c["stage1_records"] > 1000 and c["parse_errors"] == 0


def test_deterministic_and_limits(tmp_path):
    src = tmp_path / "lib"
    for name in ("json", "email", "textwrap.py", "shlex.py", "fractions.py", "statistics.py"):
        p = stdlib_dir() / name
        (shutil.copytree if p.is_dir() else shutil.copy)(p, src / name)
    cfg = StdlibCodeConfig(stdlib_dir=str(src), eval_fraction=0.5, seed=3, max_train=20, max_eval=10)
    a = build_stdlib_code(tmp_path / "a", config=cfg)
    b = build_stdlib_code(tmp_path / "b", config=cfg)
    ma, mb = json.loads(a.meta.read_text()), json.loads(b.meta.read_text())
    assert ma["checksums"] == mb["checksums"]
    assert ma["counts"]["train_pairs"] <= 20 and ma["counts"]["eval_queries"] <= 10
    funcs, _ = extract_functions(cfg)
    assert {f.top for f in funcs} <= {"json", "email", "textwrap", "shlex", "fractions", "statistics"}
    with pytest.raises(ValueError, match="eval_fraction"):
        StdlibCodeConfig(eval_fraction=1.5)
