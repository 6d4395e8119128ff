"""Greedy decode speed and memory of the selective model at expert budgets of 100 / 50 / 25 / 10 % of the
experts' bytes, against the transformers reference with everything resident. One run, one table.

    python bench/decode.py                      # synthesizes the checkpoint below on first use (~5 GB, bf16)
    python bench/decode.py --checkpoint DIR     # any Qwen3-Omni / Qwen3-MoE checkpoint folder

The default checkpoint is a random-weight Qwen3-Omni with the real model's thinker layer shapes (hidden 2048,
32 heads x 128, 4 kv heads, 128 experts of 768, top 8) but only a few layers and a small vocabulary, written
by transformers' own `save_pretrained` in bf16 to /tmp (never into the repo). Each setting runs in its own
subprocess, so its peaks belong to that setting alone: peak RSS (VmHWM)
counts the page cache of mmap'd shards that were touched; peak anon RSS (sampled) is the memory the process
itself allocated (weights and activations). Random routers spread tokens almost uniformly over the experts,
so cache hit rates here are a pessimistic floor for a trained model.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_CHECKPOINT = "/tmp/omnilab-bench/omni-real-shapes"
REAL_SHAPES = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                   num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=768,
                   norm_topk_prob=True, vocab_size=8192, max_position_embeddings=4096)
BUDGETS = (1.0, 0.5, 0.25, 0.10)


def synthesize(out: Path, layers: int) -> None:
    """Random Qwen3-Omni with real thinker layer shapes, built directly in bf16 and saved by transformers."""
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    from omnilab.synth import _quiet_transformers, tiny_omni_config, tiny_tokenizer

    config = Qwen3OmniMoeConfig.from_dict(tiny_omni_config(**REAL_SHAPES, num_hidden_layers=layers))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # 4 layers of experts are 2.4 B parameters: never hold them in fp32
    start = time.time()
    model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    torch.set_default_dtype(torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    with _quiet_transformers():
        model.save_pretrained(tmp, max_shard_size="2GB")
    tiny_tokenizer(256).save_pretrained(tmp)
    tmp.rename(out)
    print(f"[bench] wrote {out} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """VmHWM: the process's peak resident set, file-backed pages of mmap'd shards included."""
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AnonPeak:
    """Peak anonymous resident memory (RssAnon: tensors, not the page cache of mmap'd shards), sampled every
    10 ms in a thread while the block runs. The kernel keeps no high-water mark of RssAnon itself."""

    def __enter__(self):
        self.peak, self.running = _status("RssAnon"), True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def _gpu_peak() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def run_one(args) -> dict:
    """One setting, in this process: 'reference' or a budget fraction."""
    import torch

    torch.manual_seed(0)
    prompt = torch.randint(0, 256, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    if args.setting == "reference":
        from omnilab.reference import Reference

        with AnonPeak() as anon:
            ref = Reference.from_checkpoint(args.checkpoint, dtype=args.dtype, device=args.device,
                                            attn_implementation="sdpa")
            ref.generate(torch.tensor([prompt[:4]]), 2)  # warm-up: first-call overheads out of the timing
            speeds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                new = ref.generate(torch.tensor([prompt]), args.new_tokens)[0].tolist()
                speeds.append(len(new) / (time.perf_counter() - start))
        return {"setting": "transformers (all resident)", "tokens_per_s": statistics.median(speeds),
                "tokens_per_s_runs": speeds, "new_token_ids": new,
                "peak_rss_bytes": peak_rss_bytes(), "peak_anon_bytes": anon.peak, "peak_gpu_bytes": _gpu_peak()}
    from omnilab.experts import ExpertCache
    from omnilab.model import SelectiveMoE

    fraction = float(args.setting)
    with AnonPeak() as anon:
        model = SelectiveMoE.from_checkpoint(args.checkpoint, dtype=args.dtype, device=args.device, tokenizer=False)
        store = model.cache.store  # the budget in the bytes the cache counts (compute dtype), as sweeps.fresh_cache
        budget = int(store.total_bytes * fraction)
        model.cache = ExpertCache(store, budget)  # empty: nothing was loaded under the default (all-fit) cache
        model(torch.tensor([prompt[:2]]))  # warm-up (loads a few experts; statistics reset below)
        runs = []
        for _ in range(args.repeats):  # each run starts from an empty cache: the same misses every time
            model.cache.clear()
            model.cache.reset_stats()
            gen = model.generate(prompt, args.new_tokens, vocab_limit=None)
            runs.append((gen, model.cache.stats.to_dict()))  # a snapshot: clear() alters the stats it finds
    out, stats = sorted(runs, key=lambda r: r[0].tokens_per_s)[len(runs) // 2]  # the median run, its own stats
    return {"setting": f"selective {fraction:.0%}", **stats, "budget_bytes": budget, "tokens_per_s": out.tokens_per_s,
            "tokens_per_s_runs": [g.tokens_per_s for g, _ in runs], "decode_tokens_per_s": out.decode_tokens_per_s,
            "new_token_ids": out.new_token_ids[0], "peak_rss_bytes": peak_rss_bytes(), "peak_anon_bytes": anon.peak,
            "peak_gpu_bytes": _gpu_peak()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--layers", type=int, default=4, help="layers of the synthesized checkpoint")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu", help="cpu or cuda (then the table adds peak GPU memory)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the median is reported")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--setting", help=argparse.SUPPRESS)  # internal: run one setting in this process
    args = p.parse_args()
    if args.setting:
        print(json.dumps(run_one(args)))
        return 0

    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        synthesize(ckpt, args.layers)
    from tqdm import tqdm

    rows = []
    for setting in tqdm(["reference", *map(str, BUDGETS)], desc="settings"):
        cmd = [sys.executable, __file__, "--checkpoint", str(ckpt), "--dtype", args.dtype, "--setting", setting,
               "--device", args.device, "--repeats", str(args.repeats),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    reference = rows[0]["new_token_ids"]
    for r in rows[1:]:
        same = 0
        for a, b in zip(r["new_token_ids"], reference):
            if a != b:
                break
            same += 1
        r["same_prefix_as_reference"] = same
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows, ckpt, args))
    return 0


def table(rows, ckpt, args) -> str:
    from omnilab import Checkpoint

    config, _ = Checkpoint(ckpt).arch
    gb = 1e9
    lines = [f"greedy decode on {args.device}, {args.new_tokens} new tokens after a {args.prompt_tokens}-token prompt, {args.dtype}, "
             f"median of {args.repeats} runs, "
             f"{config.num_hidden_layers} layers x {config.num_experts} experts (top {config.num_experts_per_tok}), "
             f"hidden {config.hidden_size}, expert {config.moe_intermediate_size}",
             "",
             "| setting | expert budget | tokens/s (all) | tokens/s (decode) | peak resident experts "
             "| peak RSS (VmHWM) | peak anon RSS | hits / misses | hit rate | loaded | expert load time "
             "| same tokens as ref |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    gpu = any(r.get("peak_gpu_bytes") for r in rows)
    if gpu:
        lines[2] += " peak GPU memory |"
        lines[3] += "---:|"
    for r in rows:
        extra = f" {r['peak_gpu_bytes'] / gb:.2f} GB |" if gpu else ""
        if "budget_bytes" not in r:
            lines.append(f"| {r['setting']} | all | {r['tokens_per_s']:.2f} | | | {r['peak_rss_bytes'] / gb:.2f} GB "
                         f"| {r['peak_anon_bytes'] / gb:.2f} GB | | | | | {args.new_tokens} / {args.new_tokens} |" + extra)
            continue
        lines.append(f"| {r['setting']} | {r['budget_bytes'] / gb:.2f} GB | {r['tokens_per_s']:.2f} "
                     f"| {r['decode_tokens_per_s']:.2f} | {r['peak_resident_bytes'] / gb:.2f} GB "
                     f"| {r['peak_rss_bytes'] / gb:.2f} GB | {r['peak_anon_bytes'] / gb:.2f} GB "
                     f"| {r['hits']:,} / {r['misses']:,} | {r['hit_rate']:.1%} "
                     f"| {r['loaded_bytes'] / gb:.2f} GB | {r['load_seconds']:.1f} s "
                     f"| {r['same_prefix_as_reference']} / {args.new_tokens} |" + extra)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
