"""mtrun.testing: the isolated registry and the contract check plugin authors rely on."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import torch
from torch import nn

from mtrun.errors import PluginError
from mtrun.hookspecs import hookimpl
from mtrun.interfaces import EncoderOutput
from mtrun.testing import ContractError, check_component, isolated_registry

TESTKIT_SRC = Path(__file__).parent / "testkit" / "src"


@pytest.fixture(scope="module")
def testkit():
    """The testkit plugin module, imported from source (not installed)."""
    added = str(TESTKIT_SRC) not in sys.path  # tests/conftest.py may already have put it there
    if added:
        sys.path.insert(0, str(TESTKIT_SRC))
    try:
        import mtrun_testkit

        yield mtrun_testkit
    finally:
        if added:
            sys.path.remove(str(TESTKIT_SRC))


@pytest.fixture
def kit_registry(testkit):
    # builtins=False keeps these checks about the testkit alone.
    return isolated_registry(testkit, builtins=False)


def test_isolated_registry_holds_exactly_the_given_plugins(testkit, monkeypatch):
    # Even with entry-point loading narrowed to nothing, the isolated registry sees the module.
    monkeypatch.setenv("MTRUN_LOAD_PLUGINS", "")
    registry = isolated_registry(testkit, builtins=False)
    assert {(c.kind, c.name) for c in registry} == {
        ("data", "toy-tones"),
        ("audio_encoder", "toy-audio"),
        ("text_encoder", "toy-text"),
        ("projector", "toy-linear"),
        ("objective", "toy-contrastive"),
        ("augmenter", "toy-gain"),
    }
    assert {c.plugin.name for c in registry} == {"testkit"}


def test_isolated_registry_accepts_a_dotted_module_path(testkit):
    registry = isolated_registry("mtrun_testkit", builtins=False)
    assert registry.names("projector") == ["toy-linear"]


def test_isolated_registry_includes_core_builtins_by_default(testkit):
    registry = isolated_registry(testkit)
    assert ("trainer", "default") in registry
    assert registry.get("trainer", "default").plugin.name == "builtins"


@pytest.mark.parametrize(
    ("kind", "name", "deps"),
    [
        ("data", "toy-tones", {}),
        ("audio_encoder", "toy-audio", {}),
        ("text_encoder", "toy-text", {}),
        ("projector", "toy-linear", {"in_features": 32}),
        ("projector", "toy-linear", {}),  # in_features defaults for projectors
        ("objective", "toy-contrastive", {}),
        ("augmenter", "toy-gain", {}),
    ],
)
def test_testkit_components_pass_the_contract_check(kit_registry, kind, name, deps):
    instance = check_component(kit_registry, kind, name, **deps)
    assert isinstance(instance, kit_registry.get(kind, name).cls)


def test_check_builds_with_the_given_config(kit_registry, testkit):
    config = testkit.ToyAudio.Config(width=12)
    encoder = check_component(kit_registry, "audio_encoder", "toy-audio", config=config)
    assert encoder.output_dim == 12


def test_unknown_component_is_reported_with_what_exists(kit_registry):
    with pytest.raises(ContractError, match="not registered.*toy-linear"):
        check_component(kit_registry, "projector", "toy-linaer")


# ------------------------------------------------------------------ broken components


class _GoodConfigMixin:
    @attrs.frozen
    class Config:
        width: int = attrs.field(default=8, metadata={"help": "output width"})


class WrongShapeProjector(nn.Module):
    """Forgets to pool: returns [B, N, D] instead of [B, D]."""

    Config = _GoodConfigMixin.Config

    def __init__(self, config, *, in_features: int):
        super().__init__()
        self.output_dim = config.width
        self.linear = nn.Linear(in_features, config.width)

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        return self.linear(encoded.tokens)


class NoHelpMutableConfigProjector(WrongShapeProjector):
    """Config is a mutable attrs class without help texts; otherwise correct."""

    @attrs.define
    class Config:
        width: int = 8

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        return self.linear(encoded.pooled)


class UnstructurableConfigProjector(WrongShapeProjector):
    """A Config field cattrs cannot structure back (an arbitrary object)."""

    class Opaque:
        def __init__(self, x: int = 1):
            self.x = x

    @attrs.frozen
    class Config:
        thing: "UnstructurableConfigProjector.Opaque" = attrs.field(
            factory=lambda: UnstructurableConfigProjector.Opaque(), metadata={"help": "something opaque"}
        )

    def __init__(self, config, *, in_features: int):
        nn.Module.__init__(self)
        self.output_dim = 4
        self.linear = nn.Linear(in_features, 4)


class BadAttributesEncoder(nn.Module):
    """Declares a float sample rate, no token_grid, and returns unpooled output."""

    Config = _GoodConfigMixin.Config
    sample_rate = 16000.0

    def __init__(self, config):
        super().__init__()
        self.output_dim = config.width

    def preprocess(self, waveforms):
        return waveforms

    def forward(self, features, *, keep_index=None, output_hidden_states=False):
        return features


class PositionalDependencyProjector(WrongShapeProjector):
    """Takes in_features positionally, so the assembler could not inject it."""

    def __init__(self, config, in_features: int):
        super().__init__(config, in_features=in_features)


class NeedsSystemObjective(nn.Module):
    """An objective that asks for the assembled system."""

    Config = _GoodConfigMixin.Config

    def __init__(self, config, *, system):
        super().__init__()
        self.system = system

    def forward(self, outputs):
        from mtrun.interfaces import ObjectiveOutput

        return ObjectiveOutput(loss=(outputs.audio_embedding * outputs.text_embedding).sum(-1).mean())


class DetachedLossObjective(nn.Module):
    """Returns a loss that does not depend on the model's outputs (a constant, say)."""

    Config = _GoodConfigMixin.Config

    def __init__(self, config):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, outputs):
        from mtrun.interfaces import ObjectiveOutput

        return ObjectiveOutput(loss=self.scale * outputs.audio_embedding.detach().sum())


class VectorLossObjective(nn.Module):
    """Returns one loss per item instead of their mean."""

    Config = _GoodConfigMixin.Config

    def __init__(self, config):
        super().__init__()

    def forward(self, outputs):
        from mtrun.interfaces import ObjectiveOutput

        return ObjectiveOutput(loss=(outputs.audio_embedding - outputs.text_embedding).pow(2).sum(-1))


class _StubAugmenter:
    """What every augmenter below shares: a valid Config and nothing to build."""

    Config = _GoodConfigMixin.Config

    def __init__(self, config):
        pass


class InPlaceFeatureAugmenter(_StubAugmenter):
    """A features augmenter that zeroes bands in its input (which clean_features shares)."""

    stage: ClassVar[str] = "features"

    def __call__(self, features, context):
        features[..., :2] = 0.0
        return features


class UnsortedKeepAugmenter(_StubAugmenter):
    """An audio_tokens augmenter whose keep_index is not ascending."""

    stage: ClassVar[str] = "audio_tokens"

    def __call__(self, batch, context):
        batch.audio_keep_index = torch.tensor([[3, 1], [0, 2]])
        return batch


class ShapeChangingAugmenter(_StubAugmenter):
    """A waveform augmenter that crops, which would break collated batches."""

    stage: ClassVar[str] = "waveform"

    def __call__(self, waveforms, context):
        return waveforms[:, :10]


class NarrowingEncodedAugmenter(_StubAugmenter):
    """An encoded augmenter that slices the audio tokens' width."""

    stage: ClassVar[str] = "encoded"

    def __call__(self, batch, context):
        a = batch.audio_encoded
        batch.audio_encoded = EncoderOutput(tokens=a.tokens[..., :3], pooled=a.pooled, mask=a.mask)
        return batch


class WrongStreamsFusion(nn.Module):
    """A fusion whose text stream comes out at the audio width and pooled at the wrong width."""

    Config = _GoodConfigMixin.Config

    def __init__(self, config, *, audio_features, text_features):
        super().__init__()
        self.output_dim, self.audio_width, self.text_width = 8, 8, 12
        self.audio = nn.Linear(audio_features, 8)

    def forward(self, audio, text):
        tokens = self.audio(audio.tokens)
        fused = EncoderOutput(tokens=tokens, pooled=tokens.mean(1), mask=audio.mask)
        return fused, EncoderOutput(tokens=tokens, pooled=tokens.mean(1)[:, :4], mask=audio.mask)


class BrokenPlugin:
    """A plugin object registering the broken components above."""

    @staticmethod
    @hookimpl
    def mtrun_register_components(registry) -> None:
        registry.projector("wrong-shape", WrongShapeProjector)
        registry.projector("no-help", NoHelpMutableConfigProjector)
        registry.projector("opaque", UnstructurableConfigProjector)
        registry.projector("positional", PositionalDependencyProjector)
        registry.audio_encoder("bad-attrs", BadAttributesEncoder)
        registry.objective("needs-system", NeedsSystemObjective)
        registry.objective("detached", DetachedLossObjective)
        registry.objective("vector-loss", VectorLossObjective)
        registry.augmenter("cropper", ShapeChangingAugmenter)
        registry.augmenter("in-place", InPlaceFeatureAugmenter)
        registry.augmenter("unsorted-keep", UnsortedKeepAugmenter)
        registry.augmenter("narrowing", NarrowingEncodedAugmenter)
        registry.fusion("wrong-streams", WrongStreamsFusion)


@pytest.fixture
def broken_registry():
    return isolated_registry(BrokenPlugin, builtins=False)


def test_projector_returning_wrong_shape_fails_the_check(broken_registry):
    with pytest.raises(ContractError, match=r"must return \[B=2, output_dim=8\] \(got \(2, 5, 8\)\)"):
        check_component(broken_registry, "projector", "wrong-shape")


def test_mutable_config_without_help_fails_with_both_problems(broken_registry):
    with pytest.raises(ContractError) as info:
        check_component(broken_registry, "projector", "no-help")
    problems = info.value.problems
    assert any("Config.width has no help text" in p for p in problems)
    assert any("Config is mutable" in p for p in problems)


def test_config_that_does_not_round_trip_fails(broken_registry):
    with pytest.raises(ContractError, match="round-trip"):
        check_component(broken_registry, "projector", "opaque")


def test_encoder_with_bad_attributes_lists_every_problem(broken_registry):
    with pytest.raises(ContractError) as info:
        check_component(broken_registry, "audio_encoder", "bad-attrs")
    text = str(info.value)
    assert "sample_rate must be a positive int (got 16000.0)" in text
    assert "token_grid is missing" in text
    assert "bad-attrs" in text and "BadAttributesEncoder" in text


def test_positional_dependency_is_rejected(broken_registry):
    with pytest.raises(ContractError, match="keyword-only"):
        check_component(broken_registry, "projector", "positional")


def test_missing_dependency_is_named_and_supplied_dependency_is_injected(broken_registry):
    with pytest.raises(ContractError, match="constructor needs system"):
        check_component(broken_registry, "objective", "needs-system")
    sentinel = object()
    built = check_component(broken_registry, "objective", "needs-system", system=sentinel)
    assert built.system is sentinel


def test_waveform_augmenter_changing_shape_fails(broken_registry):
    with pytest.raises(ContractError, match="must keep the shape"):
        check_component(broken_registry, "augmenter", "cropper")


def test_contract_error_is_an_assertion_error_for_any_test_runner():
    assert issubclass(ContractError, AssertionError)


def test_broken_plugin_fails_while_building_the_isolated_registry():
    class Misspelled:
        @staticmethod
        @hookimpl
        def mtrun_register_component(registry) -> None:  # missing the final "s"
            pass

    with pytest.raises(PluginError, match="mtrun_register_component"):
        isolated_registry(Misspelled, builtins=False)


# A plugin's conftest.py would say `pytest_plugins = ["mtrun.testing"]`; importing the fixture
# does the same for this module alone.
from mtrun.testing import mtrun_registry  # noqa: E402,F401


@pytest.fixture
def mtrun_plugin_modules(testkit):
    return [testkit]


def test_pytest_fixture_gives_a_registry_of_the_overridden_modules(mtrun_registry):
    assert mtrun_registry.names("audio_encoder") == ["toy-audio"]
    check_component(mtrun_registry, "audio_encoder", "toy-audio")


def test_an_objective_whose_loss_never_reaches_the_embeddings_fails(broken_registry):
    with pytest.raises(ContractError, match="gradient reaches none of the embeddings"):
        check_component(broken_registry, "objective", "detached")


def test_an_objective_returning_one_loss_per_item_fails(broken_registry):
    with pytest.raises(ContractError, match=r"loss must be a scalar tensor \(got \(2,\)\)"):
        check_component(broken_registry, "objective", "vector-loss")


def test_a_features_augmenter_writing_into_its_input_fails(broken_registry):
    with pytest.raises(ContractError, match="wrote into its input"):
        check_component(broken_registry, "augmenter", "in-place")


def test_an_encoded_augmenter_changing_an_encoder_outputs_shape_fails(broken_registry):
    with pytest.raises(ContractError, match=r"encoded augmenter changed batch\.audio_encoded\.tokens from \(2, 16, 16\) .* to \(2, 16, 3\)"):
        check_component(broken_registry, "augmenter", "narrowing")


def test_a_fusion_is_run_with_default_widths_and_its_streams_checked(broken_registry):
    with pytest.raises(ContractError) as info:
        check_component(broken_registry, "fusion", "wrong-streams")  # audio_features/text_features default to 16
    text = str(info.value)
    assert "the fused text stream: tokens must be [B=2, N=7, width=12] (got (2, 5, 8))" in text
    assert "the fused text stream: pooled must be [B=2, output_dim=8] (got (2, 4))" in text
    assert "the fused audio stream" not in text


def test_a_misspelt_kind_or_name_gets_a_did_you_mean(kit_registry):
    with pytest.raises(ContractError, match=r"'projectr' is no component kind \(did you mean 'projector'\?\)"):
        check_component(kit_registry, "projectr", "toy-linear")
    with pytest.raises(ContractError, match=r"not registered \(did you mean 'toy-linear'\?\)"):
        check_component(kit_registry, "projector", "toy-linaer")


def test_an_audio_tokens_augmenter_with_unsorted_keep_index_fails(broken_registry):
    with pytest.raises(ContractError, match="ascending grid positions"):
        check_component(broken_registry, "augmenter", "unsorted-keep")


def test_synthetic_outputs_carry_gradients_to_every_model_output():
    from mtrun.testing import synthetic_outputs

    outputs = synthetic_outputs(3, dim=8)
    assert outputs.audio_embedding.shape == (3, 8) and outputs.audio_embedding.requires_grad
    assert outputs.text.tokens.requires_grad and outputs.batch.text_encoded is outputs.text
    mask = outputs.batch.text_inputs["attention_mask"]
    assert mask.sum(1).min() < mask.shape[1]  # one caption is padded
