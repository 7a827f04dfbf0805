"""Incremental re-index: embed only new/changed docs, drop deleted ones, rebuild touched shards.

    python -m jobs.reindex --index DIR --corpus PATH [--model DIR]
Idempotent: an unchanged corpus writes nothing (manifest.json stays byte-identical).
"""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np

from jobs._cli import INPUT_ERRORS, Parser, fail, positive_float, positive_int
from pipeline.index.embed import (
    EmbedConfig,
    content_hash,
    doc_texts,
    embed_texts_local,
    embed_to_parquet,
    load_encoder,
    model_identity,
    read_embeddings,
)
from pipeline.index.layout import IndexBusyError, IndexIntegrityError, ModelMismatchError, work_dir
from pipeline.index.manifest import load_manifest
from pipeline.index.reindex import reindex


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.reindex", description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True)
    p.add_argument("--corpus", required=True, help="the full current corpus (BEIR folder, JSONL or Parquet)")
    p.add_argument("--model", default=None,
                   help="must match the index's model (default: the manifest's); a run folder means its model/")
    p.add_argument("--text-field", default=None)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--actors", type=positive_int, default=2)
    p.add_argument("--cpus-per-actor", type=positive_float, default=0.5)
    p.add_argument("--no-ray", action="store_true", help="embed and build in this process")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from stages.readers import read_corpus

    try:
        m = load_manifest(a.index)
        model = model_identity(a.model or m["model"]["path"])
        model_ref = model["path"]
        model = {"path": model["path"], "fingerprint": model["fingerprint"]}
        docs = read_corpus(a.corpus, text_field=a.text_field)
        if not docs:
            raise ValueError(f"corpus {a.corpus} has no usable documents (refusing to delete the whole index)")
        ids, texts = doc_texts(docs)
        text_of = dict(zip(ids, texts))
        ecfg = EmbedConfig(batch_size=a.batch_size, num_actors=a.actors, num_cpus_per_actor=a.cpus_per_actor)

        def embed(todo: list[str]) -> np.ndarray:
            if a.no_ray:
                return embed_texts_local(load_encoder(model_ref), [text_of[d] for d in todo], a.batch_size)
            tmp = work_dir(a.index)                  # scratch inside the index; a killed run's is removed later
            try:
                emb = read_embeddings(embed_to_parquet(model_ref, todo, [text_of[d] for d in todo], tmp, ecfg))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            pos = {d: i for i, d in enumerate(emb.ids)}
            return emb.vectors[[pos[d] for d in todo]]

        report = reindex(a.index, ids, [content_hash(t) for t in texts], embed, model=model,
                         use_ray=not a.no_ray)
    except (IndexIntegrityError, ModelMismatchError, IndexBusyError, *INPUT_ERRORS) as e:
        return fail(e)
    print(json.dumps(report.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
