#!/bin/bash
# The issue-13 measurements on one H200, as run through the device tool (results into $OUT).
set -u
free -g | head -2
W=/dev/shm/omnilab-bench
OFFLOAD_PARTIAL=$OUT/offload_partial.json python bench/offload.py --device cuda --layers 48 --workdir $W --rows ${ROWS:-omnilab,accelerate} --caps 8,16 \
  --prompt-tokens 16 --new-tokens 32 --row-timeout 300 \
  --out $OUT/offload_h200_bf16.json --markdown $OUT/offload_h200_bf16.md 2>&1 | tee $OUT/log_offload
echo "total ${SECONDS} s"
