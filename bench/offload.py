"""Offloaded decode (omnilab.gpu.offload) under a total GPU memory cap, routed by benchmark traces, against
accelerate's offload of the transformers reference at the same GPU memory, in one run.

    python bench/offload.py --device cuda --layers 48                  # the default plan: 8 GB and 16 GB caps
    python bench/offload.py --checkpoint DIR --device cpu ...          # any checkpoint; the CPU path

The checkpoint is `omnilab.testing.synth.real_shape_checkpoint` (as bench/decode.py). Routing: a random-weight model
routes the same way at every step, so every row forces the routers' choice with a trace
(`omnilab.model.routing.RoutingOverride`): `uniform` (k distinct experts at random: the worst case) and `locality`
(45% of choices repeated from the previous token, 80% within 8: the Qwen3-30B-A3B statistics of issue 13).
Decode inputs are teacher-forced random ids. The cap is enforced with torch.cuda.set_per_process_memory_fraction
and the expert slots are sized from it after the backbone on the GPU (the embedding table stays on the host
unless a row says `devembed`), the KV cache and a working reserve.

--plan lists the rows: CAP/TRACE[/OPTIONS], OPTIONS joined by '+' from: torch (copies issued through torch's
copy_, as before; default: straight through the CUDA driver), compile (the segments through torch.compile),
prefetch (speculative next-layer prefetch; under a forced trace the router's guess is unrelated to the trace,
so its precision is chance, k / E), devembed (the embedding table on the GPU), slot (OffloadDecoder(step="slot"):
one graph per (layer, slot) instead of per routed choice, the layer's sum folded into the next layer's attention
graph, the layer's last miss copied gate|up first and computed in two halves), host (hybrid: OffloadDecoder(
host_share="auto"), a share of each layer's misses computed on the host's cores while the rest copy; its floor
column is still the all-misses-copied PCIe floor). Every row also runs one profiled
pass (CUDA events around every phase of every layer: the breakdown table) after its timed pass.

--rows noise adds issue 28's noise-floor report for the hybrid (row_noise): per MoE layer, decode steps with the
router's own choices (copied, and with the auto host share) against transformers' fp32 beside transformers' own
bf16-vs-fp32 error, and the hybrid against the all-copied steps under the uniform trace.

The PCIe floor is the row's measured bytes per token at the measured pinned host-to-device bandwidth (a 1 GB
pinned buffer); the host tier's own bandwidth (experts copied back to back from it) is reported beside it.
Rows of one trace and compile setting compute the same arithmetic whatever the budget (a choice's expert output
does not depend on which other experts were resident), so their tokens must agree ("same tokens": against the
first row of that trace and setting).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import build_checkpoint  # noqa: E402  (bench/decode.py: the same checkpoint)

from omnilab.memory import AnonPeak  # noqa: E402

DEFAULT_PLAN = ("8/uniform/torch,8/uniform,8/locality,8/uniform/compile,8/locality/compile,8/uniform/compile+prefetch,"
                "16/uniform/compile,16/locality/compile")
OPTIONS = {"torch", "compile", "prefetch", "devembed", "slot", "host"}


TOWERS = ("thinker.audio_tower.", "thinker.visual.")  # left out: the text decoder runs without them


_BLOCK = []  # per worker: one random block the tensors are filled from


def _fill(job) -> int:
    """Fill tensors of one shard in place: norms 1, biases 0, the rest windows of one N(0, 0.02) block of
    2^24 values, starting at an offset given by the tensor's name (a memory copy per tensor, not a random draw:
    the filler runs at memory speed; the values are random but not independent across tensors)."""
    import zlib

    import numpy as np
    import torch

    torch.set_num_threads(1)
    if not _BLOCK:
        _BLOCK.append(torch.randn(1 << 24, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16) * 0.02)
    block = _BLOCK[0]
    shard, items = job
    data = np.memmap(shard, dtype=np.uint8, mode="r+")
    done = 0
    for name, begin, end in items:
        flat = torch.from_numpy(data[begin:end]).view(torch.bfloat16)  # [numel] over the shard's bytes
        last = name.rsplit(".", 2)[-2]
        if name.endswith(".bias"):
            flat.zero_()
        elif "norm" in last or last.startswith("ln_"):
            flat.fill_(1.0)
        else:
            off, pos = zlib.crc32(name.encode()) % block.numel(), 0
            while pos < flat.numel():
                n = min(flat.numel() - pos, block.numel() - off)
                flat[pos:pos + n].copy_(block[off:off + n])
                pos, off = pos + n, 0
        done += end - begin
    data.flush()
    return done


def sort_shard(shard: Path) -> None:
    """Rewrite a (still empty) shard with its tensors in name order, as safetensors' own writer stores them
    (sorted by dtype, then name): each expert's down, gate and up then lie side by side, as in the released
    Qwen3-Omni shards (sparse_from_config keeps the state-dict order: every down, then every gate, ...)."""
    from omnilab.checkpoint import pack_header, read_header

    header, _ = read_header(shard)
    meta = header.pop("__metadata__", None)
    out, offset = ({"__metadata__": meta} if meta is not None else {}), 0
    for name in sorted(header):
        n = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
        out[name] = {**header[name], "data_offsets": [offset, offset + n]}
        offset += n
    blob = pack_header(out)
    tmp = shard.with_name(shard.name + ".sorted")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.truncate(len(blob) + offset)  # the data region stays a hole until the filler writes it
    tmp.replace(shard)


def build_parallel(args) -> Path:
    """The real-shape thinker (omnilab.testing.synth.real_shape_config, towers left out) in bf16, its layout written by
    omnilab.testing.synth.sparse_from_config and its tensors filled by --build-workers processes in parallel (see
    _fill); 48 layers in a fraction of real_shape_checkpoint's single-process time (77 s on the H200's host).
    Reused when finished; written under OUT.tmp and renamed."""
    import multiprocessing
    import shutil

    import torch

    from omnilab.checkpoint import read_header
    from omnilab.jsonio import write_json
    from omnilab.testing.synth import real_shape_config, sparse_from_config

    out = Path(args.workdir) / f"omni-thinker-{args.layers}l-par"
    params = {"layers": args.layers, "dtype": "bfloat16", "towers": False, "std": 0.02, "builder": "bench/offload.py windows, name order"}
    marker = out / "omnilab-random.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return out
    if out.exists():
        raise SystemExit(f"offload bench: {out} exists and is not a finished checkpoint of {params}")
    start = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    config = args.config_dict if getattr(args, "config_dict", None) else real_shape_config(args.layers)
    sparse_from_config(config, tmp, dtype=torch.bfloat16, keep=lambda name: not name.startswith(TOWERS))
    for shard in sorted(tmp.glob("*.safetensors")):
        sort_shard(shard)
    jobs = []
    for shard in sorted(tmp.glob("*.safetensors")):
        header, base = read_header(shard)
        items = [(n, base + m["data_offsets"][0], base + m["data_offsets"][1]) for n, m in header.items()
                 if n != "__metadata__"]
        step = max(1, len(items) // 8)  # several jobs per shard: the workers stay busy to the end
        jobs += [(str(shard), items[i:i + step]) for i in range(0, len(items), step)]
    with multiprocessing.get_context("fork").Pool(args.build_workers) as pool:
        list(pool.imap_unordered(_fill, jobs))
    write_json(tmp / "omnilab-random.json", params)
    tmp.rename(out)
    print(f"[bench] checkpoint {out} ({time.perf_counter() - start:.0f} s, {args.build_workers} workers)",
          file=sys.stderr, flush=True)
    return out


def parse_plan(text: str) -> list[dict]:
    rows = []
    for item in [s for s in text.split(",") if s.strip()]:
        parts = item.strip().split("/")
        if len(parts) not in (2, 3) or parts[1] not in ("uniform", "locality"):
            raise SystemExit(f"offload bench: --plan entry {item!r}: use CAP/uniform|locality[/OPTION+OPTION]")
        opts = set(parts[2].split("+")) if len(parts) == 3 and parts[2] else set()
        if opts - OPTIONS:
            raise SystemExit(f"offload bench: --plan entry {item!r}: unknown option(s) {sorted(opts - OPTIONS)}")
        rows.append({"cap_gb": float(parts[0]), "trace": parts[1], "opts": opts})
    return rows


def pinned_h2d_gb_s(device, nbytes: int = 1 << 30) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * nbytes / (time.perf_counter() - start) / 1e9


def tier_h2d(host, config, device, experts: int = 96) -> dict:
    """The host tier's own bandwidth: `experts` experts (spread over the layers) copied back to back into a GPU
    buffer through the driver, one cuMemcpyHtoDAsync per span, timed with CUDA events."""
    import torch

    from omnilab.gpu.host import DriverCopy

    copy = DriverCopy()
    layers = config.moe_layers
    picks = [(layers[(j * 7) % len(layers)], (j * 37) % config.num_experts) for j in range(experts)]
    spans = [s for p in picks for s in host.spans(*p)]
    size = sum(n for _, n, _ in host.spans(*picks[0]))
    dst = torch.empty(2, size, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    handle = stream.cuda_stream
    for _ in range(2):  # the first pass warms the path
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record(stream)
        for j, (src, n, off) in enumerate(spans):
            copy(dst[j % 2].data_ptr() + off, src, n, handle)
        end.record(stream)
        issue_s = time.perf_counter() - t0
        end.synchronize()
    nbytes = sum(n for _, n, _ in spans)
    return {"tier_h2d_gb_s": nbytes / (start.elapsed_time(end) / 1e3) / 1e9, "copies_per_expert": len(spans) / experts,
            "issue_us_per_copy": issue_s / len(spans) * 1e6}


def load_offload(args):
    """The selective model (its experts left on disk) and the host tier of shard maps, registered on CUDA."""
    from omnilab.gpu.host import HostTier
    from omnilab.model.decoder import SelectiveMoE

    model = SelectiveMoE.from_checkpoint(args.checkpoint, dtype=args.dtype, device=args.device, tokenizer=False)
    config, layout = model.checkpoint.arch
    return model, HostTier.mapped(model.checkpoint, config, layout, register=args.device.startswith("cuda"))


def decode_inputs(cfg, args):
    """Every row's prompt [P] and teacher-forced decode inputs [n] (random ids, seeded), and the routing traces
    (uniform, locality) [L, P + n, k] that force the routers' choice."""
    import torch

    from omnilab.testing.traces import locality_trace, uniform_trace

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,), generator=gen)
    forced = torch.randint(0, cfg.vocab_size, (args.new_tokens,), generator=gen)
    S = args.prompt_tokens + args.new_tokens
    L, E, k = len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok
    traces = {"uniform": uniform_trace(L, S, E, k, seed=2),
              "locality": locality_trace(L, S, E, k, next=0.45, within8=0.80, seed=2)}
    return prompt, forced, traces


def row_omnilab(args) -> list[dict]:
    import torch

    from omnilab.gpu.offload import OffloadDecoder
    from omnilab.model.routing import RoutingOverride
    from omnilab.testing.traces import reuse_stats

    dev = args.device
    cuda = dev.startswith("cuda")
    plan = parse_plan(args.plan)
    rows = []
    with AnonPeak() as anon:
        start = time.perf_counter()
        model, host = load_offload(args)
        load_s = time.perf_counter() - start
        cfg = model.config
        prompt, forced, traces = decode_inputs(cfg, args)
        S = args.prompt_tokens + args.new_tokens
        L, E, k = len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok
        bandwidth = pinned_h2d_gb_s(dev) if cuda else float("nan")
        try:
            tier = tier_h2d(host, cfg, dev) if cuda else {}
        except Exception as err:  # noqa: BLE001 - the rows still run (through torch when the driver path fails)
            tier = {"tier_error": f"{type(err).__name__}: {err}"}
        print(f"[offload] loaded in {load_s:.0f} s ({host.how})", file=sys.stderr, flush=True)
        if tier:
            print(f"[offload] pinned buffer {bandwidth:.1f} GB/s; tier {tier}", file=sys.stderr, flush=True)
        total = torch.cuda.get_device_properties(dev).total_memory if cuda else None
        reference = {}  # compile setting -> the first row's tokens
        for spec in plan:
            cap_gb, name, opts = spec["cap_gb"], spec["trace"], spec["opts"]
            label = f"omnilab offload, {name} trace" + "".join(f", {o}" for o in sorted(opts))
            host_embed = not cfg.tie_word_embeddings and "devembed" not in opts
            where = torch.device("cpu") if host_embed else torch.device(dev)
            table = model.model.embed_tokens.weight
            if table.device != where:  # moved, not copied: the other copy is freed
                model.model.embed_tokens.weight = torch.nn.Parameter(table.detach().to(where), requires_grad=False)
                del table
            gc.unfreeze()  # the last row's decoder (frozen below: slots, graphs) collected before this cap's
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total))
                torch.cuda.reset_peak_memory_stats()
            # the backbone on the GPU (the host embedding's table is not)
            backbone = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == dev.split(":")[0])
            per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * model.dtype.itemsize
            kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 512 * model.dtype.itemsize
            room = cap_gb * 1e9 - backbone - kv - (args.reserve_gb + args.reserve_per_gb * cap_gb) * 1e9
            slots = args.slots or min(E, int(room // (per_expert * L)))
            if slots < k:
                rows.append({"row": label, "cap_gb": cap_gb, "error": f"{slots} slots < top-{k}"})
                continue
            override = RoutingOverride.from_trace(traces[name], cfg.moe_layers)
            decoder = None
            try:
                decoder = OffloadDecoder(model, host, slots=slots, max_len=S, prefetch="prefetch" in opts,
                                         override=override, issue="torch" if "torch" in opts or not cuda else "driver",
                                         compile="compile" in opts, step="slot" if "slot" in opts else "choice",
                                         host_share="auto" if "host" in opts else 0.0)
                measured_share = decoder.host_share  # "auto": measured before decoding; then observe_host's
                decoder.generate(prompt, 4, forced=forced)  # warm-up (graphs, kernels, slots filled)
                gc.collect()
                gc.freeze()  # the objects made so far never get scanned again: no long collection mid-step
                out = decoder.generate(prompt, args.new_tokens, forced=forced)
                st = decoder.stats.to_dict()
                decoder.generate(prompt, args.profile_tokens, forced=forced, profile=True)
                profile = decoder.profile
            except Exception as err:  # noqa: BLE001 - one configuration failing (memory, compile) keeps the others
                rows.append({"row": label, "cap_gb": cap_gb, "error": f"{type(err).__name__}: "
                             f"{(str(err).splitlines() or [''])[0][:200]}"})
                print(f"[offload] {label}: {rows[-1]['error']}", file=sys.stderr, flush=True)
                decoder = None
                continue
            key = ("compile" in opts, "slot" in opts, "host" in opts)  # rows of one arithmetic: the same tokens
            tokens = out.new_token_ids[0]
            reference.setdefault((name, key), (label, tokens))
            # the PCIe floor with every miss copied (a hybrid row's host-computed choices counted as copies)
            copied = st["bytes_per_token"] + st.get("host_computed", 0) / max(st["tokens"], 1) * per_expert
            floor = bandwidth * 1e9 / copied if copied else float("inf")
            copy_twin = reference.get((name, key[:2] + (False,)))  # the same row without the host's share
            rows.append({"row": label, "cap_gb": cap_gb, "slots_per_layer": slots, "trace_stats": reuse_stats(traces[name]),
                         "decode_tokens_per_s": out.decode_tokens_per_s,
                         "prefill_tokens_per_s": args.prompt_tokens / out.prefill_seconds, **st,
                         "pinned_h2d_gb_s": bandwidth, **tier, "pcie_floor_tokens_per_s": floor,
                         "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None, "host_tier": host.how,
                         "embedding": "host" if host_embed else "gpu", "issue": decoder.issue,
                         "compiled": decoder.compiled, "step": decoder.step, "slab_check": getattr(decoder, "slab_check", "not run"),
                         "load_s": load_s, "profile": profile, "tokens": tokens,
                         "same_tokens_as": reference[name, key][0], "same_tokens": tokens == reference[name, key][1],
                         "host_share": decoder.host_share, "host_share_measured": measured_share,
                         "host_rates": decoder.host_rates,
                         "same_tokens_as_copied": None if copy_twin is None or "host" not in opts
                         else tokens == copy_twin[1]})
            if os.environ.get("OFFLOAD_PARTIAL"):  # a run cut short keeps the configurations it measured
                Path(os.environ["OFFLOAD_PARTIAL"]).write_text(json.dumps(rows, indent=2) + "\n")
            print(f"[offload] {label} cap {cap_gb} GB: {out.decode_tokens_per_s:.1f} tok/s (floor {floor:.1f}), "
                  f"hit {st['hit_rate']:.1%}, phases {json.dumps({k: round(v, 2) for k, v in profile['phase_ms'].items()})}"
                  f" host {json.dumps({k: round(v, 2) for k, v in profile['host_ms'].items()})}",
                  file=sys.stderr, flush=True)
            decoder = None
    for r in rows:
        r["peak_anon_bytes"] = anon.peak
    return rows


def row_noise(args) -> list[dict]:
    """Issue 28's noise-floor report for hybrid offload, per MoE layer (omnilab.reference.compare.compare_decode):
    teacher-forced decode steps with the router's own choices, every miss copied and with the auto host share, each
    against transformers' fp32 (StreamedReference over the same ids) beside transformers' own bf16-vs-fp32 error;
    then, under the uniform trace (the most misses, so the most host-computed choices), the hybrid steps against
    the all-copied steps of the same routing."""
    import torch

    from omnilab.gpu.offload import OffloadDecoder
    from omnilab.model.hooks import compare_activations
    from omnilab.model.routing import RoutingOverride
    from omnilab.reference.compare import compare_decode
    from omnilab.reference.streamed import StreamedReference

    model, host = load_offload(args)
    cfg = model.config
    prompt, forced, traces = decode_inputs(cfg, args)
    S = args.prompt_tokens + args.new_tokens
    slots = args.slots or cfg.num_experts_per_tok  # the fewest slots: the most misses, the most host choices
    override = RoutingOverride.from_trace(traces["uniform"], cfg.moe_layers)
    decoded, host_choices = {}, {}
    for routing in ("router", "uniform"):
        for label, share in (("copied", 0.0), ("hybrid", "auto")):
            decoder = OffloadDecoder(model, host, slots=slots, max_len=S, prefetch=False, host_share=share,
                                     override=override if routing == "uniform" else None)
            decoder.generate(prompt, args.new_tokens, forced=forced, record_residuals=True)
            decoded[routing, label] = decoder.residuals
            host_choices[routing, label] = decoder.stats.host_computed
            decoder = None
            gc.collect()
    ids = torch.cat([prompt, forced[:args.new_tokens - 1]]).tolist()  # the decode steps' inputs after the prompt
    start = time.perf_counter()
    table = compare_decode({"copied": decoded["router", "copied"], "hybrid": decoded["router", "hybrid"]},
                           StreamedReference(args.checkpoint, device=args.device), ids, args.prompt_tokens, args.dtype)
    reference_s = time.perf_counter() - start
    versus = compare_activations(decoded["uniform", "copied"], decoded["uniform", "hybrid"]).table.set_index("name")
    table["hybrid vs copied, uniform trace"] = [float(versus.rel_err[n]) for n in table.hook]
    table["uniform within"] = table["hybrid vs copied, uniform trace"] <= table["threshold"]
    return [{"row": "noise report", "noise_report": table.to_dict(orient="records"), "slots_per_layer_noise": slots,
             "host_choices": {f"{r}/{lab}": n for (r, lab), n in host_choices.items()}, "reference_s": reference_s,
             "decode_steps": args.new_tokens - 1}]


def row_accelerate(args) -> list[dict]:
    """transformers' thinker with accelerate's offload (device_map="auto", max_memory = the cap): prefill, then
    teacher-forced decode steps until --accelerate-tokens or --accelerate-seconds."""
    import torch

    from omnilab import Checkpoint
    from omnilab.dtypes import as_dtype
    from omnilab.tokenizer import quiet_transformers

    rows = []
    checkpoint = Checkpoint(args.checkpoint)
    config, layout = checkpoint.arch
    from transformers import DynamicCache
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration as model_cls

    cap_gb = min(parse_plan(args.plan), key=lambda r: r["cap_gb"])["cap_gb"]
    with AnonPeak() as anon:
        start = time.perf_counter()
        with quiet_transformers():
            hf = model_cls.from_pretrained(str(checkpoint.root), dtype=as_dtype(args.dtype), device_map="auto",
                                           max_memory={0: f"{cap_gb:g}GB", "cpu": "200GB"},
                                           attn_implementation="sdpa", experts_implementation="batched_mm")
        hf.eval()
        if not hasattr(hf.config, "vision_start_token_id"):
            hf.config.vision_start_token_id = 151652
        load_s = time.perf_counter() - start
        print(f"[accelerate] loaded in {load_s:.0f} s", file=sys.stderr, flush=True)
        torch.cuda.reset_peak_memory_stats()
        gen = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, config.vocab_size, (args.prompt_tokens,), generator=gen)[None].to("cuda")
        forced = torch.randint(0, config.vocab_size, (args.new_tokens,), generator=gen)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = hf(input_ids=prompt, past_key_values=DynamicCache(config=hf.config.get_text_config()), use_cache=True)
            torch.cuda.synchronize()
            prefill_s = time.perf_counter() - t0
            print(f"[accelerate] prefill {prefill_s:.1f} s", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            n = 0
            while n < args.accelerate_tokens and (n == 0 or time.perf_counter() - t0 < args.accelerate_seconds):
                out = hf(input_ids=forced[None, n:n + 1].to("cuda"), past_key_values=out.past_key_values,
                         use_cache=True)
                torch.cuda.synchronize()
                n += 1
            dt = time.perf_counter() - t0
    rows.append({"row": "transformers + accelerate offload (batched_mm)", "cap_gb": cap_gb,
                 "decode_tokens_per_s": n / dt, "decode_steps": n, "prefill_s": prefill_s, "load_s": load_s,
                 "peak_gpu_bytes": torch.cuda.max_memory_allocated(), "peak_anon_bytes": anon.peak})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", default="/dev/shm/omnilab-bench")
    p.add_argument("--build", choices=("parallel", "synth"), default="parallel",
                   help="how the checkpoint is made: parallel (bench/offload.py's filler, default) or synth "
                        "(omnilab.testing.synth.real_shape_checkpoint, as bench/decode.py)")
    p.add_argument("--build-workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--plan", default=DEFAULT_PLAN, help="rows, CAP/TRACE[/OPTIONS], comma-separated (see above)")
    p.add_argument("--reserve-gb", type=float, default=0.3, help="GPU memory kept for activations and workspace")
    p.add_argument("--reserve-per-gb", type=float, default=0.02, help="plus this much per GB of cap (allocator "
                   "rounding grows with the slots: 0.3 GB flat ran out of memory at 16 GB)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--profile-tokens", type=int, default=8, help="decode steps of each row's profiled pass")
    p.add_argument("--accelerate-tokens", type=int, default=3)
    p.add_argument("--accelerate-seconds", type=float, default=40.0, help="stop accelerate's decode after this")
    p.add_argument("--slots", type=int, default=0, help="expert slots per layer (default: sized from the cap)")
    p.add_argument("--rows", default="omnilab,accelerate", help="comma-separated: omnilab (the plan's rows), "
                   "accelerate, noise (the hybrid's per-layer noise-floor report: row_noise)")
    p.add_argument("--row-timeout", type=int, default=400)
    p.add_argument("--accelerate-timeout", type=int, default=200, help="seconds the accelerate row may take")
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args()
    parse_plan(args.plan)  # a bad plan fails here, before any work
    if args.row:
        print(json.dumps({"omnilab": row_omnilab, "accelerate": row_accelerate, "noise": row_noise}[args.row](args)))
        return 0
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        ckpt = None
        if args.build == "parallel":
            try:
                ckpt = build_parallel(args)
            except Exception as err:  # noqa: BLE001 - fall back to the library's own builder
                print(f"[bench] parallel build failed ({type(err).__name__}: {err}); omnilab.testing.synth builds it",
                      file=sys.stderr, flush=True)
        ckpt = ckpt or build_checkpoint(args)
    rows, errors = [], []
    for name in [r for r in args.rows.split(",") if r]:
        cmd = [sys.executable, __file__, "--row", name, "--checkpoint", str(ckpt), "--dtype", args.dtype,
               "--device", args.device, "--plan", args.plan, "--reserve-gb", str(args.reserve_gb), "--reserve-per-gb", str(args.reserve_per_gb),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--profile-tokens", str(args.profile_tokens), "--accelerate-tokens", str(args.accelerate_tokens),
               "--accelerate-seconds", str(args.accelerate_seconds), "--slots", str(args.slots)]
        start = time.perf_counter()
        try:
            limit = args.accelerate_timeout if name == "accelerate" else args.row_timeout
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as err:
            errors.append(f"{name}: over its time limit, {limit} s")
            tail = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
            print(tail[-3000:], file=sys.stderr, flush=True)
            continue
        print(f"[bench] row {name}: {time.perf_counter() - start:.0f} s, rc {done.returncode}", file=sys.stderr)
        print(done.stderr[-6000:], file=sys.stderr, flush=True)
        if done.returncode != 0:
            errors.append(f"{name}: " + (done.stderr.strip().splitlines() or ["(no output)"])[-1])
            continue
        rows += json.loads(done.stdout.strip().splitlines()[-1])
        if args.out:
            tmp = Path(args.out + ".tmp")
            tmp.write_text(json.dumps(rows, indent=2) + "\n")
            tmp.replace(args.out)
    text = table(rows, errors, ckpt, args)
    if args.markdown:
        tmp = Path(args.markdown + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.markdown)
    print(text)
    return 1 if errors and not rows else 0


def table(rows, errors, ckpt, args) -> str:
    import torch

    from omnilab import Checkpoint
    from omnilab.gpu.phases import PHASES

    config, _ = Checkpoint(ckpt).arch
    gb = 1e9
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    acc = next((r for r in rows if r["row"].startswith("transformers")), None)
    lines = [f"`{' '.join(['python', *sys.argv])}`", "",
             f"{device}, torch {torch.__version__}, {args.dtype}, batch 1; checkpoint {ckpt.name}: "
             f"{config.num_hidden_layers} layers x {config.num_experts} experts (top {config.num_experts_per_tok}); "
             f"prompt {args.prompt_tokens}, {args.new_tokens} teacher-forced decode steps, routing forced by the trace",
             "",
             "| row | GPU cap | slots / layer | decode tok/s | PCIe floor tok/s | x floor | x accelerate | hit rate "
             "| prefetch precision / recall | GB moved / token | pinned H2D GB/s | tier H2D GB/s | peak GPU memory "
             "| same tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    report = next((r for r in rows if "noise_report" in r), None)
    rows = [r for r in rows if "noise_report" not in r]
    if not rows:  # the noise report alone
        lines = lines[:1]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['cap_gb']:g} GB | {r['error']} |")
            continue
        d = r["decode_tokens_per_s"]
        gpu = f"{r['peak_gpu_bytes'] / gb:.2f} GB" if r.get("peak_gpu_bytes") else ""
        if "slots_per_layer" not in r:
            lines.append(f"| {r['row']} ({r.get('decode_steps', '?')} steps) | {r['cap_gb']:g} GB | | {d:.3f} | | | "
                         f"1.00x | | | | | | {gpu} | |")
            continue
        floor = r["pcie_floor_tokens_per_s"]
        vs_acc = f"{d / acc['decode_tokens_per_s']:.0f}x" if acc else ""
        pf = f"{r['prefetch_precision']:.0%} / {r['prefetch_recall']:.0%}" if r["prefetched"] else "off"
        tier = f"{r['tier_h2d_gb_s']:.1f}" if "tier_h2d_gb_s" in r else ""
        same = "yes" if r["same_tokens"] else f"no (vs {r['same_tokens_as']})"
        if r.get("same_tokens_as_copied") is not None:  # a hybrid row against its all-copied twin
            share = f"{r['host_share']:.2f}" if r.get("host_share_measured") in (None, r["host_share"]) else \
                f"{r['host_share_measured']:.2f} measured, {r['host_share']:.2f} after the steps"
            same += f"; {'=' if r['same_tokens_as_copied'] else '!='} copied row (host share {share}, " \
                    f"{r['host_computed'] / max(len(r['tokens']) - 1, 1):.1f} choices/token on the host)"
        lines.append(f"| {r['row']} | {r['cap_gb']:g} GB | {r['slots_per_layer']} | {d:.1f} | {floor:.1f} | "
                     f"{d / floor:.0%} | {vs_acc} | {r['hit_rate']:.1%} | {pf} | {r['bytes_per_token'] / gb:.2f} | "
                     f"{r['pinned_h2d_gb_s']:.1f} | {tier} | {gpu} | {same} |")
    prof = [r for r in rows if r.get("profile")]
    if prof:
        lines += ["", "Where a decode step's time goes (profiled pass, CUDA events, ms per token; the phases add up "
                  "to the whole step):", "",
                  "| row | " + " | ".join(PHASES) + " | whole step | host: bookkeeping + copy issue |",
                  "|---|" + "---:|" * (len(PHASES) + 2)]
        for r in prof:
            ph, hs = r["profile"]["phase_ms"], r["profile"]["host_ms"]
            lines.append(f"| {r['row']}, {r['cap_gb']:g} GB | " + " | ".join(f"{ph[p]:.1f}" for p in PHASES)
                         + f" | {ph.get('whole step', 0):.1f} | {hs['bookkeeping + copy issue']:.1f} |")
    stats = {r["row"].split(",")[1].strip(): r["trace_stats"] for r in rows if "trace_stats" in r}
    lines += [""] + [f"- {name}: measured reuse next {s['next']:.1%}, within 8 {s['within8']:.1%}"
                     for name, s in stats.items()]
    om = next((r for r in rows if "slots_per_layer" in r), None)
    if om:
        lines.append(f"- host tier: {om.get('host_tier')}; " + (
            f"{om['copies_per_expert']:.0f} copies per expert, {om['issue_us_per_copy']:.1f} us of host time to "
            f"issue one" if "copies_per_expert" in om else "") + f"; grouped GEMM on the strided slot views vs "
            f"contiguous copies: {om.get('slab_check')}")
    if acc:
        lines.append(f"- accelerate: loaded in {acc['load_s']:.0f} s, prefill {acc['prefill_s']:.1f} s, "
                     f"{acc['decode_steps']} decode steps, peak anon RSS {acc['peak_anon_bytes'] / 2**30:.1f} GiB")
    lines += [f"- failed: {e}" for e in errors]
    if report:
        lines += noise_lines(report)
    return "\n".join(lines)


def noise_lines(report: dict) -> list[str]:
    """The noise-floor report (row_noise) as a per-layer table."""
    hc = report["host_choices"]
    steps = report["decode_steps"]
    lines = ["", f"Hybrid offload against transformers' bf16 noise floor, per MoE layer (bench/offload.py row_noise, "
             f"omnilab.reference.compare.compare_decode): {steps} teacher-forced decode steps, "
             f"{report['slots_per_layer_noise']} slots a layer; relative error of the residual stream after each layer "
             f"at the decoded positions. With the router's own choices the host computed {hc['router/hybrid']} choices "
             f"({hc['router/hybrid'] / max(steps, 1):.1f} a step); under the uniform trace {hc['uniform/hybrid']} "
             f"({hc['uniform/hybrid'] / max(steps, 1):.1f} a step). Within: at most 4x transformers' own bf16-vs-fp32 "
             f"error there, as omnilab compare judges bf16 (streamed reference: {report['reference_s']:.0f} s).", "",
             "| layer | transformers bf16 vs fp32 (the floor) | copied vs transformers fp32 | hybrid vs transformers fp32 "
             "| hybrid vs copied, uniform trace | within |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in report["noise_report"]:
        within = all(r[c] for c in ("copied within", "hybrid within", "uniform within"))
        lines.append(f"| {r['layer']} | {r['noise']:.2e} | {r['copied']:.2e} | {r['hybrid']:.2e} | "
                     f"{r['hybrid vs copied, uniform trace']:.2e} | {'yes' if within else 'no'} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
