#!/usr/bin/env bash
# Two ranks against one on one device: `omnilab trace` of the eval split on a tiny synthesized checkpoint, once in
# one process and once under torchrun with two processes (gloo; on one GPU both ranks share it, NCCL needs one GPU
# per rank), then every Parquet shard compared for equality. Further arguments go to both `omnilab trace` runs
# (`--dtype bfloat16` on a GPU takes the grouped prefill, omnilab/prefill.py).
#   bash bench/trace_ranks.sh cpu|cuda:0 WORKDIR [TRACE ARGS...]
set -euo pipefail
device=${1:-cpu}; work=${2:-/tmp/omnilab-trace-ranks}; shift $(( $# < 2 ? $# : 2 ))
py=${PYTHON:-python}
rm -rf "$work"; mkdir -p "$work"
$py -m omnilab synth tiny-omni "$work/tiny" > /dev/null
args=(trace "$work/tiny" --corpus data/eval/eval.jsonl --max-tokens 64 --batch-tokens 2048 --device "$device" "$@")
$py -m omnilab "${args[@]}" --out "$work/one" --json > "$work/one.json"
$py -m torch.distributed.run --standalone --nproc-per-node 2 -m omnilab "${args[@]}" --backend gloo \
    --out "$work/two" --json > "$work/two.json"
$py - "$work" <<'PY'
import glob, json, sys
import pyarrow.parquet as pq
w = sys.argv[1]
a, b = (sorted(glob.glob(f"{w}/{x}/shards/*.parquet")) for x in ("one", "two"))
same = len(a) == len(b) > 0 and all(pq.read_table(x).equals(pq.read_table(y)) for x, y in zip(a, b))
one, two = (json.load(open(f"{w}/{x}.json")) for x in ("one", "two"))
print(f"two ranks == one rank: {same} ({len(a)} shards, {one['tokens']:,} tokens; "
      f"{one['run']['tokens_per_s']:,.0f} tokens/s in one process, {two['run']['tokens_per_s']:,.0f} in two; "
      f"prefill {one['run']['prefill']} / {two['run']['prefill']}"
      f"{', refused: ' + one['run']['prefill_refusal'] if one['run']['prefill_refusal'] else ''})")
sys.exit(0 if same else 1)
PY
