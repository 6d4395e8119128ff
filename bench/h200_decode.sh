#!/bin/bash
# The issue-12 measurements on one H200, as run through the device tool (results into $OUT).
# 48 layers bf16: every row; then, with time left, the fp32 exactness check on a 4-layer real-shape thinker.
set -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /dev/shm /tmp | tail -2; free -g | head -2
W=/dev/shm/omnilab-bench
python bench/decode.py --device cuda --layers 48 --workdir $W --rows ${ROWS:-fast,hf,eager,fast-compiled} \
  --row-timeout 240 --out $OUT/decode_h200_bf16.json --markdown $OUT/decode_h200_bf16.md 2>&1 | tee $OUT/log48
rm -rf $W
if [ $SECONDS -lt ${FP32_BEFORE:-420} ]; then
  python bench/decode.py --device cuda --layers 4 --dtype float32 --workdir $W --rows fast,hf,eager \
    --hf-impl batched_mm,grouped_mm --new-tokens 64 --slow-tokens 32 --free-tokens 16 --repeats 1 --row-timeout 150 \
    --out $OUT/decode_h200_fp32.json --markdown $OUT/decode_h200_fp32.md 2>&1 | tee $OUT/log4
fi
echo "total ${SECONDS} s"
