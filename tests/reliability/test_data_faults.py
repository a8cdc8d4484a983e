"""Fault class *Data*: a manifest full of bad items still trains, and every rejection says why.

Item-level faults (broken, unreadable or odd audio; a row without text) are skipped and listed:
audio in ``RUN_DIR/skipped.jsonl`` by the loader, text-less rows in the manifest source's
warning. Manifest-level faults (paths escaping ``audio_root``, duplicate ids, non-UTF-8 bytes)
stop before training with one message naming every offending line. A ``skipped.jsonl`` that
cannot be written costs a warning, never the run.

Choices the tests make, so they stay cheap:
* the very long file is 10 minutes of a 100 Hz tone at 2 kHz, 16-bit mono: 2.4 MB that decode
  in milliseconds, but 2,400 clips' worth of audio for the 0.25 s crop at the toy encoder's
  8 kHz (the loader decodes the whole file, then crops before resampling);
* tests may run as root, for whom ``chmod 000`` does not stop reads: there the refusal is
  simulated (``audiofiles.refuse_reading``) by making ``open`` of that one path raise ``PermissionError`` inside
  :mod:`mtrun.data.audio`, and libsndfile's own open of it fail with a system error (what the
  kernel would do for another user); otherwise the real ``chmod 000`` is used.
"""

from __future__ import annotations

import errno
import json
import logging
import os

import numpy as np
import pytest
import soundfile

import mtrun.data.loader as loader_module
from mtrun.data.loader import SkipLog
from mtrun.data.sources.manifest import ManifestSource
from mtrun.errors import MtrunError
from mtrun.runner import train
from audiofiles import refuse_reading
from toyrecipes import TOY_MODEL

RATE = 8000
RTL = "موسيقى هادئة مع عود وإيقاع بطيء — שיר עברי שקט"
EMOJI = "🎸🔥 loud guitar riff 🥁 with drums 👩‍🎤"
LONG_CAPTION = ("a slow piano ballad " * 5000)[:99_999] + "."  # 100,000 characters

RECIPE = """
[run]
name = "faults"

[loader]
clip_seconds = 0.25
max_bad_fraction = 0.35

[data]
type = "manifest"
""" + TOY_MODEL + """
[trainer]
batch_size = 4
max_steps = 12
log_every = 1
checkpoint_every = 6
"""


def tone(i, seconds=0.5, rate=RATE):
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * (220 + 40 * (i % 4)) * t)).astype("float32")


def write_faults(audio):
    """Every item-level fault of the issue; returns (good files, {bad id: (file, kind)})."""
    good = {}
    # Wrong extensions: the content decides, so these are good audio.
    soundfile.write(audio / "tmp.flac", tone(1), RATE)
    os.replace(audio / "tmp.flac", audio / "flac-named.wav")
    soundfile.write(audio / "tmp.wav", tone(2), RATE)
    os.replace(audio / "tmp.wav", audio / "wav-named.mp3")
    good["flac-as-wav"] = "flac-named.wav"
    good["wav-as-mp3"] = "wav-named.mp3"
    # Ten minutes, cheap: a 2 kHz 16-bit tone (2.4 MB).
    long_rate = 2000
    t = np.arange(600 * long_rate) / long_rate
    soundfile.write(audio / "long.wav", (0.3 * np.sin(2 * np.pi * 100 * t)).astype("float32"), long_rate, subtype="PCM_16")
    good["ten-minutes"] = "long.wav"

    bad = {}
    (audio / "random.wav").write_bytes(np.random.default_rng(0).bytes(6000))
    bad["random-bytes"] = ("random.wav", "not-audio")
    soundfile.write(audio / "full.wav", tone(3), RATE)
    data = (audio / "full.wav").read_bytes()
    (audio / "truncated.wav").write_bytes(data[: len(data) // 2])
    (audio / "full.wav").unlink()
    bad["truncated"] = ("truncated.wav", "truncated")
    (audio / "empty.wav").write_bytes(b"")
    bad["zero-length"] = ("empty.wav", "zero-length")
    bad["missing"] = ("never-written.wav", "missing")
    (audio / "a-folder.wav").mkdir()
    bad["directory"] = ("a-folder.wav", "not-audio")
    soundfile.write(audio / "locked.wav", tone(0), RATE)
    (audio / "locked.wav").chmod(0)
    bad["no-permission"] = ("locked.wav", "unreadable")
    return good, bad


def fault_manifest(root, monkeypatch, n_good=24):
    """A JSONL manifest of good tones, every item-level fault, and awkward captions."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    good, bad = write_faults(audio)
    refuse_reading(monkeypatch, audio / "locked.wav")
    rows = []
    for i in range(n_good):
        soundfile.write(audio / f"good{i}.wav", tone(i), RATE)
        rows.append({"id": f"good{i}", "audio": f"audio/good{i}.wav", "caption": f"tone number {i}"})
    rows += [{"id": k, "audio": f"audio/{f}", "caption": f"odd but fine: {k}"} for k, f in good.items()]
    rows += [{"id": k, "audio": f"audio/{f}", "caption": f"broken: {k}"} for k, (f, _) in bad.items()]
    # Awkward text on good audio: right-to-left, emoji (in the id too), 100k characters.
    rows += [
        {"id": "rtl", "audio": "audio/good0.wav", "caption": RTL},
        {"id": "emoji-🎸", "audio": "audio/good1.wav", "caption": EMOJI},
        {"id": "huge-caption", "audio": "audio/good2.wav", "caption": LONG_CAPTION},
        {"id": "empty-caption", "audio": "audio/good3.wav", "caption": ""},
        {"id": "blank-captions", "audio": "audio/good4.wav", "captions": ["", "   "]},
    ]
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, good, bad


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "faults.toml"
    path.write_text(RECIPE)
    return path


def read_skipped(run_dir):
    return [json.loads(line) for line in (run_dir / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]


def test_training_completes_and_lists_every_rejected_item_with_its_reason(tmp_path, recipe, registry, monkeypatch, caplog):
    manifest, good, bad = fault_manifest(tmp_path / "data", monkeypatch)
    runs = tmp_path / "runs"
    caplog.set_level(logging.WARNING, logger="mtrun.data")
    metrics = train(recipe, overrides=[f'run.output_dir="{runs}"', f'data.path="{manifest}"'], registry=registry)
    assert metrics["step"] == 12

    # Audio faults: each listed once in skipped.jsonl, with its kind, its path and a reason
    # naming the file; the wrong-extension and ten-minute files are good audio and absent.
    records = {r["id"]: r for r in read_skipped(runs / "faults")}
    assert set(records) == set(bad)
    for item, (file, kind) in bad.items():
        assert records[item]["kind"] == kind, records[item]
        assert records[item]["path"].endswith(file)
        assert file in records[item]["reason"]
    assert "permission denied" in records["no-permission"]["reason"]

    # Rows without text: left out by the manifest source, each named with its line.
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 1
    assert "2 rows left out" in left_out[0]
    assert f"{manifest}:{len(good) + len(bad) + 24 + 4}: item 'empty-caption' has no text" in left_out[0]
    assert "item 'blank-captions' has no text" in left_out[0]

    losses = [json.loads(line) for line in (runs / "faults" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["loss"]) for x in losses if "loss" in x)


def test_awkward_captions_reach_the_loader_unchanged(tmp_path, monkeypatch):
    manifest, _, _ = fault_manifest(tmp_path / "data", monkeypatch)
    source = ManifestSource(ManifestSource.Config(path=str(manifest)))
    samples = {s.id: s for s in source.load("train")}
    assert samples["rtl"].captions == [RTL]
    assert samples["emoji-🎸"].captions == [EMOJI]
    assert samples["huge-caption"].captions == [LONG_CAPTION] and len(LONG_CAPTION) == 100_000
    assert "empty-caption" not in samples and "blank-captions" not in samples
    assert {r["id"]: r["kind"] for r in source.rejected} == {"empty-caption": "no-text", "blank-captions": "no-text"}


def escaping_manifest(root):
    audio = root / "data" / "audio"
    (audio / "sub").mkdir(parents=True)
    for i in range(12):
        soundfile.write(audio / f"good{i}.wav", tone(i), RATE)
    outside = root / "outside.txt"
    outside.write_text("not yours\n" * 100)
    rows = [{"id": f"good{i}", "audio": f"good{i}.wav", "caption": f"tone {i}"} for i in range(12)]
    rows += [
        {"id": "climbs-out", "audio": "../../etc/passwd", "caption": "x"},
        {"id": "absolute", "audio": str(outside), "caption": "x"},
        {"id": "inside-after-dots", "audio": "sub/../good0.wav", "caption": "x"},
    ]
    path = root / "data" / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, audio


def test_paths_escaping_the_audio_root_are_refused_all_at_once(tmp_path):
    manifest, audio = escaping_manifest(tmp_path)
    source = ManifestSource(ManifestSource.Config(path=str(manifest), audio_root="audio"))
    with pytest.raises(MtrunError) as caught:
        source.load("train")
    message = str(caught.value)
    assert "2 rows are invalid; nothing was loaded" in message
    assert f"{manifest}:13: item 'climbs-out': audio path '../../etc/passwd' is outside audio_root" in message
    assert f"{manifest}:14: item 'absolute'" in message
    assert "inside-after-dots" not in message  # '..' that stays inside is fine
    assert "allow_outside_root = true" in message


def test_allow_outside_root_accepts_them_and_the_loader_skips_what_is_not_audio(tmp_path, recipe, registry):
    manifest, _ = escaping_manifest(tmp_path)
    runs = tmp_path / "runs"
    overrides = [f'run.output_dir="{runs}"', f'data.path="{manifest}"', 'data.audio_root="audio"', "data.allow_outside_root=true"]
    assert train(recipe, overrides=overrides, registry=registry)["step"] == 12
    records = {r["id"]: r["kind"] for r in read_skipped(runs / "faults")}
    assert records["absolute"] == "not-audio"
    assert records["climbs-out"] in ("missing", "not-audio")  # tmp/etc/passwd does not exist
    assert "inside-after-dots" not in records


def test_duplicate_ids_are_an_error_naming_both_rows_of_each(tmp_path):
    lines = ["id,audio,caption", "a,a.wav,one", "b,b.wav,two", "a,c.wav,three", "b,d.wav,four", "c,e.wav,five"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(MtrunError) as caught:
        ManifestSource(ManifestSource.Config(path=str(tmp_path / "m.csv"))).load("train")
    message = str(caught.value)
    assert "2 rows are invalid" in message
    assert "m.csv:4: id 'a' already used on line 2" in message
    assert "m.csv:5: id 'b' already used on line 3" in message


@pytest.mark.parametrize("name", ["m.jsonl", "m.csv"])
def test_non_utf8_bytes_name_the_line_and_the_byte(tmp_path, name):
    if name.endswith(".jsonl"):
        body = b'{"id": "a", "audio": "a.wav", "caption": "ok"}\n{"id": "b", "audio": "b.wav", "caption": "caf\xe9"}\n'
        column = 46
    else:
        body = b"id,audio,caption\na,a.wav,ok\nb,b.wav,caf\xe9\n"
        column = 12
    (tmp_path / name).write_bytes(body)
    with pytest.raises(MtrunError, match=rf"{name}:\d: not valid UTF-8 \(byte e9 at column {column}\)"):
        ManifestSource(ManifestSource.Config(path=str(tmp_path / name))).load("train")


@pytest.mark.parametrize(
    ("code", "where"),
    [(errno.ENOSPC, "write"), (errno.EROFS, "open"), (errno.EACCES, "open")],
    ids=["disk-full", "read-only-folder", "no-permission"],
)
def test_an_unwritable_skip_list_costs_a_warning_not_the_run(tmp_path, recipe, registry, monkeypatch, caplog, code, where):
    manifest, _, bad = fault_manifest(tmp_path / "data", monkeypatch)

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])  # a partial line, as a full disk leaves
            raise OSError(code, os.strerror(code))

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def failing_open(file, mode="r", *args, **kwargs):
        if os.fspath(file).endswith("skipped.jsonl"):
            if where == "open":
                raise OSError(code, os.strerror(code), os.fspath(file))
            return FullDisk(open(file, mode, *args, **kwargs))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(loader_module, "open", failing_open, raising=False)
    caplog.set_level(logging.WARNING, logger="mtrun.data")
    runs = tmp_path / "runs"
    metrics = train(recipe, overrides=[f'run.output_dir="{runs}"', f'data.path="{manifest}"'], registry=registry)
    assert metrics["step"] == 12
    warned = [r.getMessage() for r in caplog.records if "could not record item" in r.getMessage()]
    for item, (file, _) in bad.items():
        (line,) = [w for w in warned if f"item {item!r}" in w]  # once per item, with its reason
        assert os.strerror(code) in line and file in line and "skipped anyway" in line
    # Nothing readable was recorded: the partial lines are ignored, not misread.
    skipped = runs / "faults" / "skipped.jsonl"
    assert not skipped.exists() or SkipLog(skipped).read() == {}


def test_a_skip_list_cut_mid_line_is_read_and_appended_to_safely(tmp_path):
    path = tmp_path / "skipped.jsonl"
    whole = json.dumps({"id": "a", "path": "a.wav", "kind": "missing", "reason": "gone"}) + "\n"
    cut = json.dumps({"id": "é🎸", "path": "b.wav"}, ensure_ascii=False).encode()[:12]  # inside the emoji
    path.write_bytes(whole.encode() + cut)
    log = SkipLog(path)
    assert set(log.read()) == {"a"}
    assert log.record({"id": "c", "path": "c.wav", "kind": "missing", "reason": "gone"})
    assert not log.record({"id": "a", "path": "a.wav", "kind": "missing", "reason": "gone"})
    assert set(SkipLog(path).read()) == {"a", "c"}
