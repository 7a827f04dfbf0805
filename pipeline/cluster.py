"""Connecting to Ray: the job's cluster under `ray job submit` (RAY_ADDRESS), else a local one.

One function for every entry point (training, embedding, index shards, Tune), so each starts Ray
the same way: the dashboard on (Train V2 needs its State API to free placement groups), bound to
127.0.0.1, this checkout on the workers' PYTHONPATH, offline hub settings passed through.
"""
from __future__ import annotations

import os
from pathlib import Path


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
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env}, configure_logging=False)
    import sys

    import ray.data

    # Ray Data's progress bars are for terminals; in logs (CI, job submit) they drown the step lines
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return ray
