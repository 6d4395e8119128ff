"""Generation through the runtime: `generate(model, prompts, ...)` asks `choose` for the engine, runs the call
there and returns a `Generation` that says which engine ran (`engine`), why a faster one did not (`refusal`),
and the peak GPU memory.

Engines built for a model (the resident slot pool, the offload decoder and its host tier) are kept with the
model in `engines(model)`, so a sweep or a notebook that generates many times pays for them once.
"""

from __future__ import annotations

from functools import partial

import torch

from omnilab.model.experts import TrustWeighted
from omnilab.model.generate import (Generation, as_batch, check_sampling, generate as eager_generate,
                                    resolve_vocab_limit, until_stop)
from omnilab.runtime.choose import Call, choose, engines


def max_len_bucket(tokens: int) -> int:
    """Static KV length for prompt + new tokens: a power of two from 256, so calls of nearby lengths share one
    decoder (and its captured graph)."""
    size = 256
    while size < tokens:
        size *= 2
    return size


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int = 32, *, greedy: bool = True, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens=(), vocab_limit="auto", seed: int | None = 0,
             routing=None, engine: str = "auto", progress: bool = False, use_kv_cache: bool = True) -> Generation:
    """Generate from one prompt (ids) or a batch (lists of ids, left padded) on the fastest engine that takes
    the call (omnilab.runtime.choose); the options are those of omnilab.model.generate.generate. engine: "auto"
    or a name from choose.ENGINES to insist on."""
    check_sampling(max_new_tokens, greedy, temperature, top_k, top_p, seed)
    prompts = as_batch(prompts)
    call = Call(batch=len(prompts), ragged=len({len(p) for p in prompts}) > 1, sampling=not greedy,
                routing=routing, max_len=max(map(len, prompts)) + int(max_new_tokens))
    if not use_kv_cache:  # the test path of the eager engine
        engine = "eager"
    choice = choose(model, call, engine)
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.device)
    limit = resolve_vocab_limit(model, vocab_limit)  # ids at or past it never produced
    if choice.engine == "eager":
        out = eager_generate(model, prompts, max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k,
                             top_p=top_p, stop_tokens=stop_tokens, vocab_limit=vocab_limit, seed=seed,
                             use_kv_cache=use_kv_cache, progress=progress, routing=routing)
    elif choice.engine.endswith("resident"):
        out = resident_decoder(model, prompts, call).generate(
            prompts, int(max_new_tokens), vocab_limit=limit, greedy=greedy, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop_tokens=stop_tokens)
    else:
        out = cut_at_stop(_offload(model, prompts, int(max_new_tokens), limit, call), stop_tokens)
    out.engine, out.refusal = choice.engine, choice.refusal
    out.peak_gpu_bytes = torch.cuda.max_memory_allocated(model.device) if cuda else None
    return out


def resident_decoder(model, prompts, call: Call):
    """The FastDecoder for this call: one per (batch, max_len bucket, top-k, routing), over the model's shared slot
    pool; one kept at a time (its KV cache is the big part). Compiled when `compiles` says so."""
    from omnilab.gpu.fast import FastDecoder

    built = engines(model)
    pool = resident_pool(model)
    routing = model.routing if call.routing is None else call.routing
    key = ("fast", len(prompts), max_len_bucket(call.max_len), routing.experts_per_token(model.config),
           routing_key(routing))
    if key not in built:
        for old in [k for k in built if k[0] == "fast"]:
            del built[old]
        built[key] = FastDecoder(model, max_len=key[2], batch=key[1], pool=pool, routing=routing,
                                 compile=compiles(model, routing))
    return built[key]


def resident_pool(model):
    """The model's every-expert SlotPool on its device (built once, kept in engines(model)["pool"]): the resident
    fast path and the trace prefill read it, and the eager path's ExpertStore serves views into it, so the device
    holds one copy of the experts (the eager cache's own copies are dropped first: on an 80 GB card two copies of
    the 48-layer thinker's 58 GB do not fit, and notebook 05's trace ran out of memory that way on an H100)."""
    from omnilab.gpu.slots import SlotPool

    built = engines(model)

    def build():  # the eager cache's copies are let go first, then re-read as views (its statistics kept)
        release_device(model)
        config, layout = model.checkpoint.arch
        built["pool"] = SlotPool.all_resident(model.checkpoint, config, layout, model.dtype, model.device)
        model.cache.store.resident = built["pool"]  # the model's one store (a sweep's caches share it)

    if "pool" not in built:
        model.cache.reread(build)
    return built["pool"]


def drop_resident(model) -> None:
    """Free the resident pool and the fast decoders over it (the offload engine needs the room): the eager
    path's store reads the shards again and its cache, whose experts were views into the pool, starts empty."""
    built = engines(model)
    if "pool" not in built:
        return
    for key in [k for k in built if k == "pool" or (isinstance(k, tuple) and k[0] == "fast")]:
        del built[key]
    model.cache.store.resident = None
    model.cache.clear()
    release_device(model)


def release_device(model) -> None:
    """Collect dropped engines (modules hold reference cycles) and give their blocks back to the device."""
    import gc

    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def compiles(model, routing) -> bool:
    """Whether the resident decoder compiles its step: bf16 on CUDA (bench: 156.8 tok/s against 92.2 on an H200,
    48 layers) with the model's own routing. An intervention (a transform, a mask, an override, another top-k)
    is part of what the compiled step guards on, so each new one recompiles (about 20 s) and past dynamo's
    recompile limit (8) the step silently runs uncompiled: notebook 05's sweep hit it on the H200 at its fifth
    setting. Intervened decoders capture the uncompiled step instead (its CUDA graph, no compile)."""
    return model.device.type == "cuda" and model.dtype == torch.bfloat16 and routing.is_plain


def routing_key(routing) -> tuple:
    """What identifies a decoder's routing: its transforms (by value when hashable, else by object) and the
    objects of its mask and override (a decoder builds their tensors once)."""
    def ident(t):
        try:
            return hash(t), t
        except TypeError:
            return id(t), None
    return (tuple(ident(t) for t in routing.transforms), id(routing.available), id(routing.override))


OFFLOAD_MARGIN = 2 << 30  # bytes an offload decoder needs beyond its slots (KV cache, graphs, activations)


def slot_policy(policy) -> tuple:
    """How the offload engine makes eviction policies like the eager cache's `policy` (an object of a POLICIES
    class), one per MoE layer: (its class, its settings as (name, value) pairs; TrustWeighted's decay)."""
    return type(policy), ((("decay", policy.decay),) if isinstance(policy, TrustWeighted) else ())


def offload_decoder(model, call: Call):
    """The OffloadDecoder for the model's expert budget and policy: one per (max_len bucket, budget, policy), over
    the model's host tier (the shard maps registered page-locked for a checkpoint in /dev/shm, else a pinned host
    copy). Its slots evict by the model cache's policy, per MoE layer (the eager cache's budget is global).
    step="slot" (one graph per layer and slot, the fastest at small pools: bench/results/offload_h200_bf16_slot.md)
    up to 32 slots a layer, "choice" above; compiled segments for bf16 on CUDA."""
    from omnilab.gpu.host import HostTier
    from omnilab.gpu.offload import OffloadDecoder

    built = engines(model)
    if "host" not in built:
        config, layout = model.checkpoint.arch
        if str(model.checkpoint.root.resolve()).startswith("/dev/shm/"):  # in RAM already: register its maps
            built["host"] = HostTier.mapped(model.checkpoint, config, layout, register=model.device.type == "cuda")
        else:  # on disk: one pinned copy in host memory (registering a file's maps can fail, and pages from disk)
            built["host"] = HostTier.copy(model.checkpoint, config, layout, model.dtype,
                                          pin=model.device.type == "cuda")
    budget = model.cache.budget_bytes
    policy, settings = slot_policy(model.cache.policy)
    key = ("offload", max_len_bucket(call.max_len), budget, policy, settings)
    if key not in built:
        stale = [k for k in built if k[0] == "offload"]
        for old in stale:
            del built[old]
        if stale:  # its slots go back before the new budget's are allocated (both at once may not fit)
            release_device(model)
        if model.device.type == "cuda" and "pool" in built:
            free, _ = torch.cuda.mem_get_info(model.device)
            if free < budget + OFFLOAD_MARGIN:  # the slots beside every resident expert do not fit: free those
                drop_resident(model)
        slots = budget // (model.cache.store.expert_bytes * len(model.config.moe_layers))
        built[key] = OffloadDecoder(model, built["host"], expert_budget_bytes=budget, max_len=key[1], prefetch=False,
                                    step="slot" if slots <= 32 else "choice",
                                    compile=model.device.type == "cuda" and model.dtype == torch.bfloat16,
                                    policy=partial(policy, **dict(settings)))
    return built[key]


def _offload(model, prompts, n: int, vocab_limit, call: Call) -> Generation:
    """The offload decoder, one prompt at a time (it decodes batch 1); `cache` sums its statistics over the
    prompts (decode steps; the pool's bytes as the peak resident)."""
    decoder = offload_decoder(model, call)
    parts, stats = [], []
    for p in prompts:
        parts.append(decoder.generate(p, n, vocab_limit=vocab_limit))
        stats.append(decoder.stats.to_dict())
    out = Generation([t for g in parts for t in g.new_token_ids], [len(p) for p in prompts],
                     sum(g.seconds for g in parts), sum(g.prefill_seconds for g in parts),
                     stopped=[False] * len(prompts))
    out.cache = {k: sum(s[k] for s in stats) for k in ("hits", "misses", "bytes_moved", "copies", "tokens")}
    out.cache.update(loaded_bytes=out.cache["bytes_moved"], peak_resident_bytes=decoder.pool.nbytes,
                     hit_rate=out.cache["hits"] / max(1, out.cache["hits"] + out.cache["misses"]))
    return out


def cut_at_stop(out: Generation, stop_tokens) -> Generation:
    """Each row's tokens up to and including its first stop token, as the eager loop stops (the offload engine
    decodes the whole budget without a host sync per token; the resident one stops on the device)."""
    stop = set(stop_tokens or ())
    if not stop:
        return out
    for b, row in enumerate(out.new_token_ids):
        out.new_token_ids[b] = until_stop(row, stop)
        out.stopped[b] = bool(out.new_token_ids[b]) and out.new_token_ids[b][-1] in stop
    return out


def sampling_options(generation_config: dict, *, greedy: bool | None = None, temperature=None, top_k=None,
                     top_p=None) -> tuple[dict, str]:
    """(greedy, temperature, top_k, top_p) as transformers reads them: what the call gives, else the checkpoint's
    generation_config.json, else transformers' GenerationConfig defaults (do_sample False, temperature 1.0,
    top_k 50, top_p 1.0); and one line saying which was used and where it came from."""
    config = generation_config or {}
    defaults = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
    sample = (not greedy) if greedy is not None else bool(config.get("do_sample", False))
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    options = {k: v if v is not None else config.get(k, defaults[k]) for k, v in given.items()}
    origin = ("the call" if greedy is not None else
              "generation_config.json" if "do_sample" in config else "transformers' default (do_sample false)")
    if not sample:
        return {"greedy": True, **options}, f"greedy (from {origin})"
    detail = ", ".join(f"{k} {options[k]:g}" for k in options)
    return {"greedy": False, **options}, f"sampling: {detail} (do_sample from {origin})"
