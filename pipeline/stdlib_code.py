"""The code domain built at run time from the installed Python standard library (no Ray).

Why: code pre-training text and (docstring -> function) pairs need no download and no licence
review when they come from the interpreter's own stdlib, and a split by top-level module keeps the
evaluation honest (no module, and so no near-copy of an eval function, is seen in training).

Recipe (shared/data/README.md):
- walk every ``.py`` under the stdlib with ``ast``, leaving out ``test``/``tests``, ``idlelib``,
  ``lib2to3``, ``turtledemo`` (and site-packages);
- keep public functions and methods (no ``_`` name, no ``_`` enclosing class, not nested in a
  function) whose docstring's first paragraph has >= 4 words and whose body has >= 4 lines
  (`StdlibCodeConfig.min_lines_of` says what is counted, see there);
- query = first paragraph (whitespace collapsed); document = the function source (decorators
  excluded, signature kept, dedented) with the docstring statement removed; one relevant doc;
- drop every function whose body (normalised source after the docstring) occurs more than once
  among all functions of the scanned files;
- split by top-level module: sha256(f"{seed}:{module}") mapped to [0, 1) < eval_fraction -> eval;
- stage-1 text = the source files of train modules only, chunked at line boundaries.
The set depends on the interpreter, so meta.json records its version.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import random
import re
import sys
import sysconfig
import tokenize
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stages.io import atomic_dir, sha256_file

EXCLUDED_DIRS = ("test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages",
                 "__pycache__")


@dataclass(frozen=True)
class StdlibCodeConfig:
    """How the stdlib code set is built. `min_lines_of`: "function" counts the whole function's
    source lines (def line to last line, docstring included; gives ~3,400 functions on 3.11 after
    de-duplication, the README's number); "body" counts only the statements after the docstring
    (stricter, ~2,000)."""

    eval_fraction: float = 0.2
    seed: int = 0
    max_train: int | None = None
    max_eval: int | None = None
    min_query_words: int = 4
    min_lines: int = 4
    min_lines_of: str = "function"
    stage1_max_chars: int = 4000
    excluded_dirs: tuple[str, ...] = EXCLUDED_DIRS
    stdlib_dir: str | None = None          # default: sysconfig's stdlib of this interpreter

    def __post_init__(self):
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"StdlibCodeConfig.eval_fraction={self.eval_fraction}: must be in (0, 1)")
        if self.min_lines_of not in ("function", "body"):
            raise ValueError(f"StdlibCodeConfig.min_lines_of={self.min_lines_of!r}: 'function' or 'body'")
        for f in ("max_train", "max_eval"):
            v = getattr(self, f)
            if v is not None and v < 1:
                raise ValueError(f"StdlibCodeConfig.{f}={v}: must be >= 1 or None")
        if self.stage1_max_chars < 200:
            raise ValueError(f"StdlibCodeConfig.stage1_max_chars={self.stage1_max_chars}: must be >= 200")


@dataclass(frozen=True)
class StdlibCodePaths:
    root: Path
    eval_dir: Path          # BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv
    train_pairs: Path       # {"query_id", "doc_id", "module", "query", "positive"}
    stage1_text: Path       # {"_id", "text"}
    meta: Path


@dataclass(frozen=True)
class CodeFunction:
    doc_id: str
    module: str             # dotted module path (email.utils)
    top: str                # top-level module (email)
    query: str
    document: str
    body_key: str = field(repr=False)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def iter_stdlib_files(root: Path, excluded: tuple[str, ...] = EXCLUDED_DIRS) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every stdlib .py file outside the excluded folders, sorted."""
    out = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if set(parts[:-1]) & set(excluded) or any(x.startswith("config-") for x in parts[:-1]):
            continue
        mod = list(parts[:-1]) + ([] if parts[-1] == "__init__.py" else [parts[-1][:-3]])
        if not mod or not all(m.isidentifier() for m in mod):
            continue
        out.append((".".join(mod), p))
    return out


def first_paragraph(doc: str) -> str:
    return " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split())


def _has_docstring(fn: ast.AST) -> bool:
    b = fn.body[0]
    return isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)


def _public_functions(tree: ast.Module):
    """(qualname, node) of functions/methods not nested in a function, all name parts public."""
    def visit(node, prefix, public):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if public and not ch.name.startswith("_"):
                    yield prefix + ch.name, ch
            elif isinstance(ch, ast.ClassDef):
                yield from visit(ch, prefix + ch.name + ".", public and not ch.name.startswith("_"))
            elif isinstance(ch, (ast.stmt, ast.ExceptHandler)):     # if/try/with blocks at module/class level
                yield from visit(ch, prefix, public)
    yield from visit(tree, "", True)


def _remove_docstring(lines: list[str], fn: ast.AST) -> str:
    """Function source (from the def line) without its docstring statement, dedented."""
    ds = fn.body[0]
    first, last = ds.lineno - 1, ds.end_lineno - 1
    src = [ln.rstrip("\n") for ln in lines[fn.lineno - 1:fn.end_lineno]]
    off = fn.lineno - 1
    before = lines[first][:ds.col_offset]
    after = lines[last][ds.end_col_offset:]
    if after.strip().startswith(";"):
        after = after.strip()[1:]
    if before.strip() == "" and (after.strip() == "" or after.strip().startswith("#")):
        del src[first - off:last - off + 1]
    else:                                   # docstring shares its line(s) with code
        src[first - off:last - off + 1] = [before.rstrip() + " " + after.strip()]
        if first == fn.lineno - 1 and not after.strip():
            src[first - off] += " pass"
    # remove the def line's indentation only (textwrap.dedent stops at multi-line strings at column 0)
    ind = fn.col_offset
    return "\n".join(ln[ind:] if ln[:ind].strip() == "" else ln for ln in src).strip("\n")


def _body_key(lines: list[str], fn: ast.AST) -> str | None:
    body = fn.body[1:] if _has_docstring(fn) else fn.body
    if not body:
        return None
    seg = lines[body[0].lineno - 1:body[-1].end_lineno]
    norm = "\n".join(ln.strip() for ln in seg if ln.strip() and not ln.strip().startswith("#"))
    return hashlib.sha256(norm.encode()).hexdigest()


def extract_functions(cfg: StdlibCodeConfig) -> tuple[list[CodeFunction], dict]:
    """Every qualifying function (before de-duplication and split), plus scan counts."""
    root = Path(cfg.stdlib_dir).resolve() if cfg.stdlib_dir else stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib_dir {root}: not a directory")
    cands: list[CodeFunction] = []
    counts = {"files": 0, "parse_errors": 0, "functions_seen": 0}
    body_count: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    for mod, path in iter_stdlib_files(root, cfg.excluded_dirs):
        try:
            with tokenize.open(path) as f:
                source = f.read()
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            counts["parse_errors"] += 1
            continue
        counts["files"] += 1
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):         # duplicate detection over every function, any name
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                k = _body_key(lines, node)
                if k:
                    body_count[k] = body_count.get(k, 0) + 1
        for qual, fn in _public_functions(tree):
            counts["functions_seen"] += 1
            if not _has_docstring(fn) or len(fn.body) < 2:
                continue
            query = first_paragraph(ast.get_docstring(fn) or "")
            if len(query.split()) < cfg.min_query_words:
                continue
            body = fn.body[1:]
            n = (fn.end_lineno - fn.lineno + 1 if cfg.min_lines_of == "function"
                 else body[-1].end_lineno - body[0].lineno + 1)
            if n < cfg.min_lines:
                continue
            did = f"{mod}.{qual}"
            seen_ids[did] = seen_ids.get(did, 0) + 1
            if seen_ids[did] > 1:
                did = f"{did}#{seen_ids[did]}"
            cands.append(CodeFunction(doc_id=did, module=mod, top=mod.split(".")[0], query=query,
                                      document=_remove_docstring(lines, fn), body_key=_body_key(lines, fn)))
    kept = [c for c in cands if body_count.get(c.body_key, 0) == 1]
    counts.update(candidates=len(cands), dropped_duplicate_body=len(cands) - len(kept), functions=len(kept))
    return kept, counts


def is_eval_module(top: str, eval_fraction: float, seed: int) -> bool:
    """Stable (interpreter- and process-independent) assignment of a top-level module to eval."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{top}".encode()).digest()[:8], "big")
    return h / 2**64 < eval_fraction


def _chunks(text: str, max_chars: int) -> list[str]:
    out, cur, n = [], [], 0
    for ln in text.splitlines(keepends=True):
        if cur and n + len(ln) > max_chars:
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(ln[:max_chars])
        n += len(cur[-1])
    if cur:
        out.append("".join(cur))
    return [c for c in out if c.strip()]


def _write_jsonl(path: Path, rows) -> int:
    n = 0
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def build_stdlib_code(out_dir: str | os.PathLike, eval_fraction: float = 0.2, seed: int = 0,
                      max_train: int | None = None, max_eval: int | None = None,
                      config: StdlibCodeConfig | None = None) -> StdlibCodePaths:
    """Build the set under `out_dir` atomically (eval/ BEIR folder, train_pairs.jsonl,
    stage1_text.jsonl, meta.json). Deterministic for a given interpreter, config and seed."""
    cfg = config or StdlibCodeConfig(eval_fraction=eval_fraction, seed=seed, max_train=max_train,
                                     max_eval=max_eval)
    funcs, counts = extract_functions(cfg)
    if not funcs:
        raise ValueError(f"no qualifying functions found under {cfg.stdlib_dir or stdlib_dir()}")
    root = Path(cfg.stdlib_dir).resolve() if cfg.stdlib_dir else stdlib_dir()
    files = iter_stdlib_files(root, cfg.excluded_dirs)
    tops = sorted({m.split(".")[0] for m, _ in files})
    eval_tops = {t for t in tops if is_eval_module(t, cfg.eval_fraction, cfg.seed)}
    train = [f for f in funcs if f.top not in eval_tops]
    evl = [f for f in funcs if f.top in eval_tops]
    if not train or not evl:
        raise ValueError(f"eval_fraction={cfg.eval_fraction}, seed={cfg.seed}: split left "
                         f"{len(train)} train and {len(evl)} eval functions; both must be non-empty")
    rng = random.Random(cfg.seed)
    if cfg.max_train is not None and len(train) > cfg.max_train:
        keep = set(rng.sample(range(len(train)), cfg.max_train))
        train = [f for i, f in enumerate(train) if i in keep]
    if cfg.max_eval is not None and len(evl) > cfg.max_eval:
        keep = set(rng.sample(range(len(evl)), cfg.max_eval))
        evl = [f for i, f in enumerate(evl) if i in keep]

    final = Path(out_dir)
    with atomic_dir(final) as tmp:
        (tmp / "eval" / "qrels").mkdir(parents=True)
        _write_jsonl(tmp / "eval" / "corpus.jsonl",
                     ({"_id": f.doc_id, "title": "", "text": f.document} for f in evl))
        _write_jsonl(tmp / "eval" / "queries.jsonl", ({"_id": "q:" + f.doc_id, "text": f.query} for f in evl))
        with open(tmp / "eval" / "qrels" / "test.tsv", "w") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            fh.writelines(f"q:{f.doc_id}\t{f.doc_id}\t1\n" for f in evl)
        _write_jsonl(tmp / "train_pairs.jsonl",
                     ({"query_id": "q:" + f.doc_id, "doc_id": f.doc_id, "module": f.module,
                       "query": f.query, "positive": f.document} for f in train))
        n_stage1 = 0
        with open(tmp / "stage1_text.jsonl", "w") as fh:
            for mod, path in files:
                if mod.split(".")[0] in eval_tops:
                    continue
                try:
                    with tokenize.open(path) as f:
                        text = f.read()
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue
                for i, chunk in enumerate(_chunks(text, cfg.stage1_max_chars)):
                    fh.write(json.dumps({"_id": f"{mod}#{i}", "text": chunk}, ensure_ascii=False) + "\n")
                    n_stage1 += 1
        meta = {
            "python_version": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "python_version_full": sys.version,
            "stdlib_dir": str(root),
            "config": asdict(cfg),
            "counts": {**counts, "train_pairs": len(train), "eval_queries": len(evl),
                       "stage1_records": n_stage1, "train_modules": len(tops) - len(eval_tops),
                       "eval_modules": len(eval_tops)},
            "train_modules": sorted(set(tops) - eval_tops),
            "eval_modules": sorted(eval_tops),
        }
        meta["checksums"] = {p: sha256_file(tmp / p) for p in
                             ("eval/corpus.jsonl", "eval/queries.jsonl", "eval/qrels/test.tsv",
                              "train_pairs.jsonl", "stage1_text.jsonl")}
        with open(tmp / "meta.json", "w") as fh:
            json.dump(meta, fh, indent=2, sort_keys=True)
            fh.write("\n")
    return StdlibCodePaths(root=final, eval_dir=final / "eval", train_pairs=final / "train_pairs.jsonl",
                           stage1_text=final / "stage1_text.jsonl", meta=final / "meta.json")
