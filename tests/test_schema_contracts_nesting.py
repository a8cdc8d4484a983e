"""The component schema, contracts between components, and nested component tables."""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch

import mtrun
from mtrun import ComponentSpec, Need, ObjectiveOutput, RecipeError, component_field
from mtrun import schema
from mtrun.assemble import assemble
from mtrun.cli import main
from mtrun.plugins import load_plugins
from mtrun.recipe import make_converter, resolve_recipe
from mtrun.registry import PluginInfo
from mtrun.run import LoaderConfig, Run, RunConfig
from mtrun.testing import ContractError, check_component, isolated_registry

TOY = {
    "data": {"type": "toy-tones", "n_items": 8},
    "audio_encoder": {"type": "toy-audio", "width": 24},
    "text_encoder": {"type": "toy-text", "width": 20},
    "audio_projector": {"type": "toy-linear", "dim": 8},
    "text_projector": {"type": "toy-linear", "dim": 8},
    "objective": [{"type": "toy-contrastive"}],
    "trainer": {"max_steps": 1, "batch_size": 4},
}


def recipe(**changes):
    return {**TOY, **changes}


def problems(data, registry) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        resolve_recipe(data, registry, "r.toml")
    return caught.value.problems


# ------------------------------------------------------------------ toy components


class DropsTokens:
    """An augmenter that needs an encoder able to drop tokens."""

    stage: ClassVar[str] = "audio_tokens"
    requires: ClassVar[tuple[Need, ...]] = (Need("audio_encoder", "keep_index", "drops tokens"),)

    @attrs.frozen
    class Config:
        pass

    def __init__(self, config):
        self.config = config

    def __call__(self, batch, context):
        return batch


class Scaled(torch.nn.Module):
    """An objective wrapping another objective, chosen in its own table ``[objective.inner]``."""

    @attrs.frozen
    class Config:
        inner: ComponentSpec = component_field("objective", default="toy-contrastive", help="the wrapped objective")
        scale: float = attrs.field(default=2.0, metadata={"help": "loss multiplier"})

    def __init__(self, config, *, audio_encoder):
        super().__init__()
        self.config = config
        self.inner = config.inner.build(audio_encoder=audio_encoder)

    def forward(self, outputs):
        result = self.inner(outputs)
        return ObjectiveOutput(loss=self.config.scale * result.loss, metrics=result.metrics)


class Subset:
    """A data source keeping the first ``n`` items of a base source ``[data.base]`` (no default)."""

    @attrs.frozen
    class Config:
        base: ComponentSpec = component_field("data", help="the source to cut")
        n: int = attrs.field(default=4, metadata={"help": "items kept per split"})

    def __init__(self, config, *, run=None):
        self.base = config.base.build(run=run)
        self.n = config.n

    def splits(self):
        return self.base.splits()

    def load(self, split):
        return self.base.load(split)[: self.n]


class ToyPlugin:
    @mtrun.hookimpl
    def mtrun_register_components(self, registry):
        registry.augmenter("drops-tokens", DropsTokens)
        registry.objective("scaled", Scaled)
        registry.data("subset", Subset)


@pytest.fixture
def registry():
    import mtrun.builtins
    import mtrun_testkit

    extra = [
        (PluginInfo("builtins", "mtrun"), mtrun.builtins),
        (PluginInfo("testkit"), mtrun_testkit),
        (PluginInfo("toys"), ToyPlugin()),
    ]
    return load_plugins(extra=extra, entry_points=False).registry


# ------------------------------------------------------------------ the schema


def test_every_kind_has_a_registry_shortcut_and_every_slot_a_declared_kind():
    kinds = {k.name for k in schema.KINDS}
    assert all(callable(getattr(mtrun.Registry, k)) for k in kinds)
    assert all(s.kind in kinds for s in schema.SLOTS)
    assert [s.inject_as for s in schema.SLOTS if s.many] == ["augmenters", "objectives", "evals"]


def test_registry_checks_class_attributes_the_schema_declares(registry):
    class NoStage:
        @attrs.frozen
        class Config:
            pass

        def __call__(self, value, context):
            return value

    with pytest.raises(mtrun.RegistrationError, match="declares stage None; expected one of sample, waveform"):
        registry.augmenter("no-stage", NoStage)


def test_contract_check_reports_schema_attributes_on_instances(registry):
    class Widthless(torch.nn.Module):
        @attrs.frozen
        class Config:
            pass

        def __init__(self, config, *, in_features):
            super().__init__()
            self.output_dim = 0

        def forward(self, encoded):
            return encoded.pooled

    registry.projector("widthless", Widthless)
    with pytest.raises(ContractError, match="output_dim must be a positive int"):
        check_component(registry, "projector", "widthless")


def test_an_optional_model_slot_is_one_declaration(registry, tmp_path, monkeypatch):
    """A new slot, declared once, is resolved, built with its inputs and held by the system."""
    extra = schema.Slot("audio_head", "projector", model=True, inputs={"in_features": "audio_projector.output_dim"})
    slots = list(schema.SLOTS)
    slots.insert(slots.index(schema.slot("augmenter")), extra)
    monkeypatch.setattr(schema, "SLOTS", tuple(slots))

    resolved = resolve_recipe(recipe(audio_head={"type": "toy-linear", "dim": 3}), registry, "r.toml")
    assert resolved.components["audio_head"].name == "toy-linear"
    run = Run(dir=tmp_path, config=RunConfig(), loader=LoaderConfig(), recipe=resolved.data)
    system = assemble(resolved, run).system
    assert system.audio_head.linear.in_features == 8 and system.audio_head.output_dim == 3
    assert any(name.startswith("audio_head.") for name in system.state_dict())
    assert "audio_head" in problems(recipe(audio_head={"type": "toy-linea"}), registry)[0]


# ------------------------------------------------------------------ contracts


def test_unmet_need_fails_validation_naming_both_tables(registry):
    (problem,) = problems(recipe(augmenter=[{"type": "drops-tokens"}]), registry)
    assert problem.startswith("[[augmenter]][0].type = 'drops-tokens': needs [audio_encoder] to provide 'keep_index'")
    assert "[audio_encoder] type 'toy-audio' does not" in problem
    assert "no installed audio_encoder provides it" in problem


def test_need_met_by_a_config_dependent_provider(registry):
    class Grid(registry.get("audio_encoder", "toy-audio").cls):
        @staticmethod
        def provides(config):
            return {"keep_index"} if config.width > 10 else set()

    registry.audio_encoder("grid", Grid)
    ok = recipe(audio_encoder={"type": "grid", "width": 24}, augmenter=[{"type": "drops-tokens"}])
    assert resolve_recipe(ok, registry, "r.toml").augmenters[0].name == "drops-tokens"
    narrow = recipe(audio_encoder={"type": "grid", "width": 8}, augmenter=[{"type": "drops-tokens"}])
    (problem,) = problems(narrow, registry)
    assert "[audio_encoder] type 'grid' does not; installed audio_encoders that do with default settings: grid" in problem


def test_token_mask_with_mert_fails_in_validate_naming_both_tables(tmp_path, capsys):
    """The real plugins: FLAP's masking cannot run on MERT, and validate says so before step 1."""
    pytest.importorskip("mtrun_token_mask")
    pytest.importorskip("mtrun_mert")
    path = tmp_path / "masked_mert.toml"
    path.write_text(
        '[data]\ntype = "demo"\n'
        '[audio_encoder]\ntype = "mert"\npreset = "tiny"\n'
        '[text_encoder]\ntype = "hf-text"\npreset = "tiny-roberta"\n'
        '[audio_projector]\ntype = "linear"\n[text_projector]\ntype = "linear"\n'
        '[[objective]]\ntype = "infonce"\n'
        '[[augmenter]]\ntype = "token-mask"\n'
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[[augmenter]][0].type = 'token-mask': needs [audio_encoder] to provide 'keep_index'" in err
    assert "[audio_encoder] type 'mert' does not; installed audio_encoders that do with default settings: mavil" in err
    path.write_text(path.read_text().replace('type = "mert"', 'type = "mavil"'))
    assert main(["validate", str(path)]) == 0


# ------------------------------------------------------------------ nested components


def test_nested_table_resolves_recursively_and_builds(registry, tmp_path):
    data = recipe(objective=[{"type": "scaled", "scale": 3.0, "inner": {"type": "toy-contrastive", "temperature": 0.5}}])
    resolved = resolve_recipe(data, registry, "r.toml")
    spec = resolved.objectives[0].config.inner
    assert (spec.slot, spec.kind, spec.name, spec.config.temperature) == ("objective[0].inner", "objective", "toy-contrastive", 0.5)
    slots = [s.slot for s in resolved.all_specs()]
    assert slots.index("objective[0].inner") == slots.index("objective[0]") + 1  # owner first
    run = Run(dir=tmp_path, config=RunConfig(), loader=LoaderConfig(), recipe=resolved.data)
    objective = assemble(resolved, run).system.objectives[0].objective
    assert objective.inner.config.temperature == 0.5


def test_absent_nested_table_takes_the_default_type(registry):
    resolved = resolve_recipe(recipe(objective=[{"type": "scaled"}]), registry, "r.toml")
    inner = resolved.objectives[0].config.inner
    assert inner.name == "toy-contrastive" and inner.config == inner.cls.Config()


def test_nested_table_errors_name_their_table_with_suggestions(registry):
    data = recipe(data={"type": "subset", "n": "four", "base": {"type": "toy-tone", "n_items": 8}})
    found = problems(data, registry)
    assert any(p.startswith("[data.base].type = 'toy-tone': no data of that name (did you mean 'toy-tones'?)") for p in found), found
    assert any(p.startswith("[data].n: wrong type (got 'four'; expected int)") for p in found), found
    typo = problems(recipe(data={"type": "subset", "base": {"type": "toy-tones", "n_itmes": 8}}), registry)
    assert typo[0].startswith("[data.base].n_itmes: unknown key (did you mean 'n_items'?)"), typo


def test_nested_table_without_default_is_required(registry):
    (problem,) = problems(recipe(data={"type": "subset"}), registry)
    assert problem.startswith("[data].base: missing"), problem


def test_nested_tables_in_arrays_are_addressed_by_index(registry):
    found = problems(recipe(objective=[{"type": "toy-contrastive"}, {"type": "scaled", "inner": {"temprature": 1.0}}]), registry)
    assert found[0].startswith("[[objective]][1].inner.temprature: unknown key (did you mean 'temperature'?)"), found


def test_nested_requirements_are_checked_too(registry):
    data = recipe(data={"type": "subset", "base": {"type": "toy-tones"}}, objective=[{"type": "scaled", "inner": {"type": "scaled"}}])
    assert resolve_recipe(data, registry, "r.toml")  # nesting two deep resolves


def test_nested_config_round_trips_through_the_converter(registry):
    converter = make_converter(registry)
    table = {"base": {"type": "toy-tones", "n_items": 5}, "n": 2}
    config = converter.structure(table, Subset.Config)
    assert isinstance(config.base, ComponentSpec) and config.base.config.n_items == 5
    again = converter.structure(converter.unstructure(config), Subset.Config)
    assert again == config
    assert converter.unstructure(config)["base"]["type"] == "toy-tones"
    check_component(registry, "data", "subset", config=config)


def test_validate_print_shows_the_resolved_tree(tmp_path, capsys, monkeypatch, registry):
    import mtrun.cli as cli

    monkeypatch.setattr(cli, "_registry", lambda: registry)
    path = tmp_path / "r.toml"
    path.write_text('[data]\ntype = "subset"\n[data.base]\ntype = "toy-tones"\n'
                    '[audio_encoder]\ntype = "toy-audio"\n[text_encoder]\ntype = "toy-text"\n'
                    '[audio_projector]\ntype = "toy-linear"\n[text_projector]\ntype = "toy-linear"\n'
                    '[[objective]]\ntype = "scaled"\n')
    assert main(["validate", str(path), "--print"]) == 0
    out = capsys.readouterr().out
    assert "# data: subset\n#   data.base: toy-tones\n" in out
    assert "# objective[0]: scaled (weight 1)\n#   objective[0].inner: toy-contrastive\n" in out


def test_nested_table_without_type_lists_what_is_installed(registry):
    (problem,) = problems(recipe(data={"type": "subset", "base": {"n_items": 3}}), registry)
    assert problem.startswith("[data.base]: missing key 'type' (the data to use); [data.base] needs type = \"NAME\""), problem
    assert "toy-tones" in problem


def test_a_setting_given_to_the_owner_points_to_its_nested_table(registry):
    """Recipes from before [trainer.optimizer] existed say `[trainer] lr = ...`: say where it lives."""
    found = problems(recipe(trainer={"lr": 1e-3, "warmup_steps": 5, "max_step": 3}), registry)
    assert found[0].startswith("[trainer].lr: unknown key (it is a setting of the nested table [trainer.optimizer]: write it there)"), found
    assert found[1].startswith("[trainer].max_step: unknown key (did you mean 'max_steps'?)"), found
    assert found[2].startswith("[trainer].warmup_steps: unknown key (it is a setting of the nested table [trainer.schedule]"), found
