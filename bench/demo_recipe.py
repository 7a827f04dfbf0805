"""Stage-2 recipe curves on the demo's domain (stdlib code), in-process, scored on the demo's held-out split.

Builds the demo's data (every training pair) and its stage-1 model once under --work, then trains one
stage-2 variant from that stage-1 model with checkpoints every --every steps and scores each checkpoint
(nDCG@10, all 384 held-out queries). Quality only: the in-process trainer here is not the demo's Ray path.
Appends one JSON line per variant to --out and prints the curve.

    python bench/demo_recipe.py base --steps 150 --every 30
    python bench/demo_recipe.py lr1e-3 stage2.optim.lr=0.001 --steps 90 --every 30
    python bench/demo_recipe.py s1eval --s1 s1eval --s1-eval-corpus --steps 90   # stage 1 also on the eval docs
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "jobs" / "configs" / "demo.yaml"
# the recipe the variants start from: the demo's before this bench (stage 2 lr 2e-4)
BASE = ["data.max_train_pairs=null", "train.engine.kind=torch", "stage2.optim.lr=0.0002"]


def main() -> None:
    from pipeline.e2e import load_pipeline_config, prepare_backbone, prepare_data, train_stage, with_idf
    from pipeline.evaluate import EvalConfig, evaluate_retriever, load_beir
    from stages.model import LBRModel

    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("ov", nargs="*", help="pipeline-config overrides for this variant (key=value)")
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument("--s1", default="s1", help="stage-1 run folder name under --work (trained once, reused)")
    ap.add_argument("--s1-eval-corpus", action="store_true",
                    help="stage 1 (and the idf fit) also read the held-out documents (no queries)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "demo-recipe"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "demo-recipe.jsonl"))
    a = ap.parse_args()
    root = Path(a.work)
    cfg = load_pipeline_config(DEMO, BASE + [f"stage2.steps={a.steps}", f"stage2.checkpoint_every={a.every}",
                                             "train.log_every=10"] + a.ov)
    if not (root / "data" / "train_beir").exists():
        prepare_data(cfg, root)
    code = root / "data" / "stdlib_code"
    data = {"stage1": str(code / "stage1_text.sample.jsonl"), "train": str(root / "data" / "train_beir")}
    if a.s1_eval_corpus:
        f = code / "stage1_text.sample+eval.jsonl"
        if not f.exists():
            docs = [json.loads(line) for line in (code / "eval" / "corpus.jsonl").read_text().splitlines()]
            f.write_text(Path(data["stage1"]).read_text() + "".join(
                json.dumps({"_id": "eval:" + d["_id"], "text": d["text"]}) + "\n" for d in docs))
        data["stage1"] = str(f)
    backbone = prepare_backbone(cfg, root, None)
    s1 = root / a.s1
    if not (s1 / "model").exists():
        train_stage(load_pipeline_config(DEMO, BASE).stage_config("generative"), backbone, data["stage1"], s1)
    out = root / f"s2-{a.name}"
    rep = train_stage(with_idf(cfg, cfg.stage_config("contrastive"), data), str(s1), data["train"], out)
    dev = load_beir(code / "eval")
    curve = {}
    for p in sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:])) + [out / "model"]:
        step = int(p.name[5:]) if p.name.startswith("step-") else a.steps
        t = time.time()
        m = LBRModel.from_pretrained(p)
        m.eval()
        curve[step] = round(evaluate_retriever(m, dev, EvalConfig())["ndcg@10"], 4)
        print(f"{a.name} step {step}: nDCG@10 {curve[step]} ({time.time() - t:.0f} s)", flush=True)
    with open(a.out, "a") as fh:
        fh.write(json.dumps({"name": a.name, "overrides": a.ov, "stage1": a.s1, "stage1_eval_corpus": a.s1_eval_corpus,
                             "ndcg@10": curve, "stage2_seconds": rep["seconds"]}) + "\n")


if __name__ == "__main__":
    main()
