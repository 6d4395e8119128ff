"""The extraction plan: which output file each selected tensor goes to (one per component, layer and expert),
and the parsers of `--components` / `--experts` / `--layers`."""

from __future__ import annotations

from dataclasses import dataclass, field

from omnilab.arch import ALL_COMPONENTS, TEXT_COMPONENTS, TOWERS, classify
from omnilab.checkpoint import Checkpoint, DTYPE_BYTES, pack_header


COMPONENT_GROUPS = {
    "all": ALL_COMPONENTS,
    "text": TEXT_COMPONENTS,
    "backbone": tuple(c for c in TEXT_COMPONENTS if c != "experts"),
    "towers": TOWERS,
}


def parse_range(text: str) -> list[int]:
    """'0-7,12,20-23' -> [0..7, 12, 20..23]. Raises ValueError naming the bad part."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"cannot read range {part!r} in {text!r}: use e.g. 0-7,12") from None
        if b < a or a < 0:
            raise ValueError(f"range {part!r} in {text!r} is empty or negative")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def parse_components(names: list[str] | str | None) -> tuple[str, ...]:
    """Component names and groups ('all', 'text', 'backbone', 'towers') -> component names, in inventory order."""
    if names is None:
        return ALL_COMPONENTS
    if isinstance(names, str):
        names = names.replace(" ", "").split(",")
    chosen: set[str] = set()
    for n in names:
        if n in COMPONENT_GROUPS:
            chosen.update(COMPONENT_GROUPS[n])
        elif n in ALL_COMPONENTS:
            chosen.add(n)
        elif n:
            raise ValueError(f"unknown component {n!r}: choose from {', '.join(ALL_COMPONENTS)} "
                             f"or the groups {', '.join(COMPONENT_GROUPS)}")
    return tuple(c for c in ALL_COMPONENTS if c in chosen)


def output_file(component: str, layer: int | None = None, expert: int | None = None) -> str:
    """The extraction file (relative path) that holds a tensor of this component / layer / expert."""
    if component == "experts" and layer is not None:
        return f"experts/layer-{layer:03d}/" + (f"expert-{expert:03d}" if expert is not None else "fused") + ".safetensors"
    if layer is not None:
        return f"{component}/layer-{layer:03d}.safetensors"
    return f"{component}.safetensors"


@dataclass
class OutputPlan:
    """One output file: which source tensors go in it, where, and the exact header it gets."""

    rel: str
    component: str
    layer: int | None
    expert: int | None
    rows: list[tuple]  # (name, shard, dtype, shape, bytes, begin, end) in file order
    header: bytes = b""  # 8-byte length + padded JSON
    offsets: dict[str, int] = field(default_factory=dict)  # tensor name -> absolute offset in the output file
    size: int = 0

    def __post_init__(self):
        # larger element sizes first keeps every tensor aligned (as safetensors' own writer does); then source order
        self.rows.sort(key=lambda r: -DTYPE_BYTES.get(r[2], 1))
        spec, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, _, dtype, shape, nbytes, _, _ in self.rows:
            spec[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.header = pack_header(spec)
        start = len(self.header)
        self.offsets = {name: start + spec[name]["data_offsets"][0] for name in spec if name != "__metadata__"}
        self.size = start + offset

    @property
    def data_bytes(self) -> int:
        return self.size - len(self.header)


def plan_extraction(ck: Checkpoint, components=None, layers: list[int] | None = None,
                    experts: list[int] | None = None) -> dict[str, OutputPlan]:
    """Output file -> plan, for the selected components, layers (text decoder) and experts."""
    chosen = parse_components(components)
    cfg, layout = ck.arch
    for what, picked, count in (("layers", layers, cfg.num_hidden_layers), ("experts", experts, cfg.num_experts)):
        outside = sorted(set(picked or ()) - set(range(count)))
        if outside:
            raise ValueError(f"--{what}: {outside[0]} is past this checkpoint's {count} {what} (0..{count - 1})")
    groups: dict[str, list] = {}
    keys: dict[str, tuple] = {}
    shard_order = {s: i for i, s in enumerate(ck.shards)}
    table = ck.tensors.sort_values(["shard", "begin"], key=lambda c: c.map(shard_order) if c.name == "shard" else c)
    for name, shard, dtype, shape, _, nbytes, begin, end in table.itertuples(index=False):
        spec = classify(name, layout)
        if spec.component not in chosen:
            continue
        if layers is not None and spec.layer is not None and spec.layer not in layers:
            continue
        if experts is not None and spec.expert is not None and spec.expert not in experts:
            continue
        rel = output_file(spec.component, spec.layer, spec.expert)
        groups.setdefault(rel, []).append((name, shard, dtype, tuple(shape), int(nbytes), int(begin), int(end)))
        keys[rel] = (spec.component, spec.layer, spec.expert)
    return {rel: OutputPlan(rel, *keys[rel], rows) for rel, rows in groups.items()}
