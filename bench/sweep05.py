"""Notebook 05's budget / policy sweep without Jupyter (a GPU machine without papermill): the notebook's own calls
(ol.load, ol.sweeps.default_settings, ol.sweeps.run_sweep) on a checkpoint, timed, the table written as CSV.

    python bench/sweep05.py CKPT --out OUT [--per-domain 1 --max-tokens 32 --n-addition 5 --max-new-tokens 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import omnilab as ol

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("checkpoint")
p.add_argument("--out", required=True)
p.add_argument("--device", default="auto")
p.add_argument("--per-domain", type=int, default=1)
p.add_argument("--max-tokens", type=int, default=32)
p.add_argument("--n-addition", type=int, default=5)
p.add_argument("--max-new-tokens", type=int, default=8)
p.add_argument("--budget-shares", default="0.125,0.25,0.5", help="expert cache budgets swept (shares of all experts)")
args = p.parse_args()
start = time.perf_counter()
model = ol.load(args.checkpoint, device=args.device)
print(f"[sweep05] loaded in {time.perf_counter() - start:.0f} s: {model.placement}", flush=True)
prompts = ol.routing.load_documents(ol.repo_path("data/eval/prompts.jsonl"), text_field="prompt").rename(columns={"text": "prompt"})
prompts = prompts.groupby("domain", sort=False).head(1).reset_index(drop=True)
docs = ol.routing.load_documents(ol.repo_path("data/eval/eval.jsonl"), per_domain=2 * args.per_domain, seed=0)
scored, held = ol.eval_data.split_scored(docs)
addition = pd.read_json(ol.repo_path("data/eval/addition.jsonl"), lines=True).sample(n=args.n_addition, random_state=0)
evalset = ol.eval_data.make_eval_set(model.tokenizer, scored, prompts, addition, max_tokens=args.max_tokens)
calibration = ol.routing_trace.record_trace(model, None, held, max_tokens=args.max_tokens)
settings = ol.sweeps.default_settings(model.config, ol.routing.expert_load(calibration),
                                      budget_shares=tuple(float(x) for x in args.budget_shares.split(",")))
print(f"[sweep05] {len(settings)} settings, evaluation set ready at {time.perf_counter() - start:.0f} s", flush=True)
sweep_start = time.perf_counter()
table = ol.sweeps.run_sweep(model, settings, evalset, max_new_tokens=args.max_new_tokens)
sweep_s = time.perf_counter() - sweep_start
Path(args.out).mkdir(parents=True, exist_ok=True)
table.to_csv(Path(args.out) / "sweep05.csv", index=False)
cols = [c for c in ("name", "engine", "tokens_per_s", "kl", "top1_agreement", "hit_rate") if c in table.columns]
print(table[cols].to_string(index=False))
print(f"[sweep05] sweep {sweep_s:.0f} s, total {time.perf_counter() - start:.0f} s", flush=True)
