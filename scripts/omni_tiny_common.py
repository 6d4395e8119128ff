"""Shared definitions for the omni-tiny scripts (build_corpus, train_tiny, evaluate_tiny).

Not a script: imported by the scripts in this folder, and importing it puts the repository root on
sys.path (`put_repo_on_path`), so that they import omnilab from a checkout where it is not installed. It
holds the domain list, the special tokens, the arithmetic prompt format, and the function that builds the tiny
`Qwen3OmniMoeConfig` (a thinker text model worth training, plus tiny audio / vision / talker /
code2wav parts left at their random init so the checkpoint has every component the real one has).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "data"
MODEL_DIR = DATA_DIR / "omni-tiny"
EVAL_DIR = DATA_DIR / "eval"
SCRATCH = REPO / ".scratch"


def put_repo_on_path() -> None:
    """The repository root on sys.path, right after the scripts' folder (once): omnilab, when it is not installed."""
    if str(REPO) not in sys.path:
        sys.path.insert(1, str(REPO))


put_repo_on_path()

# Domain names, in a fixed order (the order is the domain id used in token arrays and logs).
DOMAINS = ["en", "fr", "es", "python", "arith"]
DOMAIN_TITLES = {
    "en": "English Wikipedia lead paragraphs",
    "fr": "French Wikipedia lead paragraphs",
    "es": "Spanish Wikipedia lead paragraphs",
    "python": "Python source (CPython 3.11 standard library)",
    "arith": "Integer addition, generated",
}

# Special tokens, named as in the Qwen3-Omni tokenizer. They take the first ids of the vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>",  # document separator; also eos / pad
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
]
EOS = "<|endoftext|>"

# Qwen2-style pre-tokenizer pattern: single digits, letters with one leading non-letter, etc.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ---------------------------------------------------------------- arithmetic format
# One problem per line: "47 + 38 = 85\n". The evaluation prompt is "47 + 38 =" and the model's
# greedy continuation up to the newline is compared with " 85".


def addition_line(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}\n"


def addition_prompt(a: int, b: int) -> str:
    return f"{a} + {b} ="


def heldout_addition_pairs(n: int = 1000, seed: int = 1234) -> list[tuple[int, int]]:
    """Unordered 2-digit pairs (a <= b) held out of training; both a+b and b+a are excluded."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(a, 100)]
    rng.shuffle(pairs)
    return sorted(pairs[:n])


# Operand digit counts of generated problems and their weights. 3-digit problems (~10^6 distinct)
# cannot be memorized, so the model has to learn carrying; 2-digit pairs are the evaluated case.
ARITH_KINDS = [  # ((digits of a, digits of b), weight)
    ((2, 2), 4.0), ((1, 1), 1.0), ((1, 2), 1.0), ((2, 1), 1.0),
    ((3, 3), 3.0), ((2, 3), 1.0), ((3, 2), 1.0), ((1, 3), 0.5), ((3, 1), 0.5),
]


class AdditionSampler:
    """Draws addition problems (a, b) from ARITH_KINDS, never a held-out 2-digit pair (either order).

    `tokens(n_lines)` gives the token ids of n lines "a + b = s\n" directly (vectorized, no tokenizer
    call), with <|endoftext|> before a line with probability 1/18 (documents of ~18 lines), exactly
    as the tokenizer encodes that text (checked by `check_against`)."""

    def __init__(self, heldout: list[tuple[int, int]], seed: int):
        self.rng = np.random.default_rng(seed)
        self.forbidden = np.zeros((1000, 1000), dtype=bool)
        for a, b in heldout:
            self.forbidden[a, b] = self.forbidden[b, a] = True
        w = np.array([k[1] for k in ARITH_KINDS], dtype=float)
        self.kind_p = w / w.sum()
        self.kind_digits = np.array([k[0] for k in ARITH_KINDS])
        self.ids = None

    def pairs(self, n: int):
        out_a, out_b, got = [], [], 0
        while got < n:
            m = int((n - got) * 1.2) + 16
            kind = self.rng.choice(len(ARITH_KINDS), size=m, p=self.kind_p)
            da, db = self.kind_digits[kind, 0], self.kind_digits[kind, 1]
            lo_a = np.where(da == 1, 0, 10 ** (da - 1))
            lo_b = np.where(db == 1, 0, 10 ** (db - 1))
            a = lo_a + (self.rng.random(m) * (10**da - lo_a)).astype(np.int64)
            b = lo_b + (self.rng.random(m) * (10**db - lo_b)).astype(np.int64)
            keep = ~self.forbidden[a, b]
            out_a.append(a[keep]); out_b.append(b[keep]); got += int(keep.sum())
        return np.concatenate(out_a)[:n], np.concatenate(out_b)[:n]

    def set_token_ids(self, tokenizer) -> None:
        """tokenizer: a `tokenizers.Tokenizer`. Looks up the ids of digits, ' +', ' ', ' =', newline, eos."""
        enc = tokenizer.encode("12 + 34 = 46\n").tokens
        ids = {t: tokenizer.token_to_id(t) for t in enc}
        digit = [tokenizer.token_to_id(str(d)) for d in range(10)]
        self.ids = {"digit": np.array(digit), "plus": ids[enc[2]], "sp": ids[enc[3]], "eq": ids[enc[6]],
                    "nl": ids[enc[-1]], "eos": tokenizer.token_to_id(EOS)}
        assert enc == ["1", "2", enc[2], enc[3], "3", "4", enc[6], enc[7], "4", "6", enc[-1]], enc

    def _digit_cols(self, x):
        nd = np.where(x >= 1000, 4, np.where(x >= 100, 3, np.where(x >= 10, 2, 1)))
        cols = np.full((len(x), 4), -1, dtype=np.int64)
        for j in range(4):  # column j holds the j-th digit from the left, if any
            pos = nd - 1 - j  # power of ten of that digit
            ok = pos >= 0
            cols[:, j] = np.where(ok, self.ids["digit"][(x // 10 ** np.maximum(pos, 0)) % 10], -1)
        return cols

    def tokens(self, n_lines: int):
        a, b = self.pairs(n_lines)
        i = self.ids
        eos_col = np.where(self.rng.random(n_lines) < 1 / 18, i["eos"], -1)[:, None]
        const = lambda v: np.full((n_lines, 1), v, dtype=np.int64)  # noqa: E731
        m = np.concatenate([eos_col, self._digit_cols(a), const(i["plus"]), const(i["sp"]), self._digit_cols(b),
                            const(i["eq"]), const(i["sp"]), self._digit_cols(a + b), const(i["nl"])], axis=1)
        return m[m >= 0], a, b

    def rows(self, n: int, width: int) -> np.ndarray:
        """[n, width] token ids: a fresh stream of addition lines cut into n training rows of `width` tokens."""
        need = n * width
        stream = self.tokens(need // 11 + 64)[0]
        while len(stream) < need:
            stream = np.concatenate([stream, self.tokens(64)[0]])
        return stream[:need].reshape(n, width)

    def check_against(self, tokenizer, n: int = 300) -> None:
        toks, a, b = self.tokens(n)
        text_ids = []
        for x, y in zip(a.tolist(), b.tolist()):
            text_ids.extend(tokenizer.encode(addition_line(x, y)).ids)
        eos = self.ids["eos"]
        assert [t for t in toks.tolist() if t != eos] == text_ids, "vectorized arithmetic tokens != tokenizer"


# ---------------------------------------------------------------- text-only forward helpers (torch)

def text_position_ids(batch: int, seq: int, device):
    """Text-only 3D (t, h, w) rope positions: all three equal to 0..seq-1, as get_rope_index gives."""
    import torch

    return torch.arange(seq, device=device).view(1, 1, seq).expand(3, batch, seq)


def greedy_extend(thinker, x, steps: int):
    """Append `steps` greedy tokens to every row of x (batch, len) with full forward passes, no KV
    cache (the rows of x must have the same length). Returns the extended tensor."""
    import torch

    for _ in range(steps):
        logits = thinker(input_ids=x, position_ids=text_position_ids(*x.shape, x.device), use_cache=False).logits
        x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x


# ---------------------------------------------------------------- model config

def text_dims(vocab_size: int) -> dict:
    """The thinker text model's dimensions (the part that is trained)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,  # unused (no dense-MLP layers) but kept like the real config
        moe_intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=32,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.01,
        output_router_logits=False,
        initializer_range=0.02,
        # head_dim 64 -> 32 rotary frequencies, split over (t, h, w) like the real [24, 20, 20] of 64.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [12, 10, 10],
            "interleaved": True,
            "mrope_interleaved": True,
        },
    )


def build_config(tokenizer_specials: dict[str, int], vocab_size: int, word_ids: dict[str, int]):
    """The full Qwen3OmniMoeConfig. `tokenizer_specials` maps special-token strings to ids,
    `word_ids` maps "user" / "system" / "assistant" to ids (the real config names these too)."""
    from transformers import Qwen3OmniMoeConfig

    sp = tokenizer_specials
    eos = sp[EOS]
    text = text_dims(vocab_size)
    text.update(bos_token_id=None, eos_token_id=eos, pad_token_id=eos)
    H = text["hidden_size"]

    # The towers were enlarged for the multimodal training (scripts/train_multimodal.py): they were
    # audio d_model 32 / 1 layer / ffn 64 / conv 8 channels and vision hidden 32 / depth 2 / deepstack [0, 1]
    # while they stayed at their random init.
    audio = dict(
        num_mel_bins=128,
        encoder_layers=3,
        encoder_attention_heads=4,
        encoder_ffn_dim=1024,
        d_model=256,
        output_dim=H,
        downsample_hidden_size=64,
        max_source_positions=1500,
        n_window=50,
        n_window_infer=800,
        conv_chunksize=500,
    )
    vision = dict(
        depth=3,
        hidden_size=128,
        intermediate_size=512,
        num_heads=2,
        in_channels=3,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=H,
        num_position_embeddings=64,
        deepstack_visual_indexes=[1, 2],
    )
    talker_text = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [4, 2, 2],
            "interleaved": True,
            "mrope_interleaved": True,
        },
    )
    code_predictor = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_code_groups=4,
        max_position_embeddings=4096,
    )
    talker = dict(
        text_config=talker_text,
        code_predictor_config=code_predictor,
        num_code_groups=4,
        thinker_hidden_size=H,
        accept_hidden_layer=text["num_hidden_layers"] // 2,
        # codec control ids live at the top of the talker's 256-entry codec vocabulary
        codec_pad_id=248,
        codec_bos_id=249,
        codec_eos_token_id=250,
        codec_nothink_id=251,
        codec_think_bos_id=252,
        codec_think_eos_id=253,
        audio_token_id=sp["<|audio_pad|>"],
        image_token_id=sp["<|image_pad|>"],
        video_token_id=sp["<|video_pad|>"],
        vision_start_token_id=sp["<|vision_start|>"],
        audio_start_token_id=sp["<|audio_start|>"],
        speaker_id={"ethan": 240, "chelsie": 241, "aiden": 242},
        spatial_merge_size=2,
    )
    code2wav = dict(
        codebook_size=64,
        hidden_size=32,
        max_position_embeddings=8000,
        num_attention_heads=2,
        num_key_value_heads=2,
        sliding_window=72,
        intermediate_size=64,
        num_hidden_layers=1,
        num_quantizers=4,
        upsample_rates=[2, 2],
        upsampling_ratios=[2],
        decoder_dim=32,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    thinker = dict(
        text_config=text,
        audio_config=audio,
        vision_config=vision,
        audio_token_id=sp["<|audio_pad|>"],
        image_token_id=sp["<|image_pad|>"],
        video_token_id=sp["<|video_pad|>"],
        audio_start_token_id=sp["<|audio_start|>"],
        # read by get_rope_index (generate); the published config has it, transformers' class does not
        vision_start_token_id=sp["<|vision_start|>"],
        user_token_id=word_ids["user"],
        tie_word_embeddings=False,
        position_id_per_seconds=25,
    )
    cfg = Qwen3OmniMoeConfig(
        thinker_config=thinker,
        talker_config=talker,
        code2wav_config=code2wav,
        enable_audio_output=True,
        im_start_token_id=sp["<|im_start|>"],
        im_end_token_id=sp["<|im_end|>"],
        tts_pad_token_id=sp["<tts_pad>"],
        tts_bos_token_id=sp["<tts_text_bos>"],
        tts_eos_token_id=sp["<tts_text_eod>"],
        system_token_id=word_ids["system"],
        user_token_id=word_ids["user"],
        assistant_token_id=word_ids["assistant"],
    )
    return cfg


def init_untrained_parts(model, seed: int) -> None:
    """Fill what transformers 5.23 leaves uninitialized in a freshly built model.

    Qwen3OmniMoePreTrainedModel._init_weights initializes the thinker's MoE experts and router but
    not the talker's: `talker.model.layers.*.mlp.experts.{gate_up_proj,down_proj}` keep whatever
    torch.empty returned (garbage, sometimes NaN or 1e26) and the talker routers stay all-zero. Give
    them normal(0, initializer_range) values from a fixed seed, then check every tensor is finite."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    std = model.config.talker_config.initializer_range
    with torch.no_grad():
        for layer in model.talker.model.layers:
            mlp = layer.mlp
            if hasattr(mlp, "experts"):
                for p in (mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.gate.weight):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all() or p.abs().max() > 100]
    assert not bad, f"non-finite or huge values after init: {bad[:5]}"


def config_from_tokenizer(tok_dir: Path):
    """Build the config from a saved tokenizer folder (tokenizer.json)."""
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    sp = {t: tk.token_to_id(t) for t in SPECIAL_TOKENS}
    word_ids = {}
    for w in ("user", "system", "assistant"):
        ids = tk.encode(w).ids
        word_ids[w] = ids[0]  # the first piece if the word is not a single token
    return build_config(sp, tk.get_vocab_size(), word_ids)


def read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(word edit distance, reference words) after lowercasing and dropping punctuation (+ and ' kept)."""
    norm = lambda t: "".join(c if c.isalnum() or c in " +'" else " " for c in t.lower()).split()  # noqa: E731
    r, h = norm(ref), norm(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
    return d[len(h)], len(r)
