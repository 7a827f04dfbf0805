"""Ray Train + DeepSpeed on a real local Ray cluster (CPU, gloo): cross-worker negatives, both stages
through jobs.train with 2 workers and ZeRO-2, and a killed worker resuming from its checkpoint."""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_train_config
from stages import LBRModel
from stages.objectives import Stage2Config, compute_loss_stage2, stage2_arrays, to_tensors
from stages.synthetic import synthetic_retrieval

pytestmark = pytest.mark.timeout(900)


def _write_corpus(path: Path, n: int = 64) -> Path:
    data = synthetic_retrieval(n_docs=n, n_train=n)
    path.write_text("".join(json.dumps({"_id": k, "text": v["text"]}) + "\n" for k, v in data["corpus"].items()))
    return path


def _write_beir(folder: Path, n: int = 64) -> Path:
    data = synthetic_retrieval(n_docs=n, n_train=n)
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": k, "title": "", "text": v["text"]}) + "\n" for k, v in data["corpus"].items()))
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n" for i, (q, _) in enumerate(data["train"])))
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{d}\t1\n" for i, (_, d) in enumerate(data["train"])))
    return folder


# ---------------------------------------------------------------------- negatives across workers
def _gather_loss_worker(config):
    import ray.train

    from pipeline.train.ray_runner import _gather_with_grad

    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    model = LBRModel.from_pretrained(config["model"])
    cfg = Stage2Config(**config["s2"])
    full = config["batch"]
    half = len(full["q_ids"]) // 2
    local = {k: torch.tensor(np.asarray(v)[rank * half:(rank + 1) * half]) for k, v in full.items()}
    loss, _ = compute_loss_stage2(model, local, cfg, gather=_gather_with_grad, rank=rank)
    loss.backward()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"loss": float(loss), "rank": rank}))


def test_two_worker_gathered_loss_equals_single_process_loss(ray_session, tiny_backbone, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    torch.manual_seed(0)
    model = LBRModel.from_backbone(tiny_backbone, num_bottleneck=3)
    model.save_pretrained(tmp_path / "m")
    cfg = Stage2Config(lam=0.0, beta=0.0, tau=0.1, num_negatives=1)
    data = synthetic_retrieval(n_docs=16, n_train=16)
    docs = [v["text"] for v in data["corpus"].values()]
    qs = [q for q, _ in data["train"][:8]]
    arrays = stage2_arrays(model.tokenizer, qs, docs[:8], [[d] for d in docs[8:16]], cfg, fixed=True)
    ref, _ = compute_loss_stage2(LBRModel.from_pretrained(tmp_path / "m"), to_tensors(arrays), cfg)

    TorchTrainer(
        _gather_loss_worker,
        train_loop_config={"out": str(tmp_path), "model": str(tmp_path / "m"), "s2": {"lam": 0.0, "beta": 0.0, "tau": 0.1,
                                                                "num_negatives": 1},
                           "batch": {k: v.tolist() for k, v in arrays.items()}},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="gather")).fit()
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    # the rank-0 loss covers the first half of the queries against ALL documents (both workers')
    model_ref = LBRModel.from_pretrained(tmp_path / "m")
    first = {k: torch.tensor(v[:4]) for k, v in arrays.items()}
    q = model_ref.embed_from_encoded(model_ref.encode_batch(first["q_ids"], first["q_mask"]))
    full = to_tensors(arrays)
    p = model_ref.embed_from_encoded(model_ref.encode_batch(full["p_ids"], full["p_mask"]))
    n = model_ref.embed_from_encoded(model_ref.encode_batch(full["n_ids"].flatten(0, 1), full["n_mask"].flatten(0, 1)))
    logits = q @ torch.cat([p, n]).T / 0.1
    expect_rank0 = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    assert rank0["loss"] == pytest.approx(float(expect_rank0), abs=1e-5)
    # the mean over the two workers is the single-process loss on the concatenated batch
    q2 = model_ref.embed_from_encoded(model_ref.encode_batch(full["q_ids"][4:], full["q_mask"][4:]))
    expect_rank1 = torch.nn.functional.cross_entropy(q2 @ torch.cat([p, n]).T / 0.1, torch.arange(4, 8))
    assert rank1["loss"] == pytest.approx(float(expect_rank1), abs=1e-5)
    assert (rank0["loss"] + rank1["loss"]) / 2 == pytest.approx(float(ref), abs=1e-5)


# ---------------------------------------------------------------------- both stages through jobs.train
def test_both_stages_two_workers_zero2_through_jobs_train(ray_session, tiny_backbone, tmp_path, monkeypatch):
    """Stage 1 reads a Parquet corpus given as a file:// URI: Ray Data tasks read it (the driver process
    never opens the file), its one bad row goes to the quarantine, and both stages train with 2 workers."""
    import builtins

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.train import main

    data = synthetic_retrieval(n_docs=64, n_train=64)
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist([{"_id": k, "text": v["text"]} for k, v in data["corpus"].items()]
                                        + [{"_id": None, "text": "a row without an id"}]), corpus, row_group_size=16)
    beir = _write_beir(tmp_path / "beir")
    common = ["--workers", "2", "--zero", "2", "--steps", "4", "batch_size=4", "log_every=1",
              "optim.lr=0.003", "stage1.context_len=24", "stage1.target_len=8"]
    opened = []
    real_pf, real_open = pq.ParquetFile, builtins.open

    def spy_pf(src, *a, **kw):
        opened.append(str(src))
        return real_pf(src, *a, **kw)

    def spy_open(f, *a, **kw):
        if str(f).endswith(".parquet"):
            opened.append(str(f))
        return real_open(f, *a, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(pq, "ParquetFile", spy_pf)                        # the driver's own reads only
        mp.setattr(builtins, "open", spy_open)
        assert main(["--stage", "generative", "--model", str(tiny_backbone), "--data", f"file://{corpus}",
                     "--out", str(tmp_path / "s1"), "data.skip_bad_records=true"] + common) == 0
    assert opened == []
    s1 = tmp_path / "s1"
    rep1 = json.loads((s1 / "report.json").read_text())
    assert rep1["rows"] == 64 and rep1["bad_records"]["bad_records"] == 1
    assert json.loads((s1 / "quarantine.jsonl").read_text())["reason"].startswith("missing field: '_id'")
    m1 = LBRModel.from_pretrained(s1 / "model")
    recs = [json.loads(x) for x in (s1 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert {"loss", "lm", "comp", "rate", "lr", "tokens_per_s"} <= set(recs[0])
    assert any(p.name.startswith("events.out.tfevents") for p in (s1 / "tensorboard").iterdir())
    report = json.loads((s1 / "report.json").read_text())
    assert report["workers"] == 2 and report["zero"] == 2 and report["zero_run"] == 2 and report["engine"] == "deepspeed"
    # the trained weights really moved away from the backbone
    fresh = LBRModel.from_backbone(tiny_backbone, num_bottleneck=8)
    assert not torch.allclose(m1.lm.get_input_embeddings().weight, fresh.lm.get_input_embeddings().weight)

    # stage 2 refuses a plain backbone, and --out holding a previous run
    assert main(["--stage", "contrastive", "--model", str(tiny_backbone), "--data", str(beir),
                 "--out", str(tmp_path / "bad")] + common) == 2
    assert main(["--stage", "generative", "--model", str(tiny_backbone), "--data", f"file://{corpus}",
                 "--out", str(s1)] + common) == 2
    # stage 2 reads the idf-weighted joint readout: the driver fits the weights once and saves them; both
    # workers and the export load that file (the report says what it was fitted on)
    idf = ["stage2.readout=joint", f"stage2.idf_corpus={beir / 'corpus.jsonl'}"]
    assert main(["--stage", "contrastive", "--model", str(s1 / "model"), "--data", str(beir),
                 "--out", str(tmp_path / "s2")] + common + idf) == 0
    recs2 = [json.loads(x) for x in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs2) == 4 and {"cl", "comp", "rate"} <= set(recs2[-1])
    m2 = LBRModel.from_pretrained(tmp_path / "s2" / "model")
    assert json.loads((tmp_path / "s2" / "report.json").read_text())["idf"]["documents"] == 64
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "s2" / "token_weights.safetensors"))["token_weight"]
    assert m2.config.token_weighting == "idf" and saved.std() > 0 and torch.equal(m2.token_weight, saved)
    assert m2.num_bottleneck == m1.num_bottleneck
    emb = m2.encode(["protein kinase", "return value"])
    assert emb.shape == (2, m2.embedding_dim) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


@pytest.mark.slow   # two more 2-worker Ray runs (~1.5 min); the default suite checks GradCache under one-rank
# DeepSpeed ZeRO-2 (tests/test_grad_cache.py) and gathered negatives without GradCache (above)
def test_grad_cache_two_workers_zero2_gathered_negatives_equals_plain(ray_session, tiny_backbone, tmp_path):
    """GradCache under DeepSpeed ZeRO-2 with gathered negatives across 2 workers: chunks of 2 rows are engine
    micro-steps, and the trained weights equal the plain large-batch run's (Adam magnifies float-order noise)."""
    from jobs.train import main

    torch.manual_seed(0)
    start = tmp_path / "start"
    m0 = LBRModel.from_backbone(tiny_backbone, num_bottleneck=4, lora_r=4)
    m0.save_pretrained(start)
    beir = _write_beir(tmp_path / "beir")
    common = ["--workers", "2", "--zero", "2", "--steps", "4", "batch_size=4", "log_every=1", "optim.lr=0.003",
              "stage2.readout=joint", f"stage2.idf_corpus={beir / 'corpus.jsonl'}"]
    recs, models = [], []
    for name, extra in (("s2", []), ("s2c", ["stage2.chunk_size=2"])):
        assert main(["--stage", "contrastive", "--model", str(start), "--data", str(beir),
                     "--out", str(tmp_path / name)] + common + extra) == 0
        recs.append([json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
        models.append(LBRModel.from_pretrained(tmp_path / name / "model"))
    assert [r["step"] for r in recs[1]] == [1, 2, 3, 4]
    assert recs[1][0]["cl"] == pytest.approx(recs[0][0]["cl"], abs=1e-5)
    w2, w2c = dict(models[0].named_parameters()), dict(models[1].named_parameters())
    moved = max(float((w2[n] - w).abs().max()) for n, w in m0.named_parameters())
    diff = max(float((w2c[n] - w).abs().max()) for n, w in w2.items())
    assert moved > 1e-3 and diff < 1e-4, (diff, moved)          # measured: diff 6e-7, moved 7.5e-3


# ---------------------------------------------------------------------- fault tolerance
def _report_log(path: str):
    """A Ray Train callback (it runs in the controller) writing one JSON line per report the workers made;
    defined in here so that cloudpickle ships the class by value."""
    import ray.train

    class ReportLog(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps({"steps": [m.get("step") for m in metrics], "checkpoint": checkpoint is not None,
                                    "has_loss": all("loss" in m for m in metrics)}) + "\n")
    return ReportLog()


def test_killed_worker_resumes_from_last_checkpoint(ray_session, tiny_backbone, tmp_path):
    """Also: metric-only Ray Train reports follow report_every (every rank at the same steps), checkpoint
    reports carry the last logged metrics, and metrics.jsonl still has every step."""
    from pipeline.train.ray_runner import run_ray

    corpus = _write_corpus(tmp_path / "corpus.jsonl")
    cfg = load_train_config(None, ["stage=generative", "steps=8", "workers=2", "batch_size=4", "log_every=1",
                                   "checkpoint_every=3", "report_every=2", "engine.kind=deepspeed", "engine.zero=2",
                                   "optim.lr=0.003", "stage1.context_len=24", "stage1.target_len=8"])
    report_log = tmp_path / "reports.jsonl"
    pid_file = tmp_path / "pid"
    killed = {}

    def killer():
        target = Path(f"{pid_file}.rank1.paused")
        deadline = time.time() + 400
        while time.time() < deadline and not target.exists():
            time.sleep(0.2)
        if target.exists():
            killed["pid"] = int(target.read_text())
            os.kill(killed["pid"], signal.SIGKILL)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    report = run_ray(cfg, tiny_backbone, corpus, tmp_path / "run", max_failures=2, pid_file=str(pid_file),
                     debug={"pause_at_step": 5}, run_config_kwargs={"callbacks": [_report_log(str(report_log))]})
    t.join(5)
    assert "pid" in killed, "the worker was never paused for the kill"
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert steps == list(range(1, 9)), steps                 # continued from step 3, no gap, no repeat
    reports = [json.loads(x) for x in report_log.read_text().splitlines()]
    assert all(len(set(r["steps"])) == 1 and r["has_loss"] for r in reports), reports   # ranks in step
    metric_steps = [r["steps"][0] for r in reports if not r["checkpoint"]]
    ckpt_steps = [r["steps"][0] for r in reports if r["checkpoint"]]
    # first attempt: 2, ckpt 3, 4, then killed at 5 (a report not yet polled dies with it); the resumed one
    # (from 3): 4, 6, ckpt 6, 8, ckpt 8. Never a metric-only report at an odd step.
    assert metric_steps[-3:] == [4, 6, 8] and all(s % 2 == 0 for s in metric_steps), reports
    assert ckpt_steps[-2:] == [6, 8] and set(ckpt_steps) <= {3, 6, 8}, reports
    assert report["steps"] == 8 and report["final"]["step"] == 8
    assert report["restarts"] >= 1
    LBRModel.from_pretrained(tmp_path / "run" / "model")


def test_data_from_a_filesystem_uri_is_listed_not_copied(tmp_path):
    """`--data` accepts URIs: file:// (and any pyarrow.fs scheme) is listed through pyarrow.fs and read by the
    Ray Data tasks in place (tests/test_train_stream.py checks the rows); nothing is copied down."""
    from pipeline.train.stream import open_source

    cfg = load_train_config(None, ["stage=contrastive"])
    corpus = _write_corpus(tmp_path / "corpus.jsonl", n=10)
    src = open_source(f"file://{corpus}", cfg)
    assert (src.layout, src.files) == ("jsonl", (str(corpus),))
    folder = _write_beir(tmp_path / "beir", n=10)
    src = open_source(f"file://{folder}", cfg)
    assert (src.layout, src.files) == ("beir", (str(folder / "corpus.jsonl"),))
    # a non-file scheme goes through pyarrow.fs (mock:// is pyarrow's empty in-memory filesystem)
    with pytest.raises(FileNotFoundError, match="mock:///nothing/here.jsonl does not exist"):
        open_source("mock:///nothing/here.jsonl", cfg)
