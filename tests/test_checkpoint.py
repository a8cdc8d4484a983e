"""Checkpoints: exact round trips without pickle, atomic writes, robust 'latest', pruning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toyrun import TESTS, run_toy
from mtrun.train.checkpoint import (
    CheckpointManager,
    find_latest,
    flatten_state,
    read_checkpoint,
    resolve_resume,
    unflatten_state,
)


def contents(step: int, model: torch.nn.Module | None = None) -> dict:
    model = model or torch.nn.Linear(3, 2)
    return dict(
        model_state=model.state_dict(),
        optimizer_state=None,
        scheduler_state={"last_epoch": step},
        trainer_state={"step": step, "epoch": 0, "batch": step},
        rng_tensors={"torch_cpu": torch.get_rng_state()},
        rng_plain={},
        recipe={"run": {"seed": 1}},
    )


def test_adamw_state_round_trips_exactly_through_safetensors_and_json(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    data, tensors = flatten_state(opt.state_dict())
    restored = unflatten_state(json.loads(json.dumps(data)), {k: v.clone() for k, v in tensors.items()})
    original = opt.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    assert set(restored["state"]) == set(original["state"])  # int keys survive JSON
    for pid, state in original["state"].items():
        for key, value in state.items():
            assert torch.equal(restored["state"][pid][key], value)
    assert restored["param_groups"][0]["betas"] == (0.8, 0.95)  # tuples survive JSON


def test_tied_weights_are_saved_and_loaded(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    folder = CheckpointManager(tmp_path).save(1, **contents(1, model))
    fresh = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    fresh[1].weight = fresh[0].weight
    fresh.load_state_dict(read_checkpoint(folder).model)
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_a_checkpoint_holds_every_part_and_no_pickle(tmp_path):
    folder = CheckpointManager(tmp_path).save(7, **contents(7))
    names = {p.name for p in folder.iterdir()}
    assert folder.name == "step-000007"
    assert {"model.safetensors", "scheduler.json", "rng.safetensors", "trainer_state.json", "provenance.json", "COMPLETE"} <= names
    assert names & {"recipe.toml", "recipe.json"}
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl"))]
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["packages"]["torch"] and "hostname" in prov and "time" in prov and "git_commit" in prov
    assert (tmp_path / "latest").read_text().strip() == "step-000007"


def test_latest_ignores_temp_folders_and_falls_back_when_the_pointer_is_wrong(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    manager.save(2, **contents(2))
    manager.save(4, **contents(4))
    # A write killed half-way: a temp folder with a truncated file and no COMPLETE marker.
    partial = tmp_path / "step-000006.tmp-99999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00\x01")
    # A folder with the final name but no marker (copied half-way by rsync).
    (tmp_path / "step-000005").mkdir()
    assert find_latest(tmp_path).name == "step-000004"
    (tmp_path / "latest").write_text("step-000009\n")  # names a folder that is gone
    assert find_latest(tmp_path).name == "step-000004"
    (tmp_path / "latest").write_text("")  # truncated pointer
    assert find_latest(tmp_path).name == "step-000004"
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path).name == "step-000004"
    (tmp_path / "latest").write_text("step-000002")  # an older, valid choice is honoured
    assert find_latest(tmp_path).name == "step-000002"
    assert resolve_resume("latest", tmp_path.parent / "nowhere") is None
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(tmp_path / "step-000005"), tmp_path)


def test_pruning_keeps_the_last_k_and_the_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        folder = manager.save(step, **contents(step))
        if step == 2:
            manager.mark_best(folder)
    for step in (4, 5, 6):
        manager.save(step, **contents(step))
    (tmp_path / "step-000003.tmp-999999").mkdir()  # left by a dead process (pid 1 would be alive)
    manager.save(7, **contents(7))
    remaining = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert remaining == ["step-000002", "step-000006", "step-000007"]
    assert manager.best.name == "step-000002"


def test_saving_a_step_again_replaces_the_folder(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(3, **contents(3))
    model = torch.nn.Linear(3, 2)
    folder = manager.save(3, **contents(3, model))
    assert torch.equal(load_file(str(folder / "model.safetensors"))["weight"], model.weight)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-000003"]


def final_model(run_dir: Path, step: int = 20) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def test_kill_during_a_checkpoint_write_leaves_latest_readable_and_resume_exact(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "toyrun.py"), str(run_dir), "--pause-checkpoint-at", "5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "paused").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "training never reached the checkpoint write"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    ckpts = run_dir / "checkpoints"
    assert Path((run_dir / "paused").read_text()).parent == ckpts
    assert [p.name for p in ckpts.iterdir() if ".tmp-" in p.name], "the killed write left its temp folder"
    assert not (ckpts / "step-000005").exists()
    latest = find_latest(ckpts)
    assert latest.name == "step-000004"
    assert read_checkpoint(latest).trainer_state["step"] == 4
    # Even a pointer damaged at the same moment does not matter.
    (ckpts / "latest").write_text("step-000005")
    assert find_latest(ckpts).name == "step-000004"

    run_toy(run_dir, "--resume", "latest")
    assert not [p.name for p in ckpts.iterdir() if ".tmp-" in p.name]
    reference = final_model(reference_run)
    resumed = final_model(run_dir)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
