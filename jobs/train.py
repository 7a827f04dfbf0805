"""Train one LBR stage.

    python -m jobs.train --stage generative|contrastive --model PATH --data PATH --out DIR
        [--workers N] [--zero 0|1|2|3] [--steps N] [--config YAML] [--baseline llm_cl]
        [--overwrite] [key=value ...]

Stage 1 (generative) `--data`: a text corpus (JSONL / Parquet / BEIR corpus; `data.text_field=answer`
picks another field). Stage 2 (contrastive) `--data`: a BEIR folder or a (mined) pairs file; `--model`
must be a stage-1 output folder unless `--baseline llm_cl`. `engine.kind=torch` runs the reference
in-process trainer instead of Ray Train. Works the same under `ray job submit -- python -m jobs.train ...`.
"""
from __future__ import annotations

import sys

from jobs._cli import INPUT_ERRORS, Parser, fail, nonneg_int, note, positive_int


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=["generative", "contrastive"])
    p.add_argument("--model", required=True,
                   help="backbone folder/.gguf/'smollm2' (stage 1), or a stage-1 run folder (or its model/)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=positive_int)
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--config", help="YAML config (e.g. a Tune best.yaml)")
    p.add_argument("--baseline", choices=["llm_cl"], help="stage 2 from a plain backbone: the LLM+CL baseline")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--max-failures", type=nonneg_int, default=2, help="worker-group restarts from the last checkpoint")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. stage2.tau=0.05")
    return p.parse_intermixed_args(argv)   # key=value overrides may come before or after options


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.config import load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides, stage=args.stage, steps=args.steps,
                                workers=args.workers, baseline=args.baseline,
                                engine={"zero": args.zero} if args.zero is not None else None)
        model = resolve_model(args.model, args.stage)
        if cfg.engine.kind == "torch":
            from pipeline.train.inprocess import run_inprocess

            report = run_inprocess(cfg, model, args.data, args.out, overwrite=args.overwrite)
        else:
            from pipeline.train.ray_runner import run_ray

            report = run_ray(cfg, model, args.data, args.out, overwrite=args.overwrite,
                             max_failures=args.max_failures)
    except INPUT_ERRORS as e:
        return fail(e)
    final = report.get("final", {})
    print(f"done: {report['stage']} {report['steps']} steps in {report['seconds']}s, final loss "
          f"{final.get('loss', float('nan')):.4f}; model at {args.out}/model")
    return 0


def resolve_model(spec: str, stage: str) -> str:
    """Backbone aliases (e.g. 'smollm2') resolve to a local converted folder; a run folder stands for its
    model/ (said on stderr); other paths pass through."""
    from pathlib import Path

    from pipeline.model_paths import is_run_dir, resolve_model_dir

    if Path(spec).exists():
        if is_run_dir(spec):
            note(f"--model {spec} is a run folder: using {Path(spec) / 'model'}")
        return resolve_model_dir(spec)
    from stages.backbone import resolve_backbone

    return str(resolve_backbone(spec))


if __name__ == "__main__":
    sys.exit(main())
