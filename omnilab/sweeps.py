"""Generation experiments: how much can be dropped before the output changes, and what each choice saves.

A `Setting` changes one thing in the selective model: experts per token (top-k), a router masked to a fixed
subset of experts (omnilab.faults.RouterMask: "the first 8 experts of every layer", as hand extractions
did), a salience-weighted router (omnilab.faults.SalienceMix with each expert's log calibration load as its
salience), or the expert cache's byte budget and eviction policy (LRU, LFU, or `TrustWeighted`, the
trust-weighted eviction of earlier hand-built loaders). `run_sweep` applies each setting to one loaded
`SelectiveMoE` in turn (`applied`, which restores the model afterwards) and measures it against the
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

from omnilab.experts import LRU, ExpertCache
from omnilab.faults import Fault, RouterMask, SalienceMix


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


class TrustWeighted(LRU):
    """Trust-weighted eviction: evict the expert with the least trust, where trust is the routing weight an
    expert has received, decayed by `decay` per forward pass (counts survive eviction); ties go to the one
    used longest ago. The ExpertCache only tells a policy which expert was fetched, so the weights come from
    the hooks `blocks.{i}.mlp.hook_topk_indices / hook_topk_weights` (`attach`). Recency (`order`, `touch`,
    `remove`) is LRU's."""

    def __init__(self, decay: float = 0.9):
        super().__init__()
        self.decay = decay
        self.trust: dict[tuple[int, int], tuple[float, int]] = {}  # key -> (trust, forward pass it was set at)
        self.step = 0
        self.num_experts: int | None = None  # set by `attach`; without it, observe sizes by the largest index
        self.handles: list = []

    def value(self, key) -> float:
        v, t = self.trust.get(key, (0.0, self.step))
        return v * self.decay ** (self.step - t)

    def observe(self, layer: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        """Add one layer's routing weights ([N, k] each) to its experts' trust."""
        n = self.num_experts if self.num_experts is not None else int(experts.max()) + 1
        mass = torch.zeros(n).index_add_(0, experts.reshape(-1).cpu(), weights.reshape(-1).float().cpu())  # [E]
        for e in torch.nonzero(mass).reshape(-1).tolist():
            self.trust[layer, e] = (self.value((layer, e)) + float(mass[e]), self.step)

    def attach(self, model) -> None:
        """Feed the policy from the model's router hooks (until `detach`)."""
        self.num_experts = model.config.num_experts
        first = model.config.moe_layers[0]
        seen = {}
        for i in model.config.moe_layers:
            def on_indices(x, i=i):
                if i == first:
                    self.step += 1
                seen[i] = x

            def on_weights(w, i=i):
                self.observe(i, seen.pop(i), w)

            self.handles.append(model.add_hook(f"blocks.{i}.mlp.hook_topk_indices", on_indices))
            self.handles.append(model.add_hook(f"blocks.{i}.mlp.hook_topk_weights", on_weights))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # the ExpertCache policy interface: touch and remove are LRU's
    def victim(self, pinned):
        # min keeps the first of equal trust, i.e. the one used longest ago
        return min((k for k in self.order if k not in pinned), key=self.value, default=None)


def salience_faults(load: pd.DataFrame, alpha: float, floor: float = 1e-3) -> tuple:
    """One SalienceMix per MoE layer whose salience is the log of each expert's calibration load
    (`load`: routing.expert_load of a calibration trace): logits -> (1 - alpha) logits + alpha log load, i.e.
    routing probabilities tilted towards experts that were popular before."""
    return tuple(SalienceMix(alpha=alpha, score=tuple(float(x) for x in np.log(load.loc[layer].to_numpy() + floor)),
                             layer=int(layer)) for layer in load.index)


def default_settings(config, load: pd.DataFrame | None = None, *, constrained_share: float = 0.25) -> list[Setting]:
    """The sweep of notebook 05: full model; top-k 1 .. k-1 and above k; router masked to the first 8 and 16
    experts; salience-weighted routers (with `load`) at the constrained budget under LRU; cache budget
    1/8, 1/4, 1/2 of the expert bytes under LRU, LFU and trust-weighted eviction."""
    k, E = config.num_experts_per_tok, config.num_experts
    settings = [Setting("full", "full", value=k)]
    for kk in sorted({*range(1, k), min(E, k + 2), min(E, 2 * k)} - {k}):
        settings.append(Setting(f"top-{kk}", "top_k", value=kk, top_k=kk))
    for n in (8, 16):
        if n < E and n >= k:
            settings.append(Setting(f"experts 0-{n - 1}", "mask", value=n, faults=(RouterMask(tuple(range(n))),)))
    if load is not None:
        for alpha in (0.25, 0.5):
            settings.append(Setting(f"salience a={alpha} @{constrained_share:.0%} lru", "salience", value=alpha,
                                    faults=salience_faults(load, alpha), budget_share=constrained_share))
    for policy in ("lru", "lfu", "trust"):
        for share in (0.125, 0.25, 0.5):
            settings.append(Setting(f"budget {share:.1%} {policy}", "budget", value=share, budget_share=share,
                                    policy=policy))
    return settings


@contextmanager
def applied(model, setting: Setting):
    """The model with `setting` applied and a fresh expert cache; everything restored on exit.

    differs from model.py's own options: top-k is overridden on a copy of the config (the forward reads
    config.num_experts_per_tok), and router faults are swapped into `model.faults` after loading."""
    for f in setting.faults:
        if any(getattr(type(f), m) is not getattr(Fault, m) for m in ("on_backbone", "on_expert")):
            raise ValueError(f"setting {setting.name!r}: {type(f).__name__} alters weights at load time; "
                             f"a sweep can only swap router faults")
    config, faults, cache = model.config, model.faults, model.cache
    try:
        if setting.top_k is not None:
            model.config = dataclasses.replace(config, num_experts_per_tok=int(setting.top_k))
        model.faults = tuple(faults) + tuple(setting.faults)
        fresh_cache(model, setting)
        yield model
    finally:
        _detach(model.cache)
        model.config, model.faults, model.cache = config, faults, cache


def fresh_cache(model, setting: Setting) -> None:
    """Give the model an empty ExpertCache with the setting's budget and policy (the old one is dropped)."""
    store = model.cache.store
    budget = None if setting.budget_share is None else max(store.expert_bytes,
                                                           int(setting.budget_share * store.total_bytes))
    policy = TrustWeighted() if setting.policy == "trust" else setting.policy
    _detach(model.cache)
    model.cache = ExpertCache(store, budget, policy=policy)
    if isinstance(policy, TrustWeighted):
        policy.attach(model)


def _detach(cache) -> None:
    if hasattr(cache.policy, "detach"):
        cache.policy.detach()


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


# -- measurement ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def next_token_logprobs(model, evalset: EvalSet) -> list[torch.Tensor]:
    """log-softmax of the next-token logits, one [T, V] tensor per document."""
    return [F.log_softmax(model(torch.tensor([ids], device=model.device))[0].float(), dim=-1).cpu()
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


def addition_accuracy(model, evalset: EvalSet, max_new_tokens: int = 5) -> float:
    """Share of addition prompts whose greedy continuation starts with the right number."""
    if not evalset.addition or model.tokenizer is None:
        return float("nan")
    gen = model.generate([p for p, _ in evalset.addition], max_new_tokens=max_new_tokens, greedy=True)
    right = 0
    for new, (_, answer) in zip(gen.new_token_ids, evalset.addition):
        m = re.match(r"\s*(\d+)", model.tokenizer.decode(new))
        right += bool(m and m.group(1) == answer)
    return right / len(evalset.addition)


def decode_cost(model, evalset: EvalSet, setting: Setting, max_new_tokens: int = 24) -> dict:
    """Greedy decoding of each prompt from a cold cache: tokens/s, hit rate, peak resident expert bytes, expert
    bytes read (in all and per new token; the deterministic part of a small cache's cost)."""
    fresh_cache(model, setting)
    new, seconds = 0, 0.0
    for _, ids in evalset.prompts:
        gen = model.generate(ids, max_new_tokens=max_new_tokens, greedy=True)
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
            with applied(model, dataclasses.replace(setting, budget_share=None, policy="lru")):
                logprobs = next_token_logprobs(model, evalset)
                reference = logprobs if reference is None else reference
                row.update(quality(logprobs, reference, evalset))
                row["addition_accuracy"] = addition_accuracy(model, evalset)
        with applied(model, setting):
            if setting.budget_share is not None:
                first = EvalSet(docs=evalset.docs[:1], prompts=[])
                row["cache_exact"] = bool(torch.equal(next_token_logprobs(model, first)[0], logprobs[0]))
            row.update(decode_cost(model, evalset, setting, max_new_tokens))
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
