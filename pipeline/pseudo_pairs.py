"""Stage-2 pairs from unlabelled domain text: the inverse cloze task (ICT, Lee et al. 2019).

Why: a domain often has plenty of text and no (query, document) pairs, or pairs that do not teach
retrieval (ChEBI description→SMILES stays at chance InfoNCE in every method we ran). ICT turns each
passage into one pair: query = one sentence of it, positive = the passage with that sentence removed
(kept with probability `keep_prob`, so the model also learns that exact overlap counts). Nothing but
the text is used: no title field, no document identity, no labels (a passage that starts with its
paper's title line keeps it, and a sentence repeated elsewhere in a passage stays there).

Deterministic: the same (texts, n, seed) give the same pairs in any process.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])|\n\s*\n")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence: split on sentence ends and blank lines, empty pieces dropped."""
    spans, start = [], 0
    for m in list(_SENTENCE.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        if text[start:end].strip():
            spans.append((start, end))
        start = m.end() if m else end
    return spans


def sentences(text: str) -> list[str]:
    """The sentences of `text`, whitespace inside each collapsed."""
    return [" ".join(text[a:b].split()) for a, b in sentence_spans(text)]


def is_prose(sentence: str, min_fraction: float = 0.5) -> bool:
    """At least `min_fraction` of the words are lowercase alphabetic: a sentence, not a reference or a table row."""
    words = sentence.split()
    return bool(words) and sum(w.strip(",.;:()").isalpha() and w.strip(",.;:()").islower() for w in words) \
        >= min_fraction * len(words)


def ict_pairs(texts: Sequence[str], n: int, seed: int, *, min_words: int = 6, max_words: int = 48,
              keep_prob: float = 0.1, domain: str | None = None) -> list[dict]:
    """Up to `n` ICT pairs {query, positive[, domain]}, at most one per text, from a seeded sample.

    A text qualifies when it has >= 3 sentences and one of them has `min_words`..`max_words` words
    and is prose (shorter ones are headings or fragments, longer ones tables; see `is_prose`); texts that do not are skipped,
    so fewer than `n` pairs come back when too few qualify.
    """
    if not 0 <= keep_prob <= 1:
        raise ValueError(f"keep_prob={keep_prob} must be in [0, 1]")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    out = []
    for i in order:
        if len(out) >= n:
            break
        text = texts[i]
        spans = sentence_spans(text)
        sents = [" ".join(text[a:b].split()) for a, b in spans]
        ok = [j for j, s in enumerate(sents) if min_words <= len(s.split()) <= max_words and is_prose(s)]
        if len(sents) < 3 or not ok:
            continue
        j = rng.choice(ok)
        # the passage as written (line breaks kept) minus the query and the separator after it
        # (before it, for the last sentence)
        a, b = (spans[j][0], spans[j + 1][0]) if j + 1 < len(spans) else (spans[j - 1][1], spans[j][1])
        rest = text if rng.random() < keep_prob else text[:a] + text[b:]
        row = {"query": sents[j], "positive": rest.strip()}
        if domain is not None:
            row["domain"] = domain
        out.append(row)
    return out
