"""Dtypes by name: the one parser of `--dtype` / `dtype=` values ("float32", "bf16", torch.bfloat16), and the
safetensors names of the float dtypes a checkpoint stores."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# safetensors' names of the float dtypes a checkpoint stores, and their torch dtypes (readers that view raw bytes)
STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def as_dtype(dtype) -> torch.dtype:
    """A torch dtype from a name or a dtype; ValueError naming the value when it is none of DTYPES."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32 or bfloat16") from None
