"""Tag-to-caption: templates say only the item's tags, p_cap, and LLM captions generated once
with a tiny random GPT-2 and read back from the disk cache (also after a process restart)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtrun_tag_to_caption
from mtrun import AugmentContext, MtrunError, Sample
from mtrun.testing import check_component, isolated_registry
from mtrun_tag_to_caption.augmenter import TagToCaption, clean_caption, format_tags
from mtrun_tag_to_caption.cache import CACHE_FILE, default_cache_dir
from mtrun_tag_to_caption.templates import SYNONYMS, TEMPO_WORDS

GENRES = ["reel", "jig", "hornpipe", "chorale", "madrigal", "jazz", "rock", "folk song"]
INSTRUMENTS = ["violin", "flute", "piano", "organ", "harp", "accordion", "cello", "trumpet"]
MOODS = ["happy", "sad", "calm", "dark"]
TEMPI = ["slow", "medium", "fast"]


def ctx(seed: int = 0, epoch: int = 0) -> AugmentContext:
    return AugmentContext(step=0, epoch=epoch, steps_per_epoch=10, total_steps=100, training=True,
                          generator=torch.Generator().manual_seed(seed))


def sample(i: int, *, captions=(), tags=None) -> Sample:
    tags = tags or {
        "genre": [GENRES[i % len(GENRES)]],
        "instrument": [INSTRUMENTS[i % len(INSTRUMENTS)], INSTRUMENTS[(i + 3) % len(INSTRUMENTS)]],
        "mood": [MOODS[i % len(MOODS)]],
        "tempo": [TEMPI[i % len(TEMPI)]],
        "key": ["D major" if i % 2 else "A minor"],
    }
    return Sample(id=f"s{i}", audio=None, captions=list(captions), tags=tags)


def words_of(value: str) -> list[str]:
    """The value and every word a template may use for it."""
    return [value, *SYNONYMS.get(value, ()), *TEMPO_WORDS.get(value, ())]


def mentions(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text, re.IGNORECASE) is not None


def config(tmp_path: Path, **kw) -> TagToCaption.Config:
    return TagToCaption.Config(**{"cache_dir": str(tmp_path / "cache"), **kw})


# ----------------------------------------------------------------------------- contract


def test_tag_to_caption_honours_the_contract():
    registry = isolated_registry(mtrun_tag_to_caption)
    aug = check_component(registry, "augmenter", "tag-to-caption")
    assert aug.stage == "sample" and not aug.applies_in_eval


def test_prompt_must_have_a_tags_slot_and_p_cap_a_probability():
    with pytest.raises(ValueError, match="tags"):
        TagToCaption.Config(prompt="describe the music")
    with pytest.raises(ValueError):
        TagToCaption.Config(p_cap=1.2)


def test_default_cache_dir_follows_mtrun_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MTRUN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "captions"
    monkeypatch.delenv("MTRUN_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "mtrun" / "captions"


# ---------------------------------------------------------------------------- templates


def test_template_captions_mention_only_the_items_tags(tmp_path):
    aug = TagToCaption(config(tmp_path, p_cap=1.0))
    vocabulary = {("genre", g) for g in GENRES} | {("instrument", x) for x in INSTRUMENTS} | {("mood", m) for m in MOODS}
    vocabulary |= {("tempo", t) for t in TEMPI}
    seen_partial = 0
    for i in range(60):
        item = sample(i)
        own = {(c, v) for c, values in item.tags.items() for v in values}
        text = aug(item, ctx(seed=i)).captions[0]
        named = {tv for tv in vocabulary if any(mentions(text, w) for w in words_of(tv[1]))}
        assert named <= own, (text, named - own)  # nothing the item is not tagged with
        assert named or any(k in text for k in item.tags["key"]), text  # and something it is
        seen_partial += len(named) < len(own & vocabulary)
    assert seen_partial > 10  # templates describe partial tag sets too


def test_template_captions_vary_in_frame_and_words(tmp_path):
    aug = TagToCaption(config(tmp_path, p_cap=1.0))
    texts = {aug(sample(1), ctx(seed=s)).captions[0] for s in range(40)}
    assert len(texts) > 20
    assert any(mentions(t, "fiddle") for t in {aug(sample(0), ctx(seed=s)).captions[0] for s in range(80)})


@pytest.mark.parametrize("p_cap", [0.0, 1.0])
def test_p_cap_chooses_tags_text_or_caption(tmp_path, p_cap):
    aug = TagToCaption(config(tmp_path, p_cap=p_cap))
    for i in range(20):
        with_caption = sample(i, captions=["a human-written caption"])
        bare = sample(i)
        joined = ", ".join(t for values in bare.tags.values() for t in values)
        out_a, out_b = aug(with_caption, ctx(seed=i)), aug(bare, ctx(seed=i))
        if p_cap == 0.0:
            assert out_a.captions == [joined] and out_b.captions == [joined]
        else:
            assert out_a.captions == ["a human-written caption"]  # the original caption
            assert len(out_b.captions) == 1 and out_b.captions[0] != joined  # a template caption
    assert with_caption.captions == ["a human-written caption"]  # the dataset's sample is intact


def test_p_cap_is_the_share_of_caption_pairs(tmp_path):
    aug = TagToCaption(config(tmp_path, p_cap=0.3, use_original=True))
    item = sample(0, captions=["original"])
    share = sum(aug(item, ctx(seed=s)).captions == ["original"] for s in range(1000)) / 1000
    assert 0.25 < share < 0.35


def test_same_generator_gives_the_same_text(tmp_path):
    aug = TagToCaption(config(tmp_path))
    assert [aug(sample(2), ctx(seed=5)).captions for _ in range(3)] == [aug(sample(2), ctx(seed=5)).captions] * 3


def test_text_comes_from_a_narrowed_view_and_the_full_tags_are_restored(tmp_path):
    """After view dropout (output = "tags"): caption the view, hand on all the item's tags."""
    aug = TagToCaption(config(tmp_path, p_cap=1.0, template_keep=1.0, synonyms=False))
    full = {"genre": ["jig"], "instrument": ["harp", "flute"], "tempo": ["slow"]}
    view = Sample(id="v", audio=None, tags={"instrument": ["harp"]}, extra={"full_tags": full, "bpm": 90})
    for s in range(10):
        out = aug(view, ctx(seed=s))
        assert mentions(out.captions[0], "harp")
        assert not any(mentions(out.captions[0], w) for w in ("jig", "flute", "slow"))
        assert out.tags == full and out.extra == {"bpm": 90}


# ------------------------------------------------------------------------------ the LLM


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer GPT-2 with a byte-level BPE tokenizer trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-lm")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [format_tags(sample(i).tags) + " A lively tune played on the fiddle." for i in range(30)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    eos = fast.convert_tokens_to_ids("<|endoftext|>")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=256, n_embd=32, n_layer=2, n_head=2, initializer_range=0.5,
                                       bos_token_id=eos, eos_token_id=eos))
    model.save_pretrained(folder)
    return folder


def test_a_missing_lm_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MtrunError, match="not a local model folder"):
        TagToCaption(config(tmp_path, lm_path=str(tmp_path / "nowhere")))
    with pytest.raises(MtrunError, match="needs lm_path"):
        TagToCaption(config(tmp_path)).prepare([sample(0)])


def test_clean_caption_keeps_the_first_non_empty_line_unquoted():
    assert clean_caption('\n  \n "A  lively\treel on   fiddle."  \nTags: reel\n') == "A lively reel on fiddle."
    assert clean_caption("`calm organ chorale`") == "calm organ chorale"
    assert clean_caption(" \n\"\"\n") == ""


def test_llm_captions_are_generated_once_then_read_from_the_cache(tiny_lm, tmp_path, monkeypatch):
    import transformers

    loads = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counting)
    cfg = config(tmp_path, lm_path=str(tiny_lm), p_cap=1.0, max_new_tokens=8, batch_size=4)
    items = [sample(i) for i in range(10)] + [sample(3)]  # a repeated tag set is generated once
    stats = TagToCaption(cfg).prepare(items, progress=False)
    assert stats == {"items": 11, "unique": 10, "cached": 0, "generated": 10, "empty": stats["empty"]}
    assert len(loads) == 1
    records = [json.loads(line) for line in (tmp_path / "cache" / CACHE_FILE).read_text().splitlines()]
    assert len(records) == 10

    # The cached caption is the model's greedy continuation of the prompt, cleaned.
    writer_tok = transformers.AutoTokenizer.from_pretrained(str(tiny_lm))
    model = real(str(tiny_lm)).eval()
    prompt = cfg.prompt.replace("{tags}", format_tags(items[0].tags))
    ids = writer_tok([prompt], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=writer_tok.eos_token_id)
    raw = writer_tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    lines = [" ".join(line.split()).strip("\"'` ") for line in raw.splitlines()]
    expected = next((line for line in lines if line), "")
    by_key = {r["key"]: r["caption"] for r in records}
    fresh = TagToCaption(cfg)
    assert by_key[fresh.key(items[0].tags)] == expected
    assert sum(bool(c) for c in by_key.values()) == 10 - stats["empty"]
    assert len(set(by_key.values())) > 2  # captions follow the prompt (the test model is not degenerate)

    # A second run (new instance) finds everything cached and never loads the model.
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although every caption is cached")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    again = fresh.prepare(items, progress=False)
    assert again["generated"] == 0 and again["cached"] == 10
    for item in items[:10]:
        caption = by_key[fresh.key(item.tags)]
        if caption:
            assert fresh(item, ctx()).captions == [caption]
    assert fresh.counts["lm"] >= 1 and fresh.counts["missing"] == 0


def test_cache_survives_a_process_restart_without_transformers_or_torch(tiny_lm, tmp_path):
    cfg = config(tmp_path, lm_path=str(tiny_lm), p_cap=1.0, max_new_tokens=6, batch_size=8)
    item = sample(4)
    TagToCaption(cfg).prepare([item], progress=False)
    caption = TagToCaption(cfg).cached_caption(item.tags)
    settings = {k: getattr(cfg, k) for k in ("cache_dir", "lm_path", "p_cap", "max_new_tokens", "batch_size")}
    script = f"""
import sys, json
sys.modules["transformers"] = None  # importing either would fail: the cache alone must serve
sys.modules["torch"] = None
from mtrun import Sample
from mtrun_tag_to_caption.augmenter import TagToCaption
aug = TagToCaption(TagToCaption.Config(**json.loads({json.dumps(json.dumps(settings))})))
item = Sample(id="s4", audio=None, tags=json.loads({json.dumps(json.dumps(item.tags))}))
print(json.dumps(aug.cached_caption(item.tags)))
print(json.dumps(aug.prepare([item], progress=False)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[0]) == caption
    assert json.loads(lines[1]) == {"items": 1, "unique": 1, "cached": 1, "generated": 0, "empty": 0}


def test_missing_llm_captions_fall_back_to_templates_with_a_counted_warning(tiny_lm, tmp_path, caplog):
    aug = TagToCaption(config(tmp_path, lm_path=str(tiny_lm), p_cap=1.0))
    with caplog.at_level(logging.WARNING, logger="mtrun.tag_to_caption"):
        texts = [aug(sample(i), ctx(seed=i)).captions[0] for i in range(12)]
    assert all(texts) and aug.counts["missing"] == 12 and aug.counts["template"] == 12
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and warnings[0].startswith("tag-to-caption: 1 item") and "10 item" in warnings[1]
    assert "prepare" in warnings[0]


def test_changing_the_prompt_or_model_changes_the_key(tiny_lm, tmp_path):
    a = TagToCaption(config(tmp_path, lm_path=str(tiny_lm)))
    b = TagToCaption(config(tmp_path, lm_path=str(tiny_lm), prompt="Tags: {tags}. Caption:"))
    tags = sample(0).tags
    assert a.key(tags) != b.key(tags)
    assert a.key(tags) == a.key({k: list(reversed(v)) for k, v in reversed(list(tags.items()))})  # order-free


def test_cache_survives_a_line_cut_by_a_crash_and_a_damaged_byte(tmp_path):
    from mtrun_tag_to_caption.cache import CaptionCache

    cache = CaptionCache(tmp_path)
    cache.add([{"key": "a", "caption": "first"}])
    with open(cache.path, "ab") as raw:  # a crash mid-write, and a byte that is not UTF-8
        raw.write(b'{"key": "b", "capt\xff')
    again = CaptionCache(tmp_path)
    assert again.get("a") == "first" and again.get("b") is None
    assert again.add([{"key": "c", "caption": "third"}]) == 1
    fresh = CaptionCache(tmp_path)  # what a restarted process reads back
    assert fresh.get("a") == "first" and fresh.get("c") == "third"


def test_a_cache_file_that_cannot_be_written_keeps_captions_in_memory_and_warns_once(tmp_path, monkeypatch, caplog):
    """A full disk must not end the run nor lose what was generated in it: the captions stay
    readable in this process (and in DataLoader workers, which get a pickled copy)."""
    import errno
    import pickle

    import mtrun_tag_to_caption.cache as cache_module
    from mtrun_tag_to_caption.cache import CaptionCache

    cache = CaptionCache(tmp_path)
    assert cache.add([{"key": "a", "caption": "Saved first."}]) == 1

    def full(path, mode="r", *args, **kwargs):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(cache_module, "open", full, raising=False)
    with caplog.at_level(logging.WARNING, logger="mtrun.tag_to_caption"):
        assert cache.add([{"key": "b", "caption": "Generated while the disk was full."}]) == 0
        assert cache.add([{"key": "c", "caption": "And another."}, {"key": "a", "caption": "Not this."}]) == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(cache.path) in warnings[0] and "No space left on device" in warnings[0]
    monkeypatch.undo()
    # Another process appends: the re-read it triggers must not drop the unsaved captions.
    CaptionCache(tmp_path).add([{"key": "d", "caption": "From elsewhere."}])
    for reader in (cache, pickle.loads(pickle.dumps(cache))):
        assert reader.get("d") == "From elsewhere."
        assert reader.get("b") == "Generated while the disk was full."
        assert reader.get("c") == "And another."
        assert reader.get("a") == "Saved first."
    assert CaptionCache(tmp_path).get("b") is None  # a later run generates it again
