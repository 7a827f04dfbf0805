"""BM25 hard negatives for a pairs file (pipeline.lexical_negatives): lexical, in-group, guarded."""
from __future__ import annotations

import pytest

from pipeline.lexical_negatives import mine_bm25_negatives
from stages.negatives import NegativeConfig

RULE = NegativeConfig(top_k=10, num_negatives=1, margin=0.0, range_min=1, range_max=10, seed=0)


def _rows():
    med = [("What causes asthma ?", "Asthma is caused by inflamed airways."),
           ("What are the symptoms of asthma ?", "Asthma symptoms are wheezing and coughing."),
           ("How to treat asthma ?", "Asthma is treated with inhalers."),
           ("What causes gout ?", "Gout is caused by uric acid crystals."),
           ("What are the symptoms of gout ?", "Gout symptoms are a hot swollen joint."),
           ("How to treat gout ?", "Gout is treated with colchicine.")]
    code = [("Parse a date string.", "def parse_date(s): return datetime.strptime(s, FMT)"),
            ("Format a date as a string.", "def format_date(d): return d.strftime(FMT)"),
            ("Open a socket to a host.", "def connect(host): return socket.create_connection(host)"),
            ("Close the socket.", "def close(sock): sock.close()")]
    return ([{"query": q, "positive": p, "domain": "medical"} for q, p in med]
            + [{"query": q, "positive": p, "domain": "code"} for q, p in code])


def test_negatives_share_the_query_terms_and_stay_in_their_group():
    rows = _rows()
    out, rep = mine_bm25_negatives(rows, RULE)
    assert rep.rows == len(rows) and rep.with_negatives == len(rows) and not rep.short
    positives = {r["positive"]: r["domain"] for r in rows}
    for r, o in zip(rows, out):
        assert "negatives" not in r, "the input rows are not modified"
        (neg,) = o["negatives"]
        assert neg != r["positive"] and positives[neg] == r["domain"]
    by_q = {o["query"]: o["negatives"][0] for o in out}
    # a disease question's negative is the same disease's other answer or the same question about another
    # disease (the rows sharing a word with it), never a row that shares none ("How to treat gout ?")
    assert by_q["What causes asthma ?"] in {rows[1]["positive"], rows[2]["positive"], rows[3]["positive"]}
    # the only other rows that share a query word: the date formatter; the socket closer (its query says "socket")
    assert by_q["Parse a date string."] == rows[7]["positive"]
    assert by_q["Open a socket to a host."] == rows[9]["positive"]


def test_a_candidate_that_outscores_the_pair_itself_is_dropped_as_a_likely_false_negative():
    rows = [{"query": "zebra stripes pattern", "positive": "animal coat", "domain": "x"},
            # scores higher for the first query than the first row's own pair: must not be its negative
            {"query": "zebra stripes pattern zebra", "positive": "zebra stripes pattern zebra stripes", "domain": "x"},
            {"query": "lion mane", "positive": "zebra lion", "domain": "x"},
            {"query": "tiger", "positive": "tiger stripes", "domain": "x"}]
    out, rep = mine_bm25_negatives(rows, RULE)
    assert rows[1]["positive"] not in out[0]["negatives"]
    assert rep.filtered_false_negatives >= 1
    # with a margin as large as any score, nothing survives and the row is reported short, not padded
    out, rep = mine_bm25_negatives(rows, NegativeConfig(top_k=10, num_negatives=1, margin=100.0, range_min=1,
                                                        range_max=10))
    assert rep.short == [0, 1, 2, 3] and all(o["negatives"] == [] for o in out)


def test_same_positive_text_is_never_a_negative_and_mining_is_deterministic():
    rows = [{"query": "reset the counter", "positive": "def reset(c): c.n = 0", "domain": "code"},
            {"query": "reset the counter to zero", "positive": "def reset(c): c.n = 0", "domain": "code"},
            {"query": "counter increment", "positive": "def inc(c): c.n += 1", "domain": "code"}]
    a, _ = mine_bm25_negatives(rows, RULE)
    b, _ = mine_bm25_negatives(list(rows), RULE)
    assert a == b
    assert a[0]["negatives"] == ["def inc(c): c.n += 1"] and a[1]["negatives"] == ["def inc(c): c.n += 1"]


def test_a_row_without_text_gets_a_clear_error():
    rows = _rows()
    rows[3] = {"query": "  ", "positive": "x", "domain": "medical"}
    with pytest.raises(ValueError, match=r"row 3: field 'query'"):
        mine_bm25_negatives(rows, RULE)
