"""TextSwap: schedule, one-keyword swaps, the infonce hard-negative contract, determinism, a step."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import mtrun_textswap
from mtrun import AugmentContext, Batch, HardNegatives, MtrunError, RecipeError
from mtrun.testing import check_component, isolated_registry, resolve
from mtrun_textswap.augmenter import TextSwap

TESTKIT = Path(__file__).resolve().parents[3] / "tests" / "testkit" / "src"

TEXTS = [
    "A calm piano piece in D major",
    "fast rock song with distorted guitar and drums",
    "A reel played on fiddle at 120 bpm",
    "a sad jazz tune on saxophone",
    "an organ chorale, slow and solemn",
    "string quartet music",  # no dictionary keyword: never swapped
    "Upbeat pop with synth and vocals",
    "a hornpipe on the accordion",
]
TAGS = [
    {"genre": ["classical"], "instrument": ["piano", "violin"]},
    {"genre": ["rock"], "instrument": ["electric guitar", "drums"]},
    {"genre": ["reel"], "instrument": ["violin"]},
    {"genre": ["jazz"], "instrument": ["saxophone"], "mood": ["sad"]},
    {"genre": ["chorale"], "instrument": ["organ"]},
    {},
    {"genre": ["pop"]},
    {"genre": ["hornpipe"], "instrument": ["accordion"]},
]


def toy_components():
    """Core's toy components (``tests/testkit``, a source folder, not installed)."""
    if str(TESTKIT) not in sys.path:
        sys.path.insert(0, str(TESTKIT))
    import mtrun_testkit

    return mtrun_testkit


def context(epoch: float = 30.0, seed: int = 0, steps_per_epoch: int = 10) -> AugmentContext:
    step = round(epoch * steps_per_epoch)
    return AugmentContext(
        step=step, epoch=int(epoch), steps_per_epoch=steps_per_epoch, total_steps=10_000, training=True,
        generator=torch.Generator().manual_seed(seed),
    )


def always(**overrides) -> TextSwap:
    """p = 1 from the first step, so every pair with a keyword is swapped."""
    return TextSwap(TextSwap.Config(**{"p_max": 1.0, "warmup_epochs": 0.0, "ramp_epochs": 0.0, **overrides}))


def run(aug: TextSwap, texts=TEXTS, tags=TAGS, **ctx) -> HardNegatives:
    batch = Batch(texts=list(texts), tags=list(tags))
    return aug(batch, context(**ctx)).hard_negatives


def keyword_profile(aug: TextSwap, text: str) -> tuple[dict[str, Counter], str]:
    """Concepts per category, and the text with keywords masked and articles normalised."""
    per: dict[str, Counter] = {}
    masked, last = [], 0
    for m in aug.dictionary.find(text):
        per.setdefault(m.category, Counter())[m.concept] += 1
        masked.append(text[last : m.start] + f"<{m.category}>")
        last = m.end
    masked.append(text[last:])
    rest = re.sub(r"(?<!\w)an?(?!\w)", "a", "".join(masked), flags=re.IGNORECASE).lower()
    return per, rest


# ---------------------------------------------------------------------------- contract


def test_textswap_honours_the_contract():
    registry = isolated_registry(mtrun_textswap)
    aug = check_component(registry, "augmenter", "textswap")
    assert aug.stage == "batch" and not aug.applies_in_eval


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0.0, 0.0), (4.9, 0.0), (5.0, 0.0), (10.0, 0.0375), (15.0, 0.075), (24.0, 0.1425), (25.0, 0.15), (80.0, 0.15)],
)
def test_schedule_is_zero_for_five_epochs_then_rises_linearly_to_15_percent_over_20(epoch, expected):
    aug = TextSwap(TextSwap.Config())
    assert aug.probability(epoch) == pytest.approx(expected)
    # And the value the stage uses comes from context.epoch_float = step / steps_per_epoch.
    run(aug, epoch=epoch)
    assert aug.last_stats["p"] == pytest.approx(expected)


def test_schedule_settings_are_configurable():
    aug = TextSwap(TextSwap.Config(p_start=0.1, p_max=0.5, warmup_epochs=2.0, ramp_epochs=4.0))
    assert [aug.probability(e) for e in (0, 2, 4, 6, 9)] == pytest.approx([0.1, 0.1, 0.3, 0.5, 0.5])


@pytest.mark.parametrize("bad", [{"p_max": 1.5}, {"fraction": 0.0}, {"warmup_epochs": -1.0}, {"categories": ()}])
def test_config_rejects_out_of_range_values(bad):
    with pytest.raises(ValueError):
        TextSwap.Config(**bad)


# ------------------------------------------------------------------------------ swaps


def test_each_swapped_caption_changes_exactly_one_keyword_of_one_category_to_the_same_category():
    aug = always(swaps="fraction", fraction=1.0)
    hard = run(aug)
    assert len(hard.texts) > 10
    for anchor, swapped in zip(hard.anchor.tolist(), hard.texts):
        original = TEXTS[anchor]
        before, rest_before = keyword_profile(aug, original)
        after, rest_after = keyword_profile(aug, swapped)
        # Outside the keywords (and a/an) nothing changed.
        assert rest_after == rest_before, (original, swapped)
        changed = [c for c in set(before) | set(after) if before.get(c, Counter()) != after.get(c, Counter())]
        assert len(changed) == 1, (original, swapped)
        category = changed[0]
        removed = set(before[category]) - set(after.get(category, ()))
        added = set(after.get(category, ())) - set(before[category])
        assert len(removed) == 1 and len(added) == 1, (original, swapped)
        new = added.pop()
        assert new in aug.dictionary.concepts[category]  # replacement from the same category
        assert new != removed.pop()


def test_swaps_never_produce_synonyms_related_concepts_or_the_items_own_tags():
    aug = always(swaps="fraction", fraction=1.0)
    texts = ["a piano piece with violin"] * 6
    tags = [{"instrument": ["piano", "violin", "cello"]}] * 6
    for seed in range(5):
        for swapped in run(aug, texts, tags, seed=seed).texts:
            concepts = {m.concept for m in aug.dictionary.find(swapped)}
            assert "cello" not in concepts  # the item's own tag: still true of the audio
            assert not re.search(r"fiddle|grand piano|electric piano", swapped)  # synonym / a kind of piano
    assert "acoustic guitar" not in aug.dictionary.alternatives("instrument", "guitar")
    assert "slip jig" not in aug.dictionary.alternatives("genre", "jig")


def test_articles_and_capitals_follow_the_replacement():
    aug = always()
    assert aug.swap("An organ piece", "instrument", "organ", "piano") == "A piano piece"
    assert aug.swap("a piano and a Piano", "instrument", "piano", "accordion") == "an accordion and an Accordion"


def test_a_caption_without_keywords_gets_no_hard_negatives():
    hard = run(always(swaps="fraction", fraction=1.0))
    assert 5 not in hard.anchor.tolist()


# ----------------------------------------------------------------- the batch contract


def test_output_follows_the_hard_negatives_contract():
    aug = always(swaps="fraction", fraction=0.5)
    hard = run(aug)
    assert isinstance(hard, HardNegatives) and hard.text_inputs is None and len(hard) == len(hard.texts)
    n = len(TEXTS)
    k = round(0.5 * (n - 1))
    anchor, replaces, texts = hard.anchor, hard.replaces, hard.texts
    assert anchor.dtype == replaces.dtype == torch.long
    assert anchor.shape == replaces.shape == (len(texts),)
    assert ((anchor >= 0) & (anchor < n)).all() and ((replaces >= 0) & (replaces < n)).all()
    assert (replaces != anchor).all()
    for i in set(anchor.tolist()):
        rows = replaces[anchor == i].tolist()
        assert len(rows) == len(set(rows))  # a pair's swaps replace distinct negatives
        assert len(rows) <= k
    swapped = set(anchor.tolist())
    assert swapped == set(range(n)) - {5}
    assert sum(len(replaces[anchor == i]) == k for i in swapped) >= len(swapped) - 1


def test_max_per_pair_caps_the_swaps_of_each_pair():
    hard = run(always(swaps="fraction", fraction=1.0, max_per_pair=2))
    assert max(Counter(hard.anchor.tolist()).values()) == 2


@pytest.mark.parametrize("config", [{"p_max": 0.0, "warmup_epochs": 0.0}, {}])
def test_zero_probability_gives_zero_hard_negatives(config):
    aug = TextSwap(TextSwap.Config(**config))
    hard = run(aug, epoch=2.0)  # inside the default warm-up for {}
    assert hard.anchor.shape == (0,) and hard.replaces.shape == (0,) and hard.texts == []


def test_swapped_share_of_pairs_follows_p():
    aug = always(p_max=0.25)
    texts, tags = ["a calm piano piece"] * 400, [{}] * 400
    hard = run(aug, texts, tags, seed=3)
    share = len(set(hard.anchor.tolist())) / 400
    assert 0.19 < share < 0.31


def test_same_generator_seed_gives_the_same_hard_negatives_and_another_seed_differs():
    aug = always(swaps="fraction", fraction=0.5)
    first, again, other = run(aug, seed=7), run(aug, seed=7), run(aug, seed=8)
    assert first.texts == again.texts
    assert torch.equal(first.anchor, again.anchor) and torch.equal(first.replaces, again.replaces)
    assert (first.texts, first.replaces.tolist()) != (other.texts, other.replaces.tolist())


def test_hard_negatives_an_earlier_augmenter_wrote_are_kept_and_this_steps_appended():
    earlier = HardNegatives(anchor=torch.tensor([2]), replaces=torch.tensor([-1]), texts=["an earlier caption"])
    batch = Batch(texts=list(TEXTS), tags=list(TAGS), hard_negatives=earlier)
    merged = always(swaps="fraction", fraction=0.5)(batch, context(seed=7)).hard_negatives
    alone = run(always(swaps="fraction", fraction=0.5), seed=7)
    assert isinstance(merged, HardNegatives) and len(merged) == 1 + len(alone)
    assert merged.texts == ["an earlier caption", *alone.texts]
    assert merged.anchor.tolist() == [2, *alone.anchor.tolist()]
    assert merged.replaces.tolist() == [-1, *alone.replaces.tolist()]


def test_an_empty_earlier_hard_negatives_is_replaced_by_this_steps():
    empty = HardNegatives(anchor=torch.zeros(0, dtype=torch.long), replaces=torch.zeros(0, dtype=torch.long))
    batch = Batch(texts=list(TEXTS), tags=list(TAGS), hard_negatives=empty)
    merged = always(swaps="fraction", fraction=0.5)(batch, context(seed=7)).hard_negatives
    alone = run(always(swaps="fraction", fraction=0.5), seed=7)
    assert merged.texts == alone.texts and torch.equal(merged.anchor, alone.anchor)


def test_tokenized_earlier_hard_negatives_ask_for_textswap_to_go_first():
    tokenized = HardNegatives(
        anchor=torch.tensor([0]),
        replaces=torch.tensor([1]),
        text_inputs={"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)},
    )
    batch = Batch(texts=list(TEXTS), tags=list(TAGS), hard_negatives=tokenized)
    with pytest.raises(ValueError, match="put textswap first"):
        always()(batch, context())


def test_earlier_hard_negatives_that_are_not_the_typed_class_are_refused_by_name():
    legacy = {"anchor": torch.tensor([0]), "replaces": torch.tensor([1]), "texts": ["x"]}
    batch = Batch(texts=list(TEXTS), tags=list(TAGS), hard_negatives=legacy)
    with pytest.raises(TypeError, match=r"batch\.hard_negatives must be mtrun\.HardNegatives \(got dict\)"):
        always()(batch, context())


# ------------------------------------------------------------------------- dictionaries


def test_user_dictionary_in_toml_extends_the_default(tmp_path):
    path = tmp_path / "words.toml"
    path.write_text('mood = ["zesty"]\n[genre]\nshoegaze = ["shoegaze", "dream pop"]\n', encoding="utf-8")
    aug = always(dictionary=str(path), categories=("genre", "mood"))
    assert "shoegaze" in aug.dictionary.concepts["genre"] and "rock" in aug.dictionary.concepts["genre"]
    assert [m.concept for m in aug.dictionary.find("Dream pop, zesty")] == ["shoegaze", "zesty"]


def test_user_dictionary_in_json_can_replace_the_default(tmp_path):
    path = tmp_path / "words.json"
    path.write_text(json.dumps({"genre": {"polka": ["polka"], "waltz": ["waltz", "valse"]}}), encoding="utf-8")
    aug = always(dictionary=str(path), categories=("genre",), use_default_dictionary=False)
    hard = run(aug, ["a lively polka", "a slow valse"], [{}, {}])
    assert hard.texts == ["a lively waltz", "a slow polka"]


def test_a_missing_or_malformed_dictionary_is_a_clear_error(tmp_path):
    with pytest.raises(MtrunError, match="does not exist"):
        always(dictionary=str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"genre": {"rock": [1, 2]}}), encoding="utf-8")
    with pytest.raises(MtrunError, match="list of non-empty strings"):
        always(dictionary=str(bad))


def test_the_default_dictionary_covers_the_demo_corpus_vocabulary():
    aug = always()
    for genre in ("reel", "jig", "hornpipe", "slip jig", "strathspey", "air", "chorale", "madrigal", "folk song", "ballad"):
        assert aug.dictionary.concept_of("genre", genre) is not None, genre
    for instrument in ("piano", "harpsichord", "vibraphone", "organ", "accordion", "acoustic guitar", "harp", "strings",
                       "choir", "violin", "cello", "trumpet", "clarinet", "flute", "fiddle", "squeezebox"):
        assert aug.dictionary.concept_of("instrument", instrument) is not None, instrument
    assert aug.dictionary.concept_of("instrument", "fiddle") == "violin"


# ----------------------------------------------------------------- the recipe contract


def toy_recipe(infonce: dict) -> dict:
    """A minimal plain recipe of testkit components with TextSwap and the given InfoNCE table."""
    return {
        "data": {"type": "toy-tones", "n_items": 8},
        "audio_encoder": {"type": "toy-audio"},
        "text_encoder": {"type": "toy-text"},
        "audio_projector": {"type": "toy-linear", "dim": 8},
        "text_projector": {"type": "toy-linear", "dim": 8},
        "augmenter": [{"type": "textswap"}],
        "objective": [{"type": "infonce", **infonce}],
    }


def contract_registry():
    import mtrun_infonce

    return isolated_registry(mtrun_textswap, mtrun_infonce, toy_components())


def test_a_recipe_pairing_textswap_with_infonce_without_hard_negatives_is_invalid():
    with pytest.raises(RecipeError) as caught:
        resolve(toy_recipe({"hard_negatives": False}), contract_registry(), "r.toml")
    (problem,) = caught.value.problems  # the recipe is otherwise valid
    assert problem.startswith("[[augmenter]][0].type = 'textswap': needs [[objective]] to provide 'hard_negatives'"), problem
    assert "[[objective]][0] type 'infonce' does" in problem, problem
    assert "installed objectives that do with default settings: infonce" in problem, problem  # the fix: its default


@pytest.mark.parametrize("infonce", [{"hard_negatives": True}, {}])
def test_a_recipe_pairing_textswap_with_infonce_using_hard_negatives_resolves(infonce):
    resolved = resolve(toy_recipe(infonce), contract_registry(), "r.toml")
    assert [a.name for a in resolved.augmenters] == ["textswap"]
    (objective,) = resolved.objectives
    assert objective.name == "infonce" and objective.config.hard_negatives


# ---------------------------------------------------------------------------- end to end


def test_one_training_step_with_infonce_through_the_system():
    """TextSwap -> batch.hard_negatives -> InfoNCE embeds and uses them; gradients flow."""
    kit = toy_components()
    from mtrun import System, WeightedObjective
    from mtrun_infonce.objective import InfoNCE

    torch.manual_seed(0)
    audio_encoder, text_encoder = kit.ToyAudio(kit.ToyAudio.Config()), kit.ToyText(kit.ToyText.Config())
    audio_projector = kit.ToyLinear(kit.ToyLinear.Config(), in_features=audio_encoder.output_dim)
    text_projector = kit.ToyLinear(kit.ToyLinear.Config(), in_features=text_encoder.output_dim)
    objective = InfoNCE(InfoNCE.Config(), text_encoder=text_encoder, text_projector=text_projector)
    swap = always(swaps="fraction", fraction=0.3)
    system = System(
        audio_encoder=audio_encoder, text_encoder=text_encoder, audio_projector=audio_projector,
        text_projector=text_projector, objectives=[WeightedObjective("infonce", 1.0, objective)], augmenters=[swap],
    )
    batch = Batch(
        waveforms=torch.randn(len(TEXTS), 2000), texts=list(TEXTS), tags=list(TAGS), groups=[None] * len(TEXTS),
        text_inputs=text_encoder.tokenize(TEXTS),
    )
    loss, metrics = system(batch, context())
    loss.backward()
    h = len(batch.hard_negatives)
    assert h > 0 and metrics["infonce/hard_negatives"] == float(h)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in system.parameters())

    # The hard negatives are what changed the loss: the same batch without them differs.
    plain = System(
        audio_encoder=audio_encoder, text_encoder=text_encoder, audio_projector=audio_projector,
        text_projector=text_projector, objectives=[WeightedObjective("infonce", 1.0, objective)],
    )
    batch_plain = Batch({k: v for k, v in batch.items() if k != "hard_negatives"})
    loss_plain, _ = plain(batch_plain, context())
    assert not torch.allclose(loss, loss_plain)


def test_a_dictionary_with_nothing_to_swap_is_an_error_not_a_silent_no_op(tmp_path):
    from mtrun import MtrunError
    from mtrun_textswap.dictionary import SwapDictionary

    user = tmp_path / "words.toml"
    user.write_text('[genres]\nrock = ["rock"]\n')  # category misspelled
    with pytest.raises(MtrunError, match="no concepts.*genre.*genres"):
        SwapDictionary.load(["genre"], user_file=str(user), use_default=False)
    assert SwapDictionary.load(["genre"]).concepts["genre"]  # the shipped dictionary has genres


def test_per_category_makes_one_swap_for_each_category_the_caption_names():
    """The paper's count (the default): TextSwap applied once per descriptor category."""
    aug = always()
    assert aug.config.swaps == "per-category"
    hard = run(aug)
    for i in set(hard.anchor.tolist()):
        original = TEXTS[i]
        expected = set(aug.swappable(original, TAGS[i]))
        made = [t for a, t in zip(hard.anchor.tolist(), hard.texts) if a == i]
        changed = []
        for swapped in made:
            before, _ = keyword_profile(aug, original)
            after, _ = keyword_profile(aug, swapped)
            changed += [c for c in set(before) | set(after) if before.get(c, Counter()) != after.get(c, Counter())]
        assert sorted(changed) == sorted(expected), (original, made)  # each category once
        assert len(made) == len(expected) <= len(aug.config.categories)
