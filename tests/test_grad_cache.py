"""GradCache (stage 2, cached gradients) is exact: the chunked loss and every parameter gradient equal the
plain whole-batch ones (1e-5), for LBR (with refinement and rate terms, both L_comp forms, hard negatives)
and for the LLM+CL baselines; and one optimizer step through the loop + engine lands on the same weights."""
import pytest
import torch

from pipeline.config import load_train_config
from pipeline.train.loop import train_loop
from pipeline.train.ray_runner import make_engine
from stages import LBRModel
from stages.objectives import Stage2Config, compute_loss_stage2, grad_cache_stage2, stage2_arrays, to_tensors
from stages.synthetic import synthetic_retrieval


def _batch(model, cfg, n=8):
    data = synthetic_retrieval(n_docs=2 * n, n_train=n)
    docs = [v["text"] for v in data["corpus"].values()]
    qs = [q for q, _ in data["train"][:n]]
    negs = [[docs[n + i]] for i in range(n)] if cfg.num_negatives else None
    # variable lengths (fixed=False): chunks are trimmed differently from the whole batch
    return to_tensors(stage2_arrays(model.tokenizer, qs, docs[:n], negs, cfg, fixed=False))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [
    ("bottleneck", Stage2Config(tau=0.1, lam=0.5, beta=0.1, num_negatives=1, chunk_size=3, refine="decode",
                                target_len=8)),
    ("bottleneck", Stage2Config(tau=0.05, lam=0.3, beta=0.0, num_negatives=0, chunk_size=2, refine="bow")),
    ("joint", Stage2Config(tau=0.05, lam=0.3, beta=0.1, num_negatives=1, chunk_size=3, refine="bow")),
    ("dual", Stage2Config(tau=0.05, lam=0.3, beta=0.1, num_negatives=1, chunk_size=3, refine="bow")),
    ("last", Stage2Config(tau=0.05, lam=0.0, beta=0.0, num_negatives=1, chunk_size=2)),
    ("mean", Stage2Config(tau=0.05, lam=0.0, beta=0.0, num_negatives=0, chunk_size=4)),
]


@pytest.mark.parametrize("pooling,cfg", CASES, ids=["lbr-decode-negs", "lbr-bow", "lbr-joint-readout-negs",
                                                      "lbr-dual-readout-negs", "llmcl-last-negs",
                                                      "llmcl-mean"])
def test_grad_cache_equals_plain_large_batch(tiny_backbone, pooling, cfg):
    torch.manual_seed(0)
    k = 3 if pooling in ("bottleneck", "joint", "dual") else 0
    readout = {"readout": pooling} if pooling in ("joint", "dual") else {}
    pooling = "bottleneck" if readout else pooling
    model = LBRModel.from_backbone(tiny_backbone, num_bottleneck=k, pooling=pooling, lora_r=4, **readout)
    model.train()
    batch = _batch(model, cfg)

    ref_loss, ref_parts = compute_loss_stage2(model, batch, cfg, generator=torch.Generator().manual_seed(7))
    ref_loss.backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)

    calls = []
    loss, parts = grad_cache_stage2(model, model, lambda sur: (calls.append(1), sur.backward()), batch, cfg,
                                    generator=torch.Generator().manual_seed(7))
    got = _grads(model)
    assert len(calls) == -(-8 // cfg.chunk_size)            # one backward per chunk
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-5)
    for name in ref_parts:
        assert parts[name] == pytest.approx(ref_parts[name], abs=1e-5), name
    assert set(got) == set(ref) and ref
    for name, g in ref.items():
        assert torch.allclose(got[name], g, atol=1e-5, rtol=1e-4), (name, float((got[name] - g).abs().max()))
    # the test has teeth: a gradient-carrying new parameter moved, and a wrong cache would differ
    if pooling == "bottleneck":
        assert ref["bottleneck"].abs().sum() > 0


@pytest.fixture
def single_process_group(monkeypatch, tmp_path):
    """A one-rank gloo process group in this process (DeepSpeed needs one), torn down after the test."""
    import torch.distributed as dist

    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    import deepspeed.utils.groups as ds_groups

    ds_groups._WORLD_GROUP = None       # DeepSpeed caches a clone of the world group: the next test's is new


@pytest.mark.parametrize("kind", ["torch", "deepspeed-zero0", "deepspeed-zero2"])
def test_grad_cache_step_through_loop_and_engine_matches_plain(tiny_backbone, tmp_path, kind, request):
    """Two optimizer steps with gradient accumulation 2: GradCache chunks count as engine micro-steps, in the
    torch engine and in DeepSpeed on one rank — stage 0 (what one fp32 worker runs) and ZeRO-2 kept by
    `engine.zero_single_worker` (tests/test_distributed.py's slow case runs 2 Ray workers with gathered
    negatives)."""
    kind, _, stage = kind.partition("-zero")
    if kind == "deepspeed":
        request.getfixturevalue("single_process_group")
    data = synthetic_retrieval(n_docs=32, n_train=32)
    docs = [v["text"] for v in data["corpus"].values()]
    rows = [{"query": q, "positive": docs[i], "negatives": [docs[(i + 5) % 32]]}
            for i, (q, _) in enumerate(data["train"][:32])]
    weights = []
    for chunk in (0, 2):
        torch.manual_seed(0)
        model = LBRModel.from_backbone(tiny_backbone, num_bottleneck=2, lora_r=4)
        cfg = load_train_config(None, ["stage=contrastive", "steps=2", "batch_size=4", "optim.grad_accum=2",
                                       "optim.lr=0.01", "optim.new_lr=0.03", "stage2.lam=0.2", "stage2.beta=0.01",
                                       "stage2.num_negatives=1", "stage2.refine=bow", f"stage2.chunk_size={chunk}",
                                       f"engine.kind={kind}", "engine.zero=2",
                                       f"engine.zero_single_worker={stage == '2'}"])
        engine = make_engine(model, cfg, rank=0, world=1, use_cuda=False)
        if kind == "deepspeed":
            assert engine.engine.zero_optimization_stage() == int(stage)
        # engine micro-steps per optimizer step: accumulation x GradCache chunks
        micro = engine.micro_steps if kind == "torch" else engine.engine.gradient_accumulation_steps()
        assert micro == (4 if chunk else 2)

        def source(epoch, cfg=cfg, model=model):
            for s in range(0, len(rows), 4):
                r = rows[s: s + 4]
                yield stage2_arrays(model.tokenizer, [x["query"] for x in r], [x["positive"] for x in r],
                                    [x["negatives"] for x in r], cfg.stage2, fixed=True)
        train_loop(model, engine, source, cfg)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, cached = weights
    fresh = LBRModel.from_backbone(tiny_backbone, num_bottleneck=2, lora_r=4)
    assert not torch.allclose(plain["bottleneck"], fresh.bottleneck)      # the step really moved weights
    for name, w in plain.items():
        # 1e-4, not 1e-5: Adam divides by sqrt(v), which magnifies float summation-order noise on the
        # near-zero gradient entries (measured max 4e-5 here against steps of ~1e-2)
        assert torch.allclose(cached[name], w, atol=1e-4), (name, float((cached[name] - w).abs().max()))


def test_chunk_size_must_divide_batch():
    with pytest.raises(ValueError, match="chunk_size=3 must divide batch_size=8"):
        load_train_config(None, ["stage=contrastive", "batch_size=8", "stage2.chunk_size=3"])


def test_one_fp32_worker_runs_zero_stage_0_and_resumes_from_its_checkpoint(tiny_backbone, tmp_path,
                                                                            single_process_group):
    """ZeRO partitions nothing across one rank: a one-worker fp32 run gets stage 0 (same optimizer math, none of
    ZeRO-2's per-step copies); offload, bf16 and `engine.zero_single_worker` keep the configured stage. The stage-0
    checkpoint resumes to the same weights as an uninterrupted run."""
    from pipeline.train.engines import deepspeed_config
    from pipeline.train.loop import train_loop

    def cfg_of(*extra):
        return load_train_config(None, ["stage=generative", "batch_size=4", "optim.lr=0.01", "engine.kind=deepspeed",
                                        "engine.zero=2", "stage1.context_len=16", "stage1.target_len=8", *extra])

    def stage(cfg, world=1, cuda=False):
        return deepspeed_config(cfg, world, cuda)["zero_optimization"]["stage"]

    assert stage(cfg_of()) == 0 and stage(cfg_of(), world=2) == 2
    assert stage(cfg_of("engine.offload=true")) == 2 and stage(cfg_of("engine.zero_single_worker=true")) == 2
    # bf16 (auto on a GPU, or asked for): ZeRO keeps the fp32 master weights, so the stage stays
    assert stage(cfg_of(), cuda=True) == 2 and stage(cfg_of("engine.precision=bf16")) == 2
    assert stage(cfg_of("engine.zero=3"), world=2) == 3

    data = synthetic_retrieval(n_docs=16, n_train=4)
    docs = [v["text"] for v in data["corpus"].values()]

    def source(epoch, model, cfg):
        from stages.objectives import stage1_arrays
        for s in range(0, 16, 4):
            yield stage1_arrays(model.tokenizer, docs[s: s + 4], [str(i) for i in range(s, s + 4)], cfg.stage1)

    def run(stop_at=4, start=0, load=None, save=None):
        torch.manual_seed(0)
        model = LBRModel.from_backbone(tiny_backbone, num_bottleneck=2, lora_r=4)
        cfg = cfg_of("steps=4")                    # the lr schedule spans all 4 steps in every run
        engine = make_engine(model, cfg, rank=0, world=1, use_cuda=False)
        assert engine.engine.zero_optimization_stage() == 0
        if load:
            engine.load(load)
        done = iter(range(start + 1, 5))
        train_loop(model, engine, lambda e: source(e, model, cfg), cfg, start_step=start,
                   stop=lambda: next(done) >= stop_at)
        if save:
            engine.save(save, stop_at)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    straight = run()
    run(stop_at=2, save=str(tmp_path / "ckpt"))
    resumed = run(start=2, load=str(tmp_path / "ckpt"))
    assert any(not torch.allclose(resumed[n], w) for n, w in run(stop_at=2).items())   # 2 steps != 4 steps
    for name, w in straight.items():
        assert torch.allclose(resumed[name], w, atol=1e-6), (name, float((resumed[name] - w).abs().max()))


def test_resume_from_a_checkpoint_of_another_zero_stage_is_refused(tmp_path):
    import json

    from pipeline.train.ray_runner import STATE_FILE, resume_step

    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 6, "stage": "generative", "zero_run": 0}))
    assert resume_step(tmp_path, 0) == 6
    with pytest.raises(ValueError, match="written by ZeRO stage 0, this run is stage 2"):
        resume_step(tmp_path, 2)
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 3, "stage": "generative"}))   # written before zero_run
    assert resume_step(tmp_path, 2) == 3
