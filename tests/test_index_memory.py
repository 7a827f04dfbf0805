"""The driver never gathers the corpus while indexing it (issue 10, must-have 3, indexing part).

`build_from_corpus` (what `jobs.build_index` runs) indexes a generated Parquet corpus with the `hashing:`
encoder while a thread samples the driver's resident memory every 10 ms. The corpus is CORPUS_TEXT_MB
of text and, embedded, CORPUS_VECTORS_MB of vectors (each 4x DRIVER_GROWTH_MB); the driver's peak growth
over its level just before the build must stay under DRIVER_GROWTH_MB. The previous code (read the corpus
into a list, gather every vector in one array, split it into shards in the driver) grew it by ~6x the
vectors: this test fails on it (numbers in the README).
"""

import pytest
from _rss import PeakRSS

pytestmark = pytest.mark.timeout(600)

N_DOCS = 68_000
DIM = 256
DRIVER_GROWTH_MB = 16
CORPUS_TEXT_MB = 68        # ~1 KB of text per document
CORPUS_VECTORS_MB = N_DOCS * DIM * 4 // 2**20


def _write_corpus(folder, n, files=4):
    """A folder of `files` uncompressed Parquet files (bytes on disk ~ bytes of text), ~1 KB per document in
    ~20 long words (cheap for the hashing encoder)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    per = (n + files - 1) // files
    for f in range(files):
        ids = range(f * per, min(n, (f + 1) * per))
        pq.write_table(pa.table({"_id": [f"d{i}" for i in ids], "text": [_text(i) for i in ids]}),
                       folder / f"part-{f}.parquet", compression="none", use_dictionary=False)


WORDS = [f"{'abcdefghij'[j % 10]}{j:05d}" * 9 for j in range(5000)]


def _text(i):
    return " ".join(WORDS[(i * 7 + k * 131) % 5000] for k in range(19)) + f" n{i}"


def _build(corpus, out, shards=8):
    from pipeline.index.build import build_from_corpus
    from pipeline.index.embed import EmbedConfig
    from pipeline.index.shards import IndexConfig

    return build_from_corpus(f"hashing:{DIM}", corpus, out, IndexConfig(factory="Flat", shards=shards, use_ray=True),
                             EmbedConfig(batch_size=256, num_actors=2, rows_per_block=4096))


def test_driver_memory_stays_bounded_while_indexing_a_corpus_4x_larger(ray_session, tmp_path):
    from pipeline.index.search import Searcher

    corpus = tmp_path / "corpus"
    _write_corpus(corpus, N_DOCS)
    text_mb = sum(p.stat().st_size for p in corpus.iterdir()) / 2**20
    assert text_mb >= 4 * DRIVER_GROWTH_MB and CORPUS_VECTORS_MB >= 4 * DRIVER_GROWTH_MB
    # warm the driver's one-off allocations (imports, Ray Data's executor, FAISS) on a small build first,
    # so the measured build's growth is what it does with the data
    small = tmp_path / "small"
    _write_corpus(small, 2000, files=1)
    _build(small, tmp_path / "ix-small")
    rss = PeakRSS()
    rss.start()
    try:
        m = _build(corpus, tmp_path / "ix")
    finally:
        rss.stop.set()
        rss.join()
    print(f"\ndriver peak growth {rss.growth_mb:.1f} MB while indexing {N_DOCS} docs: {text_mb:.0f} MB of text, "
          f"{CORPUS_VECTORS_MB} MB of vectors (bound {DRIVER_GROWTH_MB} MB)")
    assert m["num_docs"] == N_DOCS and sum(s["count"] for s in m["shards"]) == N_DOCS
    assert rss.growth_mb < DRIVER_GROWTH_MB, (
        f"driver grew by {rss.growth_mb:.0f} MB indexing {text_mb:.0f} MB of text / {CORPUS_VECTORS_MB} MB of "
        f"vectors: the corpus is being gathered in the driver")
    assert Searcher(tmp_path / "ix").search([_text(123)], 1)[0][0].id == "d123"
