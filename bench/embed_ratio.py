"""Benchmark: Ray Data embedding with the real model vs the raw in-process loop, same corpus, one process.

    python bench/embed_ratio.py                                   # SmolLM2 (full depth), MedQuAD dev corpus
    python bench/embed_ratio.py --max-docs 64 --layers 2          # a quick check that it runs

In-process: `LBRModel.encode` over the whole corpus in this process (torch on --cpus threads). Ray:
`pipeline.index.stage.stage_corpus` — what `jobs.build_index` runs — reading the same corpus file in Ray
Data tasks, embedding in an actor pool (--actors actors x --cpus/--actors CPUs each, the model loaded
once per actor, torch on that many threads) and writing the Parquet partitions. The Ray time is the whole
call: actor start-up and model loads included (a warm-up call first pays Ray's one-off worker start and
imports). Target (issue 10): Ray >= 0.9x the in-process docs/s.

Timings taken on a loaded machine mean nothing: the load average is printed and stored, and the run
stops (unless --allow-load) when the 1-minute load is above --max-load. Writes
bench/results/embed-ratio.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import proc_cpu

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "medical" / "medquad" / "dev" / "corpus.jsonl"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="smollm2")
    p.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (default: all)")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="JSONL/Parquet/BEIR corpus")
    p.add_argument("--max-docs", type=int, default=None, help="use the first N documents (written to a temp JSONL)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--rows-per-block", type=int, default=64, help="Ray Data block size (spreads work over actors)")
    p.add_argument("--max-load", type=float, default=0.5)
    p.add_argument("--allow-load", action="store_true", help="measure even on a loaded machine (result marked)")
    p.add_argument("--work", default=None, help="folder for the model copy (default: a temp folder)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "embed-ratio.json"))
    a = p.parse_args(argv)

    load = os.getloadavg()
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores", flush=True)
    loaded = load[0] > a.max_load
    if loaded and not a.allow_load:
        sys.exit(f"refusing to measure: 1-minute load {load[0]:.2f} > --max-load {a.max_load} "
                 "(other jobs would skew both timings); rerun when the machine is idle or pass --allow-load")

    import torch

    from pipeline.cluster import ensure_ray
    from pipeline.index.embed import ACTOR_CALL_BATCHES, EmbedConfig, embed_texts_local, load_encoder
    from pipeline.index.stage import count_rows, shard_files, stage_corpus
    from stages import LBRModel
    from stages.backbone import resolve_backbone
    from stages.readers import read_corpus
    from stages.text import doc_text

    work = Path(a.work or tempfile.mkdtemp(prefix="lbr-embed-ratio-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"model-{a.backbone}-{a.layers or 'all'}-{a.max_length}"
    if not (model_dir / "lbr_config.json").exists():
        LBRModel.from_backbone(resolve_backbone(a.backbone), num_bottleneck=8, max_length=a.max_length,
                               num_layers=a.layers).save_pretrained(model_dir)
    corpus = Path(a.corpus)
    docs = read_corpus(corpus)
    if a.max_docs:
        docs = docs[: a.max_docs]
        corpus = work / f"corpus-{a.max_docs}.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    texts = [doc_text(d) for d in docs]
    n = len(texts)

    # in-process: one encoder, one loop, all cores
    torch.set_num_threads(a.cpus)
    enc = load_encoder(model_dir)
    embed_texts_local(enc, texts[: a.batch_size], a.batch_size)     # warm-up (allocator, kernels)
    t = time.perf_counter()
    local = embed_texts_local(enc, texts, a.batch_size)
    t_local = time.perf_counter() - t
    del enc

    # Ray Data: read tasks -> actor pool -> Parquet partitions; the whole call is timed
    # one logical CPU beyond the cores: the actors hold all --cpus, and Ray Data's light read (0.25 CPU) and
    # write tasks need a slot beside them, or the pipeline waits forever (STACK-NOTES: the ListFiles trap)
    ensure_ray(num_cpus=a.cpus + 1)
    cfg = EmbedConfig(batch_size=a.batch_size, num_actors=a.actors, num_cpus_per_actor=a.cpus / a.actors,
                      rows_per_block=a.rows_per_block)
    warm = work / "warm.jsonl"
    warm.write_text("".join(json.dumps(d) + "\n" for d in docs[: a.batch_size]))
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        stage_corpus(warm, Path(tmp) / "warm", 1, str(model_dir), cfg, use_ray=True)
        before = proc_cpu.snapshot()
        t = time.perf_counter()
        stage = stage_corpus(corpus, Path(tmp) / "emb", 1, str(model_dir), cfg, use_ray=True,
                             dim=local.shape[1])
        t_ray = time.perf_counter() - t
        ray_cpu = proc_cpu.cpu_delta(before, proc_cpu.snapshot())
        got = count_rows(shard_files(stage, 0))
    if got != n:
        sys.exit(f"Ray path embedded {got} documents, expected {n}")
    row = {"benchmark": "embed_ratio", "backbone": a.backbone, "layers": a.layers, "max_length": a.max_length,
           "corpus": str(a.corpus), "docs": n, "batch_size": a.batch_size, "cpus": a.cpus, "actors": a.actors,
           "rows_per_block": a.rows_per_block, "actor_call_rows": a.batch_size * ACTOR_CALL_BATCHES,
           "embedding_dim": int(local.shape[1]),
           "in_process_s": t_local, "in_process_docs_per_s": n / t_local,
           "ray_data_s": t_ray, "ray_data_docs_per_s": n / t_ray, "ratio": t_local / t_ray,
           "ray_phase_cpu_s_by_process": ray_cpu,
           "load_avg_at_start": load, "load_avg_at_end": os.getloadavg(), "loaded": loaded,
           "python": platform.python_version(), "torch": torch.__version__}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1) + "\n")
    print("| docs | in-process docs/s | Ray Data docs/s | ratio | load (start) |")
    print("|---|---|---|---|---|")
    print(f"| {n} | {row['in_process_docs_per_s']:.1f} | {row['ray_data_docs_per_s']:.1f} | {row['ratio']:.2f} "
          f"| {load[0]:.2f}{' (LOADED: not a measurement)' if loaded else ''} |")
    print(f"CPU seconds by process during the Ray call ({t_ray:.0f} s wall, {a.cpus} cores = "
          f"{t_ray * (os.cpu_count() or 1):.0f} CPU s): " + ", ".join(f"{r['process']} {r['cpu_s']}" for r in ray_cpu))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
