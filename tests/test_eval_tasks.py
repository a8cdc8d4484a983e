"""Evaluation tasks and the inference path on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mtrun.interfaces import EncoderOutput, Sample

CLASSES = ["jig", "reel", "waltz", "march"]
RATE = 100


class KnownAudio(nn.Module):
    """Audio "encoder" whose pooled output is the one-hot of the class coded in the waveform:
    class c is a constant waveform of value c + 1 (so the answer is known exactly)."""

    sample_rate = RATE
    output_dim = len(CLASSES)
    token_grid = None

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def preprocess(self, waveforms):
        return waveforms

    def forward(self, features, *, keep_index=None, output_hidden_states=False):
        level = features.abs().mean(-1).round().long() - 1
        pooled = nn.functional.one_hot(level.clamp(0, len(CLASSES) - 1), len(CLASSES)).float()
        return EncoderOutput(tokens=pooled[:, None], pooled=pooled, mask=torch.ones(len(pooled), 1, dtype=torch.bool))


class Identity(nn.Module):
    output_dim = len(CLASSES)

    def forward(self, encoded):
        return encoded.pooled


class KnownSystem(nn.Module):
    """A System stand-in: texts embed as the one-hot of the class names they mention."""

    def __init__(self):
        super().__init__()
        self.audio_encoder = KnownAudio()
        self.audio_projector = Identity()

    def project(self, modality, encoded):
        assert modality == "audio"
        return self.audio_projector(encoded)

    def embed_text(self, texts):
        out = torch.zeros(len(texts), len(CLASSES))
        for i, text in enumerate(texts):
            for c, name in enumerate(CLASSES):
                if name in text:
                    out[i, c] = 1.0
        return nn.functional.normalize(out + 1e-3, dim=-1)


def known_samples(labels):
    return [
        Sample(
            id=f"s{i}",
            audio=torch.full((RATE,), float(c + 1)),
            sample_rate=RATE,
            captions=[f"a {CLASSES[c]} tune", f"some {CLASSES[c]}"],
            tags={"genre": [CLASSES[c]]},
        )
        for i, c in enumerate(labels)
    ]


def test_zero_shot_accuracy_on_a_known_case():
    from mtrun.eval.zeroshot import ZeroShot

    samples = known_samples([0, 1, 2, 3, 0, 1, 2, 3])
    samples[0].tags["genre"] = ["reel"]  # the audio says jig: exactly one wrong answer
    out = ZeroShot(ZeroShot.Config(clip_seconds=1.0)).evaluate(KnownSystem(), samples)
    assert out["zero-shot/genre/accuracy"] == pytest.approx(100 * 7 / 8)
    assert out["zero-shot/genre/n_classes"] == 4


def test_zero_shot_multi_label_scores_perfect_tags_perfectly():
    from mtrun.eval.zeroshot import ZeroShot

    samples = known_samples([0, 1, 2, 3] * 3)
    for s in samples[:4]:
        s.tags["genre"] = s.tags["genre"] + ["unheard"]  # a second tag makes the task multi-label
    out = ZeroShot(ZeroShot.Config(clip_seconds=1.0, classes=tuple(CLASSES))).evaluate(KnownSystem(), samples)
    assert out["zero-shot/genre/roc_auc"] == pytest.approx(100.0)
    assert out["zero-shot/genre/pr_auc"] == pytest.approx(100.0)
    assert out["zero-shot/genre/mAR"] == pytest.approx(100.0)


def test_zero_shot_templates_must_hold_a_placeholder():
    from mtrun.eval.zeroshot import ZeroShot

    with pytest.raises(ValueError, match=r"\{\}"):
        ZeroShot.Config(templates=("no placeholder",))


def test_zero_shot_default_templates_are_our_own_set_not_claimed_as_slaps():
    # The default wordings are our own ("song"); SLAP's four are a separate named set ("slap",
    # tests/test_zeroshot.py). Nothing calls ours SLAP-style.
    from pathlib import Path

    from mtrun.eval import zeroshot

    assert zeroshot.ZeroShot.Config().wordings == zeroshot.SONG_TEMPLATES == zeroshot.DEFAULT_TEMPLATES
    assert len(zeroshot.SONG_TEMPLATES) == 4 and all("{}" in t for t in zeroshot.SONG_TEMPLATES)
    assert not set(zeroshot.SONG_TEMPLATES) & set(zeroshot.SLAP_TEMPLATES)
    doc = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"
    for text in (Path(zeroshot.__file__).read_text(), doc.read_text()):
        assert "SLAP-style" not in text


def test_retrieval_is_perfect_when_embeddings_identify_classes():
    from mtrun.eval.retrieval import Retrieval

    samples = known_samples([0, 1, 2, 3])
    out = Retrieval(Retrieval.Config(clip_seconds=1.0, bootstrap=50)).evaluate(KnownSystem(), samples)
    assert out["retrieval/t2a/R@1"] == 100 and out["retrieval/a2t/R@1"] == 100
    assert out["retrieval/t2a/median_rank"] == 1
    assert out["retrieval/t2a/R@1:ci_low"] == 100
    assert out["retrieval/t2a/subset/R@1"] == 100
    assert out["retrieval/n_captions"] == 8


def test_modality_gap_is_chance_for_one_distribution_and_one_for_shifted():
    from mtrun.eval.modality_gap import centroid_distance, separability

    rng = np.random.default_rng(0)
    a = rng.normal(size=(1500, 8))
    t = rng.normal(size=(1500, 8))
    assert abs(separability(a, t, seed=1) - 0.5) < 0.06
    assert centroid_distance(a, t) < 0.1
    shifted = t + np.r_[10.0, np.zeros(7)]
    assert separability(a, shifted, seed=1) > 0.97
    assert centroid_distance(a, shifted) > 0.5


def test_probe_learns_a_separable_problem_and_a_linear_target():
    from mtrun.eval.probe import train_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    probs = train_probe(x[:200], y[:200], x[200:250], y[200:250], x[250:], kind="single", seed=0, max_epochs=60)
    assert (probs.argmax(1) == y[250:]).mean() > 0.9
    target = (2 * x[:, :1] - x[:, 2:3]) + 0.05 * rng.normal(size=(300, 1))
    pred = train_probe(x[:200], target[:200], x[200:250], target[200:250], x[250:], kind="regression", seed=0, max_epochs=60)
    from mtrun.eval.metrics import r2_score

    assert r2_score(pred, target[250:]) > 0.9


def test_linear_probe_and_the_validation_metric_rule():
    """hidden = 0 is one Linear layer: it cannot learn XOR, the MLP can, whether early stopping
    follows the validation metric or the loss; the global RNG is left alone."""
    import torch

    from mtrun.eval.probe import train_probe

    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 2))
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.int64)
    parts = (x[:400], y[:400], x[400:500], y[400:500], x[500:])
    linear = train_probe(*parts, kind="single", seed=0, hidden=0, max_epochs=80)
    mlp = train_probe(*parts, kind="single", seed=0, hidden=64, max_epochs=80)
    by_loss = train_probe(*parts, kind="single", seed=0, hidden=64, max_epochs=80, stop_on="loss")
    assert (linear.argmax(1) == y[500:]).mean() < 0.7
    assert (mlp.argmax(1) == y[500:]).mean() > 0.9 and (by_loss.argmax(1) == y[500:]).mean() > 0.9
    state = torch.random.get_rng_state()
    train_probe(*parts, kind="single", seed=0, hidden=0, max_epochs=2)
    assert torch.equal(state, torch.random.get_rng_state())


def test_probe_task_reports_mean_over_seeds_and_leaves_the_global_rng_alone():
    from mtrun.eval.probe import Probe

    samples = known_samples([0, 1, 2, 3] * 10)
    before = torch.get_rng_state()
    out = Probe(Probe.Config(clip_seconds=1.0, max_epochs=30)).evaluate(KnownSystem(), samples)
    assert torch.equal(before, torch.get_rng_state())
    assert out["probe/genre/accuracy"] == pytest.approx(100.0)
    assert out["probe/genre/n_test"] == 8


def test_tasks_of_one_round_share_one_embedding_pass(monkeypatch):
    from mtrun.eval import embed
    from mtrun.eval.embed import EvalCache
    from mtrun.eval.modality_gap import ModalityGap
    from mtrun.eval.retrieval import Retrieval

    calls = []
    original = embed.embed_samples
    monkeypatch.setattr(embed, "embed_samples", lambda *a, **k: calls.append(1) or original(*a, **k))
    samples, system, cache = known_samples([0, 1, 2, 3]), KnownSystem(), EvalCache()
    Retrieval(Retrieval.Config(clip_seconds=1.0, bootstrap=0)).evaluate(system, samples, cache=cache)
    ModalityGap(ModalityGap.Config(clip_seconds=1.0)).evaluate(system, samples, cache=cache)
    assert len(calls) == 1


# ------------------------------------------------------------------------ inference path


@pytest.fixture
def wav_files(tmp_path):
    import soundfile

    rng = np.random.default_rng(0)
    paths = []
    for i, seconds in enumerate([1.3, 0.4, 2.0]):
        path = tmp_path / f"clip{i}.wav"
        soundfile.write(path, (0.3 * rng.standard_normal((int(seconds * 16000), 2))).astype("float32"), 16000)
        paths.append(path)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really audio")
    return paths, broken


def test_same_audio_file_embedded_twice_gives_identical_vectors(toy_system, wav_files):
    from mtrun.eval.embed import embed_samples

    (a, b, c), broken = wav_files
    system = toy_system(seed=1)
    samples = [
        Sample(id="a", audio=str(a), captions=["first"]),
        Sample(id="b", audio=str(b), captions=["second"]),
        Sample(id="bad", audio=str(broken), captions=["broken"]),
        Sample(id="c", audio=str(c), captions=["third"]),
        Sample(id="a-again", audio=str(a), captions=["first again"]),
    ]
    system.train()
    first = embed_samples(system, samples, clip_seconds=0.5, hop_seconds=0.25, batch_size=3)
    again = embed_samples(system, list(reversed(samples)), clip_seconds=0.5, hop_seconds=0.25, batch_size=2)
    assert system.training  # the mode is restored
    assert first.ids == ["a", "b", "c", "a-again"]
    assert np.array_equal(first.audio[0], first.audio[3])
    assert np.array_equal(first.audio[0], again.audio[again.ids.index("a")])
    assert np.allclose(np.linalg.norm(first.audio, axis=1), 1.0, atol=1e-5)
    assert [s for s, _ in first.skipped] == ["bad"] and "broken" not in first.captions
    assert first.text_item.tolist() == [0, 1, 2, 3]


def test_windows_are_mean_pooled_before_normalising(toy_system):
    from mtrun.eval.embed import embed_samples

    system = toy_system(seed=2)
    rate = system.audio_encoder.sample_rate
    wave = torch.randn(2 * rate, generator=torch.Generator().manual_seed(0))
    emb = embed_samples(system, [Sample(id="x", audio=wave, sample_rate=rate)], clip_seconds=1.0)
    with torch.no_grad():
        windows = wave.reshape(2, rate)
        projected = system.audio_projector(system.audio_encoder(system.audio_encoder.preprocess(windows)))
        expected = nn.functional.normalize(projected.mean(0), dim=-1)
    assert np.allclose(emb.audio[0], expected.numpy(), atol=1e-6)


@pytest.mark.parametrize("name", ["retrieval", "zero-shot", "probe", "modality-gap"])
def test_builtin_eval_tasks_honour_the_contract_and_run_on_a_toy_system(registry, name, toy_system):
    import mtrun_testkit as tk

    from mtrun.testing import check_component

    task = check_component(registry, "eval", name)
    samples = tk.ToyTones(tk.ToyTones.Config(n_items=12)).load("val")
    cls = registry.get("eval", name).cls
    settings = {"clip_seconds": 0.25}
    if name in ("zero-shot", "probe"):
        settings["category"] = "pitch"
    if name == "probe":
        settings["max_epochs"] = 5
    if name == "retrieval":
        settings["bootstrap"] = 20
    out = cls(cls.Config(**settings)).evaluate(toy_system(), samples)
    assert out and all(isinstance(v, float) for v in out.values())
    assert all(k.startswith(name.split("-")[0]) for k in out)
    assert task is not None


def test_probe_with_a_mistyped_train_split_names_it_before_embedding_anything():
    from mtrun.errors import MtrunError
    from mtrun.eval.probe import Probe

    class Splits:
        def splits(self):
            return ["train", "val", "test"]

        def load(self, split):  # pragma: no cover - must not be reached
            raise AssertionError("loaded a split")

    probe = Probe(Probe.Config(clip_seconds=1.0, train_split="trian"), data=Splits())
    with pytest.raises(MtrunError, match="train_split 'trian'.*train, val, test"):
        probe.evaluate(KnownSystem(), known_samples([0, 1] * 4))


def test_a_probe_trains_inside_an_evaluation_context():
    """The trainer evaluates under no_grad (and autocast): the probe still trains."""
    import torch

    from mtrun.eval.probe import train_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = (x[:, 0] > 0).astype(np.int64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        probs = train_probe(x[:120], y[:120], x[120:160], y[120:160], x[160:], kind="single", seed=0, max_epochs=30)
    assert (probs.argmax(1) == y[160:]).mean() > 0.9


class Forgetful(nn.Module):
    """A projector that throws the audio away: every clip gets the same joint embedding."""

    output_dim = len(CLASSES)

    def forward(self, encoded):
        return torch.ones(encoded.pooled.shape[0], len(CLASSES))


def test_the_probe_reads_the_backbone_by_default_and_the_joint_embedding_only_when_asked():
    """MuLaP's protocol probes the audio backbone's pooled output: with a projector that
    discards everything, ``features = "encoder"`` still separates the classes and
    ``features = "embedding"`` cannot do better than the majority class."""
    from mtrun.eval.probe import Probe

    system = KnownSystem()
    system.audio_projector = Forgetful()
    samples = known_samples([0, 1, 2, 3] * 10)
    backbone = Probe(Probe.Config(clip_seconds=1.0, max_epochs=30, seeds=1)).evaluate(system, samples)
    joint = Probe(Probe.Config(clip_seconds=1.0, max_epochs=30, seeds=1, features="embedding")).evaluate(system, samples)
    assert backbone["probe/genre/accuracy"] == pytest.approx(100.0)
    n_test = int(joint["probe/genre/n_test"])
    assert joint["probe/genre/accuracy"] <= 100.0 * (n_test // 2) / n_test  # at best one class's share


def test_the_probe_applies_weight_decay_halves_the_rate_on_a_plateau_and_stops_early(monkeypatch):
    """No signal to learn (random labels): the validation metric stalls, so the learning rate
    halves every ``patience // 2`` epochs without improvement and training stops after
    ``patience`` of them, long before ``max_epochs``; Adam gets the configured decay."""
    from mtrun.eval.probe import train_probe

    seen: list = []

    class Spy(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            seen.append(self)
            self.rates: list[float] = []

        def step(self, closure=None):
            self.rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", Spy)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(160, 4)), rng.integers(0, 2, size=160)
    train_probe(x[:64], y[:64], x[64:128], y[64:128], x[128:], kind="single", seed=0,
                lr=1e-3, weight_decay=0.25, batch_size=64, max_epochs=100, patience=6)
    (adam,) = seen
    assert adam.defaults["weight_decay"] == 0.25
    rates = adam.rates  # one step per epoch (64 items, batch 64)
    assert len(rates) < 100  # stopped early
    assert rates[0] == pytest.approx(1e-3) and min(rates) < 1e-3  # halved at least once
    assert all(any(r == pytest.approx(1e-3 * 0.5**k) for k in range(12)) for r in rates)  # only by halves


def test_the_eval_cache_finds_the_embeddings_of_a_samples_list_it_has_seen():
    """An evaluation set whose samples list is the training source's own reuses its embeddings;
    ``of`` finds them so the report can count the set's recordings (it used to print '?')."""
    from mtrun.eval.embed import EvalCache

    cache, system = EvalCache(), KnownSystem()
    samples, other = known_samples([0, 1, 2]), known_samples([0, 1, 2])
    first = cache.embeddings(system, samples, clip_seconds=1.0)
    assert cache.of(samples) == [first] and cache.of(other) == []
    assert len(cache.of(samples)[0].audio) == 3


def test_probe_on_a_category_no_item_has_names_the_key_and_the_categories_there_are():
    """Seen on a machine without the demo corpus (the tiny MuLaP run fell back to tones tagged
    only by pitch): a bare 'argmax of an empty sequence' before, a recipe message now."""
    from mtrun.errors import MtrunError
    from mtrun.eval.probe import Probe

    samples = known_samples([0, 1] * 4)
    present = sorted({key for s in samples for key in s.tags})
    probe = Probe(Probe.Config(clip_seconds=1.0, category="mood"))
    with pytest.raises(MtrunError, match=f"category = 'mood' labels none of the 8 items; their tag categories are: {', '.join(present)}"):
        probe.evaluate(KnownSystem(), samples)


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("probe", {"category": "mood"}, r"category = 'mood' labels none of the 12 items; their tag categories are: pitch"),
        ("probe", {"regression_key": "bpm"}, r"regression_key = 'bpm' is a number in none of the 12 items"),
        ("zero-shot", {"category": "mood"}, r"category = 'mood' labels none of the 12 items; their tag categories are: pitch"),
        ("zero-shot", {"category": "pitch", "classes": ("jazz", "rock")}, r"none of the 12 items has any of classes = \['jazz', 'rock'\].*class-0"),
    ],
)
def test_a_setting_the_items_cannot_serve_is_refused_by_the_tasks_check(registry, name, settings, message):
    """``check`` is what the trainer and the runner call at set-up; a setting that fits the
    items passes it."""
    import mtrun_testkit as tk

    from mtrun.errors import MtrunError

    samples = tk.ToyTones(tk.ToyTones.Config(n_items=12)).load("val")
    cls = registry.get("eval", name).cls
    with pytest.raises(MtrunError, match=message):
        cls(cls.Config(clip_seconds=0.25, **settings)).check_samples(samples)
    cls(cls.Config(clip_seconds=0.25, category="pitch")).check_samples(samples)


def test_evaluate_run_checks_every_evaluation_set_before_it_embeds_anything():
    """The second set's setting is wrong: refused before the first set is embedded (the system
    here cannot embed at all, so any embedding would fail with another error)."""
    import mtrun_testkit as tk

    from mtrun.eval.run import EvalError, evaluate_run
    from mtrun.eval.sets import EvalSet
    from mtrun.eval.zeroshot import ZeroShot

    source = tk.ToyTones(tk.ToyTones.Config(n_items=12))

    def zero_shot_set(name, category, index):
        task = ZeroShot(ZeroShot.Config(clip_seconds=0.25, category=category))
        return EvalSet(name=name, source=source, type="toy-tones", split="val", where=f"[[eval]][{index}].data",
                       tasks=(("zero-shot", task),))

    sets = [zero_shot_set("fine", "pitch", 0), zero_shot_set("wrong", "mood", 1)]
    with pytest.raises(EvalError, match=r"category = 'mood'.*\(evaluating split 'val' of evaluation set 'wrong' \(\[\[eval\]\]\[1\]\.data\)\)"):
        evaluate_run(object(), source, {}, sets=sets)


def test_a_probe_with_a_train_split_loads_it_once_for_its_check_and_every_round():
    from mtrun.eval.probe import Probe

    loads = []

    class Splits:
        def splits(self):
            return ["train", "test"]

        def load(self, split):
            loads.append(split)
            return known_samples([0, 1, 2, 3] * 6)

    probe = Probe(Probe.Config(clip_seconds=1.0, train_split="train", max_epochs=10, seeds=1), data=Splits())
    test = known_samples([0, 1, 2, 3] * 2)
    probe.check_samples(test)
    first, second = (probe.evaluate(KnownSystem(), test) for _ in range(2))
    assert loads == ["train"]
    assert first == second and first["probe/genre/n_train"] > 0 and first["probe/genre/n_test"] == 8
