"""Specification of the ``mt5`` encoder: contract, masked mean, multilingual tokens, loading."""

from __future__ import annotations

import torch

import mtrun_mt5
from mtrun.testing import check_component, isolated_registry
from mtrun_hf_text.testing import (
    check_frozen,
    check_masked_mean,
    check_offline_hub_error,
    check_save_pretrained_round_trip,
    check_tokenize_is_picklable,
    check_trainable,
)
from mtrun_mt5 import MT5TextEncoder

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
    check_masked_mean(tiny().eval(), TEXTS)


def test_trainable_encoder_gets_gradients_and_frozen_one_none():
    enc = tiny()
    check_trainable(enc, TEXTS, enc.model.shared.weight)
    check_frozen(tiny(frozen=True), TEXTS)


def test_tokenize_is_picklable_without_the_weights():
    check_tokenize_is_picklable(tiny(), MULTILINGUAL)


def test_save_pretrained_folder_loads_back_with_every_key_and_same_outputs(tmp_path):
    load = lambda folder: MT5TextEncoder(MT5TextEncoder.Config(pretrained=folder))  # noqa: E731
    check_save_pretrained_round_trip(tiny(), load, tmp_path, MULTILINGUAL)


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
    name = "google/mt5-small"
    check_offline_hub_error(lambda: MT5TextEncoder(MT5TextEncoder.Config(pretrained=name)), name, monkeypatch, tmp_path)


def test_a_folder_of_another_model_is_a_clear_error(tmp_path):
    import pytest
    from transformers import BertConfig, BertModel

    from mtrun import MtrunError

    BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)).save_pretrained(tmp_path)
    with pytest.raises(MtrunError, match=str(tmp_path)):
        MT5TextEncoder(MT5TextEncoder.Config(pretrained=str(tmp_path)))
