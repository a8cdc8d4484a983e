"""Checkpoint faults: damaged files are never loaded silently, failed writes stop cleanly."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mtrun.errors import MtrunError, TrainingError
from mtrun.train import checkpoint
from mtrun.train.checkpoint import (
    CheckpointManager,
    CheckpointWriteError,
    CorruptCheckpointError,
    find_latest,
    read_checkpoint,
    read_model_state,
    resolve_resume,
    verify_checkpoint,
)
from toyrecipes import TOY_MODEL


def contents(step: int, model: torch.nn.Module | None = None) -> dict:
    model = model or torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return dict(
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        scheduler_state={"last_epoch": step},
        trainer_state={"step": step, "epoch": 0, "batch": step},
        rng_tensors={"torch_cpu": torch.get_rng_state()},
        rng_plain={},
        recipe={"run": {"seed": 1}},
    )


def flip_tensor_bytes(path: Path, count: int = 100) -> None:
    """Invert up to ``count`` bytes of a safetensors file's tensor data (past its header), as
    a failing disk or a bad copy would; the header stays valid, so only a checksum notices."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    end = min(len(data), start + count)
    assert end > start, f"{path} holds no tensor data"
    for i in range(start, end):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def tmp_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name)


# ------------------------------------------------------------------------------ checksums


def test_every_file_of_a_checkpoint_has_its_sha256_recorded(tmp_path):
    folder = CheckpointManager(tmp_path).save(1, **contents(1))
    recorded = json.loads((folder / "checksums.json").read_text())
    assert recorded["algorithm"] == "sha256"
    on_disk = {p.name for p in folder.iterdir()} - {"checksums.json", "COMPLETE"}
    assert set(recorded["files"]) == on_disk
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json"} <= on_disk
    for name, entry in recorded["files"].items():
        raw = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}, name
    assert verify_checkpoint(folder) is True


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_a_flipped_file_is_refused_by_every_reader_naming_the_file(tmp_path, name):
    folder = CheckpointManager(tmp_path).save(1, **contents(1))
    flip_tensor_bytes(folder / name)
    load_file(str(folder / name))  # still loads: without checksums the damage would go unseen
    with pytest.raises(CorruptCheckpointError, match=rf"{name} does not match its recorded checksum") as info:
        read_checkpoint(folder)
    assert info.value.file == name and info.value.folder == folder and str(folder) in str(info.value)
    with pytest.raises(CorruptCheckpointError, match=name):
        resolve_resume(str(folder), tmp_path)
    if name == "model.safetensors":
        with pytest.raises(CorruptCheckpointError, match=name):
            read_model_state(folder)
    else:  # a reader of the weights alone checks only the weights
        read_model_state(folder)


def test_a_truncated_file_is_reported_by_its_size(tmp_path):
    folder = CheckpointManager(tmp_path).save(1, **contents(1))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors does not match its recorded checksum \(100 bytes on disk"):
        read_checkpoint(folder)


def test_an_old_checkpoint_without_checksums_loads_without_a_word(tmp_path, capsys):
    manager = CheckpointManager(tmp_path)
    model = torch.nn.Linear(3, 2)
    folder = manager.save(1, **contents(1, model))
    (folder / "checksums.json").unlink()  # as written before checksums existed
    assert verify_checkpoint(folder) is False
    assert torch.equal(read_checkpoint(folder).model["weight"], model.weight)
    assert torch.equal(read_model_state(folder)["weight"], model.weight)
    run_dir = tmp_path / "run"
    shutil.copytree(tmp_path / folder.name, run_dir / "checkpoints" / folder.name)
    assert resolve_resume("latest", run_dir) == run_dir / "checkpoints" / folder.name
    assert capsys.readouterr().err == ""


def test_resume_latest_with_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root)
    for step in (1, 2):
        manager.save(step, **contents(step))
    flip_tensor_bytes(root / "step-000001" / "optimizer.safetensors")
    flip_tensor_bytes(root / "step-000002" / "model.safetensors")
    with pytest.raises(TrainingError, match="no checkpoint in .* is intact") as info:
        resolve_resume("latest", tmp_path)
    message = str(info.value)
    assert "step-000002: model.safetensors does not match its recorded checksum" in message
    assert "step-000001: optimizer.safetensors does not match its recorded checksum" in message


def test_resume_latest_never_falls_forward_past_the_pointer(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep_last=5)
    for step in (1, 2, 3):
        manager.save(step, **contents(step))
    (root / "latest").write_text("step-000002\n")  # an older choice, honoured by find_latest
    flip_tensor_bytes(root / "step-000002" / "model.safetensors")
    assert resolve_resume("latest", tmp_path) == root / "step-000001"
    assert "resuming from the previous intact checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------ resume, training


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_resume_passes_over_a_damaged_latest_checkpoint_for_the_previous_one(tmp_path, toy_trainer, capsys, name):
    run_dir = tmp_path / "run"
    toy_trainer(run_dir, steps=4, checkpoint_every=2).fit()
    ckpts = run_dir / "checkpoints"
    assert find_latest(ckpts).name == "step-000004"
    untouched = {k: v.clone() for k, v in load_file(str(ckpts / "step-000004" / "model.safetensors")).items()}
    flip_tensor_bytes(ckpts / "step-000004" / name)
    capsys.readouterr()

    toy_trainer(run_dir, steps=4, checkpoint_every=2, resume="latest").fit()

    out, err = capsys.readouterr()
    assert f"{ckpts / 'step-000004'}: {name} does not match its recorded checksum" in err
    assert f"resuming from the previous intact checkpoint, {ckpts / 'step-000002'}, instead" in err
    assert f"resumed from {ckpts / 'step-000002'} at step 2" in out
    # Steps 3-4 were trained again from step 2 and land exactly where the first run did.
    redone = read_checkpoint(ckpts / "step-000004").model
    for key in untouched:
        assert torch.equal(redone[key], untouched[key]), key


def test_resume_from_the_only_checkpoint_damaged_is_a_training_error(tmp_path, toy_trainer):
    run_dir = tmp_path / "run"
    toy_trainer(run_dir, steps=2, checkpoint_every=2).fit()
    only = run_dir / "checkpoints" / "step-000002"
    flip_tensor_bytes(only / "model.safetensors")
    with pytest.raises(TrainingError, match="no checkpoint in .* is intact") as info:
        toy_trainer(run_dir, steps=4, resume="latest").fit()
    assert f"{only}: model.safetensors does not match its recorded checksum" in str(info.value)
    with pytest.raises(TrainingError, match=r"cannot resume: .*step-000002: model\.safetensors does not match"):
        toy_trainer(run_dir, steps=4, resume=str(only)).fit()


# ----------------------------------------------------------------------------------- eval

EVAL_RECIPE = """
[run]
name = "toy"
seed = 3
device = "cpu"

[loader]
clip_seconds = 0.25

[data]
type = "toy-tones"
n_items = 24
""" + TOY_MODEL + """
[trainer]
max_steps = 2
batch_size = 8
checkpoint_every = 2
precision = "fp32"
"""


def test_mtrun_eval_refuses_a_damaged_checkpoint_naming_the_file(tmp_path, registry, capsys, monkeypatch):
    from mtrun.eval.commands import evaluate_target
    from mtrun.runner import train

    recipe = tmp_path / "toy.toml"
    recipe.write_text(EVAL_RECIPE)
    overrides = [f'run.output_dir="{tmp_path / "runs"}"']
    train(recipe, overrides, registry=registry)
    run_dir = tmp_path / "runs" / "toy"
    folder = run_dir / "checkpoints" / "step-000002"
    flip_tensor_bytes(folder / "model.safetensors")
    for target in (folder, run_dir, recipe):
        extra = overrides if target == recipe else []
        with pytest.raises(MtrunError, match=r"model\.safetensors does not match its recorded checksum") as info:
            evaluate_target(target, registry=registry, overrides=extra, tasks=["retrieval"], out=tmp_path / "out")
        assert str(folder) in str(info.value)
    assert not (tmp_path / "out").exists()

    import mtrun.builtins
    import mtrun_testkit
    import mtrun.plugins
    from mtrun.cli import main
    from mtrun.plugins import load_plugins
    from mtrun.registry import PluginInfo

    plugin_set = load_plugins(extra=[(PluginInfo("builtins"), mtrun.builtins), (PluginInfo("testkit"), mtrun_testkit)], entry_points=False)
    monkeypatch.setattr(mtrun.plugins, "get_plugins", lambda: plugin_set)
    capsys.readouterr()
    assert main(["eval", str(folder), "--tasks", "retrieval"]) != 0
    err = capsys.readouterr().err
    assert "model.safetensors does not match its recorded checksum" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- failed writes


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _safetensors_no_space(*args, **kwargs):
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')


def _read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


@pytest.mark.parametrize(
    "target, fail, reason",
    [
        ("save_file", _no_space, "No space left on device"),
        ("save_file", _safetensors_no_space, "No space left on device"),
        ("rename", _read_only, "Read-only file system"),
    ],
)
def test_a_failed_write_is_a_training_error_that_leaves_no_temp_folder(tmp_path, monkeypatch, target, fail, reason):
    manager = CheckpointManager(tmp_path)
    previous = manager.save(1, **contents(1))
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    if target == "rename":
        monkeypatch.setattr(checkpoint.os, "rename", fail)
    else:
        monkeypatch.setattr(checkpoint, target, fail)
    with pytest.raises(TrainingError) as info:
        manager.save(2, **contents(2))
    monkeypatch.undo()
    error = info.value
    assert isinstance(error, CheckpointWriteError)
    message = str(error)
    assert f"could not write checkpoint {tmp_path / 'step-000002'}: {reason}" in message
    assert "It needs about " in message and " free on the file system of " in message
    assert error.needed >= sum(t.numel() * t.element_size() for t in contents(2)["model_state"].values())
    assert error.free is not None
    assert tmp_folders(tmp_path) == []
    assert not (tmp_path / "step-000002").exists()
    assert find_latest(tmp_path) == previous
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    verify_checkpoint(previous)


def test_a_failed_rewrite_of_a_step_keeps_the_old_folder(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    model = torch.nn.Linear(3, 2)
    folder = manager.save(3, **contents(3, model))
    real_rename = os.rename

    def rename(src, dst):  # the old folder moves aside (and back); the new one cannot take its place
        if Path(src).name.endswith(f".tmp-{os.getpid()}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        manager.save(3, **contents(3))
    monkeypatch.undo()
    assert tmp_folders(tmp_path) == []
    assert torch.equal(read_checkpoint(folder).model["weight"], model.weight)


def test_a_full_disk_stops_training_naming_the_folder_and_the_last_good_checkpoint(tmp_path, toy_trainer, monkeypatch):
    real_save = checkpoint.save_file

    def fills_up_at_step_4(tensors, path, *args, **kwargs):
        if "step-000004.tmp-" in str(path):
            _no_space()
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_up_at_step_4)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        toy_trainer(run_dir, steps=6, checkpoint_every=2).fit()
    ckpts = run_dir / "checkpoints"
    message = str(info.value)
    assert f"could not write checkpoint {ckpts / 'step-000004'}: No space left on device (during writing model.safetensors)" in message
    assert f"Last good checkpoint: {ckpts / 'step-000002'}" in message and "--resume latest" in message
    assert tmp_folders(ckpts) == []
    assert find_latest(ckpts).name == "step-000002"
    verify_checkpoint(ckpts / "step-000002")


# ------------------------------------------------------------------------ stale temp folders


DEAD_PID = 999999


@pytest.fixture
def dead_pid():
    try:
        os.kill(DEAD_PID, 0)
    except ProcessLookupError:
        return DEAD_PID
    except PermissionError:
        pass
    pytest.skip(f"a process {DEAD_PID} runs here")


def test_stale_temp_folders_are_removed_at_the_next_start_and_reported(tmp_path, capsys, dead_pid):
    manager = CheckpointManager(tmp_path)
    kept = manager.save(4, **contents(4))
    stale = tmp_path / f"step-000010.tmp-{dead_pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x00" * 64)
    live = tmp_path / f"step-000011.tmp-{os.getppid()}"  # a writer that is still running
    live.mkdir()
    pointer = tmp_path / f".latest.tmp-{dead_pid}"  # a pointer update killed before its rename
    pointer.write_text("step-000010\n")
    live_pointer = tmp_path / f".latest.tmp-{os.getppid()}"
    live_pointer.write_text("step-000011\n")
    capsys.readouterr()

    next_start = CheckpointManager(tmp_path)

    assert not stale.exists() and live.is_dir() and kept.is_dir()
    assert not pointer.exists() and live_pointer.is_file()
    assert (tmp_path / "latest").read_text().strip() == kept.name
    err = capsys.readouterr().err
    assert f"removed {stale}: a partial checkpoint left by process {dead_pid}, which is gone" in err
    assert str(live) not in err
    assert next_start.clean_stale() == []


def test_a_checkpoint_moved_aside_by_a_dead_rewrite_is_restored(tmp_path, capsys, dead_pid):
    manager = CheckpointManager(tmp_path)
    folder = manager.save(3, **contents(3))
    aside = tmp_path / f"step-000003.tmp-old-{dead_pid}"
    os.rename(folder, aside)  # killed between moving the old folder aside and the new one in
    CheckpointManager(tmp_path)
    assert folder.is_dir() and not aside.exists()
    verify_checkpoint(folder)
    assert f"restored {folder}" in capsys.readouterr().err
