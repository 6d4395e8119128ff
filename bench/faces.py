"""The faces against the engines: `omnilab generate` (the CLI a researcher runs) beside the engine it should reach,
called directly, in one run, on one checkpoint, with the same prompt, free greedy decoding and the same number of
new tokens (so both route the same way).

    python bench/faces.py --device cuda --layers 48 --budget 8GB      # resident and offload, bf16 (issue 24)
    python bench/faces.py --device cpu --layers 8 --rows engine-resident,cli-resident,hf --dtype bfloat16

Rows (each in its own subprocess, so peak memory is the row's own):
- engine-resident: omnilab.gpu.fast.FastDecoder built as the runtime builds it (compiled layer in bf16 on CUDA);
- cli-resident: `omnilab generate CKPT --input-ids ... --greedy --stop-ids none --json` (all experts resident);
- cli-sampling: the same with `--sample --temperature 0.8 --top-k 50 --top-p 0.95`;
- engine-offload: omnilab.gpu.offload.OffloadDecoder built as the runtime builds it for `--budget`;
- cli-offload: `omnilab generate ... --expert-budget BUDGET`;
- hf: transformers' thinker, the `--hf-impl` experts implementations (bench/decode.py's row; teacher-forced).
Speed is decode tokens/s (after prefill); ratios are against the engine row of the same kind in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode import build_checkpoint, hbm_bytes_per_token, inputs  # noqa: E402  (bench/decode.py)

from omnilab.memory import AnonPeak  # noqa: E402


def _engine_row(args, kind: str) -> dict:
    """The engine the runtime would build, called directly: warm-up (capture, compile), then --repeats runs."""
    import torch

    from omnilab.runtime import generate as rg
    from omnilab.runtime.choose import Call
    from omnilab.runtime.model import load

    with AnonPeak() as anon:
        start = time.perf_counter()
        budget = args.budget if kind == "offload" else "all"
        model = load(args.checkpoint, device=args.device, dtype=args.dtype, expert_budget=budget)
        prompt, _ = inputs(args, model.config.vocab_size)
        ids = prompt.tolist()
        call = Call(batch=1, max_len=len(ids) + args.new_tokens)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        decoder = (rg.resident_decoder(model, [ids], call) if kind == "resident" else rg.offload_decoder(model, call))

        # the vocabulary the CLI's generate samples from (ids past the tokenizer's are never produced), so both
        # rows decode the same tokens and route the same way
        from omnilab.model.generate import resolve_vocab_limit

        limit = resolve_vocab_limit(model)

        def run():
            return decoder.generate(ids, args.new_tokens, vocab_limit=limit)

        run()  # warm-up: the graphs captured (and compiled)
        build_s = time.perf_counter() - start
        gens = [run() for _ in range(args.repeats)]
    speeds = [g.decode_tokens_per_s for g in gens]
    return {"row": f"engine-{kind}", "decode_tokens_per_s": statistics.median(speeds), "runs": speeds,
            "tokens": gens[-1].new_token_ids[0], "load_s": load_s, "build_s": build_s,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
            "peak_anon_bytes": anon.peak, "engine": f"{kind} (direct)",
            "cache": decoder.stats.to_dict() if kind == "offload" else None}


def _cli_row(args, name: str, extra: list[str]) -> dict:
    """`omnilab generate` in a subprocess, as a researcher runs it; its --json is the row."""
    from omnilab import Checkpoint

    config, _ = Checkpoint(args.checkpoint).arch
    prompt, _ = inputs(args, config.vocab_size)
    cmd = [sys.executable, "-m", "omnilab", "generate", args.checkpoint, "--input-ids",
           ",".join(map(str, prompt.tolist())), "--max-new-tokens", str(args.new_tokens), "--stop-ids", "none",
           "--device", args.device, "--dtype", args.dtype, "--json", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["(no output)"])[-1])
    out = json.loads(done.stdout)
    return {"row": name, "decode_tokens_per_s": out["decode_tokens_per_s"], "tokens": out["new_token_ids"],
            "engine": out["engine"], "refusal": out["refusal"], "peak_gpu_bytes": out["peak_gpu_bytes"],
            "sampling": out["sampling"], "wall_s": time.perf_counter() - start, "command": " ".join(cmd[1:4]) + " ..."}


ROWS = {
    "engine-resident": lambda a: _engine_row(a, "resident"),
    "cli-resident": lambda a: _cli_row(a, "cli-resident", ["--greedy"]),
    "cli-sampling": lambda a: _cli_row(a, "cli-sampling", ["--sample", "--temperature", "0.8", "--top-k", "50",
                                                            "--top-p", "0.95", "--seed", "1"]),
    "engine-offload": lambda a: _engine_row(a, "offload"),
    "cli-offload": lambda a: _cli_row(a, "cli-offload", ["--greedy", "--expert-budget", a.budget]),
}


def _hf_rows(args) -> list[dict]:
    """transformers' thinker through bench/decode.py's row (teacher-forced decode, same prompt)."""
    cmd = [sys.executable, str(Path(__file__).parent / "decode.py"), "--row", "hf", "--checkpoint", args.checkpoint,
           "--scratch", str(Path(args.workdir) / "scratch"), "--dtype", args.dtype, "--device", args.device,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--slow-tokens",
           str(min(args.new_tokens, 32)), "--free-tokens", str(args.new_tokens), "--repeats", "1", "--hf-impl", args.hf_impl]
    (Path(args.workdir) / "scratch").mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["(no output)"])[-1])
    return [{"row": r["row"], "decode_tokens_per_s": r["decode_tokens_per_s"], "peak_gpu_bytes": r.get("peak_gpu_bytes"),
             "greedy_tokens": r["free"]}  # transformers' own free greedy decoding from the same prompt
            for r in json.loads(done.stdout.strip().splitlines()[-1])]


def table(rows, errors, args) -> str:
    import torch

    from omnilab import Checkpoint

    config, _ = Checkpoint(args.checkpoint).arch
    gpu = args.device.startswith("cuda") and torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)"
    size = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    floor = args.hbm_tb_s * 1e12 / hbm_bytes_per_token(config, args.prompt_tokens + args.new_tokens // 2, size)
    by = {r["row"]: r for r in rows}
    hf = max((r for r in rows if r["row"].startswith("transformers")), key=lambda r: r["decode_tokens_per_s"],
             default=None)
    lines = [f"`python {' '.join(sys.argv)}`", "",
             f"{device}, torch {torch.__version__}, {args.dtype}, batch 1; {Path(args.checkpoint).name}: "
             f"{config.num_hidden_layers} layers x {config.num_experts} experts (top {config.num_experts_per_tok}); "
             f"prompt {args.prompt_tokens} random ids, {args.new_tokens} new tokens, free decoding"
             + (f"; HBM floor {floor:.0f} tok/s at {args.hbm_tb_s} TB/s" if gpu else ""), "",
             "| row | engine | decode tok/s | x engine row | x transformers best | x HBM floor | same tokens as engine row "
             "| same tokens as transformers | peak GPU memory |", "|---|---|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        kind = "offload" if "offload" in r["row"] else "resident"
        base = by.get(f"engine-{kind}")
        ratio = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x" if base and "tokens" in r else ""
        vs_hf = f"{r['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.2f}x" if hf else ""
        same = ("yes" if r["tokens"] == base["tokens"] else "no") if base and "tokens" in r and "sampling" not in r["row"] else ""
        as_hf = ("yes" if r["tokens"] == hf["greedy_tokens"] else "no") \
            if hf and hf.get("greedy_tokens") and "tokens" in r and "sampling" not in r["row"] else ""
        mem = f"{r['peak_gpu_bytes'] / 1e9:.2f} GB" if r.get("peak_gpu_bytes") else ""
        lines.append(f"| {r['row']} | {r.get('engine', '')} | {r['decode_tokens_per_s']:.2f} | {ratio} | {vs_hf} | "
                     f"{r['decode_tokens_per_s'] / floor:.1%} | {same} | {as_hf} | {mem} |" if gpu else
                     f"| {r['row']} | {r.get('engine', '')} | {r['decode_tokens_per_s']:.2f} | {ratio} | {vs_hf} | | {same} "
                     f"| {as_hf} | |")
    return "\n".join(lines + [f"- failed: {e}" for e in errors])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: synthesize one, see --layers)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", default="/dev/shm/omnilab-bench")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", default="engine-resident,cli-resident,cli-sampling,engine-offload,cli-offload")
    p.add_argument("--budget", default="8GB", help="expert budget of the offload rows")
    p.add_argument("--hf-impl", default="grouped_mm")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hbm-tb-s", type=float, default=3.35, help="HBM bandwidth for the floor (H100 3.35, H200 4.8)")
    p.add_argument("--row-timeout", type=int, default=600)
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        print(json.dumps(ROWS[args.row](args)))
        return 0
    args.checkpoint = str(args.checkpoint or build_checkpoint(args))
    rows, errors = [], []
    for name in [r for r in args.rows.split(",") if r]:
        start = time.perf_counter()
        try:
            if name == "hf":
                rows += _hf_rows(args)
            elif name.startswith("engine"):
                cmd = [sys.executable, __file__, "--row", name, *sys.argv[1:], "--checkpoint", args.checkpoint]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
                if done.returncode != 0:
                    raise RuntimeError((done.stderr.strip().splitlines() or ["(no output)"])[-1])
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                rows.append(ROWS[name](args))
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            errors.append(f"{name}: {err}")
        print(f"[faces] {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows, errors, args)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    print(text)
    return 1 if errors and not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
