"""The `omnilab` command (also `python -m omnilab`).

Verbs and their JSON follow the command-line contract in docs/DESIGN.md, which other tools rely on. Each verb is
one function `cmd_<verb>(args) -> exit code` that calls into the package; errors in the input become one
line on stderr naming the file, tensor or flag, and exit code 2, never a traceback (`--debug` or
OMNILAB_DEBUG=1 shows one); exit 1 means only "problems found" (verify). Paths are checked before torch or
transformers are imported, so a typo is refused at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from omnilab.checkpoint import CheckpointError
from omnilab.jsonio import jsonable
from omnilab.units import parse_size


def parse_ids(text: str, flag: str = "--input-ids") -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} takes comma-separated integers, got {text!r}") from None


MAX_PROMPT_CHARS = 4 * 2**20  # a longer --prompt is cut here before tokenizing (the position check then refuses it)


def parse_seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed takes an integer, got {text!r}") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"--seed must be in 0..2**63-1, got {text}")
    return seed


def parse_text(text: str) -> str:
    """--prompt: text that is valid UTF-8 (argv bytes that are not arrive as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"--prompt is not valid UTF-8 (byte {e.start} of the prompt)") from None
    return text


def parse_stop_ids(text: str) -> list[int]:
    """--stop-ids: comma-separated token ids, or 'none' to stop only at --max-new-tokens."""
    return [] if text.strip().lower() == "none" else parse_ids(text, "--stop-ids")


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=jsonable)
    sys.stdout.write("\n")


# ---------------------------------------------------------------------------------------------------
# verbs
# ---------------------------------------------------------------------------------------------------


def cmd_inspect(args) -> int:
    """Inventory: shards, tensors, bytes per component, expert completeness, tokenizer, problems. Exit 0 when the
    checkpoint could be read (problems are listed, `verify` is the gate), 2 when it could not.

    --json: {path, model_type, shards, tensors, total_bytes, file_bytes, dtypes: {dtype: count},
    components: {label: {tensors, bytes, shards}}, shard_map: {shard: {label: bytes}},
    experts: {component, layers, moe_layers, experts_per_layer, complete, partial, missing, per_layer: [...]} | null,
    tokenizer: {size, max_id, special_tokens, embedding_rows, verdict, padding_rows, ...} | null,
    problems: [{kind, message, tensor, shard}], notes: [str]}. Component labels: see omnilab/inventory.py."""
    from omnilab.inventory import checkpoint_report
    from omnilab.units import format_bytes

    report = checkpoint_report(args.path)
    inv, tok, problems = report.inventory, report.tokenizer, report.problems
    summary = {**inv.summary(), "tokenizer": tok.to_dict() if tok else None,
               "problems": [p.to_dict() for p in problems]}
    try:
        _print_inspect(args, summary, tok, problems, format_bytes)
        sys.stdout.flush()
    except BrokenPipeError:  # `omnilab inspect PATH | head`: the reader left; stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail
    return 0


def _print_inspect(args, summary, tok, problems, format_bytes) -> None:
    if args.json:
        print_json(summary)
        return
    dtypes = ", ".join(f"{d} x{n:,}" for d, n in summary["dtypes"].items())
    print(f"{summary['path']}: {summary['model_type'] or 'unknown architecture'}, {summary['shards']} shards, "
          f"{summary['tensors']:,} tensors, {summary['total_bytes']:,} bytes ({format_bytes(summary['total_bytes'])}), "
          f"{dtypes or 'no tensors'}")
    width = max([len(c) for c in summary["components"]] + [9])
    print(f"  {'component':<{width}} {'tensors':>8} {'bytes':>12} {'shards':>6}")
    for label, c in summary["components"].items():
        print(f"  {label:<{width}} {c['tensors']:>8,} {format_bytes(c['bytes']):>12} {c['shards']:>6}")
    if (e := summary["experts"]) is not None:
        print(f"  {e['component']}: {e['moe_layers']} MoE layers x {e['experts_per_layer']} experts: "
              f"{e['complete']:,} complete, {e['partial']:,} partial, {e['missing']:,} missing")
    if tok is not None:
        print(f"  {tok.line()}")
        if tok.special_tokens:
            print("  special tokens: " + ", ".join(f"{t}={i}" for t, i in tok.special_tokens.items()))
    for note in summary["notes"]:
        print(f"  note: {note}")
    shown = 20
    print(f"  problems: {len(problems) or 'none'}")
    for p in problems[:shown]:
        print(f"    {p}")
    if len(problems) > shown:
        print(f"    ... {len(problems) - shown} more: `omnilab verify {args.path}` lists them all")


def cmd_verify(args) -> int:
    """Every problem, one line each (kind: message naming the tensor and/or shard file) on stdout, a summary on
    stderr. Exit 0 sound, 1 problems found, 2 unreadable (main turns errors into one line and 2).

    --json: {path, sound, shards, tensors, checked_against_config, counts: {kind: n},
    problems: [{kind, message, tensor, shard}], notes: [str]}."""
    from omnilab.inventory import checkpoint_report

    report = checkpoint_report(args.path)
    inv, problems = report.inventory, report.problems
    notes = list(inv.notes)
    availability_map = None
    from omnilab.extraction.manifest import is_extraction

    if is_extraction(args.path):  # an extraction folder (omnilab.extraction.write): files against manifest.json too
        from omnilab.extraction.availability import availability, availability_text, missing_summary, not_extracted
        from omnilab.extraction.manifest import read_manifest
        from omnilab.extraction.verify import verify_extraction

        manifest = read_manifest(args.path)  # read once; the folder is open once, as inv.checkpoint
        left_out = not_extracted(args.path, manifest)  # left out by the extraction's selection: reported, not a problem
        problems = [p for p in problems if p.tensor not in left_out]
        damaged = {p.shard for p in problems if p.kind in ("truncated", "bad_header")}
        problems += [p for p in verify_extraction(args.path, source=args.source, manifest=manifest)
                     if p.shard not in damaged]
        if left_out:
            notes.append(missing_summary(inv, manifest))
            availability_map = availability(inv)
    elif args.source:
        notes.append(f"--source is used for extraction folders only; {args.path} has no manifest.json")
    counts: dict[str, int] = {}
    for p in problems:
        counts[p.kind] = counts.get(p.kind, 0) + 1
    ckpt = inv.checkpoint
    if args.json:
        print_json({"path": str(ckpt.path), "sound": not problems, "shards": len(ckpt.shards),
                    "tensors": len(ckpt.tensors), "checked_against_config": inv.config is not None,
                    "counts": counts, "problems": [p.to_dict() for p in problems], "notes": notes,
                    "availability": None if availability_map is None else
                    {"layers": [int(i) for i in availability_map.index], "projections_present": availability_map.values.tolist()}})
    else:
        if availability_map is not None:
            print(availability_text(availability_map), file=sys.stderr)
        for p in problems:
            print(p)
        for note in notes:
            print(f"omnilab verify: note: {note}", file=sys.stderr)
        if problems:
            kinds = ", ".join(f"{k} {n}" for k, n in counts.items())
            print(f"omnilab verify: {len(problems)} problems ({kinds}) in {ckpt.path}", file=sys.stderr)
        else:
            against = "against config.json" if inv.config is not None else "(files only: no usable config.json)"
            print(f"omnilab verify: sound: {len(ckpt.tensors):,} tensors in {len(ckpt.shards)} shards checked "
                  f"{against}", file=sys.stderr)
    return 1 if problems else 0


def cmd_synth(args) -> int:
    """Write a tiny random checkpoint or a full-scale sparse layout into OUT (built beside it, then renamed)."""
    import shutil
    from pathlib import Path

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not an empty folder")
    if args.kind == "sparse" and not args.config:
        raise ValueError("synth sparse needs --config CONFIG.json (e.g. the real Qwen3-Omni-30B-A3B's config.json)")
    from omnilab.checkpoint import Checkpoint
    from omnilab.testing import synth

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        if args.kind == "tiny-omni":
            synth.tiny_qwen3_omni(tmp, seed=args.seed)
        elif args.kind == "tiny-moe":
            synth.tiny_qwen3_moe(tmp, seed=args.seed)
        else:
            synth.sparse_from_config(args.config, tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(Checkpoint(out))
    return 0


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
    stop = args.stop_ids
    if stop is None:
        eos = model.generation_config.get("eos_token_id")
        stop = [eos] if isinstance(eos, int) else list(eos or [])
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


def _budget(text: str):
    """--expert-budget: auto, all, or a size (8GB, 512MiB)."""
    return text if text in ("auto", "all") else parse_size(text)


def cmd_extract(args) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from omnilab.extraction.plan import parse_range
    from omnilab.extraction.write import extract

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; OUT must be a new or empty folder, or an extraction")
    # a folder that is neither empty nor an extraction (manifest.json, or the journal of an interrupted run) is
    # refused by omnilab.outdir.OutDir inside extract, under the folder's lock
    result = extract(args.path, args.out, components=args.components,
                     layers=parse_range(args.layers) if args.layers else None,
                     experts=parse_range(args.experts) if args.experts else None,
                     workers=args.workers, progress=not args.json, pause_after_file=args.pause_after_file)
    if args.json:
        print_json({**asdict(result), "out": str(result.out), "mb_per_s": result.mb_per_s})
    else:
        print(result.summary())
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


# ---------------------------------------------------------------------------------------------------


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default (none where the help already says it or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (as OMNILAB_DEBUG=1 does)")
    common.add_argument("--follow-symlinks", action="store_true", default=argparse.SUPPRESS,
                        help="read shards that are symlinks out of the checkpoint folder (a Hugging Face cache "
                             "snapshot); by default only files inside it are read")
    return common


PATH_HELP = "checkpoint folder (safetensors shards with config.json), or one .safetensors file"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnilab", description=__doc__.splitlines()[0], parents=[_common()])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_parser = verbs.add_parser

    def add_parser(name, **kw):
        return _add_parser(name, formatter_class=_Help, parents=[_common()], **kw)

    verbs.add_parser = add_parser

    p = verbs.add_parser("inspect", help="inventory of a checkpoint: shards, components, experts, tokenizer")
    p.add_argument("path", help=PATH_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = verbs.add_parser("verify", help="check every tensor against the config; exit 0 sound, 1 problems, 2 unreadable")
    p.add_argument("path", help=PATH_HELP)
    p.add_argument("--json", action="store_true")
    p.add_argument("--source", help="for an extraction folder: the checkpoint it was extracted from, to compare with")
    p.set_defaults(func=cmd_verify)

    p = verbs.add_parser("synth", help="write a synthetic checkpoint (tiny random, or full-scale sparse from a config)")
    p.add_argument("kind", choices=["tiny-omni", "tiny-moe", "sparse"])
    p.add_argument("out")
    p.add_argument("--config", help="config.json for 'sparse' (e.g. the real Qwen3-Omni-30B-A3B's)")
    p.add_argument("--seed", type=parse_seed, default=0, help="random seed of the weights")
    p.set_defaults(func=cmd_synth)

    def model_args(p):
        src = p.add_mutually_exclusive_group()  # one of them, or --audio / --image (checked in _prompt_ids)
        src.add_argument("--prompt", type=parse_text, help="text (needs tokenizer files beside the checkpoint); with --audio / "
                                          "--image, the text after them")
        src.add_argument("--input-ids", type=parse_ids, help="comma-separated token ids, e.g. 1,2,3")
        p.add_argument("--audio", metavar="FILE.wav", help="speech or sound through the audio tower (16 kHz PCM .wav)")
        p.add_argument("--image", metavar="FILE.png", help="an image through the vision tower (png, jpg, ...)")
        p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                       help="auto: the checkpoint's own dtype on a GPU, float32 on a CPU")
        p.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:1")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = verbs.add_parser("compare", help="the selective model against transformers (streamed) at every hook point")
    p.add_argument("path", help="checkpoint the selective model runs on (an extraction, an edited copy)")
    model_args(p)
    p.add_argument("--reference", metavar="REF_PATH", default=None,
                   help="checkpoint transformers runs on (the original); default: PATH")
    p.add_argument("--expert-budget", type=parse_size, default=None, metavar="SIZE",
                   help="bytes of experts the selective side holds at once (default: one MoE layer's worth)")
    p.set_defaults(func=cmd_compare)

    p = verbs.add_parser("generate", help="generate with the selective model under an expert memory budget")
    p.add_argument("path", help=PATH_HELP)
    model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--greedy", action="store_const", const=True, dest="greedy", default=None,
                     help="greedy decoding (default: as generation_config.json's do_sample; absent: greedy)")
    how.add_argument("--sample", action="store_const", const=False, dest="greedy", help="sample")
    p.add_argument("--temperature", type=float, default=None, help="default: generation_config.json's, else 1.0")
    p.add_argument("--top-k", type=int, default=None, help="default: generation_config.json's, else 50 (0: off)")
    p.add_argument("--top-p", type=float, default=None, help="default: generation_config.json's, else 1.0")
    p.add_argument("--seed", type=parse_seed, default=0, help="sampling seed")
    p.add_argument("--expert-budget", type=_budget, default="auto", metavar="SIZE",
                   help="bytes of experts held at once (512MB, 2GiB, all); default auto: every expert when they "
                        "fit the free memory, else what fits")
    p.add_argument("--stop-ids", type=parse_stop_ids, default=None, metavar="IDS",
                   help="token ids that end generation, or 'none' (default: eos_token_id of generation_config.json)")
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("plan", help="which engine each verb would take here and on a described GPU machine, "
                                      "the bytes of each tier, the decode speed to expect")
    p.add_argument("path", help="checkpoint folder (headers and config.json are read, no weights)")
    p.add_argument("--device", default="auto", help="this machine's device to plan for and measure (auto, cpu, cuda)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: the checkpoint's own dtype on a GPU, float32 on a CPU")
    p.add_argument("--gpu", choices=["h100", "h200"], default=None,
                   help="describe a GPU machine by a preset (memory, HBM and host-link bandwidths); default h100 "
                        "when this machine has no GPU")
    p.add_argument("--gpu-memory", type=parse_size, default=None, metavar="SIZE", help="the described GPU's memory")
    p.add_argument("--host-memory", type=parse_size, default=None, metavar="SIZE",
                   help="the described machine's host memory")
    p.add_argument("--context", type=int, default=512, help="positions of KV cache to count (default 512)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("extract", help="take a checkpoint apart into per-expert and backbone files, with a manifest")
    p.add_argument("path", help=PATH_HELP)
    p.add_argument("out", help="output folder; a rerun resumes, a run with another selection adds to it")
    p.add_argument("--components", default=None,
                   help="comma-separated: embed, attention, norms, router, experts, dense_mlp, final_norm, lm_head, "
                        "audio, vision, talker, code2wav, unrecognised, or the groups all, text, backbone, towers "
                        "(default: all, so the round trip is complete)")
    p.add_argument("--layers", default=None, help="text-decoder layers, e.g. 0-3,10 (default: all)")
    p.add_argument("--experts", default=None, help="experts of each layer, e.g. 0-7 (default: all)")
    p.add_argument("--workers", type=int, default=2, help="threads reading the source (shards in ~256 MB segments, each front to back; default: 2)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--pause-after-file", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: kill mid-way
    p.set_defaults(func=cmd_extract)

    p = verbs.add_parser("trace", help="record every layer's routing over a corpus into Parquet (resumable; torchrun)")
    p.add_argument("path", help=PATH_HELP)
    p.add_argument("--corpus", nargs="+", required=True, metavar="FILE",
                   help="JSONL (one document a line) / text (.txt, .md: each file is one document) / Parquet files "
                        "or folders, or a local datasets folder (save_to_disk)")
    p.add_argument("--out", required=True, help="trace folder; a rerun with the same arguments resumes it")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per document (its first ones; default 512)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch (default 4096)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: the checkpoint's own dtype on a GPU, float32 on a CPU")
    p.add_argument("--device", default="auto",
                   help="auto, cpu or cuda (under torchrun: each rank its LOCAL_RANK's GPU)")
    p.add_argument("--expert-budget", type=_budget, default="auto", metavar="SIZE",
                   help="bytes of experts held at once (512MB, 2GiB, all); default auto: every expert when they fit "
                        "the free memory, else what fits (the grouped prefill needs every expert)")
    p.add_argument("--text-field", default=None, help="JSON/Parquet field with the text (default: text, prompt, content)")
    p.add_argument("--domain-field", default="domain", help="field with the domain label (default: domain; "
                                                            "else the file's name)")
    p.add_argument("--tokenizer", default=None, metavar="FOLDER", help="tokenizer folder (default: the checkpoint's)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                   help="torch.distributed backend under torchrun (default: nccl on cuda, gloo on cpu)")
    p.add_argument("--prefill", choices=["auto", "eager", "grouped_mm"], default="auto",
                   help="grouped_mm: every expert resident, one grouped GEMM per layer (bf16 on CUDA, any dtype on "
                        "CPU); eager: the selective model under the expert budget; auto (default): grouped_mm on "
                        "CUDA unless refused (hooks, faults, an expert budget, no room)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_trace)

    p = verbs.add_parser("regress", help="run every numbered notebook on the embedded model and check its metrics")
    p.add_argument("--out", default="runs/latest", help="folder for executed notebooks, figures and metrics")
    p.add_argument("--only", nargs="*", help="notebook numbers or names to run (default: all)")
    p.add_argument("--jobs", type=int, default=None,
                   help="notebooks run side by side, one intra-op thread each (default: one per CPU core, at most 4)")
    p.add_argument("--update-baselines", action="store_true", help="write this run's metrics as the new baselines")
    p.add_argument("--publish", action="store_true",
                   help="after a clean run, copy the executed notebooks (figures inline) to docs/notebooks/")
    p.add_argument("--headline", action="store_true",
                   help="print the README's headline numbers from OUT/metrics.json of a finished run, and exit")
    p.add_argument("--checkpoint", default=None,
                   help="run every notebook on this checkpoint (papermill -p checkpoint), one at a time, and write "
                        "OUT/resources.md (seconds, peak RSS, peak GPU memory, figures); baselines are not checked")
    p.add_argument("--device", default=None,
                   help="with --checkpoint: the notebooks' device parameter (auto, cpu, cuda); default auto")
    p.set_defaults(func=cmd_regress)
    return parser


def _check_paths(args) -> None:
    """Input paths exist before anything heavy is imported (a typo is refused in a fraction of a second)."""
    for flag in ("path", "reference", "source", "tokenizer", "audio", "image", "config"):
        value = getattr(args, flag, None)
        if isinstance(value, str) and not os.path.exists(value):
            name = "PATH" if flag == "path" else f"--{flag}"
            raise ValueError(f"{value}: no such file or folder ({name})")
    for value in getattr(args, "corpus", None) or ():
        if not os.path.exists(value):
            raise ValueError(f"{value}: no such file or folder (--corpus)")


def one_line(e: BaseException) -> str:
    """An error as one line: the message of an expected error, class and first line of anything else."""
    if isinstance(e, (CheckpointError, ValueError, OSError)) and str(e).strip():
        text = str(e)
    elif isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    else:
        text = f"{e.__class__.__name__}: {str(e).strip() or 'no message'}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if lines else e.__class__.__name__) + (" ..." if len(lines) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or bool(os.environ.get("OMNILAB_DEBUG"))
    if getattr(args, "follow_symlinks", False):
        from omnilab.checkpoint import FOLLOW_SYMLINKS_ENV

        os.environ[FOLLOW_SYMLINKS_ENV] = "1"
    try:
        _check_paths(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"omnilab {args.verb}: interrupted", file=sys.stderr)
        return 130
    except (Exception, RecursionError) as e:  # bad input, however deep it surfaced: one line, exit 2
        if debug:
            raise
        known = isinstance(e, (CheckpointError, ValueError, KeyError, OSError))
        hint = "" if known else " (rerun with --debug for the traceback)"
        print(f"omnilab {args.verb}: error: {one_line(e)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
