"""LLM caption enrichment: the items of the [data.base] source, plus rewrites generated once
with a tiny random GPT-2, cached on disk, added as extra pairs to the training split only, the
original pairs kept as they were."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import torch

import mtrun
import mtrun_llm_enrich
from mtrun import MtrunError, RecipeError
from mtrun.testing import check_component, config_converter, isolated_registry, resolve
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


# core's built-ins ("manifest"), the demo corpus ("demo", the default base; plugin mtrun-demo) and this plugin
REGISTRY = isolated_registry(mtrun_llm_enrich, "mtrun_demo")


def structure(table: dict) -> LLMEnriched.Config:
    """The Config a recipe's [data] table gives (nested [data.base] included)."""
    return config_converter(REGISTRY).structure(table, LLMEnriched.Config)


def config(tmp_path: Path, lm: Path, **kw) -> LLMEnriched.Config:
    manifest = tmp_path / "manifest.jsonl"
    if not manifest.exists():
        write_manifest(tmp_path)
    return structure({"lm_path": str(lm), "base": {"type": "manifest", "path": str(manifest)},
                      "cache_dir": str(tmp_path / "cache"), "max_new_tokens": 8, "batch_size": 3, **kw})


def manifest_items(path: str) -> dict[str, list]:
    """The manifest's splits as core's own ``manifest`` source reads them."""
    manifest = REGISTRY.get("data", "manifest").cls
    source = manifest(manifest.Config(path=path))
    return {split: list(source.load(split)) for split in source.splits()}


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
    cfg = structure({"lm_path": str(tiny_lm), "base": {"type": "manifest", "path": str(write_manifest(tmp_path))},
                     "cache_dir": str(tmp_path / "c"), "max_new_tokens": 4})
    source = check_component(REGISTRY, "data", "llm-enriched", config=cfg)
    assert set(source.splits()) == {"train", "val", "test"}


def test_the_base_source_is_a_nested_table_defaulting_to_the_demo_corpus(tmp_path):
    path = str(write_manifest(tmp_path))
    cfg = structure({"lm_path": "x", "base": {"type": "manifest", "path": path, "default_split": "val"}})
    assert (cfg.base.kind, cfg.base.name, cfg.base.config.path, cfg.base.config.default_split) == ("data", "manifest", path, "val")
    assert config_converter(REGISTRY).unstructure(cfg)["base"]["type"] == "manifest"
    default = structure({"lm_path": "x"}).base
    assert (default.name, default.config) == ("demo", REGISTRY.get("data", "demo").cls.Config())


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ({"type": "manifset", "path": "pairs.jsonl"}, "[data.base].type = 'manifset': no data of that name (did you mean 'manifest'?)"),
        ({"type": "manifest", "path": "pairs.jsonl", "default_splt": "val"}, "[data.base].default_splt: unknown key (did you mean 'default_split'?)"),
        ({"n_item": 20}, "[data.base].n_item: unknown key (did you mean 'n_items'?)"),  # the default base: the demo corpus
    ],
    ids=["misspelled-type", "unknown-manifest-key", "unknown-demo-key"],
)
def test_base_table_problems_name_the_nested_table_and_the_closest_name(base, expected):
    recipe = {"data": {"type": "llm-enriched", "lm_path": "x", "base": base}}
    with pytest.raises(RecipeError) as caught:
        resolve(recipe, REGISTRY)  # as `mtrun validate` does (mtrun.recipe.resolve_recipe)
    # The registry holds no encoders, so the other slots' tables are reported missing too.
    (problem,) = [p for p in caught.value.problems if p.startswith("[data")]
    assert problem.startswith(expected), problem


def test_the_base_is_read_through_the_data_source_protocol_and_gets_the_run(tmp_path):
    seen = {}

    class Recorded:
        """A base source that needs the run, as a dataset that caches into the run folder would."""

        @attrs.frozen
        class Config:
            n: int = attrs.field(default=3, metadata={"help": "items in train"})

        def __init__(self, config, *, run):
            seen["run"] = run
            self.items = [mtrun.Sample(id=f"r{i}", audio=f"r{i}.wav", captions=[f"tune {i}"]) for i in range(config.n)]

        def splits(self):
            return ("train", "val")

        def load(self, split):
            return self.items if split == "train" else self.items[:1]

    class Plugin:
        @mtrun.hookimpl
        def mtrun_register_components(self, registry):
            registry.data("recorded", Recorded)

    registry = isolated_registry(mtrun_llm_enrich, Plugin())
    cfg = config_converter(registry).structure({"lm_path": "x", "base": {"type": "recorded", "n": 2}}, LLMEnriched.Config)
    run = object()
    splits = LLMEnriched(cfg, run=run).base_splits()
    assert seen["run"] is run
    assert {k: [s.id for s in v] for k, v in splits.items()} == {"train": ["r0", "r1"], "val": ["r0"]}


def test_extra_pairs_appear_in_train_only_and_originals_are_kept(tiny_lm, tmp_path, count_loads):
    cfg = config(tmp_path, tiny_lm)
    base = manifest_items(cfg.base.config.path)
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
    base = {"type": "manifest", "path": str(write_manifest(tmp_path))}
    source = LLMEnriched(structure({"lm_path": str(tmp_path / "nowhere"), "base": base}))
    with pytest.raises(MtrunError, match="not a local model folder"):
        source.load("train")
    with pytest.raises(MtrunError, match="lm_path is empty"):
        LLMEnriched(structure({"base": base})).load("train")


def test_a_config_built_in_python_without_a_base_is_refused_by_name(tmp_path):
    source = LLMEnriched(LLMEnriched.Config(lm_path=str(tmp_path)))
    with pytest.raises(MtrunError, match=r"\[data\.base\] must name a data source"):
        source.load("train")


def test_sampling_settings_are_checked_like_tag_to_captions_and_keyed_the_same_way():
    from mtrun_tag_to_caption.augmenter import TagToCaption

    with pytest.raises(ValueError, match="must be positive"):
        LLMEnriched.Config(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="must be between 0 and 1"):
        LLMEnriched.Config(do_sample=True, top_p=5.0)
    shared = {"prompt": "{caption} / {tags}", "use_chat_template": False, "max_new_tokens": 9, "do_sample": True, "temperature": 0.5, "top_p": 0.8, "seed": 3}
    enriched = LLMEnriched(LLMEnriched.Config(**shared)).generation_settings()
    assert enriched == {"prompt": "{caption} / {tags}", "chat": False, "max_new_tokens": 9, "do_sample": True, "temperature": 0.5, "top_p": 0.8, "seed": 3}
    assert enriched == TagToCaption(TagToCaption.Config(**shared)).generation_settings()
