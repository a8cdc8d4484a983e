"""Checks shared by the tests of transformers-based text encoders (``hf-text``, ``clip-text``, ``mt5``).

Each ``check_*`` takes a built encoder (an :class:`~mtrun_hf_text.base.HFTextEncoderBase` or
anything with ``tokenizer``, ``model``, ``tokenize`` and ``forward``) and raises
``AssertionError`` on failure. They complement :func:`mtrun.testing.check_component`, which
checks the text-encoder contract itself. Only :func:`check_offline_hub_error` needs pytest.

Example::

    from mtrun_hf_text.testing import check_frozen, check_tokenize_is_picklable

    def test_frozen_encoder():
        check_frozen(MyEncoder(MyEncoder.Config(preset="tiny", frozen=True)), ["a calm piano melody"])
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "check_frozen",
    "check_masked_mean",
    "check_offline_hub_error",
    "check_save_pretrained_round_trip",
    "check_tokenize_is_picklable",
    "check_trainable",
    "same_state",
]


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules have the same state-dict keys and bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def check_tokenize_is_picklable(enc: Any, texts: Sequence[str]) -> None:
    """``enc.tokenize`` pickles to less than the weights and tokenizes the same after a round trip."""
    blob = pickle.dumps(enc.tokenize)
    assert len(blob) < sum(p.numel() * p.element_size() for p in enc.parameters())
    again = pickle.loads(blob)(texts)
    assert all(torch.equal(again[k], v) for k, v in enc.tokenize(texts).items())


def check_trainable(enc: Any, texts: Sequence[str], *params: torch.Tensor, seconds: float = 1.0) -> None:
    """A training step reaches ``params`` (default: the input embeddings) within ``seconds``
    (best of three: the check is about the model, not a busy machine)."""
    enc.train()
    inputs = enc.tokenize(texts)
    timings = []
    for _ in range(3):
        enc.zero_grad()
        start = time.perf_counter()
        out = enc(**inputs)
        (out.pooled.pow(2).sum() + out.tokens.mean()).backward()
        timings.append(time.perf_counter() - start)
    assert min(timings) < seconds, timings
    for param in params or (enc.model.get_input_embeddings().weight,):
        assert param.grad is not None and param.grad.abs().sum() > 0


def check_frozen(enc: Any, texts: Sequence[str]) -> None:
    """A frozen encoder has no trainable parameters, its model stays in eval when a parent
    module trains, and its outputs carry no graph."""
    torch.nn.Sequential(enc).train()
    assert enc.training and not any(m.training for m in enc.model.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    out = enc(**enc.tokenize(texts))
    assert not out.pooled.requires_grad and not out.tokens.requires_grad


def check_masked_mean(enc: Any, texts: Sequence[str]) -> None:
    """``pooled`` is the mean of ``tokens`` over real tokens, and padding never leaks in: each
    text alone gives the vector it gets inside the batch."""
    inputs = enc.tokenize(texts)
    with torch.no_grad():
        out = enc(**inputs)
        lengths = inputs["attention_mask"].sum(1).tolist()
        assert min(lengths) < max(lengths), "texts of one length do not test the padding"
        torch.testing.assert_close(out.pooled, torch.stack([out.tokens[i, :n].mean(0) for i, n in enumerate(lengths)]))
        for i, text in enumerate(texts):
            torch.testing.assert_close(enc(**enc.tokenize([text])).pooled[0], out.pooled[i], atol=1e-5, rtol=1e-5)


def check_save_pretrained_round_trip(enc: Any, load: Callable[[str], Any], folder: str | Path, texts: Sequence[str]) -> Any:
    """Save ``enc``'s model and tokenizer to ``folder``, load them with ``load(folder)``, and
    require every key matched, the same weights, the same ids and bit-identical outputs.

    Returns:
        The loaded encoder.
    """
    enc.eval()
    enc.model.save_pretrained(folder)
    enc.tokenizer.save_pretrained(folder)
    loaded = load(str(folder)).eval()
    info = loaded.loading_info
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(loaded.model) is type(enc.model) and same_state(enc.model, loaded.model)
    inputs, again = enc.tokenize(texts), loaded.tokenize(texts)
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    with torch.no_grad():
        a, b = enc(**inputs), loaded(**again)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    return loaded


def check_offline_hub_error(build: Callable[[], Any], name: str, monkeypatch: Any, cache_dir: str | Path) -> None:
    """With the hub offline and an empty cache, ``build()`` raises an ``MtrunError`` naming
    ``name`` and suggesting a local folder."""
    import re

    import huggingface_hub.constants
    import pytest

    from mtrun import MtrunError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache_dir))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MtrunError, match=re.escape(name) + ".*local folder"):
        build()
