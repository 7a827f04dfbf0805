"""Embed a corpus with Ray Data and publish a sharded FAISS index (atomic, with manifest).

    python -m jobs.build_index --model DIR --corpus PATH --out DIR --shards 4 --factory "IVF1024,Flat"
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pipeline.embed import (
    EmbedConfig,
    doc_texts,
    embed_docs_local,
    embed_to_parquet,
    load_encoder,
    model_identity,
    read_embeddings,
)
from pipeline.index import IndexConfig, build_index


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.build_index", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="LBR model folder (or hashing:<dim> for plumbing tests)")
    p.add_argument("--corpus", required=True, help="BEIR folder, JSONL or Parquet file of documents")
    p.add_argument("--out", required=True, help="index folder to publish (replaced atomically)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--factory", default="Flat", help="FAISS factory string: Flat, IVF1024,Flat, IVF1024,PQ32, HNSW32")
    p.add_argument("--nprobe", type=int, default=16, help="default IVF nprobe stored in the manifest")
    p.add_argument("--ef-search", type=int, default=64, help="default HNSW efSearch stored in the manifest")
    p.add_argument("--train-size", type=int, default=100_000, help="IVF/PQ training sample size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default=None, help="use this field as document text (default: text)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--actors", type=int, default=2, help="embedding actor-pool size")
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--no-ray", action="store_true", help="embed and build in this process (debugging)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        return run(a)
    except (ValueError, FileNotFoundError) as e:  # unusable inputs: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(a: argparse.Namespace) -> int:
    from stages.readers import read_corpus

    cfg = IndexConfig(factory=a.factory, shards=a.shards, nprobe=a.nprobe, ef_search=a.ef_search,
                      train_size=a.train_size, seed=a.seed, use_ray=not a.no_ray)
    ecfg = EmbedConfig(batch_size=a.batch_size, num_actors=a.actors, num_cpus_per_actor=a.cpus_per_actor)
    model = model_identity(a.model)  # fails here, before any Ray work, if the model folder is unusable
    docs = read_corpus(a.corpus, text_field=a.text_field)
    if not docs:
        print(f"error: corpus {a.corpus} has no usable documents", file=sys.stderr)
        return 2
    if a.no_ray:
        emb = embed_docs_local(load_encoder(a.model), docs, a.batch_size)
    else:
        ids, texts = doc_texts(docs)
        out_parent = Path(a.out).resolve().parent
        out_parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".embeddings-", dir=out_parent) as tmp:
            emb = read_embeddings(embed_to_parquet(a.model, ids, texts, tmp, ecfg))
    manifest = build_index(a.out, emb.ids, emb.vectors, emb.hashes, cfg, model)
    print(json.dumps({"out": str(a.out), "num_docs": manifest["num_docs"], "dimension": manifest["dimension"],
                      "factory": manifest["factory"], "shards": [s["count"] for s in manifest["shards"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
