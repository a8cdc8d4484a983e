"""Disk faults outside checkpoints, and checkpoints damaged in ways other than flipped bytes.

Metrics are a log: a write that fails warns once, naming the file and the reason, and training
goes on writing its checkpoints. A report that cannot be written is an mtrun error naming the
folder, raised after the checkpoints are safe. A checkpoint that lost its ``COMPLETE`` marker
or one of its files is passed over by ``--resume latest`` with the reason, and refused by
``mtrun eval`` when it is the file eval needs. Faults are simulated by making the write or open
calls raise the ``OSError`` the operating system would.
"""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrun.errors import MtrunError, TrainingError
from mtrun.eval import report as report_module
from mtrun.train import metrics as metrics_module
from mtrun.train.checkpoint import (
    CheckpointManager,
    CorruptCheckpointError,
    find_latest,
    read_checkpoint,
    resolve_resume,
    verify_checkpoint,
)
from mtrun.train.metrics import MetricsLogger

FAULTS = {
    "full disk": (errno.ENOSPC, "No space left on device"),
    "read-only": (errno.EROFS, "Read-only file system"),
    "vanished folder": (errno.ENOENT, "No such file or directory"),
}


def os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class FailingFile(io.TextIOWrapper):
    """A real file whose writes start failing with ``code`` after ``good`` successful ones."""

    def __init__(self, path, mode, *, code: int, good: int, **kwargs):
        super().__init__(open(path, mode.replace("t", "") + "b" if "b" not in mode else mode), **kwargs)
        self._code, self._good = code, good

    def write(self, text):
        if self._good <= 0:
            raise os_error(self._code)
        self._good -= 1
        return super().write(text)


def fail_metrics_writes(monkeypatch, code: int, good: int = 0) -> None:
    """``metrics.jsonl`` opens fine; its writes fail after ``good`` records (the disk fills up)."""

    def fake_open(path, mode="r", *args, **kwargs):
        if Path(path).name == "metrics.jsonl" and "a" in mode:
            return FailingFile(path, mode, code=code, good=good, encoding=kwargs.get("encoding", "utf-8"))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metrics_module, "open", fake_open, raising=False)


# ---------------------------------------------------------------------------- metrics.jsonl


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failed_metrics_write_warns_once_and_the_run_keeps_its_checkpoints(tmp_path, toy_trainer, monkeypatch, capsys, fault):
    code, reason = FAULTS[fault]
    fail_metrics_writes(monkeypatch, code, good=1)
    run_dir = tmp_path / "run"

    result = toy_trainer(run_dir, steps=6, checkpoint_every=2).fit()  # logs every step

    assert result["step"] == 6.0
    err = capsys.readouterr().err
    warning = f"WARNING: cannot write {run_dir / 'metrics.jsonl'} at step 2: {reason}"
    assert warning in err and err.count("cannot write") == 1, err
    assert "Traceback" not in err
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    ckpts = run_dir / "checkpoints"
    assert find_latest(ckpts).name == "step-000006"
    for name in ("step-000002", "step-000004", "step-000006"):
        verify_checkpoint(ckpts / name)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_metrics_file_that_cannot_be_opened_warns_and_logging_still_returns_records(tmp_path, monkeypatch, fault):
    code, reason = FAULTS[fault]

    def refuse(path, mode="r", *args, **kwargs):
        raise os_error(code)

    monkeypatch.setattr(metrics_module, "open", refuse, raising=False)
    said: list[str] = []
    logger = MetricsLogger(tmp_path, tensorboard=False, say=said.append)
    assert logger.log(1, {"loss": torch.tensor(0.5)}) == {"step": 1, "loss": 0.5}
    logger.log(2, {"loss": 0.25})
    logger.close()
    assert said == [
        f"WARNING: cannot write {tmp_path / 'metrics.jsonl'}: {reason}. Training continues; later metrics are "
        "not written to it in this run (checkpoints are written as before)."
    ]
    assert logger.failed == {tmp_path / "metrics.jsonl": reason}


def test_closing_a_log_whose_last_record_cannot_be_flushed_warns_instead_of_raising(tmp_path):
    said: list[str] = []
    logger = MetricsLogger(tmp_path, tensorboard=False, say=said.append)
    logger.log(1, {"loss": 1.0})

    class Unflushable:
        def close(self):
            raise os_error(errno.ENOSPC)

    logger._file.close()
    logger._file = Unflushable()
    logger.close()  # runs in the trainer's `finally`: raising would hide the error that ended training
    assert len(said) == 1 and "No space left on device" in said[0]


def test_a_full_disk_while_trimming_the_log_on_resume_keeps_the_earlier_log_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    earlier = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4))
    path.write_text(earlier)
    real_replace = os.replace

    def full(src, dst):
        if Path(dst).name == "metrics.jsonl":
            raise os_error(errno.ENOSPC)
        return real_replace(src, dst)

    monkeypatch.setattr(metrics_module.os, "replace", full)
    said: list[str] = []
    logger = MetricsLogger(tmp_path, resume_step=2, tensorboard=False, say=said.append)
    logger.log(3, {"loss": 0.1})
    logger.close()
    assert path.read_text() == earlier  # not cut short, and no duplicate step 3 appended
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert len(said) == 1 and "No space left on device" in said[0]


# ------------------------------------------------------------------------------ TensorBoard


def test_a_failed_tensorboard_write_warns_once_and_metrics_jsonl_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.compat.tensorflow_stub.io import gfile

    said: list[str] = []
    logger = MetricsLogger(tmp_path, say=said.append)
    logger.log(1, {"loss": 1.0})

    def full(self, *args, **kwargs):
        raise os_error(errno.ENOSPC)

    monkeypatch.setattr(gfile.LocalFileSystem, "append", full)
    monkeypatch.setattr(gfile.LocalFileSystem, "write", full)
    for step in (2, 3, 4):
        logger.log(step, {"loss": 1.0 / step})
    logger.close()
    assert len(said) == 1, said
    assert said[0].startswith(f"WARNING: cannot write {tmp_path / 'tensorboard'} at step 2: No space left on device")
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------ the report


class Embeddings:
    """Just what the report's plots read."""

    def __init__(self, n: int = 6, dim: int = 4):
        rng = np.random.default_rng(0)
        self.audio = rng.normal(size=(n, dim)).astype(np.float32)
        self.texts = rng.normal(size=(n, dim)).astype(np.float32)
        self.text_item = np.arange(n)


RESULTS = {"metrics": {"retrieval/t2a/R@1": 50.0}, "split": "test", "checkpoint": "runs/toy/checkpoints/step-000002"}


@pytest.mark.parametrize("failing", ["eval.json", "retrieval_curves.png", "report.md"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_report_that_cannot_be_written_is_an_error_naming_folder_file_and_reason(tmp_path, monkeypatch, failing, fault):
    code, reason = FAULTS[fault]
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if Path(path).name.startswith(f".{failing}.tmp-"):
            raise os_error(code)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(report_module, "open", fake_open, raising=False)
    out = tmp_path / "eval-test-2"
    with pytest.raises(MtrunError) as info:
        report_module.write_report(out, RESULTS, Embeddings())
    message = str(info.value)
    assert f"could not write the evaluation report into {out}: {reason} (while writing {failing})" in message
    assert "Checkpoints are not affected" in message and f"mtrun eval {RESULTS['checkpoint']}" in message
    left = sorted(p.name for p in out.iterdir())
    assert not [name for name in left if ".tmp-" in name]
    assert "report.md" not in left  # a report.md always belongs to a complete report
    if failing != "eval.json":  # the numbers, written first, survive
        assert "eval.json" in left and json.loads((out / "eval.json").read_text())["metrics"] == RESULTS["metrics"]


def test_a_report_folder_that_cannot_be_created_is_an_error_naming_it(tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise os_error(errno.EROFS)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(MtrunError, match=r"could not write the evaluation report into .*eval-test-2: Read-only file system \(while writing the folder\); nothing was written"):
        report_module.write_report(tmp_path / "eval-test-2", RESULTS)


# The toy training recipe of the checkpoint-fault tests: one run folder with a checkpoint at step 2.
from test_checkpoint_faults import EVAL_RECIPE as TOY_RECIPE, contents  # noqa: E402


@pytest.fixture
def toy_recipe(tmp_path):
    recipe = tmp_path / "toy.toml"
    recipe.write_text(TOY_RECIPE)
    return recipe, [f'run.output_dir="{tmp_path / "runs"}"'], tmp_path / "runs" / "toy"


def test_a_full_disk_at_the_final_report_is_an_mtrun_error_after_the_checkpoint_is_safe(toy_recipe, registry, monkeypatch, capsys):
    from mtrun.cli import main
    import mtrun.builtins
    import mtrun.plugins
    import mtrun_testkit
    from mtrun.plugins import load_plugins
    from mtrun.registry import PluginInfo

    recipe, overrides, run_dir = toy_recipe
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise os_error(errno.ENOSPC)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(report_module, "open", full, raising=False)
    plugin_set = load_plugins(extra=[(PluginInfo("builtins"), mtrun.builtins), (PluginInfo("testkit"), mtrun_testkit)], entry_points=False)
    monkeypatch.setattr(mtrun.plugins, "get_plugins", lambda: plugin_set)
    capsys.readouterr()

    assert main([str(recipe), *overrides]) == 1

    err = capsys.readouterr().err
    out_dir = run_dir / "eval-test-2"
    assert f"could not write the evaluation report into {out_dir}: No space left on device (while writing eval.json)" in err
    assert f"mtrun eval {run_dir}" in err and "Traceback" not in err
    checkpoint = run_dir / "checkpoints" / "step-000002"
    assert find_latest(run_dir / "checkpoints") == checkpoint
    verify_checkpoint(checkpoint)
    assert not (out_dir / "report.md").exists()


# --------------------------------------------------------------- checkpoints: missing parts


DAMAGE = {
    "COMPLETE": "it has no COMPLETE marker",
    "trainer_state.json": "trainer_state.json is missing",
    "optimizer.json": "optimizer.json is missing",
    "optimizer.safetensors": "optimizer.safetensors is missing",
}


def run_with_checkpoints(tmp_path: Path, steps=(1, 2)) -> Path:
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, say=None)
    for step in steps:
        manager.save(step, **contents(step))
    return root


@pytest.mark.parametrize("checksums", [True, False], ids=["checksummed", "old-format"])
@pytest.mark.parametrize("deleted", list(DAMAGE))
def test_resume_latest_passes_over_a_checkpoint_missing_a_part_and_says_why(tmp_path, capsys, deleted, checksums):
    root = run_with_checkpoints(tmp_path)
    newest = root / "step-000002"
    if not checksums:
        for folder in root.glob("step-*"):
            (folder / "checksums.json").unlink()
    (newest / deleted).unlink()
    capsys.readouterr()

    assert resolve_resume("latest", tmp_path) == root / "step-000001"

    err = capsys.readouterr().err
    assert f"WARNING: checkpoint {newest}: {DAMAGE[deleted]}" in err and "not resuming from it" in err
    assert f"resuming from the previous intact checkpoint, {root / 'step-000001'}, instead" in err


@pytest.mark.parametrize("deleted", list(DAMAGE))
def test_resume_latest_from_the_only_checkpoint_missing_a_part_is_a_training_error(tmp_path, deleted):
    root = run_with_checkpoints(tmp_path, steps=(1,))
    only = root / "step-000001"
    (only / deleted).unlink()
    with pytest.raises(TrainingError, match="no checkpoint in .* is intact") as info:
        resolve_resume("latest", tmp_path)  # never a silent fresh start over the damaged run
    assert f"checkpoint {only}: {DAMAGE[deleted]}" in str(info.value)


@pytest.mark.parametrize("deleted", ["optimizer.json", "optimizer.safetensors", "trainer_state.json"])
def test_reading_a_checkpoint_missing_a_part_names_the_file_even_unverified(tmp_path, deleted):
    root = run_with_checkpoints(tmp_path, steps=(1,))
    folder = root / "step-000001"
    (folder / "checksums.json").unlink()
    (folder / deleted).unlink()
    for verify in (True, False):
        with pytest.raises(CorruptCheckpointError, match=rf"{deleted} is missing") as info:
            read_checkpoint(folder, verify=verify)  # never read as "no optimizer state"
        assert info.value.file == deleted and info.value.folder == folder


def test_a_checkpoint_without_checksums_json_is_old_format_and_resumes_unverified(tmp_path, capsys):
    root = run_with_checkpoints(tmp_path)
    (root / "step-000002" / "checksums.json").unlink()
    assert resolve_resume("latest", tmp_path) == root / "step-000002"
    assert verify_checkpoint(root / "step-000002") is False
    assert capsys.readouterr().err == ""


def test_a_checkpoint_whose_checksums_list_a_deleted_file_is_damaged(tmp_path):
    root = run_with_checkpoints(tmp_path, steps=(1,))
    folder = root / "step-000001"
    (folder / "provenance.json").unlink()  # not needed to resume, but listed: the folder was damaged
    with pytest.raises(CorruptCheckpointError, match=r"provenance\.json is missing \(it is listed in checksums\.json\)"):
        verify_checkpoint(folder)


def test_training_resumes_past_a_checkpoint_without_its_complete_marker(tmp_path, toy_trainer, capsys):
    run_dir = tmp_path / "run"
    toy_trainer(run_dir, steps=4, checkpoint_every=2).fit()
    ckpts = run_dir / "checkpoints"
    (ckpts / "step-000004" / "COMPLETE").unlink()
    capsys.readouterr()

    toy_trainer(run_dir, steps=4, checkpoint_every=2, resume="latest").fit()

    out, err = capsys.readouterr()
    assert f"checkpoint {ckpts / 'step-000004'}: it has no COMPLETE marker" in err
    assert f"resumed from {ckpts / 'step-000002'} at step 2" in out
    verify_checkpoint(ckpts / "step-000004")  # written again, whole


# ---------------------------------------------------------------------- mtrun eval, missing parts


@pytest.fixture
def trained(toy_recipe, registry):
    from mtrun.runner import train

    recipe, overrides, run_dir = toy_recipe
    train(recipe, overrides, registry=registry)
    return run_dir / "checkpoints" / "step-000002"


def test_mtrun_eval_refuses_a_checkpoint_without_its_complete_marker(trained, registry, tmp_path):
    from mtrun.eval.commands import evaluate_target

    (trained / "COMPLETE").unlink()
    with pytest.raises(MtrunError, match=rf"{trained} is an incomplete checkpoint \(no COMPLETE marker\)"):
        evaluate_target(trained, registry=registry, tasks=["retrieval"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("deleted", ["recipe.toml", "model.safetensors"])
def test_mtrun_eval_refuses_a_checkpoint_missing_what_it_loads_naming_the_file(trained, registry, tmp_path, deleted):
    from mtrun.eval.commands import evaluate_target

    (trained / deleted).unlink()
    with pytest.raises(MtrunError, match=deleted.replace(".", r"\.")) as info:
        evaluate_target(trained, registry=registry, tasks=["retrieval"], out=tmp_path / "out")
    assert str(trained) in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("deleted", ["optimizer.safetensors", "trainer_state.json"])
def test_mtrun_eval_needs_only_the_weights_and_the_recipe(trained, registry, tmp_path, deleted):
    """Optimizer state is often deleted to save space; the weights eval loads are still verified."""
    from mtrun.eval.commands import evaluate_target

    (trained / deleted).unlink()
    result = evaluate_target(trained, registry=registry, tasks=["retrieval"], out=tmp_path / "out")
    assert result["checkpoint"] == str(trained) and result["step"] == 2
    assert (tmp_path / "out" / "report.md").is_file()
