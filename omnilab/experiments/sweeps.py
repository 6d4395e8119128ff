"""Generation experiments: how much can be dropped before the output changes, and what each choice saves.

A `Setting` changes one thing in the selective model: experts per token (top-k), a router masked to a fixed
subset of experts (omnilab.model.faults.RouterMask: "the first 8 experts of every layer", as hand extractions
did), a salience-weighted router (omnilab.model.faults.SalienceMix with each expert's log calibration load as its
salience), or the expert cache's byte budget and eviction policy (LRU, LFU, or `TrustWeighted`, the
trust-weighted eviction of earlier hand-built loaders). `run_sweep` applies each setting to one loaded
`SelectiveMoE` in turn (`applied`: the setting's `RoutingOptions`, passed to every call, and a fresh cache) and measures it against the
unmodified model on one `EvalSet`:

- quality, teacher-forced over held-out documents: mean next-token KL(full || setting), top-1 agreement with
  the full model, perplexity per domain; addition accuracy (greedy answers to "a + b =" prompts);
- cost, while decoding a few prompts greedily token by token from a cold cache: tokens/s, cache hit rate,
  peak resident expert bytes (and with the backbone, peak resident bytes).

A cache changes no arithmetic, only where the experts come from: quality is scored with every expert
resident, and each budgeted setting checks, on one document, that its log-probabilities are bit-identical.
"""

from __future__ import annotations

import dataclasses
import re
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from omnilab.experiments.eval_data import EvalSet
from omnilab.experiments.measures import addition_accuracy, backbone_bytes, next_token_logprobs, quality
from omnilab.memory import release_memory
from omnilab.model.experts import ExpertCache
from omnilab.model.faults import RouterMask, SalienceMix, acts_on_weights
from omnilab.model.routing import RoutingOptions


@dataclass(frozen=True)
class Setting:
    """One change to the selective model. top_k None: the config's. faults: router faults only (they act on
    router logits, which a loaded model can swap). budget_share: expert cache budget as a share of all expert
    bytes (None: everything fits). policy: "lru", "lfu" or "trust". value: the swept number, for plots."""

    name: str
    group: str
    value: float | None = None
    top_k: int | None = None
    faults: tuple = ()
    budget_share: float | None = None
    policy: str = "lru"


def salience_faults(load: pd.DataFrame, alpha: float, floor: float = 1e-3) -> tuple:
    """One SalienceMix per MoE layer whose salience is the log of each expert's calibration load
    (`load`: routing.expert_load of a calibration trace): logits -> (1 - alpha) logits + alpha log load, i.e.
    routing probabilities tilted towards experts that were popular before."""
    return tuple(SalienceMix(alpha=alpha, score=tuple(float(x) for x in np.log(load.loc[layer].to_numpy() + floor)),
                             layer=int(layer)) for layer in load.index)


def default_settings(config, load: pd.DataFrame | None = None, *, constrained_share: float = 0.25,
                     budget_shares=(0.125, 0.25, 0.5), policies=("lru", "lfu", "trust")) -> list[Setting]:
    """The sweep of notebook 05: full model; top-k 1 .. k-1 and twice k (more experts than trained); router
    masked to the first 8 experts (as hand extractions did); a salience-weighted router (with `load`, alpha
    0.5) at the constrained budget under LRU; cache budget `budget_shares` (1/8, 1/4, 1/2) of the expert bytes
    under each of `policies` (LRU, LFU and trust-weighted eviction)."""
    k, E = config.num_experts_per_tok, config.num_experts
    settings = [Setting("full", "full", value=k)]
    for kk in sorted({*range(1, k), min(E, 2 * k)} - {k}):
        settings.append(Setting(f"top-{kk}", "top_k", value=kk, top_k=kk))
    if k <= 8 < E:
        settings.append(Setting("experts 0-7", "mask", value=8, faults=(RouterMask(tuple(range(8))),)))
    if load is not None:
        for alpha in (0.5,):
            settings.append(Setting(f"salience a={alpha} @{constrained_share:.0%} lru", "salience", value=alpha,
                                    faults=salience_faults(load, alpha), budget_share=constrained_share))
    for policy in policies:
        for share in budget_shares:
            settings.append(Setting(f"budget {share:.1%} {policy}", "budget", value=share, budget_share=share,
                                    policy=policy))
    return settings


def routing_of(model, setting: Setting) -> RoutingOptions:
    """The RoutingOptions of a setting on `model`: its top-k, and its router faults after the model's own."""
    for f in setting.faults:
        if acts_on_weights(f):
            raise ValueError(f"setting {setting.name!r}: {type(f).__name__} alters weights at load time; "
                             f"a sweep can only add router faults")
    top_k = model.routing.top_k if setting.top_k is None else int(setting.top_k)
    return model.routing.replace(top_k=top_k, transforms=tuple(model.routing.transforms) + tuple(setting.faults))


@contextmanager
def applied(model, setting: Setting):
    """The setting's RoutingOptions (pass them to the model's calls) with a fresh expert cache of its budget and
    policy in the model; the model's own cache (emptied: its experts are read again on demand) is back on exit."""
    routing = routing_of(model, setting)
    cache = model.cache
    own_budget(model)  # recorded before the first swap
    cache.clear()  # its experts are read again on demand: never two caches' worth of experts at once
    try:
        fresh_cache(model, setting)
        yield routing
    finally:
        model.cache = cache


_OWN_BUDGET: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> the budget it was loaded with


def own_budget(model) -> int | None:
    """The expert budget the model was loaded with (None: every expert), recorded the first time a sweep sees it:
    the ceiling of every setting's cache, so a sweep never holds more experts than the model was given."""
    return _OWN_BUDGET.setdefault(model, model.cache.budget_bytes)


def setting_budget(model, setting: Setting) -> int | None:
    """A setting's budget in bytes: its share of all expert bytes (at least one expert), at most the model's own
    budget; no share: the model's own budget (None: every expert)."""
    store, own = model.cache.store, own_budget(model)
    if setting.budget_share is None:
        return own
    budget = max(store.expert_bytes, int(setting.budget_share * store.total_bytes))
    return budget if own is None else min(budget, own)


def fresh_cache(model, setting: Setting) -> None:
    """Give the model an empty ExpertCache with the setting's budget and policy (the old one is dropped; the
    runtime keys its offload engine by the budget and policy, so a new setting gets a new one, evicting by the
    setting's policy per MoE layer)."""
    store, budget = model.cache.store, setting_budget(model, setting)
    model.cache = ExpertCache(store, budget, policy=setting.policy)
    release_memory()  # the old cache's experts, back to the system rather than left in the heap


def decode_cost(model, evalset: EvalSet, setting: Setting, max_new_tokens: int = 24,
                routing: RoutingOptions | None = None) -> dict:
    """Greedy decoding of each prompt from a cold cache, on the engine the runtime picks (`engine`): tokens/s, hit
    rate, peak resident expert bytes, expert bytes read (in all and per new token; the deterministic part of a
    small cache's cost). The cache statistics are those of the engine that ran: the eager path's ExpertCache, the
    offload engine's slots, or, for an engine with every expert resident, what an unbounded ExpertCache would have
    counted for the same routing (`resident_cache_stats`)."""
    fresh_cache(model, setting)
    new, seconds, engines, offloaded, routings = 0, 0.0, set(), [], []
    for _, ids in evalset.prompts:
        gen = model.generate(ids, max_new_tokens=max_new_tokens, greedy=True, routing=routing)  # the runtime's engine
        new, seconds = new + gen.num_new_tokens, seconds + gen.seconds
        engines.add(gen.engine)
        if gen.engine.endswith("resident"):
            routings.append((gen.routing, len(ids)))
        elif gen.engine == "gpu-offload":
            offloaded.append(gen.cache)
    store = model.cache.store
    if routings:
        stats = resident_cache_stats(routings, store.expert_bytes)
    elif offloaded:
        stats = {k: sum(c[k] for c in offloaded) for k in ("hits", "misses", "loaded_bytes")}
        stats["peak_resident_bytes"] = max(c["peak_resident_bytes"] for c in offloaded)
    else:
        st = model.cache.stats
        stats = {"hits": st.hits, "misses": st.misses, "loaded_bytes": st.loaded_bytes,
                 "peak_resident_bytes": st.peak_resident_bytes}
    lookups = stats["hits"] + stats["misses"]
    return {"engine": ",".join(sorted(engines)), "tokens_per_s": new / seconds if seconds else float("nan"),
            "hit_rate": stats["hits"] / lookups if lookups else 0.0, "peak_expert_bytes": stats["peak_resident_bytes"],
            "peak_expert_share": stats["peak_resident_bytes"] / store.total_bytes,
            "loaded_bytes": stats["loaded_bytes"], "loaded_bytes_per_token": stats["loaded_bytes"] / max(1, new)}


def resident_cache_stats(routings, expert_bytes: int) -> dict:
    """What an unbounded ExpertCache counts for generations whose routing was recorded: routings is a list of
    (routing [moe layers, 1, positions, k], prompt length P). The eager MoE step fetches each distinct expert of a
    forward once (the prefill is one forward over P positions, each later token one more), and an expert's first
    fetch is its only miss."""
    seen, lookups = set(), 0
    for routing, P in routings:
        if routing.shape[1] != 1:
            raise ValueError("resident_cache_stats counts one prompt per generation")
        for j, layer in enumerate(routing[:, 0]):  # layer [positions, k]
            steps = [layer[:P].reshape(-1)] + list(layer[P:])  # the prefill's choices, then each token's
            for step in steps:
                picked = set(step.tolist())
                lookups += len(picked)
                seen.update((j, e) for e in picked)
    misses = len(seen)
    return {"hits": lookups - misses, "misses": misses, "loaded_bytes": misses * expert_bytes,
            "peak_resident_bytes": misses * expert_bytes}


def run_sweep(model, settings: list[Setting], evalset: EvalSet, *, max_new_tokens: int = 24,
              progress: bool = True) -> pd.DataFrame:
    """Measure every setting; the first must be the unmodified model ("full"), the reference of KL and
    agreement. Quality is scored with every expert resident (a cache changes where weights come from, not
    what is computed); for a setting with a budget, `cache_exact` says whether the first document's
    log-probabilities under that budget equal those with every expert resident, bit for bit. Cost is
    measured while decoding under the setting's budget from a cold cache.

    One row per setting: name, group, value, budget_share, policy, budget_bytes (the share's bytes, at most the
    model's own budget: `setting_budget`), kl, top1_agreement, ppl_<domain>...,
    addition_accuracy, cache_exact, tokens_per_s, hit_rate, peak_expert_bytes, peak_expert_share,
    loaded_bytes, loaded_bytes_per_token, engine (the runtime's, of the decoding), peak_resident_bytes, seconds."""
    from tqdm.auto import tqdm

    if not settings or settings[0].group != "full":
        raise ValueError("the first setting must be the unmodified model (group 'full')")
    backbone = backbone_bytes(model)
    reference, rows = None, []
    for setting in tqdm(settings, desc="settings", disable=not progress):
        start = time.perf_counter()
        row = {"name": setting.name, "group": setting.group, "value": setting.value,
               "budget_share": setting.budget_share, "policy": setting.policy,
               "budget_bytes": setting_budget(model, setting)}
        if reference is not None and setting.top_k is None and not setting.faults:
            logprobs = reference  # routing and weights as in the full model: the same computation
            row.update({k: v for k, v in rows[0].items() if k in ("kl", "top1_agreement", "addition_accuracy")
                        or k.startswith("ppl_")})
        else:
            with applied(model, dataclasses.replace(setting, budget_share=None, policy="lru")) as routing:
                logprobs = next_token_logprobs(model, evalset, routing)
                reference = logprobs if reference is None else reference
                row.update(quality(logprobs, reference, evalset))
                row["addition_accuracy"] = addition_accuracy(model, evalset, routing=routing)
        with applied(model, setting) as routing:
            if setting.budget_share is not None:
                first = EvalSet(docs=evalset.docs[:1], prompts=[])
                row["cache_exact"] = bool(torch.equal(next_token_logprobs(model, first, routing)[0], logprobs[0]))
            row.update(decode_cost(model, evalset, setting, max_new_tokens, routing))
        row["peak_resident_bytes"] = backbone + row["peak_expert_bytes"]
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    return pd.DataFrame(rows)


def sample_generations(model, prompts: pd.DataFrame, *, max_new_tokens: int = 24, temperature: float = 0.8,
                       top_p: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Greedy and sampled continuations of each prompt (columns: domain, prompt, greedy, sampled)."""
    rows = []
    for domain, prompt in zip(prompts["domain"], prompts["prompt"]):
        ids = model.tokenizer(prompt)["input_ids"]
        greedy = model.generate(ids, max_new_tokens=max_new_tokens, greedy=True)
        sampled = model.generate(ids, max_new_tokens=max_new_tokens, greedy=False, temperature=temperature,
                                 top_p=top_p, seed=seed)
        rows.append({"domain": domain, "prompt": prompt,
                     "greedy": model.tokenizer.decode(greedy.new_token_ids[0]),
                     "sampled": model.tokenizer.decode(sampled.new_token_ids[0])})
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame) -> dict:
    """Headline numbers for metrics.json: quality of each top-k and mask setting, hit rates of each budget
    setting (deterministic, unlike tokens/s, which is left out)."""
    out = {}
    full = table[table["group"] == "full"].iloc[0]
    ppl = [c for c in table.columns if c.startswith("ppl_")]
    out.update({f"full_{c}": float(full[c]) for c in ppl})
    out["full_addition_accuracy"] = float(full["addition_accuracy"])
    for row in table[table["group"] != "full"].itertuples():
        key = re.sub(r"[^a-z0-9]+", "_", row.name.lower()).strip("_")
        if row.group in ("top_k", "mask", "salience"):
            out[f"{key}_kl"] = float(row.kl)
            out[f"{key}_top1_agreement"] = float(row.top1_agreement)
            out[f"{key}_addition_accuracy"] = float(row.addition_accuracy)
        if row.group in ("budget", "salience", "mask"):
            out[f"{key}_hit_rate"] = float(row.hit_rate)
        if row.group == "budget":
            out[f"{key}_kl"] = float(row.kl)
    return out
