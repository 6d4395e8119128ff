"""The transformers reference streamed part by part (embedding, each decoder layer, final norm + lm_head), each
built on the meta device and filled by transformers' own loader, for checkpoints larger than memory; chained and
local views, several dtypes in one pass, multimodal prompts. Hook names and sites: omnilab.reference.whole.
Differs from transformers: in bf16 the towers' buffers are cast from fp32 values. Design: docs/DESIGN.md,
"The reference".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omnilab.arch import expected_tensors
from omnilab.checkpoint import Checkpoint
from omnilab.dtypes import STORED_DTYPES, as_dtype
from omnilab.model.hooks import EMBED, FINAL_NORM, LOGITS, RESID_POST, RESID_PRE, hook_names, layer_hook, layer_points
from omnilab.reference.whole import attach


class _Caught(Exception):
    """Raised by the pre-hook on the first decoder layer once it has its inputs."""

    def __init__(self, hidden_states, kwargs):
        self.hidden_states, self.kwargs = hidden_states, kwargs


@dataclass
class StreamedRun:
    """Activations of one streamed pass, per compute dtype: name -> tensor (on the CPU).
    local holds the local view (empty when no local inputs were given): every layer's hook_resid_pre is the
    local input itself there, and hook_embed (whose input is the token ids) is the chained one."""

    chained: dict[torch.dtype, dict[str, torch.Tensor]] = field(default_factory=dict)
    local: dict[torch.dtype, dict[str, torch.Tensor]] = field(default_factory=dict)


class StreamedReference:
    """transformers' model for a checkpoint, with its weights read from the shards one part at a time.

    `run(input_ids, dtypes, local_inputs)` -> StreamedRun. The model itself (`.hf`) stays on the meta
    device between parts; `config` / `layout` are omnilab.arch's, `hook_names()` the canonical names."""

    def __init__(self, path, *, device="cpu", attn_implementation: str = "eager"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig
        from transformers.conversion_mapping import get_model_conversion_mapping

        from omnilab.tokenizer import quiet_transformers

        self.checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(path)
        self.config, self.layout = self.checkpoint.arch
        self.device = torch.device(device)
        self.is_omni = self.layout.model_type == "qwen3_omni_moe"
        with quiet_transformers():
            hf_config = AutoConfig.from_pretrained(str(self.checkpoint.root), trust_remote_code=False)
        if self.is_omni:
            from transformers import Qwen3OmniMoeThinkerForConditionalGeneration as model_cls

            hf_config = getattr(hf_config, "thinker_config", hf_config)
            if not hasattr(hf_config, "vision_start_token_id"):
                hf_config.vision_start_token_id = 151652  # as omnilab.reference.whole sets it (transformers 5.23 lacks it)
        else:
            from transformers import AutoModelForCausalLM

            model_cls = AutoModelForCausalLM._model_mapping[type(hf_config)]
        # parameters on meta; buffers (rotary inv_freq) real, computed by the modules' own __init__
        with quiet_transformers(), init_empty_weights():
            self.hf = model_cls._from_config(hf_config, attn_implementation=attn_implementation)
        self.hf.eval().requires_grad_(False)
        for module in self.hf.modules():  # the real buffers go to the device; meta parameters stay meta
            for key, buf in module._buffers.items():
                if buf is not None and not buf.is_meta:
                    module._buffers[key] = buf.to(self.device)
        self.text = getattr(self.hf.model, "language_model", self.hf.model)
        self.towers = [self.hf.model.audio_tower, self.hf.model.visual] if self.is_omni else []
        # the towers' buffers (positional sinusoids, rotary inv_freq: none in the checkpoint) as their __init__
        # computed them in fp32; `load` casts a part to its dtype on disk, which would round them
        self._tower_buffers = [(module, key, buf.clone()) for tower in self.towers for module in tower.modules()
                               for key, buf in module._buffers.items() if buf is not None and not buf.is_meta]
        self.conversions = get_model_conversion_mapping(self.hf)
        self._parts = self._part_tensors()

    def hook_names(self) -> list[str]:
        return hook_names(self.config)

    # -- parts -----------------------------------------------------------------------------------------------
    def _part_tensors(self) -> dict:
        """'embed', layer index, 'final' -> the checkpoint tensor names that fill it."""
        parts: dict = {"embed": [], "final": []}
        for name, spec in expected_tensors(self.config, self.layout).items():
            if spec.layer is not None:
                parts.setdefault(spec.layer, []).append(name)
            else:
                parts["embed" if spec.component == "embed" else "final"].append(name)
        if self.config.tie_word_embeddings:  # lm_head is the embedding: load it again for the final part
            parts["final"] += parts["embed"]
        if self.is_omni:  # the thinker's towers, for multimodal prompts
            parts["towers"] = [n for n in self.checkpoint.tensors.index
                               if n.startswith(("thinker.audio_tower.", "thinker.visual."))]
        return parts

    def _modules(self, part) -> list[torch.nn.Module]:
        if part == "embed":
            return [self.text.embed_tokens]
        if part == "final":
            return [self.text.norm, self.hf.lm_head]
        if part == "towers":
            return list(self.towers)
        return [self.text.layers[part]]

    def _disk_dtype(self, names: list[str]) -> torch.dtype:
        """The part's dtype on disk when its tensors share one float dtype, else float32."""
        dtypes = set(self.checkpoint.tensors.loc[names, "dtype"])
        return STORED_DTYPES.get(dtypes.pop(), torch.float32) if len(dtypes) == 1 else torch.float32

    def load(self, part) -> torch.dtype:
        """Fill one part's modules from the shards through transformers' loader, in the dtype on disk.
        Raises KeyError naming the first tensor that is missing or did not load."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        from omnilab.tokenizer import quiet_transformers

        names = self._parts[part]
        if part == "towers" and not names:
            raise KeyError(f"{self.checkpoint.path}: no thinker.audio_tower.* / thinker.visual.* tensors for the towers")
        missing = [n for n in names if n not in self.checkpoint.tensors.index]
        if missing:
            raise KeyError(f"{self.checkpoint.path}: reference tensor {missing[0]} is missing")
        dtype = self._disk_dtype(names)
        modules = self._modules(part)
        for module in modules:
            module.to(dtype)  # meta parameters: transformers' loader takes the dtype of the empty parameter
        state = {}
        for name in names:  # slices, read when the loader materializes them, as from_pretrained passes them
            shard = self.checkpoint.tensors.at[name, "shard"]
            state[name] = self.checkpoint.open_shard(shard).get_slice(name)
        if part == "final" and self.config.tie_word_embeddings:
            state[self.layout.lm_head] = state.pop(self.layout.prefix + "embed_tokens.weight")
        config = LoadStateDictConfig(dtype=dtype, weight_mapping=self.conversions,
                                     device_map={"": str(self.device)})
        with quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(self.hf, state, config)
        if info.mismatched_keys:
            key, got, want = sorted(info.mismatched_keys)[0]
            raise KeyError(f"{self.checkpoint.path}: {key} has shape {list(got)}, the model needs {list(want)}")
        for module in modules:
            for pname, p in module.named_parameters():
                if p.is_meta:
                    raise KeyError(f"{self.checkpoint.path}: {type(module).__name__}.{pname} of part {part!r} "
                                   f"was not filled from the checkpoint")
        return dtype

    def free(self, part) -> None:
        for module in self._modules(part):
            module.to("meta")

    # -- running ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, input_ids, dtypes=(torch.float32,), local_inputs: dict | None = None,
            progress: bool = False, media: dict | None = None, layers=None) -> StreamedRun:
        """One pass over the parts. input_ids [B, T] (or [T]). local_inputs: the selective model's activations
        (hook name -> tensor), of which hook_embed, every blocks.{i}.hook_resid_pre and the last layer's
        hook_resid_post are used; None: chained view only. media: the processor's other tensors of a multimodal
        prompt (attention_mask, input_features, feature_attention_mask, pixel_values, image_grid_thw, ...),
        passed to the thinker's forward with the towers loaded.

        layers: a run of consecutive decoder layers to stream instead of all of them (None: every layer). The
        chained view then starts at the first of them from the selective model's input there
        (local_inputs[blocks.{first}.hook_resid_pre]: what the reference computes up to that layer, when the
        layers before it agree); the embedding still runs (it gives the layers their mask, positions and
        rotary tables), the final norm and lm_head only when the run reaches the last layer. The layers
        streamed are in `self.streamed_layers`."""
        media = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in (media or {}).items()
                 if k not in ("input_ids", "num_audio_tokens")}
        if media and not self.is_omni:
            raise ValueError(f"{self.checkpoint.path}: audio / image input needs a Qwen3-Omni checkpoint")
        multimodal = any(k in media for k in ("input_features", "pixel_values", "pixel_values_videos"))
        input_ids = torch.as_tensor(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        input_ids = input_ids.to(self.device)
        dtypes = list(dict.fromkeys(as_dtype(d) for d in dtypes))
        if len(dtypes) > 2:
            raise ValueError("a streamed pass runs at most two dtypes (each part is cast once from its dtype on disk)")
        out = StreamedRun({d: {} for d in dtypes}, {d: {} for d in dtypes} if local_inputs is not None else {})
        n_layers = self.config.num_hidden_layers
        window = list(range(n_layers)) if layers is None else sorted({int(i) for i in layers})
        if layers is not None:
            if not window or window[0] < 0 or window[-1] >= n_layers or window != list(range(window[0], window[-1] + 1)):
                raise ValueError(f"layers {window}: a run of consecutive layers in 0..{n_layers - 1}")
            if window[0] > 0 and (local_inputs is None or layer_hook(window[0], RESID_PRE) not in local_inputs):
                raise ValueError(f"layers from {window[0]}: the chained view starts from local_inputs"
                                 f"[{layer_hook(window[0], RESID_PRE)!r}], which was not given")
        final = not window or window[-1] == n_layers - 1
        self.streamed_layers = window
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(window) + 1 + final, desc="reference", unit="part")

        # embedding, and what the text model hands its first layer (mask, positions, rotary), per dtype
        h, kwargs, deepstack = {}, {}, {}
        load_dtype = self.load("embed")
        if multimodal:
            self.load("towers")
        for d in _load_first(dtypes, load_dtype):
            self.text.embed_tokens.to(d)
            for tower in self.towers if multimodal else ():
                tower.to(d)
            # the buffers from their fp32 values, not from the disk dtype's rounding (fp32: as from_pretrained;
            # differs from transformers in bf16, whose from_pretrained computes them under a bf16 default dtype)
            if multimodal:
                for module, key, buf in self._tower_buffers:
                    module._buffers[key] = buf.to(self.device, d if buf.is_floating_point() else buf.dtype)
            h[d], kwargs[d], deepstack[d] = self._first_layer_inputs(input_ids, media)
            out.chained[d][EMBED] = _cpu(h[d])
            if local_inputs is not None:  # the embedding's input is the token ids: its local view is the chained one
                out.local[d][EMBED] = out.chained[d][EMBED]
        self.free("embed")
        if multimodal:
            self.free("towers")
        _tick(bar)

        if window and window[0] > 0:  # the chain starts at the window from the selective model's input there
            for d in dtypes:
                h[d] = local_inputs[layer_hook(window[0], RESID_PRE)].to(self.device, d)
        for i in window:
            load_dtype = self.load(i)
            layer = self.text.layers[i]
            for d in _load_first(dtypes, load_dtype):
                layer.to(d)
                h[d] = self._run_layer(i, layer, h[d], kwargs[d], out.chained[d])
                masks, embeds = deepstack[d]
                if embeds is not None and i < len(embeds):  # as the text model's loop adds it after layer i
                    h[d] = self.text._deepstack_process(h[d], masks, embeds[i])
                if local_inputs is not None:
                    x = local_inputs[layer_hook(i, RESID_PRE)].to(self.device, d)
                    self._run_layer(i, layer, x, kwargs[d], out.local[d])
            self.free(i)
            _tick(bar)

        if final:
            load_dtype = self.load("final")
            last = layer_hook(n_layers - 1, RESID_POST) if n_layers else EMBED
            for d in _load_first(dtypes, load_dtype):
                self.text.norm.to(d)
                self.hf.lm_head.to(d)
                self._run_final(h[d], out.chained[d])
                if local_inputs is not None:
                    self._run_final(local_inputs[last].to(self.device, d), out.local[d])
            self.free("final")
            _tick(bar)
        if bar is not None:
            bar.close()
        return out

    def _first_layer_inputs(self, input_ids, media: dict | None = None):
        """The model's own forward, from the embedding (and the towers, with `media`) to the first decoder
        layer's inputs: (hidden states, the layer's kwargs, (visual_pos_masks, deepstack_visual_embeds) as the
        text model was given them, or (None, None))."""
        seen = {}

        def catch(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            raise _Caught(hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"})

        def read_deepstack(module, args, kwargs):
            seen.update(masks=kwargs.get("visual_pos_masks"), embeds=kwargs.get("deepstack_visual_embeds"))

        if self.is_omni:
            self.hf.model.rope_deltas = None  # the thinker keeps M-RoPE deltas between calls
        handles = [self.text.layers[0].register_forward_pre_hook(catch, with_kwargs=True),
                   self.text.register_forward_pre_hook(read_deepstack, with_kwargs=True)]
        try:
            self.hf(input_ids=input_ids, use_cache=False, **(media or {}))
        except _Caught as caught:
            return caught.hidden_states, caught.kwargs, (seen.get("masks"), seen.get("embeds"))
        finally:
            for handle in handles:
                handle.remove()
        raise RuntimeError("the text model's forward never reached its first decoder layer")

    def _run_layer(self, i: int, layer, x, kwargs, acts: dict) -> torch.Tensor:
        """One decoder layer on x [B, T, H] with the text model's kwargs, recording its hook points."""
        inner = [p for p in layer_points(self.config, i) if p not in (RESID_PRE, RESID_POST)]
        handles = [attach(layer, p, _recorder(acts, layer_hook(i, p))) for p in inner]
        try:
            acts[layer_hook(i, RESID_PRE)] = _cpu(x)
            y = layer(x, **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            acts[layer_hook(i, RESID_POST)] = _cpu(y)
        finally:
            for handle in handles:
                handle.remove()
        return y

    def _run_final(self, x, acts: dict) -> None:
        """The text model's final norm and the CausalLM's lm_head (every position), as their forwards apply them."""
        x = self.text.norm(x)  # [B, T, H]
        acts[FINAL_NORM] = _cpu(x)
        acts[LOGITS] = _cpu(self.hf.lm_head(x))  # [B, T, V]


def _load_first(dtypes: list[torch.dtype], load_dtype: torch.dtype) -> list[torch.dtype]:
    """The order of a part's runs: the dtype it was loaded in first, then the wider before the narrower, so that
    each cast gives what a cast of the values on disk gives (a widening cast is exact)."""
    return sorted(dtypes, key=lambda d: (d != load_dtype, -torch.empty((), dtype=d).element_size()))


def _recorder(acts: dict, name: str):
    def record(x):
        acts[name] = _cpu(x)

    return record


def _cpu(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", copy=True)


def _tick(bar) -> None:
    if bar is not None:
        bar.update(1)
