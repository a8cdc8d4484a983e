"""DuET-MC (recipes/duet_mc*.toml): with locked encoders only the MERT layer aggregator and
the two Transformer projectors train, and their parameter count follows from the configs.

Built from the recipes' ``tiny`` profiles with the real entry-point registry: the plugins must
be installed (scripts/install.sh); a missing one fails here rather than skipping.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtrun.assemble import assemble
from mtrun.interfaces import AugmentContext, Sample
from mtrun.plugins import get_plugins
from mtrun.recipe import load_recipe, resolve_recipe
from mtrun.run import Run

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def build(tmp_path: Path, name: str, overrides=()):
    data = load_recipe(RECIPES / name, overrides=list(overrides), profile="tiny")
    resolved = resolve_recipe(data, get_plugins().registry, name)
    run = Run(dir=tmp_path / "run", config=resolved.run, loader=resolved.loader, recipe=resolved.data)
    torch.manual_seed(0)
    return resolved, assemble(resolved, run)


def transformer_projector_params(in_features: int, cfg) -> int:
    """Parameters of the `transformer` projector, counted from its config alone."""
    w = cfg.width
    hidden = int(w * cfg.mlp_ratio)
    block = (
        3 * w * w + 3 * w  # qkv
        + w * w + w  # attention output
        + w * hidden + hidden + hidden * w + w  # MLP
        + 2 * 2 * w  # two LayerNorms
    )
    total = in_features * w + w  # input Linear
    total += w  # [CLS]
    total += cfg.layers * block
    total += 2 * w if cfg.final_norm else 0
    total += w * cfg.dim + cfg.dim if cfg.dim > 0 else 0
    return total


def encoder_width(spec) -> tuple[int, int]:
    """(output width, hidden layers) of an encoder from its preset table."""
    if spec.name == "mert":
        from mtrun_mert import PRESETS

        preset = PRESETS[spec.config.preset]
        return preset["hidden_size"], preset["num_hidden_layers"]
    if spec.name == "clip-text":
        from mtrun_clip_text import PRESETS

        preset = PRESETS[spec.config.preset][1]
        return preset["hidden_size"], preset["num_hidden_layers"]
    if spec.name == "mt5":
        from mtrun_mt5 import PRESETS

        preset = PRESETS[spec.config.preset]
        preset = preset[1] if isinstance(preset, tuple) else preset
        return preset["d_model"], preset["num_layers"]
    if spec.name == "htsat":
        from mtrun_htsat.encoder import PRESETS

        preset = PRESETS[spec.config.preset]
        return preset["patch_embeds_hidden_size"] * 2 ** (len(preset["depths"]) - 1), len(preset["depths"])
    raise AssertionError(f"no width rule for {spec.name}")


def expected_trainable(resolved) -> dict[str, int]:
    comps = resolved.components
    audio_width, audio_layers = encoder_width(comps["audio_encoder"])
    text_width, _ = encoder_width(comps["text_encoder"])
    expected = {
        "audio_projector": transformer_projector_params(audio_width, comps["audio_projector"].config),
        "text_projector": transformer_projector_params(text_width, comps["text_projector"].config),
    }
    if comps["audio_encoder"].name == "mert":
        # Conv1d(L + 1 hidden states -> 1, kernel 1): a weight per hidden state and a bias.
        expected["audio_encoder.aggregator"] = (audio_layers + 1) + 1
    for objective in resolved.objectives:
        if getattr(objective.config, "learnable", False):
            expected["objectives"] = expected.get("objectives", 0) + 1  # log(1/temperature)
    return expected


def synthetic_batch(system, n: int = 6, seconds: float = 2.0):
    """A batch as the loader makes it, from in-memory tagged samples (no corpus needed)."""
    from mtrun.data.loader import BatchLoader
    from mtrun.run import LoaderConfig

    genres, instruments = ["reel", "jig", "air"], ["violin", "flute", "piano", "harp"]
    g = torch.Generator().manual_seed(1)
    samples = [
        Sample(
            id=f"s{i}",
            audio=torch.randn(int(16000 * seconds), generator=g) * 0.1,
            sample_rate=16000,
            captions=[f"A {genres[i % 3]} on {instruments[i % 4]}."],
            tags={"genre": [genres[i % 3]], "instrument": [instruments[i % 4]], "tempo": ["fast"]},
            group=f"piece{i}",
        )
        for i in range(n)
    ]
    loader = BatchLoader(
        samples,
        batch_size=n,
        training=True,
        augmenters=system.sample_augmenters,
        config=LoaderConfig(clip_seconds=seconds),
        sample_rate=system.audio_encoder.sample_rate,
        tokenize=system.text_encoder.tokenize,
        seed=0,
        steps_per_epoch=1,
        total_steps=100,
    )
    return loader.make_batch(list(range(n)))


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        ("duet_mc.toml", ["objective.0.learnable=false"]),  # the paper's fixed τ (the profile learns it)
        ("duet_mc_mt5.toml", []),
        ("duet_mc.toml", ["objective.0.learnable=true"]),
        ("duet_mc_htsat.toml", ["audio_encoder.frozen=true"]),  # the variant trains HTS-AT; locked here
    ],
    ids=["mert-clip", "mert-mt5", "learnable-temperature", "htsat-locked"],
)
def test_only_aggregator_and_projectors_train_with_locked_encoders(tmp_path, recipe, overrides):
    # The tiny profile trains its random CLIP-T/mT5; the paper (and this test) lock both encoders.
    # The paper's projectors take the features as they are: the profile's input standardisation
    # would cancel the aggregator's bias (a constant shift) exactly, leaving it no gradient.
    paper = ["text_encoder.frozen=true", 'audio_projector.input_norm="none"', 'text_projector.input_norm="none"']
    resolved, built = build(tmp_path, recipe, [*overrides, *paper])
    system = built.system
    assert resolved.components["audio_encoder"].config.frozen and resolved.components["text_encoder"].config.frozen
    system.train()
    batch = synthetic_batch(system)
    # Epoch 100: TextSwap past its ramp, so hard negatives flow through the text arm too.
    context = AugmentContext(step=100, epoch=100, steps_per_epoch=1, total_steps=200, training=True,
                             generator=torch.Generator().manual_seed(3))
    loss, metrics = system(batch, context)
    loss.backward()
    assert metrics["infonce/hard_negatives"] > 0, "TextSwap produced no hard negatives"

    expected = expected_trainable(resolved)
    prefixes = tuple(expected)
    trainable = {n: p for n, p in system.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in system.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert set(trainable) == with_grad, (
        f"trainable but no gradient: {sorted(set(trainable) - with_grad)}; "
        f"gradient but not trainable: {sorted(with_grad - set(trainable))}"
    )
    outside = [n for n in trainable if not n.startswith(prefixes)]
    assert not outside, f"parameters outside the aggregator/projectors train: {outside}"
    counted = {prefix: sum(p.numel() for n, p in trainable.items() if n.startswith(prefix)) for prefix in prefixes}
    assert counted == expected
    encoders = [
        n for n, p in system.named_parameters()
        if n.startswith(("audio_encoder", "text_encoder")) and not n.startswith(prefixes) and p.grad is not None
    ]
    assert not encoders, f"locked encoder parameters received gradients: {encoders}"


def test_paper_scale_count_is_the_stated_3_55_million(tmp_path):
    """The paper-scale recipe (MERT-330M: 1024 × 24, CLIP ViT-B text: 512) without building it."""
    data = load_recipe(RECIPES / "duet_mc.toml")
    resolved = resolve_recipe(data, get_plugins().registry, "duet_mc.toml")
    expected = expected_trainable(resolved)
    assert expected == {"audio_projector": 1_842_688, "text_projector": 1_711_616, "audio_encoder.aggregator": 26}
    assert sum(expected.values()) == 3_554_330
