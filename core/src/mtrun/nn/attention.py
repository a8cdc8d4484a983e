"""The one attention function every transformer block in mtrun calls, and the blocks built on it.

:func:`attention` picks a kernel per call: xformers' ``memory_efficient_attention`` when the
query lives on a CUDA device and ``xformers.ops`` can be imported, otherwise PyTorch's
``scaled_dot_product_attention``. Both receive the same inputs and masks, so a model gives the
same numbers (up to kernel rounding) whichever is installed; the tests compare them where both
exist. xformers is optional (``pip install mtrun[xformers]``) and has no CPU kernels, which is
why the CPU path never touches it.

:class:`MultiHeadAttention` and :class:`TransformerBlock` use timm's parameter names
(``qkv``, ``proj``, ``norm1``, ``mlp.fc1`` ...) so ViT checkpoints (AudioMAE / MAViL) load into
them key for key.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import warnings
from types import ModuleType
from typing import Any, Iterator, Literal

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Backend",
    "Mlp",
    "MultiHeadAttention",
    "TransformerBlock",
    "attention",
    "attention_backend",
    "resolve_backend",
    "xformers_available",
]

Backend = Literal["auto", "sdpa", "xformers"]
_BACKENDS = ("auto", "sdpa", "xformers")

# The forced backend for the current context; "auto" chooses per call. A ContextVar rather than
# a plain global so that a test forcing a backend cannot leak into another thread's calls.
_forced: contextvars.ContextVar[str] = contextvars.ContextVar("mtrun_attention_backend", default="auto")

# Result of the one import attempt: a module, or None when xformers is missing or broken.
# Importing xformers is slow and may print warnings, so it is tried at most once per process.
_UNTRIED = object()
_xformers_ops: object = _UNTRIED
# Precisions whose xformers kernels failed the import check: those calls use SDPA.
_xformers_refused: frozenset[torch.dtype] = frozenset()
# Inputs (dtype, head widths, bias) that xformers turned down at a call: those go to SDPA at once,
# without building xformers' bias and failing in its dispatch again on every call.
_xformers_no_kernel: set[tuple[Any, ...]] = set()

# xformers' kernels read the bias with 128-bit loads: every stride but the last must be a
# multiple of 128 / bits (8 for half precision, 4 for float32). Padding to 8 satisfies all.
_BIAS_ALIGN = 8

# Where the import-time check runs xformers once (tests point it at the CPU with a fake kernel).
_PROBE_DEVICE = "cuda"


def _import_xformers() -> ModuleType | None:
    """Import ``xformers.ops`` once, check that its CUDA kernels run, and remember the outcome.

    An xformers wheel built for another torch still imports, but without its CUDA kernels
    (it prints "xFormers can't load C++/CUDA extensions") and every call then raises. So a tiny
    forward and backward, with the dense bias this module passes, runs in each precision of
    :func:`_probe_dtypes`. A precision that fails uses SDPA (:data:`_xformers_refused`); if all
    fail, xformers is not used at all. A warning says why, instead of a training step crashing,
    possibly inside autograd, where the per-call fallback cannot catch it.
    """
    global _xformers_ops, _xformers_refused
    if _xformers_ops is _UNTRIED:
        try:
            ops = importlib.import_module("xformers.ops")
        except Exception:  # noqa: BLE001 - a broken build (wrong torch ABI) counts as absent
            ops = None
        if ops is not None and torch.cuda.is_available():
            dtypes = _probe_dtypes()
            failures = _probe_xformers(ops, dtypes)
            if failures:
                version = getattr(importlib.import_module("xformers"), "__version__", "?")
                reason = "; ".join(f"{str(dtype).removeprefix('torch.')}: {why}" for dtype, why in failures.items())
                if len(failures) == len(dtypes):
                    message = "its CUDA kernels do not run"
                    ops = None
                else:
                    names = ", ".join(str(dtype).removeprefix("torch.") for dtype in failures)
                    message = f"its CUDA kernels do not run in {names} (attention in those uses SDPA)"
                warnings.warn(
                    f"xformers {version} is installed but {message} with torch {torch.__version__} ({reason}); "
                    + ("attention uses PyTorch SDPA. " if ops is None else "")
                    + "Install the xformers build made for this torch (mtrun[xformers] pins the matching pair).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _xformers_refused = frozenset(failures) if ops is not None else frozenset()
        _xformers_ops = ops
    return _xformers_ops  # type: ignore[return-value]


def _probe_dtypes() -> tuple[torch.dtype, ...]:
    """The precisions to check xformers in: float32 and float16, and bfloat16 where the GPU has
    it natively (xformers has no bf16 kernels below sm80, which torch may still emulate)."""
    try:
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except Exception:  # noqa: BLE001 - no answer: do not ask xformers for bf16
        native_bf16 = False
    return (torch.float32, torch.float16, torch.bfloat16) if native_bf16 else (torch.float32, torch.float16)


def _probe_xformers(ops: Any, dtypes: tuple[torch.dtype, ...]) -> dict[torch.dtype, str]:
    """Run one tiny forward + backward per dtype; the dtypes that failed, with why."""
    failures: dict[torch.dtype, str] = {}
    # The first attention call is often under no_grad (a frozen encoder, evaluation) and inside
    # the step's autocast: the check needs gradients, and each dtype as it is named.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cuda", enabled=False):
        for dtype in dtypes:
            try:
                x = torch.zeros(1, 8, 1, 16, device=_PROBE_DEVICE, dtype=dtype, requires_grad=True)
                bias = torch.zeros(1, 1, 8, 8, device=_PROBE_DEVICE, dtype=dtype)
                ops.memory_efficient_attention(x, x, x, attn_bias=bias).sum().backward()
            except Exception as exc:  # noqa: BLE001 - any failure means: not usable in this dtype
                failures[dtype] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return failures


def _reset_xformers_cache() -> None:
    """Forget the import attempt (tests that fake or hide xformers call this)."""
    global _xformers_ops, _xformers_refused
    _xformers_ops = _UNTRIED
    _xformers_refused = frozenset()
    _xformers_no_kernel.clear()


def xformers_available() -> bool:
    """Whether ``xformers.ops`` imports in this process (and CUDA exists to run it on)."""
    return torch.cuda.is_available() and _import_xformers() is not None


@contextlib.contextmanager
def attention_backend(backend: Backend) -> Iterator[None]:
    """Force the kernel :func:`attention` uses inside the ``with`` block.

    Args:
        backend: ``"auto"`` (xformers on CUDA when importable, else SDPA), ``"sdpa"`` or
            ``"xformers"`` (fails if xformers is unusable for the tensors given).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(_BACKENDS)} (got {backend!r})")
    token = _forced.set(backend)
    try:
        yield
    finally:
        _forced.reset(token)


def resolve_backend(device: torch.device, backend: Backend | None = None, dtype: torch.dtype | None = None) -> str:
    """The kernel that a call on ``device`` would use: ``"sdpa"`` or ``"xformers"``.

    Args:
        device: Device of the query tensor.
        backend: Per-call choice; ``None`` defers to :func:`attention_backend` (default auto).
        dtype: The query's dtype, when known: a precision whose xformers kernels failed the
            import check uses SDPA.

    Raises:
        RuntimeError: ``"xformers"`` was forced but the tensors are not on CUDA or xformers
            does not import.
    """
    choice = backend if backend is not None else _forced.get()
    if choice not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(_BACKENDS)} (got {choice!r})")
    if choice == "sdpa":
        return "sdpa"
    # Check the device first: on CPU xformers has no kernels, so it is not even imported.
    usable = device.type == "cuda" and _import_xformers() is not None and dtype not in _xformers_refused
    if choice == "xformers" and not usable:
        if device.type != "cuda":
            why = "the tensors are not on a CUDA device"
        elif _xformers_ops is None:
            why = "xformers.ops does not import, or its kernels do not run"
        else:
            why = f"its {str(dtype).removeprefix('torch.')} kernels failed the import check"
        raise RuntimeError(
            f"attention backend 'xformers' was requested but {why}; install mtrun[xformers] on a CUDA machine or use backend 'sdpa'"
        )
    return "xformers" if usable else "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q kᵀ · scale + bias) v`` over heads.

    Args:
        q: Queries ``[B, H, Nq, Dh]`` (batch, heads, query tokens, head width).
        k: Keys ``[B, H, Nk, Dh]``; ``Nk`` may differ from ``Nq`` (cross-attention).
        v: Values ``[B, H, Nk, Dv]``.
        key_padding_mask: ``[B, Nk]``, True (or non-zero) where the key is a real token; keys
            marked False get no weight. A query whose keys are *all* masked returns zeros
            rather than NaN (an empty caption, a clip with every token dropped).
        attn_bias: Optional additive float bias broadcastable to ``[B, H, Nq, Nk]`` (relative
            positions, causal ``-inf`` masks). Rows made fully ``-inf`` by it are the caller's
            responsibility; only ``key_padding_mask`` rows are guarded.
        dropout_p: Dropout on the attention weights; pass ``0.0`` in eval mode (this function
            does not know whether its caller is training).
        scale: Logit scale; defaults to ``Dh ** -0.5``.
        backend: ``"sdpa"``, ``"xformers"`` or ``"auto"`` for this call; ``None`` uses the
            backend forced with :func:`attention_backend` (default ``"auto"``).

    Returns:
        ``[B, H, Nq, Dv]`` in the dtype of ``q``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects q, k, v shaped [B, H, N, Dh]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, _, _, head_dim = q.shape
    n_keys = k.shape[2]
    if scale is None:
        scale = head_dim**-0.5

    empty_rows: torch.Tensor | None = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, n_keys):
            raise ValueError(
                f"key_padding_mask must be [B, Nk] = [{batch}, {n_keys}] (got {tuple(key_padding_mask.shape)})"
            )
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
        # Softmax over no keys is 0/0. Let such rows attend everywhere (finite values and
        # finite gradients), then zero their output below: torch.where after a NaN would still
        # poison the backward pass, so the NaN must never be produced. Done unconditionally,
        # because asking "is any row empty?" would cost a host-device sync in every layer.
        empty_rows = ~key_padding_mask.any(dim=-1)  # [B]
        key_padding_mask = key_padding_mask | empty_rows[:, None]

    out = None
    forced = (backend if backend is not None else _forced.get()) == "xformers"
    signature = (q.dtype, head_dim, v.shape[-1], attn_bias is not None or key_padding_mask is not None, dropout_p > 0)
    if resolve_backend(q.device, backend, q.dtype) == "xformers" and (forced or signature not in _xformers_no_kernel):
        try:
            out = _xformers_attention(q, k, v, key_padding_mask, attn_bias, dropout_p, scale)
        except NotImplementedError as exc:  # no xformers kernel takes these inputs (a head width, a dtype)
            if forced:
                raise
            _xformers_no_kernel.add(signature)
            _warn_once(f"xformers has no kernel for these inputs, so attention calls like it use SDPA: {str(exc).splitlines()[0]}")
    if out is None and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # PyTorch's CPU SDPA backward is 3-5x slower in bf16 than in float32 (measured with
        # torch 2.10, benchmarks/precision.py), which made bf16 training of small ViTs slower
        # than fp32; the projections around it keep their bf16 matmuls.
        out = _sdpa_attention(q.float(), k.float(), v.float(), key_padding_mask, attn_bias, dropout_p, scale).to(q.dtype)
    elif out is None:
        out = _sdpa_attention(q, k, v, key_padding_mask, attn_bias, dropout_p, scale)

    if empty_rows is not None:
        out = torch.where(empty_rows[:, None, None, None], torch.zeros((), dtype=out.dtype, device=out.device), out)
    return out


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_bias: torch.Tensor | None,
    dropout_p: float,
    scale: float,
) -> torch.Tensor:
    mask: torch.Tensor | None = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]  # [B, 1, 1, Nk]: True = attend
    if attn_bias is not None:
        bias = attn_bias.to(q.dtype)
        if mask is not None:
            # SDPA takes one mask: fold the boolean one into the additive bias.
            neg_inf = torch.full((), float("-inf"), dtype=q.dtype, device=q.device)
            bias = bias + torch.where(mask, torch.zeros((), dtype=q.dtype, device=q.device), neg_inf)
        mask = bias
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _xformers_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_bias: torch.Tensor | None,
    dropout_p: float,
    scale: float,
) -> torch.Tensor:
    xops = _import_xformers()
    assert xops is not None  # resolve_backend checked
    batch, heads, n_queries, _ = q.shape
    n_keys = k.shape[2]
    bias: torch.Tensor | None = None
    if key_padding_mask is not None or attn_bias is not None:
        # xformers wants the bias as a dense [B, H, Nq, Nk] tensor of q's dtype whose rows start
        # on aligned addresses: allocate the key axis padded to a multiple of 8 and slice it.
        # Without a per-head/per-query bias, store [B, 1, 1, Nk] and broadcast with stride 0,
        # so the padding mask costs B·Nk numbers, not B·H·Nq·Nk.
        padded = -(-n_keys // _BIAS_ALIGN) * _BIAS_ALIGN
        if attn_bias is None:
            shape = (batch, 1, 1, padded)
        else:
            full = torch.broadcast_shapes(attn_bias.shape, (batch, heads, n_queries, n_keys))
            shape = (*full[:3], padded)
        storage = torch.zeros(shape, dtype=q.dtype, device=q.device)
        bias = storage[..., :n_keys]
        if attn_bias is not None:
            bias.copy_(attn_bias.to(q.dtype).expand(bias.shape))
        if key_padding_mask is not None:
            bias.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
        bias = bias.expand(batch, heads, n_queries, n_keys)
    out = xops.memory_efficient_attention(
        q.transpose(1, 2),  # [B, N, H, Dh] is xformers' layout; a view, no copy
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_bias=bias,
        p=dropout_p,
        scale=scale,
    )
    return out.transpose(1, 2)


# --------------------------------------------------------------------------------- modules


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a fused ``qkv`` projection (timm's ``Attention`` layout).

    Args:
        dim: Token width.
        num_heads: Heads; must divide ``dim``.
        qkv_bias: Whether ``qkv`` has a bias (timm ViTs do).
        attn_drop: Dropout on attention weights (training only).
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` ``[B, N, dim]`` to itself, or to ``context`` ``[B, M, dim]``.

        Cross-attention (co-attention layers) reuses the same ``qkv`` weights: queries from
        ``x``, keys and values from ``context``, so one parameter layout serves both uses.
        ``key_padding_mask`` is ``[B, M]`` (or ``[B, N]`` for self-attention).
        """
        b, n, _ = x.shape
        if context is None:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            w_q, w_kv = self.qkv.weight.split([self.dim, 2 * self.dim])
            b_q, b_kv = self.qkv.bias.split([self.dim, 2 * self.dim]) if self.qkv.bias is not None else (None, None)
            q = self._heads(F.linear(x, w_q, b_q))
            m = context.shape[1]
            k, v = F.linear(context, w_kv, b_kv).reshape(b, m, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            attn_bias=attn_bias,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, self.dim)))


class Mlp(nn.Module):
    """Two linear layers with GELU between (timm's ``Mlp``: ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int, *, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Parameter names match timm's ``Block`` (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2``) so ViT/AudioMAE checkpoints load without renaming.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the MLP as a multiple of ``dim``.
        qkv_bias: Bias on the ``qkv`` projection.
        eps: LayerNorm epsilon (1e-6 in timm ViTs and AudioMAE, 1e-5 is PyTorch's default).
        drop: Dropout after the attention projection and in the MLP.
        attn_drop: Dropout on attention weights.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        drop: float = 0.0,
        attn_drop: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = MultiHeadAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``[B, N, dim]`` → ``[B, N, dim]``; ``key_padding_mask`` ``[B, N]``, True = real."""
        x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask, attn_bias=attn_bias)
        return x + self.mlp(self.norm2(x))
