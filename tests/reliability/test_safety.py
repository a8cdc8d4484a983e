"""Loading weights never runs code from the file, and no model hub code is trusted unasked.

A crafted pickle whose unpickling would call ``os.system`` is fed through the real loading
paths; each refuses it and the marker file the command would create never appears. The source
of core and every plugin is scanned so a new ``torch.load`` or ``trust_remote_code`` cannot slip
in unnoticed.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from mtrun import MtrunError, read_state_dict

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "core" / "src").rglob("*.py"), *ROOT.glob("plugins/*/src/**/*.py")])


class RunsCode:
    """Unpickling this calls ``os.system`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def crafted(path: Path, marker: Path) -> Path:
    """A checkpoint whose weights dict also holds the code-running object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"weight": torch.zeros(2), "payload": RunsCode(marker)}}, path)
    return path


def test_the_crafted_file_would_run_code_without_weights_only(tmp_path):
    """The control: the payload is real, so the refusals below mean something."""
    marker = tmp_path / "pwned"
    path = crafted(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["evil.pt", "evil.pth", "evil.bin", "folder/pytorch_model.bin"])
def test_read_state_dict_refuses_a_pickle_that_runs_code(tmp_path, name):
    marker = tmp_path / "pwned"
    path = crafted(tmp_path / name, marker)
    target = path.parent if name.startswith("folder/") else path
    with pytest.raises(MtrunError, match=r"weights_only=True"):
        read_state_dict(target, what="test")
    assert not marker.exists()


def test_a_plugins_pretrained_checkpoint_that_runs_code_is_refused(tmp_path):
    mavil = pytest.importorskip("mtrun_mavil.encoder")
    marker = tmp_path / "pwned"
    path = crafted(tmp_path / "pretrained.pth", marker)
    with pytest.raises(MtrunError, match=r"weights_only=True"):
        mavil.MavilEncoder(mavil.MavilEncoder.Config(preset="tiny", pretrained=str(path)))
    assert not marker.exists()


def _calls(source: str, name: str) -> list[str]:
    """The argument text of every call to ``name`` (balanced parentheses)."""
    found = []
    for match in re.finditer(re.escape(name) + r"\s*\(", source):
        depth, i = 1, match.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        found.append(source[match.end() : i - 1])
    return found


def test_every_torch_load_in_core_and_plugins_passes_weights_only_true():
    assert len(SOURCES) > 20, "the scan found too few files to mean anything"
    calls = {str(p.relative_to(ROOT)): _calls(p.read_text(encoding="utf-8"), "torch.load") for p in SOURCES}
    unsafe = {path: args for path, found in calls.items() for args in found if not re.search(r"\bweights_only\s*=\s*True\b", args)}
    assert unsafe == {}
    assert any(calls.values()), "no torch.load found: the scan is looking in the wrong place"
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"weights_only\s*=\s*False", text), path
        assert not re.search(r"\bpickle\.loads?\s*\(\s*(open|f\b|path|file)", text), path


def test_trust_remote_code_is_never_switched_on_by_the_source():
    """Only False, or a value read from the recipe's config, may be passed."""
    offenders = []
    for path in SOURCES:
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())
        for match in re.finditer(r"""["']?trust_remote_code["']?\s*[=:]\s*([^,)\n]+)""", code):
            value = match.group(1).strip()
            if value != "False" and "config" not in value:
                offenders.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
    assert offenders == []


def test_hf_text_asks_transformers_for_no_remote_code(monkeypatch):
    loading = pytest.importorskip("mtrun_hf_text.loading")
    import transformers

    seen: dict = {}

    def record(source, **kwargs):
        seen.update(kwargs, source=source)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(record))
    with pytest.raises(MtrunError, match="stop here"):
        loading.load_tokenizer("some/model", plugin="hf-text", tiny="")
    assert seen["source"] == "some/model" and seen.get("trust_remote_code") is False
