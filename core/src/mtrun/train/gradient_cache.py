"""The gradient cache: one exact large-batch step in the memory of a micro-batch.

Why: gradient accumulation sums the losses of micro-batches, so a contrastive loss such as
InfoNCE sees only a micro-batch's negatives. The gradient cache (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup") keeps every negative of the batch
while holding the graph of one micro-batch at a time:

1. embed every micro-batch without a graph, keeping only the embeddings;
2. compute the objectives on the concatenated embeddings (made leaf tensors) and backward: the
   gradient of the full-batch loss with respect to every embedding, and the objectives' own
   parameters' gradients (a learned temperature);
3. re-run each micro-batch with a graph, its random state of pass 1 restored (the global RNGs
   for dropout, an equally seeded :class:`~mtrun.interfaces.AugmentContext` for augmenters),
   and backward its embeddings with their slice of those gradients.

The parameter gradients then equal one backward of the full batch, up to rounding, when the
loss depends on the batch only through the embeddings (objectives that declare
``embedding_only``) and each item's embedding depends on that item alone (no batch
normalisation in training mode): :func:`gradient_cache_problems` lists what breaks either.
The price is one more forward pass of the encoders and projectors per step.

Under DDP the passes call the system itself, not DDP's forward, so DDP's gradient hooks stay
idle (they fire only after a forward through DDP); :func:`all_reduce_gradients` then averages
the gradients once, as DDP would. Objectives gather embeddings over ranks in pass 2 as usual.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch
from torch import nn

from mtrun import distributed
from mtrun.errors import TrainingError
from mtrun.interfaces import AugmentContext, Batch, StepOutputs
from mtrun.spec import label
from mtrun.train.rng import capture_rng, restore_rng

__all__ = ["all_reduce_gradients", "gradient_cache_problems", "gradient_cache_step"]

KEY = "[trainer].gradient_cache = true"


def gradient_cache_problems(system: Any) -> list[str]:
    """Why the gradient cache would not be exact for ``system`` (empty: it would be).

    Call it with the system in the mode it trains in (after ``system.train()``): a batch-norm
    layer that its owner keeps in eval mode uses running statistics and is harmless.
    """
    from mtrun.schema import declared_requires

    problems = []
    for entry in system.objectives:
        if not getattr(entry.objective, "embedding_only", False):
            who = label(entry.objective, f"[[objective]] {entry.name!r}")
            problems.append(
                f"{who} does not declare embedding_only: its loss may read more of the step than the "
                "embeddings (token sequences, fused streams, passes of its own), which the gradient "
                "cache does not keep"
            )
    norms: dict[str, list[str]] = {}  # one line per component, however many layers it has
    for name, module in system.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            norms.setdefault(_owner(system, name), []).append(f"{name}: {type(module).__name__}")
    for owner, layers in norms.items():
        problems.append(
            f"{owner} has batch normalisation ({', '.join(layers)}), whose statistics over a "
            "micro-batch differ from the full batch's"
        )
    for i, augmenter in enumerate(system.augmenters):
        needs = declared_requires(type(augmenter), getattr(augmenter, "config", None))
        if any(need.capability == "hard_negatives" for need in needs):
            problems.append(
                f"{label(augmenter, f'[[augmenter]][{i}]')} adds hard-negative captions, which the objective "
                "embeds in a pass of its own"
            )
    return problems


def gradient_cache_step(
    system: Any,
    micros: Sequence[Batch],
    *,
    prepare: Callable[[Batch], Batch],
    context: Callable[[int], AugmentContext],
    autocast: Callable[[], ContextManager],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward and backward one step of ``micros`` as one batch; gradients land in ``.grad``.

    Args:
        system: The :class:`~mtrun.system.System` (not its DDP wrapper), in training mode.
        micros: This rank's micro-batches of the step, as the loader made them.
        prepare: A micro-batch on the training device (called twice per micro-batch).
        context: The augmentation context of micro-batch ``m``; every call must return a
            context with an equally seeded generator, so the re-run draws the same noise.
        autocast: The precision context (``torch.autocast`` or a null context).

    Returns:
        The full-batch loss (detached) and its metrics, named as ``System.forward`` names them.

    Raises:
        TrainingError: A micro-batch carries ``hard_negatives``.
    """
    # Pass 1: embeddings only; the random state before each micro-batch is kept for pass 3.
    states, audio_parts, text_parts, lists = [], [], [], []
    with torch.no_grad():
        for m, micro in enumerate(micros):
            states.append(capture_rng())
            with autocast():
                out = system.encode(_fresh(prepare(micro), clone=True), context(m))
            _refuse_hard_negatives(out.batch)
            audio_parts.append(out.audio_embedding.detach())
            text_parts.append(out.text_embedding.detach())
            lists.append(_item_lists(out.batch, out.audio_embedding.shape[0]))
            del out

    # Pass 2: the objectives on the whole step's embeddings.
    audio = torch.cat(audio_parts).requires_grad_(True)
    text = torch.cat(text_parts).requires_grad_(True)
    del audio_parts, text_parts
    keys = set.intersection(*(set(d) for d in lists))
    batch = Batch({k: [v for d in lists for v in d[k]] for k in sorted(keys)})
    outputs = StepOutputs(batch=batch, audio=None, text=None, audio_embedding=audio, text_embedding=text)
    with autocast():
        loss, metrics = system.loss(outputs)
    if loss.requires_grad:
        loss.float().backward()
    after = capture_rng()

    # Pass 3: each micro-batch again, with a graph, fed the embeddings' gradients.
    if audio.grad is not None or text.grad is not None:
        start = 0
        for m, micro in enumerate(micros):
            restore_rng(*states[m])
            with autocast():
                out = system.encode(_fresh(prepare(micro)), context(m))
            end = start + out.audio_embedding.shape[0]
            pairs = [
                (emb, leaf.grad[start:end])
                for emb, leaf in ((out.audio_embedding, audio), (out.text_embedding, text))
                if emb.requires_grad and leaf.grad is not None
            ]
            if pairs:
                torch.autograd.backward([e for e, _ in pairs], [g.to(e.dtype) for e, g in pairs])
            del out, pairs
            start = end
        restore_rng(*after)
    return loss.detach(), metrics


def all_reduce_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Average the gradients over ranks in place, once, as DDP does after its backward.

    A parameter that got a gradient on some rank gets the average (zeros counted for the
    others); one that got none on any rank keeps ``None``, so the optimizer skips it as it
    would after a DDP step. No-op without a process group.
    """
    if not distributed.is_distributed():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in parameters:
        if p.requires_grad:
            by_dtype.setdefault(p.dtype, []).append(p)
    for params in by_dtype.values():  # one collective per dtype, like DDP's buckets
        like = params[0]
        used = torch.tensor([p.grad is not None for p in params], dtype=like.dtype, device=like.device)
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        flat = torch.cat([used, *grads])
        del grads
        flat = distributed.all_reduce_mean(flat)
        offset, anywhere = len(params), flat[: len(params)].tolist()  # one device sync
        for i, p in enumerate(params):
            if anywhere[i] > 0:
                p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()


# ------------------------------------------------------------------------------ helpers


def _owner(system: Any, name: str) -> str:
    """The recipe table of the component holding submodule ``name`` of the system."""
    parts = name.split(".")
    if parts[0] == "objectives" and len(parts) > 1:
        entry = system.objectives[int(parts[1])]
        return label(entry.objective, f"[[objective]] {entry.name!r}")
    return label(getattr(system, parts[0], None), f"[{parts[0]}]")


def _fresh(batch: Batch, *, clone: bool = False) -> Batch:
    """New containers (and, with ``clone``, new tensors) for ``batch``: augmenters may edit the
    batch they get, and pass 3 must see the micro-batch as pass 1 did."""

    def copy(value: Any) -> Any:
        if torch.is_tensor(value):
            return value.clone() if clone else value
        if isinstance(value, dict):
            return type(value)({k: copy(v) for k, v in value.items()})
        if isinstance(value, list):
            return [copy(v) for v in value]
        return value

    return copy(batch)


def _item_lists(batch: Batch, n: int) -> dict[str, list]:
    """The batch's per-item lists (``ids``, ``texts``, ``tags``, ``groups``): what an
    embedding-only objective may read besides the embeddings."""
    return {k: list(v) for k, v in batch.items() if isinstance(v, (list, tuple)) and len(v) == n}


def _refuse_hard_negatives(batch: Batch) -> None:
    hard = batch.get("hard_negatives")
    if hard is not None and len(hard) > 0:
        raise TrainingError(
            f"{KEY}: a batch augmenter added hard_negatives, which the objective embeds in a pass of its own "
            "that the gradient cache does not replay; remove that augmenter or set gradient_cache = false"
        )


