#!/bin/bash
# Build the two payloads a device lease (bench/device/README.md) needs for the GPU quality run. One call
# carries at most 64 MiB and the SmolLM2 GGUF alone is 98 MB, so it travels in two parts:
#   .dev/a  GGUF bytes [0, PART1) + ../shared/data + the stdlib eval set + the wheels the image lacks
#   .dev/b  the rest of the GGUF
# Both folders are ignored by git (.git/info/exclude). Usage: bench/device/pack.sh [bench work dir]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
WORK=${1:-runs/quality-smollm2-idf}
PART1=${PART1:-34000000}
grep -qx "/.dev/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.dev/" >> .git/info/exclude; }
rm -rf .dev/a .dev/b && mkdir -p .dev/a/whl .dev/b
GGUF=$($PY -c "from stages.backbone import smollm2_gguf_path; print(smollm2_gguf_path())")
head -c "$PART1" "$GGUF" > .dev/a/part1
tail -c +"$((PART1 + 1))" "$GGUF" > .dev/b/part2
sha256sum < "$GGUF" | cut -d' ' -f1 > .dev/b/gguf.sha256
tar -C "$(realpath ../shared/..)" -cf - shared/data | xz -T2 -6 > .dev/a/data.tar.xz
if [ ! -f "$WORK/stdlib_code/meta.json" ]; then       # the same stdlib set as the CPU table (built by this Python)
  $PY -c "from pipeline.stdlib_code import build_stdlib_code; build_stdlib_code('$WORK/stdlib_code', seed=0)"
fi
tar -C "$WORK" -cf - stdlib_code | xz -T2 -6 > .dev/a/stdlib.tar.xz
# the image has torch, numpy, pandas, numba, seaborn, pyarrow...; not these (ranx: the metrics; its
# top-level imports pull ir_datasets, cbor2, lz4, orjson), and transformers/peft at other versions
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .dev/a/whl transformers==5.24.0 peft==0.21.2 gguf==0.19.0 bm25s==0.3.16 ranx==0.3.21 \
  ir_datasets==0.6.3 cbor2==6.3.0 lz4==4.4.5 orjson==3.13.0
cp bench/device/step1.sh .dev/a/ && cp bench/device/step2.sh .dev/b/
du -cb .dev/a | tail -1; du -cb .dev/b | tail -1
echo "each call carries its folder plus the work tree ($(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes tracked): keep both under 67108864"
