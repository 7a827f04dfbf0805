"""data.group_field: stage-2 batches drawn from one group (domain) each, so in-batch negatives are
same-domain; bad group values are bad records; the Ray path refuses it instead of mixing groups."""
import json
from collections import Counter

import pytest

from pipeline.config import load_train_config
from pipeline.train.rows import batch_order, local_source, read_rows
from stages.readers import BadRecordError, Quarantine, read_pairs


def _rows(sizes: dict[str, int]) -> list[dict]:
    rows = [{"query": f"{g} q{i}", "positive": f"{g} d{i}", "negatives": [], "group": g}
            for g, n in sizes.items() for i in range(n)]
    return rows[::-1]          # interleaving in the file must not matter


def test_every_batch_is_one_group_and_each_epoch_uses_every_full_batch():
    rows = _rows({"med": 70, "chem": 40, "code": 33})
    epochs = [batch_order(rows, 8, seed) for seed in (0, 1)]
    for batches in epochs:
        assert all(len(b) == 8 for b in batches)
        assert all(len({rows[i]["group"] for i in b}) == 1 for b in batches)
        assert len({i for b in batches for i in b}) == 8 * len(batches)        # no row twice in an epoch
        per_group = Counter(rows[b[0]]["group"] for b in batches)
        assert per_group == {"med": 8, "chem": 5, "code": 4}                  # floor(n / 8) per group
        assert len({rows[b[0]]["group"] for b in batches[:6]}) > 1            # groups interleave, not in blocks
    assert epochs[0] != epochs[1]                                              # reshuffled per epoch
    assert batch_order(rows, 8, 0) == epochs[0]                                # seeded


def test_without_groups_the_order_is_the_old_seeded_shuffle():
    import random

    rows = [{"query": str(i), "positive": str(i), "negatives": []} for i in range(50)]
    order = list(range(50))
    random.Random(7).shuffle(order)
    assert batch_order(rows, 16, 7) == [order[0:16], order[16:32], order[32:48]]


def test_local_source_feeds_single_group_batches(tiny_backbone, tmp_path):
    from transformers import AutoTokenizer

    f = tmp_path / "pairs.jsonl"
    rows = _rows({"med": 20, "chem": 20})
    f.write_text("".join(json.dumps({"query": r["query"], "positive": r["positive"], "domain": r["group"]}) + "\n"
                         for r in rows))
    cfg = load_train_config(None, ["stage=contrastive", "batch_size=8", "data.group_field=domain",
                                   "engine.kind=torch"])
    got, bad = read_rows(cfg, f)
    assert bad["bad_records"] == 0 and {r["group"] for r in got} == {"med", "chem"}
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    batches = list(local_source(tok, got, cfg)(0))
    assert len(batches) == 4
    for b in batches:
        queries = tok.batch_decode(b["q_ids"], skip_special_tokens=True)
        assert len({q.split()[0] for q in queries}) == 1, queries


def test_a_group_smaller_than_a_batch_is_an_error_not_silently_dropped(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"query": r["query"], "positive": r["positive"], "domain": r["group"]}) + "\n"
                         for r in _rows({"big": 16, "tiny": 5})))
    cfg = load_train_config(None, ["stage=contrastive", "batch_size=8", "data.group_field=domain"])
    with pytest.raises(ValueError, match=r"pairs.jsonl: .*groups \['tiny'\] have fewer rows"):
        read_rows(cfg, f)


def test_missing_or_wrong_group_is_a_bad_record(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"query": "a", "positive": "b", "domain": "x"}) + "\n"
                 + json.dumps({"query": "c", "positive": "d"}) + "\n"
                 + json.dumps({"query": "e", "positive": "f", "domain": 3}) + "\n")
    with pytest.raises(BadRecordError, match=r"pairs.jsonl:2.*'domain'"):
        read_pairs(f, group_field="domain")
    q = Quarantine(skip=True, path=tmp_path / "bad.jsonl")
    rows = read_pairs(f, group_field="domain", quarantine=q)
    assert rows == [{"query": "a", "positive": "b", "negatives": [], "group": "x"}]
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "bad.jsonl").read_text().splitlines()]
    assert len(reasons) == 2 and "missing field" in reasons[0] and "wrong type" in reasons[1]


def test_ray_path_refuses_group_field_before_touching_anything(tmp_path):
    from pipeline.train.ray_runner import run_ray

    cfg = load_train_config(None, ["stage=contrastive", "data.group_field=domain"])
    with pytest.raises(ValueError, match="in-process trainer only"):
        run_ray(cfg, tmp_path / "model", tmp_path / "pairs.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()
