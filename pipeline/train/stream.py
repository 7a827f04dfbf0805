"""Ray Data in: training rows from the core readers, tokenised in `map_batches`, streamed to workers.

Why the core readers and not `ray.data.read_json`: bad records must follow one rule everywhere (error
with file/line/reason, or quarantine with skip_bad_records), and the reader is where that rule lives.
Rows are read once in the driver (local paths or any pyarrow filesystem URI), validated, then handed
to Ray Data with `from_items`; tokenisation — the expensive part — runs in Ray Data tasks.
`from_items` also avoids the `ListFiles` operator that always asks for a whole CPU (STACK-NOTES §3).
"""
from __future__ import annotations

import functools
import random
import shutil
import tempfile
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.train.rows import encode_rows


def localize(uri: str | Path) -> Path:
    """A local path for `uri`: local paths as they are; `scheme://...` copied down through pyarrow.fs."""
    s = str(uri)
    if "://" not in s or s.startswith("file://"):
        return Path(s.removeprefix("file://"))
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(s)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{s} does not exist")
    dest = Path(tempfile.mkdtemp(prefix="lbr-data-"))
    if info.type == pafs.FileType.File:
        target = dest / Path(root).name
        with fs.open_input_stream(root) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
        return target
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if f.type == pafs.FileType.File:
            target = dest / Path(f.path).relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f.path) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    from stages.model import _prepare_tokenizer

    return _prepare_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))


class _Tokenize:
    """map_batches function: rows (numpy batch of columns) -> fixed-length int64 arrays."""

    def __init__(self, tokenizer_path: str, cfg: TrainConfig):
        self.path, self.cfg = tokenizer_path, cfg

    def __call__(self, batch: dict) -> dict:
        cols = list(batch)
        n = len(batch[cols[0]])
        rows = [{c: _py(batch[c][i]) for c in cols} for i in range(n)]
        return encode_rows(_tokenizer(self.path), rows, self.cfg, fixed=True)


def _py(v):
    return v.tolist() if hasattr(v, "tolist") else v


def tokenizer_path_of(model_path: str | Path) -> str:
    p = Path(model_path)
    return str(p / "tokenizer") if (p / "tokenizer").exists() else str(p)


def build_dataset(cfg: TrainConfig, rows: list[dict], model_path: str | Path):
    """Ray dataset of tokenised rows. `rows` come from `read_rows` (validated in the driver first)."""
    import ray

    if cfg.stage == "contrastive":
        keep = ("query", "positive", "negatives") if cfg.stage2.num_negatives > 0 else ("query", "positive")
    else:
        keep = ("_id", "text")
    items = [{k: (str(r[k]) if k == "_id" else r[k]) for k in keep} for r in rows]
    # files are often grouped (by module, source, topic): in-batch negatives from one group are not a
    # sample of the corpus, so rows are shuffled once here (seeded) and locally again every epoch
    random.Random(cfg.seed).shuffle(items)
    return ray.data.from_items(items).map_batches(
        _Tokenize(tokenizer_path_of(model_path), cfg), batch_format="numpy", batch_size=256, num_cpus=0.25)


def shard_source(shard, batch_size: int, seed: int = 0, shuffle_buffer: int = 1024):
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
