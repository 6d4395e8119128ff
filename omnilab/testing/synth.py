"""Synthesize checkpoints: tiny ones through transformers' own classes, full-scale sparse ones from a config.

- `tiny_qwen3_moe` / `tiny_qwen3_omni`: random-weight models built by `Qwen3MoeForCausalLM` and
  `Qwen3OmniMoeForConditionalGeneration` (tiny audio / vision / talker / code2wav towers included) and written
  by their own `save_pretrained`, with a small `max_shard_size` so one layer's experts spread over several
  shards. These are the test fixtures; a small byte-level BPE tokenizer goes beside them.
- `sparse_from_config`: the exact on-disk layout of any config (e.g. the real Qwen3-Omni-30B-A3B's): real
  safetensors headers with real offsets and data regions left as holes, so 70.5 GB costs kilobytes of disk.
- `real_shape_checkpoint`: that layout for the real Qwen3-Omni-30B-A3B thinker (real shapes, real 152,064-row
  vocabulary, any number of layers), its data filled in place with random values: the benchmarks' stand-in
  for the real model (24 layers: 33.5 GB), written without ever holding the model in memory.
  Names and shapes come from transformers (a meta-device model plus its reverse weight conversion, as
  `save_pretrained` writes them), never from a hand-written list.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from omnilab.tokenizer import quiet_transformers

# Text-decoder defaults for tiny fixtures: head_dim differs from hidden/heads, GQA, several layers.
TINY_TEXT = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=2,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
    max_position_embeddings=512, tie_word_embeddings=False,
)

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-Experts models route each token to a few experts.",
    "def add(a, b):\n    return a + b\n",
    "47 + 38 = 85\n12 + 30 = 42\n",
    "Le renard brun saute par-dessus le chien paresseux.",
]


def tiny_qwen3_moe(out: str | os.PathLike, *, seed: int = 0, max_shard_size: str | int = "24KB",
                   dtype: torch.dtype = torch.float32, tokenizer: bool = True, **text) -> Path:
    """A tiny random Qwen3-MoE checkpoint written by transformers. `text` overrides TINY_TEXT fields."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    fields = {**TINY_TEXT, **text}
    config = Qwen3MoeConfig(**fields, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).to(dtype).eval()
    return _save(model, out, max_shard_size, tokenizer, fields["vocab_size"])


def tiny_omni_config(**text) -> dict:
    """config.json of a tiny Qwen3-Omni: every tower present, each a few kilobytes."""
    fields = {**TINY_TEXT, **text}
    hidden = fields["hidden_size"]
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": _mrope_section(fields["head_dim"]),
            "interleaved": True, "mrope_interleaved": True}
    return {
        "model_type": "qwen3_omni_moe",
        "enable_audio_output": True,
        "thinker_config": {
            "model_type": "qwen3_omni_moe_thinker",
            "text_config": {**fields, "model_type": "qwen3_omni_moe_text", "rope_parameters": rope},
            "audio_config": dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                                 d_model=16, output_dim=hidden, downsample_hidden_size=8, n_window=4,
                                 n_window_infer=8, max_source_positions=32),
            "vision_config": dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                                  out_hidden_size=hidden, num_position_embeddings=16, deepstack_visual_indexes=[0]),
            "tie_word_embeddings": fields["tie_word_embeddings"],
        },
        "talker_config": {
            "thinker_hidden_size": hidden, "accept_hidden_layer": 1, "num_code_groups": 4, "spatial_merge_size": 2,
            "text_config": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_intermediate_size=16,
                                num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=24,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            "code_predictor_config": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_code_groups=4),
        },
        "code2wav_config": dict(codebook_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                intermediate_size=48, num_hidden_layers=1, num_quantizers=4, upsample_rates=[2, 2],
                                upsampling_ratios=[2], decoder_dim=32, sliding_window=8),
    }


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half - 2 * (half // 3)
    return [t, half // 3, half // 3]


def tiny_qwen3_omni(out: str | os.PathLike, *, seed: int = 0, max_shard_size: str | int = "48KB",
                    dtype: torch.dtype = torch.float32, tokenizer: bool = True, **text) -> Path:
    """A tiny random Qwen3-Omni checkpoint (thinker text + audio + vision + talker + code2wav) written by
    transformers. `text` overrides the thinker text decoder's TINY_TEXT fields."""
    config = tiny_omni_config(**text)
    if tokenizer:  # the config's chat token ids are the tokenizer's (verify checks they agree)
        tok = tiny_tokenizer(min(config["thinker_config"]["text_config"]["vocab_size"] - 16, 256))
        config.update(im_start_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
                      im_end_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    model = _omni_model(config, seed, dtype)
    return _save(model, out, max_shard_size, tokenizer, model.config.thinker_config.text_config.vocab_size)


def _omni_model(config: dict, seed: int, dtype: torch.dtype):
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    config = Qwen3OmniMoeConfig.from_dict(config)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(config).to(dtype).eval()
    with torch.no_grad():  # transformers 5.23 leaves the talker's experts as torch.empty: garbage, not seeded
        for name, param in model.named_parameters():
            if name.startswith("talker.") and ".experts." in name:
                param.normal_(0.0, config.initializer_range or 0.02)
    return model


def tiny_qwen3_omni_multimodal(out: str | os.PathLike, *, seed: int = 0, max_shard_size: str | int = "48KB",
                               dtype: torch.dtype = torch.float32, **text) -> Path:
    """tiny_qwen3_omni whose thinker config names placeholder tokens inside its vocabulary, with a tokenizer
    holding Qwen3-Omni's audio / vision special tokens and the processor files (omnilab.model.multimodal) beside it:
    a fixture that hears and sees (random weights)."""
    from omnilab.model.multimodal import PLACEHOLDER_TOKENS, write_processor_files

    config_dict = tiny_omni_config(**text)
    # transformers' audio token count (_get_feat_extract_output_lengths) assumes 100-frame chunks: n_window 50
    config_dict["thinker_config"]["audio_config"].update(n_window=50, n_window_infer=200)
    vocab = config_dict["thinker_config"]["text_config"]["vocab_size"]
    tok = tiny_tokenizer(min(vocab - 16, 256), extra_specials=PLACEHOLDER_TOKENS)
    ids = {attr: tok.convert_tokens_to_ids(token) for attr, token in PLACEHOLDER_TOKENS.items()}
    config_dict["thinker_config"].update(audio_token_id=ids["audio_token"], image_token_id=ids["image_token"],
                                         video_token_id=ids["video_token"], audio_start_token_id=ids["audio_bos_token"],
                                         vision_start_token_id=ids["vision_bos_token"])
    model = _omni_model(config_dict, seed, dtype)
    out = _save(model, out, max_shard_size, False, vocab)
    tok.save_pretrained(out)
    write_processor_files(out, model.config.thinker_config)
    return out


def _save(model, out, max_shard_size, tokenizer: bool, vocab_size: int) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer:
        tiny_tokenizer(min(vocab_size - 16, 256)).save_pretrained(out)
    return out


def tiny_tokenizer(vocab_size: int = 256, extra_specials: dict | None = None):
    """A byte-level BPE tokenizer trained on a few sentences, with Qwen-style special tokens at the end.
    extra_specials: attribute -> token (e.g. image_token -> <|image_pad|>), added as special tokens too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list((extra_specials or {}).values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLE_TEXT * 4, trainer)
    tok.add_special_tokens(specials)
    extra = {"extra_special_tokens": dict(extra_specials)} if extra_specials else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:], **extra)


# ---------------------------------------------------------------------------------------------------
# Full-scale sparse layouts
# ---------------------------------------------------------------------------------------------------

_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def layout_from_config(config: dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) for every tensor `save_pretrained` would write for this config,
    read off a meta-device transformers model after its reverse weight conversion."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model_type = config.get("model_type")
    config_cls = AutoConfig.for_model(model_type).__class__
    hf_config = config_cls.from_dict(config)
    if model_type == "qwen3_omni_moe":
        from transformers import Qwen3OmniMoeForConditionalGeneration as model_cls
    else:
        model_cls = AutoModelForCausalLM._model_mapping[type(hf_config)]
    with quiet_transformers(), torch.device("meta"):
        model = model_cls._from_config(hf_config, dtype=dtype)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    state = revert_weight_conversion(model, state)
    return {name: (_ST_DTYPE[t.dtype], tuple(t.shape)) for name, t in state.items()}


def sparse_from_config(config: str | os.PathLike | dict, out: str | os.PathLike, *, max_shard_size: str | int = "5GB",
                       dtype: torch.dtype = torch.bfloat16, keep=None) -> Path:
    """Write the full on-disk layout of `config` with holes for data: headers, index and config are real.

    Shards are split as `save_pretrained` splits them (huggingface_hub's splitter, tensor bytes counted as
    numel x itemsize). Each shard is written under a temporary name and renamed."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    from omnilab.checkpoint import DTYPE_BYTES, INDEX_NAME, pack_header
    from omnilab.jsonio import write_json

    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    layout = layout_from_config(config, dtype)
    if keep is not None:  # keep(name) -> bool: a partial layout (e.g. without the towers)
        layout = {name: spec for name, spec in layout.items() if keep(name)}
    sizes = {name: math.prod(shape) * DTYPE_BYTES[dt] for name, (dt, shape) in layout.items()}
    split = split_state_dict_into_shards_factory(
        layout, get_storage_size=lambda spec: math.prod(spec[1]) * DTYPE_BYTES[spec[0]], get_storage_id=lambda _: None,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard, names in split.filename_to_tensors.items():
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            dt, shape = layout[name]
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + sizes[name]]}
            offset += sizes[name]
            weight_map[name] = shard
        blob = pack_header(header)
        tmp = out / (shard + ".tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.truncate(len(blob) + offset)  # the data region is a hole: no disk blocks
        tmp.replace(out / shard)
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(out / INDEX_NAME, index)
    write_json(out / "config.json", config)
    return out


# ---------------------------------------------------------------------------------------------------
# Real-shape random checkpoints (benchmarks)
# ---------------------------------------------------------------------------------------------------

REAL_CONFIG = Path(__file__).resolve().parents[2] / "data" / "reference" / "qwen3-omni-30b-a3b-instruct.config.json"
_TOWERS = ("thinker.audio_tower.", "thinker.visual.")


def real_shape_config(layers: int = 48) -> dict:
    """Qwen3-Omni-30B-A3B's config.json with `layers` thinker decoder layers and the thinker alone (no talker, no
    code2wav: the layout of the Thinking / Captioner variants)."""
    config = json.loads(REAL_CONFIG.read_text())
    config["enable_audio_output"] = False
    config.pop("talker_config", None)
    config.pop("code2wav_config", None)
    config["thinker_config"]["text_config"]["num_hidden_layers"] = layers
    return config


def real_shape_checkpoint(out: str | os.PathLike, *, layers: int = 24, dtype: torch.dtype = torch.bfloat16,
                          device: str | torch.device = "cpu", seed: int = 0, towers: bool = True, std: float = 0.02,
                          progress: bool = True, config: dict | None = None) -> Path:
    """A random-weight Qwen3-Omni thinker with the real model's shapes and vocabulary, written in place.

    The layout comes from `sparse_from_config(real_shape_config(layers))`; every tensor is then filled through a
    memory map of its shard (norm weights 1, biases 0, the rest N(0, std)), chunk by chunk, so memory stays at
    one chunk whatever the size. device="cuda" draws the random numbers on the GPU (31 GB in well under a
    minute). Each tensor's values depend only on (seed, name, device type). towers=False leaves out the audio
    and vision towers (`verify` then reports them missing; the text decoder runs). No tokenizer is written:
    prompts are token ids. If `out` already holds a finished checkpoint of the same parameters it is reused;
    a different or unfinished one is refused. Written under OUT.tmp, renamed when complete. `config` replaces
    the real config (then `layers` is ignored): the tests fill tiny layouts the same way."""
    import zlib

    import numpy as np

    from omnilab.checkpoint import read_header
    from omnilab.jsonio import write_json

    out, device = Path(out), torch.device(device)
    config = real_shape_config(layers) if config is None else config
    params = {"layers": config.get("thinker_config", config).get("text_config", config).get("num_hidden_layers"), "dtype": str(dtype).removeprefix("torch."), "device": device.type, "seed": seed,
              "towers": towers, "std": std}
    marker = out / "omnilab-random.json"
    if out.exists():
        if marker.exists() and json.loads(marker.read_text()) == params:
            return out
        raise FileExistsError(f"{out}: exists and is not a real-shape checkpoint with {params}")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)  # an unfinished earlier attempt
    keep = None if towers else (lambda name: not name.startswith(_TOWERS))
    sparse_from_config(config, tmp, dtype=dtype, keep=keep)
    shards = sorted(tmp.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"fill {out.name}")
    chunk = 1 << 26  # elements per random draw: 128 MB in bf16
    for shard in shards:
        header, base = read_header(shard)
        data = np.memmap(shard, dtype=np.uint8, mode="r+")
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            flat = torch.from_numpy(data[base + begin:base + end]).view(dtype)  # [numel] over the shard's bytes
            if name.endswith(".bias"):
                flat.zero_()
            elif "norm" in name.rsplit(".", 2)[-2] or name.rsplit(".", 2)[-2].startswith("ln_"):  # norm weights
                flat.fill_(1.0)
            else:
                gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                for start in range(0, flat.numel(), chunk):
                    n = min(chunk, flat.numel() - start)
                    values = torch.randn(n, generator=gen, device=device, dtype=dtype).mul_(std)
                    flat[start:start + n].copy_(values)
            if bar is not None:
                bar.update(end - begin)
        data.flush()
        del data
    if bar is not None:
        bar.close()
    write_json(tmp / "omnilab-random.json", params)
    tmp.rename(out)
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json")
ROLE_TOKEN_IDS = {"user_token_id": "user", "assistant_token_id": "assistant", "system_token_id": "system"}


def attach_tokenizer(checkpoint: str | os.PathLike, source: str | os.PathLike) -> dict[str, int]:
    """Copy the tokenizer and processor files of `source` (e.g. data/omni-tiny) beside a real-shape checkpoint and
    point config.json's special-token ids (audio/image/video placeholders, vision and audio start/end, chat roles)
    at that tokenizer's own ids, so the notebooks can tokenize, chat and build multimodal prompts on a random
    checkpoint of any size. Returns the ids changed {key: new id}. The config is rewritten atomically."""
    import shutil

    from omnilab.jsonio import write_json
    from omnilab.vocab import CONFIG_TOKEN_IDS, open_tokenizer

    checkpoint, source = Path(checkpoint), Path(source)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, checkpoint / name)
    vocab = open_tokenizer(source).get_vocab()
    wanted = {**CONFIG_TOKEN_IDS, **ROLE_TOKEN_IDS}
    config = json.loads((checkpoint / "config.json").read_text())
    changed = {}
    for d in (config, config.get("thinker_config")):
        if not isinstance(d, dict):
            continue
        for key, token in wanted.items():
            if key in d and token in vocab and d[key] != vocab[token]:
                d[key] = changed[key] = vocab[token]
    thinker = config.get("thinker_config")
    vision_start = vocab.get("<|vision_start|>")
    if isinstance(thinker, dict) and vision_start is not None and thinker.get("vision_start_token_id") != vision_start:
        # transformers' thinker reads vision_start_token_id for its rope index though its config class lacks it
        thinker["vision_start_token_id"] = changed["vision_start_token_id"] = vision_start
    write_json(checkpoint / "config.json", config)
    return changed
