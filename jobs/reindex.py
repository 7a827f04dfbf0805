"""Incremental re-index: embed only new/changed docs, drop deleted ones, rebuild touched shards.

    python -m jobs.reindex --index DIR --corpus PATH [--model DIR]
Idempotent: an unchanged corpus writes nothing (manifest.json stays byte-identical).
"""
from __future__ import annotations

import json
import sys

from jobs._cli import INPUT_ERRORS, Parser, fail, positive_float, positive_int
from pipeline.index.embed import EmbedConfig
from pipeline.index.layout import IndexBusyError, IndexIntegrityError, ModelMismatchError
from pipeline.index.reindex import reindex_corpus


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
    try:
        ecfg = EmbedConfig(batch_size=a.batch_size, num_actors=a.actors, num_cpus_per_actor=a.cpus_per_actor)
        report = reindex_corpus(a.index, a.corpus, a.model, ecfg, use_ray=not a.no_ray, text_field=a.text_field)
    except (IndexIntegrityError, ModelMismatchError, IndexBusyError, *INPUT_ERRORS) as e:
        return fail(e)
    print(json.dumps(report.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
