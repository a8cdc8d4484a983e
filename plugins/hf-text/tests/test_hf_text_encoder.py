"""Specification of the ``hf-text`` encoder: RoBERTa, BERT and T5 families, pooling, depth, loading."""

from __future__ import annotations

import logging

import pytest
import torch

import mtrun_hf_text
from mtrun import MtrunError
from mtrun.testing import check_component, isolated_registry
from mtrun_hf_text import HFTextEncoder
from mtrun_hf_text.testing import (
    check_frozen,
    check_masked_mean,
    check_offline_hub_error,
    check_save_pretrained_round_trip,
    check_tokenize_is_picklable,
    check_trainable,
)

TEXTS = ["a calm piano melody", "an upbeat rock song with distorted electric guitars and loud drums", "音楽", "música alegre"]
TINY = ("tiny-roberta", "tiny-bert", "tiny-t5")


def build(preset: str, **kw) -> HFTextEncoder:
    torch.manual_seed(0)
    return HFTextEncoder(HFTextEncoder.Config(preset=preset, **kw))


@pytest.mark.parametrize(("preset", "pooling"), [("tiny-roberta", "mean"), ("tiny-roberta", "pooler"), ("tiny-bert", "cls"), ("tiny-t5", "mean")])
def test_hf_text_honours_the_text_encoder_contract(preset, pooling):
    registry = isolated_registry(mtrun_hf_text)
    enc = check_component(registry, "text_encoder", "hf-text", config=HFTextEncoder.Config(preset=preset, pooling=pooling))
    assert enc.output_dim == 32 and enc.max_length == 77


@pytest.mark.parametrize("preset", TINY)
def test_truncation_to_max_length_keeps_the_closing_token(preset):
    enc = build(preset, max_length=8)
    ids = enc.tokenize(["piano " * 40, "rock"])["input_ids"]
    closing = enc.tokenizer.sep_token_id if enc.family != "t5" else enc.tokenizer.eos_token_id
    assert ids.shape == (2, 8) and ids[0, -1] == closing
    out = enc(**enc.tokenize(TEXTS), output_hidden_states=True)
    assert out.tokens.shape[-1] == 32 and len(out.hidden_states) == 3


@pytest.mark.parametrize("preset", ("tiny-roberta", "tiny-bert"))
def test_each_pooling_matches_an_independent_computation(preset):
    inputs = build(preset).tokenize(TEXTS)
    results = {}
    for pooling in ("cls", "mean", "pooler"):
        enc = build(preset, pooling=pooling).eval()  # same seed: same weights, plus a pooler
        with torch.no_grad():
            out = enc(**inputs)
        lengths = inputs["attention_mask"].sum(1).tolist()
        expected = {
            "cls": out.tokens[:, 0],
            "mean": torch.stack([out.tokens[i, :n].mean(0) for i, n in enumerate(lengths)]),
            "pooler": torch.tanh(out.tokens[:, 0] @ enc.model.pooler.dense.weight.T + enc.model.pooler.dense.bias)
            if pooling == "pooler" else None,
        }[pooling]
        torch.testing.assert_close(out.pooled, expected)
        results[pooling] = out
    # Only the pooler variant builds the pooler (an unused one would get no gradient under DDP).
    assert build(preset, pooling="mean").model.pooler is None
    torch.testing.assert_close(results["cls"].tokens, results["mean"].tokens)


def test_t5_mean_pooling_ignores_padding_and_refuses_cls():
    check_masked_mean(build("tiny-t5").eval(), TEXTS)
    with pytest.raises(MtrunError, match="no(ne)?"):
        build("tiny-t5", pooling="cls")


def test_max_length_beyond_the_position_table_is_refused():
    build("tiny-roberta", max_length=128)  # 130 rows, numbered from pad_token_id + 1
    with pytest.raises(MtrunError, match="128 positions"):
        build("tiny-roberta", max_length=129)


@pytest.mark.parametrize("preset", TINY)
def test_trainable_encoder_gets_gradients_and_frozen_one_none(preset):
    check_trainable(build(preset), TEXTS)
    check_frozen(build(preset, frozen=True), TEXTS)


@pytest.mark.parametrize(("preset", "pooling"), [("tiny-roberta", "pooler"), ("tiny-bert", "cls"), ("tiny-t5", "mean")])
def test_save_pretrained_folder_loads_back_with_every_key_and_same_outputs(tmp_path, preset, pooling):
    enc = build(preset, pooling=pooling)
    loaded = check_save_pretrained_round_trip(
        enc, lambda folder: HFTextEncoder(HFTextEncoder.Config(pretrained=folder, pooling=pooling)), tmp_path, TEXTS
    )
    assert loaded.mask_token_id == enc.mask_token_id and loaded.vocab_size == enc.vocab_size


def test_num_layers_keeps_the_first_layers_of_a_checkpoint(tmp_path, caplog):
    from transformers import BertForMaskedLM

    # A BERT MLM checkpoint, as bert-base-uncased is: its head must be ignored quietly.
    enc = build("tiny-bert")
    torch.manual_seed(2)
    mlm = BertForMaskedLM(enc.model.config).eval()
    mlm.save_pretrained(tmp_path)
    enc.tokenizer.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = HFTextEncoder(HFTextEncoder.Config(pretrained=str(tmp_path), num_layers=1, pooling="cls")).eval()
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("mtrun_hf_text")]
    assert not ours, ours
    assert len(loaded.model.encoder.layer) == 1 and loaded.model.config.num_hidden_layers == 1
    assert not loaded.loading_info["missing_keys"]
    assert any(".layer.1." in k for k in loaded.loading_info["unexpected_keys"])
    # Independent: the MLM model's own encoder cut to its first layer.
    mlm.bert.encoder.layer = mlm.bert.encoder.layer[:1]
    inputs = loaded.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).tokens, mlm.bert(**inputs).last_hidden_state)
    assert len(build("tiny-bert", num_layers=1).model.encoder.layer) == 1
    with pytest.raises(MtrunError, match="only 2 layers"):
        build("tiny-bert", num_layers=3)


def test_roberta_checkpoint_without_pooler_weights(tmp_path):
    enc = build("tiny-roberta", pooling="mean")  # saved without a pooler, like roberta-base
    enc.model.save_pretrained(tmp_path)
    enc.tokenizer.save_pretrained(tmp_path)
    loaded = HFTextEncoder(HFTextEncoder.Config(pretrained=str(tmp_path), pooling="pooler"))
    assert all("pooler" in k for k in loaded.loading_info["missing_keys"])
    assert loaded.model.pooler.dense.weight.requires_grad
    with pytest.raises(MtrunError, match="random pooler"):
        HFTextEncoder(HFTextEncoder.Config(pretrained=str(tmp_path), pooling="pooler", frozen=True))


def test_tokenizer_exposes_mask_token_and_vocabulary_for_mlm():
    for preset, mask in (("tiny-roberta", "<mask>"), ("tiny-bert", "[MASK]")):
        enc = build(preset)
        assert enc.tokenizer.convert_tokens_to_ids(mask) == enc.mask_token_id
        assert enc.vocab_size == len(enc.tokenizer) and 0 <= enc.mask_token_id < enc.vocab_size
    assert build("tiny-roberta").mask_token_id == build("tiny-roberta").vocab_size - 1  # roberta-base's layout


def test_tokenize_equals_the_tokenizers_own_tensors():
    """The list-then-tensor fast path pads, truncates and masks exactly as return_tensors="pt"."""
    texts = TEXTS + ["", "a much longer caption " * 40]  # an empty one and one past max_length
    for preset in ("tiny-roberta", "tiny-bert"):
        enc = build(preset)
        ours = enc.tokenize(texts)
        theirs = enc.tokenizer(texts, padding="longest", truncation=True, max_length=enc.max_length, return_tensors="pt")
        for key in ("input_ids", "attention_mask"):
            assert ours[key].dtype == theirs[key].dtype == torch.long
            assert torch.equal(ours[key], theirs[key])
        assert ours["input_ids"].shape[1] == enc.max_length
        assert {key: tuple(t.shape) for key, t in enc.tokenize([]).items()} == {"input_ids": (0, 0), "attention_mask": (0, 0)}


def test_tokenize_is_picklable_without_the_weights():
    check_tokenize_is_picklable(build("tiny-bert"), TEXTS)


def test_unreachable_hub_name_is_a_clear_error(monkeypatch, tmp_path):
    check_offline_hub_error(
        lambda: HFTextEncoder(HFTextEncoder.Config(pretrained="FacebookAI/roberta-base")), "FacebookAI/roberta-base", monkeypatch, tmp_path
    )
