"""The whole pipeline job on a small slice of the stdlib code domain: report.md, plots, results.

Training runs in-process here (engine.kind=torch): the Ray Train + DeepSpeed path of the same job is
covered by tests/test_distributed.py and tests/test_zz_job_submit.py; mining and the index still go
through Ray Data and Ray tasks."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)


def test_pipeline_job_writes_report_with_lbr_and_baselines(ray_session, tmp_path, capsys):
    from jobs.pipeline import main

    overrides = [f"out={tmp_path / 'run'}", "data.max_train_pairs=300", "data.max_eval=60",
                 "data.max_stage1_records=300", "tiny.tokenizer_records=300", "tiny.vocab_size=1500",
                 "tiny.hidden_size=64", "stage1.steps=6", "stage2.steps=8", "mining.warmup_steps=4",
                 "train.batch_size=8", "train.log_every=2", "train.engine.kind=torch",
                 "evaluate.baselines=[bm25, base-mean]"]
    assert main(["--config", str(ROOT / "jobs" / "configs" / "demo_tiny.yaml")] + overrides) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = Path(last)
    assert report == tmp_path / "run" / "report.md" and report.exists()
    text = report.read_text()
    for section in ("## Results", "## Training", "## Quarantined records", "## Timings", "## Configuration"):
        assert section in text
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results) == {"lbr", "bm25", "base-mean"}
    for per in results.values():
        m = per["stdlib_code"]
        assert 0.0 <= m["ndcg@10"] <= 1.0 and m["num_queries"] == 60
    # BM25 on code search by docstring is far above chance (60 docs: chance nDCG@10 ~ 0.05)
    assert results["bm25"]["stdlib_code"]["ndcg@10"] > 0.2
    assert re.search(r"\| lbr \| stdlib_code \| [0-9.]+ \|", text)
    for png in ("losses.png", "results.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000
    # stage 2 continued from the warm-up on mined hard negatives
    s2 = json.loads((tmp_path / "run" / "stage2" / "report.json").read_text())
    assert s2["model_in"].endswith("stage2_warmup/model") and s2["config"]["stage2"]["num_negatives"] == 1
    assert (tmp_path / "run" / "index" / "stdlib_code" / "manifest.json").exists()
    # the config's joint readout reached the model that was indexed and evaluated
    cfg = json.loads((tmp_path / "run" / "stage2" / "model" / "lbr_config.json").read_text())
    assert s2["config"]["stage2"]["readout"] == "joint" and cfg["readout"] == "joint"
    # ... and so did `idf: stage1`: stage 2 (warm-up and main part) fitted idf weights on the stage-1 text
    assert s2["config"]["stage2"]["idf_corpus"].endswith("stage1_text.sample.jsonl")
    assert cfg["token_weighting"] == "idf"
    from stages import LBRModel

    w = LBRModel.from_pretrained(tmp_path / "run" / "stage2" / "model").token_weight
    assert w.std() > 0.1 and w.min() > 0          # fitted (all ones would be the plain mean), not zeroed
    assert s2["idf"]["documents"] > 0 and s2["idf"]["power"] == 2.0      # the report says what it was fitted on


def test_pipeline_idf_needs_the_joint_readout_before_any_work():
    """`idf: stage1` with a stage 2 that has no text mean to weight fails at config load, not after stage 1."""
    import pytest

    from pipeline.e2e import load_pipeline_config

    demo = ROOT / "jobs" / "configs" / "demo_tiny.yaml"
    assert load_pipeline_config(demo).idf == "stage1"
    with pytest.raises(ValueError, match="idf=stage1 weights the joint readout"):
        load_pipeline_config(demo, ["stage2.stage2.readout=bottleneck"])
    with pytest.raises(ValueError, match="must be none or stage1"):
        load_pipeline_config(demo, ["idf=corpus"])
