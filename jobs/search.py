"""Query a published index: one --query, or a queries JSONL file into a run JSONL.

    python -m jobs.search --index DIR --query "what causes anaemia" -k 10
    python -m jobs.search --index DIR --queries queries.jsonl --out run.jsonl
Run lines: {"query_id": ..., "hits": [{"id": ..., "score": ...}]}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.index import IndexIntegrityError, ModelMismatchError, Searcher


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.search", description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True)
    p.add_argument("--model", default=None, help="query encoder folder (default: the manifest's model)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--query", help="a single query text; hits are printed")
    g.add_argument("--queries", help="JSONL of {_id|id, text}")
    p.add_argument("--out", help="run JSONL to write (with --queries)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: manifest config)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (default: manifest config)")
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args(argv)
    if a.queries and not a.out:
        p.error("--queries needs --out")
    return a


def read_queries(path: str) -> tuple[list[str], list[str]]:
    """(ids, texts); a malformed line fails with its line number and reason."""
    ids, texts = [], []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            qid = obj.get("_id", obj.get("id"))
            if qid is None or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{n}: needs '_id' (or 'id') and a string 'text'")
            ids.append(str(qid))
            texts.append(obj["text"])
    return ids, texts


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        s = Searcher(a.index, model=a.model, nprobe=a.nprobe, ef_search=a.ef_search)
        if a.query is not None:
            qids, texts = ["query"], [a.query]
        else:
            qids, texts = read_queries(a.queries)
        results = s.search(texts, a.k, batch_size=a.batch_size)
    except (IndexIntegrityError, ModelMismatchError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [json.dumps({"query_id": q, "hits": [{"id": h.id, "score": round(h.score, 6)} for h in hits]})
             for q, hits in zip(qids, results)]
    if a.query is not None:
        print(lines[0])
        return 0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out)
    print(json.dumps({"queries": len(lines), "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
