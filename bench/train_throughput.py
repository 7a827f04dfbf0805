"""Training throughput: the Ray Train + DeepSpeed job versus the plain in-process loop.

Same model, batch, sequence lengths and steps. Reports tokens/s (steady state: the first logged
interval, which holds start-up and the DeepSpeed JIT load, is excluded), Ray start-up separately,
2 workers x 1 CPU versus 1 worker x 2 CPUs, and ZeRO-0/2/3 peak memory (max RSS) per worker.
Writes bench/results/train_throughput.json and prints a table.

    python bench/train_throughput.py [--steps 40] [--batch-size 8] [--hidden 256 --layers 4]
        [--runs 1x2,2x1,...] [--profile DIR]

`--runs` picks the Ray runs (1x2 = ZeRO-2 1 worker x 2 CPUs, which runs stage 0 on one fp32 worker, 2x1,
zero0, zero2, zero3: 2 workers x 0.5 CPU; diagnostics of the 1 x 2 gap: 1x2pre = every batch pulled from Ray
Data before the first step, 1x2zero0 = DeepSpeed stage 0, 1x2keep = ZeRO-2 kept on the one worker, 1x2torch =
the plain torch engine in the Ray worker, 1x2-rep = a metric-only Ray Train report at every logged step, inray =
the in-process loop again beside the running cluster (inray+N: and N idle actors), task / taskthread = the
in-process loop inside a plain Ray task with 2 CPUs, in its main thread / in a second thread (Ray core worker
only: no Train controller, no Ray Data); inprocess = the in-process loop again with Ray shut down, ray:K=V[;K=V] =
restart Ray with those environment variables (an A/B of cluster settings in one invocation); a key may repeat,
to interleave repeats; every run's ratio is against the in-process run before it, since this host's speed drifts
±10 % between minutes); `--profile DIR` writes cProfile stats of the in-process loop and of every Ray worker's
loop there. Two rates per run: tokens/s over the steps' own time, and over the wall time from the first logged
step to the last (which also counts logging and Ray Train reports).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import proc_cpu

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def steady_tokens_per_s(metrics: list[dict]) -> float:
    recs = metrics[1:] if len(metrics) > 1 else metrics
    return sum(r["tokens_per_s"] for r in recs) / max(1, len(recs))


def wall_tokens_per_s(metrics: list[dict]) -> float | None:
    """Tokens over wall time from the first logged step to the last: the steps plus everything between them
    (logging, Ray Train reports) that tokens_per_s leaves out."""
    if len(metrics) < 2 or "elapsed_s" not in metrics[0]:
        return None
    return sum(r["tokens"] for r in metrics[1:]) / (metrics[-1]["elapsed_s"] - metrics[0]["elapsed_s"])


def _loop_in_ray_task(cfg, backbone, corpus, out, in_thread: bool) -> None:
    """The in-process loop inside a plain Ray task (a core worker, no Train, no Data): the worker's main
    thread, or a second thread like Ray Train's `TrainingThread`, which sets its torch threads itself as
    `worker_fn` does (OpenMP's thread count is per thread: unset, a reused worker's new thread ran on one)."""
    import threading

    import torch

    from pipeline.train.inprocess import run_inprocess

    def loop() -> None:
        torch.set_num_threads(2)
        run_inprocess(cfg, backbone, corpus, out, overwrite=True, progress=False)

    if in_thread:
        th = threading.Thread(target=loop)
        th.start()
        th.join()
    else:
        loop()


def _median(values: list) -> float | None:
    """Median of the values that exist (a run without a wall rate has none), rounded; None if none does."""
    got = [v for v in values if v is not None]
    return round(statistics.median(got), 3) if got else None


def _wait_gone(pids: set[int], timeout: float = 30.0) -> None:
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.2)


class _Idle:
    """An actor that does nothing: what an idle Ray worker process costs the cores beside it."""

    def ready(self) -> bool:
        return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_throughput.json"))
    ap.add_argument("--runs", default="1x2,2x1,zero0,zero2,zero3")
    ap.add_argument("--profile", help="folder for cProfile stats (in-process loop and each Ray worker)")
    ap.add_argument("--ray-env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="environment of the Ray processes only (set after the in-process baseline has loaded its "
                         "OpenMP runtime, before Ray starts), e.g. OMP_WAIT_POLICY=PASSIVE")
    a = ap.parse_args()

    from pipeline.cluster import ensure_ray
    from pipeline.config import load_train_config
    from pipeline.train.inprocess import run_inprocess
    from pipeline.train.ray_runner import run_ray
    from pipeline.train.run_folder import read_metrics
    from stages.synthetic import synthetic_retrieval
    from stages.tiny import build_tiny_backbone, synthetic_corpus

    tmp = Path(tempfile.mkdtemp(prefix="lbr-bench-"))
    backbone = build_tiny_backbone(tmp / "backbone", texts=synthetic_corpus(2000), hidden_size=a.hidden,
                                   layers=a.layers, heads=4)
    data = synthetic_retrieval(n_docs=2000, n_train=2000, doc_words=40)
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": k, "text": v["text"] * 3}) + "\n" for k, v in data["corpus"].items()))
    common = [f"steps={a.steps}", f"batch_size={a.batch_size}", "log_every=5", "stage=generative",
              "stage1.context_len=96", "stage1.target_len=32", "model.num_bottleneck=8", "optim.lr=1e-4"]
    rows = []
    baseline: dict = {}         # the latest in-process run: every run's ratio is taken against it

    def record(name, metrics, extra=None, inprocess=False):
        wall = wall_tokens_per_s(metrics)
        row = {"run": name, "tokens_per_s": round(steady_tokens_per_s(metrics), 1),
               "wall_tokens_per_s": None if wall is None else round(wall, 1),
               "max_rss_mb": max((r.get("max_rss_mb", 0) for r in metrics), default=None), **(extra or {})}
        base = baseline or row                          # the first in-process run: against itself
        row["baseline_tokens_per_s"] = base["tokens_per_s"]
        row["baseline_wall_tokens_per_s"] = base["wall_tokens_per_s"]
        row["ratio"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        row["wall_ratio"] = (round(wall / base["wall_tokens_per_s"], 3)
                             if wall and base["wall_tokens_per_s"] else None)
        if inprocess:
            baseline.clear()
            baseline.update(row)
        rows.append(row)
        print(f"  {name}: {row}", flush=True)

    def start_ray(env: list[str] | None = None) -> None:
        """Start the local Ray unless it is up; with `env` (KEY=VALUE), restart it with those env vars first: the
        raylet and every worker it starts inherit them (this process read its own at load). Logical CPUs: 1
        worker x 2 CPUs on a 2-core box still needs a free CPU for Ray Data (else deadlock)."""
        import ray

        if env is not None:
            ray.shutdown()
            for kv in env:
                k, _, v = kv.partition("=")
                os.environ[k] = v
        ensure_ray(num_cpus=(os.cpu_count() or 2) + 2)

    import torch

    torch.set_num_threads(2)
    cfg = cfg_inproc = load_train_config(None, common + ["engine.kind=torch"])
    t0 = time.time()
    prof = None
    if a.profile:
        import cProfile

        Path(a.profile).mkdir(parents=True, exist_ok=True)
        prof = cProfile.Profile()
        prof.enable()
    run_inprocess(cfg, backbone, corpus, tmp / "inproc", overwrite=True, progress=False)
    if prof is not None:
        prof.disable()
        prof.dump_stats(str(Path(a.profile) / "inprocess.pstats"))
    import resource

    inproc = read_metrics(tmp / "inproc" / "metrics.jsonl")
    for r in inproc:
        r["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    record("in-process torch (2 threads)", inproc, {"wall_s": round(time.time() - t0, 1)}, inprocess=True)

    t0 = time.time()
    start_ray(a.ray_env)
    ray_start = round(time.time() - t0, 2)
    runs = {"1x2": ("ray+deepspeed zero2, 1 worker x 2 CPU", ["workers=1", "cpus_per_worker=2.0", "engine.zero=2"]),
            "2x1": ("ray+deepspeed zero2, 2 workers x 1 CPU", ["workers=2", "cpus_per_worker=1.0", "engine.zero=2"]),
            "zero0": ("ray+deepspeed zero0, 2 workers x 0.5 CPU", ["workers=2", "cpus_per_worker=0.5", "engine.zero=0"]),
            "zero2": ("ray+deepspeed zero2, 2 workers x 0.5 CPU", ["workers=2", "cpus_per_worker=0.5", "engine.zero=2"]),
            "zero3": ("ray+deepspeed zero3, 2 workers x 0.5 CPU", ["workers=2", "cpus_per_worker=0.5", "engine.zero=3"]),
            # diagnostics of the 1 x 2 gap: input pre-pulled (no Ray Data beside the steps), DeepSpeed stage 0,
            # the plain torch engine in the Ray worker, no metric-only ray.train.report calls
            "1x2pre": ("ray+deepspeed zero2, 1 worker x 2 CPU, input preloaded",
                       ["workers=1", "cpus_per_worker=2.0", "engine.zero=2"]),
            "1x2zero0": ("ray+deepspeed zero0, 1 worker x 2 CPU", ["workers=1", "cpus_per_worker=2.0", "engine.zero=0"]),
            # one fp32 worker runs ZeRO stage 0 (EngineConfig.effective_zero); this key keeps stage 2 there
            "1x2keep": ("ray+deepspeed zero2 kept on 1 worker x 2 CPU",
                        ["workers=1", "cpus_per_worker=2.0", "engine.zero=2", "engine.zero_single_worker=true"]),
            "1x2local": ("ray+deepspeed zero2, 1 worker x 2 CPU, rows read in the worker (no Ray Data)",
                         ["workers=1", "cpus_per_worker=2.0", "engine.zero=2"]),
            "1x2torchlocal": ("ray+torch engine, 1 worker x 2 CPU, rows read in the worker (no Ray Data)",
                              ["workers=1", "cpus_per_worker=2.0", "engine.kind=torch"]),
            "1x2torch": ("ray+torch engine, 1 worker x 2 CPU", ["workers=1", "cpus_per_worker=2.0", "engine.kind=torch"]),
            "1x2-rep": ("ray+deepspeed zero2, 1 worker x 2 CPU, a metric report every logged step",
                        ["workers=1", "cpus_per_worker=2.0", "engine.zero=2", "report_every=5"])}
    env_label = ""
    for key in a.runs.split(","):
        if key == "inprocess":                        # the baseline again, Ray shut down (interleaved baselines)
            import ray

            ray.shutdown()
            t0 = time.time()
            run_inprocess(cfg_inproc, backbone, corpus, tmp / "inproc", overwrite=True, progress=False)
            # max RSS is this process's lifetime peak, not this run's: left out
            record("in-process torch (2 threads)", read_metrics(tmp / "inproc" / "metrics.jsonl"),
                   {"wall_s": round(time.time() - t0, 1), "max_rss_mb": None}, inprocess=True)
            continue
        if key.startswith("ray:"):                    # restart Ray with these env vars (A/B of cluster settings)
            env_label = key[4:]
            start_ray(env_label.split(";"))
            continue
        start_ray()                                   # up again after an `inprocess` key (a no-op when it is up)
        if key in ("task", "taskthread"):             # the in-process loop in a plain Ray task (no Train/Data)
            import ray

            t0 = time.time()
            name = "in-process torch in a Ray task" + (", second thread" if key == "taskthread" else "")
            before = proc_cpu.snapshot()
            ray.get(ray.remote(num_cpus=2)(_loop_in_ray_task).remote(cfg_inproc, backbone, corpus, tmp / key,
                                                                      key == "taskthread"))
            cpu = proc_cpu.cpu_delta(before, proc_cpu.snapshot(), top=8)
            record(name, read_metrics(tmp / key / "metrics.jsonl"), {"wall_s": round(time.time() - t0, 1),
                                                                     "cpu_s_by_process": cpu})
            continue
        if key == "inray" or key.startswith("inray+"):   # the in-process loop again, beside the idle Ray cluster
            import ray

            # inray+N: and beside N idle actors (each an idle Ray worker process, as Train's and Data's are)
            n = int(key.partition("+")[2] or 0)
            actors = [ray.remote(num_cpus=0)(_Idle).remote() for _ in range(n)]
            try:
                ray.get([h.ready.remote() for h in actors])
                t0 = time.time()
                before = proc_cpu.snapshot()
                run_inprocess(cfg_inproc, backbone, corpus, tmp / "inray", overwrite=True, progress=False)
                after = proc_cpu.snapshot()
                cpu = proc_cpu.cpu_delta(before, after, top=8)
                # Ray may place an actor in a pooled idle worker: count the Ray worker processes that really ran
                workers = sum(1 for name, _ in after.values() if name.startswith("ray::"))
                record("in-process torch, Ray cluster up" + (f", {n} idle actors" if n else ""),
                       read_metrics(tmp / "inray" / "metrics.jsonl"),
                       {"wall_s": round(time.time() - t0, 1), "ray_worker_processes": workers, "cpu_s_by_process": cpu})
            finally:
                pids = {pid for pid, (name, _) in proc_cpu.snapshot().items() if name == "ray::_Idle"}
                for h in actors:
                    ray.kill(h)
                _wait_gone(pids)            # the next timed run starts without their teardown beside it
            continue
        name, extra = runs[key]
        cfg = load_train_config(None, common + ["engine.kind=deepspeed"] + extra)
        t0 = time.time()
        debug = {"preload": True} if key == "1x2pre" else {"local_rows": str(corpus)} if key in ("1x2local", "1x2torchlocal") else {}
        if a.profile:
            debug["profile"] = str(Path(a.profile, key).resolve())
            Path(debug["profile"]).mkdir(parents=True, exist_ok=True)
        before = proc_cpu.snapshot()
        rep = run_ray(cfg, backbone, corpus, tmp / name.replace(" ", "_"), overwrite=True, max_failures=0,
                      debug=debug or None)
        cpu = proc_cpu.cpu_delta(before, proc_cpu.snapshot(), top=8)
        # workers=2: each worker logs its own tokens; rank 0 logs rank 0's, so the job's rate is x workers
        m = read_metrics(tmp / name.replace(" ", "_") / "metrics.jsonl")
        for r in m:
            r["tokens_per_s"] *= cfg.workers
            r["tokens"] *= cfg.workers
        # the label says the configured stage; the ZeRO stage DeepSpeed ran is part of the name (one fp32 worker: 0)
        if rep["zero_run"] is not None:
            name = f"{name} [ran stage {rep['zero_run']}]"
        if env_label:
            name = f"{name} {{{env_label}}}"
        record(name, m, {"wall_s": round(time.time() - t0, 1), "fit_s": rep["fit_seconds"], "zero_run": rep["zero_run"],
                         "cpu_s_by_process": cpu})

    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(r)
    medians = {}
    for name, rs in by_run.items():
        tps, wall = statistics.median(r["tokens_per_s"] for r in rs), _median([r["wall_tokens_per_s"] for r in rs])
        medians[name] = {"n": len(rs), "tokens_per_s": tps, "ratio": _median([r["ratio"] for r in rs]),
                         "wall_tokens_per_s": wall,
                         "wall_ratio": _median([r["wall_ratio"] for r in rs]),
                         "ratios": [r["ratio"] for r in rs]}
    result = {"machine": f"{os.cpu_count()} CPUs, no GPU", "torch_threads_inprocess": 2, "ray_start_s": ray_start,
              "ray_env": a.ray_env,
              "model": {"hidden": a.hidden, "layers": a.layers, "bottleneck": 8},
              "batch_size": a.batch_size, "steps": a.steps, "seq": {"context": 96, "target": 32},
              "runs": rows, "ratio_ray_ds_1worker_vs_inprocess": rows[1]["ratio"]
              if "1x2" in a.runs.split(",")[:1] else None, "median_by_run": medians}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nRay start-up: {ray_start}s")
    print("| run | tokens/s (steps) | vs in-process | tokens/s (wall, first to last step) | vs in-process | "
          "max RSS per worker (MB) | wall s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        w = r["wall_tokens_per_s"]
        print(f"| {r['run']} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f} | {w:.0f} | {r['wall_ratio']:.2f} | "
              f"{r['max_rss_mb']} | {r.get('wall_s')} |")

    if any(m["n"] > 1 for m in medians.values()):
        print("\nMedians over repeats (each run vs the in-process run before it):\n| run | n | tokens/s (steps) | ratios | median "
              "| wall ratio |\n|---|---|---|---|---|---|")
        for name, m in medians.items():
            print(f"| {name} | {m['n']} | {m['tokens_per_s']:.0f} | {m['ratios']} | {m['ratio']:.2f} | "
                  f"{m['wall_ratio']} |")


if __name__ == "__main__":
    main()
