"""CPU seconds per process on this machine between two snapshots (psutil).

Why: on a 2-core box the Ray path's slowdown is CPU taken by something beside the compute (the driver's Ray
Data executor, Ray's own actors and agents). A snapshot before and after a timed phase says who took it.
"""
from __future__ import annotations

import os


def snapshot() -> dict[int, tuple[str, float]]:
    """{pid: (name, user + system CPU seconds so far)} for every readable process; Ray's workers are named by
    their `ray::<Actor>` title (as `bench/index_scale.py` reads them too)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        t = p.info["cpu_times"]
        if t is not None:
            out[p.pid] = ((p.info["name"] or "?")[:60], t.user + t.system)
    return out


def cpu_delta(before: dict, after: dict, top: int = 12) -> list[dict]:
    """CPU seconds per process name between two snapshots (processes born in between count from zero),
    largest first; `self` marks this process."""
    me = os.getpid()
    by: dict[str, float] = {}
    for pid, (name, sec) in after.items():
        d = sec - before.get(pid, (name, 0.0))[1]
        if d > 0:
            key = "this process (driver)" if pid == me else name
            by[key] = by.get(key, 0.0) + d
    rows = sorted(by.items(), key=lambda kv: -kv[1])
    return [{"process": k, "cpu_s": round(v, 1)} for k, v in rows[:top]]
