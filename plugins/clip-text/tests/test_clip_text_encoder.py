"""Specification of the ``clip-text`` encoder: contract, pooling, freezing and loading."""

from __future__ import annotations

import pytest
import torch

import mtrun_clip_text
from mtrun import MtrunError
from mtrun.testing import check_component, isolated_registry
from mtrun_clip_text import ClipTextEncoder
from mtrun_hf_text.testing import (
    check_frozen,
    check_offline_hub_error,
    check_save_pretrained_round_trip,
    check_tokenize_is_picklable,
    check_trainable,
)

TEXTS = ["a calm piano melody", "an upbeat rock song with distorted electric guitars and loud drums", "音楽", "música"]


def tiny(**kw) -> ClipTextEncoder:
    torch.manual_seed(0)
    return ClipTextEncoder(ClipTextEncoder.Config(preset="tiny", **kw))


def test_clip_text_honours_the_text_encoder_contract():
    registry = isolated_registry(mtrun_clip_text)
    for use_projection in (True, False):
        enc = check_component(
            registry, "text_encoder", "clip-text", config=ClipTextEncoder.Config(preset="tiny", use_projection=use_projection)
        )
        assert enc.output_dim == 32 and enc.max_length == 77


def test_shapes_and_mask_follow_the_tokenizer():
    enc = tiny().eval()
    inputs = enc.tokenize(TEXTS)
    out = enc(**inputs, output_hidden_states=True)
    b, n = inputs["input_ids"].shape
    assert out.tokens.shape == (b, n, 32) and out.pooled.shape == (b, 32)
    assert torch.equal(out.mask, inputs["attention_mask"].bool())
    assert len(out.hidden_states) == 3  # embeddings + 2 layers


def test_tokenize_truncates_to_max_length_and_keeps_end_of_text():
    enc = tiny(max_length=12)
    inputs = enc.tokenize(["piano " * 50, "rock"])
    ids = inputs["input_ids"]
    assert ids.shape == (2, 12)
    assert ids[0, 0] == enc.tokenizer.bos_token_id and ids[0, -1] == enc.tokenizer.eos_token_id


def test_max_length_beyond_the_position_table_is_refused():
    with pytest.raises(MtrunError, match="77 positions"):
        tiny(max_length=78)


def test_pooled_is_the_projected_state_at_the_first_end_of_text_token():
    enc = tiny().eval()
    inputs = enc.tokenize(TEXTS)
    eos = enc.tokenizer.eos_token_id
    with torch.no_grad():
        out = enc(**inputs)
        hidden = enc.model.text_model(**inputs).last_hidden_state
    # Independent: find each row's first end-of-text token in plain Python.
    positions = [row.index(eos) for row in inputs["input_ids"].tolist()]
    expected = torch.stack([hidden[i, p] for i, p in enumerate(positions)]) @ enc.model.text_projection.weight.T
    torch.testing.assert_close(out.pooled, expected)
    # Pads share the end-of-text id, so "first" matters: the short rows are padded.
    assert any(row.count(eos) > 1 for row in inputs["input_ids"].tolist())


def test_pooled_equals_transformers_text_embeds_for_both_eos_conventions():
    enc = tiny().eval()
    inputs = enc.tokenize(TEXTS)
    with torch.no_grad():
        ours = enc(**inputs).pooled
        assert enc.model.text_model.eos_token_id == enc.tokenizer.eos_token_id
        torch.testing.assert_close(ours, enc.model(**inputs).text_embeds)
        # Legacy hub configs (eos_token_id == 2) make transformers take the argmax id; our tiny
        # vocabulary puts end-of-text last like CLIP's, so the two agree there too.
        enc.model.text_model.eos_token_id = 2
        torch.testing.assert_close(ours, enc.model(**inputs).text_embeds)


def test_without_projection_pooled_is_the_raw_end_of_text_state():
    enc = tiny(use_projection=False).eval()
    inputs = enc.tokenize(TEXTS)
    with torch.no_grad():
        out = enc(**inputs)
        pooler = enc.model.text_model(**inputs).pooler_output
    torch.testing.assert_close(out.pooled, pooler)


def test_trainable_tower_gets_gradients_and_frozen_one_none():
    enc = tiny()
    check_trainable(enc, TEXTS, enc.model.text_projection.weight, enc.model.text_model.embeddings.token_embedding.weight)
    check_frozen(tiny(frozen=True), TEXTS)


def test_tokenize_is_picklable_without_the_weights():
    check_tokenize_is_picklable(tiny(), TEXTS)


def test_save_pretrained_folder_loads_back_with_every_key_and_same_outputs(tmp_path):
    load = lambda folder: ClipTextEncoder(ClipTextEncoder.Config(pretrained=folder))  # noqa: E731
    check_save_pretrained_round_trip(tiny(), load, tmp_path, TEXTS)


def test_a_full_clip_checkpoint_loads_its_text_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    enc = tiny()
    text_config = enc.model.config.to_dict()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16, projection_dim=32)
    torch.manual_seed(1)
    clip = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision, projection_dim=32)).eval()
    clip.save_pretrained(tmp_path)
    enc.tokenizer.save_pretrained(tmp_path)
    loaded = ClipTextEncoder(ClipTextEncoder.Config(pretrained=str(tmp_path))).eval()
    assert not loaded.loading_info["missing_keys"]
    inputs = loaded.tokenize(TEXTS)
    with torch.no_grad():
        expected = clip.text_projection(clip.text_model(**inputs).pooler_output)
        torch.testing.assert_close(loaded(**inputs).pooled, expected)


def test_unreachable_hub_name_is_a_clear_error(monkeypatch, tmp_path):
    name = "openai/clip-vit-base-patch32"
    check_offline_hub_error(lambda: ClipTextEncoder(ClipTextEncoder.Config(pretrained=name)), name, monkeypatch, tmp_path)
