"""The phase timer of an offloaded decode step (OffloadDecoder.generate(profile=True)): CUDA events on the compute
and copy streams at the step's marks, summed per phase as milliseconds per token.
"""

from __future__ import annotations

import time

import torch

PHASES = ("attention + router", "ids to host + bookkeeping", "copy", "experts after the last copy",
          "experts -> next layer", "pre + final")


class PhaseTimer:
    """Timestamps of a decode step's phases: CUDA events (timing) on CUDA, the host clock elsewhere, and the host
    clock at every mark. summary() -> milliseconds per token of each of PHASES (the GPU's clock: when the compute
    and copy streams reached each mark) and of the host's own work per token."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list = []  # (name, event or None, host time)

    def mark(self, name: str, stream=None) -> None:
        ev = None
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        self.marks.append((name, ev, time.perf_counter()))

    def summary(self, tokens: int) -> dict:
        """Marks per step: step, then per MoE layer a0 a1 (around segment a), c0 c1 (on the copy stream, around
        the layer's copies), b1 (after the sum), then end. The intervals tile the step."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

        def gpu(a, b):
            return a[1].elapsed_time(b[1]) if self.cuda else (b[2] - a[2]) * 1e3

        def host(a, b):
            return (b[2] - a[2]) * 1e3

        ms = dict.fromkeys(PHASES, 0.0)
        ms["whole step"] = 0.0
        hs = {"bookkeeping + copy issue": 0.0, "launch experts + sum": 0.0, "whole step": 0.0}
        last: dict = {}
        for m in self.marks:
            name = m[0]
            if name == "a0":
                ms["experts -> next layer" if "b1" in last else "pre + final"] += gpu(last.get("b1", last["step"]), m)
            elif name == "a1":
                ms["attention + router"] += gpu(last["a0"], m)
            elif name == "c0":
                ms["ids to host + bookkeeping"] += gpu(last["a1"], m)
            elif name == "c1":
                ms["copy"] += gpu(last["c0"], m)
                hs["bookkeeping + copy issue"] += host(last["c0"], m)
            elif name == "b1":
                ms["experts after the last copy"] += gpu(last["c1"], m)
                hs["launch experts + sum"] += host(last["c1"], m)
            elif name == "end":
                ms["pre + final"] += gpu(last["b1"], m)
                ms["whole step"] += gpu(last["step"], m)
                hs["whole step"] += host(last["step"], m)
                last = {}
                continue
            last[name] = m
        per = max(1, tokens)
        return {"phase_ms": {k: v / per for k, v in ms.items()}, "host_ms": {k: v / per for k, v in hs.items()}}
