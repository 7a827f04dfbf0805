"""Mine hard negatives for stage 2 from a BEIR folder, with the false-negative filter.

    python -m jobs.mine_negatives --model DIR --data BEIR_DIR --out FILE.parquet \
        [--top-k 50 --num-negatives 4 --margin 0.05 --range-min 3 --range-max 50 --seed 0]
Exit status 3 (nothing written) when some query ends up with no negative.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline.embed import EmbedConfig
from pipeline.mining import NoNegativesError, mine_negatives
from stages.negatives import NegativeConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.mine_negatives", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.add_argument("--split", default="test")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-negatives", type=int, default=4)
    p.add_argument("--margin", type=float, default=0.05,
                   help="drop candidates scoring > positive score - margin (likely false negatives)")
    p.add_argument("--range-min", type=int, default=3, help="first eligible rank (1-based, inclusive)")
    p.add_argument("--range-max", type=int, default=50, help="last eligible rank (inclusive)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-without-negatives", type=float, default=0.0,
                   help="fraction of queries allowed to get fewer than n negatives (left out, listed in the "
                        "report); above it the job fails (exit 3)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--no-ray", action="store_true", help="embed in this process")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        cfg = NegativeConfig(top_k=a.top_k, num_negatives=a.num_negatives, margin=a.margin,
                             range_min=a.range_min, range_max=a.range_max, seed=a.seed)
        report = mine_negatives(a.model, a.data, a.out, cfg, EmbedConfig(batch_size=a.batch_size,
                                num_actors=a.actors), use_ray=not a.no_ray, split=a.split,
                                max_without=a.max_without_negatives)
    except NoNegativesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": a.out, **report.as_dict(),
                      "note": f"{report.filtered_false_negatives} candidates filtered as likely false negatives"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
