"""The in-process runner: the one loop with the plain torch engine in this process (benches, tests,
`engine.kind=torch`), on the GPU when there is one (bf16 autocast by `engine.precision=auto`), else the
CPU in fp32. Rows are read here through the core readers; this is not the Ray path."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.train.rows import local_source, read_rows
from pipeline.train.run_folder import MetricsWriter, check_out_dir, claim_out_dir, write_report
from pipeline.train.start_model import prepare_model


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


def device_name(device) -> str:
    """'cpu', or 'cuda:<name of the card>' (reports say which card a number came from)."""
    import torch

    device = torch.device(device)
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def run_inprocess(cfg: TrainConfig, model_path: str | Path, data_path: str | Path, out: str | Path,
                  overwrite: bool = False, progress: bool | None = None) -> dict:
    """Reference trainer: the one loop with the plain torch engine, in this process, one worker."""
    import torch

    from pipeline.train.engines import TorchEngine
    from pipeline.train.loop import train_loop

    t_start = time.time()
    torch.manual_seed(cfg.seed)
    out, rows, bad, model = prepare_run(cfg, model_path, data_path, out, overwrite)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # the Ray workers' rule
    model.to(device)
    engine = TorchEngine(model, cfg.optim, cfg.steps, cfg.micro_steps(), cfg.engine.precision)
    writer = MetricsWriter(out, cfg.steps, cfg.stage, progress)

    def checkpoint(step: int) -> None:
        if step == cfg.steps:
            return                                   # the final model is saved below
        model.save_pretrained(out / "checkpoints" / f"step-{step}")

    try:
        final = train_loop(model, engine, local_source(model.tokenizer, rows, cfg), cfg, log=writer, device=device,
                           checkpoint=checkpoint if cfg.checkpoint_every else None)
    finally:
        writer.close()
    model.save_pretrained(out / "model")
    report = {"stage": cfg.stage, "engine": "torch", "workers": 1, "device": device_name(device),
              "precision": str(engine.amp_dtype or torch.float32).removeprefix("torch."), "model_in": str(model_path),
              "data": str(data_path), "steps": cfg.steps, "rows": len(rows), "bad_records": bad,
              "idf": model.token_weight_info,
              "seconds": round(time.time() - t_start, 2), "final": final, "config": cfg.to_dict()}
    write_report(out, report)
    return report
