"""A training run folder: refusing/claiming --out, metrics.jsonl + TensorBoard, the report.

Everything both runners (in-process and Ray) write into `--out` goes through here.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

RUN_MARKERS = ("report.json", "metrics.jsonl", "model", "checkpoints")
# everything a run writes into its folder: --overwrite removes these, and nothing else
RUN_OUTPUTS = (*RUN_MARKERS, "report.md", "tensorboard", "quarantine.jsonl", ".attempts", "ray")


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
        # wall seconds since the writer started: with `tokens`, the run's rate including time spent outside
        # the steps (logging, Ray Train reports, evaluation), which tokens_per_s leaves out
        rec = {**rec, "elapsed_s": round(time.time() - self.t0, 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        for k, v in rec.items():
            if k not in ("step", "elapsed_s") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{self.stage}/{k}", v, rec["step"])
        parts = " ".join(f"{k}={v:.4g}" for k, v in rec.items() if k not in ("step", "lr", "tokens_per_s", "tokens", "elapsed_s"))
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
