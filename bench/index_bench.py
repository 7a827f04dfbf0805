"""Benchmark: Ray Data embedding vs in-process encode, IVF vs Flat (build, QPS, recall@10), re-index vs rebuild.

    python bench/index_bench.py                                   # full: 100k and 1M vectors
    python bench/index_bench.py --sizes 20000 --embed-docs 500    # quick

Vectors are *clustered* synthetic data (Gaussian blobs around random unit centres, then normalised):
uniform random vectors in 256-d have no neighbourhood structure, so IVF recall on them says nothing
about real embeddings. Queries are perturbed corpus points. Writes bench/results/index.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def clustered(n: int, d: int, n_clusters: int, seed: int, noise: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    out = np.empty((n, d), np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        x = centers[rng.integers(0, n_clusters, m)] + (noise / np.sqrt(d) * 4) * rng.standard_normal((m, d))
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def queries_from(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), n, replace=False)] + 0.05 * rng.standard_normal((n, x.shape[1])).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def bench_embedding(n_docs: int, actors: int, batch_size: int, work: Path) -> dict:
    import ray

    from pipeline.index.embed import EmbedConfig, embed_to_parquet, read_embeddings
    from stages import LBRModel
    from stages.tiny import build_tiny_backbone, synthetic_corpus

    backbone = build_tiny_backbone(work / "backbone")
    model_dir = LBRModel.from_backbone(backbone).save_pretrained(work / "model")
    texts = synthetic_corpus(n_docs, seed=1)
    ids = [f"d{i:08d}" for i in range(n_docs)]
    model = LBRModel.from_pretrained(model_dir)
    model.encode(texts[:64], batch_size=batch_size)  # warm-up
    t = time.perf_counter()
    local = model.encode(texts, batch_size=batch_size)
    t_local = time.perf_counter() - t

    root = str(ROOT)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    cfg = EmbedConfig(batch_size=batch_size, num_actors=actors, num_cpus_per_actor=0.5, rows_per_block=512)
    embed_to_parquet(model_dir, ids[:64], texts[:64], work / "warm", cfg)  # actor start-up, imports
    t = time.perf_counter()
    emb = read_embeddings(embed_to_parquet(model_dir, ids, texts, work / "emb", cfg))
    t_ray = time.perf_counter() - t
    ray.shutdown()
    err = float(np.abs(emb.vectors - local).max())
    return {"docs": n_docs, "batch_size": batch_size, "ray_actors": actors, "embedding_dim": int(local.shape[1]),
            "in_process_s": t_local, "in_process_docs_per_s": n_docs / t_local,
            "ray_data_s": t_ray, "ray_data_docs_per_s": n_docs / t_ray, "max_abs_diff": err}


def _recall(got, exact_ids, k=10) -> float:
    return float(np.mean([len({h.id for h in g[:k]} & set(e[:k])) / k for g, e in zip(got, exact_ids)]))


def bench_index(n: int, d: int, n_queries: int, shards: int, nlist: int, nprobe: int, train_size: int,
                work: Path, noise: float, sweep: tuple[int, ...]) -> list[dict]:
    from pipeline.index.build import build_index
    from pipeline.index.search import Searcher
    from pipeline.index.shards import IndexConfig

    x = clustered(n, d, n_clusters=max(64, n // 1000), seed=n, noise=noise)
    q = queries_from(x, n_queries, seed=1)
    ids = [f"doc-{i}" for i in range(n)]
    hashes = [f"h{i}" for i in range(n)]
    model = {"path": "bench:synthetic", "fingerprint": "bench:synthetic"}
    rows, exact_ids = [], None
    for factory in ("Flat", f"IVF{nlist},Flat"):
        out = work / f"ix-{n}-{factory.replace(',', '_')}"
        t = time.perf_counter()
        build_index(out, ids, x, hashes, IndexConfig(factory=factory, shards=shards, nprobe=nprobe,
                                                     train_size=train_size, use_ray=False), model,
                    overwrite=True)
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        s = Searcher(out)
        t_open = time.perf_counter() - t
        s.search_vectors(q[:10], 10)
        t = time.perf_counter()
        got = s.search_vectors(q, 10)
        t_search = time.perf_counter() - t
        if exact_ids is None:
            exact_ids = [[h.id for h in g] for g in got]
        rows.append({"n": n, "dim": d, "noise": noise, "factory": factory, "shards": shards,
                     "nprobe": nprobe if factory != "Flat" else None, "build_s": t_build,
                     "open_verify_s": t_open, "queries": n_queries, "qps": n_queries / t_search,
                     "recall_at_10": _recall(got, exact_ids)})
        for p in (sweep if factory != "Flat" else ()):
            if p == nprobe:
                continue
            s.set_search_params(nprobe=p)
            t = time.perf_counter()
            got = s.search_vectors(q, 10)
            t_search = time.perf_counter() - t
            rows.append({**rows[-1], "nprobe": p, "qps": n_queries / t_search, "recall_at_10": _recall(got, exact_ids)})
        del s
        if factory == "Flat":
            shutil.rmtree(out)
    return rows


def bench_reindex(n: int, d: int, shards: int, nlist: int, frac: float, work: Path,
                  embed_docs_per_s: float | None) -> list[dict]:
    from pipeline.index.build import build_index
    from pipeline.index.reindex import reindex
    from pipeline.index.shards import IndexConfig, shard_of

    x = clustered(n, d, n_clusters=max(64, n // 1000), seed=7)
    ids = [f"doc-{i}" for i in range(n)]
    hashes = [f"h{i}" for i in range(n)]
    model = {"path": "bench:synthetic", "fingerprint": "bench:synthetic"}
    cfg = IndexConfig(factory=f"IVF{nlist},Flat", shards=shards, use_ray=False)
    out = work / "reindex"
    t = time.perf_counter()
    build_index(out, ids, x, hashes, cfg, model, overwrite=True)
    t_full = time.perf_counter() - t
    rng = np.random.default_rng(3)
    n_change = max(1, int(n * frac))
    res = []
    scenarios = {
        "1% random docs (touches every shard)": rng.choice(n, n_change, replace=False),
        "1% docs, all in shard 0": np.asarray([i for i in range(n) if shard_of(ids[i], shards) == 0][:n_change]),
    }
    new_x = clustered(n_change, d, 64, seed=11)
    for name, pick in scenarios.items():
        h = list(hashes)
        for j in pick:
            h[j] = f"changed-{j}"
        t = time.perf_counter()
        rep = reindex(out, ids, h, lambda todo: new_x[: len(todo)])
        t_re = time.perf_counter() - t
        row = {"scenario": name, "n": n, "changed": len(pick), "touched_shards": len(rep.touched_shards),
               "shards": shards, "reindex_s": t_re, "full_rebuild_s": t_full, "speedup": t_full / t_re}
        if embed_docs_per_s:
            row["with_embedding_est"] = {"reindex_s": t_re + len(pick) / embed_docs_per_s,
                                         "full_rebuild_s": t_full + n / embed_docs_per_s}
        res.append(row)
        # restore for the next scenario
        reindex(out, ids, hashes, lambda todo: x[[int(t.split("-")[1]) for t in todo]])
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated corpus sizes for IVF vs Flat")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--nprobe-sweep", default="1,4,64", help="extra nprobe values measured on the IVF index")
    p.add_argument("--noise", type=float, default=0.35, help="cluster spread (higher = harder)")
    p.add_argument("--hard-noise", type=float, default=0.6,
                   help="also run the smallest size with this spread (0 = skip)")
    p.add_argument("--train-size", type=int, default=100_000)
    p.add_argument("--embed-docs", type=int, default=20000, help="0 skips the embedding benchmark")
    p.add_argument("--embed-actors", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reindex-size", type=int, default=100_000, help="0 skips the re-index benchmark")
    p.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "index.json"))
    a = p.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(a.threads)
    work = Path(a.work or tempfile.mkdtemp(prefix="lbr-index-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "faiss": faiss.__version__, "faiss_threads": a.threads,
                                "gpus": faiss.get_num_gpus()},
                    "data": "clustered synthetic unit vectors (Gaussian blobs, n/1000 centres); "
                            "queries = corpus points + noise; recall@10 vs the exact sharded Flat result",
                    "args": vars(a)}
    try:
        if a.embed_docs:
            result["embedding"] = bench_embedding(a.embed_docs, a.embed_actors, a.batch_size, work / "embed")
            e = result["embedding"]
            print(f"\nEmbedding {e['docs']} docs (tiny model, dim {e['embedding_dim']}): in-process "
                  f"{e['in_process_docs_per_s']:.0f} docs/s, Ray Data ({e['ray_actors']} actors) "
                  f"{e['ray_data_docs_per_s']:.0f} docs/s, max |diff| {e['max_abs_diff']:.1e}")
        result["index"] = []
        sizes = [int(s) for s in a.sizes.split(",") if s]
        runs = [(n, a.noise) for n in sizes] + ([(min(sizes), a.hard_noise)] if a.hard_noise and sizes else [])
        sweep = tuple(int(s) for s in a.nprobe_sweep.split(",") if s)
        for n, noise in runs:
            nlist = int(2 ** round(np.log2(np.sqrt(n))))
            result["index"] += bench_index(n, a.dim, a.queries, a.shards, nlist, a.nprobe, a.train_size, work,
                                           noise, sweep)
            _dump(result, a.out)
        print(f"\n{'n':>9} {'noise':>5} {'factory':>16} {'nprobe':>6} {'build s':>8} {'open s':>7} {'QPS':>9} "
              f"{'recall@10':>9}")
        for r in result["index"]:
            print(f"{r['n']:>9} {r['noise']:>5} {r['factory']:>16} {r['nprobe'] or '-':>6} {r['build_s']:>8.2f} "
                  f"{r['open_verify_s']:>7.2f} {r['qps']:>9.0f} {r['recall_at_10']:>9.3f}")
        if a.reindex_size:
            nlist = int(2 ** round(np.log2(np.sqrt(a.reindex_size))))
            emb_rate = result.get("embedding", {}).get("ray_data_docs_per_s")
            result["reindex"] = bench_reindex(a.reindex_size, a.dim, a.shards, nlist, 0.01, work, emb_rate)
            print(f"\n{'scenario':>38} {'changed':>8} {'touched':>8} {'reindex s':>9} {'rebuild s':>9}")
            for r in result["reindex"]:
                print(f"{r['scenario']:>38} {r['changed']:>8} {r['touched_shards']:>8} {r['reindex_s']:>9.2f} "
                      f"{r['full_rebuild_s']:>9.2f}")
    finally:
        _dump(result, a.out)
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {a.out}")
    return 0


def _dump(result: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
