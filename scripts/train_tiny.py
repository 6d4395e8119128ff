"""Train omni-tiny: the thinker text model of a tiny Qwen3OmniMoeForConditionalGeneration.

The whole model (thinker text + tiny audio / vision encoders + talker + code2wav) is built from
scripts/omni_tiny_common.py:build_config and saved, so the checkpoint has every component the real
Qwen3-Omni has; only the thinker's text model (embeddings, attention, routers, experts, norms,
lm_head) is trained, the rest stays at its random init.

Training: next-token loss on windows of the pre-tokenized corpus (scripts/build_corpus.py), each
batch row drawn from one domain with fixed mixture weights; the router load-balancing loss of
transformers (`load_balancing_loss_func`, the Switch-Transformer loss that
Qwen3OmniMoeThinkerForConditionalGeneration adds with `router_aux_loss_coef`) is on, applied per
layer and averaged over layers (--balance global uses the thinker's own all-layers form);
AdamW, warmup + cosine; bf16 autocast on a GPU. Loss is logged per domain, the held-out split
(data/eval/eval.jsonl) is evaluated every --eval-every steps, and the weights with the lowest mean
held-out loss over domains are the ones saved. Seeds are fixed.

Output (--out): the checkpoint folder (config.json, generation_config.json, tokenizer files,
preprocessor_config.json from omnilab.model.multimodal.write_processor_files, bf16 safetensors shards in the
per-expert layout) and train_log.json (per-step and per-eval
losses, tokens seen, wall time, hardware).

Run:
  GPU (the shipped run):  python scripts/train_tiny.py --out .scratch/run
  CPU smoke test:         python scripts/train_tiny.py --device cpu --steps 4 --batch-size 5 \
                              --seq-len 64 --eval-every 2 --eval-max-tokens 2000 --out .scratch/smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from omni_tiny_common import (  # noqa: E402  (it puts the repository on sys.path: omnilab, when not installed)
    DOMAINS, EOS, EVAL_DIR, MODEL_DIR, SCRATCH,
    AdditionSampler, config_from_tokenizer, greedy_extend, init_untrained_parts, read_jsonl, text_position_ids,
)


def parse_weights(s: str) -> dict[str, float]:
    w = {k: float(v) for k, v in (kv.split("=") for kv in s.split(","))}
    assert set(w) == set(DOMAINS), f"weights must name {DOMAINS}"
    tot = sum(w.values())
    return {k: v / tot for k, v in w.items()}


def rows_per_domain(weights: dict[str, float], batch: int) -> list[int]:
    """Integer rows per domain summing to batch (largest remainder)."""
    raw = [weights[d] * batch for d in DOMAINS]
    n = [int(math.floor(x)) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - n[i], reverse=True)[: batch - sum(n)]:
        n[i] += 1
    if batch >= len(n):  # every domain with a weight gets at least one row (small smoke-test batches)
        for i in range(len(n)):
            if n[i] == 0 and raw[i] > 0:
                n[max(range(len(n)), key=lambda j: n[j])] -= 1
                n[i] = 1
    return n


def per_layer_balance_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

    losses = [load_balancing_loss_func((lg,), num_experts, top_k) for lg in router_logits]
    return torch.stack(losses).mean()


def build_eval_batches(tokenizer, eos_id: int, seq: int, max_tokens: int) -> dict[str, torch.Tensor]:
    """Held-out docs of each domain, each prefixed by <|endoftext|>, packed into rows of seq+1 tokens."""
    by_dom: dict[str, list[int]] = {d: [] for d in DOMAINS}
    for r in read_jsonl(EVAL_DIR / "eval.jsonl"):
        by_dom[r["domain"]].extend([eos_id] + tokenizer.encode(r["text"]).ids)
    out = {}
    for d, ids in by_dom.items():
        ids = ids[:max_tokens]
        n_rows = max(1, len(ids) // (seq + 1))
        ids = ids[: n_rows * (seq + 1)]
        if len(ids) < n_rows * (seq + 1):
            ids = ids + [eos_id] * (n_rows * (seq + 1) - len(ids))
        out[d] = torch.tensor(ids, dtype=torch.long).view(n_rows, seq + 1)
    return out


@torch.no_grad()
def evaluate(thinker, eval_batches, device, amp_dtype, rows: int) -> dict[str, float]:
    thinker.eval()
    res = {}
    for d, data in eval_batches.items():
        tot, cnt = 0.0, 0
        for i in range(0, data.shape[0], rows):
            x = data[i : i + rows].to(device)
            inp, tgt = x[:, :-1], x[:, 1:]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                logits = thinker(input_ids=inp, position_ids=text_position_ids(*inp.shape, device), use_cache=False).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum")
            tot += loss.item()
            cnt += tgt.numel()
        res[d] = tot / cnt
    thinker.train()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens-dir", type=Path, default=SCRATCH / "tokens")
    ap.add_argument("--tokenizer", type=Path, default=MODEL_DIR, help="folder with tokenizer.json")
    ap.add_argument("--out", type=Path, default=SCRATCH / "run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="autocast dtype")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=0, help="0: choose from --time-budget after 30 timed steps")
    ap.add_argument("--time-budget", type=float, default=480.0, help="seconds of training when --steps 0")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.02, help="router_aux_loss_coef")
    ap.add_argument("--balance", default="per_layer", choices=["per_layer", "global"])
    ap.add_argument("--weights", default="en=4,fr=3,es=2,python=6,arith=49",
                    help="share of batch rows per domain (normalized; the default is rows of 64)")
    ap.add_argument("--arith-source", default="online", choices=["online", "corpus"],
                    help="online: fresh problems from AdditionSampler every step; corpus: .scratch/tokens/arith.npy")
    ap.add_argument("--save-final", type=Path, default=None, help="also save the last step's weights here")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-max-tokens", type=int, default=200_000, help="per domain")
    ap.add_argument("--max-shard-size", default="5MB")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder layers")
    args = ap.parse_args()

    t_start = time.time()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from tokenizers import Tokenizer
    from transformers import GenerationConfig, Qwen3OmniMoeForConditionalGeneration

    tokenizer = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(EOS)
    config = config_from_tokenizer(args.tokenizer)
    config.thinker_config.text_config.router_aux_loss_coef = args.aux_coef
    model = Qwen3OmniMoeForConditionalGeneration(config)  # seeded init of every component
    init_untrained_parts(model, seed=args.seed)  # talker experts: transformers leaves them uninitialized
    thinker = model.thinker
    text_cfg = config.thinker_config.text_config
    model.to(device)
    model.train()

    # only the thinker's text model is trained
    trained = [p for n, p in thinker.named_parameters() if n.startswith(("model.language_model.", "lm_head."))]
    trained_ids = {id(p) for p in trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained_ids)
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )
    n_trained = sum(p.numel() for p in trained)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"params: {n_all:,} in all, {n_trained:,} trained (thinker text); experts impl "
          f"{text_cfg._experts_implementation}", flush=True)

    if args.compile:
        for layer in thinker.model.language_model.layers:
            layer.compile()

    # data
    arrays = {d: torch.from_numpy(np.load(args.tokens_dir / f"{d}.npy").astype(np.int64)) for d in DOMAINS}
    weights = parse_weights(args.weights)
    n_rows = rows_per_domain(weights, args.batch_size)
    dom_of_row = torch.tensor(sum(([i] * n for i, n in enumerate(n_rows)), []), device=device)
    print("rows per batch:", dict(zip(DOMAINS, n_rows)), flush=True)
    eval_batches = build_eval_batches(tokenizer, eos_id, args.seq_len, args.eval_max_tokens)
    print("eval tokens:", {d: int(v.numel()) for d, v in eval_batches.items()}, flush=True)

    T = args.seq_len
    add_rows = list(read_jsonl(EVAL_DIR / "addition.jsonl"))
    # the evaluated pairs (the file lists both orders) are the ones training must never draw
    sampler = AdditionSampler([(r["a"], r["b"]) for r in add_rows], seed=args.seed + 7)
    sampler.set_token_ids(tokenizer)
    sampler.check_against(tokenizer)
    add_rows = [add_rows[i] for i in np.random.default_rng(0).permutation(len(add_rows))[:256]]
    add_prompts = torch.tensor([[eos_id] + tokenizer.encode(r["prompt"]).ids for r in add_rows], device=device)

    def get_batch() -> torch.Tensor:
        rows = []
        for d, n in zip(DOMAINS, n_rows):
            if d == "arith" and args.arith_source == "online":
                rows.extend(torch.from_numpy(sampler.rows(n, T + 1)))
                continue
            arr = arrays[d]
            starts = rng.integers(0, len(arr) - T - 1, size=n)
            rows.extend(arr[s : s + T + 1] for s in starts)
        x = torch.stack(rows)
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x

    @torch.no_grad()
    def addition_acc() -> float:
        thinker.eval()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            x = greedy_extend(thinker, add_prompts, steps=5)
        thinker.train()
        ok = 0
        for r, out in zip(add_rows, x[:, add_prompts.shape[1]:].tolist()):
            ok += tokenizer.decode(out).split("\n")[0].strip() == r["answer"]
        return ok / len(add_rows)

    total_steps = args.steps if args.steps > 0 else 10**9

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))

    log = {"args": {k: str(v) for k, v in vars(args).items()}, "steps": [], "evals": []}
    pos = text_position_ids(args.batch_size, T, device)
    best = {"score": float("inf"), "step": -1, "state": None, "eval": None}
    tokens_seen = 0
    dom_tokens = {d: 0 for d in DOMAINS}
    acc = {"loss": torch.zeros(len(DOMAINS), device=device), "aux": torch.zeros((), device=device), "n": 0}
    t_train0 = time.time()
    t_eval_total = 0.0
    step = 0

    def run_eval(step: int) -> None:
        nonlocal t_eval_total
        te = time.time()
        ev = evaluate(thinker, eval_batches, device, amp_dtype, rows=64)
        acc_add = addition_acc()
        score = float(np.mean(list(ev.values())))
        t_eval_total += time.time() - te
        entry = {"step": step, "tokens": tokens_seen, "elapsed_s": round(time.time() - t_train0, 1),
                 "eval_loss": {d: round(v, 4) for d, v in ev.items()}, "mean": round(score, 4),
                 "addition_exact_match_256": round(acc_add, 4)}
        log["evals"].append(entry)
        mark = ""
        if score < best["score"]:
            best.update(score=score, step=step, eval=entry,
                        state={k: v.detach().to("cpu", copy=True) for k, v in thinker.state_dict().items()})
            mark = " *best"
        print(f"eval @{step}: " + " ".join(f"{d}={v:.3f}" for d, v in ev.items()) + f" mean={score:.3f} add={acc_add:.3f}{mark}",
              flush=True)

    while step < total_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = get_batch()
        inp, tgt = x[:, :-1], x[:, 1:]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            out = thinker(input_ids=inp, position_ids=pos[:, : inp.shape[0]], use_cache=False,
                          output_router_logits=True)
            logits = out.logits
        tok_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        row_loss = tok_loss.view(inp.shape[0], -1).mean(dim=1)
        ce = row_loss.mean()
        if args.balance == "per_layer":
            aux = per_layer_balance_loss(out.router_logits, text_cfg.num_experts, text_cfg.num_experts_per_tok)
        else:
            aux = out.aux_loss
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(trained, args.grad_clip)
        opt.step()

        with torch.no_grad():
            acc["loss"] += torch.zeros(len(DOMAINS), device=device).index_add_(0, dom_of_row, row_loss.detach())
            acc["aux"] += aux.detach()
            acc["n"] += 1
        tokens_seen += inp.numel()
        for d, n in zip(DOMAINS, n_rows):
            dom_tokens[d] += n * T
        step += 1

        if args.steps == 0 and step == 30:  # calibrate the number of steps to the time budget
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_calib) / 20
            total_steps = max(step + 1, int(args.time_budget / per_step))
            print(f"calibrated: {per_step * 1000:.1f} ms/step -> {total_steps} steps", flush=True)
        if args.steps == 0 and step == 10:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_calib = time.time()

        if step % args.log_every == 0 or step == total_steps:
            per_dom = (acc["loss"] / torch.tensor(n_rows, device=device).clamp(min=1) / acc["n"]).tolist()
            entry = {"step": step, "tokens": tokens_seen, "elapsed_s": round(time.time() - t_train0, 1),
                     "lr": lr_at(step - 1), "grad_norm": round(float(gnorm), 4),
                     "aux": round(float(acc["aux"] / acc["n"]), 4),
                     "train_loss": {d: round(v, 4) for d, v in zip(DOMAINS, per_dom)}}
            log["steps"].append(entry)
            print(f"step {step}/{total_steps} {entry['elapsed_s']}s lr {entry['lr']:.2e} aux {entry['aux']:.3f} "
                  + " ".join(f"{d}={v:.3f}" for d, v in zip(DOMAINS, per_dom)), flush=True)
            acc = {"loss": torch.zeros(len(DOMAINS), device=device), "aux": torch.zeros((), device=device), "n": 0}
        if step % args.eval_every == 0 or step == total_steps:
            run_eval(step)

    if device.type == "cuda":
        torch.cuda.synchronize()
    train_wall = time.time() - t_train0

    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None, do_sample=False, max_new_tokens=64,
    )

    def save(out_dir: Path, thinker_state) -> None:
        """bf16, per-expert layout (save_pretrained reverts the fused experts), several shards.
        Audio, vision, talker and code2wav are saved as initialized (never trained)."""
        thinker.load_state_dict(thinker_state)
        cpu_model = copy.deepcopy(model).to("cpu").to(torch.bfloat16).eval()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        cpu_model.save_pretrained(out_dir, max_shard_size=args.max_shard_size)
        for f in args.tokenizer.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens_map", "added_tokens")) and f.is_file():
                shutil.copy(f, out_dir / f.name)
        # the audio / image preprocessing beside the weights (omnilab generate --audio/--image needs it)
        from omnilab.model.multimodal import write_processor_files

        write_processor_files(out_dir, config.thinker_config)
        del cpu_model

    final_state = {k: v.detach().to("cpu", copy=True) for k, v in thinker.state_dict().items()}
    save(args.out, best["state"])  # the weights with the lowest mean held-out loss

    hw = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__}
    import transformers
    hw["transformers"] = transformers.__version__
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(0)
        hw["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        hw["cpu_threads"] = torch.get_num_threads()
    log["summary"] = {
        "steps": step,
        "tokens_seen": tokens_seen,
        "tokens_seen_per_domain": dom_tokens,
        "epochs_per_domain": {d: (None if d == "arith" and args.arith_source == "online"
                                  else round(dom_tokens[d] / len(arrays[d]), 2)) for d in DOMAINS},
        "arith_source": args.arith_source,
        "train_tokens_per_domain": {d: int(len(arrays[d])) for d in DOMAINS},
        "train_wall_s": round(train_wall, 1),
        "eval_wall_s": round(t_eval_total, 1),
        "script_wall_s": round(time.time() - t_start, 1),
        "tokens_per_s": round(tokens_seen / max(1e-9, train_wall - t_eval_total)),
        "best_step": best["step"],
        "saved_step": best["step"],
        "best_eval": best["eval"],
        "final_train_loss": log["steps"][-1]["train_loss"] if log["steps"] else None,
        "params_all": n_all,
        "params_trained": n_trained,
        "hardware": hw,
    }
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1))
    if args.save_final:
        save(args.save_final, final_state)
        log["summary"]["saved_step"] = step
        (args.save_final / "train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log["summary"], indent=1), flush=True)


if __name__ == "__main__":
    main()
