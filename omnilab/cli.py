"""The `omnilab` command (also `python -m omnilab`).

Verbs and their JSON follow the command-line contract in DESIGN.md, which other tools rely on. Each verb is
one function `cmd_<verb>(args) -> exit code` that calls into the package; errors in the input become one
line on stderr and exit code 2, never a traceback (set OMNILAB_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from omnilab.checkpoint import CheckpointError


def parse_size(text: str) -> int:
    """'512MB', '2GiB', '1.5e9', '1000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}: use bytes or units like 512MB, 2GiB") from None
    if unit not in units or value < 0:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}: use bytes or units like 512MB, 2GiB")
    return int(value * units[unit])


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-ids takes comma-separated integers, got {text!r}") from None


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=_jsonable)
    sys.stdout.write("\n")


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "to_dict"):
        return x.to_dict()
    return str(x)


# ---------------------------------------------------------------------------------------------------
# verbs
# ---------------------------------------------------------------------------------------------------


def cmd_inspect(args) -> int:
    raise NotImplementedError("inspect")


def cmd_verify(args) -> int:
    raise NotImplementedError("verify")


def cmd_synth(args) -> int:
    raise NotImplementedError("synth")


def cmd_compare(args) -> int:
    raise NotImplementedError("compare")


def cmd_generate(args) -> int:
    raise NotImplementedError("generate")


def cmd_extract(args) -> int:
    raise NotImplementedError("extract")


def cmd_regress(args) -> int:
    from omnilab.regress import run_notebooks

    return run_notebooks(out=args.out, only=args.only, update_baselines=args.update_baselines)


# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnilab", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("inspect", help="inventory of a checkpoint: shards, components, experts, tokenizer")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = verbs.add_parser("verify", help="check every tensor against the config; exit 0 sound, 1 problems, 2 unreadable")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = verbs.add_parser("synth", help="write a synthetic checkpoint (tiny random, or full-scale sparse from a config)")
    p.add_argument("kind", choices=["tiny-omni", "tiny-moe", "sparse"])
    p.add_argument("out")
    p.add_argument("--config", help="config.json for 'sparse' (e.g. the real Qwen3-Omni-30B-A3B's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    def model_args(p):
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--prompt", help="text (needs tokenizer files beside the checkpoint)")
        src.add_argument("--input-ids", type=parse_ids, help="comma-separated token ids, e.g. 1,2,3")
        p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
        p.add_argument("--device", default="cpu")
        p.add_argument("--json", action="store_true")

    p = verbs.add_parser("compare", help="run the selective model and transformers side by side at every hook point")
    p.add_argument("path")
    model_args(p)
    p.set_defaults(func=cmd_compare)

    p = verbs.add_parser("generate", help="generate with the selective model under an expert memory budget")
    p.add_argument("path")
    model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expert-budget", type=parse_size, default=None, metavar="SIZE",
                   help="bytes of experts held at once (512MB, 2GiB); default: all experts fit")
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("extract", help="take a checkpoint apart into per-expert and backbone files, with a manifest")
    p.add_argument("path")
    p.add_argument("out")
    p.set_defaults(func=cmd_extract)

    p = verbs.add_parser("regress", help="run every numbered notebook on the embedded model and check its metrics")
    p.add_argument("--out", default="runs/latest", help="folder for executed notebooks, figures and metrics")
    p.add_argument("--only", nargs="*", help="notebook numbers or names to run (default: all)")
    p.add_argument("--update-baselines", action="store_true", help="write this run's metrics as the new baselines")
    p.set_defaults(func=cmd_regress)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CheckpointError, ValueError, KeyError, OSError) as e:
        if os.environ.get("OMNILAB_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"omnilab {args.verb}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"omnilab {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
