"""Zero-shot prompt protocols: our prompt-ensembled "song" set and SLAP's best-of-four "slap" set,
each checked against an independent computation of its prompts, scores and metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from mtrun.interfaces import EncoderOutput, Sample

CLASSES = ["jig", "reel", "waltz", "march"]
RATE = 100
DIM = 6


class TableAudio(nn.Module):
    """Audio "encoder": item i is a constant waveform of value i + 1; its output is row i of a table."""

    sample_rate = RATE
    output_dim = DIM
    token_grid = None

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))

    def preprocess(self, waveforms):
        return waveforms

    def forward(self, features, *, keep_index=None, output_hidden_states=False):
        row = features.abs().mean(-1).round().long() - 1
        pooled = self.table[row]
        return EncoderOutput(tokens=pooled[:, None], pooled=pooled, mask=torch.ones(len(pooled), 1, dtype=torch.bool))


class Identity(nn.Module):
    output_dim = DIM

    def forward(self, encoded):
        return encoded.pooled


class TableSystem(nn.Module):
    """A System stand-in whose text embedding is a fixed random vector per exact string, so every
    wording of every class has its own embedding; it records every text it is asked to embed."""

    def __init__(self, audio_table: np.ndarray, seed: int = 0):
        super().__init__()
        self.audio_encoder = TableAudio(audio_table)
        self.audio_projector = Identity()
        self.seed = seed
        self.seen: list[str] = []

    def project(self, modality, encoded):
        assert modality == "audio"
        return self.audio_projector(encoded)

    def text_vector(self, text: str) -> np.ndarray:
        # Deterministic and unnormalised (length 1..3), so an ensemble that forgot to normalise
        # each prompt before averaging would give different class embeddings.
        rng = np.random.default_rng([self.seed, *text.encode()])
        return rng.normal(size=DIM) * rng.uniform(1.0, 3.0)

    def embed_text(self, texts):
        self.seen.extend(texts)
        return torch.as_tensor(np.stack([self.text_vector(t) for t in texts]), dtype=torch.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_case(labels: list[list[int]], seed: int = 0):
    """Items whose audio embedding lies near the mean of their classes' prompt vectors, plus
    noise, so each template gets a different, better-than-chance score."""
    rng = np.random.default_rng(seed)
    probe = TableSystem(np.zeros((1, DIM)), seed)
    centre = np.stack([_unit(probe.text_vector(f"{c} music")) for c in CLASSES])
    audio = np.stack([_unit(centre[ls].sum(0) + 1.3 * rng.normal(size=DIM)) for ls in labels])
    samples = [
        Sample(id=f"s{i}", audio=torch.full((RATE,), float(i + 1)), sample_rate=RATE, captions=[], tags={"genre": [CLASSES[c] for c in ls]})
        for i, ls in enumerate(labels)
    ]
    return TableSystem(audio, seed), samples, audio


def independent_scores(system: TableSystem, audio: np.ndarray, templates: tuple[str, ...]) -> np.ndarray:
    """Cosine of each (normalised) audio row to each class: the class embedding is the normalised
    mean of the normalised prompt vectors (one template: that prompt's unit vector)."""
    cls = np.stack([_unit(np.mean([_unit(system.text_vector(t.format(c))) for t in templates], 0)) for c in CLASSES])
    return _unit(audio.astype(np.float32).astype(np.float64)) @ cls.T


def test_slap_template_set_holds_the_papers_four_prompts_and_best_of_aggregation():
    from mtrun.eval.zeroshot import SLAP_TEMPLATES, ZeroShot

    # SLAP (Guinot et al., ISMIR 2025), "Zero-shot performance": "four prompts with which we wrap
    # the target class "{}", "{} music", "this sounds like {}", and "A {} track"", best of four.
    assert SLAP_TEMPLATES == ("{}", "{} music", "this sounds like {}", "A {} track")
    cfg = ZeroShot.Config(template_set="slap")
    assert cfg.wordings == SLAP_TEMPLATES and cfg.aggregation == "best-of"
    default = ZeroShot.Config()
    assert default.template_set == "song" and default.aggregation == "ensemble"


def test_slap_single_label_reports_each_template_and_the_best_of_four():
    from mtrun.eval.zeroshot import SLAP_TEMPLATES, ZeroShot

    labels = [[i % 4] for i in range(40)]
    system, samples, audio = make_case(labels, seed=3)
    out = ZeroShot(ZeroShot.Config(clip_seconds=1.0, template_set="slap", classes=tuple(CLASSES))).evaluate(system, samples)

    # The prompts SLAP's protocol embeds: each class wrapped in each of the four templates.
    expected_prompts = {t.format(c) for t in SLAP_TEMPLATES for c in CLASSES}
    assert expected_prompts == set(system.seen)
    assert {"jig", "reel music", "this sounds like waltz", "A march track"} <= set(system.seen)

    truth = np.array([ls[0] for ls in labels])
    per_template = [100.0 * np.mean(independent_scores(system, audio, (t,)).argmax(1) == truth) for t in SLAP_TEMPLATES]
    assert len(set(per_template)) > 1  # the templates disagree, so "best of" is a real choice
    for i, acc in enumerate(per_template, 1):
        assert out[f"zero-shot/genre/template{i}/accuracy"] == pytest.approx(acc)
    assert out["zero-shot/genre/accuracy"] == pytest.approx(max(per_template))
    assert out["zero-shot/genre/n_items"] == 40


def test_slap_multi_label_takes_the_best_template_per_metric():
    from mtrun.eval.zeroshot import SLAP_TEMPLATES, ZeroShot

    rng = np.random.default_rng(7)
    labels = [sorted(set(rng.choice(4, size=rng.integers(1, 3), replace=True).tolist())) for _ in range(60)]
    system, samples, audio = make_case(labels, seed=11)
    out = ZeroShot(ZeroShot.Config(clip_seconds=1.0, template_set="slap", classes=tuple(CLASSES))).evaluate(system, samples)

    target = np.zeros((len(labels), 4), dtype=bool)
    for n, ls in enumerate(labels):
        target[n, ls] = True
    per = {"roc_auc": [], "pr_auc": []}
    for i, t in enumerate(SLAP_TEMPLATES, 1):
        s = independent_scores(system, audio, (t,))
        per["roc_auc"].append(100 * np.mean([roc_auc_score(target[:, c], s[:, c]) for c in range(4)]))
        per["pr_auc"].append(100 * np.mean([average_precision_score(target[:, c], s[:, c]) for c in range(4)]))
        assert out[f"zero-shot/genre/template{i}/roc_auc"] == pytest.approx(per["roc_auc"][-1], abs=1e-6)
        assert out[f"zero-shot/genre/template{i}/pr_auc"] == pytest.approx(per["pr_auc"][-1], abs=1e-6)
    for metric, values in per.items():
        assert out[f"zero-shot/genre/{metric}"] == pytest.approx(max(values), abs=1e-6)
    # Best per metric, not one template's whole row.
    assert out["zero-shot/genre/mAR"] == pytest.approx(max(out[f"zero-shot/genre/template{i}/mAR"] for i in range(1, 5)))


def test_song_set_ensembles_normalised_prompt_embeddings_and_reports_no_per_template_rows():
    from mtrun.eval.zeroshot import SONG_TEMPLATES, ZeroShot

    labels = [[i % 4] for i in range(40)]
    system, samples, audio = make_case(labels, seed=5)
    out = ZeroShot(ZeroShot.Config(clip_seconds=1.0, classes=tuple(CLASSES))).evaluate(system, samples)

    assert {t.format(c) for t in SONG_TEMPLATES for c in CLASSES} == set(system.seen)
    truth = np.array([ls[0] for ls in labels])
    expected = 100.0 * np.mean(independent_scores(system, audio, SONG_TEMPLATES).argmax(1) == truth)
    assert out["zero-shot/genre/accuracy"] == pytest.approx(expected)
    assert not any("/template" in k for k in out)


def test_own_templates_replace_the_wordings_and_aggregate_overrides_the_sets():
    from mtrun.eval.zeroshot import ZeroShot

    labels = [[i % 4] for i in range(24)]
    system, samples, audio = make_case(labels, seed=2)
    mine = ("a {} tune", "{} played live")
    cfg = ZeroShot.Config(clip_seconds=1.0, template_set="slap", templates=mine, aggregate="ensemble", classes=tuple(CLASSES))
    out = ZeroShot(cfg).evaluate(system, samples)
    assert set(system.seen) == {t.format(c) for t in mine for c in CLASSES}
    truth = np.array([ls[0] for ls in labels])
    assert out["zero-shot/genre/accuracy"] == pytest.approx(100.0 * np.mean(independent_scores(system, audio, mine).argmax(1) == truth))


def test_template_set_is_chosen_by_name_in_a_recipe_table_and_unknown_names_are_refused():
    from mtrun.eval.zeroshot import SLAP_TEMPLATES, ZeroShot
    from mtrun.recipe.resolve import structure_config

    cfg, problems = structure_config(ZeroShot.Config, {"category": "genre", "template_set": "slap"})
    assert problems == [] and cfg.wordings == SLAP_TEMPLATES and cfg.aggregation == "best-of"
    cfg, problems = structure_config(ZeroShot.Config, {"template_set": "slapp", "aggregate": "max"})
    assert cfg is None
    text = " ".join(str(p) for p in problems)
    assert "template_set" in text and "aggregate" in text
