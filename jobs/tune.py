"""Ray Tune search over beta / K / tau / lambda with ASHA on dev nDCG@10.

    python -m jobs.tune --model PATH --train PATH --dev BEIR_DIR [--dev BEIR_DIR ...] --out DIR
        [--stage1-data CORPUS] [--trials N] [--steps N] [--config YAML] [--resume] [key=value ...]

`--model` a stage-1 output folder: each trial runs stage 2 on `--train` (BEIR folder or pairs file).
`--model` a backbone (folder / alias such as smollm2): each trial runs stage 1 on `--stage1-data`
(or `tune.stage1_data` in the YAML) for `tune.stage1_steps` steps, then stage 2 on `--train`.
The YAML is a normal `jobs.train --config` file plus a `tune:` section (search space, ASHA, dev
evaluation), default `jobs/configs/tune_default.yaml`. `key=value` overrides reach the TrainConfig
(`stage2.query_len=32`) or, prefixed `tune.`, the tune section (`tune.eval_every=5`).
`--resume` finishes an interrupted search in `--out` (all other arguments come from `--out/search.json`).
Outputs: see `pipeline.tune`. TensorBoard: `tensorboard --logdir OUT`; Ray dashboard: http://127.0.0.1:8265.
"""
from __future__ import annotations

import sys
from pathlib import Path

from jobs._cli import INPUT_ERRORS, Parser, fail, note, positive_int

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tune_default.yaml"


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="stage-1 output folder (trials = stage 2) or backbone (trials = stage 1 + 2)")
    p.add_argument("--train", help="stage-2 training data: BEIR folder or pairs file")
    p.add_argument("--dev", action="append", help="dev BEIR folder(s) for nDCG@10 (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--stage1-data", help="backbone mode: stage-1 corpus (JSONL/Parquet/BEIR corpus; default: the "
                   "--train BEIR folder's corpus)")
    p.add_argument("--trials", type=positive_int, help="number of trials (tune.num_samples)")
    p.add_argument("--steps", type=positive_int, help="stage-2 steps per trial")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="search YAML (TrainConfig + tune: section)")
    p.add_argument("--resume", action="store_true", help="finish the interrupted search in --out")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (tune.X for the tune section)")
    return p.parse_intermixed_args(argv)   # key=value overrides may come before or after options


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline import tune as lt

    out = Path(args.out)
    try:
        if args.resume:
            ctx = lt.load_context(out)
        else:
            missing = [f"--{n}" for n in ("model", "train", "dev") if not getattr(args, n)]
            if missing:
                raise ValueError(f"{', '.join(missing)} required (unless --resume)")
            if (out / "search.json").exists():
                raise FileExistsError(f"--out {out} holds a search; pass --resume to finish it or pick a new --out")
            overrides = list(args.overrides) + ([f"tune.num_samples={args.trials}"] if args.trials else [])
            cfg, settings = lt.load_search(args.config, overrides, steps=args.steps)
            from jobs.train import resolve_model

            model = resolve_model(args.model, "generative")
            stage1_data = args.stage1_data or default_stage1_data(model, args.train, settings)
            ctx = lt.prepare_search(cfg, settings, model, args.train, args.dev, out, stage1_data=stage1_data)
            out.mkdir(parents=True, exist_ok=True)
            lt.save_context(ctx)
        for name in ctx.get("dropped", []):
            print(f"note: tune.space.{name} only changes stage 1, which does not run in these trials (--model is a "
                  "stage-1 folder): not searched", file=sys.stderr)
        summary = lt.run_search(ctx, resume=args.resume)
    except INPUT_ERRORS as e:
        return fail(e)
    best = summary["best"]
    print(f"{len(summary['trials'])} trials in {summary['seconds']}s "
          f"(concurrency {summary['plan']['max_concurrent_trials']})")
    for r in summary["trials"]:
        print(f"  {r['trial_id']} beta={r['beta']:.3g} K={r['num_bottleneck']} tau={r['tau']:.3g} "
              f"lambda={r['lambda']:.3g} ndcg@10={r['ndcg@10']} {r['status']}")
    if best:
        print(f"best: {best['trial_id']} ndcg@10={best['ndcg@10']:.4f} -> {out}/best.yaml")
    print(f"TensorBoard: tensorboard --logdir {out}   trials: {out}/trials.csv, {out}/trials.png")
    if not summary["complete"]:
        left = [r["trial_id"] for r in summary["trials"] if r["status"] not in ("COMPLETED", "STOPPED")]
        print(f"search incomplete ({len(left)} trial(s) pending or failed: {', '.join(left)}); finish it with "
              f"python -m jobs.tune --out {out} --resume", file=sys.stderr)
        return 1
    return 0


def default_stage1_data(model: str, train: str, settings) -> str | None:
    """Backbone mode without --stage1-data (or tune.stage1_data): the --train BEIR folder's corpus."""
    from pipeline.model_paths import is_model_dir
    from stages.readers import is_beir_folder

    if is_model_dir(model) or settings.stage1_data or not is_beir_folder(train):
        return None
    corpus = str(Path(train) / "corpus.jsonl")
    note(f"--model is a backbone and no --stage1-data was given: stage 1 trains on {corpus} "
         "(the --train folder's corpus)")
    return corpus


if __name__ == "__main__":
    sys.exit(main())
