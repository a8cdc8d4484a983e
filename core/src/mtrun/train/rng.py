"""Seeds derived from names, and the process RNG states a checkpoint records.

Every random choice in training (data order, crops, caption choice, augmentation noise, dropout)
draws from a generator seeded by a *derived* seed: a hash of the run seed and where the draw
happens (epoch, item, step, micro-batch, rank). Nothing depends on how many numbers an earlier
step consumed, so a resumed run, or a run on a different number of ranks, draws the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "derive_seed", "restore_rng", "seed_everything"]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (ints and strings), stable across processes and versions.

    Python's ``hash`` is salted per process for strings, so a cryptographic hash of the
    ``repr`` is used instead.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The process RNG states as (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {"torch_cpu": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state.clone()
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`; CUDA states are restored for devices that exist."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        for key in cuda:
            index = int(key.rsplit("_", 1)[1])
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(tensors[key], index)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
