"""Model folders as the command line names them: a run folder stands for its `model/`, and the one
fingerprint that says whether two model folders give the same vectors.

Why here: every entry point that accepts a model folder (train, tune, evaluate, build_index, search,
mine_negatives) accepts the run folder that holds it, the same way; and an index refuses a query
model by this fingerprint, so it covers everything that changes a vector: the LBR config (pooling,
K, max_length, architecture), the weights and every tokenizer file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from stages.io import sha256_file
from stages.model import CONFIG_NAME, WEIGHTS_NAME

FINGERPRINT_VERSION = "lbr-fp/2"
RUN_FILES = ("report.json", "metrics.jsonl", "checkpoints")


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def is_run_dir(path: str | os.PathLike) -> bool:
    """A training run folder: its `model/` is an LBR model folder."""
    return is_model_dir(Path(path) / "model") and not is_model_dir(path)


def resolve_model_dir(path: str | os.PathLike) -> str:
    """`RUN` -> `RUN/model` for a run folder; anything else (model folder, backbone, alias) unchanged."""
    p = Path(path)
    return str(p / "model") if is_run_dir(p) else str(path)


def model_files(path: str | os.PathLike) -> list[str]:
    """The files of a model folder a vector depends on, as sorted relative POSIX paths."""
    root = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root} is not an LBR model folder: {name} is missing")
    tok = root / "tokenizer"
    if not tok.is_dir():
        raise FileNotFoundError(f"{root} is not an LBR model folder: tokenizer/ is missing")
    toks = sorted(p.relative_to(root).as_posix() for p in tok.rglob("*") if p.is_file())
    return [CONFIG_NAME, WEIGHTS_NAME, *toks]


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over (name, sha256) of the config, the weights and every tokenizer file."""
    root = Path(path)
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for rel in model_files(root):
        h.update(f"\n{rel}\t{sha256_file(root / rel)}".encode())
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"


def model_dimension(path: str | os.PathLike) -> int:
    """Embedding dimension of a model folder, read from its config (no weights loaded)."""
    f = Path(path) / CONFIG_NAME
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
        hidden = int(cfg["backbone_config"]["hidden_size"])
        if cfg.get("pooling", "bottleneck") == "bottleneck" and cfg.get("latent_dim"):
            return int(cfg["latent_dim"])
        return hidden
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not an LBR model folder: {CONFIG_NAME} is missing") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: not a valid LBR config ({type(e).__name__}: {e})") from None
