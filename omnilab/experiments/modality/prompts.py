"""Modality routing, its inputs (notebook 06): the multimodal evaluation set (`load_manifest`), each item as text,
as speech and as an image through transformers' processor and the thinker's towers with its answer appended for
teacher forcing (`form_prompt`, `build_prompts`), and their forward passes in left-padded batches (`run_prompts`):
per-prompt answer scores, and the content positions' routing as a trace whose domain is the modality.

Follows omnilab.model.multimodal (process, prepare, and generate's positions for appended tokens) and
omnilab.trace.record's trace rows; docs/DESIGN.md's "Modality routing" says what a segment is and why.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from omnilab.model import multimodal as mm
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

