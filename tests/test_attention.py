"""The attention function: same numbers as a float64 reference on every backend."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from mtrun.nn import MultiHeadAttention, TransformerBlock, attention, attention_backend

# `mtrun.nn.attention` the attribute is the function; the module is reached through importlib.
attention_module = importlib.import_module("mtrun.nn.attention")


def reference_attention(q, k, v, key_padding_mask=None, attn_bias=None, scale=None):
    """softmax(Q Kᵀ · scale + mask) V computed explicitly in float64; empty rows give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if attn_bias is not None:
        logits = logits + attn_bias.double()
    if key_padding_mask is not None:
        logits = logits.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    weights = torch.exp(logits - logits.amax(-1, keepdim=True).clamp_min(-1e300))
    weights = weights / weights.sum(-1, keepdim=True)
    weights = torch.nan_to_num(weights, nan=0.0)  # rows with no keys: 0/0 -> no contribution
    return torch.einsum("bhqk,bhkd->bhqd", weights, v)


def random_qkv(b, h, nq, nk, d, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape_q, shape_k = (b, h, nq, d), (b, h, nk, d)
    q = torch.randn(shape_q, generator=gen, dtype=dtype).to(device)
    k = torch.randn(shape_k, generator=gen, dtype=dtype).to(device)
    v = torch.randn(shape_k, generator=gen, dtype=dtype).to(device)
    return q, k, v


def random_padding_mask(b, nk, seed=1):
    """At least one real key per row; the lengths differ between rows."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, nk + 1, (b,), generator=gen)
    return torch.arange(nk)[None, :] < lengths[:, None]


SHAPES = [
    # (B, H, Nq, Nk, Dh)
    (2, 4, 7, 7, 16),
    (3, 2, 1, 13, 8),  # one query ([CLS] pooling)
    (1, 3, 9, 5, 32),  # cross-attention, fewer keys than queries
    (2, 12, 33, 64, 64),  # ViT-like head width, keys not a multiple of 8 on the query side
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_sdpa_matches_float64_reference(shape, masked):
    b, h, nq, nk, d = shape
    q, k, v = random_qkv(*shape)
    mask = random_padding_mask(b, nk) if masked else None
    out = attention(q, k, v, key_padding_mask=mask)
    assert out.shape == (b, h, nq, d) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_padded_keys_have_no_influence_on_the_output():
    q, k, v = random_qkv(2, 2, 5, 9, 8)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 6:] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:] = 1e3 * torch.randn_like(k2[:, :, 6:])
    v2[:, :, 6:] = -1e3
    torch.testing.assert_close(attention(q, k, v, key_padding_mask=mask), attention(q, k2, v2, key_padding_mask=mask))


def test_custom_scale_and_additive_bias_match_reference():
    q, k, v = random_qkv(2, 3, 6, 10, 16)
    bias = torch.randn(1, 3, 6, 10, generator=torch.Generator().manual_seed(5))
    mask = random_padding_mask(2, 10)
    out = attention(q, k, v, key_padding_mask=mask, attn_bias=bias, scale=0.3)
    ref = reference_attention(q, k, v, mask, attn_bias=bias, scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_return_zeros_not_nan():
    q, k, v = random_qkv(3, 2, 4, 6, 8)
    mask = random_padding_mask(3, 6)
    mask[1] = False  # the second item has no real key at all
    out = attention(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_give_finite_zero_gradients():
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 2, 3, 5, 4))
    mask = torch.tensor([[True, True, False, False, False], [False] * 5])
    attention(q, k, v, key_padding_mask=mask).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))


def test_integer_padding_mask_is_accepted_like_a_tokenizer_attention_mask():
    q, k, v = random_qkv(2, 2, 4, 6, 8)
    bool_mask = random_padding_mask(2, 6)
    torch.testing.assert_close(
        attention(q, k, v, key_padding_mask=bool_mask.long()), attention(q, k, v, key_padding_mask=bool_mask)
    )


def test_gradients_match_float64_reference():
    q, k, v = random_qkv(2, 3, 5, 7, 8, dtype=torch.float64)
    mask = random_padding_mask(2, 7)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    upstream = torch.randn(2, 3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (attention(*inputs, key_padding_mask=mask) * upstream).sum().backward()
    (reference_attention(*refs, key_padding_mask=mask) * upstream).sum().backward()
    for got, want in zip(inputs, refs):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-10, rtol=1e-8)


def test_gradcheck_through_padding_mask():
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 3, 4, 3, dtype=torch.float64))
    mask = torch.tensor([[True, True, True, False]])
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, key_padding_mask=mask), (q, k, v))


def test_wrong_mask_shape_is_reported():
    q, k, v = random_qkv(2, 2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, Nk\]"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 3, dtype=torch.bool))


def test_forcing_an_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="must be one of"):
        with attention_backend("flash"):  # type: ignore[arg-type]
            pass


def test_forcing_xformers_on_cpu_tensors_fails_loudly():
    q, k, v = random_qkv(1, 1, 2, 2, 4)
    with attention_backend("xformers"), pytest.raises(RuntimeError, match="not on a CUDA device"):
        attention(q, k, v)


@pytest.fixture
def exploding_xformers(monkeypatch):
    """A fake ``xformers.ops`` that imports fine but raises if any kernel is called."""

    def explode(*args, **kwargs):
        raise AssertionError("xformers must not be called for CPU tensors")

    package = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = explode
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no import-time kernel check
    attention_module._reset_xformers_cache()
    yield ops
    attention_module._reset_xformers_cache()


def _fake_xformers(monkeypatch, kernel):
    """Install a fake xformers whose kernel is ``kernel`` and make the import-time check run it
    on the CPU, as if CUDA were there."""
    package = types.ModuleType("xformers")
    package.__version__ = "0.0.0-fake"
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = kernel
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention_module, "_PROBE_DEVICE", "cpu")
    monkeypatch.setattr(attention_module, "_probe_dtypes", lambda: (torch.float32, torch.float16, torch.bfloat16))
    monkeypatch.setattr(attention_module, "_xformers_ops", attention_module._UNTRIED)
    monkeypatch.setattr(attention_module, "_xformers_refused", frozenset())
    return ops


def test_an_xformers_build_whose_kernels_fail_is_not_used_and_the_warning_says_why(monkeypatch):
    """An xformers wheel built for another torch imports but cannot run (seen with 0.0.35 under
    torch 2.11): auto must fall back to SDPA instead of crashing the first training step."""
    calls = []

    def broken(*args, **kwargs):
        calls.append(args[0].shape)
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    _fake_xformers(monkeypatch, broken)
    with pytest.warns(RuntimeWarning, match="xformers 0.0.0-fake is installed but its CUDA kernels do not run"):
        assert attention_module._import_xformers() is None
    assert calls == [(1, 8, 1, 16)] * 3  # each precision tried
    assert attention_module._import_xformers() is None and len(calls) == 3  # checked once per process


def test_an_xformers_build_whose_backward_fails_is_not_used(monkeypatch):
    """A failing backward would surface inside autograd, past the per-call fallback."""

    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            return q.clone()

        @staticmethod
        def backward(ctx, grad):
            raise NotImplementedError("No operator found for `memory_efficient_attention_backward`")

    _fake_xformers(monkeypatch, lambda q, k, v, attn_bias=None, p=0.0, scale=None: NoBackward.apply(q))
    with pytest.warns(RuntimeWarning, match="its CUDA kernels do not run with .*memory_efficient_attention_backward"):
        assert attention_module._import_xformers() is None


def test_a_precision_whose_xformers_kernels_fail_uses_sdpa_and_the_others_keep_xformers(monkeypatch):
    def no_bf16(q, k, v, attn_bias=None, p=0.0, scale=None):
        if q.dtype == torch.bfloat16:
            raise NotImplementedError("No operator found for bf16")
        return q * 1

    ops = _fake_xformers(monkeypatch, no_bf16)
    with pytest.warns(RuntimeWarning, match=r"do not run in bfloat16 \(attention in those uses SDPA\)"):
        assert attention_module._import_xformers() is ops
    cuda = torch.device("cuda")
    assert attention_module.resolve_backend(cuda, dtype=torch.float16) == "xformers"
    assert attention_module.resolve_backend(cuda, dtype=torch.bfloat16) == "sdpa"
    with pytest.raises(RuntimeError, match="bfloat16 kernels failed the import check"):
        attention_module.resolve_backend(cuda, "xformers", dtype=torch.bfloat16)


def test_the_import_check_runs_its_backward_even_when_first_reached_under_no_grad(monkeypatch):
    """The first attention call is often a frozen encoder's or an evaluation's, under no_grad."""
    ops = _fake_xformers(monkeypatch, lambda q, k, v, attn_bias=None, p=0.0, scale=None: q * 1)
    with torch.no_grad():
        assert attention_module._import_xformers() is ops
    monkeypatch.setattr(attention_module, "_xformers_ops", attention_module._UNTRIED)
    with torch.inference_mode():
        assert attention_module._import_xformers() is ops


def test_bf16_is_checked_only_where_the_gpu_has_it_natively(monkeypatch):
    asked = []

    def supported(answer):
        def fake(including_emulation=True):
            asked.append(including_emulation)
            if isinstance(answer, Exception):
                raise answer
            return answer

        return fake

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported(True))
    assert attention_module._probe_dtypes() == (torch.float32, torch.float16, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported(False))
    assert attention_module._probe_dtypes() == (torch.float32, torch.float16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported(RuntimeError("no driver")))
    assert attention_module._probe_dtypes() == (torch.float32, torch.float16)
    assert asked == [False, False, False]  # emulated bf16 (V100, T4) has no xformers kernels


def test_a_working_xformers_build_passes_the_import_check(monkeypatch):
    ops = _fake_xformers(monkeypatch, lambda q, k, v, attn_bias=None, p=0.0, scale=None: q)
    assert attention_module._import_xformers() is ops


def test_auto_uses_sdpa_for_inputs_xformers_has_no_kernel_for_but_forcing_xformers_raises(monkeypatch):
    calls = []

    def no_kernel(*args, **kwargs):
        calls.append(args[0].shape)
        raise NotImplementedError("No operator found for these inputs")

    monkeypatch.setattr(attention_module, "_warned", set())  # warned once per process: start afresh
    monkeypatch.setattr(attention_module, "_xformers_no_kernel", set())
    monkeypatch.setattr(attention_module, "_xformers_ops", types.SimpleNamespace(memory_efficient_attention=no_kernel))
    monkeypatch.setattr(attention_module, "resolve_backend", lambda device, backend=None, dtype=None: "xformers")
    q, k, v = random_qkv(2, 2, 4, 6, 8)
    mask = random_padding_mask(2, 6)
    with pytest.warns(RuntimeWarning, match="xformers has no kernel for these inputs"):
        out = attention(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, key_padding_mask=mask), out)
    assert len(calls) == 1  # the next call like it goes to SDPA without trying xformers again
    with pytest.raises(NotImplementedError):
        attention(q, k, v, key_padding_mask=mask, backend="xformers")
    assert len(calls) == 2  # forcing xformers still tries it


def test_cpu_tensors_never_reach_xformers_even_when_it_imports(exploding_xformers):
    q, k, v = random_qkv(2, 2, 4, 6, 8)
    mask = random_padding_mask(2, 6)
    assert attention_module._import_xformers() is exploding_xformers  # the fake is importable
    out = attention(q, k, v, key_padding_mask=mask)  # default "auto" backend
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert attention_module.resolve_backend(torch.device("cpu")) == "sdpa"


def test_xformers_adapter_passes_its_layout_and_an_aligned_bias(monkeypatch):
    """Runs the xformers code path on CPU against a stand-in kernel that enforces xformers'
    input rules ([B, N, H, Dh] layout, dense 4-D bias of q's dtype, strides aligned to 8), so
    the adapter's transposes and bias construction are checked even without a GPU."""
    seen = {}

    def fake_kernel(query, key, value, attn_bias=None, p=0.0, scale=None):
        b, nq, h, d = query.shape
        nk = key.shape[1]
        assert attn_bias.shape == (b, h, nq, nk) and attn_bias.dtype == query.dtype
        assert all(stride % 8 == 0 for stride in attn_bias.stride()[:-1]), attn_bias.stride()
        seen["bias"] = attn_bias
        out = reference_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=attn_bias, scale=scale
        )
        return out.transpose(1, 2).to(query.dtype)

    ops = types.SimpleNamespace(memory_efficient_attention=fake_kernel)
    monkeypatch.setattr(attention_module, "_xformers_ops", ops)
    q, k, v = random_qkv(2, 3, 5, 11, 8)  # 11 keys: not a multiple of 8
    mask = random_padding_mask(2, 11)
    bias = torch.randn(1, 3, 5, 11, generator=torch.Generator().manual_seed(7))
    for kwargs in ({"key_padding_mask": mask}, {"key_padding_mask": mask, "attn_bias": bias}):
        out = attention_module._xformers_attention(q, k, v, kwargs["key_padding_mask"], kwargs.get("attn_bias"), 0.0, 8**-0.5)
        ref = reference_attention(q, k, v, mask, attn_bias=kwargs.get("attn_bias"))
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert seen["bias"].shape == (2, 3, 5, 11)


def _xformers_usable() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device: xformers has no CPU kernels"
    attention_module._reset_xformers_cache()
    if attention_module._import_xformers() is None:
        return False, "xformers.ops does not import (install mtrun[xformers])"
    return True, ""


_XF_OK, _XF_WHY = _xformers_usable()


@pytest.mark.skipif(not _XF_OK, reason=_XF_WHY)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_xformers_matches_sdpa_on_cuda(shape, dtype):
    b, h, nq, nk, d = shape
    q, k, v = random_qkv(*shape, dtype=dtype, device="cuda")
    mask = random_padding_mask(b, nk).cuda()
    mask[0] = False  # also a fully masked row
    bias = torch.randn(1, h, nq, nk, device="cuda", dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    for kwargs in ({}, {"key_padding_mask": mask}, {"key_padding_mask": mask, "attn_bias": bias}):
        assert attention_module.resolve_backend(q.device) == "xformers"
        with attention_backend("xformers"):
            fast = attention(q, k, v, **kwargs)
        with attention_backend("sdpa"):
            slow = attention(q, k, v, **kwargs)
        torch.testing.assert_close(fast, slow, **tol)


@pytest.mark.skipif(not _XF_OK, reason=_XF_WHY)
def test_xformers_gradients_match_sdpa_on_cuda():
    q, k, v = random_qkv(2, 4, 9, 11, 16, device="cuda")
    mask = random_padding_mask(2, 11).cuda()
    grads = {}
    for backend in ("xformers", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, key_padding_mask=mask, backend=backend).square().sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for a, b in zip(grads["xformers"], grads["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- the modules


def test_multi_head_attention_uses_timm_parameter_names():
    names = set(MultiHeadAttention(32, 4).state_dict())
    assert names == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


def test_transformer_block_uses_timm_parameter_names_and_eps():
    block = TransformerBlock(32, 4, mlp_ratio=2.0, eps=1e-6)
    names = set(block.state_dict())
    expected = {f"{m}.{p}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
    assert names == expected
    assert block.norm1.eps == 1e-6 and block.mlp.fc1.out_features == 64


def test_multi_head_attention_matches_explicit_computation():
    torch.manual_seed(0)
    mha = MultiHeadAttention(24, 3).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    q, k, v = mha.qkv(x).reshape(2, 5, 3, 3, 8).permute(2, 0, 3, 1, 4)
    expected = mha.proj(reference_attention(q, k, v, mask).transpose(1, 2).reshape(2, 5, 24))
    torch.testing.assert_close(mha(x, key_padding_mask=mask), expected)


def test_cross_attention_uses_query_rows_of_qkv_for_x_and_key_value_rows_for_context():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    ctx = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = random_padding_mask(2, 7)
    q = mha.qkv(x)[..., :16].reshape(2, 3, 2, 8).transpose(1, 2)
    kv = mha.qkv(ctx)[..., 16:].reshape(2, 7, 2, 2, 8).permute(2, 0, 3, 1, 4)
    expected = mha.proj(reference_attention(q, kv[0], kv[1], mask).transpose(1, 2).reshape(2, 3, 16))
    out = mha(x, context=ctx, key_padding_mask=mask)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out, expected)


def test_transformer_block_ignores_padded_tokens():
    torch.manual_seed(0)
    block = TransformerBlock(16, 2).eval()
    x = torch.randn(1, 6, 16)
    mask = torch.tensor([[True, True, True, True, False, False]])
    noisy = x.clone()
    noisy[:, 4:] = 100.0
    out_a = block(x, key_padding_mask=mask)
    out_b = block(noisy, key_padding_mask=mask)
    torch.testing.assert_close(out_a[:, :4], out_b[:, :4])


def test_bf16_attention_on_cpu_is_computed_in_float32_and_returned_in_bf16():
    """CPU SDPA's bf16 backward is several times slower than float32 (benchmarks/precision.py):
    the weights are formed in float32, the result handed back in bf16 like the inputs."""
    from torch.nn import functional as F

    from mtrun.nn.attention import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g).to(torch.bfloat16).requires_grad_(True) for _ in range(3))
    out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16
