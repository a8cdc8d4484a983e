"""Specification of the ``clip-text`` encoder: contract, pooling, freezing and loading."""

from __future__ import annotations

import pickle
import time

import pytest
import torch

import mtrun_clip_text
from mtrun.errors import MtrunError
from mtrun.testing import check_component, isolated_registry
from mtrun_clip_text import ClipTextEncoder
from mtrun_clip_text import tiny_tokenizer

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


def test_trainable_tower_gets_gradients_and_runs_fast():
    enc = tiny().train()
    inputs = enc.tokenize(TEXTS)
    timings = []
    for _ in range(3):  # best of three: the check is about the model, not a busy machine
        enc.zero_grad()
        start = time.perf_counter()
        out = enc(**inputs)
        (out.pooled.sum() + out.tokens.mean()).backward()
        timings.append(time.perf_counter() - start)
    assert min(timings) < 1.0
    assert enc.model.text_projection.weight.grad is not None
    assert enc.model.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0


def test_frozen_tower_has_no_gradients_and_stays_in_eval():
    enc = tiny(frozen=True)
    parent = torch.nn.Sequential(enc)
    parent.train()
    assert enc.training and not enc.model.training
    assert not any(m.training for m in enc.model.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    out = enc(**enc.tokenize(TEXTS))
    assert not out.pooled.requires_grad and not out.tokens.requires_grad


def test_tokenize_is_picklable_without_the_weights():
    enc = tiny()
    blob = pickle.dumps(enc.tokenize)
    weights = sum(p.numel() * p.element_size() for p in enc.parameters())
    assert len(blob) < weights
    again = pickle.loads(blob)(TEXTS)
    for key, value in enc.tokenize(TEXTS).items():
        assert torch.equal(again[key], value)


def test_tiny_tokenizer_is_deterministic_and_covers_other_scripts():
    first = tiny_tokenizer._vocab_and_merges()
    tiny_tokenizer._vocab_and_merges.cache_clear()
    assert tiny_tokenizer._vocab_and_merges() == first
    tok = tiny_tokenizer.build_tiny_clip_tokenizer()
    vocab = first[0]
    # CLIP's layout: end-of-text is the largest id, start-of-text just before it.
    assert tok.eos_token_id == len(vocab) - 1 and tok.bos_token_id == len(vocab) - 2
    for word in ("音楽", "música", "музыка"):
        # CLIP's unknown token is end-of-text; byte-level BPE must never need it.
        assert tok.unk_token_id not in tok(word)["input_ids"][1:-1]
        assert tok.decode(tok(word)["input_ids"], skip_special_tokens=True) == word


def test_save_pretrained_folder_loads_back_with_every_key_and_same_outputs(tmp_path):
    enc = tiny().eval()
    enc.model.save_pretrained(tmp_path)
    enc.tokenizer.save_pretrained(tmp_path)
    loaded = ClipTextEncoder(ClipTextEncoder.Config(pretrained=str(tmp_path))).eval()
    info = loaded.loading_info
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    theirs, ours = loaded.model.state_dict(), enc.model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    inputs = enc.tokenize(TEXTS)
    again = loaded.tokenize(TEXTS)
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    with torch.no_grad():
        a, b = enc(**inputs), loaded(**again)
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.tokens, b.tokens)


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
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MtrunError, match=r"openai/clip-vit-base-patch32.*local folder"):
        ClipTextEncoder(ClipTextEncoder.Config(pretrained="openai/clip-vit-base-patch32"))
