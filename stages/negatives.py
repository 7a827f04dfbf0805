"""Hard-negative selection from a retriever's ranked candidates (pure: no Ray, no FAISS).

Why a false-negative filter: in domain corpora many unlabeled documents answer the query as well
as the labeled positive; training against them as negatives teaches the model to push away
relevant text. The rule here ("TopK-MarginPos"):

* candidates are the retriever's top-k for the query, ranked 1..k (1 = best);
* only ranks in the window ``[range_min, range_max]`` (inclusive, 1-based) are eligible, which
  skips the very top where unlabeled positives concentrate;
* any labeled positive is never a negative;
* a candidate whose score is ``> pos_score - margin`` is dropped and counted as a *likely false
  negative* (it scores about as high as, or higher than, the positive itself). ``pos_score`` is the
  similarity between the query and the positive of the row being built; ``margin`` is absolute, in
  the similarity's units (cosine for normalised embeddings);
* from the survivors, ``num_negatives`` are drawn uniformly without replacement with an RNG seeded
  by ``(seed, query_id, positive_id)`` — so the result does not depend on query order — and
  returned in rank order.
"""
from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NegativeConfig:
    top_k: int = 50
    num_negatives: int = 4
    margin: float = 0.05
    range_min: int = 3
    range_max: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"NegativeConfig.top_k must be >= 1, got {self.top_k}")
        if self.num_negatives < 1:
            raise ValueError(f"NegativeConfig.num_negatives must be >= 1, got {self.num_negatives}")
        if self.margin < 0:
            raise ValueError(f"NegativeConfig.margin must be >= 0, got {self.margin}")
        if not 1 <= self.range_min <= self.range_max:
            raise ValueError(f"NegativeConfig needs 1 <= range_min <= range_max, got "
                             f"range_min={self.range_min}, range_max={self.range_max}")
        if self.range_min > self.top_k:
            raise ValueError(f"NegativeConfig.range_min={self.range_min} exceeds top_k={self.top_k}: "
                             "no candidate could ever be eligible")


@dataclass(frozen=True)
class Selection:
    negatives: list[str]
    filtered_false_negatives: int  # in window, not a positive, but score > pos_score - margin
    eligible: int  # survivors the negatives were drawn from


def _rng(seed: int, query_id: str, positive_id: str) -> np.random.Generator:
    h = hashlib.sha256(f"{seed}\x00{query_id}\x00{positive_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def select_negatives(query_id: str, positive_id: str, pos_score: float, ranked_ids: Sequence[str],
                     ranked_scores: Sequence[float], positives: Collection[str],
                     cfg: NegativeConfig) -> Selection:
    """Apply the window / positive / margin rules to one (query, positive) pair; see module doc."""
    if len(ranked_ids) != len(ranked_scores):
        raise ValueError(f"query {query_id!r}: {len(ranked_ids)} ranked ids but {len(ranked_scores)} scores")
    positives = set(positives)
    threshold = float(pos_score) - cfg.margin
    pool: list[str] = []
    filtered = 0
    seen: set[str] = set()
    for rank, (did, score) in enumerate(zip(ranked_ids, ranked_scores), start=1):
        if rank > min(cfg.range_max, cfg.top_k):
            break
        if rank < cfg.range_min or did in positives or did in seen or did == "":
            continue
        seen.add(did)
        if float(score) > threshold:
            filtered += 1
            continue
        pool.append(did)
    if len(pool) > cfg.num_negatives:
        pick = np.sort(_rng(cfg.seed, query_id, positive_id).choice(len(pool), cfg.num_negatives,
                                                                    replace=False))
        negs = [pool[i] for i in pick]
    else:
        negs = list(pool)
    return Selection(negs, filtered, len(pool))
