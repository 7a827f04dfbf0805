"""Ray Data in: training rows read, validated and tokenised inside Ray Data tasks, streamed to the workers.

The driver never holds the corpus. It lists the input files (a local path or any pyarrow filesystem URI:
file://, s3://, gs://, hdfs://, ...; nothing is copied down) and hands Ray Data one small row per file.
Each file is read by one Ray Data task, through the core readers' own code (`stages.readers`: the same
line/row iterators and record validators the in-process path uses), one line or Parquet row group at a
time. Parallelism is per file: split a large corpus into several files to read it on several CPUs.

Two passes over the data, both Ray Data tasks:
1. **check** (before Ray Train starts and before `--out` is touched): every record is validated; a task
   returns only its bad records and one count per file. Without `data.skip_bad_records` the first bad
   record seen fails the run with file, line (Parquet: row) and reason; with it, the driver streams the
   bad records into one part file per input file and concatenates them, in file order, into
   `quarantine.jsonl` (the same lines the core readers write), and counts them by reason for the report.
   The counts also give the usable row total (checked against batch_size x workers, reported as `rows`)
   and `data.max_records` (the first N usable rows in file order, as the in-process reader takes them).
2. **train**: the tasks read again with the same code (bad records dropped, they are already counted),
   tokenise in chunks of 256 rows and stream fixed-length int64 arrays to the workers through Ray Train's
   `streaming_split` (`get_dataset_shard`).

Shuffling, and what it guarantees: the order of the input files is shuffled once with `cfg.seed` (so a
grouped corpus split into files does not feed one group at a time), and each worker shuffles through a
local buffer of 1,024 rows seeded by seed, rank and epoch. Every epoch is one pass over every usable row,
split evenly across the workers. Rows are not shuffled globally: two rows further apart than the buffer
in the same file are never in one batch, and which blocks reach which worker depends on task timing, so
two runs with the same seed see the same files in the same order but not necessarily the same batches.
A BEIR folder as stage-2 data: queries and qrels (small) are read and validated in the driver, the
corpus (large) streams; each (query, relevant document) pair is produced by the task that reads the
document. Cross-file duplicate ids of a stage-1 corpus are not checked on this path (within a file
they are); ids play no part in training.
"""
from __future__ import annotations

import functools
import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.train.rows import encode_rows
from stages.readers import (
    BadRecordError,
    Quarantine,
    corpus_doc,
    iter_jsonl,
    iter_parquet_file,
    pair_row,
    qrels_doc_ids,
    read_beir_queries,
    read_qrels,
)
from stages.text import doc_text

CHUNK = 256            # rows tokenised (and sent) together by a read task
BLOCK_BYTES = 1 << 18  # Ray Data block size of the tokenised stream (see build_dataset)
SHUFFLE_BUFFER = 1024  # rows in each worker's local shuffle buffer


# ---------------------------------------------------------------------- where the data is
@dataclass(frozen=True)
class Source:
    """A training input as Ray Data reads it: a pyarrow filesystem and the files on it."""

    uri: str
    fs: object                     # pyarrow.fs.FileSystem (picklable: it travels to the tasks)
    prefix: str                    # shown before filesystem paths in messages ("" for local files)
    layout: str                    # "jsonl" | "parquet" | "beir" (stage 2 from a BEIR folder)
    root: str
    files: tuple[str, ...]         # read one per task (BEIR: corpus.jsonl)
    several: bool = False          # a Parquet folder of several files: id-less rows are "<relpath>:<row>"

    def show(self, path: str) -> str:
        return f"{self.prefix}{path}"


def open_source(data: str | Path, cfg: TrainConfig) -> Source:
    """List the input (no record is read). Missing paths and unknown layouts fail here, in the driver."""
    import pyarrow.fs as pafs

    s = str(data)
    if "://" in s:
        fs, root = pafs.FileSystem.from_uri(s)
        prefix = "" if s.startswith("file://") else s.split("://", 1)[0] + "://"
    else:
        fs, root = pafs.LocalFileSystem(), str(Path(s).resolve())
        prefix = ""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{s} does not exist")

    def exists(p: str) -> bool:
        return fs.get_file_info(p).type == pafs.FileType.File

    if info.type == pafs.FileType.Directory:
        corpus = f"{root.rstrip('/')}/corpus.jsonl"
        if exists(corpus):
            if cfg.stage == "contrastive" and exists(f"{root.rstrip('/')}/queries.jsonl"):
                qrels = f"{root.rstrip('/')}/qrels/{cfg.data.split}.tsv"
                if not exists(qrels):
                    raise FileNotFoundError(f"{s} is not a BEIR folder: missing {prefix}{qrels}")
                return Source(s, fs, prefix, "beir", root, (corpus,))
            return Source(s, fs, prefix, "jsonl", root, (corpus,))
        found = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                       if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
        if not found:
            raise ValueError(f"{s}: expected a JSONL/Parquet file, a Parquet folder or a BEIR folder")
        return Source(s, fs, prefix, "parquet", root, tuple(found), several=len(found) > 1)
    return Source(s, fs, prefix, "parquet" if root.endswith(".parquet") else "jsonl", root, (root,))


# ---------------------------------------------------------------------- one file's rows (runs in tasks)
class _Fatal(Exception):
    """Stops a check task at a record that fails the run (strict mode, or too few negatives)."""

    def __init__(self, file: str, line: int, reason: str):
        super().__init__(f"{file}:{line}: {reason}")
        self.file, self.line, self.reason = file, line, reason


class _Collect(Quarantine):
    """The quarantine of a check task: bad records kept (file shown as the user wrote it) for the driver."""

    def __init__(self, src: Source, strict: bool):
        super().__init__(skip=True)
        self.src, self.strict, self.items = src, strict, []

    def bad(self, file, line: int, reason: str, raw=None) -> None:
        shown = self.src.show(str(file))
        if self.strict:
            raise _Fatal(shown, line, reason)
        self.count += 1
        self.items.append((shown, line, reason, raw if isinstance(raw, (str, type(None))) else repr(raw)))


def _records(src: Source, path: str, q: Quarantine) -> Iterator[tuple[int, dict]]:
    if src.layout == "parquet":
        return iter_parquet_file(path, q, src.fs)
    return iter_jsonl(path, q, src.fs)


def file_rows(src: Source, cfg: TrainConfig, path: str, q: Quarantine, pairs: dict | None = None,
              found: set | None = None) -> Iterator[dict]:
    """The training rows of one input file, validated by the core readers' code (bad records go to `q`).

    generative: {"_id", "text"}; contrastive: {"query", "positive", "negatives"}. For a BEIR folder,
    `pairs` maps doc id -> relevant query texts, and every corpus id the qrels name is added to `found`.
    """
    d = cfg.data
    seen: set[str] = set()
    need = cfg.stage2.num_negatives if cfg.stage == "contrastive" else 0
    rel = path[len(src.root.rstrip("/")) + 1:] if src.several else ""
    for n, obj in _records(src, path, q):
        if src.layout == "beir" or cfg.stage == "generative":
            if src.layout == "beir" and "_id" not in obj:
                q.bad(path, n, "missing field: '_id'", obj)
                continue
            doc = corpus_doc(obj, path, n, q, None if src.layout == "beir" else d.text_field,
                             f"{rel}:{n}" if src.several else str(n))
            if doc is None:
                continue
            if doc["_id"] in seen:
                q.bad(path, n, f"duplicate id: '{doc['_id']}'", obj)
                continue
            seen.add(doc["_id"])
            if src.layout != "beir":
                yield {"_id": doc["_id"], "text": doc_text(doc)}
                continue
            if found is not None and doc["_id"] in pairs["named"]:
                found.add(doc["_id"])
            for query in pairs["rel"].get(doc["_id"], ()):
                yield {"query": query, "positive": doc_text(doc), "negatives": []}
            continue
        row = pair_row(obj, path, n, q, d.query_field, d.positive_field, d.negatives_field)
        if row is None:
            continue
        if len(row["negatives"]) < need:
            raise _Fatal(src.show(path), n, f"row has {len(row['negatives'])} negatives but "
                                            f"stage2.num_negatives={need}")
        yield row


def _check_files(batch, src: Source, cfg: TrainConfig, strict: bool, pairs: dict | None):
    """Check-pass task: per input file, its bad records (or the fatal one) and its usable row count."""
    import pyarrow as pa

    for unit, path in zip(batch["unit"].tolist(), batch["path"].tolist()):
        q = _Collect(src, strict)
        found: set[str] = set()
        ok, out = 0, []
        try:
            for _ in file_rows(src, cfg, path, q, pairs, found):
                ok += 1
                if len(q.items) >= 1024:
                    out += [("bad", unit, *it) for it in q.items]
                    q.items = []
                    yield _table(pa, out)
                    out = []
        except _Fatal as e:
            out.append(("fatal", unit, e.file, e.line, e.reason, None))
        out += [("bad", unit, *it) for it in q.items]
        out += [("found", unit, None, 0, None, did) for did in sorted(found)]
        out.append(("count", unit, None, ok, None, None))
        yield _table(pa, out)


def _table(pa, rows: list[tuple]):
    cols = ("kind", "unit", "file", "line", "reason", "record")
    return pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)},
                    schema=pa.schema([("kind", pa.string()), ("unit", pa.int64()), ("file", pa.string()),
                                      ("line", pa.int64()), ("reason", pa.string()), ("record", pa.string())]))


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    from stages.model import _prepare_tokenizer

    return _prepare_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))


def _train_files(batch, src: Source, cfg: TrainConfig, tokenizer_path: str, pairs: dict | None):
    """Train-pass task: the usable rows of each input file (capped), tokenised CHUNK rows at a time."""
    tok = _tokenizer(tokenizer_path)
    for path, cap in zip(batch["path"].tolist(), batch["cap"].tolist()):
        rows = []
        for sent, row in enumerate(file_rows(src, cfg, path, Quarantine(skip=True), pairs)):
            if 0 <= cap <= sent:
                break
            rows.append(row)
            if len(rows) == CHUNK:
                yield encode_rows(tok, rows, cfg, fixed=True)
                rows = []
        if rows:
            yield encode_rows(tok, rows, cfg, fixed=True)


# ---------------------------------------------------------------------- driver side
@dataclass
class Checked:
    """What the check pass found: usable rows per file, the bad-record summary, the quarantine (a temp
    file until `move_quarantine`), and for a BEIR folder the query texts per relevant document."""

    counts: list[int]
    bad: dict
    quarantine: Path | None
    pairs: dict | None = None
    caps: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(c if c >= 0 else n for c, n in zip(self.caps, self.counts))

    def move_quarantine(self, out: Path) -> dict:
        if self.quarantine is not None and self.quarantine.exists():
            shutil.move(str(self.quarantine), out / "quarantine.jsonl")
            return {**self.bad, "quarantine_file": str(out / "quarantine.jsonl")}
        return {**self.bad, "quarantine_file": None}


def _units(src: Source, order: list[int], caps: list[int] | None = None) -> list[dict]:
    return [{"unit": i, "path": src.files[i], "cap": -1 if caps is None else caps[i]} for i in order]


def _check_ds(src: Source, cfg: TrainConfig, strict: bool, pairs: dict | None):
    import ray.data

    units = _units(src, list(range(len(src.files))))
    return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _check_files, batch_size=1, batch_format="numpy", num_cpus=0.25,
        fn_kwargs={"src": src, "cfg": cfg, "strict": strict, "pairs": pairs})


def check_source(src: Source, cfg: TrainConfig) -> Checked:
    """The check pass (see the module docstring). Raises BadRecordError at the first bad record unless
    `data.skip_bad_records`; ValueError when too few usable rows remain."""
    d = cfg.data
    strict = not d.skip_bad_records
    pairs, qrels_path, queries_path = None, None, None
    if src.layout == "beir":
        base = src.root.rstrip("/")
        qrels_path, queries_path = f"{base}/qrels/{d.split}.tsv", f"{base}/queries.jsonl"
        pairs = {"named": qrels_doc_ids(qrels_path, src.fs), "rel": {}}
    parts = Path(tempfile.mkdtemp(prefix="lbr-quarantine-"))
    counts = [0] * len(src.files)
    reasons: dict[str, int] = {}
    found: set[str] = set()
    n_bad = 0
    qfile: Path | None = None
    try:
        for batch in _check_ds(src, cfg, strict, pairs).iter_batches(batch_format="pyarrow", batch_size=None):
            lines: dict[int, list[str]] = {}
            for r in batch.to_pylist():
                if r["kind"] == "fatal":
                    raise BadRecordError(r["file"], r["line"], r["reason"])
                if r["kind"] == "count":
                    counts[r["unit"]] = r["line"]
                elif r["kind"] == "found":
                    found.add(r["record"])
                elif r["kind"] == "bad":
                    n_bad += 1
                    kind = r["reason"].split(":")[0]
                    reasons[kind] = reasons.get(kind, 0) + 1
                    lines.setdefault(r["unit"], []).append(json.dumps(
                        {"file": r["file"], "line": r["line"], "reason": r["reason"], "record": r["record"]}) + "\n")
            for unit, ls in lines.items():             # one part per input file, in arrival order within it
                with open(parts / f"{unit}.jsonl", "a") as f:
                    f.writelines(ls)
        fd, qtmp = tempfile.mkstemp(prefix="lbr-quarantine-", suffix=".jsonl")
        qfile = Path(qtmp)
        with open(fd, "w") as out:
            for i in range(len(src.files)):
                if (parts / f"{i}.jsonl").exists():
                    with open(parts / f"{i}.jsonl") as part:
                        shutil.copyfileobj(part, out)
            if src.layout == "beir":
                # queries and qrels after the corpus, as read_beir validates them (same functions)
                q = _DriverQuarantine(skip=not strict, out=out, reasons=reasons)
                queries = read_beir_queries(queries_path, q, src.fs)
                qrels = read_qrels(qrels_path, q, found, queries, src.fs)
                n_bad += q.count
                pairs = {"named": set(), "rel": {}}
                for qid, rel in qrels.items():
                    for did, grade in rel.items():
                        if grade >= 1:
                            pairs["rel"].setdefault(did, []).append(queries[qid])
        if n_bad == 0:
            qfile.unlink()
            qfile = None
    except BaseException:
        if qfile is not None:                   # a failed check leaves no quarantine file behind
            qfile.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    if src.layout == "beir":
        # pairs per document come from the qrels: the corpus pass counted documents, not pairs
        counts = _beir_counts(src, cfg, pairs)
    caps = _caps(counts, d.max_records)
    checked = Checked(counts, {"bad_records": n_bad, "by_reason": dict(sorted(reasons.items()))}, qfile, pairs, caps)
    if checked.rows < cfg.batch_size * cfg.workers:
        if qfile is not None:
            qfile.unlink(missing_ok=True)
        raise ValueError(f"{src.uri}: {checked.rows} usable rows, fewer than batch_size x workers = "
                         f"{cfg.batch_size * cfg.workers}")
    return checked


class _DriverQuarantine(Quarantine):
    """Quarantine for the BEIR queries/qrels read in the driver: appends to the open quarantine file."""

    def __init__(self, skip: bool, out, reasons: dict):
        super().__init__(skip=skip)
        self.out, self.all_reasons = out, reasons

    def bad(self, file, line: int, reason: str, raw=None) -> None:
        super().bad(file, line, reason, raw)
        kind = reason.split(":")[0]
        self.all_reasons[kind] = self.all_reasons.get(kind, 0) + 1
        self.out.write(json.dumps({"file": str(file), "line": line, "reason": reason,
                                   "record": raw if isinstance(raw, (str, type(None))) else repr(raw)}) + "\n")


def _beir_counts(src: Source, cfg: TrainConfig, pairs: dict) -> list[int]:
    # one corpus file: its pair count is the number of (relevant doc, query) pairs whose doc it holds
    return [sum(len(v) for v in pairs["rel"].values())]


def _caps(counts: list[int], max_records: int | None) -> list[int]:
    """Per-file row caps giving the first `max_records` usable rows in file order (-1: no cap)."""
    if max_records is None:
        return [-1] * len(counts)
    caps, left = [], max_records
    for c in counts:
        caps.append(min(c, left))
        left -= caps[-1]
    return caps


def rows_needed(cfg: TrainConfig) -> int:
    """Rows a run consumes if it ends inside the first epoch: every worker's cfg.steps optimizer steps of
    grad_accum batches, plus its local shuffle buffer and one tokenised chunk of slack for the even split."""
    per_worker = cfg.steps * cfg.optim.grad_accum * cfg.batch_size + SHUFFLE_BUFFER + CHUNK
    return per_worker * cfg.workers


def tokenizer_path_of(model_path: str | Path) -> str:
    p = Path(model_path)
    return str(p / "tokenizer") if (p / "tokenizer").exists() else str(p)


def build_dataset(cfg: TrainConfig, src: Source, checked: Checked, model_path: str | Path):
    """The train pass: a Ray dataset of tokenised rows, read file by file in a seeded file order."""
    import ray.data

    order = [i for i in range(len(src.files)) if checked.caps[i] != 0]
    random.Random(cfg.seed).shuffle(order)
    units = _units(src, order, checked.caps)
    ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _train_files, batch_size=1, batch_format="numpy", num_cpus=0.25,
        fn_kwargs={"src": src, "cfg": cfg, "tokenizer_path": tokenizer_path_of(model_path),
                   "pairs": checked.pairs})
    need = rows_needed(cfg)
    if need < checked.rows:
        # the run ends inside the first epoch: read and tokenise only what the workers will consume (their
        # batches plus what their shuffle buffers hold), not the rest of the corpus on the training CPUs
        ds = ds.limit(need)
    # a task's yields are buffered into blocks of up to target_max_block_size (128 MB by default) before
    # they leave the task: the first batch would wait for a whole file. 256 KB blocks stream a few chunks at a time.
    ds.context.target_max_block_size = BLOCK_BYTES
    return ds


def shard_source(shard, batch_size: int, seed: int = 0, shuffle_buffer: int = SHUFFLE_BUFFER):
    """BatchSource over a worker's dataset shard: full batches only, a fresh pass per epoch.

    Ray Train splits with equal=True, so every worker sees the same number of rows and, with
    drop_last, the same number of batches; a short batch mid-stream would still be skipped here
    rather than desynchronise the collectives.
    """
    def source(epoch: int):
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, dtypes=None,
                                              local_shuffle_buffer_size=shuffle_buffer or None,
                                              local_shuffle_seed=seed * 1009 + epoch):
            if len(next(iter(batch.values()))) == batch_size:
                yield batch
    return source


_END = object()


def prefetched(source, epoch: int = 0):
    """`source`, with the pass of `epoch` started now in a thread that fetches its first batch.

    Why: a Ray Train worker's first batch waits for Ray Data to start its read/tokenise tasks (new
    worker processes; ~15 s measured on 2 cores), while the worker itself loads the model and starts
    DeepSpeed (~13 s). Started first, the two overlap. Only the first call for `epoch` is served from
    the prefetch; every other call (later epochs, a second pass) goes to `source` as before, so batch
    order is unchanged.
    """
    import threading

    box: dict = {}

    def run() -> None:
        try:
            it = iter(source(epoch))
            box["first"] = next(it, _END)
            box["it"] = it
        except Exception as e:  # noqa: BLE001 - re-raised in the training thread
            box["err"] = e

    thread = threading.Thread(target=run, name="lbr-first-batch", daemon=True)
    thread.start()

    def wrapped(e: int):
        if e != epoch or box.get("used"):
            yield from source(e)
            return
        box["used"] = True
        thread.join()
        if "err" in box:
            raise box["err"]
        if box["first"] is _END:
            return
        yield box["first"]
        yield from box["it"]
    return wrapped
