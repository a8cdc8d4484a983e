"""SLAP in the trainer: accumulation is a true larger batch for BYOL, one EMA update per
optimizer step, no gradient into targets, exact resume, the collapse monitor, retrieval heads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mtrun_testkit as tk
from toyrun import build_trainer
from mtrun import ComponentSpec, EmaCopy
from mtrun.errors import MtrunError, TrainingError
from mtrun.system import System, WeightedObjective
from mtrun_byol.objective import Byol


def toy_byol_system(*, seed: int = 0, cross_weight: float = 0.5, ema_rate: float = 0.95, dim: int = 16, **settings) -> System:
    """The testkit's toy encoders and projectors, trained by BYOL with linear predictors."""
    torch.manual_seed(seed)
    audio = tk.ToyAudio(tk.ToyAudio.Config())
    text = tk.ToyText(tk.ToyText.Config())
    modules = dict(
        audio_encoder=audio,
        text_encoder=text,
        audio_projector=tk.ToyLinear(tk.ToyLinear.Config(dim=dim), in_features=audio.output_dim),
        text_projector=tk.ToyLinear(tk.ToyLinear.Config(dim=dim), in_features=text.output_dim),
    )
    predictor = ComponentSpec.of("projector", "toy-linear", tk.ToyLinear, tk.ToyLinear.Config(dim=dim))
    config = Byol.Config(
        cross_weight=cross_weight, ema_rate=ema_rate, audio_predictor=predictor, text_predictor=predictor, **settings
    )
    objective = Byol(config, **modules)
    return System(**modules, objectives=[WeightedObjective("byol", 1.0, objective)])


def byol_of(system: System) -> Byol:
    return system.objectives[0].objective


def toy_batch(system: System, n: int, seed: int = 0, rows: slice = slice(None)):
    """Rows ``rows`` of a fixed batch of ``n`` items (a fresh Batch: the system writes into it)."""
    from mtrun import Batch

    g = torch.Generator().manual_seed(seed)
    waveforms = torch.randn(n, 1600, generator=g, dtype=torch.float64)[rows]
    texts = [f"tone number {i % 5} in class {i % 3}" for i in range(n)][rows]
    return Batch(waveforms=waveforms, texts=texts, text_inputs=system.text_encoder.tokenize(texts))


def test_accumulated_micro_batches_give_the_gradient_of_one_large_batch():
    """BYOL's loss is a mean of per-item terms, so k micro-batches of b, each loss divided by
    k, sum to the gradient of one batch of k·b (float64, no BatchNorm). InfoNCE's would not."""
    system = toy_byol_system().double()

    def grads():
        return {n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None}

    system.zero_grad()
    loss, _ = system(toy_batch(system, 12))
    loss.backward()
    whole = grads()
    system.zero_grad()
    k = 3
    for i in range(k):
        micro_loss, _ = system(toy_batch(system, 12, rows=slice(i * 4, (i + 1) * 4)))
        (micro_loss / k).backward()
    accumulated = grads()
    assert whole.keys() == accumulated.keys() and len(whole) >= 8
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-10, atol=1e-12, msg=name)


def test_ema_updates_once_per_optimizer_step_and_targets_get_no_gradient(tmp_path):
    system = toy_byol_system()
    trainer = build_trainer(tmp_path / "run", steps=5, batch_size=8, grad_accum=4, checkpoint_every=0, system=system)
    calls = []
    hook = system.on_step_end
    system.on_step_end = lambda step, total: (calls.append(step), hook(step, total))
    trainer.fit()
    objective = byol_of(system)
    assert calls == [1, 2, 3, 4, 5]  # once per step, not per micro-batch (4 per step)
    assert [int(t.updates) for t in objective.targets()] == [5, 5, 5, 5]
    online = {id(p) for p in system.audio_encoder.parameters()}
    for target in objective.targets():
        assert target.module is not None
        assert all(p.grad is None and not p.requires_grad and id(p) not in online for p in target.module.parameters())
    # The targets moved, and moved towards the online weights.
    first = torch.manual_seed(0) and toy_byol_system()  # the same initial weights
    start = byol_of(first).audio_target_projector.module.linear.weight
    now = objective.audio_target_projector.module.linear.weight
    assert not torch.equal(start, now)
    online_w = system.audio_projector.linear.weight
    assert (now - online_w).norm() < (start - online_w).norm()


def test_targets_are_saved_and_a_resumed_run_is_bit_exact(tmp_path):
    straight = tmp_path / "straight"
    build_trainer(straight, steps=6, batch_size=8, grad_accum=2, checkpoint_every=1, keep_last=10, system=toy_byol_system()).fit()
    saved = load_file(str(straight / "checkpoints" / "step-000006" / "model.safetensors"))
    assert any(".audio_target_encoder.module." in key for key in saved)
    assert any(".text_target_projector.module." in key for key in saved)

    resumed = tmp_path / "resumed"
    build_trainer(
        resumed, steps=6, batch_size=8, grad_accum=2, checkpoint_every=1,
        resume=str(straight / "checkpoints" / "step-000003"), system=toy_byol_system(seed=99),
    ).fit()
    again = load_file(str(resumed / "checkpoints" / "step-000006" / "model.safetensors"))
    assert saved.keys() == again.keys()
    for key in saved:
        assert torch.equal(saved[key], again[key]), key


def test_without_intra_modal_terms_the_collapse_monitor_stops_training(tmp_path):
    """λ = 1 (cross-modal terms only) collapses, as SLAP reports; λ = 0.5 on the same model,
    data and steps does not."""
    import attrs

    def trainer(lam):
        system = toy_byol_system(cross_weight=lam, ema_rate=0.99, dim=8)
        t = build_trainer(tmp_path / f"lam{lam}", steps=150, batch_size=16, grad_accum=1, checkpoint_every=0, system=system)
        t.config = attrs.evolve(t.config, collapse_threshold=0.05, collapse_patience=10, on_collapse="stop")
        return t

    with pytest.raises(TrainingError, match=r"representation collapse at step \d+: .*embedding_std"):
        trainer(1.0).fit()
    trainer(0.5).fit()


def test_retrieval_embeds_with_the_predictions_unless_told_otherwise():
    system = toy_byol_system().eval()
    waveforms = torch.randn(3, 1600)
    with torch.no_grad():
        z = system.audio_projector(system.audio_encoder(system.audio_encoder.preprocess(waveforms)))
        q = byol_of(system).audio_predictor(z)
    torch.testing.assert_close(system.embed_audio(waveforms), torch.nn.functional.normalize(q, dim=-1))
    assert system.embedding_heads == {"audio": "byol", "text": "byol"}
    plain = toy_byol_system(retrieval_embedding="projection").eval()
    torch.testing.assert_close(plain.embed_audio(waveforms), torch.nn.functional.normalize(
        plain.audio_projector(plain.audio_encoder(plain.audio_encoder.preprocess(waveforms))), dim=-1))


def test_two_objectives_offering_a_retrieval_head_is_an_error_naming_both():
    system = toy_byol_system()
    twin = byol_of(toy_byol_system(seed=1))
    with pytest.raises(MtrunError, match="objectives 'byol' and 'byol-2' both put a head on the audio embeddings"):
        System(
            audio_encoder=system.audio_encoder, text_encoder=system.text_encoder,
            audio_projector=system.audio_projector, text_projector=system.text_projector,
            objectives=[WeightedObjective("byol", 1.0, byol_of(system)), WeightedObjective("byol-2", 1.0, twin)],
        )


def test_ema_copy_is_public_and_follows_the_formula():
    online = torch.nn.Linear(3, 2)
    copy = EmaCopy(online)
    start = copy.module.weight.clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    copy.update(0.75)
    torch.testing.assert_close(copy.module.weight, 0.75 * start + 0.25 * online.weight)


@pytest.mark.parametrize("recipe", ["slap.toml", "clap.toml"])
def test_the_tiny_profiles_train_and_evaluate_end_to_end(tmp_path, recipe):
    """`mtrun recipes/{slap,clap}.toml --profile tiny`, cut to two steps of two micro-batches."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from demodata import data_overrides

    root = Path(__file__).resolve().parents[1]
    args = [
        sys.executable, "-m", "mtrun.cli", str(root / "recipes" / recipe), "--profile", "tiny",
        f"run.output_dir={tmp_path / 'runs'}", "trainer.max_steps=2", "trainer.batch_size=8", "trainer.grad_accum=2",
        "trainer.schedule.warmup_steps=1", "eval.0.bootstrap=0", *data_overrides(tmp_path),
    ]
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "MTRUN_DEBUG": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / recipe.replace(".toml", "-tiny")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*records)
    assert {"embedding_std/audio", "embedding_std/text"} <= logged
    if recipe == "slap.toml":
        assert {"byol/audio_to_text", "byol/text_to_audio", "byol/audio_to_audio", "byol/text_to_text", "byol/ema_rate"} <= logged
    (report,) = run_dir.glob("eval-test-*/eval.json")
    metrics = json.loads(report.read_text())["metrics"]
    assert "retrieval/t2a/R@10" in metrics and "modality-gap/centroid_distance" in metrics


def test_evaluation_embeds_both_sides_through_the_retrieval_heads():
    """The evaluation tasks' embedding pass (windows averaged) uses the predictions for audio
    as for text, so retrieval compares q with q, never q with z."""
    from mtrun import Sample
    from mtrun.eval.embed import embed_samples

    system = toy_byol_system()
    g = torch.Generator().manual_seed(0)
    samples = [Sample(id=f"s{i}", audio=torch.randn(800, generator=g), sample_rate=tk.SAMPLE_RATE, captions=[f"tone {i}"]) for i in range(4)]
    seconds = 800 / tk.SAMPLE_RATE
    embedded = embed_samples(system, samples, clip_seconds=seconds)
    waves = torch.stack([s.audio for s in samples])
    torch.testing.assert_close(torch.as_tensor(embedded.audio), system.eval().embed_audio(waves), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(embedded.texts), system.embed_text([s.captions[0] for s in samples]), rtol=1e-5, atol=1e-6)
