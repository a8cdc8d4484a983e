"""DefaultTrainer: exact kill-and-resume, checkpoint on SIGTERM/Ctrl-C, non-finite loss (stop or skip), metrics, best checkpoint, bf16."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toyrun import TESTS, run_toy
from mtrun.errors import TrainingError
from mtrun.train.checkpoint import find_latest


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def logged_steps(run_dir: Path) -> int:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in text.splitlines() if line.endswith("}")]
    return max(steps, default=0)


def start_toy(run_dir: Path, *args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    """The toy run in a subprocess, slowed to 0.12 s a step so a test can stop it mid-run."""
    cmd = [sys.executable, str(TESTS / "toyrun.py"), str(run_dir), "--step-delay", "0.12", *args]
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)


def wait_until_logged(proc: subprocess.Popen, run_dir: Path, k: int, timeout: float = 90) -> None:
    """Block until the toy run in ``proc`` has logged step ``k``."""
    deadline = time.monotonic() + timeout
    while logged_steps(run_dir) < k:
        assert proc.poll() is None, f"run ended before step {k}: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_killed_run_resumes_onto_the_uninterrupted_trajectory(tmp_path, reference_run):
    """SIGKILL at a random step (augmentation on, grad_accum 2), resume, compare bit-for-bit."""
    k = random.randint(3, 15)
    extra_delay = random.uniform(0.0, 0.12)
    run_dir = tmp_path / "run"
    proc = start_toy(run_dir, stdout=subprocess.DEVNULL)
    try:
        wait_until_logged(proc, run_dir, k)
        time.sleep(extra_delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = logged_steps(run_dir)
    assert killed_at < 20, "the kill came too late to test anything"
    resumed_from = find_latest(run_dir / "checkpoints")
    assert resumed_from is not None

    run_toy(run_dir, "--resume", "latest")

    context = f"(killed after step {killed_at}, k={k}, resumed from {resumed_from.name})"
    reference = load_file(str(reference_run / "checkpoints" / "step-000020" / "model.safetensors"))
    resumed = load_file(str(run_dir / "checkpoints" / "step-000020" / "model.safetensors"))
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), f"{key} differs {context}"
    # The log has each step once, with the reference run's losses.
    losses = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert losses == list(range(1, 21)), context
    assert train_losses(run_dir) == train_losses(reference_run), context
    ref_opt = load_file(str(reference_run / "checkpoints" / "step-000020" / "optimizer.safetensors"))
    new_opt = load_file(str(run_dir / "checkpoints" / "step-000020" / "optimizer.safetensors"))
    assert all(torch.equal(ref_opt[key], new_opt[key]) for key in ref_opt), context


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_the_finished_step_and_resumes_onto_the_uninterrupted_trajectory(tmp_path, reference_run, sig):
    """SIGTERM/Ctrl-C with no periodic checkpoints: the step in progress finishes, is saved, and
    a resume from it ends bit-for-bit where the uninterrupted run did."""
    k = random.randint(3, 12)
    run_dir = tmp_path / "run"
    proc = start_toy(run_dir, "--checkpoint-every", "0")
    try:
        wait_until_logged(proc, run_dir, k)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    stopped_at = logged_steps(run_dir)
    assert k <= stopped_at < 20, "the signal came too late to test anything"
    assert saved == [f"step-{stopped_at:06d}"], f"expected only the interrupted step's checkpoint, got {saved}"
    assert f"{sig.name} after step {stopped_at}: saved" in out + err

    run_toy(run_dir, "--resume", "latest")

    reference = load_file(str(reference_run / "checkpoints" / "step-000020" / "model.safetensors"))
    resumed = load_file(str(run_dir / "checkpoints" / "step-000020" / "model.safetensors"))
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), f"{key} differs (stopped after step {stopped_at})"
    assert train_losses(run_dir) == train_losses(reference_run)


class AtStep:
    """``system.on_step_end`` that, after step ``k``, sends this process ``signals`` SIGINTs
    (as Ctrl-C pressed that often would) and then raises ``error``, if any."""

    def __init__(self, hook, k: int, *, signals: int = 1, error: BaseException | None = None):
        self.hook, self.k, self.signals, self.error = hook, k, signals, error

    def __call__(self, step: int, total: int) -> None:
        self.hook(step, total)
        if step == self.k:
            for _ in range(self.signals):
                os.kill(os.getpid(), signal.SIGINT)
            if self.error is not None:
                raise self.error


def saved_steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def test_second_signal_stops_at_once_without_saving(tmp_path, toy_trainer):
    trainer = toy_trainer(tmp_path / "run", steps=8, checkpoint_every=0)
    trainer.system.on_step_end = AtStep(trainer.system.on_step_end, 3, signals=2)
    # What was installed before: Python's default handler, or SIG_IGN when the suite runs as a
    # background job of a non-interactive shell (which ignores SIGINT for its children).
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert saved_steps(tmp_path / "run") == []
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back


def test_loader_worker_dying_of_the_same_ctrl_c_is_a_clean_stop(tmp_path, toy_trainer, capsys):
    """torch reports a DataLoader worker killed by the Ctrl-C as a RuntimeError: the finished
    step is still saved and fit() raises KeyboardInterrupt, so the CLI prints how to resume."""
    trainer = toy_trainer(tmp_path / "run", steps=8, checkpoint_every=0)
    died = RuntimeError("DataLoader worker (pid 1) exited unexpectedly")
    trainer.system.on_step_end = AtStep(trainer.system.on_step_end, 3, error=died)
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit()
    assert info.value.__cause__ is died
    assert saved_steps(tmp_path / "run") == ["step-000003"]
    out, err = capsys.readouterr()
    assert "SIGINT after step 3: saved" in out + err


def test_runtime_error_without_a_stop_request_is_not_taken_for_one(tmp_path, toy_trainer):
    trainer = toy_trainer(tmp_path / "run", steps=8, checkpoint_every=0)
    trainer.system.on_step_end = AtStep(trainer.system.on_step_end, 3, signals=0, error=RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert saved_steps(tmp_path / "run") == []


class NanAtStep:
    """A waveform augmenter that poisons the batch at the given steps (0-based)."""

    stage = "waveform"

    def __init__(self, *steps: int):
        self.steps = set(steps)

    def __call__(self, waveforms, context):
        return waveforms * float("nan") if context.step in self.steps else waveforms


def test_non_finite_loss_stops_naming_the_step_and_the_last_checkpoint(tmp_path, toy_trainer, toy_system):
    system = toy_system(extra_augmenters=[NanAtStep(4)])
    trainer = toy_trainer(tmp_path / "run", steps=10, checkpoint_every=2, system=system)
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    message = str(info.value)
    assert "step 5" in message
    assert str(tmp_path / "run" / "checkpoints" / "step-000004") in message
    # Where it came from, read off the step's metrics: the NaN waveforms poisoned the audio side.
    assert "non-finite: the audio embeddings ([audio_encoder], [audio_projector]); objective 'contrastive'" in message
    assert "text embeddings" not in message
    # The poisoned step was never applied: the last checkpoint is finite and no later one exists.
    assert find_latest(tmp_path / "run" / "checkpoints").name == "step-000004"


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path, toy_trainer, toy_system):
    system = toy_system(extra_augmenters=[NanAtStep(1)])
    trainer = toy_trainer(tmp_path / "run", steps=10, checkpoint_every=5, system=system)
    with pytest.raises(TrainingError, match=r"step 2\b.*none written yet"):
        trainer.fit()


def skipping(trainer, **changes):
    """``trainer`` with ``[trainer].nonfinite = "skip"`` (and any other ``changes``)."""
    trainer.config = attrs_evolve(trainer.config, nonfinite="skip", **changes)
    return trainer


def step_files(run_dir: Path, step: int, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / f"{name}.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_skip_drops_the_non_finite_step_and_trains_to_the_end(tmp_path, toy_trainer, toy_system, capsys):
    run_dir = tmp_path / "run"
    system = toy_system(extra_augmenters=[NanAtStep(4)])
    trainer = skipping(toy_trainer(run_dir, steps=8, keep_last=20, system=system))
    result = trainer.fit()
    assert result["step"] == 8
    # Step 5 (0-based 4) made no update: weights and optimizer state are those after step 4.
    assert_same(step_files(run_dir, 4), step_files(run_dir, 5))
    assert_same(step_files(run_dir, 4, "optimizer"), step_files(run_dir, 5, "optimizer"))
    assert any(not torch.equal(a, b) for a, b in zip(step_files(run_dir, 5).values(), step_files(run_dir, 6).values()))
    records = {r["step"]: r for r in read_metrics(run_dir) if "lr" in r}
    assert [records[k]["nonfinite_skipped"] for k in range(1, 9)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert "loss" not in records[5]  # nothing to average: its one step was skipped
    assert all(torch.isfinite(torch.tensor(records[k]["loss"])) for k in (1, 2, 3, 4, 6, 7, 8))
    # The schedule advanced through the skipped step: the learning rates are those of a clean run.
    clean_dir = tmp_path / "clean"
    toy_trainer(clean_dir, steps=8, checkpoint_every=0).fit()
    clean = {r["step"]: r for r in read_metrics(clean_dir) if "lr" in r}
    assert [records[k]["lr"] for k in range(1, 9)] == [clean[k]["lr"] for k in range(1, 9)]
    state = json.loads((run_dir / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert state["nonfinite_skipped"] == 1 and state["step"] == 8
    out, err = capsys.readouterr()
    assert (
        "non-finite loss at step 5 (epoch 0); non-finite: the audio embeddings ([audio_encoder], [audio_projector]); "
        "objective 'contrastive'; skipped its optimizer step (1 skipped in this run, at most 10)"
    ) in out


class InfGradAtStep:
    """Makes the gradient of one parameter Inf at the given step (0-based) while the loss stays
    finite: an augmenter that notes the step, and a hook on the parameter's gradient."""

    stage = "waveform"

    def __init__(self, step: int):
        self.step, self.current = step, -1

    def __call__(self, waveforms, context):
        self.current = context.step
        return waveforms

    def attach(self, parameter: torch.nn.Parameter) -> None:
        parameter.register_hook(lambda grad: grad + float("inf") if self.current == self.step else grad)


def test_skip_without_clipping_still_catches_an_inf_gradient_behind_a_finite_loss(tmp_path, toy_trainer, toy_system, capsys):
    run_dir = tmp_path / "run"
    poison = InfGradAtStep(2)
    system = toy_system(extra_augmenters=[poison])
    poison.attach(next(p for p in system.parameters() if p.requires_grad))
    trainer = skipping(toy_trainer(run_dir, steps=5, keep_last=20, system=system), grad_clip=0.0)
    assert trainer.fit()["step"] == 5
    assert_same(step_files(run_dir, 2), step_files(run_dir, 3))
    assert all(torch.isfinite(v).all() for v in step_files(run_dir, 5).values())
    records = {r["step"]: r for r in read_metrics(run_dir) if "lr" in r}
    assert records[3]["nonfinite_skipped"] == 1 and "loss" not in records[3]
    assert "non-finite gradient at step 3" in capsys.readouterr().out


def test_skip_stops_once_more_than_max_nonfinite_steps_were_skipped(tmp_path, toy_trainer, toy_system):
    run_dir = tmp_path / "run"
    system = toy_system(extra_augmenters=[NanAtStep(1, 3)])
    trainer = skipping(toy_trainer(run_dir, steps=8, checkpoint_every=1, system=system), max_nonfinite_steps=1)
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    message = str(info.value)
    assert "non-finite loss at step 4" in message and "2 steps" in message and "max_nonfinite_steps = 1" in message
    assert str(run_dir / "checkpoints" / "step-000003") in message
    assert find_latest(run_dir / "checkpoints").name == "step-000003"


def test_skip_with_no_allowance_stops_at_the_first_non_finite_step(tmp_path, toy_trainer, toy_system):
    system = toy_system(extra_augmenters=[NanAtStep(1)])
    trainer = skipping(toy_trainer(tmp_path / "run", steps=8, checkpoint_every=5, system=system), max_nonfinite_steps=0)
    with pytest.raises(TrainingError, match=r"step 2\b.*1 steps.*max_nonfinite_steps = 0.*none written yet"):
        trainer.fit()


def test_skipped_count_survives_resume_and_the_resumed_run_is_exact(tmp_path, toy_trainer, toy_system):
    full = tmp_path / "full"
    skipping(toy_trainer(full, steps=10, keep_last=20, system=toy_system(extra_augmenters=[NanAtStep(2, 7)]))).fit()
    resumed = tmp_path / "resumed"
    again = toy_trainer(
        resumed, steps=10, resume=str(full / "checkpoints" / "step-000005"), system=toy_system(extra_augmenters=[NanAtStep(2, 7)])
    )
    skipping(again).fit()
    assert_same(step_files(full, 10), step_files(resumed, 10))
    assert_same(step_files(full, 10, "optimizer"), step_files(resumed, 10, "optimizer"))
    state = json.loads((resumed / "checkpoints" / "step-000010" / "trainer_state.json").read_text())
    assert state["nonfinite_skipped"] == 2
    records = {r["step"]: r for r in read_metrics(resumed) if "lr" in r}
    assert [records[k]["nonfinite_skipped"] for k in range(6, 11)] == [1, 1, 2, 2, 2]


def test_checkpoints_from_before_the_skip_count_resume_with_zero(tmp_path, toy_trainer):
    run_dir = tmp_path / "run"
    toy_trainer(run_dir, steps=2, checkpoint_every=1).fit()
    path = run_dir / "checkpoints" / "step-000002" / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["nonfinite_skipped"]
    path.write_text(json.dumps(state))
    (path.parent / "checksums.json").unlink()  # as old as the count: written before checksums too
    trainer = skipping(toy_trainer(run_dir, steps=3, resume="latest"))
    assert trainer.fit()["step"] == 3 and trainer.state.nonfinite_skipped == 0


def test_nonfinite_policy_is_validated():
    from mtrun.train.trainer import DefaultTrainer

    assert DefaultTrainer.Config().nonfinite == "stop" and DefaultTrainer.Config().max_nonfinite_steps == 10
    with pytest.raises(ValueError):
        DefaultTrainer.Config(nonfinite="ignore")
    with pytest.raises(ValueError):
        DefaultTrainer.Config(max_nonfinite_steps=-1)


def test_metrics_tensorboard_best_checkpoint_and_final_metrics(tmp_path, toy_trainer, capsys):
    run_dir = tmp_path / "run"
    result = toy_trainer(run_dir, steps=6, checkpoint_every=0, eval_every=2, keep_last=1).fit()
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert {"epoch", "lr", "loss", "samples_per_s", "contrastive/loss", "contrastive/accuracy"} <= set(train[0])
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    best_value = min(r["val/loss"] for r in evals)
    best_step = next(r["step"] for r in evals if r["val/loss"] == best_value)
    best_name = (run_dir / "checkpoints" / "best").read_text().strip()
    assert best_name == f"step-{best_step:06d}" and (run_dir / "checkpoints" / best_name / "COMPLETE").exists()
    state = json.loads((run_dir / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["best_value"] == pytest.approx(best_value) and state["step"] == 6
    assert result["step"] == 6 and result["val/loss"] == pytest.approx(evals[-1]["val/loss"])
    assert "step 6/6" in capsys.readouterr().out  # plain progress lines when not a terminal


def test_epochs_set_the_length_when_max_steps_is_zero(tmp_path, toy_trainer):
    trainer = toy_trainer(tmp_path / "run", steps=0, checkpoint_every=0)
    trainer.config = attrs_evolve(trainer.config, epochs=2)  # 40 items / batch 8 = 5 steps per epoch
    assert trainer.fit()["step"] == 10


def attrs_evolve(config, **changes):
    import attrs

    return attrs.evolve(config, **changes)


def test_resume_refuses_a_different_batch_size(tmp_path, toy_trainer):
    toy_trainer(tmp_path / "run", steps=2, checkpoint_every=1).fit()
    with pytest.raises(TrainingError, match="batch_size"):
        toy_trainer(tmp_path / "run", steps=4, batch_size=4, resume="latest").fit()
    with pytest.raises(TrainingError, match=r"\[run\]\.resume = '.*nope': no such folder"):
        toy_trainer(tmp_path / "run", steps=4, resume=str(tmp_path / "nope")).fit()
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match=r"not a complete checkpoint folder \(no COMPLETE marker\)"):
        toy_trainer(tmp_path / "run", steps=4, resume=str(tmp_path / "empty")).fit()


def test_bf16_autocast_trains_on_cpu(tmp_path, toy_trainer):
    result = toy_trainer(tmp_path / "run", steps=3, checkpoint_every=0, precision="bf16").fit()
    assert result["step"] == 3 and torch.isfinite(torch.tensor(result["loss"]))


def test_no_decay_for_biases_and_one_dimensional_parameters(tmp_path, toy_trainer):
    from mtrun.train.optim import param_groups

    trainer = toy_trainer(tmp_path / "run")
    groups = param_groups(trainer.system, trainer.config.optimizer.config)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] > 0 and groups[1]["weight_decay"] == 0
    for name, p in trainer.system.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name


def test_registered_as_the_default_trainer(registry):
    from mtrun.train.trainer import DefaultTrainer

    assert registry.get("trainer", "default").cls is DefaultTrainer


class _Terminal:
    """A text stream that claims to be a terminal."""

    def __init__(self):
        import io

        self.buffer = io.StringIO()

    def isatty(self):
        return True

    def write(self, text):
        return self.buffer.write(text)

    def flush(self):
        pass


def test_progress_draws_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    import io

    from mtrun.train.progress import Progress

    plain = io.StringIO()
    now = [100.0]
    progress = Progress(4, log_every=2, stream=plain, clock=lambda: now[0])
    for step in range(1, 5):
        now[0] += 30.0  # 30 s a step
        progress.update(step, 0, {"loss": 1.0 / step, "lr": 1e-3, "samples_per_s": 10.0})
    progress.close()
    assert plain.getvalue().splitlines() == [
        "step 2/4  epoch 0  loss 0.5  lr 1.00e-03  samples_per_s 10.0  elapsed 1:00  left 1:00",
        "step 4/4  epoch 0  loss 0.25  lr 1.00e-03  samples_per_s 10.0  elapsed 2:00",
    ]
    resumed = io.StringIO()
    now = [0.0]
    progress = Progress(4000, start_step=1000, log_every=1000, stream=resumed, clock=lambda: now[0])
    now[0] = 3600.0  # 1000 steps an hour since the resume: 2000 left
    progress.update(2000, 3, {"loss": 1.0})
    assert resumed.getvalue() == "step 2000/4000  epoch 3  loss 1  elapsed 1:00:00  left 2:00:00\n"
    terminal = _Terminal()
    progress = Progress(4, stream=terminal)
    progress.update(3, 0, {"loss": 0.5, "lr": 1e-3, "samples_per_s": 10.0})
    progress.close()
    assert "3/4" in terminal.buffer.getvalue() and "loss 0.5" in terminal.buffer.getvalue()
    silent = io.StringIO()
    Progress(4, enabled=False, stream=silent).update(4, 0, {"loss": 1.0})
    assert silent.getvalue() == ""


class ScriptedScore:
    """An eval task reporting a scripted sequence of ``score`` values, one per evaluation."""

    def __init__(self, values):
        self.values = list(values)
        self.calls = 0

    def evaluate(self, system, samples, *, cache=None):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return {"score": value}


def test_early_stopping_after_patience_evaluations_without_a_new_best(tmp_path, toy_trainer):
    # Best at the 2nd evaluation (4.0); the 3rd..5th do not beat it → stop after the 5th.
    scores = [5.0, 4.0, 4.5, 4.0, 4.2, 1.0, 1.0, 1.0, 1.0, 1.0]
    trainer = toy_trainer(tmp_path / "run", steps=10, checkpoint_every=0, evals=[ScriptedScore(scores)])
    trainer.config = attrs_evolve(trainer.config, eval_every=1, best_metric="val/score", early_stopping_patience=3)
    result = trainer.fit()
    assert result["step"] == 5 and result["stopped_early"] == 1.0
    assert (tmp_path / "run" / "checkpoints" / "best").read_text().strip() == "step-000002"
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000005" / "trainer_state.json").read_text())
    assert state["stopped_early"] is True and state["evals_since_best"] == 3 and state["best_value"] == 4.0
    # Resuming a run that stopped early does not train on.
    again = toy_trainer(tmp_path / "run", steps=10, checkpoint_every=0, resume="latest", evals=[ScriptedScore([0.0])])
    again.config = attrs_evolve(again.config, eval_every=1, best_metric="val/score", early_stopping_patience=3)
    assert again.fit()["step"] == 5
    # Without patience the same scores train to the end.
    full = toy_trainer(tmp_path / "full", steps=10, checkpoint_every=0, evals=[ScriptedScore(scores)])
    full.config = attrs_evolve(full.config, eval_every=1, best_metric="val/score")
    assert full.fit()["step"] == 10


def test_console_lines_leave_bounds_and_subset_repeats_to_the_log_files():
    from mtrun.train.metrics import console_view

    metrics = {
        "val/loss": 2.1,
        "val/retrieval/t2a/R@10": 45.0,
        "val/retrieval/t2a/R@10:ci_low": 41.0,
        "val/retrieval/t2a/R@10:ci_high": 50.0,
        "val/retrieval/t2a/subset/R@10": 46.0,
    }
    metrics["val/retrieval/n_items"] = 266
    assert console_view(metrics) == {"val/loss": 2.1, "val/retrieval/t2a/R@10": 45.0}
    from mtrun.train.metrics import console_lines

    metrics["val/zero-shot/genre/accuracy"] = 61.25
    assert console_lines(1200, metrics) == ["step 1200:  val/loss 2.1", "  val/retrieval: t2a/R@10 45",
                                            "  val/zero-shot: genre/accuracy 61.25"]


def test_auto_precision_is_bf16_only_where_bf16_is_fast(monkeypatch):
    from mtrun.train import trainer

    cpu = torch.device("cpu")
    assert trainer.resolve_precision("fp32", cpu) == "fp32"
    assert trainer.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: True)
    assert trainer.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: False)
    assert trainer.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert trainer.resolve_precision("auto", torch.device("cuda")) == "fp32"


def test_settle_precision_times_only_auto_on_a_fast_bf16_cpu(monkeypatch):
    """The benchmarks' way to the trainer's choice: timing decides only for auto on a bf16 CPU."""
    from mtrun.train import trainer

    cpu, calls = torch.device("cpu"), []

    def fake(system, *, batch_size, clip_samples, repeats=2):
        calls.append((system, batch_size, clip_samples))
        return ratio

    monkeypatch.setattr(trainer, "time_cpu_precisions", fake)
    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: True)
    for ratio, expected in ((1.6, "fp32"), (0.5, "bf16")):
        assert trainer.settle_precision("auto", cpu, "system", batch_size=4, clip_samples=800) == expected
    assert calls == [("system", 4, 800)] * 2
    assert trainer.settle_precision("bf16", cpu, "system", batch_size=4, clip_samples=800) == "bf16"
    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: False)
    assert trainer.settle_precision("auto", cpu, "system", batch_size=4, clip_samples=800) == "fp32"
    assert len(calls) == 2  # nothing timed where the choice is fixed
    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: True)
    ratio = ValueError("an encoder that rejects synthetic inputs")

    def failing(system, *, batch_size, clip_samples, repeats=2):
        raise ratio

    monkeypatch.setattr(trainer, "time_cpu_precisions", failing)
    assert trainer.settle_precision("auto", cpu, "system", batch_size=4, clip_samples=800) == "bf16"  # as the trainer keeps it


def test_the_log_window_averages_device_metrics_over_its_applied_steps_only():
    """Metrics stay tensors until the log step; the means are over the applied steps (a skipped
    step counts in the throughput only), a metric missing from a step is summed where present."""
    import numpy as np

    from mtrun.train.trainer import _Window

    window = _Window()
    steps = [
        (1.0, {"a": 2.0, "b": 10.0}, 0.5),
        (3.0, {"a": 4.0}, 1.5),
        (5.0, {"a": 9.0, "b": 20.0}, 4.0),
    ]
    for loss, metrics, norm in steps:
        window.add(loss, {k: torch.tensor(v) for k, v in metrics.items()}, norm, lr=0.1)
    window.skip(lr=0.2)
    record = window.means(epoch=3, batch_size=8)
    assert record["loss"] == pytest.approx(3.0) and record["lr"] == 0.2 and record["epoch"] == 3
    assert record["a"] == pytest.approx(np.mean([2.0, 4.0, 9.0]))
    assert record["b"] == pytest.approx(30.0 / 3)  # summed where present, over the 3 applied steps
    assert record["grad_norm"] == pytest.approx(2.0)
    assert record["samples_per_s"] > 0 and all(isinstance(v, float) for k, v in record.items() if k != "epoch")
    empty = _Window()
    empty.skip(lr=0.3)
    assert "loss" not in empty.means(epoch=0, batch_size=8)


def test_cpu_bf16_hardware_reads_the_kernels_cpu_flags_where_torch_has_no_probe(monkeypatch):
    """torch 2.11 dropped the private CPU probes 2.10 has (seen on a GPU machine); the answer
    must then come from /proc/cpuinfo, not an AttributeError in every bf16 run."""
    import types
    from pathlib import Path

    from mtrun.train import trainer

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    line = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), None)
    if line is None:
        pytest.skip("no x86 'flags' line in /proc/cpuinfo (an ARM machine)")
    flags = set(line.split(":", 1)[1].split())
    expected = {"amx": "amx_tile" in flags, "avx512_bf16": "avx512_bf16" in flags}
    probes = hasattr(getattr(torch._C, "_cpu", None), "_is_amx_tile_supported")
    with_probes = trainer.cpu_bf16_hardware()
    monkeypatch.setattr(torch._C, "_cpu", types.SimpleNamespace(), raising=False)
    assert trainer.cpu_bf16_hardware() == expected
    assert trainer.cpu_has_fast_bf16() == (expected["amx"] or expected["avx512_bf16"])
    if probes:  # torch 2.10's own probes agree with the flags (2.11 has none: nothing to compare)
        assert with_probes == expected


def test_timing_the_precisions_leaves_the_rngs_gradients_and_mode_as_they_were(tmp_path, toy_trainer):
    from mtrun.train.trainer import time_cpu_precisions

    system = toy_trainer(tmp_path / "run").system
    system.train()
    draws = []
    forward = system.audio_encoder.forward

    def drawing(*args, **kwargs):  # an encoder that draws from the global RNG (noise, dropout)
        draws.append(float(torch.rand(())))
        return forward(*args, **kwargs)

    system.audio_encoder.forward = drawing
    before = torch.get_rng_state()
    ratio = time_cpu_precisions(system, batch_size=4, clip_samples=4000)
    assert draws and ratio > 0 and torch.equal(before, torch.get_rng_state())
    assert system.training and all(p.grad is None for p in system.parameters())


def test_auto_precision_on_a_fast_bf16_cpu_keeps_bf16_only_where_it_measures_faster_and_resume_keeps_the_choice(
    tmp_path, toy_trainer, monkeypatch, capsys
):
    from mtrun.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "cpu_has_fast_bf16", lambda: True)
    measured = []

    def timed(ratio):
        def fake(system, *, batch_size, clip_samples, repeats=2):
            measured.append((batch_size, clip_samples))
            return ratio

        return fake

    monkeypatch.setattr(trainer_module, "time_cpu_precisions", timed(1.6))  # bf16 slower: fp32
    slow = toy_trainer(tmp_path / "slow", steps=2, precision="auto")
    slow.fit()
    clip = round(0.25 * slow.system.audio_encoder.sample_rate)  # the toy loader's 0.25 s clips
    assert slow.precision == "fp32" and measured == [(4, clip)]  # the micro-batch: 8 / grad_accum 2
    assert "precision: fp32 ([trainer].precision = 'auto' on cpu: bf16 took 1.60x fp32's time" in capsys.readouterr().out

    monkeypatch.setattr(trainer_module, "time_cpu_precisions", timed(0.5))  # bf16 faster: bf16
    fast = toy_trainer(tmp_path / "fast", steps=2, precision="auto")
    fast.fit()
    assert fast.precision == "bf16"

    # Resumed where bf16 now measures slower: the run keeps its checkpoint's bf16, measuring nothing.
    monkeypatch.setattr(trainer_module, "time_cpu_precisions", timed(1.6))
    resumed = toy_trainer(tmp_path / "fast", steps=3, precision="auto", resume="latest")
    count = len(measured)
    resumed.fit()
    assert resumed.precision == "bf16" and len(measured) == count
    assert "precision: bf16 ([trainer].precision = 'auto' on cpu, as in the checkpoint)" in capsys.readouterr().out


def test_auto_precision_keeps_the_hardwares_bf16_when_the_encoders_cannot_be_timed(tmp_path, toy_trainer, monkeypatch, capsys):
    """A third-party encoder that rejects the synthetic timing inputs must not stop training."""
    from mtrun.train import trainer as trainer_module

    def broken(system, **kwargs):
        raise ValueError("this encoder wants real audio")

    monkeypatch.setattr(trainer_module, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(trainer_module, "time_cpu_precisions", broken)
    run = toy_trainer(tmp_path / "run", steps=1, precision="auto")
    run.fit()
    assert run.precision == "bf16"
    assert "timing the encoders failed (ValueError: this encoder wants real audio)" in capsys.readouterr().out


def test_an_evaluation_that_fails_at_the_last_step_keeps_the_trained_steps(tmp_path, toy_trainer, capsys):
    """A misspelt probe category is found at the end-of-run evaluation: the weights of every
    step are saved before the error reaches the user."""
    from mtrun.errors import MtrunError
    from mtrun.train.checkpoint import read_checkpoint

    class Misconfigured:
        def evaluate(self, system, samples, *, cache=None):
            raise MtrunError("[eval] probe: category = 'mood' labels none of the items")

    trainer = toy_trainer(tmp_path / "run", steps=3, checkpoint_every=0, evals=[Misconfigured()])
    with pytest.raises(MtrunError, match="labels none of the items"):
        trainer.fit()
    saved = read_checkpoint(tmp_path / "run" / "checkpoints" / "step-000003")
    assert saved.trainer_state["step"] == 3
    assert "the evaluation failed after step 3; saved" in capsys.readouterr().out


def test_timing_the_precisions_bypasses_the_encoder_cache_and_leaves_it_attached(tmp_path, toy_trainer):
    """Timed through the cache, rounds 1-2 would be lookups of round 0's outputs (a ratio near 1
    whatever the hardware) and synthetic clips would be stored on disk."""
    from mtrun.encoder_cache import EncoderCache, _CachedForward
    from mtrun.train.trainer import time_cpu_precisions

    system = toy_trainer(tmp_path / "run").system
    for p in system.audio_encoder.parameters():
        p.requires_grad_(False)
    cache = EncoderCache(tmp_path / "cache")
    assert cache.attach(system.audio_encoder, "[audio_encoder]") == ["[audio_encoder]"]
    system.encoder_cache = cache
    time_cpu_precisions(system, batch_size=4, clip_samples=4000)
    assert cache.stats == {} and not list((tmp_path / "cache").rglob("*.*"))
    assert isinstance(system.audio_encoder.__dict__.get("forward"), _CachedForward)  # wrapped again


def test_a_validation_task_the_val_split_cannot_serve_is_named_at_set_up(tmp_path, toy_trainer):
    """A warning before the first step, not an error: the test split may serve the task (the
    runner refuses it when that cannot either)."""
    from mtrun.eval.zeroshot import ZeroShot

    task = ZeroShot(ZeroShot.Config(clip_seconds=0.25, category="mood"))
    trainer = toy_trainer(tmp_path / "run", steps=2, evals=[task])
    with pytest.warns(RuntimeWarning, match=r"category = 'mood' labels none of the \d+ items.*\(evaluating split 'val' of "
                      r"the data source \(\[data\]\)\); its validation rounds will fail or report no metric") as caught:
        trainer.fit()
    assert len([w for w in caught if "category = 'mood'" in str(w.message)]) == 1
    assert trainer.state.step == 2  # and the run trains


@pytest.mark.parametrize("fast_here", [True, False])
def test_ranks_whose_cpus_differ_all_join_the_precision_vote_and_train_in_fp32(tmp_path, toy_trainer, monkeypatch, fast_here):
    """Two ranks, one CPU without fast bf16: both ranks take part in the same all-reduce (before,
    that rank skipped it and the other waited forever) and both settle on fp32, timing nothing."""
    from mtrun import distributed
    from mtrun.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "cpu_has_fast_bf16", lambda: fast_here)
    monkeypatch.setattr(trainer_module, "time_cpu_precisions", lambda *a, **k: pytest.fail("timed with a rank lacking bf16"))
    votes = []

    def all_reduce_mean(x):  # this rank's vote, averaged with the other rank's (which lacks bf16 when this one has it)
        votes.append(float(x))
        return torch.tensor((float(x) + (1.0 if fast_here else 0.0)) / 2)

    monkeypatch.setattr(distributed, "all_reduce_mean", all_reduce_mean)
    trainer = toy_trainer(tmp_path / "run", precision="auto")
    trainer._precision = trainer_module.resolve_precision("auto", torch.device("cpu"))
    trainer._settle_auto_precision(None, None, torch.device("cpu"), 2, None)
    assert votes == [0.0 if fast_here else 1.0]
    assert trainer.precision == "fp32" and "1 of 2 ranks' CPUs lack fast bf16" in trainer._precision_note


@pytest.mark.parametrize("failing_step", [2, 4])
def test_a_resumed_run_evaluates_the_step_whose_evaluation_failed_then_trains_on_as_if_it_had_not(tmp_path, toy_trainer, failing_step):
    """Evaluation every 2 of 4 steps fails once, at step 2 (mid-run) or 4 (the last); --resume
    evaluates that step first. The log, the best checkpoint and the losses then equal those of
    a run whose evaluation never failed (before, the resumed run went on without that step's
    evaluation: no val record, and the best checkpoint never considered it)."""
    from mtrun.errors import MtrunError
    from mtrun.train.checkpoint import read_checkpoint

    class Fine:
        def evaluate(self, system, samples, *, cache=None):
            return {"calls": 1.0}

    class FailsAt:
        def __init__(self, step):
            self.step, self.trainer = step, None

        def evaluate(self, system, samples, *, cache=None):
            if self.trainer.state.step == self.step:
                raise MtrunError("the evaluation server went away")
            return {"calls": 1.0}

    knobs = dict(steps=4, eval_every=2, checkpoint_every=0, grad_accum=1)
    toy_trainer(tmp_path / "reference", evals=[Fine()], **knobs).fit()
    failing = FailsAt(failing_step)
    trainer = toy_trainer(tmp_path / "run", evals=[failing], **knobs)
    failing.trainer = trainer
    with pytest.raises(MtrunError, match="went away"):
        trainer.fit()
    saved = tmp_path / "run" / "checkpoints" / f"step-{failing_step:06d}"
    assert read_checkpoint(saved).trainer_state["evaluation_due"] is True
    toy_trainer(tmp_path / "run", evals=[Fine()], resume="latest", **knobs).fit()

    reference, resumed = read_metrics(tmp_path / "reference"), read_metrics(tmp_path / "run")
    drop = ("samples_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in reference
    ]
    assert [r["step"] for r in resumed if "val/loss" in r] == [2, 4]
    assert read_checkpoint(saved).trainer_state["evaluation_due"] is False
    best = tmp_path / "reference" / "checkpoints" / "best"
    assert best.read_text().strip() == (tmp_path / "run" / "checkpoints" / "best").read_text().strip()
