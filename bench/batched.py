"""Batched decode on the fast path (omnilab.gpu.fast.FastDecoder(batch=B, compile=True)) per expert compute way,
against the HBM floor of each batch: a step reads the backbone once, every distinct routed expert once (counted
from the routing the decoder recorded) and each row's KV cache.

    python bench/batched.py --checkpoint /dev/shm/ol/omni-thinker-48l --batches 1,8,32,64 --hbm-tb-s 3.35
    python bench/batched.py --checkpoint CKPT --computes triton --batches 8,32 --out b.json --markdown b.md

Teacher-forced decode (random prompt and input ids, seeded), so routing varies as on a corpus rather than
repeating a random-weight model's one greedy token. Real shapes, random weights, bf16; one process, one
slot pool shared by every row (built once).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--computes", default="grouped_mm,triton")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hbm-tb-s", type=float, default=3.35)
    p.add_argument("--device", default="cuda", help="cuda (cpu: a check of the script, uncompiled)")
    p.add_argument("--token-config", default=None, help="tuned block sizes, JSON (bench/tune_token_mix.py --save, "
                   "bench/step_kernels.py --sweep --save)")
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args()
    from omnilab.gpu.fast import FastDecoder
    from omnilab.model.decoder import SelectiveMoE
    from omnilab.runtime.hardware import model_bytes
    from omnilab.runtime.plan import token_bytes

    if args.token_config:
        from decode import apply_tuned  # bench/decode.py

        apply_tuned(args.token_config)
    cuda = args.device.startswith("cuda")
    model = SelectiveMoE.from_checkpoint(args.checkpoint, dtype="bfloat16", device=args.device, tokenizer=False)
    cfg = model.config
    sizes = model_bytes(model.checkpoint, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    P, n = args.prompt_tokens, args.new_tokens
    pool, rows = None, []
    head = (f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}; {args.checkpoint}: "
            f"{cfg.num_hidden_layers} layers, bf16; prompt {P}, {n} teacher-forced steps, median of {args.repeats}; "
            f"floor at {args.hbm_tb_s} TB/s")
    print(head, flush=True)
    for B in (int(b) for b in args.batches.split(",")):
        prompts = torch.randint(0, cfg.vocab_size, (B, P), generator=gen)
        forced = torch.randint(0, cfg.vocab_size, (B, n), generator=gen)
        for compute in args.computes.split(","):
            try:
                dec = FastDecoder(model, batch=B, max_len=P + n, compile=cuda, compute=compute, pool=pool)
                pool = dec.pool
                start = time.perf_counter()
                dec.generate(prompts.tolist(), n, forced=forced)  # compile and capture
                warm_s = time.perf_counter() - start
                runs = [dec.generate(prompts.tolist(), n, forced=forced) for _ in range(args.repeats)]
            except Exception as e:  # a batch that does not fit or a compute that fails: a row that says so
                print(f"B={B} {compute}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                rows.append({"batch": B, "compute": compute, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            finally:
                if cuda:
                    torch.cuda.empty_cache()
            decode_s = statistics.median(r.seconds - r.prefill_seconds for r in runs)
            tok_s = B * (n - 1) / decode_s
            routing = runs[-1].routing[:, :, P:P + n - 1]  # [moe, B, steps, k]: the decode steps' experts
            distinct = statistics.mean(len(set(routing[layer, :, s].flatten().tolist()))
                                       for layer in range(routing.shape[0]) for s in range(routing.shape[2]))
            # a step reads the backbone once, each distinct routed expert once and every row's KV cache
            fb = token_bytes(cfg, sizes, P + n // 2, experts_per_layer=distinct, batch=B)["total"]
            floor = B * args.hbm_tb_s * 1e12 / fb
            same = runs[0].new_token_ids == runs[-1].new_token_ids
            row = {"batch": B, "compute": compute, "decode_tokens_per_s": tok_s, "step_ms": decode_s / (n - 1) * 1e3,
                   "distinct_experts": distinct, "floor_bytes_per_step": fb, "floor_tokens_per_s": floor,
                   "share_of_floor": tok_s / floor, "warm_seconds": warm_s, "repeat_tokens_equal": same,
                   "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else 0}
            rows.append(row)
            print(f"B={B} {compute}: {tok_s:.0f} tok/s, step {row['step_ms']:.2f} ms, {distinct:.1f} distinct "
                  f"experts/layer, floor {floor:.0f} tok/s ({tok_s / floor:.1%}), warm-up {warm_s:.0f} s", flush=True)
            del dec
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"head": head, "rows": rows}, f, indent=1)
    if args.markdown:
        lines = [head, "", "| batch | compute | decode tok/s | step ms | distinct experts / layer | floor tok/s | "
                 "x floor |", "|---:|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['batch']} | {r['compute']} | {r['error']} | | | | |")
            else:
                lines.append(f"| {r['batch']} | {r['compute']} | {r['decode_tokens_per_s']:.0f} | {r['step_ms']:.2f} | "
                             f"{r['distinct_experts']:.1f} | {r['floor_tokens_per_s']:.0f} | {r['share_of_floor']:.1%} |")
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
