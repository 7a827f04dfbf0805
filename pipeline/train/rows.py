"""Training rows read in this process through the core readers (the in-process runner, Tune's
pre-flight checks), their tokenisation, and the in-process batch source. The Ray path streams instead
(pipeline.train.stream)."""
from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.config import TrainConfig
from stages.objectives import stage1_arrays, stage2_arrays
from stages.readers import Quarantine, beir_pairs, is_beir_folder, read_beir, read_corpus, read_pairs
from stages.text import doc_text


def read_rows(cfg: TrainConfig, data_path: str | Path, quarantine: Path | None = None) -> tuple[list[dict], dict]:
    """Training rows for the stage, plus the bad-record summary.

    generative: [{"_id", "text"}] from a JSONL/Parquet/BEIR corpus;
    contrastive: [{"query", "positive", "negatives"}] from a BEIR folder (query -> each relevant doc)
    or a pairs / mined-negatives file.
    """
    d = cfg.data
    q = Quarantine(skip=d.skip_bad_records, path=quarantine)
    if cfg.stage == "generative":
        docs = read_corpus(data_path, text_field=d.text_field, quarantine=q)
        rows = [{"_id": x["_id"], "text": doc_text(x)} for x in docs]
    elif is_beir_folder(data_path):
        rows = beir_pairs(read_beir(data_path, split=d.split, quarantine=q))
    else:
        rows = read_pairs(data_path, d.query_field, d.positive_field, d.negatives_field, quarantine=q)
    if d.max_records is not None:
        rows = rows[: d.max_records]
    if cfg.stage == "contrastive" and cfg.stage2.num_negatives > 0:
        short = [i for i, r in enumerate(rows) if len(r["negatives"]) < cfg.stage2.num_negatives]
        if short:
            raise ValueError(f"{data_path}: row {short[0]} has {len(rows[short[0]]['negatives'])} negatives but "
                             f"stage2.num_negatives={cfg.stage2.num_negatives} ({len(short)} rows too short)")
    if len(rows) < cfg.batch_size * cfg.workers:
        raise ValueError(f"{data_path}: {len(rows)} usable rows, fewer than batch_size x workers = "
                         f"{cfg.batch_size * cfg.workers}")
    return rows, q.summary()


def encode_rows(tokenizer, rows: list[dict], cfg: TrainConfig, fixed: bool) -> dict[str, np.ndarray]:
    """Tokenised arrays for a list of rows (the same function Ray Data's map_batches calls)."""
    if cfg.stage == "generative":
        return stage1_arrays(tokenizer, [r["text"] for r in rows], [str(r["_id"]) for r in rows], cfg.stage1, fixed)
    negs = [r["negatives"] for r in rows] if cfg.stage2.num_negatives > 0 else None
    return stage2_arrays(tokenizer, [r["query"] for r in rows], [r["positive"] for r in rows], negs, cfg.stage2,
                         fixed)


def local_source(tokenizer, rows: list[dict], cfg: TrainConfig, rank: int = 0, world: int = 1):
    """Per-epoch batches for in-process training: seeded shuffle, this rank's slice, full batches only."""
    def source(epoch: int) -> Iterator[dict]:
        order = list(range(len(rows)))
        random.Random(cfg.seed * 7919 + epoch).shuffle(order)
        per = cfg.batch_size * world
        for s in range(0, len(order) - per + 1, per):
            chunk = order[s + rank * cfg.batch_size: s + (rank + 1) * cfg.batch_size]
            yield encode_rows(tokenizer, [rows[i] for i in chunk], cfg, fixed=False)
    return source
