"""The offline tiny tokenizers of every family: deterministic, each in its family's layout, and
covering the scripts of their corpus."""

from __future__ import annotations

import pytest

from mtrun_hf_text import tiny_tokenizers
from mtrun_hf_text.tiny_tokenizers import FAMILIES, build_tiny_tokenizer, tiny_vocab

WORDS = ("音楽", "música", "музыка")
MULTILINGUAL = ("音楽", "música", "музыка", "음악", "音乐", "संगीत", "موسيقى", "μουσική")


def test_vocabularies_are_deterministic():
    first = {family: tiny_vocab(family) for family in FAMILIES}
    tiny_vocab.cache_clear()
    assert {family: tiny_vocab(family) for family in FAMILIES} == first
    with pytest.raises(ValueError, match="no tiny tokenizer"):
        tiny_vocab("gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_corpus_scripts_never_need_unknown(family):
    tok = build_tiny_tokenizer(family)
    # CLIP's unknown token is end-of-text, which every encoding ends with: look between the ends.
    inner = slice(1, -1) if family == "clip" else slice(None)
    for word in MULTILINGUAL if family == "mt5" else WORDS:
        ids = tok(word)["input_ids"]
        assert tok.unk_token_id not in ids[inner], (family, word, tok.convert_ids_to_tokens(ids))
        if family in ("clip", "mt5"):
            assert tok.decode(ids, skip_special_tokens=True) == word


def test_family_layouts():
    roberta, bert = build_tiny_tokenizer("roberta"), build_tiny_tokenizer("bert")
    assert roberta.mask_token_id == len(roberta) - 1  # roberta-base's layout
    assert bert.convert_tokens_to_ids("[MASK]") == bert.mask_token_id
    clip = build_tiny_tokenizer("clip")
    # CLIP's layout: end-of-text is the largest id, start-of-text just before it.
    assert clip.eos_token_id == len(tiny_vocab("clip")[0]) - 1 and clip.bos_token_id == clip.eos_token_id - 1
    assert clip.model_max_length == 77 and roberta.model_max_length == 512
    for family in ("t5", "mt5"):
        tok = build_tiny_tokenizer(family)
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    # A script outside the tiny corpus does map to <unk>; the real mT5 vocabulary covers it.
    mt5 = build_tiny_tokenizer("mt5")
    assert mt5.unk_token_id in mt5("ภาษาไทย")["input_ids"]
    # The corpora are per family: mt5's covers more scripts than t5's.
    assert set(tiny_tokenizers.CORPORA["t5"]) != set(tiny_tokenizers.CORPORA["mt5"])
