#!/bin/bash
# Device call 1 (carry .dev/a): stash GGUF part 1 and the data outside the repo, install the wheels,
# check every import the benchmark needs, and run the GPU tests plus a one-step tiny benchmark on CUDA,
# which goes through the same training, evaluation and metric code as the real run.
set -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
mkdir -p /root/stash /root/site /root/data
cp .dev/a/part1 .dev/a/stdlib.tar.xz /root/stash/ && tar -C /root/data -xJf .dev/a/data.tar.xz && echo stashed
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .dev/a/whl/*.whl || exit 2
export PYTHONPATH=/root/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LBR_SHARED_DATA=/root/data/shared/data
python3 -c "import torch, transformers, peft, gguf, bm25s, ranx; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))" || exit 3
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_precision.py 2>&1 | tail -n 3
mkdir -p /root/tiny && tar -C /root/tiny -xJf /root/stash/stdlib.tar.xz
timeout 240 python3 -m bench.quality --backbone tiny --datasets medquad --methods bm25 base lbr --steps1 2 --steps2 2 \
  --max-queries 20 --max-corpus 100 --work /root/tiny --out /root/tiny/q.json 2>&1 | grep -E "eval |done|Error|error" | tail -n 8
