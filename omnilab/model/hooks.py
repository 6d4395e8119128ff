"""Hook points, capture and compare: the one table of hook names, read by the selective model, the transformers
reference (omnilab.reference) and the fast path's recorders (omnilab.gpu), and a per-hook comparison of two models.
Names follow TransformerLens (`blocks.{i}.hook_resid_pre`, ...); its MoE names are accepted as ALIASES.
Design: docs/DESIGN.md, "Hook names".
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

# -- the hook names, in the order a forward pass reaches them -------------------------------------------------
# Residual-stream hooks hold [B, T, H]; router hooks hold one row per token, [B * T, E] or [B * T, k], as
# transformers' router returns them. A layer's hook is `layer_hook(i, point)`: 'blocks.{i}.{point}'.
EMBED = "hook_embed"
RESID_PRE, ATTN_OUT, RESID_MID = "hook_resid_pre", "hook_attn_out", "hook_resid_mid"
ROUTER_LOGITS, TOPK_INDICES, TOPK_WEIGHTS = "mlp.hook_router_logits", "mlp.hook_topk_indices", "mlp.hook_topk_weights"
MLP_OUT, RESID_POST = "hook_mlp_out", "hook_resid_post"
FINAL_NORM, LOGITS = "ln_final.hook_normalized", "hook_logits"

LAYER_POINTS = (RESID_PRE, ATTN_OUT, RESID_MID, ROUTER_LOGITS, TOPK_INDICES, TOPK_WEIGHTS, MLP_OUT, RESID_POST)
ROUTER_POINTS = (ROUTER_LOGITS, TOPK_INDICES, TOPK_WEIGHTS)  # on MoE layers only

# TransformerLens's names for the MoE hooks -> ours (HookedTransformer's MoE blocks call them so)
ALIASES = {"mlp.hook_expert_indices": "mlp.hook_topk_indices", "mlp.hook_expert_weights": "mlp.hook_topk_weights"}

# rel_err above which a hook counts as divergent, by compute dtype (bf16 rounds at ~4e-3 per operation)
DIVERGENCE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def layer_hook(i: int, point: str) -> str:
    """The name of layer i's hook `point`: layer_hook(3, RESID_PRE) -> 'blocks.3.hook_resid_pre'."""
    return f"blocks.{i}.{point}"


def layer_points(config, i: int) -> list[str]:
    """The hook points of layer i, in forward order (router points only on an MoE layer)."""
    moe = config.is_moe_layer(i)
    return [p for p in LAYER_POINTS if moe or p not in ROUTER_POINTS]


def hook_names(config) -> list[str]:
    """Every hook point of a config, in forward order."""
    names = [EMBED]
    for i in range(config.num_hidden_layers):
        names += [layer_hook(i, p) for p in layer_points(config, i)]
    return names + [FINAL_NORM, LOGITS]


def resolve(name: str) -> str:
    """A hook name with a TransformerLens alias replaced by its own name: 'blocks.3.mlp.hook_expert_indices'
    -> 'blocks.3.mlp.hook_topk_indices'; any other name as it is."""
    layer, point = parse_name(name)
    if point in ALIASES:
        return f"blocks.{layer}.{ALIASES[point]}" if layer is not None else ALIASES[point]
    return name


def parse_name(name: str) -> tuple[int | None, str]:
    """'blocks.3.mlp.hook_router_logits' -> (3, 'mlp.hook_router_logits'); 'hook_embed' -> (None, 'hook_embed')."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


@contextmanager
def capture(model, names=None):
    """Within the block, every forward of `model` (SelectiveMoE or Reference) records the named activations
    (all hook points by default) into the yielded dict: name -> detached copy (the last forward's)."""
    names = list(model.hook_names() if names is None else names)
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def recorder(name):
        def record(x):
            acts[name] = x.detach().clone()

        return record

    try:
        for name in names:
            handles.append(model.add_hook(name, recorder(name)))
        yield acts
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_with_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, names=None):
    """(logits, activations) of one forward pass."""
    with capture(model, names) as acts:
        logits = model(input_ids, attention_mask)
    return logits, acts


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per hook: name, layer, point, max_abs, rel_err, cosine, topk_agreement, threshold,
    # divergent
    first_divergence: str | None
    top1_agreement: float
    kl: float
    rtol: float

    def to_json(self) -> dict:
        """The `omnilab compare --json` contract."""
        hooks = [{k: _num(row[k]) for k in ("name", "max_abs", "rel_err", "cosine", "topk_agreement", "threshold",
                                             "tokens")}
                 for row in self.table.to_dict("records")]
        return {"hooks": hooks, "first_divergence": self.first_divergence, "top1_agreement": self.top1_agreement,
                "kl": self.kl, "rtol": self.rtol, "max_rel_err": _num(self.table.rel_err.max())}

    def per_layer(self, point: str, column: str = "rel_err") -> pd.Series:
        """One hook point across layers: e.g. per_layer('hook_resid_post')."""
        t = self.table[self.table.point == point]
        return t.set_index("layer")[column]

    @property
    def logits_rel_err(self) -> float:
        return float(self.table.set_index("name").rel_err["hook_logits"])

    def summary(self) -> dict:
        """One row of a table of comparisons: max rel_err (float hooks), logits rel_err, the least top-k
        agreement, top-1 agreement and KL."""
        floats = self.table[self.table.point != "mlp.hook_topk_indices"]
        return {"max rel_err": float(floats.rel_err.max()), "logits rel_err": self.logits_rel_err,
                "min top-k agreement": float(self.table.topk_agreement.min()), "top-1 agreement": self.top1_agreement,
                "KL": self.kl}


def first_difference(a, b) -> int:
    """The first position where two token sequences differ (the shorter length when one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def divergence_rtol(*models) -> float:
    """The rel_err above which a hook counts as divergent, for the least precise of the models' dtypes."""
    return max(DIVERGENCE_RTOL.get(m.dtype, 1e-4) for m in models)


def compare(reference, selective, input_ids, attention_mask=None, names=None, rtol: float | None = None) -> Comparison:
    """Run `reference` and `selective` on the same tokens and compare them hook by hook."""
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    _, ref_acts = run_with_cache(reference, input_ids, attention_mask, names)
    _, sel_acts = run_with_cache(selective, input_ids.to(selective.device), attention_mask, names)
    if rtol is None:
        rtol = divergence_rtol(reference, selective)
    return compare_activations(ref_acts, sel_acts, attention_mask=attention_mask, rtol=rtol,
                               names=names or reference.hook_names())


def compare_activations(ref: dict, sel: dict, attention_mask=None, rtol: float = 1e-4, names=None,
                        thresholds: dict | None = None, keep: dict | None = None) -> Comparison:
    """Compare two captures (name -> tensor) hook by hook; `ref` is the reference (b in rel_err).
    A hook is divergent where rel_err exceeds its threshold: thresholds[name] when given (the bf16 noise
    floor, omnilab.reference.compare), else rtol. keep[name]: bool [n] over the real tokens, those compared at that hook
    (omnilab.reference.compare sets aside bf16 near-tie flips); the `tokens` column counts them."""
    names = [n for n in (names or ref) if n in ref and n in sel]
    valid = None if attention_mask is None else torch.as_tensor(attention_mask).bool().cpu()  # [B, T]
    rows = []
    for name in names:
        a, b = _tokens(sel[name], valid), _tokens(ref[name], valid)
        if keep is not None and name in keep:
            a, b = a[keep[name]], b[keep[name]]
        layer, point = parse_name(name)
        row = {"name": name, "layer": layer, "point": point, "topk_agreement": float("nan"), "tokens": len(b)}
        if point == "mlp.hook_topk_indices":
            agree = topk_agreement(b, a)
            row.update(max_abs=float((~_same_sets(b, a)).float().mean()), rel_err=1.0 - agree, cosine=float("nan"),
                       topk_agreement=agree)
        else:
            row.update(_errors(a, b))
        rows.append(row)
    table = pd.DataFrame(rows, columns=["name", "layer", "point", "max_abs", "rel_err", "cosine", "topk_agreement",
                                        "tokens"])
    # the router's weights and logits carry their layer's set agreement too
    for layer, agree in table[table.point == "mlp.hook_topk_indices"].set_index("layer").topk_agreement.items():
        table.loc[(table.layer == layer) & table.point.isin(ROUTER_POINTS), "topk_agreement"] = agree
    table["threshold"] = [float((thresholds or {}).get(n, rtol)) for n in table.name]
    # NaN counts as divergent; a hook with every token set aside is not judged
    table["divergent"] = ~(table.rel_err <= table.threshold) & (table.tokens > 0)
    first = table[table.divergent].name.iloc[0] if table.divergent.any() else None
    top1, kl = float("nan"), float("nan")
    if "hook_logits" in ref and "hook_logits" in sel:
        lr, ls = _tokens(ref["hook_logits"], valid).double(), _tokens(sel["hook_logits"], valid).double()
        if keep is not None and "hook_logits" in keep:
            lr, ls = lr[keep["hook_logits"]], ls[keep["hook_logits"]]
        top1 = float((lr.argmax(-1) == ls.argmax(-1)).double().mean())
        kl = float(F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lr, -1), log_target=True, reduction="none")
                   .sum(-1).mean())
    return Comparison(table, first, top1, kl, rtol)


def topk_agreement(ref_idx: torch.Tensor, sel_idx: torch.Tensor) -> float:
    """Mean over tokens of |ref set ∩ selective set| / k."""
    k = ref_idx.shape[-1]
    hits = (ref_idx[..., :, None] == sel_idx[..., None, :]).any(-1).sum(-1)  # [N]
    return float(hits.double().mean() / k)


def _same_sets(ref_idx, sel_idx) -> torch.Tensor:
    return (ref_idx.sort(-1).values == sel_idx.sort(-1).values).all(-1)


def _tokens(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Keep real tokens only: [B, T, ...] -> [n, ...]; router rows [B * T, ...] -> [n, ...]."""
    x = x.detach().cpu()
    if valid is None:
        return x.reshape(-1, x.shape[-1])
    if x.shape[:2] == valid.shape:
        return x[valid]
    return x.reshape(valid.numel(), -1)[valid.reshape(-1)]


def _errors(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    diff = a - b
    nb = b.norm()
    rel = float(diff.norm() / nb) if nb > 0 else (0.0 if diff.norm() == 0 else float("inf"))
    denom = a.norm() * nb
    cos = float(a @ b / denom) if denom > 0 else (1.0 if a.norm() == nb else 0.0)
    return {"max_abs": float(diff.abs().max()) if diff.numel() else 0.0, "rel_err": rel, "cosine": cos}


def _num(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x
