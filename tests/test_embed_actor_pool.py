"""The embedding actor pool gets one task per call-sized block, so every actor of the pool can work.

A one-file corpus is read by one Ray Data task whose output is one block, and an actor-pool task never
splits a block: before `encode_with_actors` cut the input, 2 actors embedded a 1,541-document file as a
single task on one actor (half the cores idle). Counted here from Ray's own task records.
"""
import json
import math
import time

import pyarrow.parquet as pq
import pytest

from pipeline.index.embed import ACTOR_CALL_BATCHES, EmbedConfig
from pipeline.index.stage import shard_files, stage_corpus

pytestmark = pytest.mark.timeout(300)


def _encode_tasks() -> list:
    """The finished `submit` calls of the embedding actors, this Ray session's so far."""
    from ray.util.state import list_tasks

    return list_tasks(filters=[("name", "=", "MapWorker(MapBatches(_StageEncodeActor)).submit"),
                               ("state", "=", "FINISHED")], detail=True, limit=10_000)


def _new_encode_tasks(before: set, expected: int, wait_s: float = 30.0) -> list:
    """Encode tasks not in `before` (task events reach the state API asynchronously: poll a little)."""
    deadline = time.time() + wait_s
    while True:
        new = [t for t in _encode_tasks() if t.task_id not in before]
        if len(new) >= expected or time.time() > deadline:
            return new
        time.sleep(1.0)


def test_one_file_corpus_is_spread_over_the_actor_pool(ray_session, tmp_path):
    n = 400
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"document {i} " * (i % 7 + 1)}) + "\n"
                              for i in range(n)))
    cfg = EmbedConfig(batch_size=2, num_actors=2, num_cpus_per_actor=0.5)
    call_rows = cfg.batch_size * ACTOR_CALL_BATCHES
    before = {t.task_id for t in _encode_tasks()}     # the session's Ray is shared with other tests
    stage = stage_corpus(corpus, tmp_path / "stage", 2, "hashing:16", cfg, use_ray=True)

    ids = [i for s in range(2) for f in shard_files(stage, s) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    assert sorted(ids) == sorted(f"d{i}" for i in range(n)), "every document staged exactly once"
    expected = math.ceil(n / call_rows)
    tasks = _new_encode_tasks(before, expected)
    actors = {t.actor_id for t in tasks}
    assert len(tasks) >= expected, (f"{len(tasks)} encode task(s) on {len(actors)} actor(s) for {n} rows; "
                                    f"blocks of at most {call_rows} rows give at least {expected}")
