"""Does the selective model compute what transformers computes? The selective model once with every hook recorded,
the reference streamed (omnilab.reference.streamed): chained and local views in bounded memory, in bf16 judged
against transformers' own bf16 noise (NOISE_FACTOR), bf16 near-tie flips set aside. `compare_checkpoints` is the
`omnilab compare` verb. Design: docs/DESIGN.md, "The reference".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd
import torch

from omnilab.dtypes import as_dtype
from omnilab.model.hooks import (DIVERGENCE_RTOL, EMBED, MLP_OUT, RESID_POST, RESID_PRE, ROUTER_LOGITS, TOPK_INDICES,
                                 TOPK_WEIGHTS, Comparison, compare_activations, layer_hook, parse_name,
                                 run_with_cache)

# A bf16 hook diverges where the selective model's error exceeds this many times transformers' own bf16-vs-fp32
# error at the same hook (and DIVERGENCE_RTOL[float32]).
NOISE_FACTOR = 4.0


@dataclass
class StreamedComparison:
    dtype: torch.dtype
    chained: Comparison
    local: Comparison
    noise: Comparison | None = None  # transformers bf16 vs fp32, chained (None in fp32)
    local_noise: Comparison | None = None  # the same, each layer on the selective model's input
    noise_factor: float = NOISE_FACTOR
    expert_budget_bytes: int | None = None
    peak_rss_bytes: int | None = None
    near_tie_flips: dict = dataclasses.field(default_factory=dict)  # view -> layer -> tokens set aside (bf16)
    against_fp32: Comparison | None = None  # bf16: the selective model against transformers fp32, chained
    layers: list | None = None  # the decoder layers the reference streamed

    @property
    def first_divergence(self) -> str | None:
        return self.chained.first_divergence

    @property
    def local_first_divergence(self) -> str | None:
        return self.local.first_divergence

    def routing(self) -> list[dict]:
        """Per MoE layer: top-k set agreement with the reference (chained, local) and of the reference's bf16
        with its fp32 (noise; None in fp32)."""
        def per_layer(c):
            if c is None:
                return {}
            return c.per_layer(TOPK_INDICES, "topk_agreement").to_dict()

        chained, local = per_layer(self.chained), per_layer(self.local)
        noise, local_noise = per_layer(self.noise), per_layer(self.local_noise)
        flips = self.near_tie_flips
        return [{"layer": int(layer), "topk_agreement": chained[layer], "local_topk_agreement": local.get(layer),
                 "noise_topk_agreement": noise.get(layer), "local_noise_topk_agreement": local_noise.get(layer),
                 "near_tie_flips": flips.get("chained", {}).get(layer),
                 "local_near_tie_flips": flips.get("local", {}).get(layer)}
                for layer in chained]

    def to_json(self) -> dict:
        """DESIGN.md's `omnilab compare --json`: the chained view keeps `hooks` / `first_divergence`."""
        local = self.local.to_json()
        out = {**self.chained.to_json(), "local_hooks": local["hooks"],
               "local_first_divergence": local["first_divergence"], "local_top1_agreement": local["top1_agreement"],
               "local_kl": local["kl"], "local_max_rel_err": local["max_rel_err"], "noise": None,
               "routing": self.routing(), "expert_budget_bytes": self.expert_budget_bytes,
               "peak_rss_bytes": self.peak_rss_bytes}
        if self.noise is not None:
            rows = lambda c: [{k: h[k] for k in ("name", "rel_err", "topk_agreement")} for h in c.to_json()["hooks"]]
            out["noise"] = {"factor": self.noise_factor, "floor": DIVERGENCE_RTOL[torch.float32],
                            "hooks": rows(self.noise), "local_hooks": rows(self.local_noise)}
        return out


def noise_thresholds(noise: Comparison, factor: float = NOISE_FACTOR) -> dict[str, float]:
    """Per hook: the rel_err above which the selective model diverges, given transformers' own bf16 error."""
    floor = DIVERGENCE_RTOL[torch.float32]
    return {row.name: max(factor * float(row.rel_err), floor) for row in noise.table.itertuples()}


def one_layer_budget(config, dtype) -> int:
    """Bytes of one MoE layer's experts in the compute dtype: the selective side's default budget in compare."""
    itemsize = torch.empty((), dtype=as_dtype(dtype)).element_size()
    return config.num_experts * 3 * config.moe_intermediate_size * config.hidden_size * itemsize


def window_names(config, layers) -> list[str]:
    """The hook names of a run of decoder layers, in forward order."""
    from omnilab.model.hooks import hook_names

    keep = {int(i) for i in layers}
    return [n for n in hook_names(config) if parse_name(n)[0] in keep]


@torch.no_grad()
def compare_streamed(selective_acts: dict, reference, input_ids, dtype, *, noise_factor: float = NOISE_FACTOR,
                     progress: bool = False, media: dict | None = None, layers=None) -> StreamedComparison:
    """Compare a capture of the selective model (hook name -> tensor, `run_with_cache`) with a
    StreamedReference on the same input_ids [1, T], both views; in bf16 with transformers' fp32 beside it.
    media: a multimodal prompt's processor tensors (StreamedReference.run). layers: a run of consecutive decoder
    layers to stream and compare instead of the whole model (StreamedReference.run)."""
    dtype = as_dtype(dtype)
    names = reference.hook_names() if layers is None else window_names(reference.config, layers)
    dtypes = [dtype] if dtype == torch.float32 else [dtype, torch.float32]
    run = reference.run(input_ids, dtypes, local_inputs=selective_acts, progress=progress, media=media,
                        layers=layers)
    noise = local_noise = against_fp32 = None
    thresholds = local_thresholds = keep = local_keep = None
    flips: dict = {}
    if dtype != torch.float32:
        noise = compare_activations(run.chained[torch.float32], run.chained[dtype], names=names)
        against_fp32 = compare_activations(run.chained[torch.float32], selective_acts, names=names)
        local_noise = compare_activations(run.local[torch.float32], run.local[dtype], names=names)
        thresholds = noise_thresholds(noise, noise_factor)
        local_thresholds = noise_thresholds(local_noise, noise_factor)
        keep, chained_flips = set_aside_near_ties(reference.config, run.chained[torch.float32], run.chained[dtype],
                                                  selective_acts, names, noise_factor)
        local_keep, local_flips = set_aside_near_ties(reference.config, run.local[torch.float32], run.local[dtype],
                                                      selective_acts, names, noise_factor)
        flips = {"chained": chained_flips, "local": local_flips}
    rtol = DIVERGENCE_RTOL.get(dtype, DIVERGENCE_RTOL[torch.float32])
    chained = compare_activations(run.chained[dtype], selective_acts, rtol=rtol, names=names, thresholds=thresholds,
                                  keep=keep)
    local = compare_activations(run.local[dtype], selective_acts, rtol=rtol, names=names,
                                thresholds=local_thresholds, keep=local_keep)
    return StreamedComparison(dtype, chained, local, noise, local_noise, noise_factor, near_tie_flips=flips,
                              against_fp32=against_fp32, layers=list(reference.streamed_layers))


@torch.no_grad()
def compare_decode(decoded: dict, reference, input_ids, start: int, dtype,
                   noise_factor: float = NOISE_FACTOR) -> pd.DataFrame:
    """Decode steps against transformers, layer by layer: `decoded` maps a label to a decoder's recorded residual
    stream (hook name -> [1, n, H], the positions start .. start + n - 1 of input_ids [T]; OffloadDecoder.generate's
    record_residuals), `reference` a StreamedReference run once over the whole of input_ids, chained.

    One row per hook (layer) with, per label, its relative error against transformers' fp32 (`<label>`) and, in
    bf16, transformers' own bf16-vs-fp32 error at the same positions (`noise`: the floor omnilab compare judges bf16
    by), the threshold (noise_factor x noise, at least the fp32 tolerance) and `<label> within` (error <= threshold)."""
    dtype = as_dtype(dtype)
    names = sorted({n for acts in decoded.values() for n in acts}, key=lambda n: parse_name(n)[0])
    steps = {acts[n].shape[1] for acts in decoded.values() for n in acts}
    if len(steps) != 1:
        raise ValueError(f"decoded residuals of {sorted(steps)} steps: compare one run's steps at a time")
    n = steps.pop()
    if start < 0 or start + n > torch.as_tensor(input_ids).reshape(-1).numel():
        raise ValueError(f"positions {start} .. {start + n - 1} lie outside input_ids")
    run = reference.run(input_ids, [dtype, torch.float32])
    at = lambda acts: {k: v[:, start:start + n] for k, v in acts.items() if k in names}  # noqa: E731  [1, n, H]
    fp32 = at(run.chained[torch.float32])
    table = pd.DataFrame({"hook": names, "layer": [parse_name(n)[0] for n in names]})
    if dtype == torch.float32:
        table["noise"] = float("nan")
        table["threshold"] = DIVERGENCE_RTOL[torch.float32]
    else:
        noise = compare_activations(fp32, at(run.chained[dtype]), names=names)
        table["noise"] = [float(v) for v in noise.table.set_index("name").rel_err[names]]
        thresholds = noise_thresholds(noise, noise_factor)
        table["threshold"] = [thresholds[n] for n in names]
    for label, acts in decoded.items():
        err = compare_activations(fp32, acts, names=names).table.set_index("name").rel_err
        table[label] = [float(err.get(n, float("nan"))) for n in names]
        table[f"{label} within"] = table[label] <= table["threshold"]
    return table


def near_tie_flips(ref32_logits, ref16_logits, ref_idx, sel_idx, factor: float = NOISE_FACTOR) -> torch.Tensor:
    """bool [N]: tokens whose selective top-k set differs from the reference's at a near-tie, i.e. where the
    reference's fp32 margin between its k-th and (k+1)-th logit is within factor x the token's largest
    bf16-vs-fp32 logit error. Logits [N, E], indices [N, k]."""
    k = ref_idx.shape[-1]
    # on the CPU, where the keep masks live (the activations may be on a GPU)
    ref_idx, sel_idx = ref_idx.cpu(), sel_idx.cpu()
    l32, l16 = ref32_logits.double().cpu(), ref16_logits.double().cpu()
    top = l32.topk(k + 1, dim=-1).values  # [N, k + 1]
    margin = top[:, k - 1] - top[:, k]  # [N]
    noise = (l16 - l32).abs().max(-1).values  # [N]
    flipped = (ref_idx.sort(-1).values != sel_idx.sort(-1).values).any(-1)  # [N]
    return flipped & (margin <= factor * noise)


def set_aside_near_ties(config, ref32: dict, ref16: dict, sel: dict, names, factor):
    """(keep: hook name -> bool [N] of the tokens compared there, flips: layer -> near-tie flips), one prompt.
    A near-tie flip is set aside at its own layer's hooks after the router, nowhere else."""
    n = ref16[EMBED].shape[1] if ref16[EMBED].ndim == 3 else ref16[EMBED].shape[0]
    keep, flips = {}, {}
    after_router = (TOPK_INDICES, TOPK_WEIGHTS, MLP_OUT, RESID_POST)
    aside = torch.zeros(n, dtype=torch.bool)
    for name in names:
        layer, point = parse_name(name)
        if point == RESID_PRE:
            aside = torch.zeros(n, dtype=torch.bool)
        if point == ROUTER_LOGITS:
            logits, idx = layer_hook(layer, ROUTER_LOGITS), layer_hook(layer, TOPK_INDICES)
            aside = near_tie_flips(ref32[logits], ref16[logits], ref16[idx], sel[idx], factor)
            flips[layer] = int(aside.sum())
        keep[name] = ~aside if layer is not None and point in after_router else torch.ones(n, dtype=torch.bool)
    return keep, flips


def check_same_text_model(config, ref_config, path, ref_path) -> None:
    """The selective and reference checkpoints must describe the same text model; else a one-line error."""
    a, b = dataclasses.asdict(config), dataclasses.asdict(ref_config)
    for key in a:
        if a[key] != b.get(key):
            raise ValueError(f"--reference {ref_path}: its text model differs from {path}'s: "
                             f"{key} is {b.get(key)!r} there, {a[key]!r} here")


def compare_checkpoints(path, input_ids, *, reference=None, dtype="float32", device="cpu",
                        expert_budget: int | None = None, faults=(), noise_factor: float = NOISE_FACTOR,
                        progress: bool = False, selective=None, layers=None) -> StreamedComparison:
    """The selective model on `path` against the streamed transformers reference on `reference` (default:
    `path`). expert_budget: bytes of experts the selective side holds (default: one layer's worth).
    The selective model is dropped once its activations are recorded, before the reference streams.

    selective: an already loaded selective model of `path` to record instead of loading one (a notebook's
    model: its dtype and device are used, `expert_budget` and `faults` are its own); its expert cache is
    emptied once the activations are recorded (the backbone stays), so the reference streams beside the
    backbone alone. layers: a run of consecutive decoder layers to stream and compare (StreamedReference.run).
    peak_rss_bytes: the peak anonymous RSS of the call (the process's, a given model included)."""
    from omnilab.checkpoint import Checkpoint
    from omnilab.memory import AnonPeak, release_memory
    from omnilab.model.decoder import SelectiveMoE
    from omnilab.reference.streamed import StreamedReference

    if selective is not None:
        if faults:
            raise ValueError("faults are options of the model: load `selective` with them, or pass no model")
        dtype, device = selective.dtype, selective.device
    dtype = as_dtype(dtype)
    with AnonPeak() as peak:
        checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(path)
        ref_checkpoint = checkpoint if reference is None or str(reference) == str(path) else Checkpoint(reference)
        config, _ = checkpoint.arch
        ref_config, _ = ref_checkpoint.arch
        check_same_text_model(config, ref_config, checkpoint.path, ref_checkpoint.path)
        input_ids = torch.as_tensor(input_ids).reshape(1, -1)
        if selective is None:
            budget = one_layer_budget(config, dtype) if expert_budget is None else expert_budget
            model = SelectiveMoE.from_checkpoint(checkpoint, dtype=dtype, device=device, expert_budget=budget,
                                                 faults=faults, tokenizer=False)
        else:
            model, budget = selective, selective.cache.budget_bytes
        _, acts = run_with_cache(model, input_ids.to(model.device))
        if selective is None:
            del model  # its backbone and experts are not needed while the reference streams
        else:
            model.cache.clear()  # experts are read again on demand; the backbone stays
            del model
        release_memory()
        ref = StreamedReference(ref_checkpoint, device=device)
        result = compare_streamed(acts, ref, input_ids, dtype, noise_factor=noise_factor, progress=progress,
                                  layers=layers)
    result.expert_budget_bytes = budget
    result.peak_rss_bytes = peak.peak
    return result


@torch.no_grad()
def reference_continuation(path, input_ids, new_token_ids, *, dtype="float32", device="cpu",
                           vocab_limit: int | None = None) -> dict:
    """Would transformers write the same greedy continuation? The reference streamed once over the prompt and
    the selective model's continuation (teacher-forced): at each new position its argmax given the same prefix.
    Greedy decoding is a function of the prefix, so where every earlier token agrees, transformers' own greedy
    run would write this token too: `identical` counts the leading tokens that agree, which is the length of
    the common prefix of the two greedy continuations (up to near-ties between KV-cached and full-sequence
    logits). -> {"identical", "reference" (the reference's argmax at each new position), "peak_rss_bytes"}."""
    from omnilab.checkpoint import Checkpoint
    from omnilab.memory import AnonPeak
    from omnilab.model.hooks import LOGITS
    from omnilab.reference.streamed import StreamedReference

    dtype = as_dtype(dtype)
    prompt = [int(t) for t in torch.as_tensor(input_ids).reshape(-1).tolist()]
    new = [int(t) for t in new_token_ids]
    with AnonPeak() as peak:
        ref = StreamedReference(path if isinstance(path, Checkpoint) else Checkpoint(path), device=device)
        run = ref.run(torch.tensor([prompt + new]), [dtype])
        logits = run.chained[dtype][LOGITS][0, len(prompt) - 1:len(prompt) - 1 + len(new)]  # [n, V]
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]
        theirs = logits.argmax(-1).tolist()
    identical = next((i for i, (a, b) in enumerate(zip(new, theirs)) if a != b), len(new))
    return {"identical": identical, "reference": theirs, "peak_rss_bytes": peak.peak}
