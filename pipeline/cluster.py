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
    here for this process and inherited by the Ray processes it starts.
    """
    node_ip = os.environ.get("LBR_RAY_NODE_IP")
    opts = {"dashboard_host": os.environ.get("LBR_RAY_DASHBOARD_HOST") or LOOPBACK}
    if node_ip:
        opts["_node_ip_address"] = node_ip
    else:
        import ray._private.ray_constants as rc

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        rc.ENABLE_RAY_CLUSTER = False
    return opts


# EXPERIMENT (reverted in the next commit: no measurable gain, bench/results/train_throughput-niceness-ab.json).
# Ray starts every worker at niceness 15 (`RAY_worker_niceness`); the processes doing the job's work ask for
# 0 through their runtime env (Train workers, Ray Data read/tokenise/embed, index shard tasks); Ray's helper
# actors stay at 15; the local cluster's observability services are raised to LBR_RAY_SERVICE_NICENESS.
COMPUTE_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}
SERVICE_NICENESS = 19
_SERVICE_CMDLINES = ("ray/dashboard/dashboard.py", "ray/autoscaler/_private/monitor.py", "ray/_private/log_monitor.py")
_SERVICE_NAMES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def lower_service_priority(niceness: int | None = None) -> list[int]:
    """Raise the niceness of this process's local Ray observability services (and their children)."""
    import psutil

    n = int(os.environ.get("LBR_RAY_SERVICE_NICENESS", SERVICE_NICENESS)) if niceness is None else niceness
    if n <= 0:
        return []
    done = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if not (any(c in cmd for c in _SERVICE_CMDLINES) or p.name() in _SERVICE_NAMES
                    or any(cmd.startswith(name) for name in _SERVICE_NAMES)):
                continue
            for q in [p, *p.children(recursive=True)]:
                if q.nice() < n:
                    q.nice(n)
                done.append(q.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return done


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
        lower_service_priority()
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
