"""LLM caption enrichment: rewrites generated once with a tiny random GPT-2, cached on disk,
added as extra pairs to the training split only, the original pairs kept as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mtrun_llm_enrich
from mtrun import MtrunError
from mtrun.testing import check_component, isolated_registry
from mtrun_llm_enrich.source import LLMEnriched
from mtrun_tag_to_caption.cache import CACHE_FILE

GENRES = ["reel", "jig", "hornpipe", "chorale", "madrigal"]
INSTRUMENTS = ["violin", "flute", "piano", "organ", "harp", "accordion"]


def write_manifest(folder: Path, n: int = 12) -> Path:
    rows = []
    for i in range(n):
        split = "train" if i < 8 else ("val" if i < 10 else "test")
        rows.append({
            "id": f"item{i}",
            "audio": f"audio/item{i}.flac",
            "captions": [f"A {GENRES[i % 5]} on {INSTRUMENTS[i % 6]}.", f"{GENRES[i % 5]}, {INSTRUMENTS[i % 6]}"],
            "tags": {"genre": [GENRES[i % 5]], "instrument": [INSTRUMENTS[i % 6]]},
            "split": split,
            **({"group": "piece-a"} if i in (0, 1) else {}),
        })
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer GPT-2 with a byte-level BPE tokenizer trained here (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-lm")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"A lively {g} played on the {i}. genre: {g}; instrument: {i}" for g in GENRES for i in INSTRUMENTS]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    eos = fast.convert_tokens_to_ids("<|endoftext|>")
    # A large init spreads the logits, so greedy decoding says something (not only EOS).
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                       initializer_range=0.5, bos_token_id=eos, eos_token_id=eos))
    model.save_pretrained(folder)
    return folder


def config(tmp_path: Path, lm: Path, **kw) -> LLMEnriched.Config:
    manifest = tmp_path / "manifest.jsonl"
    if not manifest.exists():
        write_manifest(tmp_path)
    return LLMEnriched.Config(**{"lm_path": str(lm), "manifest": str(manifest), "cache_dir": str(tmp_path / "cache"),
                                 "max_new_tokens": 8, "batch_size": 3, **kw})


@pytest.fixture
def count_loads(monkeypatch):
    import transformers

    loads: list[str] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        loads.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counting)
    return loads


def test_llm_enriched_honours_the_data_source_contract(tiny_lm, tmp_path):
    registry = isolated_registry(mtrun_llm_enrich)
    source = check_component(registry, "data", "llm-enriched", config=LLMEnriched.Config(
        lm_path=str(tiny_lm), manifest=str(write_manifest(tmp_path)), cache_dir=str(tmp_path / "c"), max_new_tokens=4))
    assert set(source.splits()) == {"train", "val", "test"}


def test_extra_pairs_appear_in_train_only_and_originals_are_kept(tiny_lm, tmp_path, count_loads):
    from mtrun.data.sources.manifest import ManifestSource

    cfg = config(tmp_path, tiny_lm)
    base = ManifestSource(ManifestSource.Config(path=cfg.manifest)).build()
    source = LLMEnriched(cfg)
    train, val, test = source.load("train"), source.load("val"), source.load("test")

    # val and test exactly as the manifest has them; train = the 8 originals first, then extras.
    assert [s.id for s in val] == [s.id for s in base["val"]] and [s.id for s in test] == [s.id for s in base["test"]]
    assert [(s.id, s.captions, s.tags, s.audio) for s in train[:8]] == [(s.id, s.captions, s.tags, s.audio) for s in base["train"]]
    extras = train[8:]
    assert source.stats["added"] == len(extras) > 0
    assert len(extras) + source.stats["empty"] == 8  # one rewrite per item (captions_per_item = 1)
    originals = {s.id: s for s in base["train"]}
    for extra in extras:
        original = originals[extra.extra["enriched_from"]]
        assert extra.id == f"{original.id}~llm0" and extra.audio == original.audio and extra.tags == original.tags
        assert extra.extra["original_caption"] == original.captions[0]
        assert len(extra.captions) == 1 and extra.captions[0] and extra.captions[0] != original.captions[0]
        # the copy of a clip is never its original's negative (InfoNCE mask_same_group)
        assert extra.group == (original.group or original.id)
        assert next(s for s in train if s.id == original.id).group == extra.group
    assert len(count_loads) == 1


def test_rewrites_are_generated_once_then_read_from_the_cache(tiny_lm, tmp_path, count_loads, monkeypatch):
    import transformers

    cfg = config(tmp_path, tiny_lm, captions_per_item=0)  # every caption: 2 per train item
    first = LLMEnriched(cfg)
    first.load("train")
    assert first.stats["generated"] == 16 and first.stats["cached"] == 0 and len(count_loads) == 1
    records = [json.loads(line) for line in (tmp_path / "cache" / CACHE_FILE).read_text().splitlines()]
    assert len(records) == 16

    # A second build — another run, another process — never loads the model and gets the same pairs.
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although every rewrite is cached")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    second = LLMEnriched(cfg)
    assert [(s.id, s.captions) for s in second.load("train")] == [(s.id, s.captions) for s in first.load("train")]
    assert second.stats["generated"] == 0 and second.stats["cached"] == 16


def test_the_cached_rewrite_is_the_models_greedy_continuation_of_the_prompt(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = LLMEnriched(config(tmp_path, tiny_lm))
    extras = [s for s in source.load("train") if "enriched_from" in s.extra]
    extra = extras[0]
    original = next(s for s in source.load("train") if s.id == extra.extra["enriched_from"])
    prompt = source.prompt_for(original.captions[0], original.tags)
    assert original.captions[0] in prompt and "instrument: " in prompt
    tok = AutoTokenizer.from_pretrained(str(tiny_lm))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm)).eval()
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert extra.captions[0] == next(" ".join(l.split()).strip("\"'` ") for l in text.splitlines() if l.strip())


def test_a_new_prompt_is_a_new_cache_key(tiny_lm, tmp_path, count_loads):
    LLMEnriched(config(tmp_path, tiny_lm)).load("train")
    other = LLMEnriched(config(tmp_path, tiny_lm, prompt="Caption: {caption} ({tags}). Better:"))
    other.load("train")
    assert other.stats["cached"] == 0 and other.stats["generated"] == 8 and len(count_loads) == 2


def test_evaluation_splits_and_bad_prompts_and_folders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="training splits only"):
        LLMEnriched.Config(lm_path="x", splits=["train", "test"])
    with pytest.raises(ValueError, match="caption"):
        LLMEnriched.Config(lm_path="x", prompt="Tags: {tags}")
    source = LLMEnriched(LLMEnriched.Config(lm_path=str(tmp_path / "nowhere"), manifest=str(write_manifest(tmp_path))))
    with pytest.raises(MtrunError, match="not a local model folder"):
        source.load("train")
    with pytest.raises(MtrunError, match="lm_path is empty"):
        LLMEnriched(LLMEnriched.Config(manifest=str(tmp_path / "manifest.jsonl"))).load("train")


def test_sampling_settings_are_checked_like_tag_to_captions_and_keyed_the_same_way():
    from mtrun_tag_to_caption.augmenter import TagToCaption

    with pytest.raises(ValueError, match="temperature must be positive"):
        LLMEnriched.Config(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \[0, 1\]"):
        LLMEnriched.Config(do_sample=True, top_p=5.0)
    shared = {"prompt": "{caption} / {tags}", "use_chat_template": False, "max_new_tokens": 9, "do_sample": True, "temperature": 0.5, "top_p": 0.8, "seed": 3}
    enriched = LLMEnriched(LLMEnriched.Config(**shared)).generation_settings()
    assert enriched == {"prompt": "{caption} / {tags}", "chat": False, "max_new_tokens": 9, "do_sample": True, "temperature": 0.5, "top_p": 0.8, "seed": 3}
    assert enriched == TagToCaption(TagToCaption.Config(**shared)).generation_settings()
