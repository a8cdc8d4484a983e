"""The gradient cache (``[trainer] gradient_cache``): one exact full-batch step in micro-batches.

The equalities are checked in float64 on the CPU against an independent computation: one
backward through the whole batch. Where augmentation is random (dropout, a waveform
augmenter), the reference draws the same noise by seeding each micro-batch as the trainer
does, and two deliberately broken replays show that the comparison would catch a re-run
that draws new noise.
"""

from __future__ import annotations

import textwrap
from contextlib import nullcontext
from typing import ClassVar

import attrs
import pytest
import torch
from torch import nn

import mtrun_testkit as tk
from mtrun.errors import TrainingError
from mtrun.interfaces import AugmentContext, Batch, HardNegatives, StepOutputs
from mtrun.schema import Need
from mtrun.system import System, WeightedObjective
from mtrun.train import gradient_cache
from mtrun.train.gradient_cache import gradient_cache_problems, gradient_cache_step
from mtrun.train.rng import derive_seed, seed_everything
from mtrun_infonce.objective import InfoNCE

N, MICRO = 32, 8  # 4 micro-batches


class DropoutLinear(nn.Module):
    """A projector with dropout, so the re-run must replay the global torch RNG."""

    def __init__(self, in_features: int, dim: int = 16, p: float = 0.3):
        super().__init__()
        self.output_dim = dim
        self.net = nn.Sequential(nn.Linear(in_features, 24), nn.Tanh(), nn.Dropout(p), nn.Linear(24, dim))

    def forward(self, encoded):
        return self.net(encoded.pooled)


class BatchNormLinear(DropoutLinear):
    def __init__(self, in_features: int, dim: int = 16):
        super().__init__(in_features, dim, p=0.0)
        self.net[1] = nn.BatchNorm1d(24)


class Noise:
    """A waveform augmenter drawing from the context's generator (replayed by re-seeding)."""

    stage: ClassVar[str] = "waveform"

    def __call__(self, waveforms, context):
        return waveforms + 0.1 * torch.randn(waveforms.shape, generator=context.generator, dtype=waveforms.dtype)


class MakesHardNegatives:
    """Stands in for TextSwap: requires the ``hard_negatives`` capability."""

    stage: ClassVar[str] = "batch"
    requires: ClassVar[tuple[Need, ...]] = (Need("objective", "hard_negatives"),)

    def __call__(self, batch, context):
        n = len(batch["ids"])
        batch["hard_negatives"] = HardNegatives(torch.tensor([0]), torch.tensor([n - 1]), texts=["a swapped caption"])
        return batch


def build(*, random: bool = False, projector=DropoutLinear, objective=None, augmenters=()) -> System:
    """A float64 system: toy encoders, MLP projectors, InfoNCE with a learned temperature and
    same-group masking (both read through the gradient cache's pass 2)."""
    torch.manual_seed(0)
    audio, text = tk.ToyAudio(tk.ToyAudio.Config()), tk.ToyText(tk.ToyText.Config())
    p = 0.3 if random else 0.0
    if objective is None:
        objective = InfoNCE(InfoNCE.Config(temperature=0.1, learnable=True, mask_same_group=True, hard_negatives=False))
    kwargs = {"p": p} if projector is DropoutLinear else {}
    system = System(
        audio_encoder=audio,
        text_encoder=text,
        audio_projector=projector(audio.output_dim, **kwargs),
        text_projector=projector(text.output_dim, **kwargs),
        objectives=[WeightedObjective("infonce", 1.0, objective)],
        augmenters=([Noise()] if random else []) + list(augmenters),
    )
    return system.double().train()


def batch_of(start: int, stop: int, tokenize) -> Batch:
    """Items ``start..stop`` of a fixed 32-item set; groups pair items (2k, 2k+1)."""
    gen = torch.Generator().manual_seed(1)
    waves = torch.randn(N, 4000, generator=gen, dtype=torch.float64)[start:stop]
    texts = [f"caption {i} of class {i % 5} with words {i * 7 % 11}" for i in range(start, stop)]
    return Batch(
        ids=[f"item-{i}" for i in range(start, stop)],
        waveforms=waves,
        texts=texts,
        tags=[{} for _ in texts],
        groups=[f"track-{i // 2}" for i in range(start, stop)],
        text_inputs=tokenize(texts),
    )


def micros_of(system: System) -> list[Batch]:
    tokenize = system.text_encoder.tokenize
    return [batch_of(s, s + MICRO, tokenize) for s in range(0, N, MICRO)]


def context(m: int, step: int = 0) -> AugmentContext:
    """As the trainer makes it: a fresh generator seeded by (step, micro-batch)."""
    gen = torch.Generator().manual_seed(derive_seed(0, "augment-step", step, m, 0))
    return AugmentContext(step=step, epoch=0, steps_per_epoch=10, total_steps=10, training=True, generator=gen)


def grads(system: System) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in system.named_parameters() if p.grad is not None}


def cached_step(system: System, *, make_context=context, seed: int = 5) -> tuple[float, dict[str, torch.Tensor]]:
    system.zero_grad(set_to_none=True)
    seed_everything(seed)
    loss, _ = gradient_cache_step(system, micros_of(system), prepare=lambda b: b, context=make_context, autocast=nullcontext)
    return float(loss), grads(system)


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst < tol, f"largest gradient difference {worst:.3g}"


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ----------------------------------------------------------------------------- exactness


def test_gradients_equal_one_backward_through_the_whole_batch():
    system = build()
    full = batch_of(0, N, system.text_encoder.tokenize)
    system.zero_grad(set_to_none=True)
    loss, _ = system(full, context(0))
    loss.backward()
    expected = grads(system)
    assert "objectives.0.objective.logit_scale" in expected  # the objective's own parameter too

    cached_loss, got = cached_step(system)

    assert cached_loss == pytest.approx(float(loss.detach()), abs=1e-12)
    assert_close(got, expected)


def test_gradients_differ_from_plain_accumulation_whose_negatives_are_the_micro_batch():
    """The control: what grad_accum without the cache computes is a different gradient."""
    system = build()
    cached_loss, cached = cached_step(system)
    system.zero_grad(set_to_none=True)
    for m, micro in enumerate(micros_of(system)):
        loss, _ = system(micro, context(m))
        (loss / 4).backward()
    assert max_difference(grads(system), cached) > 1e-3


def reference_with_noise(system: System, seed: int = 5) -> tuple[float, dict[str, torch.Tensor]]:
    """One graph over the whole step: each micro-batch encoded with grad, from the random
    state it has in the trainer (step seed, then micro-batches in order), the objective on
    the concatenation, one backward."""
    system.zero_grad(set_to_none=True)
    seed_everything(seed)
    outs = [system.encode(micro, context(m)) for m, micro in enumerate(micros_of(system))]
    audio = torch.cat([o.audio_embedding for o in outs])
    text = torch.cat([o.text_embedding for o in outs])
    batch = Batch(groups=[g for o in outs for g in o.batch["groups"]])
    outputs = StepOutputs(batch=batch, audio=None, text=None, audio_embedding=audio, text_embedding=text)
    result = system.objectives[0].objective(outputs)
    result.loss.backward()
    return float(result.loss.detach()), grads(system)


def test_random_augmentation_and_dropout_are_replayed_in_the_re_run():
    system = build(random=True)
    expected_loss, expected = reference_with_noise(system)
    loss, got = cached_step(system)
    assert loss == pytest.approx(expected_loss, abs=1e-12)
    assert_close(got, expected)
    # The noise is real: another step seed gives other gradients.
    assert max_difference(reference_with_noise(system, seed=6)[1], expected) > 1e-3


def test_a_re_run_without_the_saved_rng_state_would_be_caught(monkeypatch):
    system = build(random=True)
    _, expected = reference_with_noise(system)
    monkeypatch.setattr(gradient_cache, "restore_rng", lambda *state: None)
    _, got = cached_step(system)
    assert max_difference(got, expected) > 1e-4


def test_a_re_run_with_a_differently_seeded_augment_context_would_be_caught():
    system = build(random=True)
    _, expected = reference_with_noise(system)
    calls = []

    def drifting(m: int) -> AugmentContext:
        calls.append(m)
        return context(m, step=len(calls) // 5)  # the second pass gets other seeds

    _, got = cached_step(system, make_context=drifting)
    assert max_difference(got, expected) > 1e-4


def test_metrics_come_from_the_full_batch_loss():
    system = build()
    _, metrics = gradient_cache_step(system, micros_of(system), prepare=lambda b: b, context=context, autocast=nullcontext)
    assert {"infonce/loss", "infonce/accuracy_a2t", "infonce/temperature", "embedding_std/audio", "embedding_std/text"} <= set(metrics)
    full = batch_of(0, N, system.text_encoder.tokenize)
    with torch.no_grad():
        _, plain = system(full, context(0))
    for key in ("infonce/loss", "infonce/accuracy_a2t", "embedding_std/audio"):
        assert float(metrics[key]) == pytest.approx(float(plain[key]), abs=1e-9), key


# ----------------------------------------------------------------------------- refusals


def test_problems_name_an_objective_without_embedding_only_and_a_batch_norm():
    system = build(projector=BatchNormLinear, objective=tk.ToyContrastive(tk.ToyContrastive.Config()))
    problems = gradient_cache_problems(system)
    assert len(problems) == 3, problems
    assert "'infonce'" in problems[0] and "does not declare embedding_only" in problems[0]
    assert "[audio_projector]" in problems[1] and "BatchNorm1d" in problems[1]
    assert "[text_projector]" in problems[2]


def test_a_batch_norm_kept_in_eval_mode_is_accepted():
    system = build(projector=BatchNormLinear)
    system.audio_projector.net[1].eval()
    system.text_projector.net[1].eval()
    assert gradient_cache_problems(system) == []


def test_an_augmenter_that_makes_hard_negatives_is_named():
    system = build(augmenters=[MakesHardNegatives()])
    (problem,) = gradient_cache_problems(system)
    assert "[[augmenter]][0]" in problem and "hard-negative" in problem


def test_hard_negatives_arriving_anyway_stop_the_step_naming_the_key():
    class Undeclared(MakesHardNegatives):
        requires = ()

    system = build(augmenters=[Undeclared()])
    with pytest.raises(TrainingError, match=r"\[trainer\]\.gradient_cache = true: a batch augmenter added hard_negatives"):
        cached_step(system)


def test_the_trainer_refuses_at_start_up_naming_the_recipe_key(tmp_path, toy_trainer, toy_system):
    trainer = toy_trainer(tmp_path / "run", steps=1, batch_size=8, grad_accum=2, system=toy_system())
    trainer.config = attrs.evolve(trainer.config, gradient_cache=True)
    with pytest.raises(TrainingError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert message.startswith("[trainer].gradient_cache = true cannot give this system exact full-batch gradients")
    assert "'contrastive'" in message and "does not declare embedding_only" in message
    assert "Set gradient_cache = false" in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


def test_the_recipe_key_resolves(tmp_path, registry):
    from mtrun.recipe import load_recipe, resolve_recipe
    from toyrecipes import TOY_MODEL

    path = tmp_path / "r.toml"
    path.write_text(TOY_MODEL + textwrap.dedent("""
        [data]
        type = "toy-tones"

        [trainer]
        batch_size = 16
        grad_accum = 4
        gradient_cache = true
    """))
    resolved = resolve_recipe(load_recipe(path), registry, str(path))
    assert resolved.components["trainer"].config.gradient_cache is True


# ----------------------------------------------------------------------------- the trainer


def infonce_toy_system():
    """The toy system with InfoNCE (embedding_only) instead of ToyContrastive, float32."""
    torch.manual_seed(0)
    audio, text = tk.ToyAudio(tk.ToyAudio.Config()), tk.ToyText(tk.ToyText.Config())
    return System(
        audio_encoder=audio,
        text_encoder=text,
        audio_projector=tk.ToyLinear(tk.ToyLinear.Config(), in_features=audio.output_dim),
        text_projector=tk.ToyLinear(tk.ToyLinear.Config(), in_features=text.output_dim),
        objectives=[WeightedObjective("infonce", 1.0, InfoNCE(InfoNCE.Config(temperature=0.1, learnable=True)))],
    )


def train(tmp_path, toy_trainer, name: str, *, grad_accum: int, cache: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    trainer = toy_trainer(
        tmp_path / name, steps=3, batch_size=16, grad_accum=grad_accum, system=infonce_toy_system(), checkpoint_every=0
    )
    trainer.config = attrs.evolve(trainer.config, gradient_cache=cache)
    result = trainer.fit()
    return result, {k: v.detach().clone() for k, v in trainer.system.state_dict().items()}


def test_training_with_the_cache_follows_the_full_batch_run(tmp_path, toy_trainer):
    """Three optimizer steps through the trainer: 4 cached micro-batches of 4 end at the
    weights of batches of 16 in one piece; plain accumulation of 4 ends elsewhere."""
    full, full_weights = train(tmp_path, toy_trainer, "full", grad_accum=1, cache=False)
    cached, cached_weights = train(tmp_path, toy_trainer, "cached", grad_accum=4, cache=True)
    _, plain_weights = train(tmp_path, toy_trainer, "plain", grad_accum=4, cache=False)
    assert cached["loss"] == pytest.approx(full["loss"], abs=1e-5)
    assert max_difference(cached_weights, full_weights) < 1e-5
    assert max_difference(plain_weights, full_weights) > 1e-4


# ----------------------------------------------------------------------------- DDP


def test_two_gloo_ranks_equal_one_process_backward_of_the_whole_batch(tmp_path):
    """torchrun, 2 ranks of 2 micro-batches each: every rank ends with the single-process
    full-batch gradients (InfoNCE gathers the negatives in pass 2; the gradients are averaged
    once, DDP's hooks idle)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    env.pop("WORLD_SIZE", None)
    script = Path(__file__).with_name("gradient_cache_ddp_check.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun hung: {exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    system = build()
    full = batch_of(0, N, system.text_encoder.tokenize)
    loss, _ = system(full, context(0))
    loss.backward()
    expected = grads(system)
    for r in range(2):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert result["world"] == 2
        assert result["loss"] == pytest.approx(float(loss.detach()), abs=1e-12)
        assert_close({k: torch.tensor(v, dtype=torch.float64) for k, v in result["grads"].items()}, expected)
