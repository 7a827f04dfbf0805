"""A synthetic retrieval task the tiny model can learn in seconds: documents are random word
strings over a domain vocabulary; a query is a few of its document's words, shuffled, with one
distractor word. Used by tests and the laptop smoke runs — never reported as a quality number.
"""
from __future__ import annotations

import random

from stages.tiny import _WORDS


def synthetic_retrieval(n_docs: int = 300, n_train: int = 200, seed: int = 0, doc_words: int = 12,
                        query_words: int = 4, queries_per_doc: int = 1) -> dict:
    """{'corpus': {id: {'title','text'}}, 'train': [(query, doc_id)], 'test': [(query, doc_id)]}.

    queries_per_doc=1: train and test queries target disjoint documents (first n_train docs train).
    queries_per_doc=2: every document gets a training query, and the first n_docs - n_train documents a
    second, held-back query drawn independently (new queries over a known corpus).
    """
    rng = random.Random(seed)
    corpus, pairs, held = {}, [], []

    def query(words):
        q = rng.sample(words, query_words) + [rng.choice(_WORDS)]
        rng.shuffle(q)
        return " ".join(q)

    for i in range(n_docs):
        words = rng.sample(_WORDS, doc_words)
        did = f"d{i}"
        corpus[did] = {"title": "", "text": " ".join(words)}
        pairs.append((query(words), did))
        if queries_per_doc == 2:
            held.append((query(words), did))
    if queries_per_doc == 2:
        return {"corpus": corpus, "train": pairs, "test": held[: n_docs - n_train]}
    return {"corpus": corpus, "train": pairs[:n_train], "test": pairs[n_train:]}
