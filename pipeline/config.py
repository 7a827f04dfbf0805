"""Typed, frozen run configuration: YAML file + dotted `key=value` overrides.

Why strict: a typo in a config key or an impossible value must fail before any work starts, naming
the field and the value — not surface an hour later as a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.model import ALL_LINEAR, DEFAULT_BOTTLENECK_PROMPT
from stages.objectives import Stage1Config, Stage2Config

STAGES = ("generative", "contrastive")


@dataclass(frozen=True)
class ModelConfig:
    """How a fresh LBRModel is built from a backbone (stage 1, or stage 2 of the LLM+CL baseline)."""

    num_bottleneck: int = 8
    pooling: str = "bottleneck"        # bottleneck | last | mean
    latent_dim: int | None = None
    max_length: int = 256
    lora_r: int = 0
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ALL_LINEAR
    num_layers: int | None = None
    head_init: str = "identity"        # identity | random (the variational head's mu at step 0)
    bottleneck_init: str = "prompt"    # prompt | random (the K new rows at step 0)
    bottleneck_prompt: str = DEFAULT_BOTTLENECK_PROMPT
    readout: str = "bottleneck"        # bottleneck | joint | dual (stages.model.READOUTS)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    new_lr: float | None = None        # lr of the new parameters (bottleneck rows, heads); None: lr
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"           # linear | cosine | constant (decay after warmup)
    grad_clip: float = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if self.new_lr is not None and self.new_lr <= 0:
            raise ValueError(f"optim.new_lr={self.new_lr} must be > 0 (or unset: same as optim.lr)")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"optim.schedule={self.schedule!r} must be linear, cosine or constant")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum={self.grad_accum} must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    kind: str = "deepspeed"            # deepspeed | ddp | torch (torch: in-process, single worker)
    zero: int = 2
    offload: bool = False
    precision: str = "auto"            # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    gather_negatives: bool = True      # stage 2: negatives from all workers
    zero_single_worker: bool = False   # one worker: run `zero` as set (default: stage 0, see effective_zero)

    def effective_zero(self, world_size: int, bf16: bool) -> int:
        """The ZeRO stage DeepSpeed runs. ZeRO partitions optimizer state, gradients and weights across ranks;
        with one rank in fp32 it partitions nothing but still pays its per-step bookkeeping (gradient buckets,
        flat copies, copy-back: 0.72x the in-process rate against 0.82x for stage 0 on bench/train_throughput.py's
        fully trained tiny model), so a one-worker fp32 run uses stage 0 - the same optimizer math, with one
        difference: with weight_decay > 0, ZeRO 1-2 give a trainable parameter that got no gradient a zero one and
        decay it, stage 0 (like the torch and DDP engines) leaves it. The configured stage stays with offload
        (needs stage >= 1), in bf16 (ZeRO 1-2 keep the fp32 master weights the export merges) and when
        `zero_single_worker` asks for it."""
        if world_size == 1 and not (self.offload or bf16 or self.zero_single_worker):
            return 0
        return self.zero

    def __post_init__(self):
        if self.kind not in ("deepspeed", "ddp", "torch"):
            raise ValueError(f"engine.kind={self.kind!r} must be deepspeed, ddp or torch")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"engine.zero={self.zero} must be 0, 1, 2 or 3")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"engine.precision={self.precision!r} must be auto, fp32 or bf16")


@dataclass(frozen=True)
class DataConfig:
    text_field: str = "text"           # stage 1: which field of a JSONL/Parquet row is the text
    query_field: str = "query"         # stage 2 pair files
    positive_field: str = "positive"
    negatives_field: str = "negatives"
    group_field: str | None = None     # stage 2 pair files: every batch is drawn from rows sharing this field's
                                       # value (same-domain in-batch negatives; in-process trainer only)
    split: str = "test"                # BEIR qrels split used as stage-2 training pairs
    skip_bad_records: bool = False
    max_records: int | None = None     # cap (e.g. laptop runs); None = all


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "generative"
    steps: int = 100
    batch_size: int = 8                # per worker, per micro-step
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0          # 0: only at the end
    report_every: int = 0              # Ray path: metric-only ray.train.report every N steps (at logged steps);
                                       # 0: reports only with checkpoints and dev evaluations. Each report blocks
                                       # the workers until the controller polls; metrics.jsonl logs every step
    workers: int = 1
    cpus_per_worker: float = 0.5
    baseline: str | None = None        # llm_cl: stage 2 from a plain backbone (model.pooling last|mean;
                                       # the default "bottleneck" means last)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} must be one of {STAGES}")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.report_every < 0:
            raise ValueError(f"report_every={self.report_every} must be >= 0 (0: only with checkpoints/evaluations)")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1")
        if self.baseline not in (None, "llm_cl"):
            raise ValueError(f"baseline={self.baseline!r} must be llm_cl or unset")
        c = self.stage2.chunk_size
        if c and self.batch_size % c:
            raise ValueError(f"stage2.chunk_size={c} must divide batch_size={self.batch_size} (GradCache chunks)")

    def micro_steps(self) -> int:
        """Backward passes per optimizer step: accumulation x GradCache chunks (stage 2)."""
        c = self.stage2.chunk_size if self.stage == "contrastive" else 0
        return self.optim.grad_accum * (self.batch_size // c if c and c < self.batch_size else 1)

    def grad_cache(self) -> bool:
        c = self.stage2.chunk_size
        return self.stage == "contrastive" and 0 < c < self.batch_size

    def to_dict(self) -> dict:
        return to_dict(self)


# ---------------------------------------------------------------------- generic (de)serialisation
def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(x) for x in obj]
    return obj


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(errors[0] if errors else f"{where}={value!r}: bad value")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}={value!r} must be a list")
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)          # YAML 1.1 reads 1e-4 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}={value!r} must be a string")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}={value!r} must be a mapping")
        return value
    return value


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types fail naming the field."""
    data = data or {}
    if not isinstance(data, dict):
        raise TypeError(f"{where or cls.__name__} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where + ': ' if where else ''}{e}") from None


def parse_overrides(items: list[str]) -> dict:
    """["stage2.tau=0.05", "steps=10"] -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. stage2.tau=0.05)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: empty key segment")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise TypeError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = _scalar(raw)
    return out


def _scalar(raw: str) -> Any:
    """YAML scalar, plus the numbers YAML 1.1 leaves as strings (e.g. 3e-3)."""
    if raw == "":
        return ""
    v = yaml.safe_load(raw)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path | None) -> dict:
    if not path:
        return {}
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise TypeError(f"{path}: the top level must be a mapping")
    return data


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None, **explicit) -> TrainConfig:
    """YAML, then dotted overrides, then explicit CLI flags (non-None) — later wins."""
    data = deep_merge(load_yaml(path), parse_overrides(overrides or []))
    data = deep_merge(data, {k: v for k, v in explicit.items() if v is not None})
    return from_dict(TrainConfig, data)
