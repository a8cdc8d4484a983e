"""Distributed helpers and torchrun DDP on CPU (gloo) against a single process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from toyrun import TESTS, run_toy
from mtrun import distributed


def test_helpers_give_single_process_answers_without_a_process_group():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x
    assert torch.equal(distributed.all_reduce_mean(torch.tensor([1.0, 3.0])), torch.tensor([1.0, 3.0]))
    distributed.barrier()
    distributed.cleanup()
    assert distributed.init_from_env("cpu") == torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    """2 gloo ranks × micro-batch share == 1 process × global batch: per-step losses, validation
    loss and final weights agree; all_gather_with_grad's gradient matches a single-process
    computation on the concatenated batch."""
    common = ["--steps", "6", "--batch-size", "8", "--grad-accum", "2", "--no-augment", "--checkpoint-every", "0", "--eval-every", "3"]
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(TESTS / "toyrun.py"), str(ddp_dir), "--gather-check", *common,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun hung: {exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_toy(single_dir, *common)

    for r in range(2):
        check = json.loads((ddp_dir / f"gather-rank{r}.json").read_text())
        assert check["world"] == 2 and check["forward_equal"]
        assert check["grad_max_error"] < 1e-6, check

    ddp, single = records(ddp_dir), records(single_dir)
    ddp_loss = {r["step"]: r["loss"] for r in ddp if "loss" in r}
    single_loss = {r["step"]: r["loss"] for r in single if "loss" in r}
    assert sorted(ddp_loss) == list(range(1, 7))
    for step in single_loss:
        assert abs(ddp_loss[step] - single_loss[step]) < 1e-5, (step, ddp_loss[step], single_loss[step])
    ddp_val = [r["val/loss"] for r in ddp if "val/loss" in r]
    single_val = [r["val/loss"] for r in single if "val/loss" in r]
    assert len(ddp_val) == 2 and ddp_val == pytest.approx(single_val, abs=1e-5)

    a = load_file(str(ddp_dir / "checkpoints" / "step-000006" / "model.safetensors"))
    b = load_file(str(single_dir / "checkpoints" / "step-000006" / "model.safetensors"))
    # Gradients differ only by summation order (~1e-7), but Adam divides by sqrt(v), which
    # magnifies that rounding for weights whose gradients are tiny; 2e-4 after 6 steps at lr 1e-2
    # is still far below one step's update.
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-4), key
