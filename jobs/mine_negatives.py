"""Mine hard negatives for stage 2 from a BEIR folder, with the false-negative filter.

    python -m jobs.mine_negatives --model DIR --data BEIR_DIR --out FILE.parquet \
        [--top-k 50 --num-negatives 4 --margin 0.05 --range-min 3 --range-max 50 --seed 0]
Exit status 3 (nothing written) when some query ends up with no negative.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs._cli import INPUT_ERRORS, Parser, fail, finite_float, fraction, note, positive_int
from pipeline.index.embed import EmbedConfig, model_identity
from pipeline.index.mining import NoNegativesError, mine_negatives
from stages.negatives import NegativeConfig


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.mine_negatives", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="LBR model folder or a run folder holding one in model/")
    p.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.add_argument("--split", default="test")
    p.add_argument("--top-k", type=positive_int, default=50)
    p.add_argument("--num-negatives", type=positive_int, default=4)
    p.add_argument("--margin", type=finite_float, default=0.05,
                   help="drop candidates scoring > positive score - margin (likely false negatives)")
    p.add_argument("--range-min", type=positive_int, default=3, help="first eligible rank (1-based, inclusive)")
    p.add_argument("--range-max", type=positive_int, default=50, help="last eligible rank (inclusive)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-without-negatives", type=fraction, default=0.0,
                   help="fraction of queries allowed to get fewer than n negatives (left out, listed in the "
                        "report); above it the job fails (exit 3)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--actors", type=positive_int, default=2)
    p.add_argument("--no-ray", action="store_true", help="embed in this process")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        # every argument, the output path and the model folder are checked before data, Ray or a model load
        cfg = NegativeConfig(top_k=a.top_k, num_negatives=a.num_negatives, margin=a.margin,
                             range_min=a.range_min, range_max=a.range_max, seed=a.seed)
        out = Path(a.out)
        if out.is_dir():
            raise IsADirectoryError(f"--out {out} is a folder; expected a Parquet file path")
        if out.exists() and out.suffix != ".parquet":
            raise FileExistsError(f"--out {out} exists and is not a .parquet file; refusing to replace it")
        from pipeline.evaluate import check_beir_folder
        from pipeline.model_paths import is_run_dir

        check_beir_folder(a.data, a.split)
        if is_run_dir(a.model):
            note(f"--model {a.model} is a run folder: using {Path(a.model) / 'model'}")
        model = model_identity(a.model)["path"]
        report = mine_negatives(model, a.data, a.out, cfg, EmbedConfig(batch_size=a.batch_size,
                                num_actors=a.actors), use_ray=not a.no_ray, split=a.split,
                                max_without=a.max_without_negatives)
    except NoNegativesError as e:
        return fail(e, 3)
    except INPUT_ERRORS as e:
        return fail(e)
    print(json.dumps({"out": a.out, **report.as_dict(),
                      "note": f"{report.filtered_false_negatives} candidates filtered as likely false negatives"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
