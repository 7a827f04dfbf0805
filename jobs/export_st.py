"""Export a trained model as a stock sentence-transformers folder (no remote code needed to load it).

    python -m jobs.export_st --model RUN_OR_MODEL_DIR --out DIR [--overwrite]
    # then: SentenceTransformer("DIR")   — no trust_remote_code; same vectors as LBRModel.encode (1e-5)

`--out` must be new, empty, or (with --overwrite) an earlier export (it holds lbr_export.json).
The export is checked before it is published: loaded without remote code, its vectors must match.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from jobs._cli import INPUT_ERRORS, Parser, fail, note


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.export_st", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="LBR model folder, or a run folder holding one in model/")
    p.add_argument("--out", required=True, help="sentence-transformers folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    return p.parse_args(argv)


def check_out(out: Path, overwrite: bool) -> None:
    from stages.st_export import EXPORT_MARKER

    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder; refusing to replace it")
    if (out / EXPORT_MARKER).is_file():
        if not overwrite:
            raise FileExistsError(f"--out {out} holds an export; pass --overwrite to replace it")
        return
    if any(os.scandir(out)):
        raise FileExistsError(f"--out {out} is not an export folder and is not empty; refusing to replace it")


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        from pipeline.model_paths import is_model_dir, is_run_dir, resolve_model_dir

        out = Path(a.out)
        check_out(out, a.overwrite)
        if is_run_dir(a.model):
            note(f"--model {a.model} is a run folder: using {Path(a.model) / 'model'}")
        model = resolve_model_dir(a.model)
        if not is_model_dir(model):
            raise FileNotFoundError(f"--model {a.model} is not an LBR model folder (lbr_config.json missing)")
        from stages.st_export import export_sentence_transformers

        export_sentence_transformers(model, out)
    except INPUT_ERRORS as e:
        return fail(e)
    print(json.dumps({"out": str(out), "load": f"SentenceTransformer({str(out)!r})"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
