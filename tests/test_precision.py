"""Precision of the plain torch engines: fp32 on CPU by default, bf16 autocast when asked for
(`engine.precision=bf16`) or on a GPU (`auto`), always with fp32 master weights. The CUDA test runs only
where a GPU is (never in CI); the autocast plumbing itself is checked here on CPU."""
import json

import numpy as np
import pytest
import torch

from pipeline.config import load_train_config
from pipeline.train.engines import TorchEngine, autocast_dtype
from pipeline.train.loop import train_loop
from stages import LBRModel
from stages.objectives import stage2_arrays
from stages.synthetic import synthetic_retrieval


def test_autocast_rule():
    assert autocast_dtype("auto", "cpu") is None          # bf16 autocast measured slower on this CPU
    assert autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("auto", "cuda") is torch.bfloat16
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16


def _rows(n=16):
    data = synthetic_retrieval(n_docs=n, n_train=n)
    docs = [v["text"] for v in data["corpus"].values()]
    return [{"query": q, "positive": docs[i]} for i, (q, _) in enumerate(data["train"][:n])]


@pytest.mark.parametrize("precision,chunk", [("fp32", 0), ("bf16", 0), ("bf16", 2)],
                         ids=["fp32", "bf16", "bf16-gradcache"])
def test_torch_engine_autocasts_the_step_and_keeps_fp32_weights(tiny_backbone, precision, chunk):
    torch.manual_seed(0)
    model = LBRModel.from_backbone(tiny_backbone, num_bottleneck=2, lora_r=4, readout="joint")
    cfg = load_train_config(None, ["stage=contrastive", "steps=2", "batch_size=4", "optim.lr=0.01",
                                   "stage2.lam=0.1", "stage2.refine=bow", f"stage2.chunk_size={chunk}",
                                   f"engine.precision={precision}"])
    engine = TorchEngine(model, cfg.optim, cfg.steps, cfg.micro_steps(), cfg.engine.precision)
    rows = _rows()

    def source(epoch):
        for s in range(0, len(rows), 4):
            r = rows[s: s + 4]
            yield stage2_arrays(model.tokenizer, [x["query"] for x in r], [x["positive"] for x in r], None,
                                cfg.stage2, fixed=True)

    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    seen: list[torch.dtype] = []
    hook = linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        train_loop(model, engine, source, cfg)
    finally:
        hook.remove()
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen and set(seen) == {want}                    # every forward of the step ran in that precision
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in before)          # fp32 master weights
    assert any(not torch.equal(after[n].detach(), w) for n, w in before.items())   # and they moved
    model.eval()
    with torch.no_grad():                                  # outside the step nothing is autocast
        seen.clear()
        hook = linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        model.encode(["a query"])
        hook.remove()
    assert set(seen) == {torch.float32}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent device, not in CI)"))])
def test_inprocess_trains_where_it_runs(tiny_backbone, tmp_path, monkeypatch, device):
    """The in-process trainer picks the GPU when there is one (bf16 autocast there), the CPU (fp32) otherwise;
    the report says which; the loss falls either way; the saved model reads the same on CPU and GPU."""
    from pipeline.train.inprocess import run_inprocess
    from pipeline.train.run_folder import read_metrics

    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in _rows(64)))
    cfg = load_train_config(None, ["stage=contrastive", "baseline=llm_cl", "model.pooling=mean", "steps=40",
                                   "batch_size=16", "engine.kind=torch", "optim.lr=3e-4", "log_every=5"])
    rep = run_inprocess(cfg, tiny_backbone, pairs, tmp_path / "run", progress=False)
    if device == "cuda":
        assert rep["device"].startswith("cuda:") and rep["precision"] == "bfloat16", rep
    else:
        assert (rep["device"], rep["precision"]) == ("cpu", "float32"), rep
    cl = [r["cl"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert np.mean(cl[-2:]) < 0.8 * np.mean(cl[:2]), cl
    if device == "cuda":                                   # fp32 at inference: the same vectors on both
        texts = [r["positive"] for r in _rows(8)]
        cpu = LBRModel.from_pretrained(tmp_path / "run" / "model").encode(texts)
        gpu = LBRModel.from_pretrained(tmp_path / "run" / "model").to("cuda").encode(texts)
        assert np.abs(cpu - gpu).max() < 1e-3
