"""SmolLM2 smoke check for the core: encode works, and N stage-1 steps on real medical text lower L_comp.

    python bench/smollm2_stage1.py [--steps 50] [--batch-size 4] [--lora-r 16]

Uses the converted SmolLM2-135M-Instruct (4-bit Q4_1 GGUF dequantised to fp32), MedQuAD training
answers from ../shared/data, the in-process reference trainer. Writes bench/results/smollm2_stage1.json.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "smollm2_stage1.json"))
    a = ap.parse_args()

    from pipeline.config import load_train_config
    from pipeline.train.inprocess import run_inprocess
    from pipeline.train.run_folder import read_metrics
    from stages import LBRModel
    from stages.backbone import resolve_backbone

    backbone = resolve_backbone("smollm2")
    t0 = time.time()
    m = LBRModel.from_backbone(backbone, num_bottleneck=8)
    vec = m.encode(["What are the symptoms of glaucoma?", "Glaucoma is a group of eye diseases."])
    encode_s = time.time() - t0
    src = ROOT.parent / "shared" / "data" / "medical" / "medquad" / "medquad_qa_train.jsonl.gz"
    tmp = Path(tempfile.mkdtemp(prefix="lbr-smol-"))
    corpus = tmp / "answers.jsonl"
    with gzip.open(src, "rt") as f, open(corpus, "w") as out:
        for i, line in enumerate(f):
            if i >= 2000:
                break
            r = json.loads(line)
            out.write(json.dumps({"_id": r["id"], "text": r["answer"]}) + "\n")
    cfg = load_train_config(None, ["stage=generative", f"steps={a.steps}", f"batch_size={a.batch_size}",
                                   "log_every=5", f"optim.lr={a.lr}", "optim.warmup_steps=5",
                                   "model.num_bottleneck=8", f"model.lora_r={a.lora_r}",
                                   "stage1.context_len=64", "stage1.target_len=32", "stage1.task=mixed",
                                   "engine.kind=torch"])
    t0 = time.time()
    rep = run_inprocess(cfg, backbone, corpus, tmp / "run", overwrite=True, progress=False)
    train_s = time.time() - t0
    recs = read_metrics(tmp / "run" / "metrics.jsonl")
    result = {"backbone": "SmolLM2-135M-Instruct (4-bit Q4_1 GGUF dequantised to fp32)", "lora_r": a.lora_r,
              "batch_size": a.batch_size, "steps": a.steps, "context_len": 64, "target_len": 32,
              "embedding_dim": int(vec.shape[1]), "encode_2_texts_s": round(encode_s, 1),
              "seconds_per_step": round(train_s / a.steps, 2), "train_seconds": round(train_s, 1),
              "first": recs[0], "last": recs[-1], "curve": recs, "report_rows": rep["rows"]}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| step | loss | lm | comp | rate | tokens/s |\n|---|---|---|---|---|---|")
    for r in recs:
        print(f"| {r['step']} | {r['loss']:.3f} | {r['lm']:.3f} | {r['comp']:.3f} | {r['rate']:.3f} | "
              f"{r['tokens_per_s']:.0f} |")
    print(f"seconds/step {result['seconds_per_step']}; L_comp {recs[0]['comp']:.3f} -> {recs[-1]['comp']:.3f}")


if __name__ == "__main__":
    main()
