"""Everything around the loop that both the in-process and the Ray runners share: picking the
starting model for a stage, reading training rows, batching, and the run folder's outputs.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.config import TrainConfig
from stages.model import CONFIG_NAME, LBRModel
from stages.objectives import stage1_arrays, stage2_arrays
from stages.readers import Quarantine, beir_pairs, is_beir_folder, read_beir, read_corpus, read_pairs
from stages.text import doc_text

RUN_MARKERS = ("report.json", "metrics.jsonl", "model", "checkpoints")
# everything a run writes into its folder: --overwrite removes these, and nothing else
RUN_OUTPUTS = (*RUN_MARKERS, "report.md", "tensorboard", "quarantine.jsonl", ".attempts", "ray")


# ---------------------------------------------------------------------- model
def is_lbr_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).exists()


def prepare_model(cfg: TrainConfig, model_path: str | Path) -> LBRModel:
    """Stage rules of DESIGN §1: stage 2 starts from a stage-1 folder, or is the LLM+CL baseline."""
    from pipeline.model_paths import resolve_model_dir

    model_path = Path(resolve_model_dir(model_path))      # a run folder stands for its model/
    if not model_path.exists():
        raise FileNotFoundError(f"--model {model_path} does not exist")
    if cfg.stage == "contrastive":
        if cfg.baseline == "llm_cl":
            if is_lbr_folder(model_path):
                raise ValueError(f"--baseline llm_cl trains a plain backbone, but {model_path} is an LBR folder")
            m = cfg.model
            pooling = m.pooling if m.pooling in ("last", "mean") else "last"
            return LBRModel.from_backbone(model_path, num_bottleneck=0, pooling=pooling, max_length=m.max_length,
                                          lora_r=m.lora_r, lora_alpha=m.lora_alpha, lora_targets=m.lora_targets,
                                          num_layers=m.num_layers)
        if not is_lbr_folder(model_path):
            raise ValueError(f"stage 2 (contrastive) needs a stage-1 output folder as --model; {model_path} is a "
                             "plain backbone. Run stage 1 first, or pass --baseline llm_cl for the LLM+CL baseline.")
        return LBRModel.from_pretrained(model_path)
    if is_lbr_folder(model_path):
        return LBRModel.from_pretrained(model_path)          # continue stage 1 from an earlier run
    m = cfg.model
    return LBRModel.from_backbone(model_path, num_bottleneck=m.num_bottleneck, pooling=m.pooling,
                                  latent_dim=m.latent_dim, max_length=m.max_length, lora_r=m.lora_r,
                                  lora_alpha=m.lora_alpha, lora_targets=m.lora_targets, num_layers=m.num_layers,
                                  head_init=m.head_init, bottleneck_init=m.bottleneck_init,
                                  bottleneck_prompt=m.bottleneck_prompt)


# ---------------------------------------------------------------------- rows
def read_rows(cfg: TrainConfig, data_path: str | Path, quarantine: Path | None = None) -> tuple[list[dict], dict]:
    """Training rows for the stage, plus the bad-record summary.

    generative: [{"_id", "text"}] from a JSONL/Parquet/BEIR corpus;
    contrastive: [{"query", "positive", "negatives"}] from a BEIR folder (query -> each relevant doc)
    or a pairs / mined-negatives file.
    """
    d = cfg.data
    q = Quarantine(skip=d.skip_bad_records, path=quarantine)
    if cfg.stage == "generative":
        docs = read_corpus(data_path, text_field=d.text_field, quarantine=q)
        rows = [{"_id": x["_id"], "text": doc_text(x)} for x in docs]
    elif is_beir_folder(data_path):
        rows = beir_pairs(read_beir(data_path, split=d.split, quarantine=q))
    else:
        rows = read_pairs(data_path, d.query_field, d.positive_field, d.negatives_field, quarantine=q)
    if d.max_records is not None:
        rows = rows[: d.max_records]
    if cfg.stage == "contrastive" and cfg.stage2.num_negatives > 0:
        short = [i for i, r in enumerate(rows) if len(r["negatives"]) < cfg.stage2.num_negatives]
        if short:
            raise ValueError(f"{data_path}: row {short[0]} has {len(rows[short[0]]['negatives'])} negatives but "
                             f"stage2.num_negatives={cfg.stage2.num_negatives} ({len(short)} rows too short)")
    if len(rows) < cfg.batch_size * cfg.workers:
        raise ValueError(f"{data_path}: {len(rows)} usable rows, fewer than batch_size x workers = "
                         f"{cfg.batch_size * cfg.workers}")
    return rows, q.summary()


def encode_rows(tokenizer, rows: list[dict], cfg: TrainConfig, fixed: bool) -> dict[str, np.ndarray]:
    """Tokenised arrays for a list of rows (the same function Ray Data's map_batches calls)."""
    if cfg.stage == "generative":
        return stage1_arrays(tokenizer, [r["text"] for r in rows], [str(r["_id"]) for r in rows], cfg.stage1, fixed)
    negs = [r["negatives"] for r in rows] if cfg.stage2.num_negatives > 0 else None
    return stage2_arrays(tokenizer, [r["query"] for r in rows], [r["positive"] for r in rows], negs, cfg.stage2,
                         fixed)


def local_source(tokenizer, rows: list[dict], cfg: TrainConfig, rank: int = 0, world: int = 1):
    """Per-epoch batches for in-process training: seeded shuffle, this rank's slice, full batches only."""
    def source(epoch: int) -> Iterator[dict]:
        order = list(range(len(rows)))
        random.Random(cfg.seed * 7919 + epoch).shuffle(order)
        per = cfg.batch_size * world
        for s in range(0, len(order) - per + 1, per):
            chunk = order[s + rank * cfg.batch_size: s + (rank + 1) * cfg.batch_size]
            yield encode_rows(tokenizer, [rows[i] for i in chunk], cfg, fixed=False)
    return source


# ---------------------------------------------------------------------- run folder
def check_out_dir(out: str | Path, overwrite: bool) -> list[Path]:
    """Refuse an --out that holds a previous run unless `overwrite`; change nothing.

    Returns the previous run's own entries (RUN_OUTPUTS) that `claim_out_dir` removes once the new
    run's inputs are validated; other files in the folder are never touched.
    """
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise FileExistsError(f"--out {out} is a dangling symlink")
    if not out.exists():
        return []
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    found = [m for m in RUN_MARKERS if (out / m).exists()]
    if found and not overwrite:
        raise FileExistsError(f"--out {out} holds a previous run ({', '.join(found)}); pass --overwrite "
                              "to replace it")
    if not found:   # not a run (yet): only a quarantine file an earlier failed attempt left is ours
        return [out / "quarantine.jsonl"] if (out / "quarantine.jsonl").is_file() else []
    return [out / e for e in RUN_OUTPUTS if (out / e).exists() or (out / e).is_symlink()]


def claim_out_dir(out: str | Path, overwrite: bool, stale: list[Path] | None = None) -> Path:
    """Create --out, removing a previous run's own entries (only with `overwrite`; see check_out_dir).

    Call it after the inputs are validated: a refused or failing run leaves the old one whole.
    """
    out = Path(out)
    for p in check_out_dir(out, overwrite) if stale is None else stale:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def prepare_run(cfg: TrainConfig, model_path: str | Path, data_path: str | Path, out: str | Path,
                overwrite: bool, load_model: bool = True):
    """Validate --out, the rows and the model, and only then claim the run folder.

    Returns (out, rows, bad-record summary, model or None). Quarantined records are collected in a
    temp file and moved to out/quarantine.jsonl, which a re-run replaces (never appends to).
    """
    import os
    import tempfile

    stale = check_out_dir(out, overwrite)
    fd, qtmp = tempfile.mkstemp(prefix="lbr-quarantine-", suffix=".jsonl")
    os.close(fd)
    os.unlink(qtmp)
    try:
        rows, bad = read_rows(cfg, data_path, quarantine=Path(qtmp))
        model = prepare_model(cfg, model_path) if load_model else None
        out = claim_out_dir(out, overwrite, stale)
        if Path(qtmp).exists():
            shutil.move(qtmp, out / "quarantine.jsonl")
            bad = {**bad, "quarantine_file": str(out / "quarantine.jsonl")}
        else:
            bad = {**bad, "quarantine_file": None}
    finally:
        Path(qtmp).unlink(missing_ok=True)
    return out, rows, bad, model


class MetricsWriter:
    """metrics.jsonl (one line per logged step) + TensorBoard scalars + a progress display."""

    def __init__(self, out: Path, total_steps: int, stage: str, progress: bool | None = None, resume: bool = False,
                 echo: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out / "metrics.jsonl"
        if not resume and self.path.exists():
            self.path.unlink()
        self.tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.stage = stage
        self.echo = echo
        self.bar = None
        use_bar = echo and (sys.stderr.isatty() if progress is None else progress)
        if use_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, desc=stage, unit="step")
        self.t0 = time.time()
        self.total = total_steps

    def __call__(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{self.stage}/{k}", v, rec["step"])
        parts = " ".join(f"{k}={v:.4g}" for k, v in rec.items() if k not in ("step", "lr", "tokens_per_s"))
        if self.bar is not None:
            self.bar.n = rec["step"]
            self.bar.set_postfix_str(f"{parts} tok/s={rec['tokens_per_s']:.0f}")
            self.bar.refresh()
        elif self.echo:
            print(f"[{self.stage}] step {rec['step']}/{self.total} {parts} lr={rec['lr']:.3g} "
                  f"tok/s={rec['tokens_per_s']:.0f}", flush=True)

    def close(self) -> None:
        self.tb.flush()
        self.tb.close()
        if self.bar is not None:
            self.bar.close()


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def write_report(out: Path, report: dict) -> None:
    """report.json last: its presence marks a complete run folder."""
    from stages.io import write_json

    lines = [f"# Training report: {report.get('stage')}", ""]
    for k in ("model_in", "data", "steps", "rows", "seconds", "final"):
        if k in report:
            lines.append(f"- **{k}**: `{json.dumps(report[k])}`")
    if report.get("bad_records"):
        lines.append(f"- **bad records**: `{json.dumps(report['bad_records'])}`")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_json(out / "report.json", report)


def run_inprocess(cfg: TrainConfig, model_path: str | Path, data_path: str | Path, out: str | Path,
                  overwrite: bool = False, progress: bool | None = None) -> dict:
    """Reference trainer: the one loop with the plain torch engine, in this process, one worker."""
    import torch

    from pipeline.engines import TorchEngine
    from pipeline.train_loop import train_loop

    t_start = time.time()
    torch.manual_seed(cfg.seed)
    out, rows, bad, model = prepare_run(cfg, model_path, data_path, out, overwrite)
    engine = TorchEngine(model, cfg.optim, cfg.steps, cfg.micro_steps())
    writer = MetricsWriter(out, cfg.steps, cfg.stage, progress)

    def checkpoint(step: int) -> None:
        if step == cfg.steps:
            return                                   # the final model is saved below
        model.save_pretrained(out / "checkpoints" / f"step-{step}")

    try:
        final = train_loop(model, engine, local_source(model.tokenizer, rows, cfg), cfg, log=writer,
                           checkpoint=checkpoint if cfg.checkpoint_every else None)
    finally:
        writer.close()
    model.save_pretrained(out / "model")
    report = {"stage": cfg.stage, "engine": "torch", "workers": 1, "model_in": str(model_path),
              "data": str(data_path), "steps": cfg.steps, "rows": len(rows), "bad_records": bad,
              "seconds": round(time.time() - t_start, 2), "final": final, "config": cfg.to_dict()}
    write_report(out, report)
    return report
