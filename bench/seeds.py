"""Seed spread of bench.quality rows: mean, min and max nDCG@10 per (method, dataset) over several result files
that differ only in the training seed (`--train-override seed=N`: same training rows, same eval subsample),
and each method's paired difference against a reference method, seed by seed.

    python -m bench.seeds bench/results/quality-smollm2-240steps.json bench/results/quality-smollm2-seed1.json \
        bench/results/quality-smollm2-seed2.json --methods lbr lbr_no_refine --ref lbr

Writes bench/results/seeds-<X>.json for a first file quality-<X>.json (or --out) and prints a markdown table.
Files whose data or eval budget differ from the first one's (other than the training seed) are refused: they
are not seeds. An existing table made from other files or methods is not overwritten without --force.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

METRIC = "ndcg@10"


def training_seed(data: dict) -> int:
    """The seed the runs trained with: the last seed= of --train-override wins over --seed (as in train_cfg)."""
    seed = data["budget"]["train"]["seed"]
    for ov in data["budget"]["train"].get("train_override", []):
        if ov.startswith("seed="):
            seed = int(ov.split("=", 1)[1])
    return seed


def comparable(data: dict) -> dict:
    """The budget with the training seed taken out: equal across files that are seeds of one setting."""
    train = dict(data["budget"]["train"])
    train["train_override"] = [o for o in train.get("train_override", []) if not o.startswith("seed=")]
    return {"train": train, "eval": data["budget"]["eval"], "backbone": data["backbone"]}


def spread(files: list[Path], methods: list[str], ref: str | None) -> dict:
    runs = [json.loads(f.read_text()) for f in files]
    base = comparable(runs[0])
    for f, d in zip(files[1:], runs[1:]):
        if comparable(d) != base:
            raise ValueError(f"{f}: its budget differs from {files[0]}'s beyond the training seed")
    seeds = [training_seed(d) for d in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"training seeds repeat across the files: {seeds}")
    datasets = list(runs[0]["results"])
    out = {"files": [str(f) for f in files], "seeds": seeds, "metric": METRIC, "rows": {}}
    for m in methods:
        per = {}
        for ds in datasets + ["mean"]:
            vals = []
            for f, d in zip(files, runs):
                if ds == "mean":
                    got = [d["results"][x].get(m, {}).get(METRIC) for x in datasets]
                    v = None if None in got else sum(got) / len(got)
                else:
                    v = d["results"].get(ds, {}).get(m, {}).get(METRIC)
                if v is None:
                    raise ValueError(f"{f}: no {METRIC} for {m} on {ds}")
                vals.append(v)
            per[ds] = {"per_seed": [round(v, 4) for v in vals], "mean": round(sum(vals) / len(vals), 4),
                       "min": round(min(vals), 4), "max": round(max(vals), 4)}
        out["rows"][m] = per
    if ref:
        out["paired_vs"] = ref
        out["paired"] = {m: {ds: [round(a - b, 4) for a, b in zip(out["rows"][m][ds]["per_seed"],
                                                                   out["rows"][ref][ds]["per_seed"])]
                             for ds in out["rows"][m]} for m in methods if m != ref}
    return out


def table(res: dict) -> str:
    cols = list(next(iter(res["rows"].values())))
    lines = [f"{METRIC}, seeds {res['seeds']}: mean [min, max]", "",
             "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m, per in res["rows"].items():
        lines.append(f"| {m} | " + " | ".join(f"{v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]"
                                              for v in per.values()) + " |")
    for m, per in res.get("paired", {}).items():
        lines.append(f"| {m} − {res['paired_vs']} (per seed) | "
                     + " | ".join(", ".join(f"{x:+.3f}" for x in v) for v in per.values()) + " |")
    return "\n".join(lines)


def default_out(first: Path) -> Path:
    """seeds-<X>.json beside quality-<X>.json: one table per setting, named after its seed-0 file."""
    stem = first.stem.removeprefix("quality-")
    return first.with_name(f"seeds-{stem}.json")


def other_inputs(out: Path, res: dict) -> str | None:
    """What an existing table at `out` was made from, when that is not what `res` is made from."""
    if not out.exists():
        return None
    try:
        old = json.loads(out.read_text())
        made = (old["files"], sorted(old["rows"]))
    except (ValueError, KeyError, TypeError):
        return "something this script did not write"
    if made == (res["files"], sorted(res["rows"])):
        return None
    return f"files {made[0]} and methods {made[1]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--ref", default=None, help="paired differences against this method")
    p.add_argument("--out", type=Path, default=None, help="default: seeds-<X>.json beside a first file quality-<X>.json")
    p.add_argument("--force", action="store_true", help="overwrite a table made from other files or methods")
    a = p.parse_args(argv)
    res = spread(a.files, a.methods, a.ref)
    out = a.out or default_out(a.files[0])
    clash = other_inputs(out, res)
    if clash and not a.force:
        raise SystemExit(f"{out} exists and was made from {clash}; pass another --out, or --force to replace it")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
