"""Embed a corpus with Ray Data and publish a sharded FAISS index (atomic, with manifest).

    python -m jobs.build_index --model DIR --corpus PATH --out DIR --shards 4 --factory "IVF1024,Flat"

`--out` must be new, empty, or (with `--overwrite`) an index: a new version is published over it.
Anything else at `--out` is refused. Every argument, the model folder and the corpus are checked
before Ray starts or any model is loaded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs._cli import INPUT_ERRORS, Parser, fail, note, positive_float, positive_int
from pipeline.index.build import build_from_corpus
from pipeline.index.embed import EmbedConfig
from pipeline.index.layout import IndexBusyError
from pipeline.index.shards import IndexConfig


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.build_index", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="LBR model folder or a run folder holding one in model/ (hashing:<dim> for plumbing tests)")
    p.add_argument("--corpus", required=True, help="BEIR folder, JSONL or Parquet file of documents")
    p.add_argument("--out", required=True, help="index folder to publish (new, empty, or an index with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="publish a new version over the index at --out")
    p.add_argument("--shards", type=positive_int, default=4)
    p.add_argument("--factory", default="Flat", help="FAISS factory string: Flat, IVF1024,Flat, IVF1024,PQ32, HNSW32")
    p.add_argument("--nprobe", type=positive_int, default=16, help="default IVF nprobe stored in the manifest")
    p.add_argument("--ef-search", type=positive_int, default=64, help="default HNSW efSearch stored in the manifest")
    p.add_argument("--train-size", type=positive_int, default=100_000, help="IVF/PQ training sample size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default=None, help="use this field as document text (default: text)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--actors", type=positive_int, default=2, help="embedding actor-pool size")
    p.add_argument("--cpus-per-actor", type=positive_float, default=0.5)
    p.add_argument("--no-ray", action="store_true", help="embed and build in this process (debugging)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        return run(a)
    except (*INPUT_ERRORS, IndexBusyError) as e:  # unusable inputs: one line, not a traceback
        return fail(e)


def run(a) -> int:
    from pipeline.model_paths import is_run_dir

    cfg = IndexConfig(factory=a.factory, shards=a.shards, nprobe=a.nprobe, ef_search=a.ef_search,
                      train_size=a.train_size, seed=a.seed, use_ray=not a.no_ray)
    ecfg = EmbedConfig(batch_size=a.batch_size, num_actors=a.actors, num_cpus_per_actor=a.cpus_per_actor)
    if is_run_dir(a.model):
        note(f"--model {a.model} is a run folder: using {Path(a.model) / 'model'}")
    manifest = build_from_corpus(a.model, a.corpus, a.out, cfg, ecfg, overwrite=a.overwrite, text_field=a.text_field)
    print(json.dumps({"out": str(a.out), "num_docs": manifest["num_docs"], "dimension": manifest["dimension"],
                      "factory": manifest["factory"], "shards": [s["count"] for s in manifest["shards"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
