"""bench.seeds: seed spread and paired differences, only over files that are seeds of one setting."""
import json

import pytest

from bench.seeds import spread


def _file(tmp_path, name, seed, scores, lr=2e-4):
    data = {"backbone": "tiny", "budget": {"train": {"seed": 0, "lr": lr, "train_override": ["x=1", f"seed={seed}"]},
                                           "eval": {"max_queries": 10}},
            "results": {ds: {m: {"ndcg@10": v} for m, v in per.items()} for ds, per in scores.items()}}
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_spread_and_paired_differences(tmp_path):
    a = _file(tmp_path, "a.json", 0, {"d1": {"m": 0.5, "r": 0.4}, "d2": {"m": 0.7, "r": 0.7}})
    b = _file(tmp_path, "b.json", 1, {"d1": {"m": 0.3, "r": 0.4}, "d2": {"m": 0.9, "r": 0.6}})
    res = spread([a, b], ["r", "m"], "r")
    assert res["seeds"] == [0, 1]
    assert res["rows"]["m"]["d1"] == {"per_seed": [0.5, 0.3], "mean": 0.4, "min": 0.3, "max": 0.5}
    assert res["rows"]["m"]["mean"]["per_seed"] == [0.6, 0.6]
    assert res["paired"]["m"]["d2"] == [0.0, 0.3] and res["paired"]["m"]["mean"] == [0.05, 0.1]


def test_files_that_are_not_seeds_of_one_setting_are_refused(tmp_path):
    a = _file(tmp_path, "a.json", 0, {"d1": {"m": 0.5}})
    with pytest.raises(ValueError, match="differs .* beyond the training seed"):
        spread([a, _file(tmp_path, "b.json", 1, {"d1": {"m": 0.5}}, lr=1e-4)], ["m"], None)
    with pytest.raises(ValueError, match="seeds repeat"):
        spread([a, _file(tmp_path, "c.json", 0, {"d1": {"m": 0.5}})], ["m"], None)
    with pytest.raises(ValueError, match="no ndcg@10 for q on d1"):
        spread([a], ["q"], None)


def test_default_table_is_named_after_the_first_file_and_never_replaces_another(tmp_path):
    from bench.seeds import main

    a = _file(tmp_path, "quality-tiny-x.json", 0, {"d1": {"m": 0.5, "r": 0.4}})
    b = _file(tmp_path, "quality-tiny-x-seed1.json", 1, {"d1": {"m": 0.3, "r": 0.4}})
    assert main([str(a), str(b), "--methods", "m"]) == 0
    table = tmp_path / "seeds-tiny-x.json"
    made = json.loads(table.read_text())
    assert made["files"] == [str(a), str(b)] and sorted(made["rows"]) == ["m"]
    assert main([str(a), str(b), "--methods", "m"]) == 0          # the same inputs again: rewritten
    with pytest.raises(SystemExit, match="exists and was made from"):
        main([str(a), str(b), "--methods", "m", "r"])
    assert sorted(json.loads(table.read_text())["rows"]) == ["m"]  # untouched
    assert main([str(a), str(b), "--methods", "m", "r", "--force"]) == 0
    assert sorted(json.loads(table.read_text())["rows"]) == ["m", "r"]
