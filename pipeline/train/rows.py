"""Training rows read in this process through the core readers (the in-process runner, Tune's
pre-flight checks), their tokenisation, and the in-process batch source. The Ray path streams instead
(pipeline.train.stream)."""
from __future__ import annotations

import random
from collections import Counter
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
        if d.group_field is not None:
            raise ValueError(f"{data_path}: data.group_field={d.group_field!r} needs a pairs file (a BEIR folder's "
                             "rows have no group field)")
        rows = beir_pairs(read_beir(data_path, split=d.split, quarantine=q))
    else:
        rows = read_pairs(data_path, d.query_field, d.positive_field, d.negatives_field, quarantine=q,
                          group_field=d.group_field)
    if d.max_records is not None:
        rows = rows[: d.max_records]
    if cfg.stage == "contrastive" and cfg.stage2.num_negatives > 0:
        short = [i for i, r in enumerate(rows) if len(r["negatives"]) < cfg.stage2.num_negatives]
        if short:
            raise ValueError(f"{data_path}: row {short[0]} has {len(rows[short[0]]['negatives'])} negatives but "
                             f"stage2.num_negatives={cfg.stage2.num_negatives} ({len(short)} rows too short)")
    if d.group_field is not None and cfg.stage == "contrastive":
        sizes = Counter(r["group"] for r in rows)
        small = {g: n for g, n in sorted(sizes.items()) if n < cfg.batch_size * cfg.workers}
        if small:
            raise ValueError(f"{data_path}: data.group_field={d.group_field!r}: groups {list(small)} have fewer rows "
                             f"({small}) than one batch (batch_size x workers = {cfg.batch_size * cfg.workers}); "
                             "they would never be trained on")
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


def batch_order(rows: list[dict], per: int, seed: int) -> list[list[int]]:
    """One epoch's batches of `per` row indices, seeded; full batches only.

    Rows with a "group" (data.group_field) are batched within their group, then the batches of all groups
    are shuffled together: every batch's in-batch negatives come from the query's own group (domain), where
    mixed batches would spend most of them on trivially different domains. A group's last partial batch
    is dropped for that epoch (a different one each epoch)."""
    rng = random.Random(seed)
    if not rows or "group" not in rows[0]:
        order = list(range(len(rows)))
        rng.shuffle(order)
        return [order[s:s + per] for s in range(0, len(order) - per + 1, per)]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["group"], []).append(i)
    batches = []
    for g in sorted(groups):
        idx = groups[g]
        rng.shuffle(idx)
        batches += [idx[s:s + per] for s in range(0, len(idx) - per + 1, per)]
    rng.shuffle(batches)
    return batches


def epoch_batches(rows: list[dict], cfg: TrainConfig, epoch: int, world: int = 1) -> list[list[int]]:
    """The global batches (row indices, all ranks) of one in-process epoch: what `local_source` trains on,
    replayable afterwards (bench.quality reads each logged step's domain from it)."""
    return batch_order(rows, cfg.batch_size * world, cfg.seed * 7919 + epoch)


def local_source(tokenizer, rows: list[dict], cfg: TrainConfig, rank: int = 0, world: int = 1):
    """Per-epoch batches for in-process training: seeded shuffle (within groups, with data.group_field),
    this rank's slice, full batches only."""
    def source(epoch: int) -> Iterator[dict]:
        for batch in epoch_batches(rows, cfg, epoch, world):
            chunk = batch[rank * cfg.batch_size: (rank + 1) * cfg.batch_size]
            yield encode_rows(tokenizer, [rows[i] for i in chunk], cfg, fixed=False)
    return source
