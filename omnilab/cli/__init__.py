"""The `omnilab` command (also `python -m omnilab`).

Verbs and their JSON follow the command-line contract in docs/DESIGN.md, which other tools rely on. Each verb is
one function `cmd_<verb>(args) -> exit code` that calls into the package; errors in the input become one
line on stderr naming the file, tensor or flag, and exit code 2, never a traceback (`--debug` or
OMNILAB_DEBUG=1 shows one); exit 1 means only "problems found" (verify). Paths are checked before torch or
transformers are imported, so a typo is refused at once.

This room: `main` here (parse, check the paths, dispatch, one line per error, the exit codes); the parser in
parser.py; the verbs in checkpoint_verbs.py (inspect, verify, synth, extract) and model_verbs.py (compare,
generate, trace, plan, regress); the flags' value types and the JSON printer in flags.py.
"""

from __future__ import annotations

import os
import sys

from omnilab.checkpoint import CheckpointError
# the verbs, also reachable as omnilab.cli.cmd_<verb>
from omnilab.cli.checkpoint_verbs import cmd_extract, cmd_inspect, cmd_synth, cmd_verify
from omnilab.cli.model_verbs import cmd_compare, cmd_generate, cmd_plan, cmd_regress, cmd_trace
from omnilab.cli.parser import build_parser

__all__ = ["main", "build_parser", "one_line", "cmd_inspect", "cmd_verify", "cmd_synth", "cmd_extract", "cmd_compare",
           "cmd_generate", "cmd_trace", "cmd_plan", "cmd_regress"]


def _check_paths(args) -> None:
    """Input paths exist before anything heavy is imported (a typo is refused in a fraction of a second)."""
    for flag in ("path", "reference", "source", "tokenizer", "audio", "image", "config", "link_from"):
        value = getattr(args, flag, None)
        if isinstance(value, str) and not os.path.exists(value):
            name = "PATH" if flag == "path" else f"--{flag.replace('_', '-')}"
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
