"""InfoNCE against an independent float64 reference; temperature, masking, hard negatives, DDP."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import infonce_ddp_check as toy  # noqa: E402
import mtrun_infonce  # noqa: E402
from mtrun import Batch, EncoderOutput, HardNegatives, StepOutputs  # noqa: E402
from mtrun.testing import check_component, isolated_registry  # noqa: E402
from mtrun_infonce.objective import InfoNCE, contrastive_logits, group_ids  # noqa: E402


# ------------------------------------------------------------------------- the reference


def _unit(row):
    norm = math.sqrt(sum(x * x for x in row))
    return [x / norm for x in row]


def _dot(u, v):
    return sum(x * y for x, y in zip(u, v))


def reference_loss(audio, text, scale, *, groups=None, hard=()):
    """InfoNCE written out with loops and math.log/exp in float64.

    ``hard`` is a list of ``(anchor, replaces, vector)``. Row i's candidates are listed
    explicitly: the positive, every other item not sharing i's group, minus the texts replaced
    for anchor i, plus anchor i's hard negatives.
    """
    a = [_unit(r) for r in audio.double().tolist()]
    t = [_unit(r) for r in text.double().tolist()]
    n = len(a)
    scale = float(scale)

    def same(i, j):
        return groups is not None and groups[i] is not None and groups[i] == groups[j] and i != j

    def row_loss(positive, negatives):
        m = max([positive, *negatives])
        return -(positive - m - math.log(sum(math.exp(x - m) for x in [positive, *negatives])))

    a2t, t2a = 0.0, 0.0
    for i in range(n):
        replaced = {r for anchor, r, _ in hard if anchor == i and r >= 0}
        negatives = [scale * _dot(a[i], t[j]) for j in range(n) if j != i and not same(i, j) and j not in replaced]
        negatives += [scale * _dot(a[i], _unit(v.double().tolist())) for anchor, _, v in hard if anchor == i]
        a2t += row_loss(scale * _dot(a[i], t[i]), negatives)
        t2a += row_loss(scale * _dot(t[i], a[i]), [scale * _dot(t[i], a[j]) for j in range(n) if j != i and not same(i, j)])
    return 0.5 * (a2t / n + t2a / n)


def step_outputs(audio, text, batch=None):
    n = audio.shape[0]
    dummy = EncoderOutput(tokens=audio[:, None], pooled=audio, mask=torch.ones(n, 1, dtype=torch.bool))
    return StepOutputs(batch=batch if batch is not None else Batch(), audio=dummy, text=dummy, audio_embedding=audio, text_embedding=text)


def embeddings(n=6, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)


# ------------------------------------------------------------------------------ contract


def test_infonce_honours_the_contract():
    registry = isolated_registry(mtrun_infonce)
    text_encoder, text_projector = toy.ToyText(), toy.ToyProjector(toy.WIDTH)
    objective = check_component(registry, "objective", "infonce", text_encoder=text_encoder, text_projector=text_projector)
    # The text arm is used, not owned: no duplicate weights in the system's checkpoint.
    assert list(objective.state_dict()) == []
    learnable = InfoNCE(InfoNCE.Config(learnable=True, temperature=0.07), text_encoder=text_encoder, text_projector=text_projector)
    assert list(learnable.state_dict()) == ["logit_scale"]


def test_config_rejects_bad_temperatures():
    with pytest.raises(ValueError):
        InfoNCE.Config(temperature=0.0)
    with pytest.raises(ValueError, match="max_logit_scale"):
        InfoNCE.Config(temperature=0.005, learnable=True, max_logit_scale=100.0)


# ---------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("temperature", [0.03, 0.07, 1.0])
def test_infonce_matches_independent_log_softmax(temperature):
    audio, text = embeddings()
    objective = InfoNCE(InfoNCE.Config(temperature=temperature))
    result = objective(step_outputs(audio, text))
    assert float(result.loss) == pytest.approx(reference_loss(audio, text, 1 / temperature), rel=1e-5, abs=1e-6)
    assert float(result.metrics["temperature"]) == pytest.approx(temperature, rel=1e-6)


def test_float64_embeddings_are_computed_in_float64():
    """Exactness checks (the gradient cache's) run in float64; half precision is upcast."""
    audio, text = (x.double() for x in embeddings())
    result = InfoNCE(InfoNCE.Config(temperature=0.07))(step_outputs(audio, text))
    assert result.loss.dtype == torch.float64
    assert float(result.loss) == pytest.approx(reference_loss(audio, text, 1 / 0.07), rel=1e-12)
    half = InfoNCE(InfoNCE.Config())(step_outputs(*(x.bfloat16() for x in embeddings())))
    assert half.loss.dtype == torch.float32


def test_declares_embedding_only_for_the_gradient_cache():
    """Its loss reads the embeddings and batch.groups only ([trainer] gradient_cache)."""
    assert InfoNCE.embedding_only is True


def test_metrics_report_directional_accuracies_and_losses():
    audio = torch.eye(4)
    text = torch.eye(4)[[0, 1, 3, 2]]  # items 2 and 3 have each other's captions
    result = InfoNCE(InfoNCE.Config())(step_outputs(audio, text))
    assert float(result.metrics["accuracy_a2t"]) == pytest.approx(0.5)
    assert float(result.metrics["accuracy_t2a"]) == pytest.approx(0.5)
    both = 0.5 * (result.metrics["loss_a2t"] + result.metrics["loss_t2a"])
    assert float(both) == pytest.approx(float(result.loss))


def test_learnable_temperature_gets_the_reference_gradient():
    audio, text = embeddings()
    objective = InfoNCE(InfoNCE.Config(temperature=0.07, learnable=True))
    objective(step_outputs(audio, text)).loss.backward()
    grad = objective.logit_scale.grad
    log_scale = math.log(1 / 0.07)
    eps = 1e-5
    numeric = (reference_loss(audio, text, math.exp(log_scale + eps)) - reference_loss(audio, text, math.exp(log_scale - eps))) / (2 * eps)
    assert grad is not None and abs(float(grad)) > 1e-3
    assert float(grad) == pytest.approx(numeric, rel=1e-3)


def test_learnable_temperature_is_clamped_to_max_logit_scale():
    audio, text = embeddings()
    objective = InfoNCE(InfoNCE.Config(temperature=0.07, learnable=True, max_logit_scale=50.0))
    with torch.no_grad():
        objective.logit_scale.fill_(math.log(1000.0))
    result = objective(step_outputs(audio, text))
    assert float(result.metrics["temperature"]) == pytest.approx(1 / 50.0)
    assert float(result.loss.detach()) == pytest.approx(reference_loss(audio, text, 50.0), rel=1e-5)
    objective.on_step_end(1, 10)
    assert float(objective.logit_scale.detach()) == pytest.approx(math.log(50.0))


def test_fixed_temperature_has_no_parameter():
    objective = InfoNCE(InfoNCE.Config(temperature=0.03))
    assert list(objective.parameters()) == []


def test_group_masking_removes_exactly_same_group_negatives():
    audio, text = embeddings(n=6)
    groups = ["a", "b", "a", None, "b", None]
    batch = Batch(groups=groups)
    masked = InfoNCE(InfoNCE.Config(mask_same_group=True))(step_outputs(audio, text, batch))
    unmasked = InfoNCE(InfoNCE.Config(mask_same_group=False))(step_outputs(audio, text, batch))
    expected = reference_loss(audio, text, 1 / 0.03, groups=groups)
    assert float(masked.loss) == pytest.approx(expected, rel=1e-5)
    assert float(unmasked.loss) == pytest.approx(reference_loss(audio, text, 1 / 0.03), rel=1e-5)
    assert float(masked.loss) != pytest.approx(float(unmasked.loss), rel=1e-3)

    a2t, t2a = contrastive_logits(audio, text, 1.0, groups=group_ids(groups, 6))
    dropped = {(0, 2), (2, 0), (1, 4), (4, 1)}
    for i in range(6):
        for j in range(6):
            assert bool(torch.isinf(a2t[i, j])) == ((i, j) in dropped), (i, j)
    assert torch.equal(t2a, a2t.T)


def test_groups_that_are_all_distinct_change_nothing():
    audio, text = embeddings(n=4)
    batch = Batch(groups=["w", "x", "y", "z"])
    masked = InfoNCE(InfoNCE.Config(mask_same_group=True))(step_outputs(audio, text, batch))
    plain = InfoNCE(InfoNCE.Config())(step_outputs(audio, text))
    assert float(masked.loss) == pytest.approx(float(plain.loss), rel=1e-6)


# ------------------------------------------------------------------------ hard negatives


def hard_negatives(hard) -> HardNegatives:
    """``[(anchor, replaces, caption), ...]`` as the batch field."""
    return HardNegatives(
        anchor=torch.tensor([h[0] for h in hard], dtype=torch.long),
        replaces=torch.tensor([h[1] for h in hard], dtype=torch.long),
        texts=[h[2] for h in hard],
    )


def hard_batch(texts, hard):
    return Batch(texts=texts, hard_negatives=hard_negatives(hard))


def test_hard_negatives_change_exactly_the_anchors_rows():
    torch.manual_seed(0)
    text_encoder, text_projector = toy.ToyText(), toy.ToyProjector(toy.WIDTH)
    objective = InfoNCE(InfoNCE.Config(temperature=0.1), text_encoder=text_encoder, text_projector=text_projector)
    texts = ["calm piano", "loud rock guitar", "jazz drums", "dark synth ambient", "slow violin"]
    hard = [(0, 2, "loud piano"), (3, -1, "bright synth"), (3, 1, "fast ambient"), (3, 1, "calm drums")]
    inputs = text_encoder.tokenize(texts)
    text = text_projector(text_encoder(inputs["input_ids"], inputs["attention_mask"]))
    audio = torch.randn(5, toy.DIM, generator=torch.Generator().manual_seed(1), requires_grad=True)

    with_hard = objective(step_outputs(audio, text, hard_batch(texts, hard)))
    with torch.no_grad():
        h_inputs = text_encoder.tokenize([h[2] for h in hard])
        h_vectors = text_projector(text_encoder(h_inputs["input_ids"], h_inputs["attention_mask"]))
    expected = reference_loss(audio.detach(), text.detach(), 10.0, hard=[(a, r, v) for (a, r, _), v in zip(hard, h_vectors)])
    assert with_hard.loss.item() == pytest.approx(expected, rel=1e-5)
    assert float(with_hard.metrics["hard_negatives"]) == 4.0

    # Logits: non-anchor rows identical, anchor rows differ, extra columns only in their anchor's row.
    a = torch.nn.functional.normalize(audio.detach(), dim=-1)
    t = torch.nn.functional.normalize(text.detach(), dim=-1)
    hv = torch.nn.functional.normalize(h_vectors, dim=-1)
    plain_a2t, plain_t2a = contrastive_logits(a, t, 10.0)
    a2t, t2a = contrastive_logits(
        a, t, 10.0, hard_text=hv, hard_anchor=torch.tensor([h[0] for h in hard]), hard_replaces=torch.tensor([h[1] for h in hard])
    )
    assert a2t.shape == (5, 9) and torch.equal(t2a, plain_t2a)
    for i in (1, 2, 4):
        assert torch.equal(a2t[i, :5], plain_a2t[i]) and torch.isinf(a2t[i, 5:]).all()
    assert torch.isinf(a2t[0, 2]) and torch.isinf(a2t[3, 1]) and torch.isfinite(a2t[0, [0, 1, 3, 4, 5]]).all()
    assert torch.isfinite(a2t[3, [0, 2, 3, 4, 6, 7, 8]]).all() and torch.isinf(a2t[3, 5])

    # Gradients: audio rows of non-anchors get what they get without hard negatives.
    (grad_hard,) = torch.autograd.grad(with_hard.loss, audio, retain_graph=True)
    plain = InfoNCE(InfoNCE.Config(temperature=0.1))(step_outputs(audio, text, Batch(texts=texts)))
    (grad_plain,) = torch.autograd.grad(plain.loss, audio)
    torch.testing.assert_close(grad_hard[[1, 2, 4]], grad_plain[[1, 2, 4]], rtol=0, atol=1e-7)
    assert not torch.allclose(grad_hard[[0, 3]], grad_plain[[0, 3]], atol=1e-5)


def test_hard_negatives_train_the_text_arm_and_accept_tokenized_inputs():
    torch.manual_seed(0)
    text_encoder, text_projector = toy.ToyText(), toy.ToyProjector(toy.WIDTH)
    objective = InfoNCE(InfoNCE.Config(), text_encoder=text_encoder, text_projector=text_projector)
    texts = ["calm piano", "loud rock guitar", "jazz drums"]
    audio, text = torch.randn(3, toy.DIM), torch.randn(3, toy.DIM)
    captions = ["zither polka", "kazoo"]
    by_text = hard_batch(texts, [(1, 0, captions[0]), (2, -1, captions[1])])
    # Tokenized only (no texts): text_inputs alone must do.
    given = by_text.hard_negatives
    by_tokens = Batch(
        texts=texts,
        hard_negatives=HardNegatives(anchor=given.anchor, replaces=given.replaces, text_inputs=text_encoder.tokenize(captions)),
    )
    loss = objective(step_outputs(audio, text, by_text)).loss
    assert loss.item() == pytest.approx(objective(step_outputs(audio, text, by_tokens)).loss.item(), rel=1e-6)
    loss.backward()
    # Only the hard negatives pass through the text arm here (text embeddings are given).
    assert text_projector.linear.weight.grad.abs().sum() > 0
    words = text_encoder.tokenize(["zither polka kazoo"])["input_ids"][0]
    assert text_encoder.embed.weight.grad[words].abs().sum() > 0


def test_empty_hard_negatives_and_disabled_option_leave_the_loss_alone():
    audio, text = embeddings(n=4)
    plain = float(InfoNCE(InfoNCE.Config())(step_outputs(audio, text)).loss)
    empty = Batch(hard_negatives=HardNegatives(anchor=torch.zeros(0, dtype=torch.long), replaces=torch.zeros(0, dtype=torch.long)))
    assert float(InfoNCE(InfoNCE.Config())(step_outputs(audio, text, empty)).loss) == pytest.approx(plain)
    some = hard_batch(["a"] * 4, [(0, 1, "x y")])
    off = InfoNCE(InfoNCE.Config(hard_negatives=False))(step_outputs(audio, text, some))
    assert float(off.loss) == pytest.approx(plain) and "hard_negatives" not in off.metrics


@pytest.mark.parametrize("anchor, replaces", [(0, 0), (4, -1), (1, 4), (1, -2)])
def test_invalid_hard_negative_indices_are_refused(anchor, replaces):
    objective = InfoNCE(InfoNCE.Config(), text_encoder=toy.ToyText(), text_projector=toy.ToyProjector(toy.WIDTH))
    audio, text = embeddings(n=4, d=toy.DIM)
    with pytest.raises(ValueError, match="hard_negatives"):
        objective(step_outputs(audio, text, hard_batch(["a"] * 4, [(anchor, replaces, "x")])))


def test_hard_negatives_that_are_not_the_typed_class_are_refused_by_name():
    objective = InfoNCE(InfoNCE.Config(), text_encoder=toy.ToyText(), text_projector=toy.ToyProjector(toy.WIDTH))
    audio, text = embeddings(n=4, d=toy.DIM)
    legacy = Batch(hard_negatives={"anchor": torch.tensor([0]), "replaces": torch.tensor([1]), "texts": ["x"]})
    with pytest.raises(TypeError, match=r"batch\.hard_negatives must be mtrun\.HardNegatives \(got dict\)"):
        objective(step_outputs(audio, text, legacy))


def test_hard_negatives_without_captions_for_every_entry_are_refused():
    objective = InfoNCE(InfoNCE.Config(), text_encoder=toy.ToyText(), text_projector=toy.ToyProjector(toy.WIDTH))
    audio, text = embeddings(n=4, d=toy.DIM)
    short = HardNegatives(anchor=torch.tensor([0, 1]), replaces=torch.tensor([1, -1]), texts=["only one"])
    with pytest.raises(ValueError, match="hard_negatives has 1 texts .* for its 2 captions"):
        objective(step_outputs(audio, text, Batch(hard_negatives=short)))


def test_infonce_provides_hard_negatives_exactly_when_they_are_on():
    # How a recipe pairing TextSwap with each setting resolves is tested in plugins/textswap.
    assert InfoNCE.provides(InfoNCE.Config(hard_negatives=True)) == frozenset({"hard_negatives"})
    assert InfoNCE.provides(InfoNCE.Config(hard_negatives=False)) == frozenset()
    assert InfoNCE.provides(InfoNCE.Config()) == frozenset({"hard_negatives"})  # the default is on


# ------------------------------------------------------------------------- end to end


def test_one_training_step_of_a_system_with_hard_negatives():
    """System.forward with a batch-stage augmenter that inserts hard negatives: one step."""
    from mtrun import System, WeightedObjective

    class ToyAudio(torch.nn.Module):
        sample_rate, output_dim, token_grid = 8000, 4, None

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(10, 4)

        def preprocess(self, waveforms):
            return waveforms.reshape(waveforms.shape[0], -1, 10)

        def forward(self, features, *, keep_index=None, output_hidden_states=False):
            tokens = self.proj(features)
            return EncoderOutput(tokens=tokens, pooled=tokens.mean(1), mask=torch.ones(tokens.shape[:2], dtype=torch.bool))

    class SwapFirst:
        stage = "batch"

        def __call__(self, batch, context):
            batch.hard_negatives = HardNegatives(anchor=torch.tensor([0]), replaces=torch.tensor([1]), texts=["rock piano"])
            return batch

    from mtrun import AugmentContext

    torch.manual_seed(0)
    text_encoder, text_projector = toy.ToyText(), toy.ToyProjector(toy.WIDTH)
    audio_encoder = ToyAudio()
    audio_projector = toy.ToyProjector(4)
    objective = InfoNCE(InfoNCE.Config(learnable=True, temperature=0.07), text_encoder=text_encoder, text_projector=text_projector)
    system = System(
        audio_encoder=audio_encoder,
        text_encoder=text_encoder,
        audio_projector=audio_projector,
        text_projector=text_projector,
        objectives=[WeightedObjective("infonce", 1.0, objective)],
        augmenters=[SwapFirst()],
    )
    texts = ["calm piano", "loud rock guitar", "jazz drums"]
    batch = Batch(waveforms=torch.randn(3, 40), texts=texts, groups=[None] * 3, text_inputs=text_encoder.tokenize(texts))
    context = AugmentContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, training=True)
    loss, metrics = system(batch, context)
    loss.backward()
    assert metrics["infonce/hard_negatives"] == 1.0
    assert {"infonce/loss", "infonce/accuracy_a2t", "infonce/accuracy_t2a", "infonce/temperature"} <= set(metrics)
    for name, p in system.named_parameters():
        assert p.grad is not None, name
    assert "objectives.0.objective.logit_scale" in system.state_dict()
    assert not any(k.startswith("objectives.0.objective.text") for k in system.state_dict())


# --------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_on_the_global_batch(tmp_path):
    """Two gloo ranks with unequal micro-batches, cross-rank groups and hard negatives on
    both / one / no rank: loss and DDP-averaged gradients equal one process's on the global batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(HERE / "infonce_ddp_check.py"), str(tmp_path),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun hung: {exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world"] == 2
        assert set(report["scenarios"]) == {"both", "one", "none"}
        for name, s in report["scenarios"].items():
            assert abs(s["loss"] - s["expected_loss"]) < 1e-5, (rank, name, s)
            assert s["grad_max_error"] < 1e-5 and s["grad_max"] > 1e-3, (rank, name, s)
            for key, value in s["expected_metrics"].items():
                assert s["metrics"][key] == pytest.approx(value, abs=1e-5), (rank, name, key)
        assert report["scenarios"]["both"]["metrics"]["hard_negatives"] == 3.0
        assert report["scenarios"]["none"]["metrics"]["hard_negatives"] == 0.0
