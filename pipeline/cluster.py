"""Connecting to Ray: the job's cluster under `ray job submit` (RAY_ADDRESS), else a local one.

One function for every entry point (training, embedding, index shards, Tune), so each starts Ray
the same way: the dashboard on (Train V2 needs its State API to free placement groups), this checkout
on the workers' PYTHONPATH, offline hub settings passed through.

Local Ray listens on loopback only. Ray's services have no authentication on a local run (the GCS,
the raylet, the dashboard and its agents, every worker's gRPC port), and by default they bind every
interface and advertise the machine's LAN address. A local run is one machine, so its node address is
127.0.0.1: every service binds loopback. Opening a local head to other machines is an explicit choice:
`LBR_RAY_NODE_IP=<this machine's address>` (and `LBR_RAY_DASHBOARD_HOST` for the dashboard) — do that only
behind your own network controls; a real cluster is started with `ray start` / `ray up` instead and
reached through RAY_ADDRESS, which this function never reconfigures.
"""
from __future__ import annotations

import os
from pathlib import Path

LOOPBACK = "127.0.0.1"


def local_ray_options() -> dict:
    """`ray.init` keyword arguments that keep a local Ray on loopback (unless explicitly opened).

    Ray turns an explicit 127.0.0.1 node address back into the LAN address; its single-machine mode
    (the one it uses on macOS/Windows, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`) keeps loopback. It is set
    here for this process and inherited by the Ray processes it starts, as is the workers' niceness (0).
    """
    # Ray starts its workers at niceness 15 so its own services win the CPU; on a small box that lets every
    # 1% poller (raylet, dashboard, controller, stats actors) preempt one of the trainer's OpenMP threads and
    # stall the other at the barrier: a SmolLM2 stage-2 Ray run went 249 -> 290 tokens/s at niceness 0
    # (in-process 330). `ray job submit` drivers already run at 0 (Ray's job manager sets the same variable).
    os.environ.setdefault("RAY_worker_niceness", "0")
    node_ip = os.environ.get("LBR_RAY_NODE_IP")
    opts = {"dashboard_host": os.environ.get("LBR_RAY_DASHBOARD_HOST") or LOOPBACK}
    if node_ip:
        opts["_node_ip_address"] = node_ip
    else:
        import ray._private.ray_constants as rc

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        rc.ENABLE_RAY_CLUSTER = False
    return opts


def ensure_ray(num_cpus: int | None = None):
    """Connect to a running cluster (RAY_ADDRESS / `ray job submit`) or start a local one."""
    import ray

    if ray.is_initialized():
        return ray
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DS_ACCELERATOR",
                                                         "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "LBR_CACHE")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = repo + os.pathsep + os.environ.get("PYTHONPATH", "")
    if os.environ.get("RAY_ADDRESS"):
        # inside `ray job submit` (or pointed at a cluster): the job's runtime env (working_dir, env_vars)
        # already applies, and a second runtime_env here would fail to merge with it
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # the dashboard is required: without it Train V2 leaks placement groups between runs
        ray.init(num_cpus=num_cpus, include_dashboard=True, runtime_env={"env_vars": env}, configure_logging=False,
                 **local_ray_options())
    import sys

    import ray.data

    # Ray Data's progress bars are for terminals; in logs (CI, job submit) they drown the step lines
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return ray


def listening_addresses(pids: set[int] | None = None) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket of this process's descendants (Ray's services
    on a local run), or of `pids`."""
    import psutil

    if pids is None:
        pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.laddr.ip, c.laddr.port, c.pid))
    return sorted(out)
