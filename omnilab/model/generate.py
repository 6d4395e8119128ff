"""Generation with the eager selective model: greedy or sampled decoding of one prompt or a left-padded batch
over a KVCache, stopping at a token budget or at stop tokens; `SelectiveMoE.generate(...)` calls `generate` here.
Follows transformers' `GenerationMixin` for what a caller observes (left padding, its logits warpers in its
order, no ids past the tokenizer). Design: docs/DESIGN.md, "The selective model".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from omnilab.model.kv_cache import KVCache
from omnilab.model.routing import RoutingOptions


@dataclass
class Generation:
    """What `generate` returns. new_token_ids: one list per prompt, stop token included when one was hit."""

    new_token_ids: list[list[int]]
    prompt_lengths: list[int]
    seconds: float
    prefill_seconds: float
    stopped: list[bool] = field(default_factory=list)
    engine: str = "eager"  # which engine ran (omnilab.runtime.choose.ENGINES)
    refusal: str | None = None  # why the fastest engine did not, when it did not
    peak_gpu_bytes: int | None = None

    @property
    def num_new_tokens(self) -> int:
        return sum(len(t) for t in self.new_token_ids)

    @property
    def tokens_per_s(self) -> float:
        """New tokens (all prompts) per second of generate, prefill included."""
        return self.num_new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, per second after prefill."""
        decode = self.seconds - self.prefill_seconds
        n = self.num_new_tokens - len(self.new_token_ids)
        return n / decode if decode > 0 and n > 0 else float("nan")


def until_stop(ids, stop_tokens) -> list[int]:
    """IDS up to and including the first of STOP_TOKENS (all of IDS when none is there): a text where a reader's
    generation ends it, e.g. at `model.stop_tokens` (the end-of-text token)."""
    stop = set(stop_tokens or ())
    ids = [int(t) for t in ids]
    return ids[:next((j + 1 for j, t in enumerate(ids) if t in stop), len(ids))]


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int = 32, *, greedy: bool = True, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens=(), vocab_limit="auto", seed: int | None = 0,
             use_kv_cache: bool = True, progress: bool = False, routing: RoutingOptions | None = None) -> Generation:
    """Generate from one prompt (list of ids) or a batch (list of lists, left-padded here).

    greedy, or sampling with temperature / top_k / top_p (transformers' logits warpers). Stops at
    max_new_tokens or when every sequence has produced one of `stop_tokens`. vocab_limit: ids at or past
    it are never produced ("auto": the tokenizer's length when there is one: embedding rows past the
    tokenizer are padding). use_kv_cache False re-runs the whole sequence at every step (for testing).
    routing: RoutingOptions for every step (default: the model's own)."""
    check_sampling(max_new_tokens, greedy, temperature, top_k, top_p, seed)
    prompts = as_batch(prompts)
    check_positions(model.config, max(len(p) for p in prompts), max_new_tokens)
    ids, attn = left_pad(prompts, model.device)  # [B, L] each
    vocab_limit, warpers, generator = sampling_setup(model, vocab_limit, greedy, temperature, top_k, top_p, seed)
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=model.device)
    B = ids.shape[0]
    padded = bool((attn == 0).any())
    kv = KVCache(model.config.num_hidden_layers) if use_kv_cache else None
    new = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    start = time.perf_counter()
    prefill = 0.0
    step_input, seq = ids, ids
    steps = range(max_new_tokens)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate", unit="tok")
    for step in steps:
        mask = attn if padded else None
        logits = (model(step_input, mask, kv, routing=routing) if kv is not None
                  else model(seq, mask, routing=routing))[:, -1].float()  # [B, V]
        token = pick_token(logits, seq, vocab_limit, greedy, warpers, generator)  # [B]
        token = torch.where(done, torch.zeros_like(token), token)
        for b in range(B):
            if not done[b]:
                new[b].append(int(token[b]))
        if stop.numel():
            done |= torch.isin(token, stop)
        if step == 0:
            prefill = time.perf_counter() - start
        if bool(done.all()):
            break
        seq = torch.cat((seq, token[:, None]), dim=1)  # [B, L + step + 1]
        attn = torch.cat((attn, torch.ones_like(attn[:, :1])), dim=1)
        step_input = token[:, None]  # [B, 1]
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return Generation(new, [len(p) for p in prompts], seconds, prefill, stopped=[bool(d) for d in done.tolist()])


# the Python face's argument names -> the CLI's flags (one message for both)
FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
         "top_p": "--top-p", "seed": "--seed"}


def check_sampling(max_new_tokens, greedy, temperature, top_k, top_p, seed, *, cli: bool = False) -> None:
    """ValueError, one line, for sampling arguments generate cannot follow (the CLI's flags named when `cli`)."""
    import math
    import numbers

    def name(arg):
        return FLAGS[arg] if cli else arg

    def number(x):
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    if not (isinstance(max_new_tokens, numbers.Integral) and not isinstance(max_new_tokens, bool)) or max_new_tokens < 1:
        raise ValueError(f"{name('max_new_tokens')} must be an integer of at least 1, got {max_new_tokens!r}")
    if not number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{name('temperature')} must be a positive finite number, got {temperature!r}")
    if not number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"{name('top_p')} must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"{name('top_k')} must be 0 (off) or a positive integer, got {top_k!r}")
    if seed is not None and (not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63):
        raise ValueError(f"{name('seed')} must be an integer in 0..2**63-1, got {seed!r}")


def check_positions(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """ValueError when prompt and new tokens pass the model's max_position_embeddings (positions it never saw)."""
    limit = getattr(config, "max_position_embeddings", 0) or 0
    if limit and prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"the prompt's {prompt_tokens} tokens plus {max_new_tokens} new ones pass the model's "
                         f"max_position_embeddings ({limit}); shorten the prompt or lower max_new_tokens")


def as_batch(prompts) -> list[list[int]]:
    """One prompt (list of ids, 1-D tensor) or a batch (list of lists, 2-D tensor) -> a list of id lists."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    return prompts


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ids [B, L] left padded with id 0 and attention_mask [B, L] (1 = token, 0 = padding)."""
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.long, device=device)  # [B, L]
    attn = torch.zeros(B, L, dtype=torch.long, device=device)  # [B, L]
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[b, L - len(p):] = 1
    return ids, attn


def pick_token(logits: torch.Tensor, seq: torch.Tensor, vocab_limit, greedy: bool, warpers, generator) -> torch.Tensor:
    """The next token of each row: logits [B, V] (fp32, modified in place), seq [B, S] the ids so far -> [B]."""
    if vocab_limit is not None:
        logits[:, vocab_limit:] = float("-inf")
    if greedy:
        return logits.argmax(-1)  # [B]
    for warp in warpers:
        logits = warp(seq, logits)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]  # [B]


def resolve_vocab_limit(model, vocab_limit="auto") -> int | None:
    """The first id a generate call never produces: "auto" is the tokenizer's length (the embedding's rows past
    it are padding, not tokens); None when the limit covers the whole embedding."""
    if vocab_limit == "auto":
        vocab_limit = len(model.tokenizer) if model.tokenizer is not None else None
    return None if vocab_limit is not None and vocab_limit >= model.config.vocab_size else vocab_limit


def sampling_setup(model, vocab_limit, greedy, temperature, top_k, top_p, seed):
    """(vocab_limit, logits warpers, random generator) of one generate call (resolve_vocab_limit)."""
    vocab_limit = resolve_vocab_limit(model, vocab_limit)
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    return vocab_limit, logits_warpers(greedy, temperature, top_k, top_p), generator


def logits_warpers(greedy, temperature, top_k, top_p) -> list:
    """transformers' warpers for sampling, in its order (temperature, top-k, top-p); none when greedy."""
    if greedy:
        return []
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    warpers = []
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k and top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers
