"""The BYOL objective against an independent computation; EMA targets, frozen encoders, heads."""

from __future__ import annotations

import math

import attrs
import cattrs
import pytest
import torch
from torch import nn

import mtrun
import mtrun_byol
from mtrun import Batch, EncoderOutput, StepOutputs
from mtrun.testing import check_component, isolated_registry
from mtrun_byol.objective import Byol

# ----------------------------------------------------------------- small modules for the tests


class Encoder(nn.Module):
    """``[B, T]`` (or token ids) -> one linear layer, mean over time; ``frozen`` turns gradients off."""

    def __init__(self, width: int = 6, frozen: bool = False, vocab: int = 0):
        super().__init__()
        self.output_dim = width
        self.layer = nn.Embedding(vocab, width) if vocab else nn.Linear(4, width)
        self.norm = nn.BatchNorm1d(width)  # a buffer-carrying layer, so buffers are followed too
        if frozen:
            self.requires_grad_(False)

    def forward(self, x, attention_mask=None, *, keep_index=None, output_hidden_states=False):
        tokens = self.layer(x if attention_mask is not None else x.reshape(x.shape[0], -1, 4))
        pooled = self.norm(tokens.mean(1))
        return EncoderOutput(tokens=tokens, pooled=pooled, mask=torch.ones(tokens.shape[:2], dtype=torch.bool))


class Linear(nn.Module):
    """A projector: Linear over the pooled vector."""

    @attrs.frozen
    class Config:
        dim: int = 5

    def __init__(self, config: Config, *, in_features: int):
        super().__init__()
        self.output_dim = config.dim
        self.linear = nn.Linear(in_features, config.dim)

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        return self.linear(encoded.pooled)


def predictor(dim: int = 5) -> mtrun.ComponentSpec:
    return mtrun.ComponentSpec.of("projector", "linear", Linear, Linear.Config(dim=dim))


def arms(frozen_audio: bool = False, dim: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    audio, text = Encoder(frozen=frozen_audio), Encoder(vocab=11)
    return dict(
        audio_encoder=audio,
        text_encoder=text,
        audio_projector=Linear(Linear.Config(dim=dim), in_features=6),
        text_projector=Linear(Linear.Config(dim=dim), in_features=6),
    )


def byol(modules, **settings) -> Byol:
    config = Byol.Config(audio_predictor=predictor(), text_predictor=predictor(), **settings)
    return Byol(config, **modules)


def step_outputs(modules, n: int = 6, seed: int = 1) -> StepOutputs:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 12, generator=g)
    ids = torch.randint(0, 11, (n, 3), generator=g)
    batch = Batch(features=features, text_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    audio = modules["audio_encoder"](features)
    text = modules["text_encoder"](ids, torch.ones_like(ids))
    return StepOutputs(
        batch=batch,
        audio=audio,
        text=text,
        audio_embedding=modules["audio_projector"](audio),
        text_embedding=modules["text_projector"](text),
    )


# ----------------------------------------------------------------------------- the loss


def _reference_terms(q_a, q_t, z_a, z_t):
    """The four mean distances with d(u, v) = ||u/|u| - v/|v|||², written out in float64 loops."""

    def d(u, v):
        nu = math.sqrt(sum(x * x for x in u))
        nv = math.sqrt(sum(x * x for x in v))
        return sum((a / nu - b / nv) ** 2 for a, b in zip(u, v))

    def mean_d(us, vs):
        return sum(d(u, v) for u, v in zip(us, vs)) / len(us)

    rows = [t.double().tolist() for t in (q_a, q_t, z_a, z_t)]
    return {
        "audio_to_text": mean_d(rows[0], rows[3]),
        "text_to_audio": mean_d(rows[1], rows[2]),
        "audio_to_audio": mean_d(rows[0], rows[2]),
        "text_to_text": mean_d(rows[1], rows[3]),
    }


@pytest.mark.parametrize("lam", [0.5, 0.2, 1.0])
def test_loss_matches_the_formula_computed_independently(lam):
    modules = arms()
    objective = byol(modules, cross_weight=lam)
    # Move the targets away from the online arms so that the four terms all differ.
    for target in objective.targets():
        if target.module is not None:
            for p in target.module.parameters():
                p.data.add_(0.3 * torch.randn_like(p))
    outputs = step_outputs(modules)
    result = objective(outputs)
    with torch.no_grad():
        q_a = objective.audio_predictor(outputs.audio_embedding)
        q_t = objective.text_predictor(outputs.text_embedding)
        z_a = objective.audio_target_projector.module(objective.audio_target_encoder.module(outputs.batch.features))
        ids = outputs.batch.text_inputs["input_ids"]
        z_t = objective.text_target_projector.module(objective.text_target_encoder.module(ids, torch.ones_like(ids)))
    ref = _reference_terms(q_a, q_t, z_a, z_t)
    for name, value in ref.items():
        assert float(result.metrics[name]) == pytest.approx(value, rel=1e-5, abs=1e-6), name
    expected = lam * (ref["audio_to_text"] + ref["text_to_audio"]) + (1 - lam) * (ref["audio_to_audio"] + ref["text_to_text"])
    assert float(result.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(result.metrics["ema_rate"]) == pytest.approx(0.95)
    assert {"embedding_std/audio_prediction", "embedding_std/text_prediction"} <= set(result.metrics)


def test_gradients_reach_the_online_arms_and_predictors_never_the_targets():
    modules = arms()
    objective = byol(modules)
    objective(step_outputs(modules)).loss.backward()
    for name, module in modules.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert all(p.grad is not None for p in objective.audio_predictor.parameters())
    for target in objective.targets():
        assert all(not p.requires_grad and p.grad is None for p in target.module.parameters())


# ------------------------------------------------------------------------------ the EMA


def test_ema_update_is_tau_target_plus_one_minus_tau_online_over_weights_and_buffers():
    modules = arms()
    objective = byol(modules, ema_rate=0.9)
    target = objective.audio_target_encoder
    before = {k: v.clone() for k, v in target.module.state_dict().items()}
    with torch.no_grad():  # the online arm moves, as an optimizer step would move it
        for p in modules["audio_encoder"].parameters():
            p.add_(torch.randn_like(p))
        modules["audio_encoder"].norm.running_mean.add_(1.0)
    online = modules["audio_encoder"].state_dict()
    objective.on_step_end(1, 10)
    after = target.module.state_dict()
    for key, old in before.items():
        if old.is_floating_point():
            torch.testing.assert_close(after[key], 0.9 * old + 0.1 * online[key])
        else:
            assert torch.equal(after[key], online[key])  # BatchNorm's batch counter is copied
    assert int(target.updates) == 1


def test_cosine_schedule_rises_from_tau0_to_one():
    objective = byol(arms(), ema_rate=0.996, ema_schedule="cosine")
    assert objective.ema_rate_at(0, 100) == pytest.approx(0.996)
    assert objective.ema_rate_at(50, 100) == pytest.approx(1 - 0.004 * 0.5)
    assert objective.ema_rate_at(100, 100) == pytest.approx(1.0)
    objective.on_step_end(50, 100)
    assert float(objective.rate) == pytest.approx(objective.ema_rate_at(51, 100))
    constant = byol(arms(), ema_rate=0.95)
    assert constant.ema_rate_at(0, 100) == constant.ema_rate_at(99, 100) == 0.95


def test_a_frozen_encoder_is_its_own_target_not_a_second_copy():
    modules = arms(frozen_audio=True)
    objective = byol(modules)
    assert objective.audio_target_encoder.shares_online
    assert objective.audio_target_encoder.module is None
    assert not objective.text_target_encoder.shares_online
    names = set(objective.state_dict())
    assert not any(n.startswith("audio_target_encoder.module.") for n in names)
    # The objective's own parameters hold no tensor of the frozen encoder.
    frozen = {id(p) for p in modules["audio_encoder"].parameters()}
    assert not frozen & {id(p) for p in objective.parameters()}
    # Its online output is reused: the target projection is the target projector of it.
    outputs = step_outputs(modules)
    objective(outputs)  # runs
    with torch.no_grad():
        reused = objective.audio_target_projector(outputs.audio)
        again = objective.audio_target_projector(modules["audio_encoder"](outputs.batch.features))
    torch.testing.assert_close(reused, again)


def test_a_partly_frozen_module_shares_its_frozen_weights_and_leaves_them_out_of_the_state_dict():
    modules = arms()
    modules["audio_encoder"].layer.requires_grad_(False)  # a frozen backbone, a trained head
    copy = mtrun.EmaCopy(modules["audio_encoder"])
    assert not copy.shares_online
    assert copy.module.layer.weight is modules["audio_encoder"].layer.weight
    assert copy.module.norm.weight is not modules["audio_encoder"].norm.weight
    state = copy.state_dict()
    assert "module.layer.weight" not in state and "module.norm.weight" in state
    fresh = mtrun.EmaCopy(modules["audio_encoder"])
    fresh.module.norm.weight.data.fill_(7.0)
    fresh.load_state_dict(state)  # strict: the shared weights are not "missing"
    torch.testing.assert_close(fresh.module.norm.weight, copy.module.norm.weight)


def test_targets_round_trip_through_the_state_dict():
    modules = arms()
    objective = byol(modules)
    for _ in range(3):
        with torch.no_grad():
            for p in modules["text_projector"].parameters():
                p.add_(0.5)
        objective.on_step_end(1, 5)
    restored = byol(arms(seed=3))
    restored.load_state_dict(objective.state_dict())
    for mine, theirs in zip(restored.state_dict().values(), objective.state_dict().values()):
        assert torch.equal(mine, theirs)
    assert int(restored.text_target_projector.updates) == 3


# -------------------------------------------------------------------- heads and settings


def test_retrieval_uses_the_predictions_or_the_projections_as_configured():
    modules = arms()
    assert set(byol(modules).embedding_heads()) == {"audio", "text"}
    assert byol(modules).embedding_heads()["audio"] is not None
    assert byol(modules, retrieval_embedding="projection").embedding_heads() == {}


def test_a_predictor_of_the_wrong_width_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"audio_predictor outputs 3 features .* width is 5.*audio_predictor\]\.dim = 5"):
        Byol(Byol.Config(audio_predictor=predictor(3), text_predictor=predictor()), **arms())


def test_predictor_tables_structure_into_projector_specs_and_typos_are_named():
    registry = isolated_registry(mtrun_byol)
    registry.projector("linear", Linear)
    converter = mtrun.testing.config_converter(registry)
    config = converter.structure(
        {"cross_weight": 0.3, "audio_predictor": {"type": "linear", "dim": 4}, "text_predictor": {"type": "linear"}},
        Byol.Config,
    )
    assert config.audio_predictor.cls is Linear and config.audio_predictor.config.dim == 4
    assert config.text_predictor.config.dim == 5
    with pytest.raises(Exception) as info:
        converter.structure({"audio_predictor": {"type": "linear", "dimm": 4}}, Byol.Config)
    assert "dimm" in " ".join(cattrs.transform_error(info.value))


def test_byol_honours_the_component_contract():
    registry = isolated_registry(mtrun_byol)
    registry.projector("linear", Linear)
    modules = arms()
    check_component(
        registry,
        "objective",
        "byol",
        config=Byol.Config(audio_predictor=predictor(), text_predictor=predictor()),
        inputs=step_outputs(modules),  # the target arms re-encode the batch: it must fit them
        **modules,
    )
