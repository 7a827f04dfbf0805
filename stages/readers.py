"""Plain-Python readers: BEIR folders, JSONL/Parquet text corpora, (query, positive, negatives) rows.

Why strict: a bad record (invalid JSON, missing/empty field, wrong type, duplicate id, a qrel naming an
unknown document or query) stops the read with an error naming file, line and reason. With
`skip_bad_records=True` it is counted and written to a quarantine JSONL file with the reason instead.
Nothing is dropped silently. Ray Data wraps these functions; it does not re-implement them.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.text import doc_text


class BadRecordError(ValueError):
    def __init__(self, file: str | os.PathLike, line: int, reason: str):
        self.file, self.line, self.reason = str(file), line, reason
        super().__init__(f"{file}:{line}: {reason}")


@dataclass
class Quarantine:
    """Collects bad records. `path=None` with skip=False means: raise on the first one."""

    skip: bool = False
    path: Path | None = None
    count: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    _started: bool = field(default=False, repr=False)

    def bad(self, file, line: int, reason: str, raw: Any = None) -> None:
        if not self.skip:
            raise BadRecordError(file, line, reason)
        self.count += 1
        kind = reason.split(":")[0]
        self.reasons[kind] = self.reasons.get(kind, 0) + 1
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # the first bad record of this reader replaces an earlier run's file: re-running a run
            # must not append to (and double) the previous quarantine
            mode = "a" if self._started else "w"
            self._started = True
            with open(self.path, mode) as f:
                f.write(json.dumps({"file": str(file), "line": line, "reason": reason,
                                    "record": raw if isinstance(raw, (str, type(None))) else repr(raw)}) + "\n")

    def summary(self) -> dict:
        return {"bad_records": self.count, "by_reason": dict(sorted(self.reasons.items())),
                "quarantine_file": str(self.path) if self.path else None}


def make_quarantine(skip_bad_records: bool, quarantine: str | os.PathLike | Quarantine | None) -> Quarantine:
    if isinstance(quarantine, Quarantine):
        return quarantine
    return Quarantine(skip=skip_bad_records, path=Path(quarantine) if quarantine else None)


class _ArrowRaw(io.RawIOBase):
    """A pyarrow input stream as a raw Python file (pyarrow streams have no readline)."""

    def __init__(self, stream):
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.stream.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stream.close()
        super().close()


def open_binary(path: str | os.PathLike, fs=None):
    """A buffered binary file: a local path, or a path on a pyarrow filesystem (s3://, gs://, hdfs://, file://,
    anything `pyarrow.fs.FileSystem.from_uri` opens) read as a stream, never copied whole."""
    if fs is None:
        return open(path, "rb")
    return io.BufferedReader(_ArrowRaw(fs.open_input_stream(str(path), compression=None)), 1 << 20)


def _lines(path: Path | str, q: Quarantine, fs=None) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a text file, plain or gzip (local, or on the pyarrow filesystem `fs`).

    Bytes are decoded line by line, so one non-UTF-8 line is one bad record (file, line) instead of a
    UnicodeDecodeError from somewhere in a buffer. A truncated or corrupt gzip stream ends the file: what
    could not be read is reported at the line where reading stopped (quarantined as one record with
    skip_bad_records, else an error naming file and line).
    """
    if fs is None and not Path(path).is_file():
        raise FileNotFoundError(f"{path}: not a file" if Path(path).exists() else f"{path} does not exist")
    n = 0
    try:
        fobj = open_binary(path, fs)
        with fobj, (gzip.GzipFile(fileobj=fobj, mode="rb") if str(path).endswith(".gz") else fobj) as f:
            for n, raw in enumerate(f, 1):
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    q.bad(path, n, f"invalid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}",
                          raw[:500].decode("utf-8", "replace"))
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        q.bad(path, n + 1, f"corrupt gzip: {e or type(e).__name__} (the rest of the file is unreadable)")


def iter_jsonl(path: str | os.PathLike, q: Quarantine, fs=None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; invalid JSON or non-objects go to `q`."""
    path = Path(path) if fs is None else str(path)
    for n, line in _lines(path, q, fs):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            q.bad(path, n, f"invalid JSON: {e.msg}", line.rstrip("\n")[:500])
            continue
        except RecursionError:
            q.bad(path, n, "invalid JSON: nested too deeply", line.rstrip("\n")[:500])
            continue
        if not isinstance(obj, dict):
            q.bad(path, n, f"wrong type: record is {type(obj).__name__}, expected a JSON object", line[:500])
            continue
        yield n, obj


def _field(obj: dict, name: str, path, n: int, q: Quarantine, required: bool = True,
           allow_empty: bool = False, ids: bool = False) -> str | None:
    """Validate one string field; returns None (after reporting) when it is bad."""
    if name not in obj or obj[name] is None:
        if required:
            q.bad(path, n, f"missing field: '{name}'", obj)
        return "" if not required else None
    v = obj[name]
    if ids and isinstance(v, int) and not isinstance(v, bool):
        v = str(v)                                     # BEIR ids are often integers
    if not isinstance(v, str):
        q.bad(path, n, f"wrong type: field '{name}' is {type(v).__name__}, expected string", obj)
        return None
    if not allow_empty and not v.strip():
        q.bad(path, n, f"empty field: '{name}'", obj)
        return None
    return v


def _fields(obj: dict, path, n: int, q: Quarantine, *specs: tuple[str, dict]) -> list[str] | None:
    """Validate fields in order and stop at the first bad one: one bad line is one bad record."""
    out = []
    for name, kw in specs:
        v = _field(obj, name, path, n, q, **kw)
        if v is None:
            return None
        out.append(v)
    return out


def _first_present(obj: dict, names: tuple[str, ...]) -> str:
    return next((n for n in names if n in obj), names[0])


# ---------------------------------------------------------------------- BEIR
@dataclass
class BeirData:
    name: str
    corpus: dict[str, dict]                 # id -> {"title", "text"}
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]        # query id -> {doc id: grade}
    bad: dict = field(default_factory=dict)

    def doc_ids(self) -> list[str]:
        return list(self.corpus)

    def doc_texts(self) -> list[str]:
        return [doc_text(d) for d in self.corpus.values()]


GENERIC_SPLIT_NAMES = frozenset({"dev", "test", "train", "val", "validation", "eval"})


def dataset_name(folder: str | os.PathLike) -> str:
    """Folder name, or the parent's when the folder is a generic split name (medquad/dev -> medquad)."""
    p = Path(folder).resolve()
    return p.parent.name if p.name.lower() in GENERIC_SPLIT_NAMES else p.name


def parse_grade(score: str) -> int | str:
    """A qrels relevance grade: an integer ("2", "2.0"); anything else returns the reason it is not."""
    try:
        v = float(score)
    except ValueError:
        return f"wrong type: score {score!r} is not a number"
    if not math.isfinite(v):
        return f"wrong type: score {score!r} is not a finite number"
    if v != int(v):
        return f"wrong type: score {score!r} is not an integer grade (graded relevance is 0, 1, 2, ...)"
    return int(v)


def read_beir_corpus(path: str | os.PathLike, q: Quarantine) -> dict[str, dict]:
    corpus: dict[str, dict] = {}
    for n, obj in iter_jsonl(path, q):
        got = _fields(obj, path, n, q, ("_id", {"ids": True}), ("text", {}),
                      ("title", {"required": False, "allow_empty": True}))
        if got is None:
            continue
        did, text, title = got
        if did in corpus:
            q.bad(path, n, f"duplicate id: '{did}'", obj)
            continue
        corpus[did] = {"title": title or "", "text": text}
    return corpus


def read_beir(folder: str | os.PathLike, split: str = "test", skip_bad_records: bool = False,
              quarantine: str | os.PathLike | Quarantine | None = None) -> BeirData:
    """Read a BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (graded relevance kept)."""
    folder = Path(folder)
    q = make_quarantine(skip_bad_records, quarantine)
    files = {"corpus": folder / "corpus.jsonl", "queries": folder / "queries.jsonl",
             "qrels": folder / "qrels" / f"{split}.tsv"}
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a BEIR folder: " + ("not a directory" if folder.exists()
                                                                       else "it does not exist"))
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a BEIR folder: missing {', '.join(missing)}")
    not_files = [str(p) for p in files.values() if not p.is_file()]
    if not_files:
        raise FileNotFoundError(f"{folder} is not a BEIR folder: {', '.join(not_files)} is not a file")
    corpus = read_beir_corpus(files["corpus"], q)
    queries = read_beir_queries(files["queries"], q)
    qrels = read_qrels(files["qrels"], q, corpus, queries)
    return BeirData(dataset_name(folder), corpus, queries, qrels, q.summary())


def read_beir_queries(path, q: Quarantine, fs=None) -> dict[str, str]:
    """queries.jsonl -> {id: text} (local, or on the pyarrow filesystem `fs`)."""
    queries: dict[str, str] = {}
    for n, obj in iter_jsonl(path, q, fs):
        got = _fields(obj, path, n, q, ("_id", {"ids": True}), ("text", {}))
        if got is None:
            continue
        qid, text = got
        if qid in queries:
            q.bad(path, n, f"duplicate id: '{qid}'", obj)
            continue
        queries[qid] = text
    return queries


def qrels_doc_ids(path, fs=None) -> set[str]:
    """The document ids a qrels file names (unvalidated: which corpus ids a streaming reader must report)."""
    ids = set()
    with open_binary(path, fs) as f:
        for raw in f:
            cols = raw.decode("utf-8", "replace").rstrip("\r\n").split("\t")
            if len(cols) == 3:
                ids.add(cols[1])
    return ids


def read_qrels(path, q: Quarantine, corpus_ids, queries, fs=None) -> dict[str, dict[str, int]]:
    """qrels/<split>.tsv -> {query id: {doc id: grade}}; `corpus_ids` answers `did in corpus_ids` for every
    document the file names (the corpus itself, or the ids of it a streaming reader found)."""
    qrels: dict[str, dict[str, int]] = {}
    for n, line in _lines(path, q, fs):
        if not line.strip():
            continue
        cols = line.rstrip("\r\n").split("\t")
        if n == 1 and cols[0] in ("query-id", "query_id", "qid"):
            continue
        if len(cols) != 3:
            q.bad(path, n, f"wrong type: expected 3 tab-separated columns, got {len(cols)}", line)
            continue
        qid, did, score = cols
        grade = parse_grade(score)
        if isinstance(grade, str):
            q.bad(path, n, grade, line)
            continue
        if did not in corpus_ids:
            q.bad(path, n, f"unknown document: '{did}' is not in corpus.jsonl", line)
            continue
        if qid not in queries:
            q.bad(path, n, f"unknown query: '{qid}' is not in queries.jsonl", line)
            continue
        if did in qrels.get(qid, {}):
            q.bad(path, n, f"duplicate id: qrel ({qid}, {did}) repeated", line)
            continue
        qrels.setdefault(qid, {})[did] = grade
    return qrels


# ---------------------------------------------------------------------- text corpora and pairs
def _iter_parquet(path: Path, q: Quarantine) -> Iterator[tuple[Path, int, dict]]:
    """(file, row number in that file, row) of a Parquet file or folder.

    A file whose footer cannot be read, or a row group that cannot be decoded, is a bad record located by
    file and row range: with skip_bad_records it is quarantined (the other row groups are still read),
    else the read stops with that location.
    """
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        for n, row in iter_parquet_file(f, q):
            yield f, n, row


def iter_parquet_file(f: str | os.PathLike, q: Quarantine, fs=None) -> Iterator[tuple[int, dict]]:
    """(row number, row) of one Parquet file (local, or on the pyarrow filesystem `fs`), one row group in
    memory at a time; an unreadable footer or row group is a bad record (see `_iter_parquet`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f if fs is None else fs.open_input_file(str(f)))
    except (pa.ArrowException, OSError, ValueError) as e:
        q.bad(f, 0, f"corrupt Parquet: {_one_line(e)} (the whole file is unreadable)")
        return
    n = 0
    for g in range(pf.metadata.num_row_groups):
        size = pf.metadata.row_group(g).num_rows
        try:
            rows = pf.read_row_group(g).to_pylist()
        except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError) as e:
            q.bad(f, n + 1, f"corrupt Parquet: row group {g} (rows {n + 1}-{n + size}) unreadable: "
                            f"{_one_line(e)}")
            n += size
            continue
        for row in rows:
            n += 1
            yield n, row


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return (msg[:300] + "…") if len(msg) > 300 else (msg or type(e).__name__)


def iter_records(path: str | os.PathLike, q: Quarantine) -> Iterator[tuple[Path, int, dict]]:
    """(file, line/row number, dict) from JSONL (.jsonl/.json/.gz), Parquet file/folder, or BEIR folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and (path / "corpus.jsonl").exists():
        path = path / "corpus.jsonl"
    if path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet"))):
        yield from _iter_parquet(path, q)
    elif path.is_file():
        for n, obj in iter_jsonl(path, q):
            yield path, n, obj
    else:
        raise ValueError(f"{path}: expected a JSONL/Parquet file, a Parquet folder or a BEIR folder")


def read_corpus(path: str | os.PathLike, text_field: str | None = None, skip_bad_records: bool = False,
                quarantine: str | os.PathLike | Quarantine | None = None) -> list[dict]:
    """Documents as [{"_id", "title", "text"}]. Ids: `_id` or `id` (row number when neither exists).

    `text_field` picks another field as the text (e.g. "answer" for MedQuAD QA pairs).
    """
    q = make_quarantine(skip_bad_records, quarantine)
    out, seen = [], set()
    p = Path(path)
    # rows without an id are numbered per file: in a folder of several Parquet files, prefixed by the file
    several = p.is_dir() and not (p / "corpus.jsonl").exists() and len(list(p.rglob("*.parquet"))) > 1
    for f, n, obj in iter_records(path, q):
        doc = corpus_doc(obj, f, n, q, text_field,
                         f"{Path(f).relative_to(path).as_posix()}:{n}" if several else str(n))
        if doc is None:
            continue
        if doc["_id"] in seen:
            q.bad(f, n, f"duplicate id: '{doc['_id']}'", obj)
            continue
        seen.add(doc["_id"])
        out.append(doc)
    return out


def corpus_doc(obj: dict, f, n: int, q: Quarantine, text_field: str | None, default_id: str) -> dict | None:
    """One corpus record -> {"_id", "title", "text"}, or None after reporting it to `q` (ids: `_id` or
    `id`, else `default_id`). Duplicate ids are the caller's check (it knows the scope)."""
    id_name = _first_present(obj, ("_id", "id"))
    did = _field(obj, id_name, f, n, q, ids=True) if id_name in obj else default_id
    got = None if did is None else _fields(obj, f, n, q, (text_field or "text", {}),
                                           ("title", {"required": False, "allow_empty": True}))
    if got is None:
        return None
    text, title = got
    return {"_id": did, "title": title or "", "text": text}


def read_pairs(path: str | os.PathLike, query_field: str = "query", positive_field: str = "positive",
               negatives_field: str = "negatives", skip_bad_records: bool = False,
               quarantine: str | os.PathLike | Quarantine | None = None, group_field: str | None = None) -> list[dict]:
    """(query, positive, negatives) rows as [{"query", "positive", "negatives": [...]}] (negatives optional;
    with `group_field`, each row also carries its "group")."""
    q = make_quarantine(skip_bad_records, quarantine)
    rows = []
    for f, n, obj in iter_records(path, q):
        row = pair_row(obj, f, n, q, query_field, positive_field, negatives_field, group_field)
        if row is not None:
            rows.append(row)
    return rows


def pair_row(obj: dict, f, n: int, q: Quarantine, query_field: str = "query", positive_field: str = "positive",
             negatives_field: str = "negatives", group_field: str | None = None) -> dict | None:
    """One pairs record -> {"query", "positive", "negatives"} (+ "group" with `group_field`), or None after
    reporting it to `q`."""
    got = _fields(obj, f, n, q, (query_field, {}), (positive_field, {}))
    if got is None:
        return None
    qt, pt = got
    negs = obj.get(negatives_field)
    if negs is None:
        negs = []                                   # absent or null: no negatives (in-batch only)
    if hasattr(negs, "tolist"):
        negs = negs.tolist()
    if not isinstance(negs, list) or not all(isinstance(x, str) and x.strip() for x in negs):
        q.bad(f, n, f"wrong type: field '{negatives_field}' must be a list of non-empty strings", obj)
        return None
    row = {"query": qt, "positive": pt, "negatives": list(negs)}
    if group_field is not None:
        g = obj.get(group_field)
        if not isinstance(g, str) or not g.strip():
            kind = f"missing field: '{group_field}'" if g is None else f"wrong type: field '{group_field}'"
            q.bad(f, n, f"{kind} (data.group_field) must be a non-empty string", obj)
            return None
        row["group"] = g
    return row


def beir_pairs(data: BeirData, min_grade: int = 1) -> list[dict]:
    """Stage-2 rows from a BEIR folder: each (query, relevant document) becomes one row."""
    rows = []
    for qid, rel in data.qrels.items():
        for did, grade in rel.items():
            if grade >= min_grade:
                rows.append({"query": data.queries[qid], "positive": doc_text(data.corpus[did]), "negatives": [],
                             "query_id": qid, "doc_id": did})
    return rows


def is_beir_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "corpus.jsonl").exists() and (p / "queries.jsonl").exists()

