"""Encoding raw projected gradients for storage.

Raw per-example gradients can be tiny (1e-8 per element): stored naively as float16, most values
would flush to zero. Each row's module block is therefore divided by its own max-abs value (an fp32
scale stored beside it) before it is cast to the 16-bit store type.
"""

from __future__ import annotations

import numpy as np
import torch

_NUMPY_DTYPE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


def numpy_store_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a grads file: bfloat16 is kept as its raw 16 bits in uint16."""
    return np.dtype(_NUMPY_DTYPE[dtype])


def _per_column(scales: torch.Tensor, block_dims: list[int]) -> torch.Tensor:
    """(n, M) per-module scales → (n, D), repeated over each module's columns."""
    return scales.repeat_interleave(torch.tensor(block_dims), dim=1)


def encode(vectors: torch.Tensor, block_dims: list[int], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(B, D) float vectors → ((B, D) stored values, (B, M) float32 scales)."""
    vectors = vectors.detach().to("cpu", torch.float32)
    if dtype == "float32":
        return vectors.numpy(), np.ones((vectors.shape[0], len(block_dims)), dtype=np.float32)
    scales = torch.stack([b.abs().amax(dim=1) for b in torch.split(vectors, block_dims, dim=1)], dim=1)  # (B, M)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    scaled = vectors / _per_column(scales, block_dims)  # (B, D), entries in [-1, 1]
    if dtype == "float16":
        return scaled.to(torch.float16).numpy(), scales.numpy()
    return scaled.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), scales.numpy()


def decode(stored: np.ndarray, scales: np.ndarray, block_dims: list[int], dtype: str) -> torch.Tensor:
    """Inverse of `encode`: ((n, D) stored, (n, M) scales) → (n, D) float32 tensor."""
    if dtype == "bfloat16":
        values = torch.from_numpy(np.ascontiguousarray(stored).view(np.int16)).view(torch.bfloat16).to(torch.float32)
    else:
        values = torch.from_numpy(np.array(stored, dtype=np.float32))  # a copy: the memory map is read-only
    if dtype == "float32":
        return values
    return values * _per_column(torch.from_numpy(np.asarray(scales, dtype=np.float32)), block_dims)
