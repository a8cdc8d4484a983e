"""Device names: refused at validation when they are not devices, and a clear error for a CUDA
device the machine lacks (these were RuntimeError tracebacks from torch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtrun.cli import main
from mtrun.devices import check_device_name, pick_device
from mtrun.errors import MtrunError


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_names_mtrun_runs_on_pass(name):
    check_device_name(name)


@pytest.mark.parametrize("name", ["gpu", "cuda0", "CPU", "cuda:", "cuda:x", "", "mps "])
def test_other_names_are_refused_listing_the_valid_ones(name):
    with pytest.raises(ValueError, match=r"is not a device; use 'auto' \(CUDA when available\), 'cpu', 'cuda' or 'cuda:N'"):
        check_device_name(name)


def test_a_recipe_with_a_bad_device_fails_validate_naming_the_key_and_override(capsys):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"
    assert main(["validate", str(recipe), 'run.device="gpu"']) == 2
    err = capsys.readouterr().err
    assert "[run].device: invalid value (got 'gpu'): 'gpu' is not a device" in err and "(from override run.device=\"gpu\")" in err


def test_pick_device_names_the_key_and_gives_torch_devices():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type == pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MtrunError, match=r"^--device: 'gpu' is not a device"):
        pick_device("gpu", key="--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_cuda_device_is_a_message_not_a_traceback():
    with pytest.raises(MtrunError, match=r"^r\.toml: \[run\]\.device = 'cuda': no CUDA device is available here \(torch .*\); use 'auto' or 'cpu'"):
        pick_device("cuda", key="r.toml: [run].device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_index_past_the_devices_is_refused():
    with pytest.raises(MtrunError, match=r"CUDA device\(s\), numbered from 0"):
        pick_device(f"cuda:{torch.cuda.device_count()}")
