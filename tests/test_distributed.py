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
    norm = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    assert distributed.sync_batch_norm(norm, "cpu") is norm and type(norm[1]) is torch.nn.BatchNorm1d
    distributed.cleanup()
    assert distributed.init_from_env("cpu") == torch.device("cpu")


def test_augment_context_item_noise_depends_on_the_item_not_on_its_batch_or_rank():
    """What rank-free augmentation rests on: item i's numbers come from item_seeds[i] (and the
    stream name) alone; the micro-batch's shared draw from batch_seed alone."""
    from mtrun import AugmentContext

    def ctx(seeds, rank=0, batch_seed=5):
        return AugmentContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, training=True,
                              generator=torch.Generator().manual_seed(rank), item_seeds=seeds, batch_seed=batch_seed)

    seeds = [7, 8, 9, 10]
    whole = ctx(seeds).item_rand("a", 4, 3, 2)
    assert whole.shape == (4, 3, 2) and whole.dtype == torch.float32 and 0 <= whole.min() and whole.max() < 1
    assert torch.equal(whole, torch.cat([ctx(seeds[:2]).item_rand("a", 2, 3, 2), ctx(seeds[2:], rank=1).item_rand("a", 2, 3, 2)]))
    assert torch.equal(ctx(seeds).item_rand("a", 4, 2), whole.flatten(1)[:, :2])  # a longer row extends a shorter one
    assert not torch.equal(ctx(seeds).item_rand("b", 4, 3, 2), whole)  # streams differ by name
    first = [torch.rand(3, generator=g) for g in ctx(seeds).item_generators("a", 4)]
    assert all(torch.equal(a, b) for a, b in zip(first, [torch.rand(3, generator=g) for g in ctx(seeds, rank=1).item_generators("a", 4)]))
    assert torch.equal(torch.rand(2, generator=ctx(seeds[:1]).batch_generator("a")), torch.rand(2, generator=ctx(seeds[1:], rank=1).batch_generator("a")))
    with pytest.raises(ValueError, match="item seeds"):
        ctx(seeds).item_rand("a", 3)
    bare = AugmentContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, training=True, generator=torch.Generator().manual_seed(3))
    state = bare.generator.get_state()
    assert torch.equal(bare.item_rand("a", 4, 2), bare.item_rand("a", 4, 2)) and torch.equal(bare.generator.get_state(), state)


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


def _batch_norm_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of test_gathered_batch_norm_...: SLAP's shape in float64 (a BatchNorm on the
    input, MLPs with BatchNorm, a no-gradient copy of the projector as an EMA target, two
    micro-batches accumulated under ``no_sync``), its share through a synchronised copy in DDP
    against the whole batch through an unsynchronised one."""
    import contextlib
    import copy

    import torch.distributed as dist

    torch.set_default_dtype(torch.float64)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    nn = torch.nn

    def mlp(width_in, width_out):
        return nn.Sequential(nn.Linear(width_in, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, width_out))

    class Byolish(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.norm, self.encoder, self.projector, self.predictor = nn.BatchNorm1d(5), nn.Linear(5, 5), mlp(5, 4), mlp(4, 4)
            self.target = copy.deepcopy(self.projector).requires_grad_(False)

        def forward(self, x):
            h = self.encoder(self.norm(x))
            with torch.no_grad():
                t = self.target(h)
            return (self.predictor(self.projector(h)) - t).pow(2).sum(1).mean()

    try:
        x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1)) * 3 + 2
        synced = Byolish()
        distributed.sync_batch_norm(synced, "cpu")
        ddp = torch.nn.parallel.DistributedDataParallel(synced)  # held: its hooks reduce the gradients
        for m in range(2):  # micro-batches of 8, 4 per rank
            with ddp.no_sync() if m == 0 else contextlib.nullcontext():
                (ddp(x[8 * m + 4 * rank : 8 * m + 4 * rank + 4]) / 2).backward()
        whole = Byolish()
        for m in range(2):
            (whole(x[8 * m : 8 * m + 8]) / 2).backward()
        result = {
            "converted": type(synced.projector[1]).__name__,
            "grad": max((p.grad - q.grad).abs().max().item() for p, q in zip(synced.parameters(), whole.parameters()) if p.requires_grad),
            "buffers": max((p.double() - q.double()).abs().max().item() for p, q in zip(synced.buffers(), whole.buffers())),
        }
        with open(f"{out}/rank{rank}.json", "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def test_gathered_batch_norm_gives_one_process_gradients_and_statistics(tmp_path):
    """sync_batch_norm on the CPU: 2 gloo ranks with half of each micro-batch get the gradients
    and running statistics of one process on the whole batch (float64, to 1e-12)."""
    import torch.multiprocessing as mp

    mp.spawn(_batch_norm_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for r in range(2):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert result["converted"] == "GatheredBatchNorm"
        assert result["grad"] < 1e-12 and result["buffers"] < 1e-12, result


def test_more_processes_than_gpus_on_a_node_is_a_clear_error(monkeypatch):
    """`torchrun --nproc_per_node 2` on a one-GPU machine: say so, not 'invalid device ordinal'."""
    import torch

    from mtrun import distributed
    from mtrun.errors import TrainingError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(TrainingError, match=r"LOCAL_RANK=1, but 1 CUDA device\(s\) are visible.*--nproc_per_node 1.*CUDA_VISIBLE_DEVICES.*run.device"):
        distributed.init_from_env("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # e.g. an empty CUDA_VISIBLE_DEVICES
    with pytest.raises(TrainingError, match=r"no CUDA device is visible to it \(check CUDA_VISIBLE_DEVICES\)") as info:
        distributed.init_from_env("cuda")
    assert "--nproc_per_node 0" not in str(info.value)
