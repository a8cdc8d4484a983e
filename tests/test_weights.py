"""``mtrun.weights``: safe state-dict reading and key-for-key loading with one clear report."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mtrun.errors import MtrunError
from mtrun.weights import LoadReport, load_matching, read_state_dict, strip_prefixes


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _state(seed: int = 1) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _model(seed).state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- read_state_dict


def test_reads_safetensors_and_torch_files_unwrapping_training_wrappers(tmp_path):
    state = _state()
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"model": state, "epoch": 3, "args": "x"}, tmp_path / "wrapped.pth")
    torch.save({"state_dict": state, "epoch": 45}, tmp_path / "laion.pt")
    for name in ("w.safetensors", "plain.pt", "wrapped.pth", "laion.pt"):
        assert _same(read_state_dict(tmp_path / name), state), name
    assert _same(read_state_dict(str(tmp_path / "plain.pt")), state)


def test_reads_save_pretrained_folders_single_and_sharded(tmp_path):
    state = _state()
    (tmp_path / "single").mkdir()
    save_file(state, str(tmp_path / "single" / "model.safetensors"))
    assert _same(read_state_dict(tmp_path / "single"), state)

    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    assert _same(read_state_dict(tmp_path / "bin"), state)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(sharded / name))
    weight_map = {k: name for name, part in halves.items() for k in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert _same(read_state_dict(sharded), state)


def test_unsafe_odd_or_absent_checkpoints_are_refused(tmp_path):
    torch.save({"model": {"x": object()}}, tmp_path / "evil.pth")
    with pytest.raises(MtrunError, match=r"my-plugin: cannot read .*weights_only=True"):
        read_state_dict(tmp_path / "evil.pth", what="my-plugin")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "odd.pt")
    with pytest.raises(MtrunError, match="state dict of tensors"):
        read_state_dict(tmp_path / "odd.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MtrunError, match="no model.safetensors or pytorch_model.bin"):
        read_state_dict(tmp_path / "empty")
    with pytest.raises(MtrunError, match="no such checkpoint file"):
        read_state_dict(tmp_path / "nope.pt")


def test_strip_prefixes_repeats_and_refuses_collisions():
    state = {"module.model.a": 1, "model.b": 2, "c": 3, "cmodule.d": 4}
    assert strip_prefixes(state, ("module.", "model.")) == {"a": 1, "b": 2, "c": 3, "cmodule.d": 4}
    with pytest.raises(MtrunError, match="'a'"):
        strip_prefixes({"module.a": 1, "a": 2}, ("module.",))


# ----------------------------------------------------------------------------- load_matching


def test_exact_load_copies_every_tensor_and_reports_the_count():
    model, state = _model(0), _state(1)
    report = load_matching(model, state)
    assert report == LoadReport(matched=len(state))
    assert _same(model.state_dict(), state)


def test_rename_ignore_and_optional_keys_are_reported():
    model, state = _model(0), _state(1)
    before = model.state_dict()["0.bias"].clone()
    checkpoint = {("net." + k if k.startswith("2.") else k): v for k, v in state.items() if k != "0.bias"}
    checkpoint["fc_norm.weight"] = state["1.weight"]
    del checkpoint["1.weight"]
    checkpoint.update({"decoder.x": torch.zeros(5), "head.weight": torch.zeros(2, 2)})

    def rename(key: str) -> str:
        return "1.weight" if key == "fc_norm.weight" else key.removeprefix("net.")

    report = load_matching(
        model, checkpoint, rename=rename, ignore=[r"decoder\.", re.compile(r"head\.")], optional=["0.bias"]
    )
    # A mapping works as well as a function; keys absent from it stay as they are.
    mapping = {k: rename(k) for k in checkpoint if k.startswith(("net.", "fc_norm."))}
    again = load_matching(_model(0), checkpoint, rename=mapping, ignore=r"decoder\.|head\.", optional=["0.bias"])
    assert report == again
    assert report.ignored == ("decoder.x", "head.weight")
    assert report.kept == ("0.bias",) and report.matched == len(state) - 1
    assert set(report.renamed) == {("net.2.weight", "2.weight"), ("net.2.bias", "2.bias"), ("fc_norm.weight", "1.weight")}
    loaded = model.state_dict()
    assert torch.equal(loaded["0.bias"], before) and torch.equal(loaded["2.weight"], state["2.weight"])


def test_every_problem_is_listed_at_once_and_the_module_is_untouched():
    model, state = _model(0), _state(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(state)
    del bad["2.bias"]
    bad["extra.weight"] = torch.zeros(1)
    bad["0.weight"] = torch.zeros(7, 3)
    bad.update({f"noise.{i}": torch.zeros(1) for i in range(25)})
    with pytest.raises(MtrunError) as err:
        load_matching(model, bad, what="pretrained='x.pt'", hint=" (check the preset)")
    message = str(err.value)
    assert message.startswith("pretrained='x.pt': the checkpoint does not match the model (check the preset)")
    assert "missing from the checkpoint (1):\n    2.bias" in message
    assert "unexpected in the checkpoint (26):" in message and "extra.weight" in message and "... and 6 more" in message
    assert "shape mismatches (1):\n    0.weight: checkpoint (7, 3) vs model (4, 3)" in message
    assert _same(model.state_dict(), before)


def test_an_ignore_pattern_never_hides_a_module_key_and_renames_may_not_collide():
    model, state = _model(0), _state(1)
    # "0.weight" matches the pattern but is a module key, so it loads.
    assert load_matching(model, state, ignore=r"0\.").ignored == ()
    with pytest.raises(MtrunError, match=r"given twice .*\n    0\.weight"):
        load_matching(model, {**state, "copy": state["0.weight"]}, rename={"copy": "0.weight"})
