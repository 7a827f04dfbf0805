"""Ray Tune search over the LBR knobs (bottleneck strength beta, K, temperature tau, refinement lambda).

Each trial is a Tune *function trainable* that runs the ordinary Ray Train stage(s) through
`pipeline.train.ray_runner.run_ray` (Train V2 pattern: the trial builds and fits the TorchTrainer itself and
a `TuneReportCallback` turns each `ray.train.report` into a Tune result). The workers measure dev
nDCG@10 every `tune.eval_every` steps, so ASHA can stop weak trials early.

Trial modes (decided from `--model`):
- stage-1 output folder -> the trial runs stage 2 only (`--train` = BEIR folder / pairs file).
  Params that only reach stage-1 knobs (`model.*`, `stage1.*`) cannot act and are dropped with a notice.
- backbone -> the trial runs stage 1 on `--stage1-data` (or `tune.stage1_data`) for
  `tune.stage1_steps` steps, then stage 2 on `--train`. dev nDCG@10 is reported from both stages on one
  step axis (`trial_step` = stage-1 steps + stage-2 step), so ASHA can already cut a bad K/beta after
  stage 1.

Resource sizing rule (`plan_resources`), so that concurrent trials never deadlock:
    trial footprint  F = 0.25 (trial actor) + workers x cpus_per_worker + 0.25 (Ray Data tokenise task)
    concurrency      = min(num_samples, floor((CPUs - 1) / F)), at least 1
    (GPU cluster: workers take 1 GPU + 1 CPU each; concurrency also <= floor(GPUs / workers))
One whole CPU is always left free: Ray Data / evaluation / Train controller tasks need it, and with all
CPUs held by trial placement groups the next trial's data pipeline waits forever (STACK-NOTES §3-4).
If F + 1 > CPUs the search refuses to start and names `cpus_per_worker`/`workers`. On a 2-CPU machine
(1 worker x 0.5 CPU) that is one trial at a time; on a 16-CPU node with 2 workers x 1 CPU, 6 at a time.
The Ray dashboard must be on (`ensure_ray` does it): Train V2 frees finished trials' placement groups
through the State API it serves; without it later trials hang.

Outputs in `--out`: `experiment/` (Tune experiment: per-trial result.json/progress.csv and TensorBoard
event files), `runs/<trial_id>/stage{1,2}/` (each trial's training runs: metrics.jsonl, tensorboard/,
model/), `search.json` (everything needed for `--resume`), `progress.jsonl` (one line per finished
trial), `trials.csv`, `best.yaml` (the best trial's full TrainConfig; `jobs.train --config best.yaml`),
`trials.png`.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from pipeline.config import TrainConfig, deep_merge, from_dict, load_yaml, parse_overrides, to_dict

TRIAL_CPU = 0.25
DATA_CPU = 0.25
METRIC = "ndcg@10"
TIME_ATTR = "trial_step"
EXPERIMENT = "experiment"
STAGE1_PREFIXES = ("model.", "stage1.")
ZERO_DRAW = "__zero"   # zero_or_loguniform: param `<name>__zero` ~ U(0,1) < p_zero turns `<name>` to 0
KINDS = ("choice", "uniform", "loguniform", "randint", "zero_or_loguniform", "value")


@dataclass(frozen=True)
class TuneSettings:
    """The `tune:` section of a search YAML (everything else in the file is a TrainConfig)."""

    num_samples: int = 8
    eval_every: int = 0                 # steps between dev evaluations; 0: steps // 4
    max_corpus: int | None = 2000       # dev subsample (seeded, keeps relevant docs)
    max_queries: int | None = 200
    eval_batch_size: int = 32
    grace_period: int = 0               # ASHA: steps before a trial can be stopped; 0: eval_every
    reduction_factor: int = 2
    max_concurrent_trials: int = 0      # 0: from the cluster (plan_resources)
    time_budget_s: float = 0.0          # 0: none
    stage1_data: str | None = None      # backbone mode: the stage-1 corpus
    stage1_steps: int = 0               # backbone mode: 0 = same as steps
    seed: int = 0
    space: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"tune.num_samples={self.num_samples} must be >= 1")
        for name in ("eval_every", "grace_period", "max_concurrent_trials", "stage1_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"tune.{name}={getattr(self, name)} must be >= 0")
        if self.reduction_factor < 2:
            raise ValueError(f"tune.reduction_factor={self.reduction_factor} must be >= 2")
        if not self.space:
            raise ValueError("tune.space is empty: nothing to search")
        for name, spec in self.space.items():
            _check_param(name, spec)


# ---------------------------------------------------------------------- search space
def _check_param(name: str, spec: Any) -> None:
    where = f"tune.space.{name}"
    if not isinstance(spec, dict):
        raise TypeError(f"{where}={spec!r} must be a mapping like {{loguniform: [0.01, 0.2]}}")
    kinds = [k for k in spec if k in KINDS]
    extra = sorted(set(spec) - set(KINDS) - {"targets", "p_zero"})
    if len(kinds) != 1 or extra:
        raise ValueError(f"{where}: needs exactly one of {KINDS} (+ optional targets, p_zero); got {sorted(spec)}")
    kind, arg = kinds[0], spec[kinds[0]]
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ValueError(f"{where}.choice={arg!r} must be a non-empty list")
    elif kind != "value":
        if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(_num(x), (int, float)) for x in arg)):
            raise ValueError(f"{where}.{kind}={arg!r} must be [low, high]")
        lo, hi = (_num(x) for x in arg)
        if not lo < hi or (kind in ("loguniform", "zero_or_loguniform") and lo <= 0):
            raise ValueError(f"{where}.{kind}={arg!r}: need 0 < low < high" if "log" in kind
                             else f"{where}.{kind}={arg!r}: need low < high")
    p = spec.get("p_zero", 0.2)
    if not (isinstance(_num(p), (int, float)) and 0 <= _num(p) <= 1):
        raise ValueError(f"{where}.p_zero={p!r} must be in [0, 1]")
    targets = spec.get("targets", [name])
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"{where}.targets={targets!r} must be a list of config keys (e.g. stage2.beta)")


def _num(x):
    if isinstance(x, str):
        try:
            return float(x)                # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            return x
    return x


def targets_of(name: str, spec: dict) -> list[str]:
    return list(spec.get("targets", [name]))


def build_param_space(space: dict, seed: int = 0) -> dict:
    from ray import tune

    out = {}
    for i, (name, spec) in enumerate(space.items()):
        kind = next(k for k in spec if k in KINDS)
        arg = spec[kind]
        if kind == "choice":
            out[name] = tune.choice(list(arg))
        elif kind == "value":
            out[name] = arg
        else:
            lo, hi = float(_num(arg[0])), float(_num(arg[1]))
            if kind == "uniform":
                out[name] = tune.uniform(lo, hi)
            elif kind == "loguniform":
                out[name] = tune.loguniform(lo, hi)
            elif kind == "randint":
                out[name] = tune.randint(int(lo), int(hi))
            else:
                # two plain domains (restore-safe, any searcher): the value and the draw that switches it to 0
                out[name] = tune.loguniform(lo, hi)
                out[name + ZERO_DRAW] = tune.uniform(0.0, 1.0)
    return out


def _nested(flat: dict) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def trial_config(ctx: dict, params: dict, stage: str = "contrastive") -> TrainConfig:
    """Base TrainConfig + this trial's sampled params (each written to all its targets)."""
    flat = {}
    for name, spec in ctx["space"].items():
        if name in params:
            value = params[name]
            if "zero_or_loguniform" in spec and params.get(name + ZERO_DRAW, 1.0) < float(_num(spec.get("p_zero", 0.2))):
                value = 0.0
            for t in targets_of(name, spec):
                flat[t] = value
    extra: dict = {"stage": stage, "checkpoint_every": 0}
    if stage == "generative":
        extra["steps"] = ctx["stage1_steps"]
    return from_dict(TrainConfig, deep_merge(deep_merge(ctx["base"], _nested(flat)), extra))


# ---------------------------------------------------------------------- config loading
def load_search(config_path: str | Path | None, overrides: list[str] | None = None, **explicit
                ) -> tuple[TrainConfig, TuneSettings]:
    """A search YAML = TrainConfig keys + a `tune:` section. `tune.X=...` overrides go to the section."""
    data = load_yaml(config_path)
    tune_data = data.pop("tune", {}) or {}
    overrides = list(overrides or [])
    tune_over = [o[len("tune."):] for o in overrides if o.startswith("tune.")]
    rest = [o for o in overrides if not o.startswith("tune.")]
    for o in tune_over:
        if o.split("=", 1)[0].startswith("space"):
            raise ValueError(f"override tune.{o}: edit the search space in the YAML file")
    tune_data = deep_merge(tune_data, parse_overrides(tune_over))
    base = deep_merge(data, parse_overrides(rest))
    base = deep_merge(base, {k: v for k, v in explicit.items() if v is not None})
    base.setdefault("stage", "contrastive")
    cfg = from_dict(TrainConfig, base)
    settings = from_dict(TuneSettings, tune_data, "tune")
    return cfg, settings


def plan_resources(cfg: TrainConfig, num_samples: int, cluster: dict, requested: int = 0) -> dict:
    """Concurrency from the cluster (see the module docstring for the rule)."""
    cpus = float(cluster.get("CPU", 0))
    gpus = float(cluster.get("GPU", 0))
    per_worker = 1.0 if gpus > 0 else cfg.cpus_per_worker
    footprint = TRIAL_CPU + cfg.workers * per_worker + DATA_CPU
    if footprint + 1 > cpus + 1e-9:
        raise ValueError(f"one trial needs {footprint:g} CPUs (0.25 trial + workers={cfg.workers} x "
                         f"cpus_per_worker={per_worker:g} + 0.25 data) plus 1 free CPU, but the cluster has "
                         f"{cpus:g}: lower cpus_per_worker or workers")
    by_cpu = int((cpus - 1) // footprint)
    limit = min(num_samples, max(1, by_cpu))
    if gpus > 0:
        limit = min(limit, max(1, int(gpus // cfg.workers)))
    if requested:
        limit = min(limit, requested)
    return {"trial_cpu": TRIAL_CPU, "footprint_cpu": footprint, "max_concurrent_trials": limit,
            "cluster_cpus": cpus, "cluster_gpus": gpus}


# ---------------------------------------------------------------------- trial side
def _report_callback(offset: int, stage: str):
    from ray.tune.integration.ray_train import TuneReportCallback

    class _StepReport(TuneReportCallback):
        """Adds `trial_step` (one step axis over stage 1 + stage 2) and the stage to each result."""

        def __init__(self):
            super().__init__()
            self.offset, self.stage = offset, stage

        def after_report(self, run_context, metrics, checkpoint):
            metrics = [{**m, TIME_ATTR: self.offset + int(m.get("step", 0)), "phase": self.stage}
                       for m in metrics]
            super().after_report(run_context, metrics, None)   # trial results only: no Tune checkpoints

    return _StepReport()


def run_trial(params: dict, ctx: dict) -> None:
    """The Tune function trainable: stage 1 (backbone mode) then stage 2, each a Ray Train run."""
    from ray import tune

    from pipeline.train.ray_runner import run_ray

    trial_id = tune.get_context().get_trial_id()
    root = Path(ctx["out"]) / "runs" / trial_id
    root.mkdir(parents=True, exist_ok=True)
    eval_config = {"dev": ctx["dev"], "every": ctx["eval_every"], "max_corpus": ctx["max_corpus"],
                   "max_queries": ctx["max_queries"], "batch_size": ctx["eval_batch_size"],
                   "report_only_eval": True}
    model, offset = ctx["model"], 0
    cfg2 = trial_config(ctx, params, "contrastive")
    (root / "config.yaml").write_text(yaml.safe_dump(cfg2.to_dict(), sort_keys=False))
    if ctx["mode"] == "backbone":
        cfg1 = trial_config(ctx, params, "generative")
        run_ray(cfg1, model, ctx["stage1_data"], root / "stage1", overwrite=True, eval_config=eval_config,
                run_config_kwargs={"callbacks": [_report_callback(0, "generative")]})
        model, offset = str(root / "stage1" / "model"), cfg1.steps
    run_ray(cfg2, model, ctx["train"], root / "stage2", overwrite=True, eval_config=eval_config,
            run_config_kwargs={"callbacks": [_report_callback(offset, "contrastive")]})


class ProgressFile(Callback):
    """Tune callback: one JSON line per finished trial in `<out>/progress.jsonl` (watchable, greppable),
    and the driver-side reaper of placement groups left behind by killed trials (`reap_orphan_train_pgs`)."""

    def __init__(self, path: str):
        self.path = path
        self._suspects: set = set()
        self._next = 0.0

    def on_step_begin(self, iteration, trials, **info):
        if time.time() >= getattr(self, "_next", 0.0):       # getattr: callbacks come back pickled on restore
            self._next = time.time() + 10
            try:
                self._suspects = reap_orphan_train_pgs(getattr(self, "_suspects", set()))
            except Exception as e:  # noqa: BLE001 (never let housekeeping break the search)
                print(f"[tune] placement-group check skipped: {e}", flush=True)

    def _write(self, trial, status):
        last = trial.last_result or {}
        with open(self.path, "a") as f:
            f.write(json.dumps({"trial_id": trial.trial_id, "status": status, METRIC: last.get(METRIC),
                                TIME_ATTR: last.get(TIME_ATTR), "time": time.time()}) + "\n")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(trial, "ERROR")


def reap_orphan_train_pgs(suspects: set) -> set:
    """Remove Ray Train worker placement groups whose workers are all dead (trial killed by ASHA/stop).

    Train V2 leaves this to a detached PlacementGroupCleaner that asks the State API for the controller's
    state without an address; on a host running more than one Ray instance that call fails ("Found
    multiple active Ray instances") and every ASHA-stopped trial leaks its workers' CPUs until later
    trials wait forever for a worker group. The driver knows its own cluster address, so it does the check:
    a placement group of this job whose actors are all dead RayTrainWorkers, seen so on two consecutive
    checks (>= 10 s apart), is removed. Returns the current suspects.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_actors, list_placement_groups

    addr = ray.get_runtime_context().gcs_address
    job = ray.get_runtime_context().get_job_id()
    pgs = {p.placement_group_id: p for p in list_placement_groups(
        address=addr, filters=[("state", "=", "CREATED")], limit=10000, raise_on_missing_output=False)}
    by_pg: dict = {}
    for a in list_actors(address=addr, detail=True, limit=10000, raise_on_missing_output=False):
        if a.placement_group_id in pgs:
            by_pg.setdefault(a.placement_group_id, []).append(a)
    orphans = {pg for pg, actors in by_pg.items()
               if pgs[pg].creator_job_id == job and all(a.state == "DEAD" for a in actors)
               and all(a.class_name == "RayTrainWorker" for a in actors)}
    for pg in orphans & suspects:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))
        print(f"[tune] removed placement group {pg[:12]} left by a stopped trial's Ray Train workers", flush=True)
    return orphans - suspects


# ---------------------------------------------------------------------- driver
def prepare_search(cfg: TrainConfig, settings: TuneSettings, model: str, train: str, dev: list[str], out: Path,
                   stage1_data: str | None = None) -> dict:
    """Validate everything before the first trial and return the search context (saved as search.json).

    Records are checked by Ray Data tasks (`check_rows`), so this starts the local Ray when none is running."""
    from pipeline.train.start_model import is_lbr_folder

    if not Path(model).exists():
        raise FileNotFoundError(f"--model {model} does not exist")
    for p in [train, *dev]:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p} does not exist")
    mode = "stage2" if is_lbr_folder(model) else "backbone"
    space = dict(settings.space)
    dropped = []
    if mode == "stage2":
        for name, spec in list(space.items()):
            keep = [t for t in targets_of(name, spec) if not t.startswith(STAGE1_PREFIXES)]
            if not keep:
                dropped.append(name)
                del space[name]
            elif len(keep) < len(targets_of(name, spec)):
                space[name] = {**spec, "targets": keep}
        if not space:
            raise ValueError(f"--model {model} is a stage-1 folder (trials run stage 2 only), and every searched "
                             f"param ({', '.join(dropped)}) is a stage-1 knob")
        stage1_data = None
    else:
        stage1_data = stage1_data or settings.stage1_data
        if not stage1_data:
            raise ValueError(f"--model {model} is a backbone, so each trial runs stage 1 first: pass "
                             "--stage1-data CORPUS (or tune.stage1_data in the YAML)")
        if not Path(stage1_data).exists():
            raise FileNotFoundError(f"--stage1-data {stage1_data} does not exist")
    eval_every = settings.eval_every or max(cfg.log_every, (cfg.steps // 4) // cfg.log_every * cfg.log_every)
    if eval_every % cfg.log_every:
        raise ValueError(f"tune.eval_every={eval_every} must be a multiple of log_every={cfg.log_every}")
    stage1_steps = settings.stage1_steps or cfg.steps
    if mode == "backbone" and stage1_steps % cfg.log_every:
        raise ValueError(f"tune.stage1_steps={stage1_steps} must be a multiple of log_every={cfg.log_every}")
    ctx = {"mode": mode, "model": str(Path(model).resolve()), "train": str(Path(train).resolve()),
           "dev": [str(Path(d).resolve()) for d in dev],
           "stage1_data": str(Path(stage1_data).resolve()) if stage1_data else None,
           "out": str(out.resolve()), "base": cfg.to_dict(), "space": space, "dropped": dropped,
           "eval_every": eval_every, "stage1_steps": stage1_steps, "max_corpus": settings.max_corpus,
           "max_queries": settings.max_queries, "eval_batch_size": settings.eval_batch_size,
           "settings": to_dict(settings)}
    # every param value must build a valid TrainConfig: sample each domain once, fail naming the key now
    probe = {}
    for name, spec in space.items():
        kind = next(k for k in spec if k in KINDS)
        arg = spec[kind]
        probe[name] = arg[0] if kind == "choice" else arg if kind == "value" else _num(arg[1])
    trial_config(ctx, probe, "contrastive")
    if mode == "backbone":
        trial_config(ctx, probe, "generative")
    # the same rows/model checks a training run does, once, before any trial: the model first (no Ray needed),
    # then every record through the Ray Data check pass — streamed, so the driver never holds the corpus
    from pipeline.train.start_model import prepare_model

    if mode != "backbone":
        prepare_model(trial_config(ctx, probe, "contrastive"), model)
    check_rows(trial_config(ctx, probe, "contrastive"), train)
    if mode == "backbone":
        check_rows(trial_config(ctx, probe, "generative"), stage1_data)
    return ctx


def check_rows(cfg: TrainConfig, path: str) -> None:
    """Validate `path` as `cfg`'s training input with the streaming check pass every Ray run makes (first bad
    record fails with its location unless data.skip_bad_records); its temporary quarantine is dropped."""
    from pipeline.cluster import ensure_ray
    from pipeline.train.stream import check_source, open_source

    src = open_source(path, cfg)
    ensure_ray()
    checked = check_source(src, cfg)
    if checked.quarantine is not None:
        checked.quarantine.unlink(missing_ok=True)


def max_t(ctx: dict) -> int:
    return ctx["base"]["steps"] + (ctx["stage1_steps"] if ctx["mode"] == "backbone" else 0)


def grace_period(ctx: dict, settings: TuneSettings) -> int:
    """ASHA grace period in trial steps. Default: one evaluation into stage 2 — in backbone mode trials are
    not cut on stage-1 scores alone (stage 2 can reorder them)."""
    g = settings.grace_period or ctx["eval_every"] + (ctx["stage1_steps"] if ctx["mode"] == "backbone" else 0)
    return max(1, min(g, max_t(ctx)))


def _trainable(ctx: dict, trial_cpu: float):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": trial_cpu})


def run_search(ctx: dict, resume: bool = False) -> dict:
    """Run (or with `resume`, finish) the search described by `ctx`; write the summary files."""
    from pipeline.cluster import ensure_ray

    ray = ensure_ray()
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    out = Path(ctx["out"])
    settings = from_dict(TuneSettings, ctx["settings"], "tune")
    exp = out / EXPERIMENT
    plan = plan_resources(from_dict(TrainConfig, ctx["base"]), settings.num_samples, ray.cluster_resources(),
                          settings.max_concurrent_trials)
    ctx = {**ctx, "plan": plan}
    t0 = time.time()
    if resume:
        if not tune.Tuner.can_restore(str(exp)):
            raise FileNotFoundError(f"--resume: no Tune experiment to restore in {exp}")
        # the same space again (Tune only needs it for objects it cannot restore; harmless otherwise)
        tuner = tune.Tuner.restore(str(exp), trainable=_trainable(ctx, plan["trial_cpu"]),
                                   param_space=build_param_space(ctx["space"], settings.seed),
                                   resume_unfinished=True, resume_errored=True)
    else:
        scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=max_t(ctx),
                                  grace_period=grace_period(ctx, settings),
                                  reduction_factor=settings.reduction_factor)
        tuner = tune.Tuner(
            _trainable(ctx, plan["trial_cpu"]),
            param_space=build_param_space(ctx["space"], settings.seed),
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=settings.num_samples,
                                        scheduler=scheduler, max_concurrent_trials=plan["max_concurrent_trials"],
                                        time_budget_s=settings.time_budget_s or None),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out),
                                      callbacks=[ProgressFile(str(out / "progress.jsonl"))]))
    grid = tuner.fit()
    summary = summarize(ctx, grid)
    summary["seconds"] = round(time.time() - t0, 1)
    summary["plan"] = plan
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _trial_status(status: str | None, last: dict, total: int) -> str:
    if status in ("ERROR", "PENDING", "RUNNING", "PAUSED"):
        return status
    if last.get(METRIC) is None:
        return "PENDING"
    return "COMPLETED" if (last.get(TIME_ATTR) or 0) >= total else "STOPPED"


def _trials_of(grid) -> list[tuple[str, str | None, dict, dict]]:
    """(trial_id, Tune status, params, last result) per trial; pending trials included."""
    analysis = getattr(grid, "_experiment_analysis", None)
    trials = getattr(analysis, "trials", None)
    if trials:
        return [(t.trial_id, t.status, dict(t.config or {}), dict(t.last_result or {})) for t in trials]
    return [((r.metrics or {}).get("trial_id") or Path(r.path).name, "ERROR" if r.error is not None else None,
             dict(r.config or {}), dict(r.metrics or {})) for r in grid]


def summarize(ctx: dict, grid) -> dict:
    """trials.csv, best.yaml, trials.png from a ResultGrid."""
    out = Path(ctx["out"])
    total = max_t(ctx)
    rows = []
    for trial_id, tune_status, params, last in _trials_of(grid):
        written = out / "runs" / trial_id / "config.yaml"
        try:
            # what the trial trained with (written at its start); else rebuilt from its params
            cfg = from_dict(TrainConfig, yaml.safe_load(written.read_text())) if written.exists() \
                else trial_config(ctx, params)
        except (TypeError, ValueError):             # a trial whose params never resolved (failed to start)
            cfg, tune_status = from_dict(TrainConfig, ctx["base"]), "ERROR"
        k = cfg.model.num_bottleneck if ctx["mode"] == "backbone" else _k_of(ctx["model"], cfg.model.num_bottleneck)
        rows.append({"trial_id": trial_id, "beta": cfg.stage2.beta, "num_bottleneck": k, "tau": cfg.stage2.tau,
                     "lambda": cfg.stage2.lam, METRIC: last.get(METRIC),
                     "status": _trial_status(tune_status, last, total),
                     "stage1_beta": cfg.stage1.beta if ctx["mode"] == "backbone" else "",
                     TIME_ATTR: last.get(TIME_ATTR), "params": json.dumps(params, sort_keys=True, default=str),
                     "_cfg": cfg})
    rows.sort(key=lambda r: r["trial_id"])
    fields = ["trial_id", "beta", "num_bottleneck", "tau", "lambda", METRIC, "status", "stage1_beta", TIME_ATTR,
              "params"]
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    best = pick_best(rows)
    if best is not None:
        header = (f"# best trial {best['trial_id']}: {METRIC}={best[METRIC]:.4f} ({best['status']}, "
                  f"step {best[TIME_ATTR]})\n# trained model: {out / 'runs' / best['trial_id'] / 'stage2' / 'model'}\n")
        if ctx["mode"] == "backbone":
            header += (f"# trial = stage 1 ({ctx['stage1_steps']} steps, --stage generative --steps "
                       f"{ctx['stage1_steps']}) then stage 2 (this file's steps)\n")
        header += "# use: python -m jobs.train --stage contrastive --config best.yaml --model ... --data ... --out ...\n"
        (out / "best.yaml").write_text(header + yaml.safe_dump(best["_cfg"].to_dict(), sort_keys=False))
    plot_trials(rows, out / "trials.png")
    return {"trials": [{k: v for k, v in r.items() if k != "_cfg"} for r in rows],
            "best": {k: v for k, v in best.items() if k != "_cfg"} if best else None,
            "mode": ctx["mode"], "dropped_params": ctx.get("dropped", []),
            "complete": all(r["status"] in ("COMPLETED", "STOPPED") for r in rows)}


def pick_best(rows: list[dict]) -> dict | None:
    """Highest final dev nDCG@10 among trials that ran to the end; only if none did, among all scored ones.

    An ASHA-stopped trial's last score is from an earlier step (in backbone mode possibly from stage 1),
    so it does not compete with finished trials.
    """
    done = [r for r in rows if r["status"] == "COMPLETED" and r[METRIC] is not None]
    pool = done or [r for r in rows if r[METRIC] is not None]
    return max(pool, key=lambda r: r[METRIC]) if pool else None


def _k_of(model: str, default: int) -> int:
    """K of a stage-1 folder (stage 2 keeps it; model.num_bottleneck cannot change it)."""
    from stages.model import CONFIG_NAME

    try:
        return int(json.loads((Path(model) / CONFIG_NAME).read_text()).get("num_bottleneck", default))
    except (OSError, ValueError):
        return default


def plot_trials(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r[METRIC] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    ks = sorted({r["num_bottleneck"] for r in pts})
    cmap = plt.get_cmap("viridis")
    for i, k in enumerate(ks):
        sel = [r for r in pts if r["num_bottleneck"] == k]
        color = cmap(i / max(1, len(ks) - 1))
        for ax, key in zip(axes, ("beta", "tau")):
            marker = ["o" if r["status"] == "COMPLETED" else "x" for r in sel]
            for r, m in zip(sel, marker):
                ax.scatter(r[key], r[METRIC], color=color, marker=m, label=f"K={k}" if r is sel[0] else None)
    betas = [r["beta"] for r in pts if r["beta"] > 0]
    lin = min(betas) if betas else 1e-4
    axes[0].set_xscale("symlog", linthresh=lin)
    axes[0].set_xlim(left=-lin / 2)                 # beta >= 0: no negative half
    axes[0].set_xlabel("beta (stage 2; 0 = IB off)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("tau")
    axes[0].set_ylabel("dev nDCG@10 (last report)")
    axes[0].legend(title="o completed, x stopped", fontsize=8)
    fig.suptitle(f"{len(pts)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_context(ctx: dict) -> None:
    (Path(ctx["out"]) / "search.json").write_text(json.dumps(ctx, indent=2))


def load_context(out: str | Path) -> dict:
    path = Path(out) / "search.json"
    if not path.exists():
        raise FileNotFoundError(f"--resume: {path} not found (was a search started in {out}?)")
    return json.loads(path.read_text())
