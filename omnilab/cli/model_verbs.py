"""The verbs that run the selective model: `compare`, `generate`, `trace`; `plan` (which engine each would take,
from headers alone) and `regress` (every numbered notebook).

Each is `cmd_<verb>(args) -> exit code` over omnilab.reference, omnilab.runtime, omnilab.trace and
omnilab.regress, imported inside the verb, so torch loads only after omnilab.cli has checked the paths; the
prompt flags (--prompt, --input-ids, --audio, --image) are turned into token ids or processor inputs here.
"""

from __future__ import annotations

import json
import os
import sys
import time

from omnilab.cli.flags import MAX_PROMPT_CHARS, print_json


def _prompt_ids(args, tokenizer, rows: int) -> list[int]:
    """The prompt's token ids, each checked against the embedding's rows (a tokenizer may be larger than it)."""
    if args.input_ids is None and args.prompt is None:
        raise ValueError("give the prompt: --prompt TEXT, --input-ids 1,2,3, --audio FILE.wav or --image FILE.png")
    if args.input_ids is not None:
        if not args.input_ids:
            raise ValueError("--input-ids: no token ids given")
        ids, source = args.input_ids, "--input-ids"
    else:
        if tokenizer is None:
            raise ValueError(f"{args.path}: no tokenizer beside the checkpoint; give the prompt as --input-ids 1,2,3")
        ids, source = tokenizer(args.prompt[:MAX_PROMPT_CHARS + 1])["input_ids"], "--prompt"
        if not ids:
            raise ValueError("--prompt: the tokenizer turned the prompt into no tokens")
    bad = [i for i in ids if not 0 <= i < rows]
    if bad:
        raise ValueError(f"{source}: token id {bad[0]} is outside the embedding's {rows} rows (ids 0..{rows - 1})")
    return ids


def _multimodal_inputs(args, model):
    """(Towers, processor tensors) when --audio / --image are given, else None: the prompt text around the media
    goes through transformers' Qwen3OmniMoeProcessor (omnilab.model.multimodal)."""
    if not (args.audio or args.image):
        return None
    if args.input_ids is not None:
        raise ValueError("--input-ids cannot be combined with --audio / --image (the processor places the "
                         "placeholder tokens); give the text as --prompt")
    from omnilab.model import multimodal

    multimodal.thinker_config(model.checkpoint)  # refuses a checkpoint without towers, naming it
    audio = [multimodal.read_wav(args.audio, multimodal.audio_seconds_limit(model.config))] if args.audio else None
    images = [multimodal.read_image(args.image)] if args.image else None
    towers, processor = multimodal.open_multimodal(model)
    text = multimodal.prompt_text(args.prompt, audio=audio is not None, image=images is not None)
    inputs = multimodal.process(processor, towers.config, text, audio=audio, images=images)
    from omnilab.model.generate import check_positions

    check_positions(model.config, inputs["input_ids"].shape[1], getattr(args, "max_new_tokens", 0))
    return towers, inputs


def _compare_multimodal(args, checkpoint):
    """compare with --audio / --image -> (input ids, StreamedComparison): the selective model with the
    checkpoint's towers, its activations recorded, then dropped; transformers' thinker on --reference (default
    PATH) streamed part by part with its towers (omnilab.reference.streamed), chained and local views."""
    import gc

    import torch

    from omnilab.model import multimodal
    from omnilab.checkpoint import Checkpoint
    from omnilab.reference.compare import check_same_text_model, compare_streamed, one_layer_budget
    from omnilab.model.hooks import capture
    from omnilab.memory import AnonPeak
    from omnilab.model.decoder import SelectiveMoE
    from omnilab.reference.streamed import StreamedReference

    with AnonPeak() as peak:
        ref_checkpoint = checkpoint if not args.reference or str(args.reference) == str(args.path) else Checkpoint(args.reference)
        config, _ = checkpoint.arch
        check_same_text_model(config, ref_checkpoint.arch[0], checkpoint.path, ref_checkpoint.path)
        multimodal.thinker_config(ref_checkpoint)  # the reference needs towers too, naming the checkpoint
        budget = one_layer_budget(config, args.dtype) if args.expert_budget is None else args.expert_budget
        selective = SelectiveMoE.from_checkpoint(checkpoint, dtype=args.dtype, device=args.device, expert_budget=budget)
        towers, inputs = _multimodal_inputs(args, selective)
        prompt = multimodal.prepare(selective, towers, inputs)
        with capture(selective) as acts, torch.no_grad():
            multimodal.forward(selective, prompt)
        acts = dict(acts)
        del selective, towers, prompt  # not needed while the reference streams
        gc.collect()
        reference = StreamedReference(ref_checkpoint, device=args.device)
        result = compare_streamed(acts, reference, inputs["input_ids"], args.dtype, progress=sys.stderr.isatty(),
                                  media=dict(inputs))
    result.expert_budget_bytes = budget
    result.peak_rss_bytes = peak.peak
    return inputs["input_ids"][0].tolist(), result


def cmd_compare(args) -> int:
    """The selective model on PATH against transformers on --reference (default PATH), streamed one layer at a
    time; chained and local views, in bf16 beside transformers' own bf16 noise (omnilab.reference.compare; DESIGN.md's JSON)."""
    from omnilab.checkpoint import Checkpoint
    from omnilab.model.generate import check_positions
    from omnilab.reference.compare import compare_checkpoints
    from omnilab.runtime.choose import capture_choice
    from omnilab.runtime.hardware import resolve_device, resolve_dtype
    from omnilab.tokenizer import load_tokenizer

    device = resolve_device(args.device)
    checkpoint = Checkpoint(args.path)  # headers read once, for both models when there is no --reference
    args.device, args.dtype = str(device), str(resolve_dtype(args.dtype, checkpoint, device)).removeprefix("torch.")
    choice = capture_choice()
    start = time.perf_counter()
    media = {}
    if args.audio or args.image:
        ids, result = _compare_multimodal(args, checkpoint)
        media = {"audio": args.audio, "image": args.image}
    else:
        config, _ = checkpoint.arch
        ids = _prompt_ids(args, load_tokenizer(checkpoint.root) if args.prompt is not None else None, config.vocab_size)
        check_positions(config, len(ids), 0)  # positions past max_position_embeddings: garbage on both sides
        result = compare_checkpoints(checkpoint, ids, reference=args.reference, dtype=args.dtype, device=args.device,
                                     expert_budget=args.expert_budget, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    peak_gpu = torch_peak_gpu_bytes(device)
    if args.json:
        print_json({"path": args.path, "reference": args.reference or args.path, "dtype": args.dtype,
                    "seconds": seconds, "peak_gpu_bytes": peak_gpu,
                    "device": args.device, "input_ids": ids, **media, **result.to_json(),
                    "engine": choice.engine, "refusal": choice.refusal})
        return 0
    chained, local = result.chained.table, result.local.table.set_index("name")
    table = chained[["name", "rel_err", "threshold", "cosine", "topk_agreement"]].copy()
    table.insert(2, "local_rel_err", local.rel_err.reindex(table.name).values)
    if result.noise is not None:
        table.insert(3, "noise_rel_err", result.noise.table.set_index("name").rel_err.reindex(table.name).values)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3e}"))
    rule = (f"rel_err > {result.noise_factor:g} x transformers' own bf16-vs-fp32 error" if result.noise is not None
            else f"rel_err > {result.chained.rtol:g}")
    print(f"first divergence ({rule}): chained {result.first_divergence or 'none'}, "
          f"local {result.local_first_divergence or 'none'}")
    print(f"top-1 agreement {result.chained.top1_agreement:.4f}, KL(ref || selective) {result.chained.kl:.3e}, "
          f"max rel_err {chained.rel_err.max():.3e} chained / {local.rel_err.max():.3e} local over {len(ids)} tokens "
          f"({args.dtype}, {args.device}) in {seconds:.1f} s; peak anonymous RSS {result.peak_rss_bytes / 2**30:.2f} GiB"
          + (f", peak GPU memory {peak_gpu / 2**30:.2f} GiB" if peak_gpu is not None else "") + "; selective side: "
          f"{choice.describe()}")
    return 0


def torch_peak_gpu_bytes(device) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def cmd_generate(args) -> int:
    """Generate on the engine the runtime chooses (omnilab.runtime); report it, its speed and its memory."""
    from omnilab.model.generate import check_positions, check_sampling
    from omnilab.runtime.generate import sampling_options
    from omnilab.runtime.model import load

    check_sampling(args.max_new_tokens, args.greedy is not False,
                   1.0 if args.temperature is None else args.temperature, args.top_k or 0,
                   1.0 if args.top_p is None else args.top_p, args.seed, cli=True)

    model = load(args.path, dtype=args.dtype, device=args.device, expert_budget=args.expert_budget)
    media = _multimodal_inputs(args, model)
    ids = media[1]["input_ids"][0].tolist() if media else _prompt_ids(args, model.tokenizer, model.config.vocab_size)
    check_positions(model.config, len(ids), args.max_new_tokens)
    stop = model.stop_tokens if args.stop_ids is None else args.stop_ids
    sampling, how = sampling_options(model.generation_config, greedy=args.greedy, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p)
    sampling.update(stop_tokens=stop, seed=args.seed)
    if media:
        from omnilab.model import multimodal

        out = multimodal.generate(model, multimodal.prepare(model, *media), args.max_new_tokens, **sampling)
    else:
        out = model.generate(ids, args.max_new_tokens, progress=not args.json and sys.stderr.isatty(), **sampling)
    new = out.new_token_ids[0]
    text = model.tokenizer.decode(new, skip_special_tokens=False) if model.tokenizer is not None else None
    stats = model.cache.stats
    cache = {**stats.to_dict(), "expert_bytes": model.cache.store.expert_bytes,
             "all_experts_bytes": model.cache.store.total_bytes}
    if args.json:
        print_json({"path": args.path, "input_ids": ids, "audio": args.audio, "image": args.image,
                    "new_token_ids": new, "text": text, "sampling": how, "placement": model.placement,
                    "engine": out.engine, "refusal": out.refusal, "peak_gpu_bytes": out.peak_gpu_bytes,
                    "tokens_per_s": out.tokens_per_s, "decode_tokens_per_s": out.decode_tokens_per_s,
                    "stopped": out.stopped[0], "cache": cache})
        return 0
    print(text if text is not None else ",".join(map(str, new)))
    print(f"[{model.placement}; {how}]", file=sys.stderr)
    print(f"[engine {out.engine}" + (f" ({out.refusal})" if out.refusal else "") + "]", file=sys.stderr)
    line = f"[{len(new)} tokens, {out.tokens_per_s:.2f} tokens/s"
    if out.engine.endswith("resident"):
        line += f"; every expert resident ({model.cache.store.total_bytes / 1e9:.2f} GB)"
    elif out.engine == "eager":
        line += (f"; experts: hit rate {stats.hit_rate:.1%} ({stats.hits:,} hits, {stats.misses:,} misses), "
                 f"{stats.evictions:,} evictions, peak {stats.peak_resident_bytes:,} of {stats.budget_bytes:,} "
                 f"budget bytes")
    if out.peak_gpu_bytes is not None:
        line += f"; peak GPU memory {out.peak_gpu_bytes / 2**30:.2f} GiB"
    print(line + "]", file=sys.stderr)
    return 0


def cmd_trace(args) -> int:
    """Routing of every document of a corpus into Parquet shards with a manifest (omnilab/trace/); resumable;
    under torchrun the documents' batches are split across ranks. --json: the manifest's totals and run."""
    from omnilab.trace.run import trace_corpus
    from omnilab.trace.shards import MANIFEST_NAME

    result = trace_corpus(args.path, args.corpus, args.out, max_tokens=args.max_tokens,
                          batch_tokens=args.batch_tokens, dtype=args.dtype, device=args.device,
                          expert_budget=args.expert_budget, text_field=args.text_field,
                          domain_field=args.domain_field, tokenizer=args.tokenizer, backend=args.backend,
                          progress=not args.json and sys.stderr.isatty(), prefill=args.prefill)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        manifest = json.loads((result.out / MANIFEST_NAME).read_text())
        print_json({k: manifest[k] for k in ("documents", "traced_documents", "tokens", "rows", "attrs", "layers",
                                             "domains", "run")} | {"out": str(result.out),
                                                                   "shards": len(manifest["shards"])})
    else:
        print(result.summary())
    return 0


def cmd_plan(args) -> int:
    """Which engine each verb would take here (and on a described GPU machine), the bytes of each tier, and the
    decode speed to expect (omnilab.runtime.plan)."""
    from omnilab.checkpoint import Checkpoint
    from omnilab.runtime.plan import machine_described, machine_here, plan, plan_text

    checkpoint = Checkpoint(args.path)
    here = machine_here(args.device)
    plans = {"here": plan(checkpoint, here, args.dtype, args.context)}
    if args.gpu or args.gpu_memory or args.host_memory or not here.has_gpu:
        plans["described"] = plan(checkpoint, machine_described(args.gpu, args.gpu_memory, args.host_memory, here),
                                  args.dtype, args.context)
    if args.json:
        print_json(plans)
        return 0
    print("\n\n".join(f"[{where}]\n{plan_text(p)}" for where, p in plans.items()))
    return 0


def cmd_regress(args) -> int:
    from omnilab.regress import headline, run_notebooks

    if args.headline:  # the README's headline numbers, from a finished run
        from pathlib import Path

        path = Path(args.out) / "metrics.json"
        if not path.exists():
            raise ValueError(f"{path}: no metrics.json; run `omnilab regress --out {args.out}` first")
        try:
            print(headline(json.loads(path.read_text())))
        except KeyError as e:
            raise ValueError(f"{path}: no metric {e.args[0]!r}: was it written by a full run of every notebook?") from None
        return 0

    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    return run_notebooks(out=args.out, only=args.only, update_baselines=args.update_baselines, publish=args.publish,
                         jobs=args.jobs, checkpoint=args.checkpoint, device=args.device)
