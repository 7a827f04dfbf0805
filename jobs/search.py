"""Query a published index: one --query, or a queries JSONL file into a run JSONL.

    python -m jobs.search --index DIR --query "what causes anaemia" -k 10
    python -m jobs.search --index DIR --queries queries.jsonl --out run.jsonl
Run lines: {"query_id": ..., "hits": [{"id": ..., "score": ...}]}.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from jobs._cli import INPUT_ERRORS, Parser, fail, positive_int
from pipeline.index.layout import IndexIntegrityError, ModelMismatchError
from pipeline.index.search import Searcher


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.search", description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True)
    p.add_argument("--model", default=None,
                   help="query encoder folder or run folder (default: the manifest's model)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--query", help="a single query text; hits are printed")
    g.add_argument("--queries", help="JSONL of {_id|id, text}")
    p.add_argument("--out", help="run JSONL to write (with --queries)")
    p.add_argument("-k", type=positive_int, default=10)
    p.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists probed (default: manifest config)")
    p.add_argument("--ef-search", type=positive_int, default=None, help="HNSW efSearch (default: manifest config)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    a = p.parse_args(argv)
    if a.queries and not a.out:
        p.error("--queries needs --out")
    if a.out and not a.queries:
        p.error("--out goes with --queries")
    return a


def read_queries(path: str) -> tuple[list[str], list[str]]:
    """(ids, texts); a malformed line fails with file, line number and reason (the corpus readers' rules)."""
    from stages.readers import Quarantine, iter_jsonl

    ids, texts, seen = [], [], set()
    q = Quarantine()                                  # skip=False: the first bad line raises, located
    for n, obj in iter_jsonl(path, q):
        qid = obj.get("_id", obj.get("id"))
        if isinstance(qid, int) and not isinstance(qid, bool):
            qid = str(qid)
        if not isinstance(qid, str) or not qid or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise ValueError(f"{path}:{n}: needs '_id' (or 'id', a string or integer) and a non-empty string 'text'")
        if qid in seen:
            raise ValueError(f"{path}:{n}: duplicate id: '{qid}'")
        seen.add(qid)
        ids.append(qid)
        texts.append(obj["text"])
    if not ids:
        raise ValueError(f"{path}: no queries")
    return ids, texts


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        if a.queries is not None:
            qids, texts = read_queries(a.queries)    # inputs first: before the index or a model is opened
            out = Path(a.out)
            if out.is_dir():
                raise IsADirectoryError(f"--out {out} is a folder; expected a run JSONL file path")
            if not out.parent.is_dir():
                raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
        else:
            qids, texts = ["query"], [a.query]
        s = Searcher(a.index, model=a.model, nprobe=a.nprobe, ef_search=a.ef_search)
        results = s.search(texts, a.k, batch_size=a.batch_size)
    except (IndexIntegrityError, ModelMismatchError, *INPUT_ERRORS) as e:
        return fail(e)
    lines = [json.dumps({"query_id": q, "hits": [{"id": h.id, "score": round(h.score, 6)} for h in hits]})
             for q, hits in zip(qids, results)]
    if a.query is not None:
        print(lines[0])
        return 0
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out)
    print(json.dumps({"queries": len(lines), "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
