"""Ray Train runner: the one training loop in `TorchTrainer` workers with DeepSpeed (or DDP).

Rank 0 writes metrics.jsonl / TensorBoard into the run folder (use shared storage for `--out` on a
multi-node cluster); checkpoints go through Ray Train storage so a killed worker group resumes from
the last one (FailureConfig). The final checkpoint is turned into a plain LBRModel folder in the
driver (ZeRO-3 partitions merged by DeepSpeed's own converter), so `LBRModel.from_pretrained` loads it.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

from pipeline.cluster import ensure_ray
from pipeline.config import TrainConfig, from_dict
from pipeline.train.run_folder import MetricsWriter, check_out_dir, claim_out_dir, read_metrics, write_report
from pipeline.train.start_model import TOKEN_WEIGHTS_FILE, prepare_model, save_token_weights

STATE_FILE = "trainer_state.json"


# ---------------------------------------------------------------------- worker side
def _gather_with_grad(t):
    import torch
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(t.contiguous()), 0)


def make_engine(model, cfg: TrainConfig, rank: int, world: int, use_cuda: bool):
    from pipeline.train.engines import DDPEngine, DeepSpeedEngine, TorchEngine

    if cfg.engine.kind == "deepspeed":
        return DeepSpeedEngine(model, cfg, cfg.steps, world, use_cuda)
    if cfg.engine.kind == "ddp":
        return DDPEngine(model, cfg.optim, cfg.steps, rank, cfg.micro_steps(), cfg.engine.precision)
    if world > 1:
        raise ValueError("engine.kind=torch is single-process; use deepspeed or ddp with workers > 1")
    return TorchEngine(model, cfg.optim, cfg.steps, cfg.micro_steps(), cfg.engine.precision)


def resume_step(ckpt_dir: Path, zero_run: int | None) -> int:
    """The step a checkpoint folder resumes from, after checking it was written at this run's ZeRO stage (DeepSpeed
    lays out stage 0 and ZeRO 1-3 checkpoints differently and would fail on the other's files without saying why)."""
    state = json.loads((ckpt_dir / STATE_FILE).read_text())
    if state.get("zero_run", zero_run) != zero_run:
        raise ValueError(f"checkpoint {ckpt_dir} was written by ZeRO stage {state['zero_run']}, this run is stage "
                         f"{zero_run}: a DeepSpeed checkpoint resumes at the stage that wrote it")
    return int(state["step"])


def worker_fn(config: dict) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.train.loop import train_loop
    from pipeline.train.stream import prefetched, shard_source

    cfg = from_dict(TrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    device = ray.train.torch.get_device() if use_cuda else torch.device("cpu")
    if not use_cuda:                                     # torch threads = the CPUs this worker reserved
        torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    # the first batch is fetched while the model loads and the engine starts (see stream.prefetched)
    debug = config.get("debug") or {}
    source = None if debug.get("local_rows") else prefetched(
        shard_source(ray.train.get_dataset_shard("train"), cfg.batch_size, seed=cfg.seed + rank))
    model = prepare_model(cfg, config["model_path"], config.get("token_weights")).to(device)
    if debug.get("local_rows"):                       # benchmark hook: the in-process reader, no Ray Data at all
        from pipeline.train.rows import local_source, read_rows

        source = local_source(model.tokenizer, read_rows(cfg, debug["local_rows"])[0], cfg, rank, world)
    if debug.get("preload"):
        source = _preloaded(source, cfg.steps * cfg.optim.grad_accum)
    engine = make_engine(model, cfg, rank, world, use_cuda)

    zero_run = getattr(engine, "zero", None)           # the ZeRO stage DeepSpeed runs (None: not DeepSpeed)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = resume_step(Path(d), zero_run)
            engine.load(d)
    out = Path(config["out"])
    writer = None
    if rank == 0:
        if start:
            _truncate_metrics(out / "metrics.jsonl", start)
        writer = MetricsWriter(out, cfg.steps, cfg.stage, progress=False, resume=bool(start), echo=False)
    gather = _gather_with_grad if (world > 1 and cfg.engine.gather_negatives and cfg.stage == "contrastive") else None
    if rank == 0:
        with open(out / ".attempts", "a") as f:          # one line per worker-group start: restarts = lines - 1
            f.write(f"{start}\n")
    if config.get("eval") and zero_run == 3:
        raise ValueError("in-run dev evaluation needs full weights on every rank: use engine.zero <= 2 or ddp")
    evaluator = DevEvaluator(config["eval"]) if config.get("eval") else None
    last_eval: dict = {}
    last_rec: dict = {}

    def log(rec: dict) -> None:
        due = evaluator is not None and evaluator.due(rec["step"], cfg.steps)
        if due:
            # every rank runs the same eval (ZeRO <= 2 / DDP keep full weights on each rank), so no rank
            # waits in a collective while another evaluates
            last_eval.update(evaluator(model))
            model.train()
        rec = {**rec, **last_eval, "max_rss_mb": _max_rss_mb()}
        last_rec.clear()
        last_rec.update(rec)
        if writer is not None:
            writer(rec)
        # metrics.jsonl has every logged step; a Ray Train report is a barrier across ranks and blocks until
        # the controller's next poll (0.8-1.5 s measured on 2 cores), so metric-only ones are paced by
        # report_every (a step count: every rank reports at the same steps)
        paced = cfg.report_every > 0 and rec["step"] % cfg.report_every == 0
        if due or (paced and not (evaluator is not None and evaluator.report_only_eval)):
            ray.train.report({**rec, "stage": cfg.stage})
        if debug.get("pause_at_step") == rec["step"] and start == 0 and rank == world - 1:
            # fault-injection hook for the recovery test: park this worker until it is killed
            Path(f"{config['pid_file']}.rank{rank}.paused").write_text(str(os.getpid()))
            time.sleep(600)

    def checkpoint(step: int) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save(d, step)
            if rank == 0:
                (Path(d) / STATE_FILE).write_text(json.dumps({"step": step, "stage": cfg.stage, "zero_run": zero_run}))
            ray.train.report({**last_rec, "stage": cfg.stage, "step": step, "checkpoint_step": step, **last_eval},
                             checkpoint=ray.train.Checkpoint.from_directory(d))

    profiler = None
    if debug.get("profile"):                         # cProfile of the loop, per rank (bench/train_throughput.py)
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        train_loop(model, engine, source, cfg, start_step=start, rank=rank, device=device, gather=gather,
                   log=log, checkpoint=checkpoint)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(Path(debug["profile"]) / f"rank{rank}.pstats"))
        if writer is not None:
            writer.close()


def _preloaded(source, batches: int):
    """Benchmark hook (debug `preload`): pull every batch the run will use out of Ray Data before the
    first step, so the timed steps run with no input task or iterator thread beside them."""
    epochs: list[list] = []
    while sum(map(len, epochs)) < batches:
        epochs.append(list(source(len(epochs))))
        if not epochs[-1]:
            break
    return lambda epoch: iter(epochs[epoch] if epoch < len(epochs) else [])


def _max_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)   # Linux: KiB


class DevEvaluator:
    """nDCG@10 (and friends) on dev BEIR folders, measured inside the training run.

    config: {"dev": [folders], "every": N steps, "max_corpus": int|None, "max_queries": int|None,
    "report_only_eval": bool}. Reports `ndcg@10` (mean over folders) and `ndcg@10/<name>`.
    """

    def __init__(self, config: dict):
        from pipeline.evaluate import EvalConfig, load_beir

        dev = config["dev"]
        self.folders = [dev] if isinstance(dev, str) else list(dev)
        self.every = int(config.get("every", 0))
        self.report_only_eval = bool(config.get("report_only_eval", False))
        self.cfg = EvalConfig(max_corpus=config.get("max_corpus"), max_queries=config.get("max_queries"),
                              batch_size=int(config.get("batch_size", 32)))
        self.data = [load_beir(f) for f in self.folders]

    def due(self, step: int, total: int) -> bool:
        return step == total or (self.every > 0 and step % self.every == 0)

    def __call__(self, model) -> dict:
        from pipeline.evaluate import evaluate_retriever

        out, scores = {}, []
        for data in self.data:
            m = evaluate_retriever(model, data, self.cfg)
            out[f"ndcg@10/{data.name}"] = m["ndcg@10"]
            scores.append(m["ndcg@10"])
        out["ndcg@10"] = sum(scores) / len(scores)
        return out


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, keep only the lines up to the checkpoint: the curve continues from there."""
    if path.exists():
        keep = [r for r in read_metrics(path) if r["step"] <= step]
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))


# ---------------------------------------------------------------------- driver side
def export_model(cfg: TrainConfig, model_path: str | Path, ckpt_dir: Path, dest: Path,
                 token_weights: str | Path | None = None) -> None:
    """Final checkpoint -> LBRModel folder (DeepSpeed: merge ZeRO partitions to fp32)."""
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(cfg.seed)
    model = prepare_model(cfg, model_path, token_weights)
    if cfg.engine.kind == "deepspeed" and not (ckpt_dir / "model.safetensors").exists():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag="ckpt")
    else:
        state = load_file(str(ckpt_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights (e.g. SmolLM2's embeddings = LM head) are stored under one of their names
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [m for m in missing if own[m].data_ptr() not in loaded]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing {list(missing)[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")
    model.save_pretrained(dest)


class _Progress(threading.Thread):
    """Driver-side progress: follows metrics.jsonl (written by rank 0) into a bar or log lines."""

    def __init__(self, path: Path, total: int, stage: str):
        super().__init__(daemon=True)
        self.path, self.total, self.stage = path, total, stage
        self.done = threading.Event()

    def run(self) -> None:
        import sys

        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=self.total, desc=self.stage, unit="step")
        seen = 0
        while not self.done.wait(1.0) or seen < len(read_metrics(self.path)):
            recs = read_metrics(self.path)
            for r in recs[seen:]:
                msg = f"loss={r['loss']:.4g} tok/s={r['tokens_per_s']:.0f}"
                if bar is not None:
                    bar.n = r["step"]
                    bar.set_postfix_str(msg)
                    bar.refresh()
                else:
                    print(f"[{self.stage}] step {r['step']}/{self.total} {msg}", flush=True)
            seen = max(seen, len(recs)) if recs else seen
            if self.done.is_set():
                break
        if bar is not None:
            bar.close()


def run_ray(cfg: TrainConfig, model_path: str | Path, data_path: str | Path, out: str | Path,
            overwrite: bool = False, max_failures: int = 2, storage_path: str | None = None,
            pid_file: str | None = None, debug: dict | None = None, eval_config: dict | None = None,
            run_config_kwargs: dict | None = None) -> dict:
    """Train one stage with Ray Train; returns the report (also written to out/report.json).

    The data streams (pipeline.train.stream): the driver lists the input files, a Ray Data check pass
    validates and counts every record (and fills the quarantine) before --out is touched, and the train
    pass reads, validates and tokenises inside Ray Data tasks feeding the workers' dataset shards.
    """
    from pipeline.model_paths import resolve_model_dir
    from pipeline.train.stream import build_dataset, check_source, open_source

    t0 = time.time()
    if cfg.data.group_field is not None:
        raise ValueError(f"data.group_field={cfg.data.group_field!r}: same-group batches are built by the in-process "
                         "trainer only (engine.kind=torch, workers=1); the Ray path streams rows through a local "
                         "shuffle buffer and would mix groups. Unset it or train in-process.")
    # inputs (data listing, model, every record) are validated before Ray Train starts and before --out is touched
    stale = check_out_dir(out, overwrite)
    src = open_source(data_path, cfg)
    start = prepare_model(cfg, model_path)               # the one idf fit of the run, if stage 2 has one
    model_path = resolve_model_dir(model_path)           # a run folder stands for its model/
    ensure_ray()
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    checked = check_source(src, cfg)
    try:
        out = claim_out_dir(out, overwrite, stale).resolve()
        bad = checked.move_quarantine(out)
    finally:
        if checked.quarantine is not None:
            checked.quarantine.unlink(missing_ok=True)
    token_weights, idf = None, None
    if start.token_weight_info is not None:              # workers and the export load it: no refit per process
        token_weights, idf = str(save_token_weights(start, out / TOKEN_WEIGHTS_FILE)), start.token_weight_info
    del start
    local_rows = bool((debug or {}).get("local_rows"))     # benchmark hook: the worker reads its rows itself
    datasets = {} if local_rows else {"train": build_dataset(cfg, src, checked, model_path)}
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    scaling = ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                            resources_per_worker=None if use_gpu else {"CPU": cfg.cpus_per_worker})
    t_fit = time.time()
    progress = _Progress(out / "metrics.jsonl", cfg.steps, cfg.stage)
    progress.start()
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={"cfg": cfg.to_dict(), "model_path": str(Path(model_path).resolve()), "out": str(out),
                           "pid_file": pid_file, "debug": debug, "eval": eval_config, "token_weights": token_weights},
        scaling_config=scaling, datasets=datasets,
        run_config=RunConfig(**{"name": f"{cfg.stage}-{int(time.time())}",
                                "storage_path": storage_path or str(out / "ray"),
                                "failure_config": FailureConfig(max_failures=max_failures),
                                "checkpoint_config": CheckpointConfig(num_to_keep=2),
                                **(run_config_kwargs or {})}))
    try:
        result = trainer.fit()
    finally:
        progress.done.set()
        progress.join(timeout=5)
    fit_s = time.time() - t_fit
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
        if state["step"] != cfg.steps:
            raise RuntimeError(f"last checkpoint is step {state['step']}, expected {cfg.steps}")
        export_model(cfg, model_path, Path(d), out / "model", token_weights)
    metrics = read_metrics(out / "metrics.jsonl")
    attempts = (out / ".attempts").read_text().split() if (out / ".attempts").exists() else ["0"]
    report = {"stage": cfg.stage, "engine": cfg.engine.kind, "zero": cfg.engine.zero, "workers": cfg.workers,
              # the stage DeepSpeed ran, as the workers chose it: one fp32 worker runs stage 0 (EngineConfig.effective_zero)
              "zero_run": state.get("zero_run"),
              "model_in": str(model_path), "data": str(data_path), "steps": cfg.steps, "rows": checked.rows,
              "bad_records": bad, "seconds": round(time.time() - t0, 2), "fit_seconds": round(fit_s, 2),
              "restarts": len(attempts) - 1, "resumed_from_steps": [int(x) for x in attempts[1:]],
              "final": metrics[-1] if metrics else {}, "idf": idf, "config": cfg.to_dict()}
    write_report(out, report)
    return report
