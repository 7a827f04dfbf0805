"""The whole LBR pipeline in one job (what `make demo` runs).

    python -m jobs.pipeline --config jobs/configs/demo.yaml [key=value ...]

Stage 1, hard-negative mining, stage 2, sharded index, evaluation against baselines; the run folder
gets report.md and PNG plots. The last printed line is the path of report.md.
`model=smollm2` switches the demo to the real backbone.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. stage1.steps=50 model=smollm2")
    a = p.parse_args(argv)
    from pipeline.e2e import load_pipeline_config, run_pipeline

    try:
        cfg = load_pipeline_config(a.config, a.overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = run_pipeline(cfg)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
