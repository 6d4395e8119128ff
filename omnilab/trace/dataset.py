"""Reading a finished trace folder lazily with pyarrow: `TraceDataset(folder)` reads one layer's row groups at a
time, or the whole trace as the DataFrame omnilab.experiments.routing's statistics take (they also take the
TraceDataset itself). Design: docs/DESIGN.md, "Corpus traces".
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from omnilab.trace.shards import DOCUMENTS_NAME, FORMAT, MANIFEST_NAME, PLAN_NAME, TRACE_COLUMNS

class TraceDataset:
    """A finished trace folder, read lazily with pyarrow. `read(layer=..., columns=..., rank=...)` returns those
    rows as a DataFrame in the trace's canonical order (doc, position, layer, rank), the domain a categorical
    with sorted categories, exactly as routing.concat_traces makes it; `to_pandas()` is the whole trace with its
    attrs. omnilab.experiments.routing's statistics take a TraceDataset where they take a trace DataFrame."""

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.folder / MANIFEST_NAME
        if not path.is_file():
            hint = (" (incomplete: run the same `omnilab trace` command again to finish it)"
                    if (self.folder / PLAN_NAME).exists() else "")
            raise FileNotFoundError(f"{self.folder}: no {MANIFEST_NAME}, not a finished trace folder{hint}")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.attrs = dict(self.manifest["attrs"])
        self.layers = [int(x) for x in self.manifest["layers"]]
        self.domains = list(self.manifest["domains"])
        self.files = [self.folder / s["file"] for s in self.manifest["shards"]]
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: shard listed in {path} is missing")

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TraceDataset({self.folder}: {m['traced_documents']:,} documents, {m['tokens']:,} tokens, "
                f"{len(self):,} rows, {len(self.layers)} layers x {self.attrs['num_experts']} experts, "
                f"top-{self.attrs['top_k']})")

    def _dataset(self):
        import pyarrow.dataset as ds

        return ds.dataset([str(f) for f in self.files], format="parquet")

    def read(self, layer: int | None = None, columns=None, rank: int | None = None) -> pd.DataFrame:
        """Rows of one layer (only its row groups are read) or of all, optionally of one rank only; `columns`
        a subset of the trace columns (default all)."""
        import pyarrow.compute as pc

        columns = list(TRACE_COLUMNS if columns is None else columns)
        keys = ["doc", "position", "layer", "rank"]
        wanted = columns + [k for k in keys if k not in columns]
        cond = None
        for name, value in (("layer", layer), ("rank", rank)):
            if value is not None:
                c = pc.field(name) == value
                cond = c if cond is None else cond & c
        table = self._dataset().to_table(columns=wanted, filter=cond)
        table = table.sort_by([(k, "ascending") for k in keys])
        frame = table.to_pandas()
        if "domain" in frame:
            frame["domain"] = pd.Categorical(frame["domain"].astype(str), categories=self.domains)
        frame = frame[columns]
        frame.attrs.update(self.attrs)
        return frame

    def to_pandas(self) -> pd.DataFrame:
        """The whole trace as one DataFrame (what routing.record_trace returns for the same documents)."""
        return self.read()

    def documents(self) -> pd.DataFrame:
        """doc, domain, source, row, tokens of every document of the corpus (tokens 0: not in the trace)."""
        return pd.read_parquet(self.folder / DOCUMENTS_NAME)

    def traced_documents(self) -> pd.DataFrame:
        """doc, domain of the documents in the trace, doc ascending; domain categorical as in read()."""
        d = self.documents()
        d = d[d["tokens"] > 0][["doc", "domain"]].reset_index(drop=True)
        d["domain"] = pd.Categorical(d["domain"], categories=self.domains)
        return d

def open_trace(folder) -> TraceDataset:
    return TraceDataset(folder)
