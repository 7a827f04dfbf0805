"""Benchmark: a sharded IVF-PQ index over many vectors, built the streaming way, on this machine's cores.

    python bench/index_scale.py --num-vectors 10000000 --work /work/lbr-bench/index10m     # the full run
    python bench/index_scale.py --num-vectors 200000 --work /tmp/lbr-index-small             # a check

Vectors: a seeded synthetic generator (Gaussian blobs around random unit centres, normalised — uniform
random vectors have no neighbourhood structure, so IVF recall on them says nothing), written straight
into the staged layout an embedding pass writes (Parquet partitioned by `sha1(id) mod shards`), one chunk
at a time. The build is `pipeline.index.build.build_from_stage` — the path `jobs.build_index` takes after
embedding — on a local Ray cluster: bounded training sample, one task per shard, atomic publish.

Recorded: generation and build time, peak driver RSS (sampled every 20 ms in the driver), peak worker
RSS (every Ray worker process, every 200 ms: the largest single process and the largest sum), recall@10
of the index against exact search over every vector for a sample of queries, and QPS of
`Searcher.search_vectors` (batched, all cores). Writes bench/results/index-scale-<n>.json and prints a table.

Resumable: every phase leaves its output in --work (generated chunks are written atomically and
skipped when present; the published index, the exact top-10 and the measurements are reused), so an
interrupted run continues where it stopped. Times of phases that were skipped are taken from the saved
phase record.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")      # tasks: one thread each; the search below sets its own


class Peak(threading.Thread):
    """Peak RSS of this process, and of Ray's worker processes (`ray::...`), sampled in a thread."""

    def __init__(self, workers: bool = True):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.base = self.me.memory_info().rss
        self.driver = self.base
        self.worker_max = self.worker_sum = 0
        self.workers = workers
        self.stop = threading.Event()

    def run(self):
        k = 0
        while not self.stop.wait(0.02):
            self.driver = max(self.driver, self.me.memory_info().rss)
            k += 1
            if self.workers and k % 10 == 0:
                rss = []
                for p in self.psutil.process_iter(["name", "memory_info"]):
                    try:
                        if (p.info["name"] or "").startswith("ray::") and p.info["memory_info"] is not None:
                            rss.append(p.info["memory_info"].rss)
                    except (self.psutil.Error, OSError):
                        continue
                if rss:
                    self.worker_max = max(self.worker_max, max(rss))
                    self.worker_sum = max(self.worker_sum, sum(rss))

    def result(self) -> dict:
        self.stop.set()
        self.join()
        mb = 2**20
        return {"driver_peak_rss_mb": round(self.driver / mb, 1),
                "driver_growth_mb": round((self.driver - self.base) / mb, 1),
                "worker_peak_rss_mb": round(self.worker_max / mb, 1),
                "workers_sum_peak_rss_mb": round(self.worker_sum / mb, 1)}


def centres(n_clusters: int, d: int, seed: int) -> np.ndarray:
    c = np.random.default_rng(seed).standard_normal((n_clusters, d)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def chunk_vectors(start: int, m: int, c: np.ndarray, seed: int, noise: float) -> np.ndarray:
    """Vectors start..start+m of the corpus: depends only on (seed, start), so chunks can be regenerated."""
    rng = np.random.default_rng([seed, start])
    d = c.shape[1]
    x = c[rng.integers(0, len(c), m)] + (noise / np.sqrt(d) * 4) * rng.standard_normal((m, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def generate(stage: Path, n: int, d: int, shards: int, chunk: int, seed: int, noise: float) -> dict:
    """Write the staged partitions chunk by chunk (each chunk's files written, then a .done marker)."""
    from pipeline.index.build import staged_table
    from pipeline.index.stage import write_staged

    stage.mkdir(parents=True, exist_ok=True)
    c = centres(max(64, n // 1000), d, seed)
    made = 0
    t = time.perf_counter()
    for start in range(0, n, chunk):
        done = stage / f".chunk-{start:012d}.done"
        if done.exists():
            continue
        m = min(chunk, n - start)
        x = chunk_vectors(start, m, c, seed, noise)
        ids = [f"v{i:010d}" for i in range(start, start + m)]
        # content hash: the id (never compared here); a chunk killed midway left files named after it,
        # which this rewrites under the same names
        write_staged(stage, staged_table(ids, ids, shards, x), f"chunk-{start:012d}")
        done.touch()
        made += m
    return {"generated": made, "generate_s": time.perf_counter() - t}


def _exact_task(files: list[str], q: np.ndarray, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product of every query over one partition, a batch at a time (int ids)."""
    import faiss

    from pipeline.index.embed import vectors_from_column
    from pipeline.index.stage import iter_batches

    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for b in iter_batches([Path(f) for f in files], ["int_id", "vector"], rows=262144):
        v = vectors_from_column(b.column(1), d)
        ix = faiss.IndexFlatIP(d)
        ix.add(v)
        s, j = ix.search(q, min(k, len(v)))
        best_s = np.concatenate([best_s, s], 1)
        best_i = np.concatenate([best_i, b.column(0).to_numpy()[j]], 1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_s, best_i


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-vectors", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--factory", default=None, help="default: IVF<sqrt(n) rounded to 2^k>,PQ<dim/8> (IVF4096,PQ16 at 10M x 128)")
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--train-size", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=10_000, help="queries for recall@10 (exact top-10 over all vectors)")
    p.add_argument("--qps-queries", type=int, default=10_000)
    p.add_argument("--chunk", type=int, default=500_000, help="vectors generated per chunk")
    p.add_argument("--noise", type=float, default=0.35)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--work", required=True, help="folder for the staged vectors, the index and phase records")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/index-scale-<n>.json)")
    a = p.parse_args(argv)
    n, d = a.num_vectors, a.dim
    factory = a.factory or f"IVF{1 << round(np.log2(np.sqrt(n)))},PQ{max(1, d // 8)}"
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rec_path = work / "phases.json"
    rec = json.loads(rec_path.read_text()) if rec_path.exists() else {}
    key = {"n": n, "dim": d, "shards": a.shards, "factory": factory, "seed": a.seed, "noise": a.noise,
           "train_size": a.train_size}
    if rec.get("key", key) != key:
        sys.exit(f"{work} holds a run with other settings {rec['key']}; use another --work")
    rec["key"] = key

    def save():
        tmp = rec_path.with_name(".phases.json.tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, rec_path)

    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores", flush=True)
    stage = work / "stage"
    if not rec.get("generate_done"):
        g = generate(stage, n, d, a.shards, a.chunk, a.seed, a.noise)
        rec["generate_s"] = rec.get("generate_s", 0.0) + g["generate_s"]
        rec["generate_done"] = True
        save()
    print(f"generated {n} x {d} in {rec['generate_s']:.0f} s", flush=True)

    import ray

    from pipeline.cluster import ensure_ray
    from pipeline.index.build import build_from_stage, run_tasks
    from pipeline.index.search import Searcher
    from pipeline.index.shards import IndexConfig
    from pipeline.index.stage import shard_files

    index = work / "index"
    if not rec.get("build"):
        ensure_ray(num_cpus=a.cpus)
        cfg = IndexConfig(factory=factory, shards=a.shards, nprobe=a.nprobe, train_size=a.train_size,
                          seed=a.seed, use_ray=True)
        peak = Peak()
        peak.start()
        t = time.perf_counter()
        m = build_from_stage(index, stage, cfg, {"path": "bench:synthetic", "fingerprint": "bench:synthetic"}, d)
        build_s = time.perf_counter() - t
        rec["build"] = {"build_s": build_s, **peak.result(), "num_docs": m["num_docs"],
                        "shard_counts": [s["count"] for s in m["shards"]],
                        "index_bytes": sum((index / "current" / f).stat().st_size for f in m["files"]),
                        "load_avg_at_start": load}
        save()
    b = rec["build"]
    print(f"built {factory} x {a.shards} shards in {b['build_s']:.0f} s; driver peak {b['driver_peak_rss_mb']} MB "
          f"(+{b['driver_growth_mb']}), worker peak {b['worker_peak_rss_mb']} MB", flush=True)

    c = centres(max(64, n // 1000), d, a.seed)
    rng = np.random.default_rng(a.seed + 1)
    nq = max(a.queries, a.qps_queries)
    qv = c[rng.integers(0, len(c), nq)] + (a.noise / np.sqrt(d) * 4) * rng.standard_normal((nq, d)).astype(np.float32)
    qv = (qv / np.linalg.norm(qv, axis=1, keepdims=True)).astype(np.float32)
    gt = work / f"exact-top10-{a.queries}.npy"
    if not gt.exists():
        ensure_ray(num_cpus=a.cpus)
        t = time.perf_counter()
        q = qv[: a.queries]
        parts = run_tasks(_exact_task, [([str(f) for f in shard_files(stage, i)], q, 10, d)
                                        for i in range(a.shards)], True)
        s = np.concatenate([x[0] for x in parts], 1)
        ids = np.concatenate([x[1] for x in parts], 1)
        keep = np.argsort(-s, axis=1, kind="stable")[:, :10]
        np.save(gt.with_suffix(".tmp.npy"), np.take_along_axis(ids, keep, 1))
        os.replace(gt.with_suffix(".tmp.npy"), gt)
        rec["exact_s"] = time.perf_counter() - t
        save()
    if ray.is_initialized():
        ray.shutdown()
    exact = np.load(gt)

    import faiss

    faiss.omp_set_num_threads(a.cpus)
    peak = Peak(workers=False)
    peak.start()
    t = time.perf_counter()
    s = Searcher(index, verify=False)
    open_s = time.perf_counter() - t
    open_mem = peak.result()
    rows = []
    for nprobe in sorted({max(1, a.nprobe // 4), a.nprobe, a.nprobe * 4}):
        s.set_search_params(nprobe=nprobe)
        s.index.search(qv[:100], 10)
        t = time.perf_counter()
        _, got = s.index.search(qv[: a.qps_queries], 10)
        qps = a.qps_queries / (time.perf_counter() - t)
        got = got[: a.queries]
        recall = float(np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact)]))
        rows.append({"nprobe": nprobe, "qps": qps, "recall_at_10": recall})
    result = {
        "benchmark": "index_scale", "num_vectors": n, "dim": d, "factory": factory, "shards": a.shards,
        "train_size": a.train_size, "vectors": "synthetic clustered (seeded), staged as Parquet by shard",
        "generate_s": rec["generate_s"], **rec["build"], "exact_s": rec.get("exact_s"),
        "recall_queries": a.queries, "qps_queries": a.qps_queries,
        "searcher_open_s": open_s, "searcher_rss_mb": open_mem["driver_peak_rss_mb"], "search": rows,
        "cpus": a.cpus, "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                                    "load_avg_at_end": os.getloadavg()},
    }
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / f"index-scale-{n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n| vectors | dim | factory | shards | build s | driver peak MB | worker peak MB | nprobe | recall@10 | QPS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {n:,} | {d} | {factory} | {a.shards} | {b['build_s']:.0f} | {b['driver_peak_rss_mb']:.0f} "
              f"| {b['worker_peak_rss_mb']:.0f} | {r['nprobe']} | {r['recall_at_10']:.3f} | {r['qps']:.0f} |")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
