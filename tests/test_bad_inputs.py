"""Bad input never stops a run: broken files are skipped, listed once, and batches refilled."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch

from mtrun.data.loader import BatchLoader
from mtrun.data.sources.manifest import ManifestSource
from mtrun.errors import MtrunError
from mtrun.run import LoaderConfig
from mtrun.runner import train
from toyrecipes import TOY_MODEL

RATE = 8000
BROKEN = {
    "missing": "missing",
    "truncated": "truncated",
    "zero-length": "zero-length",
    "silent": "silent",
    "not-audio": "not-audio",
    "nan": "non-finite",
}


def write_good(path, i):
    t = np.arange(RATE // 2) / RATE
    soundfile.write(path, (0.4 * np.sin(2 * np.pi * (220 + 40 * (i % 4)) * t)).astype("float32"), RATE)


def write_broken(audio, name):
    """One deliberately broken file of each kind; returns its file name."""
    if name == "missing":
        return "missing.wav"  # listed in the manifest, never written
    if name == "truncated":
        write_good(audio / "full.wav", 0)
        data = (audio / "full.wav").read_bytes()
        (audio / "truncated.wav").write_bytes(data[: len(data) // 2])
        (audio / "full.wav").unlink()
        return "truncated.wav"
    if name == "zero-length":
        (audio / "empty.flac").write_bytes(b"")
        return "empty.flac"
    if name == "silent":
        soundfile.write(audio / "silent.wav", np.zeros(RATE // 2, dtype="float32"), RATE)
        return "silent.wav"
    if name == "not-audio":
        (audio / "notes.mp3").write_text("these are liner notes, not audio\n" * 30)
        return "notes.mp3"
    if name == "nan":
        data = np.full(RATE // 2, 0.1, dtype="float32")
        data[100:200] = np.nan
        soundfile.write(audio / "nan.wav", data, RATE, subtype="FLOAT")
        return "nan.wav"
    raise AssertionError(name)


def broken_dataset(root, n_good=30, broken=tuple(BROKEN)):
    """A manifest of ``n_good`` tones with the broken files mixed in; returns (path, bad ids → file)."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    rows, bad = [], {}
    names = [f"good{i}" for i in range(n_good)] + [f"bad-{b}" for b in broken]
    order = np.random.default_rng(0).permutation(len(names))
    for k in order:
        item = names[k]
        if item.startswith("good"):
            i = int(item[4:])
            write_good(audio / f"{item}.wav", i)
            file = f"{item}.wav"
        else:
            file = write_broken(audio, item[4:])
            bad[item] = file
        rows.append({"id": item, "audio": f"audio/{file}", "captions": [f"caption of {item}"], "tags": {"genre": ["x"]}, "split": "train"})
    rows += [{"id": f"val{i}", "audio": f"audio/good{i}.wav", "captions": ["val"], "split": "val"} for i in range(4)]
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, bad


RECIPE = """
[run]
name = "bad"

[loader]
clip_seconds = 0.25
max_bad_fraction = 0.3

[data]
type = "manifest"
""" + TOY_MODEL + """
[trainer]
batch_size = 4
max_steps = 18
log_every = 1
checkpoint_every = 4
"""


def read_skipped(run_dir):
    return [json.loads(line) for line in (run_dir / "skipped.jsonl").read_text().splitlines()]


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(RECIPE)
    return path


def test_training_completes_and_lists_exactly_the_broken_files(tmp_path, recipe, registry):
    manifest, bad = broken_dataset(tmp_path / "data")
    runs = tmp_path / "runs"
    # No probe, two workers: the bad files are met during training, in worker processes,
    # over two epochs (18 steps of 4 from 36 items).
    overrides = [f'run.output_dir="{runs}"', f'data.path="{manifest}"', "loader.probe_items=0", "loader.num_workers=2"]
    metrics = train(recipe, overrides=overrides, registry=registry)
    assert metrics["step"] == 18
    records = read_skipped(runs / "bad")
    assert sorted(r["id"] for r in records) == sorted(bad)  # each listed once, nothing else
    for r in records:
        kind = r["id"].removeprefix("bad-")
        assert r["kind"] == BROKEN[kind]
        assert r["path"].endswith(bad[r["id"]])
        assert bad[r["id"]] in r["reason"] and r["reason"]
    losses = [json.loads(line) for line in (runs / "bad" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["loss"]) for x in losses if "loss" in x)


def test_a_resumed_run_follows_the_same_trajectory_and_lists_nothing_twice(tmp_path, recipe, registry):
    import shutil

    manifest, bad = broken_dataset(tmp_path / "data")
    runs = tmp_path / "runs"
    base = [f'run.output_dir="{runs}"', f'data.path="{manifest}"', "loader.probe_items=0", "trainer.keep_last=10"]
    train(recipe, overrides=base + ['run.name="whole"'], registry=registry)
    # Resume a copy of the run from its step-8 checkpoint, knowing every bad file from the
    # start (the whole run's list): knowing more must not change the batches.
    (runs / "resumed").mkdir()
    shutil.copy(runs / "whole" / "skipped.jsonl", runs / "resumed" / "skipped.jsonl")
    checkpoint = runs / "whole" / "checkpoints" / "step-000008"
    train(recipe, overrides=base + ['run.name="resumed"', f'run.resume="{checkpoint}"'], registry=registry)

    def losses(name):
        lines = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        return {x["step"]: x["loss"] for x in lines if "loss" in x}

    whole, resumed = losses("whole"), losses("resumed")
    assert sorted(resumed) == list(range(9, 19))
    assert all(whole[s] == resumed[s] for s in resumed)
    ids = [r["id"] for r in read_skipped(runs / "resumed")]
    assert len(ids) == len(set(ids)) and set(ids) == set(bad)


def make_loader(samples, run_dir, **config):
    from mtrun_testkit import HashTokenizer

    return BatchLoader(
        samples,
        config=LoaderConfig(clip_seconds=0.25, **{"max_bad_fraction": 0.3, **config}),
        sample_rate=RATE,
        tokenize=HashTokenizer(64, 8),
        batch_size=4,
        seed=1,
        run_dir=run_dir,
    )


def test_refills_keep_batches_full_and_do_not_depend_on_what_was_known(tmp_path):
    manifest, bad = broken_dataset(tmp_path / "data")
    samples = ManifestSource(ManifestSource.Config(path=str(manifest))).load("train")
    discovering = make_loader(samples, tmp_path / "a", probe_items=0)
    knowing = make_loader(samples, tmp_path / "b", probe_items=len(samples))  # a census finds them all
    assert set(knowing.skipped) == set(bad) and not discovering.skipped
    for epoch in (0, 1):
        for (b1, _, x), (b2, _, y) in zip(discovering.micro_batches(epoch), knowing.micro_batches(epoch)):
            assert b1 == b2 and x["ids"] == y["ids"] and torch.equal(x["waveforms"], y["waveforms"])
            assert len(x["ids"]) == 4 and len(set(x["ids"])) == 4
            assert not set(x["ids"]) & set(bad)
    assert set(discovering.skipped) == set(bad)


def test_evaluation_drops_bad_items_instead_of_repeating_good_ones(tmp_path):
    manifest, bad = broken_dataset(tmp_path / "data", n_good=5)
    samples = ManifestSource(ManifestSource.Config(path=str(manifest))).load("train")
    loader = make_loader(samples, None, probe_items=0, max_bad_fraction=1.0)
    loader.training = False
    ids = [i for batch in loader for i in batch["ids"]]
    assert sorted(ids) == sorted(f"good{i}" for i in range(5))


def test_a_mostly_broken_dataset_fails_early_with_a_clear_message(tmp_path, recipe, registry):
    manifest, _ = broken_dataset(tmp_path / "data")
    runs = tmp_path / "runs"
    wrong_root = [f'run.output_dir="{runs}"', f'data.path="{manifest}"', 'data.audio_root="/nonexistent"']
    with pytest.raises(MtrunError, match=r"of 36 items probed \(the whole split\).*36 missing.*max_bad_fraction = 0.3.*audio_root"):
        train(recipe, overrides=wrong_root, registry=registry)
    # Above the fraction but met only during training: stops as soon as the count proves it
    # (the 4th bad item: 4/36 > 0.1), without waiting for the rest.
    with pytest.raises(MtrunError, match=r"4 of 36 items of split 'train' are unusable, more than \[loader\].max_bad_fraction = 0.1"):
        train(recipe, overrides=[f'run.output_dir="{runs}"', 'run.name="late"', f'data.path="{manifest}"',
                                 "loader.probe_items=0", "loader.max_bad_fraction=0.1", "trainer.max_steps=40"], registry=registry)


def test_the_probe_tolerates_a_few_bad_draws_from_a_large_split(tmp_path):
    manifest, _ = broken_dataset(tmp_path / "data", n_good=30, broken=("nan", "silent"))
    samples = ManifestSource(ManifestSource.Config(path=str(manifest))).load("train")
    # 2 bad of 10 probed is 20% > 10%, but a sample of 10 cannot show it at 99% confidence.
    loader = make_loader(samples, None, probe_items=10, max_bad_fraction=0.1)
    assert loader.num_batches == 8
