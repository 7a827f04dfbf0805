"""Ray Tune search (ASHA on dev nDCG@10) over real Ray Train runs: a 2-trial search, best.yaml, and an
interrupted search finished with --resume. Tiny model, synthetic data, the session's 2-CPU cluster."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_train_config

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]

SEARCH_YAML = {
    "stage": "contrastive", "steps": 4, "batch_size": 4, "log_every": 2, "workers": 1, "cpus_per_worker": 0.5,
    "optim": {"lr": 0.003}, "engine": {"kind": "ddp"},
    "stage2": {"query_len": 16, "doc_len": 32, "target_len": 8},
    "tune": {"num_samples": 2, "eval_every": 2, "grace_period": 2, "max_corpus": 48, "max_queries": 16,
             "seed": 1,
             "space": {"beta": {"zero_or_loguniform": [1e-4, 1e-1], "p_zero": 0.3,
                                "targets": ["stage1.beta", "stage2.beta"]},
                       "model.num_bottleneck": {"choice": [2, 4]},
                       "stage2.tau": {"loguniform": [0.01, 0.2]},
                       "stage2.lam": {"choice": [0.0, 0.1]}}},
}


@pytest.fixture(scope="module")
def search_inputs(tiny_backbone, tmp_path_factory):
    import torch

    from stages import LBRModel
    from tests.test_distributed import _write_beir

    root = tmp_path_factory.mktemp("tune_inputs")
    torch.manual_seed(0)
    LBRModel.from_backbone(tiny_backbone, num_bottleneck=3).save_pretrained(root / "stage1")
    beir = _write_beir(root / "beir", n=48)
    (root / "search.yaml").write_text(yaml.safe_dump(SEARCH_YAML))
    return {"model": root / "stage1", "beir": beir, "yaml": root / "search.yaml"}


def _args(inp, out):
    return ["--model", str(inp["model"]), "--train", str(inp["beir"]), "--dev", str(inp["beir"]),
            "--out", str(out), "--config", str(inp["yaml"])]


def _rows(out):
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_two_trial_search_writes_csv_best_yaml_plot_and_tensorboard(ray_session, search_inputs, tmp_path):
    from jobs.tune import main

    out = tmp_path / "search"
    assert main(_args(search_inputs, out)) == 0
    rows = _rows(out)
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"COMPLETED", "STOPPED"}
    assert all(r["ndcg@10"] for r in rows) and all(0 <= float(r["ndcg@10"]) <= 1 for r in rows)
    # K is the stage-1 folder's (stage 2 cannot change it), so the K param was dropped from the space
    assert {r["num_bottleneck"] for r in rows} == {"3"}
    assert json.loads((out / "search.json").read_text())["dropped"] == ["model.num_bottleneck"]
    assert rows[0]["tau"] != rows[1]["tau"]

    # best = highest final nDCG@10 among trials that ran to the end (an ASHA-stopped trial's score is older)
    completed = [r for r in rows if r["status"] == "COMPLETED"]
    assert completed
    best_row = max(completed, key=lambda r: float(r["ndcg@10"]))
    cfg = load_train_config(out / "best.yaml")                    # what `jobs.train --config` does
    assert cfg.stage == "contrastive" and cfg.steps == 4 and cfg.engine.kind == "ddp"
    assert cfg.stage2.tau == pytest.approx(float(best_row["tau"]))
    assert cfg.stage2.beta == pytest.approx(float(best_row["beta"]))
    assert cfg.stage2.lam == pytest.approx(float(best_row["lambda"]))
    assert best_row["trial_id"] in (out / "best.yaml").read_text()

    # every trial trained and evaluated for real: its stage-2 run logged dev nDCG@10 at the eval steps
    for r in rows:
        recs = [json.loads(x) for x in (out / "runs" / r["trial_id"] / "stage2" / "metrics.jsonl").read_text().splitlines()]
        # (an ASHA-stopped trial may log a step or two past the result that stopped it)
        evals = {x["step"]: x["ndcg@10"] for x in recs if "ndcg@10" in x}
        assert evals[int(r["trial_step"])] == pytest.approx(float(r["ndcg@10"]))
    # Tune's TensorBoard event files (TBX logger), one per trial, and the plot
    events = list((out / "experiment").glob("*/events.out.tfevents*"))
    assert len(events) == 2, list((out / "experiment").iterdir())
    from PIL import Image

    assert Image.open(out / "trials.png").size[0] > 300
    # a second search into the same --out is refused instead of mixing two experiments
    assert main(_args(search_inputs, out)) == 2


@pytest.mark.slow   # ~2.3 min: kept out of the default suite (15-min budget); `make test-all` runs it
def test_interrupted_search_resumes_and_finishes(ray_session, search_inputs, tmp_path):
    from jobs.tune import main

    out = tmp_path / "search"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # the driver is interrupted (Ctrl-C) as soon as its first trial has finished; with 3 trials and one at a
    # time, the third is only created after the restore (its sampled beta must still resolve)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.tune", *_args(search_inputs, out), "--trials", "3"],
                            cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress = out / "progress.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (progress.exists() and progress.read_text()):
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGINT)
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        pytest.fail("the interrupted driver did not exit: " + log[-3000:])
    first = [json.loads(x) for x in progress.read_text().splitlines()]
    assert len(first) == 1, log[-3000:]
    assert proc.returncode != 0, log[-3000:]

    assert main(["--out", str(out), "--resume"]) == 0
    rows = _rows(out)
    assert len(rows) == 3 and {r["status"] for r in rows} <= {"COMPLETED", "STOPPED"}, rows
    assert all(float(r["beta"]) >= 0 and r["ndcg@10"] for r in rows)
    done = {r["trial_id"]: r for r in rows}
    # the finished trial was kept (not run again), the interrupted one was completed
    assert float(done[first[0]["trial_id"]]["ndcg@10"]) == pytest.approx(first[0]["ndcg@10"])
    finished = [json.loads(x) for x in progress.read_text().splitlines()]
    assert sorted(x["trial_id"] for x in finished) == sorted(done)
    assert load_train_config(out / "best.yaml").stage == "contrastive"
