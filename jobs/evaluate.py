"""Score a trained model or a baseline on BEIR folders: `python -m jobs.evaluate ...`.

    python -m jobs.evaluate --model DIR --data ../shared/data/medical/medquad/dev --out results.json
    python -m jobs.evaluate --baseline bm25|minilm|base-mean|base-last [--backbone DIR] --data ... --out ...

Writes {"<dataset>": {"ndcg@10", "recall@100", "mrr@10", "num_queries"}} atomically to --out and
prints a table. Dataset name = folder name, or its parent's for a split folder (medquad/dev ->
"medquad"). All --data folders are checked before any model is loaded.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from jobs._cli import INPUT_ERRORS, Parser, fail, note, positive_int


def parse_args(argv=None):
    from pipeline.evaluate import BASELINES

    p = Parser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", help="trained LBR model folder, or a run folder holding one in model/")
    who.add_argument("--baseline", choices=BASELINES)
    p.add_argument("--backbone", help="backbone folder (for base-mean / base-last)")
    p.add_argument("--data", action="append", required=True, help="BEIR folder (repeatable)")
    p.add_argument("--out", required=True, help="results JSON path")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-corpus", type=positive_int, default=None,
                   help="seeded corpus subsample; every relevant doc of an evaluated query is kept")
    p.add_argument("--max-queries", type=positive_int, default=None, help="seeded subsample of judged queries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", help="qrels/<split>.tsv")
    return p.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    from pipeline.evaluate import (
        EvalConfig,
        build_retriever,
        check_beir_folder,
        dataset_name,
        evaluate_folders,
        format_table,
        load_beir,
    )
    from pipeline.model_paths import is_model_dir, is_run_dir
    from stages.io import write_json

    try:
        cfg = EvalConfig(batch_size=args.batch_size, max_corpus=args.max_corpus,
                         max_queries=args.max_queries, seed=args.seed, split=args.split)
        for f in args.data:  # fail before loading any model
            check_beir_folder(f, args.split)
        names = [dataset_name(f) for f in args.data]
        if len(set(names)) != len(names):
            raise ValueError(f"--data: folders map to duplicate dataset names {names}")
        out = Path(args.out)
        if out.is_dir():
            raise IsADirectoryError(f"--out {out} is a folder; expected a results JSON file path")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
        if args.model is not None:
            if is_run_dir(args.model):
                note(f"--model {args.model} is a run folder: using {Path(args.model) / 'model'}")
            elif not is_model_dir(args.model):
                raise FileNotFoundError(f"--model {args.model} is not an LBR model folder (lbr_config.json missing)")
        loaded = [load_beir(f, args.split) for f in args.data]  # every record checked before any model load
        retriever = build_retriever(model=args.model, baseline=args.baseline, backbone=args.backbone,
                                    batch_size=args.batch_size)
        results = evaluate_folders(retriever, args.data, cfg, loaded=loaded)
    except (*INPUT_ERRORS, ImportError) as e:
        return fail(e)
    write_json(out, results)
    print(format_table(results))
    print(f"[evaluate] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
