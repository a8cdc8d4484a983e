"""Console output names files in one piece, whatever terminal (or none) runs mtrun."""

from __future__ import annotations

import io

import pytest

from mtrun.console import make_console


@pytest.mark.parametrize("columns", [None, "40", "80"])
def test_lines_are_not_wrapped_when_the_output_is_not_a_terminal(monkeypatch, columns):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    stream = io.StringIO()
    path = "/data/" + "very-long-folder-name/" * 8 + "clip.wav"
    make_console(file=stream).print(f"  item-7: audio file {path!r}: not audio (unreadable)")
    assert stream.getvalue() == f"  item-7: audio file {path!r}: not audio (unreadable)\n"


def test_a_terminal_still_gets_wrapped_output(monkeypatch):
    """On a terminal rich's own width applies: only non-terminal output is left unwrapped."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("COLUMNS", "40")
    console = make_console(file=Terminal())
    assert console.width == 40 and not console.soft_wrap


def test_shard_errors_name_the_file_in_one_line_in_a_narrow_terminal(tmp_path, capsys, monkeypatch):
    """The defect from a plain 80-column shell: the path and 'not audio' were split across lines."""
    from test_shards import make_manifest

    from mtrun.cli import main

    monkeypatch.setenv("COLUMNS", "40")
    manifest = make_manifest(tmp_path)
    assert main(["data", "shard", str(manifest), str(tmp_path / "shards")]) == 0
    lines = capsys.readouterr().err.splitlines()
    (reported,) = [line for line in lines if "b2" in line]
    assert str(tmp_path / "audio") in reported and "not audio" in reported
