"""The host tier of offloaded experts and the copies out of it: `HostTier` (every expert in host memory, a host
copy in the slot's order or views into the shards' memory maps, registered page-locked with CUDA), the byte
spans a miss copies (`HostTier.spans`, `split_spans`) and `DriverCopy` (cuMemcpyHtoDAsync through ctypes).
Follows mixtral-offloading (dvmazur/mixtral-offloading): pinned host copies of every expert.
"""

from __future__ import annotations

import ctypes
import math
import mmap

import numpy as np
import torch

from omnilab.dtypes import STORED_DTYPES
from omnilab.gpu.slots import SLOT_ORDER
from omnilab.model.experts import ExpertWeights, read_expert


def register_host(ptr: int, nbytes: int) -> bool:
    """Register `nbytes` of host memory at `ptr` as page-locked with CUDA (cudaHostRegister); False when that
    fails."""
    if not torch.cuda.is_available():
        return False
    cudart = torch.cuda.cudart()
    try:
        err = int(cudart.cudaHostRegister(ptr, nbytes, 0))
    except Exception:  # noqa: BLE001 - any failure leaves the memory pageable, reported by the caller
        return False
    if err != 0:  # the failed call leaves CUDA's last error set; torch's next launch check would raise it
        clear_last_error()
    return err == 0


def clear_last_error() -> None:
    """Reset CUDA's last error (left by a failed runtime call such as cudaHostRegister). torch's cudart binding has
    no cudaGetLastError, but its check after every kernel launch calls it, which reads and resets the error: one
    launch whose raised error is dropped."""
    try:
        torch.zeros(1, device="cuda")
    except Exception:  # noqa: BLE001 - the stale error, now reset
        pass


def page_aligned_empty(shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, int, int]:
    """A host tensor of `shape` starting on a page boundary, and the (address, bytes) of the whole pages it owns.
    cudaHostRegister pins whole pages: a block sharing a page with another registered block fails ("already
    mapped"), which small blocks from the heap do (the GPU tests' tiny models)."""
    page = mmap.PAGESIZE
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    span = -(-nbytes // page) * page  # whole pages
    raw = torch.empty(span + page, dtype=torch.uint8)
    start = -raw.data_ptr() % page
    owned = raw[start:start + span]
    return owned[:nbytes].view(dtype).view(shape), owned.data_ptr(), span


def unregister_host(ptr: int) -> None:
    """Undo register_host for the memory at `ptr` (cudaHostUnregister), before that memory is freed: a range
    left registered makes a later registration of memory reusing its addresses fail ("already mapped")."""
    fn = getattr(torch.cuda.cudart(), "cudaHostUnregister", None)
    if fn is not None and int(fn(ptr)) != 0:  # a failed call leaves CUDA's last error set, as register_host's does
        clear_last_error()


class HostTier:
    """Every expert's projections on the host: `expert(layer, e) -> (gate [I, H], up [I, H], down [H, I])`."""

    def __init__(self, views: dict, nbytes: int, pinned: bool, how: str):
        self.views, self.nbytes, self.pinned, self.how = views, nbytes, pinned, how
        self._registered: list = []
        self._keep: list = []  # the host blocks or memory maps the views point into

    def expert(self, layer: int, e: int):
        return self.views[layer, e]

    def _register(self, ranges) -> bool:
        """register_host each (address, bytes) range, recording each so that close() undoes a partial
        registration too; False at the first that fails."""
        for ptr, nbytes in ranges:
            if not register_host(ptr, nbytes):
                return False
            self._registered.append(ptr)
        return True

    def close(self) -> None:
        """Unregister the page-locked host memory (it stays readable, pageable); also when the tier is freed."""
        registered, self._registered = self._registered, []
        for ptr in registered:
            unregister_host(ptr)
        self.pinned = False

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may be gone already
            pass

    def spans(self, layer: int, e: int) -> list[tuple[int, int, int]]:
        """The host byte spans of one expert as (host address, bytes, offset in a slot's down | gate | up bytes);
        projections lying side by side are merged into one span (one copy)."""
        out = []
        offset = 0
        views = self.views[layer, e]
        for t in (views[j] for j in SLOT_ORDER):
            n = t.numel() * t.element_size()
            ptr = t.data_ptr()
            if out and out[-1][0] + out[-1][1] == ptr and out[-1][2] + out[-1][1] == offset:
                out[-1] = (out[-1][0], out[-1][1] + n, out[-1][2])
            else:
                out.append((ptr, n, offset))
            offset += n
        return out

    @classmethod
    def copy(cls, checkpoint, config, layout, dtype: torch.dtype, pin: bool) -> "HostTier":
        """Read every expert once into host memory: per MoE layer one block [E, 3 * I * H], expert e's down, gate and
        up one after the other as in a slot (page-locked when pin and CUDA is there)."""
        I, H = config.moe_intermediate_size, config.hidden_size
        views, nbytes, blocks, pages = {}, 0, [], []
        for layer in config.moe_layers:
            block, ptr, span = page_aligned_empty((config.num_experts, 3, I * H), dtype)  # [E, 3, I*H]: down|gate|up
            pages.append((ptr, span))
            for e in range(config.num_experts):
                stored = read_expert(checkpoint, layout, layer, e)  # gate, up, down
                for row, j in enumerate(SLOT_ORDER):
                    block[e, row].copy_(stored[j].reshape(-1))
                views[layer, e] = ExpertWeights(block[e, 1].view(I, H), block[e, 2].view(I, H), block[e, 0].view(H, I))
            nbytes += block.numel() * block.element_size()
            blocks.append(block)
        tier = cls(views, nbytes, False, "copy")
        tier._keep = blocks
        tier.pinned = bool(pin) and tier._register(pages)
        tier.how = "host copy, registered page-locked" if tier.pinned else "host copy (pageable)"
        return tier

    @classmethod
    def mapped(cls, checkpoint, config, layout, register: bool = True) -> "HostTier":
        """Views into the shards' memory maps (the stored dtype), each map registered as page-locked with CUDA
        (cudaHostRegister) when register; on failure the views stay pageable and `pinned` is False."""
        maps, views, nbytes = {}, {}, 0
        table = checkpoint.tensors

        def view(name: str) -> torch.Tensor:  # one tensor where it lies in its shard's memory map
            nonlocal nbytes
            row = table.loc[name]
            shard = row["shard"]
            if shard not in maps:
                maps[shard] = np.memmap(checkpoint.root / shard, dtype=np.uint8, mode="r+")
            raw = torch.from_numpy(maps[shard][int(row["begin"]):int(row["end"])])
            nbytes += int(row["end"] - row["begin"])
            return raw.view(STORED_DTYPES[row["dtype"]]).view(*row["shape"])

        for layer in config.moe_layers:
            for e in range(config.num_experts):
                views[layer, e] = read_expert(checkpoint, layout, layer, e, read=view)
        tier = cls(views, nbytes, False, "shard maps")
        tier._maps = maps
        if register and torch.cuda.is_available():
            ok = tier._register([(m.ctypes.data, m.nbytes) for m in maps.values()])
            tier.pinned, tier.how = ok, "shard maps, registered page-locked" if ok else "shard maps (pageable)"
        return tier


def split_spans(spans, down_bytes: int):
    """A miss's spans (host address, bytes, offset in the slot) -> (the gate|up part, the down part): the slot is
    down | gate | up, so bytes [0, down_bytes) of it are down; a span across the boundary is cut in two."""
    first, second = [], []
    for src, n, off in spans:
        if off < down_bytes:
            m = min(n, down_bytes - off)
            second.append((src, m, off))
            if n > m:
                first.append((src + m, n - m, off + m))
        else:
            first.append((src, n, off))
    return first, second


# -- issuing copies --------------------------------------------------------------------------------------------------


class DriverCopy:
    """Host->device copies straight through the CUDA driver (cuMemcpyHtoDAsync_v2 through ctypes): a few
    microseconds of host time per copy against tens through torch's copy_ (dispatch, checks, host-allocator
    bookkeeping). The caller keeps both memories alive and orders the streams (events)."""

    def __init__(self):
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuMemcpyHtoDAsync_v2
        fn.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        self._fn = fn

    def __call__(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        err = self._fn(dst, src, nbytes, stream)
        if err:
            raise RuntimeError(f"offload: cuMemcpyHtoDAsync of {nbytes} bytes failed (CUresult {err})")

