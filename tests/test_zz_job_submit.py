"""`ray job submit --working-dir . -- python -m jobs.train ...` against a head on loopback.

Runs last (file name) and in its own Ray head, started with `ray start --head --block` in a child
process and stopped by signalling that process — never `ray stop`, which would kill every Ray
cluster on the machine, including the test session's."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_via_ray_job_submit_on_loopback(tiny_backbone, tmp_path):
    import ray

    # one Ray instance per machine: with two, Train V2's PlacementGroupCleaner cannot tell which to query
    ray.shutdown()
    ray_bin = Path(sys.executable).with_name("ray")
    # the head and the job see this venv first on PATH, as in an activated shell (make runs .venv/bin/python)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    gcs, dash, agent = _free_port(), _free_port(), _free_port()
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
         # not the default 52365: another Ray on this host (a user's, a demo) would own it, and the job agent
         # of this head would then fail to bind and never register ("No available agent to submit job")
         f"--dashboard-agent-listen-port={agent}",
         f"--temp-dir={tempfile.mkdtemp(prefix='lbrray', dir='/tmp')}"],   # short: socket paths <= 107 chars
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"protein kinase {i} binds receptor {i % 7}"}) + "\n"
                              for i in range(64)))
    out = tmp_path / "run"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            r = subprocess.run([str(ray_bin), "job", "list", "--address", f"http://127.0.0.1:{dash}"], check=False,
                               env=env,
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("the Ray head did not come up")
        submit = (
            [str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                                                            "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")},
                                               "excludes": [".venv", ".cache", "runs", ".git"]}),
             "--", sys.executable, "-m", "jobs.train", "--stage", "generative", "--model", str(tiny_backbone),
             # one worker: the 2-worker ZeRO-2 path is tests/test_distributed.py's; this test is about submission
             "--data", str(corpus), "--out", str(out), "--workers", "1", "--zero", "2", "--steps", "3",
             "batch_size=4", "log_every=1", "stage1.context_len=16", "stage1.target_len=8"])
        # the dashboard answers before the node's job agent has registered; Ray says to retry then
        # (seen on a loaded 2-core box: "No available agent to submit job, please try again later")
        deadline = time.time() + 180
        while True:
            r = subprocess.run(submit, check=False, env=env, capture_output=True, text=True, timeout=600)
            if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in (r.stdout + r.stderr)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    from stages import LBRModel

    assert LBRModel.from_pretrained(out / "model").encode(["protein kinase"]).shape[0] == 1
