#!/bin/bash
# The issue-13 measurements on one H200, as run through the device tool (results into $OUT): omnilab's rows first
# (their table is written before the slower accelerate baseline starts), then accelerate at the 8 GB cap.
set -u
free -g | head -2
W=/dev/shm/omnilab-bench
COMMON="--device cuda --layers 48 --workdir $W --caps ${CAPS:-8,16} --prompt-tokens 16 --new-tokens 32"
OFFLOAD_PARTIAL=$OUT/offload_partial.json python bench/offload.py $COMMON --rows omnilab --row-timeout 300 \
  --out $OUT/offload_h200_bf16.json --markdown $OUT/offload_h200_bf16.md 2>&1 | tee $OUT/log_offload
if [ -n "${ACCELERATE-1}" ]; then  # ACCELERATE= (empty) skips it
  python bench/offload.py $COMMON --rows accelerate --row-timeout ${ACC_TIMEOUT:-170} \
    --out $OUT/offload_accelerate.json --markdown $OUT/offload_accelerate.md 2>&1 | tee $OUT/log_accelerate
fi
echo "total ${SECONDS} s"
