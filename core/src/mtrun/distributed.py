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
from torch import nn

__all__ = [
    "GatheredBatchNorm",
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
    "sync_batch_norm",
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
        if local_rank() >= torch.cuda.device_count():
            from mtrun.errors import TrainingError

            visible = torch.cuda.device_count()
            advice = (
                "no CUDA device is visible to it (check CUDA_VISIBLE_DEVICES)" if visible == 0
                else f"{visible} CUDA device(s) are visible to it: start one process per visible GPU "
                f"(--nproc_per_node {visible}, or a CUDA_VISIBLE_DEVICES that shows each process its own)"
            )
            raise TrainingError(
                f"torchrun started process LOCAL_RANK={local_rank()}, but {advice}; "
                "or train on the CPU with run.device=\"cpu\""
            )
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


def _gather_sizes(x: torch.Tensor) -> list[int]:
    """Every rank's ``x.shape[0]``, in rank order."""
    sizes_t = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    all_sizes = [torch.zeros_like(sizes_t) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes_t)
    return [int(s.item()) for s in all_sizes]


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
        sizes = _gather_sizes(x)
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


class GatheredBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole micro-batch over all ranks.

    What :class:`torch.nn.SyncBatchNorm` does on GPUs, for any device (PyTorch's refuses CPU
    tensors): in training under torchrun the input rows of every rank are gathered with
    gradient (:func:`all_gather_with_grad`), normalised together, and this rank keeps its own
    rows. Each rank then computes what a single process computes for the whole micro-batch,
    running statistics included, and the gradients reaching the gathered rows are summed over
    ranks, so DDP's average equals the single-process gradient. Outside training, without a
    process group or inside :func:`local_only` it is a plain BatchNorm. Parameters and buffers
    are those of the layer it replaces, so checkpoints load either way.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and _gathering()):
            return super().forward(input)
        sizes = _gather_sizes(input)
        start = sum(sizes[: rank()])
        # Gather in the input's own memory order and view the result in the same layout, so
        # the statistics are reduced in the order one process reduces them (a transposed input,
        # as HTS-AT's [B, mel, T, 1], would otherwise be normalised from a contiguous copy and
        # differ in the last bits, which BatchNorm over a few items can magnify).
        perm = [0] + sorted(range(1, input.dim()), key=lambda d: -input.stride(d))
        inverse = [perm.index(d) for d in range(input.dim())]
        full = all_gather_with_grad(input.permute(perm)).permute(inverse)
        out = super().forward(full)
        return out[start : start + input.shape[0]]


def sync_batch_norm(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Make every BatchNorm in ``module`` normalise over the whole micro-batch of all ranks.

    Under DDP each rank otherwise normalises its own share, so a recipe with BatchNorm (SLAP's
    projectors) would train differently on N ranks than in one process at the same global
    batch. CUDA modules get :class:`torch.nn.SyncBatchNorm`; others :class:`GatheredBatchNorm`.
    Layers are replaced in place (the same parameters and buffers), so references to the
    modules that hold them stay valid. Without a process group nothing changes.

    Returns:
        ``module`` (a new module only when ``module`` itself is a BatchNorm).
    """
    if not is_distributed():
        return module
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _gathered(module)


def _gathered(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (GatheredBatchNorm, nn.SyncBatchNorm)):
        new = GatheredBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var, new.num_batches_tracked = module.running_mean, module.running_var, module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        replaced = _gathered(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
