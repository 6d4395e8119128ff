#!/bin/bash
# The issue-13 measurements on one H200, as run through the device tool (results into $OUT): the checkpoint is
# written to /dev/shm by bench/offload.py's parallel filler, omnilab's rows first (their table is written
# before the slower accelerate baseline starts), then accelerate at the smallest cap, then one table of both.
set -u
free -g | head -2
W=/dev/shm/omnilab-bench
PLAN=${PLAN:-"8/locality/compile+slot,8/locality/compile,8/uniform/compile+slot,8/uniform/compile,16/locality/compile+slot,16/uniform/compile+slot"}
COMMON="--device cuda --layers 48 --workdir $W --prompt-tokens 16 --new-tokens 32"
OFFLOAD_PARTIAL=$OUT/offload_partial.json python bench/offload.py $COMMON --plan "$PLAN" --rows ${ROWS:-omnilab,accelerate} \
  --row-timeout ${ROW_TIMEOUT:-240} --accelerate-timeout ${ACC_TIMEOUT:-170} --out $OUT/offload_h200_bf16.json --markdown $OUT/offload_h200_bf16.md 2>&1 | tee $OUT/log
echo "total ${SECONDS} s"
