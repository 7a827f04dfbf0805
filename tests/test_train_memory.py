"""The driver never gathers the training corpus (issue 10, must-have 3): a Ray Train run on a generated
corpus several times larger than a stated bound on the driver's memory growth.

The driver's resident memory is sampled every 10 ms while `run_ray` checks the corpus, trains 2 steps
and exports the model; its peak growth over the level just before the run must stay under
DRIVER_GROWTH_MB while the corpus is CORPUS_MB (4x that). Reading the rows into the driver (the old
`from_items` path) grows it by more than the corpus itself.
"""
import time
from pathlib import Path

import pytest
from _rss import PeakRSS

from pipeline.config import load_train_config

pytestmark = pytest.mark.timeout(600)

CORPUS_MB = 64
DRIVER_GROWTH_MB = 16


def _write_corpus(folder: Path, mb: int, files: int = 2) -> int:
    """A Parquet folder of `files` files (uncompressed, so bytes on disk ~ bytes of text) of ~1 KB distinct
    documents, `mb` MB in all; returns the document count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    words = [f"w{i:04d}" for i in range(4000)]
    bases = [" ".join(words[(b * 7 + k * 13) % 4000] for k in range(170)) for b in range(101)]
    n, per_file = 0, mb * 1024 * 1024 // files
    for f in range(files):
        with pq.ParquetWriter(folder / f"part-{f}.parquet", pa.schema([("_id", pa.string()), ("text", pa.string())]),
                              compression="none", use_dictionary=False) as w:
            size = 0
            while size < per_file:
                ids, texts = [], []
                for _ in range(2000):
                    texts.append(f"{bases[n % 101]} n{n}")
                    ids.append(f"d{n}")
                    n += 1
                w.write_table(pa.table({"_id": ids, "text": texts}))
                size += sum(map(len, texts))
    return n


def test_driver_memory_stays_bounded_while_training_on_a_corpus_4x_larger(ray_session, tiny_backbone, tmp_path):
    from pipeline.train.ray_runner import run_ray

    corpus = tmp_path / "corpus"
    n_docs = _write_corpus(corpus, CORPUS_MB)
    size_mb = sum(p.stat().st_size for p in corpus.iterdir()) / 2**20
    assert size_mb >= 4 * DRIVER_GROWTH_MB
    cfg = load_train_config(None, ["stage=generative", "steps=2", "workers=1", "batch_size=4", "log_every=1",
                                   "model.num_bottleneck=2", "stage1.context_len=16", "stage1.target_len=8"])
    # the driver's one-off allocations (imports, a model load, a Ray Data executor) happen before the
    # measurement, so the measured growth is what the run does with the data
    import deepspeed.utils.zero_to_fp32  # noqa: F401  (the export's import)
    import ray.train.torch  # noqa: F401

    from pipeline.train.start_model import prepare_model
    from pipeline.train.stream import check_source, open_source

    prepare_model(cfg, tiny_backbone)
    check_source(open_source(corpus / "part-0.parquet", cfg), cfg)
    mon = PeakRSS()
    mon.start()
    t0 = time.time()
    try:
        report = run_ray(cfg, tiny_backbone, corpus, tmp_path / "run", max_failures=0)
    finally:
        mon.stop.set()
        mon.join()
    print(f"\ncorpus {size_mb:.0f} MB ({n_docs} docs): driver peak RSS growth {mon.growth_mb:.1f} MB "
          f"(bound {DRIVER_GROWTH_MB} MB), run {time.time() - t0:.1f}s")
    assert report["rows"] == n_docs                 # every record was read and checked (in Ray Data tasks)
    assert report["final"]["step"] == 2
    assert mon.growth_mb < DRIVER_GROWTH_MB, (
        f"driver grew by {mon.growth_mb:.0f} MB on a {size_mb:.0f} MB corpus: it gathers the data")
