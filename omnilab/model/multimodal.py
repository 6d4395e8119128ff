"""Multimodal input for the selective thinker: audio, images and video into the MoE decoder (`Towers`,
`load_processor`, `prepare`, `forward`, `generate`). Follows transformers' `Qwen3OmniMoeThinkerModel.forward` step
by step with transformers' own towers, processor and `get_rope_index`, so only the text decoder is omnilab's.
Comparing it with transformers: omnilab.reference.multimodal. Design: docs/DESIGN.md, "Multimodal input".
"""

from __future__ import annotations

import functools
import json
import os
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from omnilab.checkpoint import Checkpoint
from omnilab.jsonio import write_json
from omnilab.model.generate import Generation, check_positions, check_sampling, pick_token, sampling_setup
from omnilab.model.kv_cache import KVCache

# The tokenizer attributes Qwen3OmniMoeProcessor reads, and Qwen3-Omni's tokens for them.
PLACEHOLDER_TOKENS = {
    "audio_token": "<|audio_pad|>", "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
    "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
}
AUDIO_PROMPT = "<|audio_start|><|audio_pad|><|audio_end|>"  # the processor expands the pad to one per audio frame
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>"  # ... and to one per merged image patch
SAMPLING_RATE = 16000  # Whisper features; Qwen3OmniMoeProcessor's audio sampling rate
PREPROCESSOR_FILE = "preprocessor_config.json"


def thinker_config(checkpoint: Checkpoint):
    """transformers' Qwen3OmniMoeThinkerConfig of a Qwen3-Omni checkpoint (ValueError for any other)."""
    from transformers import Qwen3OmniMoeConfig

    config = json.loads((checkpoint.root / "config.json").read_text())
    if config.get("model_type") != "qwen3_omni_moe":
        raise ValueError(f"{checkpoint.root}: audio and image input need a Qwen3-Omni checkpoint "
                         f"(model_type qwen3_omni_moe), this one is {config.get('model_type')!r}")
    from omnilab.tokenizer import quiet_transformers

    with quiet_transformers():  # its rope_parameters check warns of M-RoPE's own keys (mrope_section, ...)
        return Qwen3OmniMoeConfig.from_dict(config).thinker_config


# -- the towers ---------------------------------------------------------------------------------------------------


def _transformers_rope_index():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoePreTrainedModelForConditionalGeneration as Thinker)

    return Thinker.get_rope_index, Thinker.get_llm_pos_ids_for_vision


class Towers(nn.Module):
    """The thinker's audio and vision towers (transformers' modules) and its M-RoPE position function.

    `get_rope_index` and `get_llm_pos_ids_for_vision` are transformers' own functions, bound here: they read
    only `self.config` (the thinker config) and `self.spatial_merge_size`."""

    get_rope_index, get_llm_pos_ids_for_vision = _transformers_rope_index()

    def __init__(self, config, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            Qwen3OmniMoeAudioEncoder, Qwen3OmniMoeVisionEncoder)

        self.config = config
        self.audio_tower = Qwen3OmniMoeAudioEncoder._from_config(config.audio_config,
                                                                 attn_implementation=attn_implementation)
        self.visual = Qwen3OmniMoeVisionEncoder._from_config(config.vision_config,
                                                             attn_implementation=attn_implementation)
        self.spatial_merge_size = config.vision_config.spatial_merge_size

    @classmethod
    def from_checkpoint(cls, checkpoint, *, dtype=torch.float32, device="cpu", vision_start_token_id=None,
                        attn_implementation: str = "sdpa") -> "Towers":
        """Both towers with the checkpoint's weights (`thinker.audio_tower.*`, `thinker.visual.*`), resident.
        attn_implementation: transformers' name ("sdpa", "eager"); omnilab.reference.whole runs "eager", which in
        bf16 rounds the vision tower's attention differently (in fp32 the two agree to ~1e-7)."""
        from transformers.initialization import no_init_weights

        from omnilab.dtypes import as_dtype
        from omnilab.tokenizer import quiet_transformers

        checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        config = thinker_config(checkpoint)
        if getattr(config, "vision_start_token_id", None) is None:
            # transformers 5.23 has no vision_start_token_id in the thinker config, yet get_rope_index reads it;
            # it is the tokenizer's <|vision_start|> (omnilab.reference.whole sets the Qwen tokenizer's 151652 alike)
            config.vision_start_token_id = 151652 if vision_start_token_id is None else vision_start_token_id
        dtype = as_dtype(dtype)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # as transformers' from_pretrained builds a model: buffers in this dtype too
        try:
            with quiet_transformers(), no_init_weights():
                towers = cls(config, attn_implementation)
        finally:
            torch.set_default_dtype(default)
        state = {}
        for local in towers.state_dict():
            name = "thinker." + local
            if name not in checkpoint.tensors.index:
                raise KeyError(f"{checkpoint.path}: tower tensor {name} is missing")
            state[local] = checkpoint.read(name).to(dtype=dtype, copy=True)  # own memory, not the mmap
        towers.load_state_dict(state, strict=True)
        return towers.to(device=device).eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.patch_embed.proj.weight.dtype

    def audio_features(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
        """input_features [A, mel, frames], feature_attention_mask [A, frames] -> [n_audio_tokens, H]."""
        lengths = feature_attention_mask.sum(dim=1)  # [A]
        frames = input_features.permute(0, 2, 1)[feature_attention_mask.bool()].permute(1, 0)  # [mel, sum(lengths)]
        return self.audio_tower(frames.to(self.dtype), feature_lens=lengths, return_dict=True).last_hidden_state

    def vision_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """pixel_values [patches, C * t * p * p], grid_thw [N, 3] -> merged embeddings [n_tokens, H] and one
        deepstack feature [n_tokens, H] per deepstack layer."""
        out = self.visual(pixel_values.to(self.dtype), grid_thw=grid_thw)
        return out.pooler_output, list(out.deepstack_features)


# -- the processor ------------------------------------------------------------------------------------------------


def write_processor_files(folder, config, image_mean=None, image_std=None) -> Path:
    """preprocessor_config.json for a Qwen3-Omni checkpoint, written by transformers' own classes: a
    WhisperFeatureExtractor (num_mel_bins of the audio tower) and a Qwen2-VL image processor (the vision
    tower's patch, temporal patch and merge sizes; at most 1024 merged tokens per image), in one file as
    Qwen's omni checkpoints ship them. `config`: the thinker config; image_mean / image_std (three values
    each): the pixel normalisation, the processor's own (CLIP's, as Qwen ships it) when None."""
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size  # pixels per merged token, per side
    features = WhisperFeatureExtractor(feature_size=config.audio_config.num_mel_bins, sampling_rate=SAMPLING_RATE)
    images = Qwen2VLImageProcessorPil(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                      merge_size=vision.spatial_merge_size,
                                      size={"shortest_edge": factor * factor, "longest_edge": 1024 * factor * factor},
                                      **({"image_mean": list(image_mean), "image_std": list(image_std)}
                                         if image_mean is not None else {}))
    merged = {**features.to_dict(), **images.to_dict(), "processor_class": "Qwen3OmniMoeProcessor"}
    path = Path(folder) / PREPROCESSOR_FILE
    write_json(path, merged)
    return path


@functools.cache
def _processor_class():
    from transformers import Qwen3OmniMoeProcessor

    class Processor(Qwen3OmniMoeProcessor):
        # differs from transformers: the video processor may be absent. transformers' video processors need
        # torchvision, which has no build for this CPU torch; audio and images go through transformers' own
        # processor code unchanged, videos are refused (the video slot is None).
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return Processor


def load_processor(folder, tokenizer=None):
    """transformers' Qwen3OmniMoeProcessor from the files beside a checkpoint: preprocessor_config.json
    (feature extractor and image processor) and the tokenizer, given its placeholder-token attributes."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from omnilab.tokenizer import quiet_transformers

    folder = Path(folder)
    if not (folder / PREPROCESSOR_FILE).exists():
        raise ValueError(f"{folder}: no {PREPROCESSOR_FILE} (audio / image preprocessing); write one with "
                         f"omnilab.model.multimodal.write_processor_files")
    with quiet_transformers():
        if tokenizer is None or not all(getattr(tokenizer, k, None) for k in PLACEHOLDER_TOKENS):
            tokenizer = AutoTokenizer.from_pretrained(str(folder), extra_special_tokens=PLACEHOLDER_TOKENS,
                                                      trust_remote_code=False)
        features = WhisperFeatureExtractor.from_pretrained(str(folder), trust_remote_code=False)
        images = Qwen2VLImageProcessorPil.from_pretrained(str(folder), trust_remote_code=False)
    unknown = [t for t in PLACEHOLDER_TOKENS.values() if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if unknown:
        raise ValueError(f"{folder}: the tokenizer has no {unknown[0]} token (Qwen3-Omni's placeholder tokens)")
    return _processor_class()(image_processor=images, video_processor=None, feature_extractor=features,
                              tokenizer=tokenizer)


def open_multimodal(model, attn_implementation: str = "sdpa"):
    """(Towers, processor) for a SelectiveMoE loaded from a Qwen3-Omni checkpoint, on its device and dtype."""
    checkpoint = model.checkpoint
    processor = load_processor(checkpoint.root, model.tokenizer)
    vision_start = processor.tokenizer.convert_tokens_to_ids(PLACEHOLDER_TOKENS["vision_bos_token"])
    towers = Towers.from_checkpoint(checkpoint, dtype=model.dtype, device=model.device,
                                    vision_start_token_id=vision_start, attn_implementation=attn_implementation)
    for attr, key in (("audio_token", "audio_token_id"), ("image_token", "image_token_id"),
                      ("video_token", "video_token_id"), ("audio_bos_token", "audio_start_token_id"),
                      ("vision_bos_token", "vision_start_token_id")):
        token = PLACEHOLDER_TOKENS[attr]
        if processor.tokenizer.convert_tokens_to_ids(token) != getattr(towers.config, key):
            raise ValueError(f"{checkpoint.root}: the tokenizer's {token} is id "
                             f"{processor.tokenizer.convert_tokens_to_ids(token)} but config.json's {key} is "
                             f"{getattr(towers.config, key)}")
    return towers, processor


def process(processor, config, text, audio=None, images=None):
    """Prompts through the processor: text with placeholders (one string, or a list: a left-padded batch),
    audio (float32 mono waveforms at 16 kHz) and images (PIL), in placeholder order -> BatchFeature of torch
    tensors (input_ids, attention_mask, input_features, feature_attention_mask, pixel_values, image_grid_thw)."""
    audio = None if audio is None else [np.asarray(a, dtype=np.float32) for a in audio]
    texts = [text] if isinstance(text, str) else list(text)
    batch = {"padding": True} if len(texts) > 1 else {}  # text padding (left, the processor's side) for a batch
    return processor(text=texts, audio=audio, images=images, return_tensors="pt",
                     n_window=config.audio_config.n_window, **batch)


MAX_AUDIO_SECONDS = 40 * 60  # Qwen3-Omni's stated limit for one audio input
AUDIO_TOKENS_PER_S = 12.5  # the audio tower's output rate (one token per 80 ms): a bound on the prompt's length


def audio_seconds_limit(config) -> float:
    """The longest audio whose tokens fit the text model's max_position_embeddings (and MAX_AUDIO_SECONDS)."""
    limit = getattr(config, "max_position_embeddings", 0) or 0
    return min(MAX_AUDIO_SECONDS, limit / AUDIO_TOKENS_PER_S) if limit else MAX_AUDIO_SECONDS


def read_wav(path, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """A PCM .wav file -> float32 mono waveform in [-1, 1] (channels averaged). 16 kHz only; a file longer
    than `max_seconds` is refused before its samples are read."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            if rate == SAMPLING_RATE and n > max_seconds * rate:
                raise ValueError(f"{path}: {n / rate:.0f} s of audio; the model takes at most {max_seconds:.0f} s "
                                 f"(its audio tokens must fit max_position_embeddings); cut it first")
            raw = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{path}: not a readable PCM .wav file ({e})") from None
    if rate != SAMPLING_RATE:
        raise ValueError(f"{path}: sample rate {rate} Hz; the audio features need {SAMPLING_RATE} Hz "
                         f"(convert it first, e.g. ffmpeg -i IN -ar 16000 -ac 1 OUT.wav)")
    if width not in (1, 2, 4):
        raise ValueError(f"{path}: {8 * width}-bit samples; use 8, 16 or 32-bit PCM")
    if n == 0:
        raise ValueError(f"{path}: no audio frames")
    if width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        dt = np.int16 if width == 2 else np.int32
        x = np.frombuffer(raw, dtype=dt).astype(np.float32) / float(np.iinfo(dt).max + 1)
    return x.reshape(-1, channels).mean(axis=1)  # [frames]


def read_image(path):
    """An image file -> RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def prompt_text(prompt: str | None, *, audio: bool, image: bool) -> str:
    """The text around the media: the placeholders (image, then audio) followed by the prompt, unless the
    prompt places them itself."""
    prompt = prompt or ""
    head = ""
    if image and "<|image_pad|>" not in prompt:
        head += IMAGE_PROMPT
    if audio and "<|audio_pad|>" not in prompt:
        head += AUDIO_PROMPT
    return head + prompt


# -- embedding merge and positions -------------------------------------------------------------------------------


@dataclass
class MultimodalPrompt:
    """One processed prompt, ready for SelectiveMoE.forward: everything transformers computes before its
    text decoder runs."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]: 1 = token, 0 = left padding
    inputs_embeds: torch.Tensor  # [B, T, H]: token embeddings, tower features at the placeholders
    position_ids: torch.Tensor  # [3, B, T]: temporal, height, width rows (get_rope_index)
    rope_deltas: torch.Tensor  # [B, 1]: next position minus sequence length (for decoding)
    deepstack: tuple | None  # (visual_pos_masks [B, T] bool, [features [n_visual, H] per layer]) or None
    inputs: dict  # the processor's tensors, for the reference


def _scatter(embeds, ids, token_id, features, what: str, token: str):
    mask = ids == token_id  # [B, T]
    n, m = int(mask.sum()), features.shape[0]
    if n != m:
        raise ValueError(f"{what}: the prompt has {n} {token} placeholders but the {what} tower gave {m} features")
    return embeds.masked_scatter(mask[..., None], features.to(embeds.dtype)), mask


@torch.no_grad()
def prepare(model, towers: Towers, inputs) -> MultimodalPrompt:
    """Processor output -> MultimodalPrompt, as Qwen3OmniMoeThinkerModel.forward prepares its decoder input."""
    cfg = towers.config
    device = model.device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(inputs).items()}
    ids = inputs["input_ids"]  # [B, T]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    rows = model.model.embed_tokens.num_embeddings
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < rows:
        bad = int(ids.max()) if int(ids.max()) >= rows else int(ids.min())
        raise ValueError(f"token id {bad} is outside the embedding's {rows} rows (ids 0..{rows - 1})")
    embeds = model.model.embed_tokens(ids)  # [B, T, H]
    audio_lengths = None
    if inputs.get("input_features") is not None:
        feature_mask = inputs["feature_attention_mask"]
        audio_lengths = feature_mask.sum(dim=1)  # [A]
        feats = towers.audio_features(inputs["input_features"], feature_mask)  # [n_audio, H]
        embeds, _ = _scatter(embeds, ids, cfg.audio_token_id, feats, "audio", "<|audio_pad|>")
    image_mask = video_mask = None
    if inputs.get("pixel_values") is not None:
        image_embeds, image_stack = towers.vision_features(inputs["pixel_values"], inputs["image_grid_thw"])
        embeds, image_mask = _scatter(embeds, ids, cfg.image_token_id, image_embeds, "image", "<|image_pad|>")
    if inputs.get("pixel_values_videos") is not None:
        video_embeds, video_stack = towers.vision_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        embeds, video_mask = _scatter(embeds, ids, cfg.video_token_id, video_embeds, "video", "<|video_pad|>")
    deepstack = None
    if image_mask is not None and video_mask is not None:  # both: one feature row per visual token, in order
        visual = image_mask | video_mask  # [B, T]
        joint = []
        for img, vid in zip(image_stack, video_stack):
            rows = img.new_zeros(int(visual.sum()), img.shape[-1])  # [n_visual, H]
            rows[image_mask[visual]] = img
            rows[video_mask[visual]] = vid
            joint.append(rows)
        deepstack = (visual, joint)
    elif image_mask is not None:
        deepstack = (image_mask, image_stack)
    elif video_mask is not None:
        deepstack = (video_mask, video_stack)
    position_ids, rope_deltas = towers.get_rope_index(
        ids, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), attention_mask, False, audio_lengths,
        inputs.get("video_second_per_grid"))  # [3, B, T], [B, 1]
    return MultimodalPrompt(ids, attention_mask, embeds, position_ids.to(device), rope_deltas.to(device), deepstack, inputs)


def forward(model, prompt: MultimodalPrompt, kv=None, routing=None) -> torch.Tensor:
    """logits [B, T, V] of the selective model on a prepared prompt (routing: this call's RoutingOptions,
    None: the model's own)."""
    return model(prompt.input_ids, prompt.attention_mask, kv, inputs_embeds=prompt.inputs_embeds,
                 position_ids=prompt.position_ids, deepstack=prompt.deepstack, routing=routing)


# -- generation -----------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, prompt: MultimodalPrompt, max_new_tokens: int = 32, *, greedy: bool = True,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_tokens=(), vocab_limit="auto",
             seed: int | None = 0, routing=None):
    """SelectiveMoE.generate for one multimodal prompt: the prefill reads the merged embeddings and M-RoPE
    positions; each new token's three position rows are equal, at its index plus the prompt's rope delta
    (as transformers decodes). Returns omnilab.model.generate.Generation."""
    if prompt.input_ids.shape[0] != 1:
        raise ValueError("multimodal generate takes one prompt at a time")
    check_sampling(max_new_tokens, greedy, temperature, top_k, top_p, seed)
    check_positions(model.config, prompt.input_ids.shape[1], max_new_tokens)
    vocab_limit, warpers, generator = sampling_setup(model, vocab_limit, greedy, temperature, top_k, top_p, seed)
    stop = set(stop_tokens)
    kv = KVCache(model.config.num_hidden_layers)
    seq = prompt.input_ids
    new: list[int] = []
    stopped = False
    start = time.perf_counter()
    prefill = 0.0
    logits = forward(model, prompt, kv, routing)[:, -1].float()  # [1, V]
    for step in range(max_new_tokens):
        token = pick_token(logits, seq, vocab_limit, greedy, warpers, generator)  # [1]
        new.append(int(token))
        if step == 0:
            prefill = time.perf_counter() - start
        if int(token) in stop:
            stopped = True
            break
        if step + 1 == max_new_tokens:
            break
        seq = torch.cat((seq, token[:, None]), dim=1)  # [1, L + step + 1]
        position = (kv.length + prompt.rope_deltas).long()  # [1, 1]: equal rows, so 1-D positions
        logits = model(token[:, None], None, kv, position_ids=position, routing=routing)[:, -1].float()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return Generation([new], [prompt.input_ids.shape[1]], time.perf_counter() - start, prefill, stopped=[stopped])


def synth_wav(path, seconds: float = 0.5, *, freq: float = 440.0, seed: int = 0) -> Path:
    """A 16 kHz mono 16-bit .wav: a sine with a little noise (written with the stdlib wave module)."""
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    x = 0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(seed).standard_normal(t.shape)
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLING_RATE)
        w.writeframes(pcm.tobytes())
    tmp.replace(path)
    return path


def synth_png(path, width: int = 64, height: int = 48, *, seed: int = 0) -> Path:
    """An RGB .png of smooth gradients and noise (written with Pillow)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), rng.random((height, width))], axis=-1)  # [h, w, 3]
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    Image.fromarray((rgb * 255).astype(np.uint8)).save(tmp, format="PNG")
    tmp.replace(path)
    return path
