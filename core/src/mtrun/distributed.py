"""Small, named helpers for torchrun data parallelism (gloo on CPU, NCCL on CUDA).

Every helper degrades to the single-process answer when no process group is initialised, so
components (a contrastive objective gathering negatives, a metric averaged over ranks) are
written once and run unchanged in both settings.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_with_grad",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "init_from_env",
    "is_distributed",
    "is_main",
    "launched_by_torchrun",
    "local_only",
    "local_rank",
    "rank",
    "world_size",
]

_state = threading.local()


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank within this node, as torchrun sets ``LOCAL_RANK``; picks the CUDA device."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when torchrun started more than one process (``WORLD_SIZE`` > 1 in the env)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device | str) -> torch.device:
    """Join the process group torchrun describes in the environment, if any.

    Reads ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` (the
    ``env://`` method). CUDA devices get NCCL and are narrowed to ``cuda:LOCAL_RANK`` so each
    rank owns one GPU; anything else gets gloo, which is what makes the distributed code paths
    testable on a laptop. Calling it again, or without torchrun, changes nothing.

    Args:
        device: The device the run asked for.

    Returns:
        The device this rank should use.
    """
    device = torch.device(device)
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return device


def cleanup() -> None:
    """Leave the process group (safe to call when none exists)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Make :func:`all_gather_with_grad` the identity inside this block.

    Evaluation runs the whole validation batch on every rank; gathering there would both
    duplicate items and deadlock when ranks evaluate different numbers of batches.
    """
    previous = getattr(_state, "local", False)
    _state.local = True
    try:
        yield
    finally:
        _state.local = previous


def _gathering() -> bool:
    return is_distributed() and not getattr(_state, "local", False)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the gradient over ranks, keeps our rows.

    Each rank computes its own loss on the gathered tensor, and DDP averages the parameter
    gradients. The gradient a rank's rows receive must therefore be the sum over ranks of each
    rank's loss gradient with respect to those rows: an all-reduce (sum) of the incoming
    gradient, then our slice. Ranks may hold different numbers of rows (the last batch of a
    split); rows are padded to the largest count for the collective and unpadded after.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n = world_size()
        sizes_t = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        all_sizes = [torch.zeros_like(sizes_t) for _ in range(n)]
        dist.all_gather(all_sizes, sizes_t)
        sizes = [int(s.item()) for s in all_sizes]
        largest = max(sizes)
        padded = x.contiguous()
        if x.shape[0] < largest:
            pad = x.new_zeros((largest - x.shape[0], *x.shape[1:]))
            padded = torch.cat([padded, pad], 0)
        parts = [torch.empty_like(padded) for _ in range(n)]
        dist.all_gather(parts, padded)
        r = rank()
        ctx.start = sum(sizes[:r])
        ctx.count = sizes[r]
        return torch.cat([p[:s] for p, s in zip(parts, sizes)], 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.count]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over ranks along dim 0 (rank order); gradients reach the local rows.

    The identity when not distributed (or inside :func:`local_only`), so a contrastive loss
    over gathered embeddings equals the single-process loss over the same global batch.

    Args:
        x: ``[n_local, ...]``; ranks may differ in ``n_local`` but not in the other dims.

    Returns:
        ``[sum of n_local over ranks, ...]``.
    """
    if not _gathering():
        return x
    return _AllGatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor:
    """Mean of ``x`` over ranks (a new tensor; no gradient). Used for logged numbers."""
    t = torch.as_tensor(x).detach().clone()
    if not is_distributed():
        return t
    device = t.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    if not t.is_floating_point():
        t = t.double()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world_size()).to(device)
