"""Generation experiments: how much can be dropped before the output changes, and what each choice saves.

A `Setting` changes one thing in the selective model: experts per token (top-k), a router masked to a fixed
subset of experts (omnilab.faults.RouterMask: "the first 8 experts of every layer", as hand extractions
did), a salience-weighted router (omnilab.faults.SalienceMix with each expert's log calibration load as its
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
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from omnilab.experts import ExpertCache
from omnilab.faults import Fault, RouterMask, SalienceMix
from omnilab.routing_options import RoutingOptions


# -- settings ------------------------------------------------------------------------------------------------------


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


def default_settings(config, load: pd.DataFrame | None = None, *, constrained_share: float = 0.25) -> list[Setting]:
    """The sweep of notebook 05: full model; top-k 1 .. k-1 and twice k (more experts than trained); router
    masked to the first 8 experts (as hand extractions did); a salience-weighted router (with `load`, alpha
    0.5) at the constrained budget under LRU; cache budget 1/8, 1/4, 1/2 of the expert bytes under LRU, LFU
    and trust-weighted eviction."""
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
    for policy in ("lru", "lfu", "trust"):
        for share in (0.125, 0.25, 0.5):
            settings.append(Setting(f"budget {share:.1%} {policy}", "budget", value=share, budget_share=share,
                                    policy=policy))
    return settings


def routing_of(model, setting: Setting) -> RoutingOptions:
    """The RoutingOptions of a setting on `model`: its top-k, and its router faults after the model's own."""
    for f in setting.faults:
        if any(getattr(type(f), m) is not getattr(Fault, m) for m in ("on_backbone", "on_expert")):
            raise ValueError(f"setting {setting.name!r}: {type(f).__name__} alters weights at load time; "
                             f"a sweep can only add router faults")
    top_k = model.routing.top_k if setting.top_k is None else int(setting.top_k)
    return model.routing.replace(top_k=top_k, transforms=tuple(model.routing.transforms) + tuple(setting.faults))


@contextmanager
def applied(model, setting: Setting):
    """The setting's RoutingOptions (pass them to the model's calls) with a fresh expert cache of its budget and
    policy in the model; the model's own cache is back on exit."""
    routing = routing_of(model, setting)
    cache = model.cache
    try:
        fresh_cache(model, setting)
        yield routing
    finally:
        model.cache = cache


def fresh_cache(model, setting: Setting) -> None:
    """Give the model an empty ExpertCache with the setting's budget and policy (the old one is dropped)."""
    store = model.cache.store
    budget = None if setting.budget_share is None else max(store.expert_bytes,
                                                           int(setting.budget_share * store.total_bytes))
    model.cache = ExpertCache(store, budget, policy=setting.policy)


# -- eval data -----------------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """docs: (domain, token ids) scored teacher-forced; prompts: (domain, ids) decoded for speed and cache;
    addition: (prompt ids, answer text)."""

    docs: list[tuple[str, list[int]]]
    prompts: list[tuple[str, list[int]]]
    addition: list[tuple[list[int], str]] = field(default_factory=list)


def make_eval_set(tokenizer, docs: pd.DataFrame, prompts: pd.DataFrame, addition: pd.DataFrame | None = None, *,
                  max_tokens: int = 64) -> EvalSet:
    """Tokenize documents (first max_tokens tokens), prompts (a `prompt` or `text` column) and addition
    problems (`prompt`, `answer`)."""
    enc = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    text = "prompt" if "prompt" in prompts.columns else "text"
    return EvalSet(docs=[(d, ids[:max_tokens]) for d, t in zip(docs["domain"], docs["text"])
                         if len(ids := enc(t)) > 1],
                   prompts=[(d, enc(t)) for d, t in zip(prompts["domain"], prompts[text])],
                   addition=[] if addition is None else [(enc(p), str(a)) for p, a in zip(addition["prompt"],
                                                                                          addition["answer"])])


def split_scored(docs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Documents split in two halves per domain, alternating in order: (scored, calibration). Notebook 05 scores
    the first half and traces the second to measure each expert's load (the salience router's calibration)."""
    scored = (docs.groupby("domain", sort=False).cumcount() % 2 == 0).to_numpy()
    return docs[scored], docs[~scored]


def eval_set_for(model, docs: pd.DataFrame, *, max_tokens: int = 64, random_docs: int = 4, seed: int = 0) -> EvalSet:
    """Scored documents for `model`: `docs` through its tokenizer (its first row also as the one decoding prompt),
    or, when the checkpoint has no tokenizer, `random_docs` documents of max_tokens random token ids."""
    if model.tokenizer is not None:
        return make_eval_set(model.tokenizer, docs, docs.head(1), max_tokens=max_tokens)
    g = torch.Generator().manual_seed(seed)
    return EvalSet(docs=[("random", torch.randint(0, model.config.vocab_size, (max_tokens,), generator=g).tolist())
                         for _ in range(random_docs)], prompts=[])


# -- measurement ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def next_token_logprobs(model, evalset: EvalSet, routing: RoutingOptions | None = None) -> list[torch.Tensor]:
    """log-softmax of the next-token logits, one [T, V] tensor per document (routing: the model's own by default)."""
    return [F.log_softmax(model(torch.tensor([ids], device=model.device), routing=routing)[0].float(), dim=-1).cpu()
            for _, ids in evalset.docs]


def quality(logprobs: list[torch.Tensor], reference: list[torch.Tensor], evalset: EvalSet) -> dict:
    """KL(reference || logprobs) and top-1 agreement over every position; perplexity per domain over the
    documents' actual next tokens."""
    kl, agree, n = 0.0, 0, 0
    nll: dict[str, list[float]] = {}
    for lp, ref, (domain, ids) in zip(logprobs, reference, evalset.docs):
        kl += float((ref.exp() * (ref - lp)).sum())
        agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
        n += lp.shape[0]
        target = torch.tensor(ids[1:])
        nll.setdefault(domain, []).extend((-lp[:-1].gather(1, target[:, None])[:, 0]).tolist())  # [T - 1]
    out = {"kl": kl / n, "top1_agreement": agree / n}
    out.update({f"ppl_{d}": math.exp(float(np.mean(v))) for d, v in nll.items()})
    return out


def addition_accuracy(model, evalset: EvalSet, max_new_tokens: int = 5, routing: RoutingOptions | None = None) -> float:
    """Share of addition prompts whose greedy continuation starts with the right number."""
    if not evalset.addition or model.tokenizer is None:
        return float("nan")
    gen = model.generate([p for p, _ in evalset.addition], max_new_tokens=max_new_tokens, greedy=True, routing=routing)
    right = 0
    for new, (_, answer) in zip(gen.new_token_ids, evalset.addition):
        m = re.match(r"\s*(\d+)", model.tokenizer.decode(new))
        right += bool(m and m.group(1) == answer)
    return right / len(evalset.addition)


def decode_cost(model, evalset: EvalSet, setting: Setting, max_new_tokens: int = 24,
                routing: RoutingOptions | None = None) -> dict:
    """Greedy decoding of each prompt from a cold cache: tokens/s, hit rate, peak resident expert bytes, expert
    bytes read (in all and per new token; the deterministic part of a small cache's cost)."""
    fresh_cache(model, setting)
    new, seconds = 0, 0.0
    for _, ids in evalset.prompts:
        gen = model.generate(ids, max_new_tokens=max_new_tokens, greedy=True, routing=routing)
        new, seconds = new + gen.num_new_tokens, seconds + gen.seconds
    stats = model.cache.stats
    store = model.cache.store
    return {"tokens_per_s": new / seconds if seconds else float("nan"), "hit_rate": stats.hit_rate,
            "peak_expert_bytes": stats.peak_resident_bytes, "peak_expert_share": stats.peak_resident_bytes / store.total_bytes,
            "loaded_bytes": stats.loaded_bytes, "loaded_bytes_per_token": stats.loaded_bytes / max(1, new)}


def backbone_bytes(model) -> int:
    """Bytes of everything resident apart from experts (parameters and buffers, tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def run_sweep(model, settings: list[Setting], evalset: EvalSet, *, max_new_tokens: int = 24,
              progress: bool = True) -> pd.DataFrame:
    """Measure every setting; the first must be the unmodified model ("full"), the reference of KL and
    agreement. Quality is scored with every expert resident (a cache changes where weights come from, not
    what is computed); for a setting with a budget, `cache_exact` says whether the first document's
    log-probabilities under that budget equal those with every expert resident, bit for bit. Cost is
    measured while decoding under the setting's budget from a cold cache.

    One row per setting: name, group, value, budget_share, policy, kl, top1_agreement, ppl_<domain>...,
    addition_accuracy, cache_exact, tokens_per_s, hit_rate, peak_expert_bytes, peak_expert_share,
    loaded_bytes, loaded_bytes_per_token, peak_resident_bytes, seconds."""
    from tqdm.auto import tqdm

    if not settings or settings[0].group != "full":
        raise ValueError("the first setting must be the unmodified model (group 'full')")
    backbone = backbone_bytes(model)
    reference, rows = None, []
    for setting in tqdm(settings, desc="settings", disable=not progress):
        start = time.perf_counter()
        row = {"name": setting.name, "group": setting.group, "value": setting.value,
               "budget_share": setting.budget_share, "policy": setting.policy}
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


# -- what masking missing experts costs (notebook 02) ---------------------------------------------------------------


def masking_cost(folder, evalset: EvalSet, reference: list[torch.Tensor]) -> dict:
    """The selective model on a partial extraction FOLDER with its missing experts masked, against `reference`
    (next_token_logprobs of the full model): KL, top-1 agreement, and the routed choices that fell on a missing
    expert (count and share of all choices)."""
    from omnilab.model import SelectiveMoE

    model = SelectiveMoE.from_checkpoint(folder, mask_missing_experts=True, tokenizer=False)
    q = quality(next_token_logprobs(model, evalset), reference, evalset)
    cfg = model.config
    routed = sum(len(ids) for _, ids in evalset.docs) * cfg.num_experts_per_tok * len(cfg.moe_layers)
    masked = model.cache.stats.masked_choices
    return {"kl": q["kl"], "top1_agreement": q["top1_agreement"], "masked_choices": masked,
            "masked_share": masked / routed}


def masking_sweep(checkpoint, evalset: EvalSet, reference: list[torch.Tensor], counts, scratch, *,
                  workers: int = 2) -> pd.DataFrame:
    """masking_cost of extractions keeping the first n experts of every layer, for each n in `counts` (at least
    top-k; each extracted into SCRATCH in turn, resumably): one row per n (experts, experts_share, kl, ...)."""
    from omnilab.checkpoint import Checkpoint
    from omnilab.extract import extract

    cfg, _ = Checkpoint(checkpoint).arch
    rows = []
    for n in sorted(set(counts)):
        if n < cfg.num_experts_per_tok:
            continue
        extract(checkpoint, scratch, components="backbone,experts", experts=list(range(n)), workers=workers,
                progress=False)
        rows.append({"experts": n, "experts_share": n / cfg.num_experts, **masking_cost(scratch, evalset, reference)})
    return pd.DataFrame(rows)
