"""CPU seconds per process on this machine between two snapshots, from /proc (Linux).

Why: on a 2-core box the Ray path's slowdown is CPU taken by something beside the compute (the driver's Ray
Data executor, Ray's own actors and agents). A snapshot before and after a timed phase says who took it.
"""
from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def snapshot() -> dict[int, tuple[str, float]]:
    """{pid: (name, cpu seconds so far)} for every readable process (name: Ray's ray::<Actor> title, or comm)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        name = cmd.split(" ")[0] if cmd.startswith("ray::") else comm
        out[int(d.name)] = (name[:60], (int(fields[11]) + int(fields[12])) / _TICK)
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
