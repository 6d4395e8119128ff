"""Modality routing: the same prompts as text, as speech and as an image, through the selective thinker; which
experts each modality uses, and what masking the experts most specific to one modality costs each modality.

The routing statistics are omnilab.experiments.routing's, on a trace in its format whose `domain` is the modality and whose
`doc` is one *segment*: the content positions of one prompt in one form (the prompt's text tokens; the audio
tower's frames at the `<|audio_pad|>` rows; the vision tower's merged patches at the `<|image_pad|>` rows). So
I(modality; expert) against labels shuffled between segments (`routing.specialization`) keeps each segment's own
correlation in the baseline, as notebook 04's domain baseline keeps each document's. Added here:

- `expert_modality_table`: per layer and expert, P(expert | modality) for each modality and the modality-balanced
  share of its use that each modality makes (shares sum to 1: a token-count-free view of "whose expert is it");
- `single_modality_experts`: experts of which one modality makes at least `threshold` of that balanced use,
  counted per layer, against the same count with modality labels shuffled between segments;
- `modality_overlap`: per layer and modality pair, how alike the two modalities' expert loads are
  (Bhattacharyya coefficient, 1 = the same distribution) and their co-activation structures (correlation of the
  P(b | a) matrices, routing.coactivation, within each modality), each against shuffled labels;
- the causal test (`masking_experiment`): the routing statistics are correlational, so the `n` experts per layer
  most specific to a modality (`specific_experts`: the largest excess of its P(expert | modality) over any other
  modality's) are masked out of the router (omnilab.model.faults.RouterMask, applied with omnilab.experiments.sweeps.applied), and
  every form's answer is scored teacher-forced (negative log-likelihood, token accuracy, exact answers), with the
  perplexity of held-out text documents; masks of the same size drawn at random, and of the experts most
  specific to text, are the controls.

Teacher-forced exact answers are greedy answers: the greedy continuation starts with the answer exactly when
the argmax at every answer position is the answer's token (tests/test_modality.py checks it against
omnilab.model.multimodal.generate).

Inputs (`load_manifest`): a folder with manifest.jsonl, rows {"id", "kind": "sum" | "sentence", "text", "answer",
"voice", "speed", "wav", "png", "split"} (wav and png relative to the folder), as data/eval/multimodal/ holds
them. The prompt around each form is `PROMPTS[kind][form]` (the answer follows it), the format omni-tiny is
trained on (scripts/train_tiny.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from omnilab.model import multimodal as mm
from omnilab.experiments import routing
from omnilab.trace.record import concat_traces, router_entropy, trace_rows

MODALITIES = ("text", "audio", "image")
MANIFEST = "manifest.jsonl"
MANIFEST_KEYS = ("id", "kind", "text", "wav", "png")  # and "answer" for sums
EOS = "<|endoftext|>"

# kind -> form -> (prompt, answer, content): the text around the media (omnilab.model.multimodal.prompt_text puts the
# media's placeholders in front of it), what is scored after it ({text}: the item's text, {answer}: its answer),
# and whose routing the trace records ("media": the placeholder rows, "prompt" / "answer": that part's text
# tokens). The media prompts are tasks omni-tiny is trained on (scripts/train_multimodal.py): a medium alone ->
# its text and <|endoftext|> (transcribe / read), for a sum too ("35 + 15"): of its trained tasks omni-tiny does
# this one (model card: spoken sums 83% exact in a trained voice) and not the spoken answer (" =" -> " 50", 0%).
# As text, a sum is the arithmetic line "47 + 38 =" -> " 85" and a sentence is read as a document (after
# <|endoftext|>, as the corpus separates documents): its own tokens, scored as language modelling.
PROMPTS = {
    "sum": {"text": ("{text} =", " {answer}", "prompt"),
            "audio": ("", "{text}" + EOS, "media"), "image": ("", "{text}" + EOS, "media")},
    "sentence": {"text": (EOS, "{text}", "answer"),
                 "audio": ("", "{text}" + EOS, "media"), "image": ("", "{text}" + EOS, "media")},
}


# -- inputs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One evaluation row: the same content as text, as speech (wav) and as an image (png)."""

    id: str
    kind: str
    text: str
    answer: str  # a sum's result; "" for a sentence (its answer is its text)
    wav: Path
    png: Path
    voice: str = ""
    speed: float | None = None
    split: str = ""


def tower_bytes(checkpoint, dtype) -> int:
    """Bytes of the thinker's audio and vision towers (thinker.audio_tower.*, thinker.visual.*) in `dtype`."""
    from omnilab.checkpoint import Checkpoint
    from omnilab.dtypes import as_dtype

    checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    t = checkpoint.tensors
    towers = t[t.index.str.startswith(("thinker.audio_tower.", "thinker.visual."))]
    numel = sum(math.prod(shape) for shape in towers["shape"])
    return int(numel * torch.empty((), dtype=as_dtype(dtype)).element_size())


def budget_beside_towers(checkpoint, expert_budget="auto", device="auto", dtype="auto"):
    """The expert budget for a thinker whose towers sit beside it (notebook 06): "auto" resolves as omnilab.runtime
    does (every expert when they fit the free memory, else what fits), with the towers counted as resident beside
    the backbone, so that towers, backbone and experts fit together; any other value as given. -> (budget for
    omnilab.runtime's load: bytes, or "all" when every expert fits; the towers' bytes)."""
    from omnilab.checkpoint import Checkpoint
    from omnilab.runtime import hardware

    checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    dev = hardware.resolve_device(device)
    dt = hardware.resolve_dtype(dtype, checkpoint, dev)
    towers = tower_bytes(checkpoint, dt)
    if str(expert_budget) != "auto":
        return expert_budget, towers
    sizes = hardware.model_bytes(checkpoint, dt)
    budget = hardware.resolve_budget("auto", all_experts_bytes=sizes["experts"],
                                     resident_bytes=sizes["backbone"] + towers, device=dev)
    return ("all" if budget is None else budget), towers


def load_manifest(folder, *, split: str | None = None, per_kind: int | None = None) -> list[Item]:
    """The rows of FOLDER/manifest.jsonl (in file order), the first `per_kind` of each kind, of one `split`
    (None: every row). Errors name the file, the line and what is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest (the multimodal evaluation set: {MANIFEST} with "
                                f"speech/*.wav and image/*.png beside it)")
    items, seen = [], {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        missing = [k for k in MANIFEST_KEYS + (("answer",) if row.get("kind") == "sum" else ()) if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: row has no {missing[0]!r} (needs {', '.join(MANIFEST_KEYS)}, and "
                             f"'answer' for a sum)")
        if row["kind"] not in PROMPTS:
            raise ValueError(f"{path}:{n}: kind {row['kind']!r} is not one of {sorted(PROMPTS)}")
        if split is not None and row.get("split") != split:
            continue
        if per_kind is not None and seen.get(row["kind"], 0) >= per_kind:
            continue
        for key in ("wav", "png"):
            if not (folder / row[key]).is_file():
                raise FileNotFoundError(f"{path}:{n}: {key} {row[key]!r}: {folder / row[key]} does not exist")
        seen[row["kind"]] = seen.get(row["kind"], 0) + 1
        items.append(Item(id=str(row["id"]), kind=row["kind"], text=str(row["text"]), answer=str(row.get("answer", "")),
                          wav=folder / row["wav"], png=folder / row["png"], voice=str(row.get("voice", "")),
                          speed=row.get("speed"), split=str(row.get("split", ""))))
    if not items:
        raise ValueError(f"{path}: no rows" + (f" of split {split!r}" if split is not None else ""))
    return items


@dataclass
class FormPrompt:
    """One item in one form, prepared for the selective model with its answer appended (teacher forcing)."""

    item: Item
    form: str  # "text", "audio" or "image"
    prompt: mm.MultimodalPrompt  # prompt + answer tokens: [1, T]
    content: torch.Tensor  # [T] bool: the content positions whose routing the trace records
    answer_start: int  # the first answer position
    answer_ids: list[int]


def extend(model, prompt: mm.MultimodalPrompt, ids: list[int]) -> mm.MultimodalPrompt:
    """The prompt with text tokens `ids` appended, positioned as omnilab.model.multimodal.generate decodes them: each
    new token's three M-RoPE rows equal, at its index plus the prompt's rope delta."""
    B, T = prompt.input_ids.shape
    if B != 1:
        raise ValueError("extend takes one prompt at a time")
    device = prompt.input_ids.device
    new = torch.tensor([ids], dtype=prompt.input_ids.dtype, device=device)  # [1, n]
    with torch.no_grad():
        embeds = model.model.embed_tokens(new).to(prompt.inputs_embeds.dtype)  # [1, n, H]
    position = (torch.arange(T, T + len(ids), device=device)[None] + prompt.rope_deltas.to(device)).long()  # [1, n]
    position_ids = torch.cat((prompt.position_ids, position[None].expand(3, -1, -1)), dim=2)  # [3, 1, T + n]
    deepstack = None
    if prompt.deepstack is not None:
        visual, features = prompt.deepstack
        visual = torch.cat((visual, torch.zeros_like(new, dtype=torch.bool)), dim=1)  # [1, T + n]
        deepstack = (visual, features)
    return mm.MultimodalPrompt(torch.cat((prompt.input_ids, new), dim=1),
                               torch.cat((prompt.attention_mask, torch.ones_like(new)), dim=1),
                               torch.cat((prompt.inputs_embeds, embeds), dim=1), position_ids,
                               prompt.rope_deltas, deepstack, prompt.inputs)


def form_prompt(model, towers, processor, item: Item, form: str, prompts: dict | None = None) -> FormPrompt:
    """`item` as `form` ("text", "audio", "image"): its prompt through the processor and the towers
    (omnilab.model.multimodal.process / prepare), the answer's tokens appended."""
    if form not in MODALITIES:
        raise ValueError(f"form {form!r} is not one of {MODALITIES}")
    around, answer, where = (prompts or PROMPTS)[item.kind][form]
    text = around.format(text=item.text, answer=item.answer)
    audio = [mm.read_wav(item.wav)] if form == "audio" else None
    images = [mm.read_image(item.png)] if form == "image" else None
    text = mm.prompt_text(text, audio=audio is not None, image=images is not None)
    inputs = mm.process(processor, towers.config, text, audio=audio, images=images)
    prepared = mm.prepare(model, towers, inputs)
    answer_ids = processor.tokenizer(answer.format(text=item.text, answer=item.answer))["input_ids"]
    if not answer_ids:
        raise ValueError(f"item {item.id}: empty answer")
    start = prepared.input_ids.shape[1]
    ids = torch.cat((prepared.input_ids[0].cpu(), torch.tensor(answer_ids, dtype=prepared.input_ids.dtype)))  # [T + n]
    cfg = towers.config
    special = torch.tensor(sorted(set(processor.tokenizer.all_special_ids)), dtype=ids.dtype)
    part = torch.arange(ids.numel()) < start  # [T + n]: True in the prompt, False in the answer
    if where == "media":
        content = ids == (cfg.audio_token_id if form == "audio" else cfg.image_token_id)
    elif where in ("prompt", "answer"):  # that part's text tokens, the tokenizer's special ones left out
        content = ~torch.isin(ids, special) & (part if where == "prompt" else ~part)
    else:
        raise ValueError(f"prompt for {item.kind} as {form}: content {where!r} is not media, prompt or answer")
    return FormPrompt(item, form, extend(model, prepared, answer_ids), content, start, answer_ids)


def build_prompts(model, towers, processor, items: list[Item], forms=MODALITIES, prompts: dict | None = None,
                  progress: bool = False) -> list[FormPrompt]:
    """Every item in every form, item by item; the text and image forms once per distinct (kind, text) (rows
    that differ only in the voice share them), speech once per row. The towers run here, once: the prepared
    prompts are reused by every masked run (masking the decoder's experts leaves the towers' features alone)."""
    from tqdm.auto import tqdm

    out, seen = [], set()
    for item in tqdm(items, desc="prompts", unit="item", disable=not progress):
        for form in forms:
            key = (form, item.kind, item.text)
            if form != "audio" and key in seen:
                continue
            seen.add(key)
            out.append(form_prompt(model, towers, processor, item, form, prompts))
    return out


# -- running: answers and routing -----------------------------------------------------------------------------------


def _routing_names(model) -> list[str]:
    return [f"blocks.{i}.mlp.hook_{p}" for i in model.config.moe_layers
            for p in ("topk_indices", "topk_weights", "router_logits")]


def collate(model, prompts: list[FormPrompt]) -> tuple[mm.MultimodalPrompt, list[int]]:
    """Prepared prompts -> one left-padded batch (SelectiveMoE's padding convention: attention_mask 0 on the
    left) and each prompt's padding length. Padding rows hold token 0's embedding at position 0; the deepstack
    features are joined in batch order, which is the row-major order of the visual rows they are added to."""
    lengths = [fp.prompt.input_ids.shape[1] for fp in prompts]
    T, B = max(lengths), len(prompts)
    first = prompts[0].prompt
    device, dtype = first.inputs_embeds.device, first.inputs_embeds.dtype
    pad_embed = model.model.embed_tokens.weight[0].to(dtype)  # [H]
    ids = torch.zeros(B, T, dtype=first.input_ids.dtype, device=device)  # [B, T]
    mask = torch.zeros(B, T, dtype=first.attention_mask.dtype, device=device)  # [B, T]
    embeds = pad_embed.expand(B, T, -1).clone()  # [B, T, H]
    positions = torch.zeros(3, B, T, dtype=first.position_ids.dtype, device=device)  # [3, B, T]
    visual = torch.zeros(B, T, dtype=torch.bool, device=device)  # [B, T]
    stacks = [fp.prompt.deepstack for fp in prompts if fp.prompt.deepstack is not None]
    depth = {len(f) for _, f in stacks}
    if len(depth) > 1:
        raise ValueError(f"prompts with different deepstack depths {sorted(depth)} in one batch")
    pads = []
    for b, (fp, t) in enumerate(zip(prompts, lengths)):
        p, pad = fp.prompt, T - t
        pads.append(pad)
        ids[b, pad:] = p.input_ids[0]
        mask[b, pad:] = p.attention_mask[0]
        embeds[b, pad:] = p.inputs_embeds[0]
        positions[:, b, pad:] = p.position_ids[:, 0]
        if p.deepstack is not None:
            visual[b, pad:] = p.deepstack[0][0]
    deepstack = None
    if stacks:
        deepstack = (visual, [torch.cat([f[j] for _, f in stacks]) for j in range(depth.pop())])  # [n_visual, H] each
    rope = torch.stack([fp.prompt.rope_deltas[0] for fp in prompts])  # [B, 1]
    return mm.MultimodalPrompt(ids, mask, embeds, positions, rope, deepstack, {}), pads


@torch.no_grad()
def run_prompts(model, prompts: list[FormPrompt], *, record: bool = True, batch_size: int = 16, routing=None):
    """Forward passes over the prompts, `batch_size` at a time (left-padded, `collate`; similar lengths
    together). Returns (scores, trace): scores has one row per prompt, in order (id, kind, form, voice,
    answer_tokens, answer_nll: mean nats per answer token, token_accuracy: share of answer tokens that are the
    argmax, exact: all of them), trace the content positions' routing (routing's format: doc = the prompt's
    number, domain = its form; plus `item` and `kind`), or None with record=False."""
    from omnilab.model.hooks import capture

    layers = list(model.config.moe_layers)
    names = _routing_names(model) if record else []
    rows, parts = {}, {}
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].prompt.input_ids.shape[1])
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch, pads = collate(model, [prompts[i] for i in chunk])
        with capture(model, names) as acts:
            logits = mm.forward(model, batch, routing=routing).float()  # [B, T, V]
        B, T = batch.input_ids.shape
        routed = {point: torch.stack([acts[f"blocks.{i}.mlp.hook_{point}"].reshape(B, T, -1) for i in layers])
                  for point in ("topk_indices", "topk_weights", "router_logits")} if record else {}  # [L, B, T, .]
        for b, (doc, pad) in enumerate(zip(chunk, pads)):
            fp = prompts[doc]
            n = len(fp.answer_ids)
            at = pad + fp.answer_start - 1
            predicted = logits[b, at:at + n]  # [n, V]: the positions before each answer token
            target = torch.tensor(fp.answer_ids, device=predicted.device)
            nll = F.cross_entropy(predicted, target, reduction="none")  # [n]
            right = predicted.argmax(-1) == target  # [n]
            rows[doc] = dict(id=fp.item.id, kind=fp.item.kind, form=fp.form,
                             voice=fp.item.voice if fp.form == "audio" else "", answer_tokens=n,
                             answer_nll=float(nll.mean()), token_accuracy=float(right.float().mean()),
                             exact=bool(right.all()))
            if record:
                keep = torch.zeros(T, dtype=torch.bool)
                keep[pad:] = fp.content  # [T]

                def stack(point, b=b, keep=keep):  # [L, content, .]
                    x = routed[point][:, b][:, keep.to(routed[point].device)].cpu()
                    return (x.float() if x.is_floating_point() else x).numpy()

                part = trace_rows(doc, fp.form, fp.prompt.input_ids[0].cpu()[fp.content].numpy(),
                                          stack("topk_indices"), stack("topk_weights"),
                                          router_entropy(stack("router_logits")), layers=layers)
                part["item"], part["kind"] = fp.item.id, fp.item.kind
                parts[doc] = part
    scores = pd.DataFrame([rows[i] for i in range(len(prompts))])
    if not record:
        return scores, None
    trace = concat_traces([parts[i] for i in range(len(prompts))], num_experts=model.config.num_experts,
                                  top_k=model.config.num_experts_per_tok, num_layers=len(layers))
    trace["domain"] = trace["domain"].cat.set_categories([m for m in MODALITIES if m in set(trace["domain"])])
    return scores, trace


# -- statistics --------------------------------------------------------------------------------------------------


def _num_experts(trace) -> int:
    return int(trace.attrs["num_experts"]) if "num_experts" in trace.attrs else int(trace["expert"].max()) + 1


def _modalities(trace) -> list[str]:
    present = set(trace["domain"].astype(str))
    return [m for m in MODALITIES if m in present] + sorted(present - set(MODALITIES))


def _shuffled(trace: pd.DataFrame, rng) -> pd.DataFrame:
    """The trace with its segments' modality labels permuted between segments (attrs kept)."""
    docs = trace.drop_duplicates("doc")[["doc", "domain"]]
    labels = docs["domain"].to_numpy()[rng.permutation(len(docs))]
    out = trace.copy()
    out["domain"] = pd.Categorical(pd.Series(labels, index=docs["doc"].to_numpy()).loc[trace["doc"]].to_numpy(),
                                   categories=trace["domain"].cat.categories)
    out.attrs.update(trace.attrs)
    return out


def _subset(trace: pd.DataFrame, modality: str) -> pd.DataFrame:
    out = trace[trace["domain"] == modality]
    out.attrs.update(trace.attrs)
    return out


def expert_modality_table(trace: pd.DataFrame) -> pd.DataFrame:
    """(layer, expert) rows: load_<m> = P(expert | modality m) (the share of m's assignments at that layer),
    share_<m> = load_<m> / sum over modalities of load (each modality weighted alike, whatever its token count),
    assignments (all modalities), dominant (the modality of the largest share) and dominant_share."""
    mods = _modalities(trace)
    table = routing.domain_expert(trace)  # (layer, modality) x expert: P(expert | modality)
    load = table.stack().unstack(level=1).reindex(columns=mods).fillna(0.0)  # (layer, expert) x modality
    load.index = load.index.set_names(["layer", "expert"])
    total = load.sum(axis=1)
    share = load.div(total.where(total > 0), axis=0).fillna(0.0)
    out = pd.concat({**{f"load_{m}": load[m] for m in mods}, **{f"share_{m}": share[m] for m in mods}}, axis=1)
    counts = trace.groupby(["layer", "expert"]).size()
    out["assignments"] = counts.reindex(out.index, fill_value=0).to_numpy()
    out["dominant"] = share.idxmax(axis=1).where(total > 0, "")
    out["dominant_share"] = share.max(axis=1)
    return out


def _single_counts(table: pd.DataFrame, mods, threshold: float, min_load: float) -> pd.DataFrame:
    served = table[[f"load_{m}" for m in mods]].max(axis=1) >= min_load  # the expert carries some real load
    rows = {}
    for m in mods:
        rows[m] = ((table[f"share_{m}"] >= threshold) & served).groupby(level="layer").sum()
    return pd.DataFrame(rows)


def single_modality_experts(trace: pd.DataFrame, *, threshold: float = 0.9, min_load: float | None = None,
                            shuffles: int = 8, seed: int = 0) -> pd.DataFrame:
    """Per layer, the experts serving one modality: at least `threshold` of their modality-balanced use
    (share_<m> of expert_modality_table) from modality m, among experts with P(expert | some modality) >=
    `min_load` (default 1 / (4 E): a quarter of a uniform router's share). Columns <m>: the
    count, baseline_<m>: its mean over `shuffles` shufflings of the segments' modality labels."""
    E = _num_experts(trace)
    min_load = 1.0 / (4 * E) if min_load is None else min_load
    mods = _modalities(trace)
    observed = _single_counts(expert_modality_table(trace), mods, threshold, min_load)
    rng = np.random.default_rng(seed)
    base = [_single_counts(expert_modality_table(_shuffled(trace, rng)), mods, threshold, min_load)
            for _ in range(shuffles)]
    out = observed.copy()
    for m in mods:
        out[f"baseline_{m}"] = np.mean([b[m].to_numpy() for b in base], axis=0) if base else np.nan
    out["experts"] = E
    return out


def _overlaps(trace: pd.DataFrame, mods, layers) -> dict:
    """{(layer, a, b): (Bhattacharyya coefficient of the loads, correlation of the co-activation matrices)}."""
    table = routing.domain_expert(trace)
    out = {}
    subs = {m: _subset(trace, m) for m in mods}
    for layer in layers:
        co = {m: routing.coactivation(subs[m], layer).to_numpy() for m in mods}
        for i, a in enumerate(mods):
            for b in mods[i + 1:]:
                pa, pb = table.loc[(layer, a)].to_numpy(), table.loc[(layer, b)].to_numpy()
                bc = float(np.sqrt(pa * pb).sum())
                used = (pa > 0) & (pb > 0)  # rows (expert a of the pair) used by both modalities
                x, y = co[a][used][:, used].reshape(-1), co[b][used][:, used].reshape(-1)
                r = float(np.corrcoef(x, y)[0, 1]) if x.size > 2 and x.std() > 0 and y.std() > 0 else np.nan
                out[layer, a, b] = (bc, r)
    return out


def modality_overlap(trace: pd.DataFrame, *, shuffles: int = 4, seed: int = 0) -> pd.DataFrame:
    """Per layer and modality pair (rows: layer, pair "a-b"): load_overlap = sum_e sqrt(P(e | a) P(e | b))
    (Bhattacharyya coefficient: 1 for the same expert load, 0 for disjoint experts) and coactivation_corr =
    the correlation between the two modalities' P(b | a) co-activation matrices over the experts both use;
    baseline_* = the same with the segments' modality labels shuffled (what sampling alone gives)."""
    mods = _modalities(trace)
    layers = routing.layers_of(trace)
    observed = _overlaps(trace, mods, layers)
    rng = np.random.default_rng(seed)
    base = [_overlaps(_shuffled(trace, rng), mods, layers) for _ in range(shuffles)]
    rows = []
    for (layer, a, b), (bc, r) in observed.items():
        rows.append(dict(layer=layer, pair=f"{a}-{b}", load_overlap=bc,
                         baseline_load_overlap=float(np.mean([s[layer, a, b][0] for s in base])) if base else np.nan,
                         coactivation_corr=r,
                         baseline_coactivation_corr=float(np.nanmean([s[layer, a, b][1] for s in base]))
                         if base and not all(np.isnan(s[layer, a, b][1]) for s in base) else np.nan))
    return pd.DataFrame(rows).set_index(["layer", "pair"])


def specific_experts(table: pd.DataFrame, modality: str, n: int) -> dict[int, list[int]]:
    """Per layer, the `n` experts most specific to `modality`: the largest load_<modality> - max over the other
    modalities of load_<m> (P(expert | modality) in excess of any other modality's), ties by expert number."""
    mods = [c.removeprefix("load_") for c in table.columns if c.startswith("load_")]
    if modality not in mods:
        raise ValueError(f"modality {modality!r} is not in the trace (it has {mods})")
    others = [f"load_{m}" for m in mods if m != modality]
    score = table[f"load_{modality}"] - (table[others].max(axis=1) if others else 0.0)
    out = {}
    for layer, s in score.groupby(level="layer"):
        s = s.droplevel("layer")
        order = sorted(s.index, key=lambda e: (-s[e], e))
        out[int(layer)] = [int(e) for e in order[:n]]
    return out


def random_experts(layers, num_experts: int, n: int, seed: int = 0) -> dict[int, list[int]]:
    """Per layer, `n` distinct experts drawn at random (the control mask)."""
    rng = np.random.default_rng(seed)
    return {int(layer): sorted(int(e) for e in rng.choice(num_experts, size=n, replace=False)) for layer in layers}


def mask_setting(name: str, masked: dict[int, list[int]], num_experts: int, budget_share: float | None = None):
    """An omnilab.experiments.sweeps.Setting whose routers never pick the `masked` experts of each layer (one
    omnilab.model.faults.RouterMask per layer, keeping the others). budget_share: the expert cache's budget as a
    share of all expert bytes (None: every expert may stay resident)."""
    from omnilab.model.faults import RouterMask
    from omnilab.experiments.sweeps import Setting

    faults = tuple(RouterMask(tuple(e for e in range(num_experts) if e not in set(experts)), layer=int(layer))
                   for layer, experts in masked.items())
    return Setting(name, "mask", value=float(np.mean([len(v) for v in masked.values()])), faults=faults,
                   budget_share=budget_share)


def masked_share(table: pd.DataFrame, masked: dict[int, list[int]]) -> dict[str, float]:
    """Per modality, the share of its routing assignments (in the unmasked model, averaged over layers) that
    went to the masked experts."""
    mods = [c.removeprefix("load_") for c in table.columns if c.startswith("load_")]
    picked = pd.MultiIndex.from_tuples([(layer, e) for layer, es in masked.items() for e in es],
                                       names=["layer", "expert"])
    sub = table.reindex(picked).fillna(0.0)
    return {m: float(sub[f"load_{m}"].groupby(level="layer").sum().mean()) for m in mods}


def text_documents(model, path, *, per_domain: int = 2, max_tokens: int = 64, seed: int = 0):
    """Held-out text documents (a domain-labelled JSONL, routing.load_documents): the first `max_tokens`
    tokens of `per_domain` documents per domain, as an omnilab.experiments.sweeps.EvalSet (docs only) for text_nll."""
    from omnilab.experiments.eval_data import EvalSet

    docs = routing.load_documents(path, per_domain=per_domain, seed=seed)
    encoded = [(d, model.tokenizer(t)["input_ids"][:max_tokens]) for d, t in zip(docs["domain"], docs["text"])]
    return EvalSet(docs=[(d, ids) for d, ids in encoded if len(ids) > 1], prompts=[])


@torch.no_grad()
def text_nll(model, evalset, batch_size: int = 16, routing=None) -> tuple[float, int, list[torch.Tensor]]:
    """(mean next-token NLL in nats over every position of the text documents, positions, log-probabilities
    [T, V] per document) of omnilab.experiments.sweeps.EvalSet docs, `batch_size` documents per left-padded forward pass."""
    logprobs, total, n = [], 0.0, 0
    docs = [ids for _, ids in evalset.docs]
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        T = max(len(ids) for ids in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)  # [B, T], left-padded with token 0
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, d in enumerate(chunk):
            ids[b, T - len(d):] = torch.tensor(d)
            mask[b, T - len(d):] = 1
        out = F.log_softmax(model(ids.to(model.device), mask.to(model.device), routing=routing).float(),
                            dim=-1).cpu()  # [B, T, V]
        for b, d in enumerate(chunk):
            lp = out[b, T - len(d):]  # [len, V]
            logprobs.append(lp)
            total += float(-lp[:-1].gather(1, torch.tensor(d[1:])[:, None]).sum())
            n += len(d) - 1
    return total / max(1, n), n, logprobs


def masking_experiment(model, prompts: list[FormPrompt], evalset, masks: dict[str, dict[int, list[int]]], *,
                       table: pd.DataFrame | None = None, control: str | None = "random",
                       progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The unmodified model ("full") and each mask (name -> {layer: experts}) on every prompt and on the text
    documents of `evalset` (omnilab.experiments.sweeps.EvalSet). Returns (summary, scores): summary one row per (setting,
    form) with answer_nll, token_accuracy, exact (means over the form's prompts), their change from "full"
    (d_answer_nll ...), text_ppl and text_kl (next-token KL from the full model on the documents, nats), the
    share of the form's routing the mask removed (masked_share, from `table`) and, when `control` names one of
    the masks (a random one), excess_answer_nll = d_answer_nll minus the control's for the same form (what the
    mask costs beyond removing as many experts at random); scores one row per prompt and setting."""
    from tqdm.auto import tqdm

    from omnilab.experiments.sweeps import applied

    E = model.config.num_experts
    store = model.cache.store
    # the masked runs keep the model's expert budget (sweeps.applied gives each setting a fresh cache)
    budget = None if model.cache.budget_bytes >= store.total_bytes else model.cache.budget_bytes / store.total_bytes
    settings = {"full": None, **masks}
    summaries, all_scores, reference = [], [], None
    for name, masked in tqdm(list(settings.items()), desc="masks", disable=not progress):
        setting = mask_setting(name, masked, E, budget) if masked is not None else None
        if setting is None:
            scores, _ = run_prompts(model, prompts, record=False)
            nll, _, logprobs = text_nll(model, evalset)
        else:
            with applied(model, setting) as routing:
                scores, _ = run_prompts(model, prompts, record=False, routing=routing)
                nll, _, logprobs = text_nll(model, evalset, routing=routing)
        reference = logprobs if reference is None else reference
        kl = sum(float((r.exp() * (r - lp)).sum()) for r, lp in zip(reference, logprobs)) / sum(r.shape[0] for r in reference)
        scores.insert(0, "setting", name)
        all_scores.append(scores)
        share = masked_share(table, masked) if (table is not None and masked is not None) else {}
        for form, s in scores.groupby("form", sort=False):
            summaries.append(dict(setting=name, form=form, answer_nll=float(s["answer_nll"].mean()),
                                  token_accuracy=float(s["token_accuracy"].mean()), exact=float(s["exact"].mean()),
                                  text_ppl=math.exp(nll), text_kl=kl, masked_share=share.get(form, 0.0)))
    summary = pd.DataFrame(summaries)
    full = summary[summary["setting"] == "full"].set_index("form")
    for col in ("answer_nll", "token_accuracy", "exact"):
        summary[f"d_{col}"] = summary[col] - summary["form"].map(full[col])
    summary["text_ppl_ratio"] = summary["text_ppl"] / float(full["text_ppl"].iloc[0])
    if control is not None and control in masks:
        base = summary[summary["setting"] == control].set_index("form")["d_answer_nll"]
        summary["excess_answer_nll"] = summary["d_answer_nll"] - summary["form"].map(base)
    return summary, pd.concat(all_scores, ignore_index=True)


def summarize(spec: pd.DataFrame, single: pd.DataFrame, overlap: pd.DataFrame, summary: pd.DataFrame,
              scores: pd.DataFrame, trace: pd.DataFrame) -> dict:
    """Headline numbers for metrics.json from routing.specialization (on the modality trace),
    single_modality_experts, modality_overlap and masking_experiment."""
    mods = _modalities(trace)
    first = trace[(trace["layer"] == routing.layers_of(trace)[0]) & (trace["rank"] == 0)]
    out = {
        "segments": int(trace["doc"].nunique()),
        "mi_bits_mean": float(spec["mi_bits"].mean()),
        "mi_baseline_bits_mean": float(spec["baseline_mean"].mean()),
        "mi_share_mean": float(spec["mi_share"].mean()),
        "mi_layers_above_baseline": int((spec["mi_bits"] > spec["baseline_mean"] + 3 * spec["baseline_std"]).sum()),
        "mi_bits_max_layer": int(spec["mi_bits"].idxmax()),
    }
    for m in mods:
        out[f"tokens_{m}"] = int((first["domain"] == m).sum())
        out[f"single_modality_experts_{m}"] = int(single[m].sum())
        out[f"single_modality_experts_{m}_baseline"] = float(single[f"baseline_{m}"].sum())
    for pair, s in overlap.groupby(level="pair"):
        key = pair.replace("-", "_")
        out[f"load_overlap_{key}_mean"] = float(s["load_overlap"].mean())
        out[f"load_overlap_{key}_baseline_mean"] = float(s["baseline_load_overlap"].mean())
    full = scores[scores["setting"] == "full"]
    for form, s in full.groupby("form"):
        out[f"full_{form}_answer_nll"] = float(s["answer_nll"].mean())
        out[f"full_{form}_exact"] = float(s["exact"].mean())
    out["full_text_ppl"] = float(summary.loc[summary["setting"] == "full", "text_ppl"].iloc[0])
    for row in summary[summary["setting"] != "full"].itertuples():
        key = row.setting.replace("-", "_").replace(" ", "_")
        out[f"{key}_d_{row.form}_answer_nll"] = float(row.d_answer_nll)
        if "excess_answer_nll" in summary and row.setting != "random":
            out[f"{key}_excess_{row.form}_answer_nll"] = float(row.excess_answer_nll)
        out[f"{key}_{row.form}_masked_share"] = float(row.masked_share)
    for name, s in summary[summary["setting"] != "full"].groupby("setting", sort=False):
        key = name.replace("-", "_").replace(" ", "_")
        out[f"{key}_text_ppl_ratio"] = float(s["text_ppl_ratio"].iloc[0])
        out[f"{key}_text_kl"] = float(s["text_kl"].iloc[0])
    return out
