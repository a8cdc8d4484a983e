"""The demo corpus: labels from real scores, varied captions, piece-disjoint splits, bounded
renders, reproducible and atomic builds, and factors (instrument, tempo) that can be heard."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("music21")
pytest.importorskip("soundfile")

from mtrun import MtrunError  # noqa: E402
from mtrun.testing import check_component, isolated_registry  # noqa: E402
from mtrun_demo import DemoCorpus, DemoSettings, build_corpus, corpus_dir, subset, write_demo  # noqa: E402
from mtrun_demo.build import TEMPO_BUCKETS, _plan_renders  # noqa: E402
from mtrun_demo.captions import make_captions  # noqa: E402
from mtrun_demo.render import INSTRUMENTS, available_renderer, render_clip, schedule_notes  # noqa: E402
from mtrun_demo.scores import (  # noqa: E402
    PieceRef,
    analyse_piece,
    corpus_root,
    dance_type,
    parse_abc_header,
    select_pieces,
    split_abc_tunes,
)

SMALL = DemoSettings(scale=0.03, clip_seconds=4.0)
"""~40 pieces, 4-second clips: enough to exercise every collection in a few seconds."""


def _oneills_tune(rhythm: str) -> PieceRef:
    path = corpus_root() / "oneills1850" / "0721-0730.abc"
    preamble, tunes = split_abc_tunes(path.read_text(encoding="latin-1"))
    for tune in tunes:
        head = parse_abc_header(tune)
        if dance_type(head.get("R")) == rhythm:
            return PieceRef(id=f"t-{head['X']}", collection="oneills", path="oneills1850/0721-0730.abc",
                            abc=preamble + tune, labels={"genre": rhythm, "title": head["T"], "licence": "x"})
    raise AssertionError(f"no {rhythm} in the file")


def test_dance_type_normalises_oneills_spellings():
    assert dance_type(" Slipjig ") == "slip jig"
    assert dance_type("double jig") == "jig"
    assert dance_type("R: nonsense") is None and dance_type(None) is None


def test_labels_of_a_real_abc_tune_come_from_its_r_k_and_m_fields():
    ref = _oneills_tune("jig")
    head = parse_abc_header(ref.abc[ref.abc.index("X:"):])
    piece = analyse_piece(ref)
    assert piece.metre == head["M"].strip()  # jigs are in 6/8 in O'Neill's
    assert piece.beat_ql == pytest.approx(1.5)  # the beat of 6/8 is a dotted quarter
    tonic = head["K"].strip()[0].upper()
    assert piece.tonic[0] == tonic and piece.key_source == "key signature"
    assert piece.mode in ("major", "minor", "dorian", "mixolydian", "aeolian", "ionian")
    assert not piece.polyphonic and len(piece.notes) > 20
    assert 1.0 < piece.notes_per_beat < 4.0  # jigs run in quavers, three to a beat


def test_parsing_without_beaming_reads_the_same_notes_as_music21s_full_import():
    """The build skips music21's beaming (engraving only, 2/3 of the ABC parse time): the notes
    must be exactly those of a plain ``converter.parse``, and ``makeBeams`` must be restored."""
    from music21 import converter, stream

    from mtrun_demo.scores import _part_notes, _without_beaming

    original = stream.Stream.makeBeams
    ref = _oneills_tune("jig")
    piece = analyse_piece(ref)
    full = converter.parse(ref.abc, format="abc")  # with beaming
    assert any(n.beams.beamsList for n in full.recurse().notes)
    notes = sorted((n for part in full.parts for n in _part_notes(part, beat_ql=1.5, bar_ql=3.0)),
                   key=lambda n: (n.onset, n.pitch))
    assert tuple(notes) == piece.notes
    with _without_beaming():
        assert stream.Stream.makeBeams is not original
    assert stream.Stream.makeBeams is original


def test_selection_is_deterministic_and_covers_every_collection():
    a = select_pieces(seed=0, scale=0.05)
    b = select_pieces(seed=0, scale=0.05)
    assert [r.id for r in a] == [r.id for r in b]
    assert {r.collection for r in a} == {"oneills", "ryans", "essen", "bach", "palestrina", "monteverdi"}
    assert len({r.id for r in a}) == len(a)
    assert select_pieces(seed=1, scale=0.05) != a


def test_captions_vary_in_form_and_words_and_are_reproducible():
    tags = {"genre": ["reel"], "instrument": ["violin"], "tempo": ["fast"], "key": ["D major"],
            "mode": ["major"], "metre": ["4/4"], "region": ["Ireland"]}
    extra = {"bpm": 132, "instrument_synonyms": ("fiddle", "solo violin"), "solo": True}
    captions = [make_captions(tags, extra, seed=s, count=5) for s in range(30)]
    flat = [c for cs in captions for c in cs]
    assert all(len(cs) == 5 and len(set(cs)) == 5 for cs in captions)
    assert len(set(flat)) > 100  # not one template
    assert any("fiddle" in c for c in flat) and any("violin" in c for c in flat)
    assert any(w in c for c in flat for w in ("brisk", "quick")) and any("132" in c for c in flat)
    assert any("reel" not in c for c in flat)  # partial tag sets
    assert all("sad" not in c and "happy" not in c for c in flat)  # no invented mood
    assert make_captions(tags, extra, seed=3, count=4) == make_captions(tags, extra, seed=3, count=4)


def test_each_piece_gets_distinct_instruments_and_tempo_buckets():
    refs = select_pieces(seed=0, scale=0.05)
    for ref in refs:
        plan = _plan_renders(ref, polyphonic=ref.collection in ("bach", "palestrina", "monteverdi"), settings=DemoSettings())
        assert len({i.name for i, _, _ in plan}) == len(plan) == 2
        assert len({b for _, b, _ in plan}) == 2
        assert all(bpm in TEMPO_BUCKETS[b] for _, b, bpm in plan)
        if ref.collection == "bach":
            assert all(i.polyphonic for i, _, _ in plan)


def test_render_is_exactly_the_clip_length_even_for_endless_input():
    instrument = next(i for i in INSTRUMENTS if i.name == "flute")
    from mtrun_demo.scores import Note

    notes = [Note(float(i), 1.0, 60 + i % 12, 90) for i in range(10_000)]  # ~an hour of music
    events = schedule_notes(notes, length_ql=10_000.0, seconds_per_ql=0.5, clip_seconds=3.0)
    assert max(end for _, end, _, _ in events) <= 3.0
    for renderer in {available_renderer(), "additive"}:
        wave = render_clip(events, instrument, clip_seconds=3.0, sample_rate=16000, renderer=renderer)
        assert wave.shape == (48000,) and wave.dtype == np.float32 and np.abs(wave).max() > 0.1
    short = schedule_notes(notes[:2], length_ql=2.0, seconds_per_ql=0.5, clip_seconds=3.0)
    assert len(short) == 6  # a 1-second piece is repeated to fill 3 seconds


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    folder = build_corpus(SMALL, root=root, workers=2)
    return root, folder


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_small_build_has_piece_disjoint_splits_and_complete_rows(small_build):
    _, folder = small_build
    rows = _manifest(folder)
    info = json.loads((folder / "corpus.json").read_text())
    assert len(rows) == info["counts"]["items"] >= 60
    split_of_piece: dict[str, set] = {}
    for row in rows:
        split_of_piece.setdefault(row["group"], set()).add(row["split"])
        assert (folder / row["audio"]).is_file()
        assert 3 <= len(row["captions"]) <= 5
        assert {"genre", "instrument", "tempo", "key", "mode"} <= set(row["tags"])
        assert row["licence"] and row["renderer"] == info["renderer"]
    assert all(len(s) == 1 for s in split_of_piece.values())
    assert {s for ss in split_of_piece.values() for s in ss} == {"train", "val", "test"}
    import soundfile

    audio = soundfile.info(str(folder / rows[0]["audio"]))
    assert (audio.samplerate, audio.channels, audio.frames) == (16000, 1, 64000)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "corpus.json" and path.name != "README.md":  # they hold the build time
            h.update(str(path.relative_to(folder)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_settings_give_the_same_bytes(small_build, tmp_path):
    _, folder = small_build
    settings = DemoSettings(scale=0.01, clip_seconds=4.0)
    a = build_corpus(settings, root=tmp_path / "a", workers=1)
    b = build_corpus(settings, root=tmp_path / "b", workers=2)
    assert _digest(a) == _digest(b)
    c = build_corpus(DemoSettings(scale=0.01, clip_seconds=4.0, seed=1), root=tmp_path / "c", workers=1)
    assert _digest(c) != _digest(a)


def test_cached_build_returns_instantly_and_killed_build_leaves_no_corpus(small_build, monkeypatch, tmp_path):
    root, folder = small_build
    import time

    start = time.perf_counter()
    assert build_corpus(SMALL, root=root) == folder
    assert time.perf_counter() - start < 5.0  # a rebuild of even this small corpus takes far longer

    import mtrun_demo.build as build

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_write_metadata", killed)
    settings = DemoSettings(scale=0.005, clip_seconds=2.0)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(settings, root=tmp_path, workers=1)
    assert not corpus_dir(settings, root=tmp_path).exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too


def test_a_build_where_every_piece_fails_is_an_error_and_caches_nothing(monkeypatch, tmp_path):
    import mtrun_demo.build as build

    def broken(ref, *args, **kwargs):
        return [], {"piece": ref.id, "path": ref.path, "reason": "RuntimeError: no synthesizer"}

    monkeypatch.setattr(build, "render_piece", broken)
    settings = DemoSettings(scale=0.005, clip_seconds=2.0)
    with pytest.raises(MtrunError, match="made no clips.*no synthesizer"):
        build_corpus(settings, root=tmp_path, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_write_demo_and_the_demo_source_read_the_cached_corpus(small_build, monkeypatch, tmp_path):
    root, folder = small_build
    import mtrun_demo as demo

    registry = isolated_registry(demo)

    monkeypatch.setattr(demo, "build_corpus", lambda *a, **k: folder)
    manifest = write_demo(tmp_path / "out")
    assert manifest == tmp_path / "out" / "manifest.jsonl"
    assert manifest.read_bytes() == (folder / "manifest.jsonl").read_bytes()
    with pytest.raises(Exception, match="already exists"):
        write_demo(tmp_path / "out")
    write_demo(tmp_path / "out", force=True)

    component = registry.get("data", "demo")
    source = component.cls(component.config_class(root=str(tmp_path / "out")))
    assert set(source.splits()) == {"train", "val", "test"}
    sample = source.load("train")[0]
    assert os.path.isfile(sample.audio) and sample.captions and sample.tags["instrument"]
    assert sample.group and "bpm" in sample.extra

    small = DemoCorpus(DemoCorpus.Config(root=str(tmp_path / "out"), n_items=20))
    sizes = {s: len(small.load(s)) for s in small.splits()}
    assert 18 <= sum(sizes.values()) <= 22 and all(n >= 1 for n in sizes.values())
    assert [s.id for s in subset({"train": list(source.load("train"))}, 5)["train"]] == [
        s.id for s in subset({"train": list(source.load("train"))}, 5)["train"]
    ]


# ------------------------------------------------------------------------------ acceptance


def _logmel_stats(paths: list[str]) -> np.ndarray:
    """Statistics of each clip's log-mel spectrogram over time.

    Per mel band: mean, std and mean absolute frame-to-frame change (timbre, loudness shape);
    plus the autocorrelation, at lags 48 ms-2 s, of the onset envelope (the positive
    frame-to-frame change summed over bands) - the temporal statistic that carries tempo,
    which per-band means and spreads barely see (tempo accuracy ~0.46 with them alone).
    """
    import soundfile
    import torch
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=1024, hop_length=256, n_mels=64)
    feats = []
    for path in paths:
        wave, _ = soundfile.read(path, dtype="float32")
        spec = torch.log(mel(torch.from_numpy(wave)) + 1e-6)  # [n_mels, frames], 62.5 frames/s
        delta = spec.diff(dim=1)
        onset = delta.clamp(min=0).mean(0)
        onset = onset - onset.mean()
        power = torch.fft.rfft(onset, n=2 * len(onset)).abs() ** 2
        autocorr = torch.fft.irfft(power)[: len(onset)]
        autocorr = autocorr / autocorr[0].clamp(min=1e-9)
        feats.append(torch.cat([spec.mean(1), spec.std(1), delta.abs().mean(1), autocorr[3:126]]).numpy())
    return np.stack(feats)


@pytest.mark.slow
def test_acceptance_instrument_and_tempo_are_learnable_from_log_mel_statistics():
    """Held-out (test-split pieces never seen in training) logistic regression on log-mel
    statistics must beat twice chance for instrument and tempo bucket.

    Runs on the full corpus that ``mtrun data demo`` writes, from the shared cache: built once
    per machine (a few minutes on two cores), then reused by every run and by the README job.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folder = build_corpus()
    rows = _manifest(folder)
    # 800 training clips (a fixed subset, to keep the test around a minute) and every clip of
    # the test split, whose pieces the classifier has never heard.
    train = sorted((r for r in rows if r["split"] in ("train", "val")),
                   key=lambda r: hashlib.sha256(r["id"].encode()).digest())[:800]
    test = [r for r in rows if r["split"] == "test"]
    x_train = _logmel_stats([str(folder / r["audio"]) for r in train])
    x_test = _logmel_stats([str(folder / r["audio"]) for r in test])
    for category in ("instrument", "tempo"):
        y_train = [r["tags"][category][0] for r in train]
        y_test = [r["tags"][category][0] for r in test]
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
        model.fit(x_train, y_train)
        accuracy = float(np.mean(model.predict(x_test) == np.array(y_test)))
        chance = max(y_test.count(c) for c in set(y_test)) / len(y_test)  # majority class
        print(f"{category}: accuracy {accuracy:.3f} on {len(test)} test clips "
              f"({len(set(y_train))} classes, majority-class chance {chance:.3f}, train {len(train)})")
        assert accuracy >= 2 * chance, (category, accuracy, chance)


@pytest.mark.parametrize("where", ["clip", "metadata"])
def test_a_full_disk_stops_the_build_naming_the_folder_and_caches_nothing(monkeypatch, tmp_path, where):
    """A write failure is the machine's fault, not the score's: skipping those pieces would cache
    a corpus silently missing everything written after the disk filled up."""
    import errno

    import soundfile

    import mtrun_demo.build as build

    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "clip":
        real_write, calls = soundfile.write, []

        def write(*args, **kwargs):
            calls.append(args[0])
            if len(calls) > 2:
                raise full
            return real_write(*args, **kwargs)

        monkeypatch.setattr(soundfile, "write", write)
    else:
        def metadata(*args, **kwargs):
            raise full

        monkeypatch.setattr(build, "_write_metadata", metadata)
    settings = DemoSettings(scale=0.005, clip_seconds=2.0)
    with pytest.raises(MtrunError) as err:
        build_corpus(settings, root=tmp_path, workers=1)
    message = str(err.value)
    assert f"could not write into {tmp_path}" in message and "No space left on device" in message
    assert "Nothing was cached" in message and "MTRUN_CACHE" in message
    assert list(tmp_path.iterdir()) == []  # no corpus, no temporary folder


def test_the_demo_source_passes_the_contract_check(small_build):
    import mtrun_demo

    _, folder = small_build
    source = check_component(isolated_registry(mtrun_demo), "data", "demo", config=DemoCorpus.Config(root=str(folder)))
    assert set(source.splits()) == {"train", "val", "test"}


def _mtrun(*args: str, **env: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mtrun.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_mtrun_data_demo_reaches_the_plugin_through_the_registry(tmp_path):
    """Core does not import this plugin: `mtrun data demo` finds the `demo` data source by name.
    A folder that already holds a manifest is refused by this plugin's writer, before any build."""
    (tmp_path / "manifest.jsonl").write_text("")
    found = _mtrun("data", "demo", str(tmp_path))
    assert found.returncode != 0 and "already exists; pass --force to replace it" in found.stderr
    missing = _mtrun("data", "demo", str(tmp_path), MTRUN_DISABLE_PLUGINS="demo")
    assert missing.returncode != 0
    assert "no data source 'demo' is installed; it comes with the mtrun-demo plugin" in missing.stderr
