"""The verbs on a checkpoint's files, no model run: `inspect`, `verify`, `synth`, `extract`.

Each is `cmd_<verb>(args) -> exit code` over omnilab.inventory, omnilab.extraction and omnilab.testing.synth,
imported inside the verb (omnilab.cli checks the paths first); the JSON follows docs/DESIGN.md's contract.
"""

from __future__ import annotations

import os
import sys

from omnilab.cli.flags import print_json


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
                     workers=args.workers, progress=not args.json, pause_after_file=args.pause_after_file,
                     link_from=args.link_from)
    if args.json:
        print_json({**asdict(result), "out": str(result.out), "mb_per_s": result.mb_per_s,
                    "link_from": str(result.link_from) if result.link_from else None})
    else:
        print(result.summary())
    return 0


