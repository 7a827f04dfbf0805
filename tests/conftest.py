import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
# the venv's bin first, as `make` and an activated shell have it: DeepSpeed JIT-builds its CPU shm op with the
# first `ninja` on PATH, and the venv's (1.13) and the system's (1.11) hash commands differently, so each
# rebuilt the op (~1 min on 2 cores) every time a process that found the other one had built it last
_VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A random 2-layer Llama + BPE tokenizer trained here (seconds, offline)."""
    from stages.tiny import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("tiny") / "backbone")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    p = SHARED / "data"
    if not p.exists():
        pytest.skip("../shared/data is not present")
    return p


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (dashboard on: Train V2 cleanup needs it)."""
    import ray

    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
                                       "DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    from pipeline.cluster import local_ray_options

    if ray.is_initialized():
        ray.shutdown()
    # loopback only, as every local run (pipeline.cluster.ensure_ray)
    ray.init(num_cpus=2, include_dashboard=True, runtime_env={"env_vars": env}, configure_logging=False,
             log_to_driver=False, **local_ray_options())
    yield ray
    ray.shutdown()
