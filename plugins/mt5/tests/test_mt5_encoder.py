"""Specification of the ``mt5`` encoder: contract, masked mean, multilingual tokens, loading."""

from __future__ import annotations

import pickle
import time

import pytest
import torch

import mtrun_mt5
from mtrun.errors import MtrunError
from mtrun.testing import check_component, isolated_registry
from mtrun_mt5 import MT5TextEncoder
from mtrun_mt5 import tiny_tokenizer

TEXTS = ["a calm piano melody", "an upbeat rock song with distorted electric guitars and loud drums", "音楽", "música alegre"]
MULTILINGUAL = ["音楽", "música", "музыка", "음악", "音乐", "संगीत", "موسيقى", "μουσική"]


def tiny(**kw) -> MT5TextEncoder:
    torch.manual_seed(0)
    return MT5TextEncoder(MT5TextEncoder.Config(preset="tiny", **kw))


def test_mt5_honours_the_text_encoder_contract():
    enc = check_component(isolated_registry(mtrun_mt5), "text_encoder", "mt5", config=MT5TextEncoder.Config(preset="tiny"))
    assert enc.output_dim == 32 and enc.max_length == 128


def test_shapes_mask_and_hidden_states():
    enc = tiny().eval()
    inputs = enc.tokenize(TEXTS)
    out = enc(**inputs, output_hidden_states=True)
    b, n = inputs["input_ids"].shape
    assert out.tokens.shape == (b, n, 32) and out.pooled.shape == (b, 32)
    assert torch.equal(out.mask, inputs["attention_mask"].bool()) and not out.mask.all()
    assert len(out.hidden_states) == 3


def test_tokenize_truncates_to_max_length_and_ends_with_eos():
    enc = tiny(max_length=6)
    ids = enc.tokenize(["piano " * 40, "rock"])["input_ids"]
    assert ids.shape == (2, 6) and ids[0, -1] == enc.tokenizer.eos_token_id


def test_pooled_is_the_mean_over_real_tokens_only():
    enc = tiny().eval()
    inputs = enc.tokenize(TEXTS)
    with torch.no_grad():
        out = enc(**inputs)
    lengths = inputs["attention_mask"].sum(1).tolist()
    expected = torch.stack([out.tokens[i, :n].mean(0) for i, n in enumerate(lengths)])
    torch.testing.assert_close(out.pooled, expected)
    # Padding must not leak in: each caption alone gives the same vector as inside the batch.
    with torch.no_grad():
        for i, text in enumerate(TEXTS):
            alone = enc(**enc.tokenize([text])).pooled[0]
            torch.testing.assert_close(alone, out.pooled[i], atol=1e-5, rtol=1e-5)


def test_non_latin_scripts_tokenize_to_known_pieces():
    tok = tiny_tokenizer.build_tiny_mt5_tokenizer()
    for word in MULTILINGUAL:
        ids = tok(word)["input_ids"]
        assert tok.unk_token_id not in ids, (word, tok.convert_ids_to_tokens(ids))
        assert tok.decode(ids, skip_special_tokens=True) == word
    # A script outside the tiny corpus does map to <unk>; the real mT5 vocabulary covers it.
    assert tok.unk_token_id in tok("ภาษาไทย")["input_ids"]


def test_tiny_tokenizer_is_deterministic_with_mt5_special_ids():
    first = tiny_tokenizer.tiny_vocab()
    tiny_tokenizer.tiny_vocab.cache_clear()
    assert tiny_tokenizer.tiny_vocab() == first
    tok = tiny_tokenizer.build_tiny_mt5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)


def test_trainable_encoder_gets_gradients_and_runs_fast():
    enc = tiny().train()
    inputs = enc.tokenize(TEXTS)
    timings = []
    for _ in range(3):  # best of three: the check is about the model, not a busy machine
        enc.zero_grad()
        start = time.perf_counter()
        enc(**inputs).pooled.pow(2).sum().backward()
        timings.append(time.perf_counter() - start)
    assert min(timings) < 1.0
    assert enc.model.shared.weight.grad.abs().sum() > 0


def test_frozen_encoder_has_no_gradients_and_stays_in_eval():
    enc = tiny(frozen=True)
    torch.nn.Sequential(enc).train()
    assert not any(m.training for m in enc.model.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc(**enc.tokenize(TEXTS)).pooled.requires_grad


def test_tokenize_is_picklable_without_the_weights():
    enc = tiny()
    blob = pickle.dumps(enc.tokenize)
    assert len(blob) < sum(p.numel() * p.element_size() for p in enc.parameters())
    again = pickle.loads(blob)(MULTILINGUAL)
    assert all(torch.equal(again[k], v) for k, v in enc.tokenize(MULTILINGUAL).items())


def test_save_pretrained_folder_loads_back_with_every_key_and_same_outputs(tmp_path):
    enc = tiny().eval()
    enc.model.save_pretrained(tmp_path)
    enc.tokenizer.save_pretrained(tmp_path)
    loaded = MT5TextEncoder(MT5TextEncoder.Config(pretrained=str(tmp_path))).eval()
    info = loaded.loading_info
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours, theirs = enc.model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    inputs, again = enc.tokenize(MULTILINGUAL), loaded.tokenize(MULTILINGUAL)
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    with torch.no_grad():
        a, b = enc(**inputs), loaded(**again)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)


def test_a_full_seq2seq_checkpoint_loads_its_encoder(tmp_path):
    from transformers import MT5ForConditionalGeneration

    enc = tiny()
    torch.manual_seed(1)
    full = MT5ForConditionalGeneration(enc.model.config.__class__(**{**enc.model.config.to_dict(), "is_encoder_decoder": True})).eval()
    full.save_pretrained(tmp_path)
    enc.tokenizer.save_pretrained(tmp_path)
    loaded = MT5TextEncoder(MT5TextEncoder.Config(pretrained=str(tmp_path))).eval()
    assert not loaded.loading_info["missing_keys"]
    inputs = loaded.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).tokens, full.encoder(**inputs).last_hidden_state)


def test_unreachable_hub_name_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MtrunError, match=r"google/mt5-small.*local folder"):
        MT5TextEncoder(MT5TextEncoder.Config(pretrained="google/mt5-small"))
