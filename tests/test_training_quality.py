"""The reference trainer learns: stage-1 losses fall, and stage 1 + stage 2 retrieve held-back
queries far better than the untrained model and chance (synthetic task, tiny model, seconds)."""
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_train_config
from pipeline.train.inprocess import run_inprocess
from pipeline.train.run_folder import read_metrics
from stages import LBRModel
from stages.synthetic import synthetic_retrieval

DATA = synthetic_retrieval(n_docs=300, n_train=100, queries_per_doc=2)   # 300 training queries, 100 held back


def _files(tmp: Path) -> tuple[Path, Path]:
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": k, "text": v["text"]}) + "\n" for k, v in DATA["corpus"].items()))
    beir = tmp / "train_beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(corpus.read_text())
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n" for i, (q, _) in enumerate(DATA["train"])))
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{d}\t1\n" for i, (_, d) in enumerate(DATA["train"])))
    return corpus, beir


def recall_at_10(model: LBRModel) -> float:
    ids = list(DATA["corpus"])
    docs = model.encode([DATA["corpus"][i]["text"] for i in ids])
    qs = model.encode([q for q, _ in DATA["test"]])
    top = np.argsort(-(qs @ docs.T), axis=1)[:, :10]
    gold = [ids.index(d) for _, d in DATA["test"]]
    return float(np.mean([g in t for g, t in zip(gold, top)]))


COMMON = ["optim.lr=3e-4", "optim.schedule=constant", "log_every=5", "engine.kind=torch"]


@pytest.fixture(scope="module")
def trained(tiny_backbone, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    corpus, beir = _files(tmp)
    s1 = load_train_config(None, ["stage=generative", "steps=40", "batch_size=16", "model.num_bottleneck=4",
                                  "stage1.context_len=32", "stage1.target_len=16"] + COMMON)
    run_inprocess(s1, tiny_backbone, corpus, tmp / "s1", progress=False)
    s2 = load_train_config(None, ["stage=contrastive", "steps=160", "batch_size=32", "stage2.tau=0.05",
                                  "stage2.lam=0.1"] + COMMON)
    run_inprocess(s2, tmp / "s1" / "model", beir, tmp / "s2", progress=False)
    return tmp


def test_stage1_losses_fall(trained):
    recs = read_metrics(trained / "s1" / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(5, 41, 5))
    for part in ("loss", "lm", "comp"):
        assert recs[-1][part] < 0.9 * recs[0][part], (part, recs[0][part], recs[-1][part])


def test_lbr_retrieval_beats_untrained_and_chance(trained, tiny_backbone):
    import torch

    torch.manual_seed(0)
    untrained = recall_at_10(LBRModel.from_backbone(tiny_backbone, num_bottleneck=4))
    lbr = recall_at_10(LBRModel.from_pretrained(trained / "s2" / "model"))
    chance = 10 / len(DATA["corpus"])
    # stated margins: +0.10 absolute over the untrained model, and 5x chance
    assert lbr >= untrained + 0.10, (lbr, untrained)
    assert lbr >= 5 * chance, (lbr, chance)
    cl = [r["cl"] for r in read_metrics(trained / "s2" / "metrics.jsonl")]
    assert np.mean(cl[-4:]) < 0.8 * np.mean(cl[:4])
