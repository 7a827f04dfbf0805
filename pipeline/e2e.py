"""The whole LBR pipeline in one job: data -> stage 1 -> mine hard negatives -> stage 2 -> sharded
index -> evaluation against baselines -> report.md + plots.

Each step calls the same pipeline function as its own job (`jobs.train`, `jobs.mine_negatives`,
`jobs.build_index`, `jobs.evaluate`), so the demo exercises exactly what users run one by one.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipeline.config import TrainConfig, deep_merge, from_dict, load_yaml, parse_overrides, to_dict
from stages.model import MEAN_READOUTS
from stages.negatives import NegativeConfig


@dataclass(frozen=True)
class DataSpec:
    """`domain: stdlib_code` builds the code set from the installed stdlib (no download); `custom`
    takes `stage1` (text corpus), `train` (BEIR folder with training qrels) and `dev` (BEIR folders)."""

    domain: str = "stdlib_code"
    stage1: str | None = None
    train: str | None = None
    dev: tuple[str, ...] = ()
    eval_fraction: float = 0.2
    max_train_pairs: int | None = None
    max_eval: int | None = None
    max_stage1_records: int | None = None

    def __post_init__(self):
        if self.domain not in ("stdlib_code", "custom"):
            raise ValueError(f"data.domain={self.domain!r} must be stdlib_code or custom")
        if self.domain == "custom" and not (self.stage1 and self.train and self.dev):
            raise ValueError("data.domain=custom needs data.stage1, data.train and data.dev")


@dataclass(frozen=True)
class TinySpec:
    """The laptop model: a small Llama built from this config, tokenizer trained on the stage-1 text."""

    vocab_size: int = 4000
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    tokenizer_records: int = 3000


@dataclass(frozen=True)
class MiningSpec(NegativeConfig):
    """The selection rule (`stages.negatives.NegativeConfig`: top_k, num_negatives, margin, window, seed)
    plus how the pipeline runs it. Hard negatives are mined with the model after `warmup_steps` of
    in-batch stage 2 (a stage-1 model does not rank yet, so its "hard" negatives would be noise), then
    stage 2 continues with them."""

    enabled: bool = True
    warmup_steps: int = 50
    max_without_negatives: float = 0.1
    top_k: int = 30
    num_negatives: int = 1
    range_max: int = 30

    def selection(self) -> NegativeConfig:
        return NegativeConfig(**{f.name: getattr(self, f.name) for f in fields(NegativeConfig)})


@dataclass(frozen=True)
class IndexSpec:
    shards: int = 2
    factory: str = "Flat"


@dataclass(frozen=True)
class EvalSpec:
    baselines: tuple[str, ...] = ("bm25", "minilm", "base-mean")
    max_queries: int | None = None


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "demo"
    out: str = "runs/demo"
    model: str = "tiny"                       # tiny | smollm2 | a backbone folder / .gguf
    # stage 2's mean (joint readout) weighted by idf fitted on the stage-1 corpus (stage2.idf_corpus):
    # "stage1" = that corpus, "none" = a plain mean (stages.model.TOKEN_WEIGHTINGS)
    idf: str = "none"
    workers: int = 1
    tiny: TinySpec = field(default_factory=TinySpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: dict = field(default_factory=dict)     # TrainConfig keys shared by both stages
    stage1: dict = field(default_factory=dict)    # TrainConfig keys for stage 1 only
    stage2: dict = field(default_factory=dict)    # ... stage 2 only
    mining: MiningSpec = field(default_factory=MiningSpec)
    index: IndexSpec = field(default_factory=IndexSpec)
    evaluate: EvalSpec = field(default_factory=EvalSpec)

    def __post_init__(self):
        if self.idf not in ("none", "stage1"):
            raise ValueError(f"idf={self.idf!r} must be none or stage1")

    def stage_config(self, stage: str, warmup: bool = False) -> TrainConfig:
        """Validated TrainConfig for one stage (unknown keys fail here, before any work).

        Stage 2 with mining runs in two parts: `warmup` (in-batch negatives, mining.warmup_steps) and
        the rest (steps - warmup_steps) on the mined hard negatives.
        """
        extra = self.stage1 if stage == "generative" else self.stage2
        data = deep_merge(deep_merge(dict(self.train), dict(extra)), {"stage": stage, "workers": self.workers})
        if stage == "contrastive" and self.mining.enabled:
            total = int(data.get("steps", TrainConfig.steps))
            if not 0 < self.mining.warmup_steps < total:
                raise ValueError(f"mining.warmup_steps={self.mining.warmup_steps} must be in 1..{total - 1} "
                                 f"(stage2.steps={total})")
            if warmup:
                data = deep_merge(data, {"steps": self.mining.warmup_steps})
            else:
                data = deep_merge(data, {"steps": total - self.mining.warmup_steps,
                                         "stage2": {"num_negatives": self.mining.num_negatives}})
        return from_dict(TrainConfig, data, where=stage)


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    cfg = from_dict(PipelineConfig, deep_merge(load_yaml(path), parse_overrides(overrides or [])))
    cfg.stage_config("generative")
    s2 = cfg.stage_config("contrastive")
    if cfg.idf == "stage1" and s2.stage2.readout not in MEAN_READOUTS and not (s2.baseline == "llm_cl"
                                                                     and s2.model.pooling == "mean"):
        # checked here, not when stage 2 starts after stage 1 has trained
        raise ValueError("idf=stage1 weights the joint readout's mean: it needs stage2.stage2.readout=joint or dual "
                         f"(got {s2.stage2.readout!r})")
    if cfg.mining.enabled:
        cfg.stage_config("contrastive", warmup=True)
    return cfg


# ---------------------------------------------------------------------- steps
class Steps:
    """Runs named steps, timing each and printing progress."""

    def __init__(self, total: int):
        self.total, self.i, self.timings = total, 0, {}

    def run(self, name: str, fn, *args, **kwargs):
        self.i += 1
        print(f"[pipeline] ({self.i}/{self.total}) {name} ...", flush=True)
        t0 = time.time()
        out = fn(*args, **kwargs)
        self.timings[name] = round(time.time() - t0, 1)
        print(f"[pipeline] ({self.i}/{self.total}) {name} done in {self.timings[name]}s", flush=True)
        return out


def pairs_to_beir(pairs_file: Path, folder: Path) -> Path:
    """A (query, positive) JSONL -> BEIR folder, so mining and stage 2 read one format."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    docs, queries, qrels = {}, [], []
    for line in pairs_file.read_text().splitlines():
        r = json.loads(line)
        did = r.get("doc_id") or f"d{len(docs)}"
        qid = r.get("query_id") or f"q{len(queries)}"
        docs.setdefault(did, r["positive"])
        queries.append({"_id": qid, "text": r["query"]})
        qrels.append(f"{qid}\t{did}\t1\n")
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in docs.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(qrels))
    return folder


def prepare_data(cfg: PipelineConfig, run: Path) -> dict:
    if cfg.data.domain == "custom":
        return {"stage1": cfg.data.stage1, "train": cfg.data.train, "dev": list(cfg.data.dev), "meta": {}}
    from pipeline.stdlib_code import build_stdlib_code

    paths = build_stdlib_code(run / "data" / "stdlib_code", eval_fraction=cfg.data.eval_fraction,
                              max_train=cfg.data.max_train_pairs, max_eval=cfg.data.max_eval)
    root = run / "data" / "stdlib_code"
    stage1 = root / "stage1_text.jsonl"
    if cfg.data.max_stage1_records:
        lines = stage1.read_text().splitlines()[: cfg.data.max_stage1_records]
        stage1 = root / "stage1_text.sample.jsonl"
        stage1.write_text("\n".join(lines) + "\n")
    train = pairs_to_beir(root / "train_pairs.jsonl", run / "data" / "train_beir")
    meta = json.loads((root / "meta.json").read_text())
    del paths
    return {"stage1": str(stage1), "train": str(train), "dev": [str(root / "eval")], "meta": meta}


def prepare_backbone(cfg: PipelineConfig, run: Path, stage1_text: str) -> str:
    if cfg.model == "tiny":
        from stages.readers import read_corpus
        from stages.tiny import build_tiny_backbone

        texts = [d["text"] for d in read_corpus(stage1_text)[: cfg.tiny.tokenizer_records]]
        t = cfg.tiny
        return str(build_tiny_backbone(run / "backbone", texts=texts, vocab_size=t.vocab_size,
                                       hidden_size=t.hidden_size, layers=t.layers, heads=t.heads,
                                       max_positions=1024))
    if Path(cfg.model).exists():
        return cfg.model
    from stages.backbone import resolve_backbone

    return str(resolve_backbone(cfg.model))


def train_stage(cfg: TrainConfig, model: str, data: str, out: Path) -> dict:
    if cfg.engine.kind == "torch":
        from pipeline.train.inprocess import run_inprocess

        return run_inprocess(cfg, model, data, out, overwrite=True)
    from pipeline.train.ray_runner import run_ray

    return run_ray(cfg, model, data, out, overwrite=True)


def mine(cfg: PipelineConfig, model: str, train: str, out: Path) -> dict:
    from pipeline.index.mining import mine_negatives

    rep = mine_negatives(model, train, out, cfg.mining.selection(), max_without=cfg.mining.max_without_negatives)
    d = rep.as_dict()
    without = d.pop("queries_without_negatives")
    (out.parent / "queries_without_negatives.json").write_text(json.dumps(without, indent=1) + "\n")
    return {**d, "queries_without_negatives": len(without), "examples_without_negatives": without[:5]}


def build(cfg: PipelineConfig, model: str, corpus: str, out: Path) -> dict:
    from pipeline.index.build import build_from_corpus
    from pipeline.index.shards import IndexConfig

    return build_from_corpus(model, corpus, out, IndexConfig(factory=cfg.index.factory, shards=cfg.index.shards,
                                                             use_ray=True), overwrite=True)


class IndexRetriever:
    """Evaluates the published index itself (the serving path), not a re-embedding of the corpus."""

    def __init__(self, index_dir: Path):
        from pipeline.index.search import Searcher

        self.searcher = Searcher(index_dir)

    def index(self, doc_ids, texts) -> None:
        if len(doc_ids) != len(self.searcher):
            raise ValueError(f"the index holds {len(self.searcher)} documents, evaluation expects {len(doc_ids)}")

    def search(self, query_ids, texts, k):
        hits = self.searcher.search(list(texts), k=k)
        return {q: {h.id: float(h.score) for h in hs} for q, hs in zip(query_ids, hits)}


def evaluate_all(cfg: PipelineConfig, backbone: str, model: str, index_dirs: dict[str, Path],
                 dev: list[str]) -> dict[str, dict[str, dict]]:
    """{method: {dataset: metrics}} for LBR (through the index) and each baseline."""
    from pipeline.evaluate import EvalConfig, build_retriever, evaluate_retriever, load_beir
    from stages.readers import dataset_name

    ecfg = EvalConfig(max_queries=cfg.evaluate.max_queries)
    # the untrained baseline is the backbone LBR started from: the same layer cut
    num_layers = cfg.stage_config("generative").model.num_layers
    results: dict[str, dict[str, dict]] = {}
    for folder in dev:
        data = load_beir(folder)
        name = dataset_name(folder)
        results.setdefault("lbr", {})[name] = evaluate_retriever(IndexRetriever(index_dirs[name]), data, ecfg)
        for b in cfg.evaluate.baselines:
            retr = (build_retriever(baseline=b, backbone=backbone, num_layers=num_layers) if b.startswith("base-")
                    else build_retriever(baseline=b))
            results.setdefault(b, {})[name] = evaluate_retriever(retr, data, ecfg)
        print(f"[pipeline] evaluated {name}: " + ", ".join(
            f"{m}={results[m][name]['ndcg@10']:.3f}" for m in results), flush=True)
    return results


# ---------------------------------------------------------------------- report
def plot_losses(run: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.train.run_folder import read_metrics

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, stage in zip(axes, ("stage1", "stage2")):
        recs = read_metrics(run / stage / "metrics.jsonl")
        if stage == "stage2" and (run / "stage2_warmup" / "metrics.jsonl").exists():
            warm = read_metrics(run / "stage2_warmup" / "metrics.jsonl")
            last = warm[-1]["step"] if warm else 0
            recs = warm + [{**r, "step": r["step"] + last} for r in recs]
        if not recs:
            continue
        steps = [r["step"] for r in recs]
        for key in [k for k in recs[-1] if k in ("loss", "lm", "comp", "rate", "cl")]:
            ax.plot(steps, [r.get(key) for r in recs], label=key)
        ax.set_title(f"{stage} losses")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_results(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(results)
    datasets = sorted({d for m in results.values() for d in m})
    fig, ax = plt.subplots(figsize=(max(6, 2 + 1.5 * len(datasets) * len(methods) / 3), 4))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax.bar(np.arange(len(datasets)) + i * w, [results[m].get(d, {}).get("ndcg@10", 0) for d in datasets], w,
               label=m)
    ax.set_xticks(np.arange(len(datasets)) + 0.4 - w / 2, datasets)
    ax.set_ylabel("nDCG@10")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def results_table(results: dict) -> str:
    datasets = sorted({d for m in results.values() for d in m})
    lines = ["| method | dataset | nDCG@10 | Recall@100 | MRR@10 | queries |", "|---|---|---|---|---|---|"]
    for m, per in results.items():
        for d in datasets:
            r = per.get(d)
            if r:
                lines.append(f"| {m} | {d} | {r['ndcg@10']:.4f} | {r['recall@100']:.4f} | {r['mrr@10']:.4f} | "
                             f"{r['num_queries']} |")
    return "\n".join(lines)


def write_report(run: Path, cfg: PipelineConfig, info: dict) -> Path:
    import yaml

    plot_losses(run, run / "losses.png")
    plot_results(info["results"], run / "results.png")
    s1, s2 = info["stage1"], info["stage2"]
    bad = {"stage1": s1.get("bad_records"), "stage2": s2.get("bad_records")}
    lines = [
        f"# LBR pipeline report: {cfg.name}", "",
        f"Backbone: `{cfg.model}` ({info['backbone']}).", "",
        "## Results", "", results_table(info["results"]), "",
        "![results](results.png)", "",
        "## Training", "",
        f"- stage 1: {s1['steps']} steps on {s1['rows']} documents, final {json.dumps(s1.get('final', {}))}",
        (f"- stage 2: {s2['steps']} steps on {s2['rows']} (query, positive, negatives) rows, final "
         f"{json.dumps(s2.get('final', {}))}"),
        f"- stage 2 warm-up before mining: {json.dumps((info.get('stage2_warmup') or {}).get('final', {}))}",
        f"- hard-negative mining: {json.dumps(info.get('mining', {}))}", "",
        "![losses](losses.png)", "",
        "## Data", "", f"```json\n{json.dumps(info['data_counts'], indent=2)}\n```", "",
        "## Quarantined records", "", f"```json\n{json.dumps(bad, indent=2)}\n```", "",
        "## Index", "", f"```json\n{json.dumps(info['index'], indent=2)}\n```", "",
        "## Timings (seconds)", "", "| step | seconds |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in info["timings"].items()],
        f"| total | {info['total_seconds']} |", "",
        "## Configuration", "", f"```yaml\n{yaml.safe_dump(to_dict(cfg), sort_keys=False)}```", "",
    ]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    (run / "results.json").write_text(json.dumps(info["results"], indent=2, sort_keys=True) + "\n")
    return path


def with_idf(cfg: PipelineConfig, s2cfg: TrainConfig, data: dict) -> TrainConfig:
    """Stage 2 fits its idf token weights on the stage-1 corpus when `idf: stage1`."""
    if cfg.idf != "stage1":
        return s2cfg
    from dataclasses import replace

    return replace(s2cfg, stage2=replace(s2cfg.stage2, idf_corpus=str(data["stage1"])))


def run_pipeline(cfg: PipelineConfig) -> Path:
    t0 = time.time()
    run = Path(cfg.out).resolve()
    run.mkdir(parents=True, exist_ok=True)
    steps = Steps(7 + 2 * int(cfg.mining.enabled))
    data = steps.run("prepare data", prepare_data, cfg, run)
    steps.total = 6 + 2 * int(cfg.mining.enabled) + len(data["dev"])
    backbone = steps.run("prepare backbone", prepare_backbone, cfg, run, data["stage1"])
    s1cfg, s2cfg = cfg.stage_config("generative"), with_idf(cfg, cfg.stage_config("contrastive"), data)
    s1 = steps.run("stage 1 (learn)", train_stage, s1cfg, backbone, data["stage1"], run / "stage1")
    stage1_model = str(run / "stage1" / "model")
    train2, mining, start2, warm = data["train"], {}, stage1_model, None
    if cfg.mining.enabled:
        warm = steps.run("stage 2 warm-up (in-batch negatives)", train_stage,
                         with_idf(cfg, cfg.stage_config("contrastive", warmup=True), data), stage1_model, data["train"],
                         run / "stage2_warmup")
        start2 = str(run / "stage2_warmup" / "model")
        mined = run / "mined" / "negatives.parquet"
        mined.parent.mkdir(parents=True, exist_ok=True)
        mining = steps.run("mine hard negatives", mine, cfg, start2, data["train"], mined)
        train2 = str(mined)
    s2 = steps.run("stage 2 (represent)", train_stage, s2cfg, start2, train2, run / "stage2")
    final_model = str(run / "stage2" / "model")
    from stages.readers import dataset_name

    index_dirs = {}
    manifests = {}
    for folder in data["dev"]:
        name = dataset_name(folder)
        index_dirs[name] = run / "index" / name
        manifests[name] = steps.run(f"build index ({name})", build, cfg, final_model, folder, index_dirs[name])
    results = steps.run("evaluate", evaluate_all, cfg, backbone, final_model, index_dirs, data["dev"])
    info = {"backbone": backbone, "stage1": s1, "stage2": s2, "stage2_warmup": warm, "mining": mining, "results": results,
            "timings": steps.timings, "total_seconds": round(time.time() - t0, 1),
            "index": {n: {"num_docs": m["num_docs"], "shards": [s["count"] for s in m["shards"]],
                          "factory": m["factory"]} for n, m in manifests.items()},
            "data_counts": {"stage1_documents": s1["rows"], "stage2_rows": s2["rows"],
                            **data.get("meta", {}).get("counts", {}),
                            "python": data.get("meta", {}).get("python_version")}}
    return steps.run("report", write_report, run, cfg, info)
