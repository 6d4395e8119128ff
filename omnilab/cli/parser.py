"""The `omnilab` command's argument parser: every verb, its flags and their help (each option's default shown),
the verb's function set as `func`; the flags' value types are omnilab.cli.flags'."""

from __future__ import annotations

import argparse

from omnilab.cli.checkpoint_verbs import cmd_extract, cmd_inspect, cmd_synth, cmd_verify
from omnilab.cli.flags import parse_batch_tokens, parse_budget, parse_ids, parse_seed, parse_stop_ids, parse_text
from omnilab.cli.model_verbs import cmd_compare, cmd_generate, cmd_plan, cmd_regress, cmd_trace
from omnilab.units import parse_size

DESCRIPTION = "The `omnilab` command (also `python -m omnilab`)."


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
    parser = argparse.ArgumentParser(prog="omnilab", description=DESCRIPTION, parents=[_common()])
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
        src = p.add_mutually_exclusive_group()  # one of them, or --audio / --image (checked by model_verbs)
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
    p.add_argument("--expert-budget", type=parse_budget, default="auto", metavar="SIZE",
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
    p.add_argument("--link-from", default=None, metavar="DIR",
                   help="an earlier extraction of the same source: hard-link its verified files instead of copying")
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
    p.add_argument("--batch-tokens", type=parse_batch_tokens, default="auto", metavar="N",
                   help="padded tokens per batch; default auto: a resumed trace's own, else on a GPU the largest of "
                        "16384, 8192, 4096 that fits beside the experts, else 4096")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: the checkpoint's own dtype on a GPU, float32 on a CPU")
    p.add_argument("--device", default="auto",
                   help="auto, cpu or cuda (under torchrun: each rank its LOCAL_RANK's GPU)")
    p.add_argument("--expert-budget", type=parse_budget, default="auto", metavar="SIZE",
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

