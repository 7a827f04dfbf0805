"""Training input on the Ray path streams (issue 10): every layout is read, validated and tokenised in Ray
Data tasks, from local paths and file:// URIs, and gives exactly the rows, errors and quarantine of the
core readers (the in-process path) — one bad-record rule."""
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_train_config
from pipeline.train.rows import encode_rows, read_rows
from pipeline.train.stream import build_dataset, check_source, open_source
from stages.readers import BadRecordError
from stages.synthetic import synthetic_retrieval

pytestmark = pytest.mark.timeout(900)

DATA = synthetic_retrieval(n_docs=48, n_train=48)
DOCS = [{"_id": k, "text": v["text"]} for k, v in DATA["corpus"].items()]
PAIRS = [{"query": q, "positive": DATA["corpus"][d]["text"], "negatives": [DOCS[i % 7]["text"], DOCS[i % 5]["text"]]}
         for i, (q, d) in enumerate(DATA["train"])]
BAD_JSONL = ['{broken', '{"_id": "x1"}', '{"_id": "x2", "text": "  "}', '[1, 2]']


def _jsonl(path: Path, rows: list[dict], bad: list[str] = (), gz: bool = False) -> Path:
    lines = [json.dumps(r) for r in rows]
    for i, b in enumerate(bad):                      # bad lines spread through the file
        lines.insert(min(len(lines), 5 + 9 * i), b)
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _parquet_folder(folder: Path, rows: list[dict], parts: int = 3, id_less: bool = False) -> Path:
    folder.mkdir(parents=True)
    for p in range(parts):
        chunk = rows[p::parts]
        if id_less:
            chunk = [{k: v for k, v in r.items() if k != "_id"} for r in chunk]
        chunk = chunk + [{"text": None}]             # one bad row (missing text) per file
        pq.write_table(pa.Table.from_pylist(chunk), folder / f"part-{p}.parquet", row_group_size=7)
    return folder


def _beir(folder: Path, bad_qrel: bool = False) -> Path:
    (folder / "qrels").mkdir(parents=True)
    _jsonl(folder / "corpus.jsonl", [{**d, "title": ""} for d in DOCS], bad=BAD_JSONL[:1])
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n" for i, (q, _) in enumerate(DATA["train"])))
    lines = [f"q{i}\t{d}\t1" for i, (_, d) in enumerate(DATA["train"])]
    if bad_qrel:
        lines.insert(3, "q1\tnot-a-doc\t1")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(lines) + "\n")
    return folder


def _cfg(stage: str, *extra: str):
    return load_train_config(None, [f"stage={stage}", "batch_size=4", "stage1.context_len=16", "stage1.target_len=8",
                                    "stage2.query_len=16", "stage2.doc_len=16", *extra])


def _token_rows(arrays: dict) -> list[tuple]:
    keys = sorted(arrays)
    return sorted(tuple(np.asarray(arrays[k][i]).ravel().tolist() for k in keys) for i in range(len(arrays[keys[0]])))


def _streamed(cfg, data, model) -> tuple[list[tuple], object]:
    src = open_source(data, cfg)
    checked = check_source(src, cfg)
    batches = list(build_dataset(cfg, src, checked, model).iter_batches(batch_format="numpy", batch_size=None))
    arrays = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return _token_rows(arrays), checked


LAYOUTS = {
    "jsonl": lambda t: ("generative", _jsonl(t / "c.jsonl", DOCS, BAD_JSONL)),
    "jsonl.gz": lambda t: ("generative", _jsonl(t / "c.jsonl.gz", DOCS, BAD_JSONL, gz=True)),
    "parquet folder, id-less rows": lambda t: ("generative", _parquet_folder(t / "pq", DOCS, id_less=True)),
    "beir corpus (stage 1)": lambda t: ("generative", _beir(t / "beir")),
    "pairs jsonl with negatives": lambda t: ("contrastive", _jsonl(t / "p.jsonl", PAIRS, BAD_JSONL[:2])),
    "pairs parquet": lambda t: ("contrastive", _parquet_folder(t / "pp", PAIRS, parts=1)),
    "beir folder (stage 2)": lambda t: ("contrastive", _beir(t / "beir", bad_qrel=True)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_streamed_rows_errors_and_quarantine_equal_the_core_readers(ray_session, tiny_backbone, tmp_path, layout):
    from transformers import AutoTokenizer

    from stages.model import _prepare_tokenizer

    stage, data = LAYOUTS[layout](tmp_path)
    negs = ["stage2.num_negatives=2"] if "negatives" in layout else []
    tok = _prepare_tokenizer(AutoTokenizer.from_pretrained(str(tiny_backbone), local_files_only=True))
    # strict: the first bad record fails the run, named by file, line and reason, exactly as the core reader
    strict = _cfg(stage, *negs)
    with pytest.raises(BadRecordError) as core_err:
        read_rows(strict, data)
    with pytest.raises(BadRecordError) as ray_err:
        check_source(open_source(data, strict), strict)
    assert str(ray_err.value) == str(core_err.value)
    # skip_bad_records: the same rows (tokenised in the tasks) and the same quarantine, in the same order
    cfg = _cfg(stage, *negs, "data.skip_bad_records=true")
    q_core = tmp_path / "core-quarantine.jsonl"
    rows, bad = read_rows(cfg, data, quarantine=q_core)
    got, checked = _streamed(cfg, data, tiny_backbone)
    assert got == _token_rows(encode_rows(tok, rows, cfg, fixed=True))
    assert checked.rows == len(rows)
    assert checked.bad["bad_records"] == bad["bad_records"] > 0
    assert checked.bad["by_reason"] == bad["by_reason"]
    assert checked.quarantine.read_text() == q_core.read_text()
    checked.quarantine.unlink()
    # and from a file:// URI (read through pyarrow.fs by the tasks, nothing copied)
    got_uri, checked_uri = _streamed(cfg, f"file://{data}", tiny_backbone)
    assert got_uri == got and checked_uri.quarantine.read_text() == q_core.read_text()


def test_max_records_takes_the_first_rows_in_file_order(ray_session, tiny_backbone, tmp_path):
    data = _parquet_folder(tmp_path / "pq", DOCS, parts=3)
    cfg = _cfg("generative", "data.skip_bad_records=true", "data.max_records=20")
    rows, _ = read_rows(cfg, data)
    got, checked = _streamed(cfg, data, tiny_backbone)
    assert checked.rows == len(rows) == 20
    from transformers import AutoTokenizer

    from stages.model import _prepare_tokenizer

    tok = _prepare_tokenizer(AutoTokenizer.from_pretrained(str(tiny_backbone), local_files_only=True))
    assert got == _token_rows(encode_rows(tok, rows, cfg, fixed=True))


def test_too_few_negatives_and_missing_input_fail_with_the_location(ray_session, tmp_path):
    short = _jsonl(tmp_path / "p.jsonl", PAIRS[:5] + [{**PAIRS[5], "negatives": ["only one"]}] + PAIRS[6:])
    cfg = _cfg("contrastive", "stage2.num_negatives=2", "data.skip_bad_records=true")
    with pytest.raises(ValueError, match=r"p\.jsonl:6: row has 1 negatives but stage2.num_negatives=2"):
        check_source(open_source(short, cfg), cfg)
    with pytest.raises(FileNotFoundError, match="nope.parquet does not exist"):
        open_source(f"file://{tmp_path}/nope.parquet", cfg)
    few = _jsonl(tmp_path / "few.jsonl", DOCS[:3])
    with pytest.raises(ValueError, match="3 usable rows, fewer than batch_size x workers = 4"):
        check_source(open_source(few, _cfg("generative")), _cfg("generative"))


# `python -m jobs.train --data file:///.../corpus.parquet` on the Ray path (the driver never opens the file,
# quarantine and report) is checked inside tests/test_distributed.py's both-stages run: one Ray Train
# start-up instead of two (each costs ~45 s of the 15-minute suite).


def test_prefetched_source_keeps_the_batch_order_and_reraises_errors():
    """stream.prefetched starts epoch 0 early (the Ray worker's first batch overlaps model/engine start);
    what the loop sees must be exactly the plain source's batches, and a failing read fails the run."""
    import threading

    from pipeline.train.stream import prefetched

    started = threading.Event()
    calls = []

    def source(epoch):
        calls.append(epoch)
        started.set()
        yield from ({"x": epoch * 10 + i} for i in range(3))

    src = prefetched(source)
    assert started.wait(5), "the first pass must start before the loop asks for it"
    assert list(src(0)) == [{"x": 0}, {"x": 1}, {"x": 2}]
    assert list(src(1)) == [{"x": 10}, {"x": 11}, {"x": 12}]
    assert list(src(0)) == [{"x": 0}, {"x": 1}, {"x": 2}]          # a second pass of epoch 0 reads again
    assert calls == [0, 1, 0]

    def broken(epoch):
        raise OSError("s3 read failed: part-3.parquet")
        yield

    with pytest.raises(OSError, match="part-3.parquet"):
        list(prefetched(broken)(0))
    assert list(prefetched(lambda e: iter(()))(0)) == []


def test_loop_logs_the_seconds_it_waited_for_input(tiny_backbone):
    """`data_s` in every metrics record: the time the interval spent waiting on the input source, so an
    input-bound run (a slow Ray Data pipeline) is told apart from a slow model."""
    import time

    from pipeline.train.engines import TorchEngine
    from pipeline.train.loop import train_loop
    from stages import LBRModel
    from stages.objectives import stage2_arrays

    model = LBRModel.from_backbone(tiny_backbone, num_bottleneck=2)
    cfg = load_train_config(None, ["stage=contrastive", "steps=4", "batch_size=4", "log_every=2"])

    def source(epoch):
        for s in range(0, len(PAIRS) - 3, 4):
            time.sleep(0.25 if s >= 8 else 0.0)           # the second logged interval is input-bound
            r = PAIRS[s: s + 4]
            yield stage2_arrays(model.tokenizer, [x["query"] for x in r], [x["positive"] for x in r], None,
                                cfg.stage2, fixed=True)

    recs = []
    train_loop(model, TorchEngine(model, cfg.optim, cfg.steps, cfg.micro_steps()), source, cfg, log=recs.append)
    assert [r["step"] for r in recs] == [2, 4]
    assert recs[0]["data_s"] < 0.2 and 0.5 <= recs[1]["data_s"] < 1.0    # 2 batches x 0.25 s
