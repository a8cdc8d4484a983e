"""Decode once: the waveform cache and span reads give the clips they promise, build once, and
never stop training."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

import mtrun.data.waveform_cache as waveform_cache
from mtrun.data import audio
from mtrun.data.audio import crop_offset, decode, open_span, resample, to_mono
from mtrun.data.loader import BatchLoader
from mtrun.data.waveform_cache import WaveformCache
from mtrun.interfaces import Sample
from audiofiles import write_aac
from mtrun.run import LoaderConfig
from mtrun.train.rng import derive_seed
from toyrecipes import TOY_MODEL

RATE = 8000  # the toy encoder's


def tokenize(texts):
    ids = torch.tensor([[len(t)] for t in texts], dtype=torch.long).reshape(len(texts), 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own MTRUN_CACHE."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MTRUN_CACHE", str(folder))
    return folder


def write_chords(folder, n=12, seconds=0.6):
    """``n`` files at mixed rates (16 k, 22.05 k, 8 k), WAV and FLAC, mono and stereo."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        rate = (16000, 22050, 8000)[i % 3]
        t = np.arange(int(rate * seconds)) / rate
        data = 0.3 * np.sin(2 * np.pi * (200 + 30 * i) * t) + 0.01 * rng.standard_normal(len(t))
        if i % 4 == 1:
            data = np.stack([data, 0.5 * data[::-1]], axis=1)
        path = folder / f"c{i}.{'flac' if i % 2 else 'wav'}"
        soundfile.write(path, data.astype("float32"), rate)
        samples.append(Sample(id=f"c{i}", audio=str(path), captions=[f"chord {i}"]))
    return samples


def make(samples, run_dir=None, **config):
    return BatchLoader(
        samples,
        config=LoaderConfig(clip_seconds=0.25, **{"probe_items": 0, **config}),
        sample_rate=RATE,
        tokenize=tokenize,
        batch_size=4,
        seed=5,
        run_dir=run_dir,
    )


def batches(loader, epoch=0, start=0):
    return [batch for _, _, batch in loader.micro_batches(epoch, start)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["ids"] == y["ids"]
        assert torch.equal(x["waveforms"], y["waveforms"])


class CountingDecode:
    """Wraps the cache's ``decode`` and counts the files it decodes."""

    def __init__(self, monkeypatch):
        self.calls = 0
        monkeypatch.setattr(waveform_cache, "decode", self)

    def __call__(self, audio):
        self.calls += 1
        return decode(audio)


def test_a_cached_clip_equals_decode_mix_resample_then_crop(tmp_path):
    samples = write_chords(tmp_path / "audio")
    loader = make(samples, cache="waveforms")
    for epoch in (0, 1):
        for b, batch in enumerate(batches(loader, epoch)):
            for row, sample_id in enumerate(batch["ids"]):
                index = next(i for i, s in enumerate(samples) if s.id == sample_id)
                wave, rate = decode(samples[index].audio)
                whole = resample(to_mono(wave), rate, RATE)
                gen = torch.Generator().manual_seed(derive_seed(5, "crop", epoch, index))
                offset = crop_offset(whole.shape[-1], 2000, "random", gen)
                assert torch.equal(batch["waveforms"][row], whole[offset : offset + 2000]), (epoch, b, sample_id)


def test_the_second_build_decodes_nothing_and_prints_nothing(tmp_path, monkeypatch, capfd):
    samples = write_chords(tmp_path / "audio")
    decodes = CountingDecode(monkeypatch)
    first = batches(make(samples, cache="waveforms"))
    assert decodes.calls == len(samples)
    assert "12/12" in capfd.readouterr().err  # the progress bar, drawn once without a terminal
    second = batches(make(samples, cache="waveforms"))
    assert decodes.calls == len(samples)
    assert "waveform cache" not in capfd.readouterr().err
    assert_same(first, second)


def test_the_build_shows_progress_without_a_terminal_or_columns(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("COLUMNS", raising=False)
    samples = write_chords(tmp_path / "audio", n=5)
    make(samples, cache="waveforms")
    err = capfd.readouterr().err
    assert "waveform cache: decoding 5 files once" in err and str(waveform_cache.cache_root()) in err
    assert "5/5" in err


def test_the_key_changes_with_the_sample_rate_the_file_and_the_format(tmp_path, monkeypatch):
    path = tmp_path / "a.wav"
    soundfile.write(path, np.full(800, 0.25, dtype="float32"), 8000)
    key = WaveformCache(8000).key(str(path))
    assert WaveformCache(8000).key(str(path)) == key  # stable
    assert WaveformCache(16000).key(str(path)) != key
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    touched = WaveformCache(8000).key(str(path))
    assert touched != key
    monkeypatch.setattr(waveform_cache, "FORMAT_VERSION", waveform_cache.FORMAT_VERSION + 1)
    assert WaveformCache(8000).key(str(path)) not in (key, touched)
    assert WaveformCache(8000).key(torch.zeros(10)) is None  # in-memory audio is not cached


def test_a_rewritten_file_is_decoded_again_and_its_new_audio_used(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, np.full(4000, 0.25, dtype="float32"), RATE)
    samples = [Sample(id=f"s{i}", audio=str(path), captions=["x"]) for i in range(4)]
    assert float(batches(make(samples, cache="waveforms"))[0]["waveforms"].mean()) == pytest.approx(0.25)
    soundfile.write(path, np.full(4000, -0.5, dtype="float32"), RATE)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert float(batches(make(samples, cache="waveforms"))[0]["waveforms"].mean()) == pytest.approx(-0.5)
    assert len(list(waveform_cache.cache_root().rglob("*.npy"))) == 2  # the old entry is not read again


def test_audio_held_in_memory_is_not_cached(tmp_path, cache_dir):
    t = torch.arange(4000) / RATE
    samples = [Sample(id=f"t{i}", audio=torch.sin(2 * torch.pi * (200 + i) * t), sample_rate=RATE, captions=["x"]) for i in range(8)]
    assert_same(batches(make(samples, cache="waveforms")), batches(make(samples)))
    assert not list(cache_dir.rglob("*.npy"))


_BUILD_IN_CHILD = """
import json, sys
from mtrun.data.waveform_cache import WaveformCache
folder, rate, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
report = WaveformCache(rate, folder=folder).build(paths)
print(json.dumps([report.built, report.present, report.failed]))
"""


def test_concurrent_builders_end_with_complete_identical_entries(tmp_path):
    samples = write_chords(tmp_path / "audio", n=9, seconds=2.0)
    paths = [str(s.audio) for s in samples]
    folder = tmp_path / "shared"
    # Separate interpreters, as separate runs are: a fork of this process could inherit
    # torch's thread pool mid-use and hang.
    children = [
        subprocess.Popen([sys.executable, "-c", _BUILD_IN_CHILD, str(folder), str(RATE), *paths], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(failed is None for _, _, failed in results)
    assert all(built + present == len(paths) for built, present, _ in results)  # each saw every entry
    assert not list(folder.rglob(".*.tmp-*"))  # no temporary file left behind
    cache = WaveformCache(RATE, folder=folder)
    for path in paths:
        wave, rate = decode(path)
        expected = resample(to_mono(wave), rate, RATE).numpy()
        entry = cache.lookup(path)
        assert np.array_equal(np.load(entry.path, mmap_mode="r"), expected)  # a memory-mappable .npy
        assert np.array_equal(entry.read(100, 500), expected[100:600])


def test_stale_temporary_files_of_dead_builders_are_removed(tmp_path):
    samples = write_chords(tmp_path / "audio", n=3)
    cache = WaveformCache(RATE)
    stale = cache.folder / "ab" / ".abcdef.npy.tmp-999999999"  # no such process
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half an entry")
    make(samples, cache="waveforms")
    assert not stale.exists()


def disk_full(path, write):
    """``write_atomic`` on a full disk."""
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_warns_once_naming_the_folder_and_the_loader_reads_the_files(tmp_path, monkeypatch, caplog):
    samples = write_chords(tmp_path / "audio")
    monkeypatch.setattr(waveform_cache, "write_atomic", disk_full)
    with caplog.at_level(logging.WARNING, logger="mtrun.data"):
        loader = make(samples, cache="waveforms")
        make(samples, cache="waveforms")  # the validation loader of the same run: no second warning
    warnings = [r.getMessage() for r in caplog.records if "waveform cache" in r.getMessage()]
    assert len(warnings) == 1
    assert str(waveform_cache.cache_root() / "waveforms") in warnings[0] and "No space left" in warnings[0]
    assert_same(batches(loader), batches(make(samples)))  # uncached, whole-file reads, as configured
    assert not list(waveform_cache.cache_root().rglob("*.npy"))


RECIPE = """
[run]
name = "cached"

[loader]
clip_seconds = 0.25
cache = "waveforms"

[data]
type = "manifest"
""" + TOY_MODEL + """
[trainer]
batch_size = 4
max_steps = 8
log_every = 1
checkpoint_every = 4
keep_last = 5
"""


def manifest_of(samples, root):
    rows = [{"id": s.id, "audio": s.audio, "captions": s.captions, "split": "train"} for s in samples]
    rows += [{"id": f"v{i}", "audio": samples[i].audio, "captions": ["v"], "split": "val"} for i in range(4)]
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def test_training_goes_on_when_the_cache_folder_cannot_be_written(tmp_path, monkeypatch, registry, caplog):
    from mtrun.runner import train

    samples = write_chords(tmp_path / "audio", n=16)
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    monkeypatch.setattr(waveform_cache, "write_atomic", disk_full)
    with caplog.at_level(logging.WARNING, logger="mtrun.data"):
        metrics = train(recipe, overrides=[f'run.output_dir="{tmp_path / "runs"}"', f'data.path="{manifest_of(samples, tmp_path)}"'], registry=registry)
    assert metrics["step"] == 8
    assert any("could not be written" in r.getMessage() for r in caplog.records)


def test_a_resumed_run_with_the_cache_follows_the_same_trajectory(tmp_path, registry):
    from mtrun.runner import train

    samples = write_chords(tmp_path / "audio", n=16)
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    runs = tmp_path / "runs"
    base = [f'run.output_dir="{runs}"', f'data.path="{manifest_of(samples, tmp_path)}"']
    train(recipe, overrides=base + ['run.name="whole"'], registry=registry)
    checkpoint = runs / "whole" / "checkpoints" / "step-000004"
    train(recipe, overrides=base + ['run.name="resumed"', f'run.resume="{checkpoint}"'], registry=registry)
    whole, resumed = losses(runs / "whole"), losses(runs / "resumed")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(whole[s] == resumed[s] for s in resumed)


def test_resuming_at_a_batch_and_workers_give_the_cached_batches_exactly(tmp_path):
    samples = write_chords(tmp_path / "audio", n=16)
    loader = make(samples, cache="waveforms")
    full = batches(loader, 1)
    assert_same(batches(loader, 1, start=2), full[2:])
    assert_same(batches(make(samples, cache="waveforms", num_workers=2), 1), full)


def test_a_bad_file_gets_a_marker_not_an_entry_and_is_skipped_without_decoding_again(tmp_path, monkeypatch):
    samples = write_chords(tmp_path / "audio", n=11)
    silent = tmp_path / "audio" / "silent.wav"
    soundfile.write(silent, np.zeros(4000, dtype="float32"), RATE)
    samples.append(Sample(id="quiet", audio=str(silent), captions=["nothing"]))
    decodes = CountingDecode(monkeypatch)
    loader = make(samples, run_dir=tmp_path / "run", cache="waveforms", max_bad_fraction=0.5)
    cache = loader.waveform_cache
    key = cache.key(str(silent))
    assert cache.marker_path(key).is_file() and not cache.entry_path(key).exists()
    assert [r["kind"] for r in loader.skipped.values()] == ["silent"]  # listed by the build
    got = batches(loader)
    assert all("quiet" not in b["ids"] and len(b["ids"]) == 4 for b in got)  # refilled
    calls = decodes.calls
    again = make(samples, run_dir=tmp_path / "run2", cache="waveforms", max_bad_fraction=0.5)
    assert decodes.calls == calls  # the marker answers
    assert_same(batches(again), got)
    assert set(again.skipped) == {"quiet"}


def test_the_build_counts_bad_files_exactly_against_max_bad_fraction(tmp_path):
    from mtrun.errors import MtrunError

    samples = write_chords(tmp_path / "audio", n=6)
    for i in range(3):
        (tmp_path / "audio" / f"junk{i}.wav").write_text("not audio")
        samples.append(Sample(id=f"junk{i}", audio=str(tmp_path / "audio" / f"junk{i}.wav"), captions=["x"]))
    with pytest.raises(MtrunError, match=r"3 of 9 items .*max_bad_fraction = 0.1"):
        make(samples, cache="waveforms", max_bad_fraction=0.1)


@pytest.mark.parametrize("reader", ["libsndfile directly", "soundfile's read"])
@pytest.mark.parametrize(("fmt", "channels"), [("wav", 1), ("flac", 2), ("flac", 1), ("ogg", 1)])
def test_a_span_read_equals_the_same_span_of_a_full_decode(tmp_path, monkeypatch, fmt, channels, reader):
    rate = 22050
    rng = np.random.default_rng(1)
    data = (0.2 * rng.standard_normal((rate, channels))).astype("float32")
    path = tmp_path / f"x.{fmt}"
    soundfile.write(path, data, rate)
    whole, whole_rate = decode(str(path))
    with open_span(str(path)) as source:
        if reader == "soundfile's read":  # a soundfile release without the binding the span reader calls
            monkeypatch.setattr(audio, "_libsndfile_binding", lambda: None)
        else:  # the fast path is taken on the soundfile installed here
            assert audio._libsndfile_binding() is not None
        assert (source.rate, source.frames) == (whole_rate, whole.shape[-1])
        # The last span asks for more frames than the file has left: it gets what there is.
        for start, count in [(0, 100), (12345, 4000), (rate - 50, 50), (rate - 50, 200)]:
            got = source.read(start, count)
            assert got.dtype == torch.float32 and torch.equal(got, whole[:, start : start + count])


def test_span_reads_give_the_batches_of_whole_file_reads(tmp_path):
    samples = write_chords(tmp_path / "audio", n=16)
    for epoch in (0, 3):
        assert_same(batches(make(samples, read="span"), epoch), batches(make(samples, read="whole"), epoch))


def test_a_problem_in_part_of_a_file_is_judged_per_crop_and_not_remembered(tmp_path):
    """NaNs in the first 3/8 of a file: a crop that reaches them is refilled, others are used;
    what was found before (a census by the probe) changes nothing."""
    samples = write_chords(tmp_path / "audio", n=11)
    data = np.full(8000, 0.1, dtype="float32")
    data[:3000] = np.nan
    soundfile.write(tmp_path / "audio" / "nan.wav", data, RATE, subtype="FLOAT")
    samples.append(Sample(id="nan", audio=str(tmp_path / "audio" / "nan.wav"), captions=["x"]))
    discovering = make(samples, run_dir=tmp_path / "a", read="span", max_bad_fraction=0.5)
    knowing = make(samples, run_dir=tmp_path / "b", read="span", max_bad_fraction=0.5, probe_items=len(samples))
    assert knowing.skipped["nan"]["scope"] == "part"
    used = []
    for epoch in range(6):
        a, b = batches(discovering, epoch), batches(knowing, epoch)
        assert_same(a, b)
        assert all(torch.isfinite(x["waveforms"]).all() and len(x["ids"]) == 4 for x in a)
        used.append(any("nan" in x["ids"] for x in a))
    assert any(used) and not all(used)  # crops clear of the NaNs are used, the others refilled
    assert discovering.skipped["nan"]["scope"] == "part" and discovering.skipped["nan"]["kind"] == "non-finite"


def test_a_silent_crop_of_a_file_with_sound_is_used_and_a_silent_file_is_skipped(tmp_path):
    loud = np.zeros(16000, dtype="float32")
    loud[-800:] = 0.5  # silence, then a short burst at the end
    soundfile.write(tmp_path / "late.wav", loud, RATE)
    soundfile.write(tmp_path / "silent.wav", np.zeros(16000, dtype="float32"), RATE)
    samples = [Sample(id=f"late{i}", audio=str(tmp_path / "late.wav"), captions=["x"]) for i in range(4)]
    samples.append(Sample(id="silent", audio=str(tmp_path / "silent.wav"), captions=["x"]))
    loader = make(samples, run_dir=tmp_path / "run", read="span", max_bad_fraction=0.5)
    loader.training = False
    got = [i for b in loader for i in b["ids"]]
    assert got == [f"late{i}" for i in range(4)]
    assert loader.skipped["silent"]["kind"] == "silent" and "scope" not in loader.skipped["silent"]


def test_a_cache_cleared_mid_run_falls_back_to_reading_the_files(tmp_path, cache_dir):
    import shutil

    samples = write_chords(tmp_path / "audio")
    loader = make(samples, cache="waveforms")
    batches(loader, 0)  # entries read (and their headers remembered)
    shutil.rmtree(cache_dir)
    assert_same(batches(loader, 1), batches(make(samples), 1))


def test_a_damaged_entry_is_decoded_instead_and_the_next_build_makes_it_again(tmp_path, monkeypatch):
    samples = write_chords(tmp_path / "audio")
    loader = make(samples, cache="waveforms")
    before = batches(loader, 0)
    cache = loader.waveform_cache
    path = cache.entry_path(cache.key(samples[0].audio))
    path.write_bytes(path.read_bytes()[:-100])  # cut short under us (disk damage)
    fresh = make(samples, cache="waveforms")  # a new loader remembers no header: it reads this one
    assert fresh.waveform_cache.lookup(samples[0].audio) is None and not path.exists()
    counting = CountingDecode(monkeypatch)
    rebuilt = make(samples, cache="waveforms")  # the next run's build
    assert counting.calls == 1 and rebuilt.waveform_cache.lookup(samples[0].audio) is not None
    assert_same(batches(rebuilt, 0), before)  # the same clips as from the first build


def test_a_member_of_a_tar_shard_is_keyed_by_the_shard_and_its_byte_range(tmp_path):
    import io
    import tarfile

    from mtrun.data.sources.shards import TarMember

    buffers = []
    for i in range(2):
        buffer = io.BytesIO()
        soundfile.write(buffer, np.full(4000, 0.1 * (i + 1), dtype="float32"), RATE, format="WAV")
        buffers.append(buffer.getvalue())
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for i, data in enumerate(buffers):
            info = tarfile.TarInfo(f"{i}.wav")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as tar:
        members = [TarMember(str(shard), m.offset_data, m.size, m.name) for m in tar.getmembers()]
    cache = WaveformCache(RATE)
    assert cache.key(members[0]) != cache.key(members[1]) and None not in cache.keys_for(members)
    samples = [Sample(id=f"m{i}", audio=members[i % 2], captions=["x"]) for i in range(8)]
    cached = batches(make(samples, cache="waveforms"))
    assert len(list(waveform_cache.cache_root().rglob("*.npy"))) == 2
    assert_same(cached, batches(make(samples)))  # same rate: the cached crop is the file's crop


def test_span_reads_of_a_format_only_ffmpeg_reads_decode_it_whole_and_crop_as_before(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "a.m4a"
    t = np.arange(16000) / 16000
    data = (0.3 * np.sin(2 * np.pi * 440 * t)).astype("float32")
    write_aac(path, data, 16000)
    with open_span(str(path)) as source:
        assert source.whole is not None and torch.equal(source.whole, decode(str(path))[0])
    samples = [Sample(id=f"a{i}", audio=str(path), captions=["x"]) for i in range(4)]
    assert_same(batches(make(samples, read="span")), batches(make(samples, read="whole")))


@pytest.mark.parametrize("kind", ["missing", "zero-length", "not-audio", "truncated"])
def test_what_the_header_shows_is_a_verdict_on_the_whole_file_with_span_reads(tmp_path, kind):
    from mtrun.data.audio import AudioDecodeError

    path = tmp_path / "x.wav"
    if kind == "zero-length":
        path.write_bytes(b"")
    elif kind == "not-audio":
        path.write_text("liner notes, not audio\n" * 20)
    elif kind == "truncated":
        soundfile.write(path, np.full(4000, 0.1, dtype="float32"), RATE)
        path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(AudioDecodeError) as info:
        open_span(str(path))
    assert info.value.kind == kind and info.value.scope == "file"
