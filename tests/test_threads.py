"""PyTorch's thread count for training: `[run].threads`, OMP_NUM_THREADS, or auto by the cores.

Auto (``threads = 0``, the default) gives the process its share of the cores it may use (the
affinity mask, capped by a cgroup CPU quota, divided among torchrun's local ranks) less one core
per DataLoader worker, at least one. The machine is mocked: affinity, quota and environment.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mtrun import runner
from mtrun.run import RunConfig
from mtrun.runner import apply_threads, choose_threads, train, usable_cores

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def torch_threads():
    """Put PyTorch's thread count back after a test that sets it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def machine(monkeypatch):
    """A machine with ``cores`` usable cores (affinity), no cgroup quota and a clean environment."""

    def make(cores: int, quota: int | None = None) -> None:
        monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(runner, "_cgroup_quota", lambda: quota)
        for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(name, raising=False)

    return make


def fake_run(threads: int = 0, workers: int = 0):
    return SimpleNamespace(config=SimpleNamespace(threads=threads), loader=SimpleNamespace(num_workers=workers))


def test_auto_is_the_default_and_negative_threads_are_refused():
    assert RunConfig().threads == 0
    with pytest.raises(ValueError):
        RunConfig(threads=-1)


def test_auto_leaves_one_core_to_each_loader_worker():
    assert choose_threads(0, 2, cores=8)[0] == 6
    assert choose_threads(0, 1, cores=2)[0] == 1
    assert choose_threads(0, 0, cores=2)[0] == 2


def test_auto_never_goes_below_one_thread():
    assert choose_threads(0, 8, cores=2)[0] == 1
    assert choose_threads(0, 0, cores=2, local_ranks=4)[0] == 1


def test_auto_shares_the_cores_among_local_ranks():
    threads, why = choose_threads(0, 1, cores=16, local_ranks=4)
    assert threads == 3
    assert "16 usable cores / 4 local ranks - 1 loader worker" in why


def test_threads_from_the_recipe_win_over_auto_and_environment():
    assert choose_threads(3, 1, cores=64, omp_num_threads="8") == (3, "[run].threads")


def test_omp_num_threads_wins_over_auto_unless_it_is_not_a_positive_integer():
    assert choose_threads(0, 1, cores=64, omp_num_threads="5") == (5, "OMP_NUM_THREADS")
    assert choose_threads(0, 1, cores=64, omp_num_threads="0")[0] == 63
    assert choose_threads(0, 1, cores=64, omp_num_threads="four")[0] == 63


def test_usable_cores_follow_the_affinity_mask(machine):
    machine(cores=3)
    assert usable_cores() == 3


def test_usable_cores_are_capped_by_the_cgroup_quota(machine):
    machine(cores=8, quota=2)
    assert usable_cores() == 2


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 cores of quota: 2 threads can use it
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert runner._cgroup_quota(tmp_path) == expected


def test_apply_threads_sets_pytorch_and_reads_torchrun_local_ranks(machine, monkeypatch, torch_threads):
    machine(cores=6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    threads, why = apply_threads(fake_run(workers=1))
    assert (threads, torch.get_num_threads()) == (2, 2)
    assert why.startswith("auto: 6 usable cores / 2 local ranks")


def test_recipes_leave_threads_to_auto():
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        data = tomllib.loads(path.read_text())
        tables = [data.get("run", {})] + [p.get("run", {}) for p in data.get("profile", {}).values()]
        assert all("threads" not in t for t in tables), f"{path.name} hard-codes [run].threads"


def test_run_start_line_names_threads_and_workers(tmp_path, registry, machine, capsys, torch_threads):
    from toyrecipes import TOY_MODEL

    machine(cores=2)
    recipe = tmp_path / "toy.toml"
    recipe.write_text(
        '[run]\nname = "toy"\n\n[loader]\nclip_seconds = 0.25\nprobe_items = 0\n\n[data]\ntype = "toy-tones"\nn_items = 8\n'
        + TOY_MODEL
        + '\n[trainer]\nmax_steps = 1\nbatch_size = 4\ncheckpoint_every = 0\nprecision = "fp32"\n'
    )
    train(recipe, overrides=[f'run.output_dir="{tmp_path / "runs"}"'], registry=registry)
    lines = capsys.readouterr().out.splitlines()
    assert "threads: 2 (auto: 2 usable cores - 0 loader workers); loader workers: 0" in lines
