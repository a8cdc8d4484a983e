"""WebDataset shards: manifest -> `mtrun data shard` -> samples equal to the manifest's."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import soundfile
import torch

from mtrun.cli import main
from mtrun.data.audio import load_waveform
from mtrun.data.sources.manifest import ManifestSource
from mtrun.data.sources.shards import WebDatasetSource
from mtrun.errors import MtrunError
from toyrecipes import TOY_MODEL


def make_manifest(tmp_path, n=7, broken=("b2",)):
    audio = tmp_path / "audio"
    audio.mkdir()
    lines = []
    for i in range(n):
        item = f"b{i}" if f"b{i}" in broken else f"item{i}"
        split = "train" if i < 5 else "test"
        name = f"{item}.flac" if i % 2 else f"{item}.wav"
        if item in broken:
            (audio / name).write_bytes(b"definitely not audio")
        else:
            rate = 8000 if i % 2 else 16000
            t = np.arange(rate // 2) / rate
            soundfile.write(audio / name, (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype("float32"), rate)
        tags = json.dumps({"genre": [f"g{i % 3}"], "mood": ["calm"]}).replace('"', '""')
        lines.append(f'{item},audio/{name},caption {i} one|caption {i} two,"{tags}",{split},grp{i // 2},CC-BY')
    path = tmp_path / "manifest.csv"
    path.write_text("id,audio,caption,tags,split,group,licence\n" + "\n".join(lines) + "\n")
    return path


def test_manifest_round_trips_through_shards(tmp_path, capsys):
    manifest = make_manifest(tmp_path)
    out = tmp_path / "shards"
    assert main(["data", "shard", str(manifest), str(out), "--shard-size", "2"]) == 0
    printed = capsys.readouterr()
    assert "b2" in printed.err and "not audio" in printed.err  # the broken file is reported
    index = json.loads((out / "index.json").read_text())
    assert index["splits"]["train"] == {"shards": ["train-000000.tar", "train-000001.tar"], "count": 4}
    assert [e["id"] for e in index["excluded"]] == ["b2"]

    original = ManifestSource(ManifestSource.Config(path=str(manifest)))
    shards = WebDatasetSource(WebDatasetSource.Config(path=str(out)))
    assert sorted(shards.splits()) == ["test", "train"]
    for split in ("train", "test"):
        expected = [s for s in original.load(split) if s.id != "b2"]
        got = list(shards.load(split))
        assert [s.id for s in got] == [s.id for s in expected]
        for a, b in zip(got, expected):
            assert (a.captions, a.tags, a.group, a.extra) == (b.captions, b.tags, b.group, b.extra)
            assert torch.equal(load_waveform(a, 8000), load_waveform(b, 8000))  # bytes stored as they were


def test_split_patterns_and_streaming_read_the_same_items(tmp_path):
    manifest = make_manifest(tmp_path, broken=())
    out = tmp_path / "shards"
    assert main(["data", "shard", str(manifest), str(out), "--shard-size", "2"]) == 0
    by_pattern = WebDatasetSource(WebDatasetSource.Config(splits={"train": str(out / "train-{000000..000002}.tar"), "test": str(out / "test-*.tar")}))
    by_index = WebDatasetSource(WebDatasetSource.Config(path=str(out)))
    assert [s.id for s in by_pattern.load("train")] == [s.id for s in by_index.load("train")] == [f"item{i}" for i in range(5)]
    streamed = list(by_index.stream("train"))
    assert [s.id for s in streamed] == [f"item{i}" for i in range(5)]
    for s, m in zip(streamed, by_index.load("train")):
        assert torch.equal(load_waveform(s, 8000), load_waveform(m, 8000))
        assert (s.captions, s.tags, s.group, s.extra) == (m.captions, m.tags, m.group, m.extra)
    with pytest.raises(MtrunError, match="no split 'tets'"):
        next(by_index.stream("tets"))


def test_shards_are_not_rewritten_over_an_earlier_run_without_force(tmp_path, capsys):
    manifest = make_manifest(tmp_path, broken=())
    out = tmp_path / "shards"
    assert main(["data", "shard", str(manifest), str(out), "--shard-size", "2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["data", "shard", str(manifest), str(out), "--shard-size", "3"]) == 1
    assert "already holds shards" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    assert main(["data", "shard", str(manifest), str(out), "--shard-size", "3", "--force"]) == 0
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]  # 5 items by 3
    assert [s.id for s in WebDatasetSource(WebDatasetSource.Config(path=str(out))).load("train")] == [f"item{i}" for i in range(5)]


def test_a_damaged_shard_index_is_a_clear_error(tmp_path):
    manifest = make_manifest(tmp_path, broken=())
    out = tmp_path / "shards"
    assert main(["data", "shard", str(manifest), str(out), "--shard-size", "2"]) == 0
    for damage in ('{"splits": {"train": ', '{"version": 1}'):  # cut short by a crash; not an index
        (out / "index.json").write_text(damage)
        with pytest.raises(MtrunError, match="index.json is not a valid shard index"):
            WebDatasetSource(WebDatasetSource.Config(path=str(out))).splits()


def test_shards_are_plain_webdataset_tars_written_deterministically(tmp_path):
    manifest = make_manifest(tmp_path, broken=())
    main(["data", "shard", str(manifest), str(tmp_path / "one")])
    main(["data", "shard", str(manifest), str(tmp_path / "two")])
    first = (tmp_path / "one" / "train-000000.tar").read_bytes()
    assert first == (tmp_path / "two" / "train-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "one" / "train-000000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["s000000000.wav", "s000000000.json"] and len(names) == 10


def test_training_reads_shards(tmp_path, registry):
    from mtrun.runner import train

    manifest = make_manifest(tmp_path, n=10, broken=())
    out = tmp_path / "shards"
    main(["data", "shard", str(manifest), str(out)])
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(shards=out, runs=tmp_path / "runs"))
    metrics = train(recipe, registry=registry)
    assert metrics["step"] == 2


RECIPE = """
[run]
name = "shards"
output_dir = "{runs}"

[loader]
clip_seconds = 0.25

[data]
type = "webdataset"
path = "{shards}"
""" + TOY_MODEL + """
[trainer]
max_steps = 2
batch_size = 2
val_split = "test"
"""
