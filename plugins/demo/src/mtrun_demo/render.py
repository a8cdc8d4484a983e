"""Turning an analysed score into a fixed-length clip with a General MIDI timbre.

The notes go straight from the music21 score to the synthesizer (no MIDI file in between): the
clip length is fixed by construction, so no render can run away (the fluidsynth CLI has been
seen to write a 22 GB WAV from a music21 MIDI file), and the pieces whose MIDI export fails in
music21 need not be lost. Each render still runs under a wall-clock limit (see
:mod:`mtrun_demo.build`).

Renderers, best first:

* ``tinysoundfont``: an SF2 synthesizer (TinySoundFont) with pretty_midi's General MIDI
  soundfont ``TimGM6mb.sf2``. Its wheel declares a dependency on ``pyaudio`` that it only needs
  for live playback, so ``scripts/install.sh`` installs it with ``--no-deps``.
* ``additive``: a NumPy harmonic synthesizer with a per-instrument spectrum and envelope, used
  when tinysoundfont is not importable. It is much less realistic; the renderer used is part of
  the cache key and recorded in every item and in ``corpus.json``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import attrs
import numpy as np

from mtrun_demo.scores import Note

__all__ = [
    "INSTRUMENTS",
    "Instrument",
    "available_renderer",
    "render_clip",
    "schedule_notes",
    "soundfont_path",
]


@attrs.frozen
class Instrument:
    """A General MIDI program the corpus renders with.

    Attributes:
        name: The tag written in ``tags["instrument"]``.
        program: GM program number, 0-based.
        polyphonic: Whether it can honestly play a four-voice score (a flute cannot).
        transpose: Semitones added to every note (a cello plays a fiddle tune an octave down).
        synonyms: Other words captions may use for it.
        harmonics: Relative partial amplitudes for the additive fallback.
        decay: Seconds for the fallback's amplitude to fall by 1/e (plucked/struck vs bowed).
    """

    name: str
    program: int
    polyphonic: bool
    transpose: int = 0
    synonyms: tuple[str, ...] = ()
    harmonics: tuple[float, ...] = (1.0, 0.5, 0.3)
    decay: float = 0.0


INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument("piano", 0, True, 0, ("grand piano", "acoustic piano"), (1, 0.6, 0.3, 0.15, 0.1), 1.2),
    Instrument("harpsichord", 6, True, 0, ("harpsichord", "cembalo"), (1, 0.8, 0.7, 0.5, 0.4, 0.3), 0.8),
    Instrument("vibraphone", 11, True, 0, ("vibes", "vibraphone"), (1, 0.05, 0.2), 1.5),
    Instrument("organ", 19, True, 0, ("church organ", "pipe organ"), (1, 0.7, 0.5, 0.4, 0.3, 0.2), 0.0),
    Instrument("accordion", 21, True, 0, ("accordion", "squeezebox"), (1, 0.8, 0.6, 0.5, 0.4), 0.0),
    Instrument("acoustic guitar", 24, True, -12, ("nylon-string guitar", "classical guitar"), (1, 0.5, 0.25, 0.1), 0.9),
    Instrument("harp", 46, True, 0, ("concert harp", "harp"), (1, 0.3, 0.1), 1.0),
    Instrument("strings", 48, True, 0, ("string ensemble", "string section"), (1, 0.6, 0.45, 0.3, 0.2), 0.0),
    Instrument("choir", 52, True, 0, ("chorus", "vocal ensemble"), (1, 0.4, 0.15), 0.0),
    Instrument("violin", 40, False, 0, ("fiddle", "solo violin"), (1, 0.7, 0.5, 0.4, 0.3, 0.2), 0.0),
    Instrument("cello", 42, False, -12, ("violoncello", "solo cello"), (1, 0.8, 0.5, 0.3, 0.2), 0.0),
    Instrument("trumpet", 56, False, 0, ("trumpet", "brass trumpet"), (1, 0.9, 0.8, 0.6, 0.5, 0.4), 0.0),
    Instrument("clarinet", 71, False, 0, ("clarinet", "b-flat clarinet"), (1, 0.05, 0.6, 0.05, 0.4), 0.0),
    Instrument("flute", 73, False, 0, ("flute", "concert flute"), (1, 0.2, 0.05), 0.0),
)
"""Fourteen clearly distinct GM timbres: keyboards, plucked, bowed, blown and sung. Four-voice
scores (chorales, masses, madrigals) use only the ``polyphonic`` ones."""


def soundfont_path() -> Path:
    """pretty_midi's General MIDI soundfont (``TimGM6mb.sf2``, 6 MB, inside its wheel)."""
    spec = importlib.util.find_spec("pretty_midi")
    if spec is None or spec.origin is None:
        raise ImportError("pretty_midi is not installed; `pip install pretty_midi` (it ships the GM soundfont)")
    return Path(spec.origin).parent / "TimGM6mb.sf2"


def available_renderer() -> str:
    """``"tinysoundfont"`` when it imports and the soundfont exists, else ``"additive"``."""
    try:
        import tinysoundfont  # noqa: F401

        if soundfont_path().is_file():
            return "tinysoundfont"
    except ImportError:
        pass
    return "additive"


def schedule_notes(
    notes: Sequence[Note], *, length_ql: float, seconds_per_ql: float, clip_seconds: float, transpose: int = 0
) -> list[tuple[float, float, int, int]]:
    """Notes as ``(start_s, end_s, pitch, velocity)`` filling ``clip_seconds``.

    A piece shorter than the clip is played again from the top (dance tunes are repeated in
    performance anyway); notes are cut at the clip's end so nothing sounds past it.
    """
    out: list[tuple[float, float, int, int]] = []
    period = length_ql * seconds_per_ql
    repeat = 0
    while repeat * period < clip_seconds:
        base = repeat * period
        for n in notes:
            start = base + n.onset * seconds_per_ql
            if start >= clip_seconds:
                break
            end = min(start + n.duration * seconds_per_ql, clip_seconds)
            pitch = min(max(n.pitch + transpose, 0), 127)
            out.append((start, end, pitch, n.velocity))
        repeat += 1
    return out


def render_clip(
    events: list[tuple[float, float, int, int]],
    instrument: Instrument,
    *,
    clip_seconds: float,
    sample_rate: int,
    renderer: str,
) -> np.ndarray:
    """Synthesize ``events`` to a mono float32 waveform of exactly ``clip_seconds``.

    Rendering happens at twice ``sample_rate`` and is then resampled down (a windowed-sinc
    filter): the soundfont's samples are pitch-shifted by linear interpolation, and working at
    the higher rate keeps that aliasing out of the stored band.
    """
    total = int(round(clip_seconds * sample_rate))
    rate = 2 * sample_rate
    if renderer == "tinysoundfont":
        wave = _render_sf2(events, instrument, n_samples=2 * total, rate=rate)
    elif renderer == "additive":
        wave = _render_additive(events, instrument, n_samples=2 * total, rate=rate)
    else:
        raise ValueError(f"unknown renderer {renderer!r}")
    wave = _downsample(wave, rate, sample_rate)[:total]
    if wave.shape[0] < total:
        wave = np.pad(wave, (0, total - wave.shape[0]))
    peak = float(np.abs(wave).max())
    if peak > 0:
        wave = wave * (0.7 / peak)  # a fixed peak level: loudness is not a label here
    return wave.astype(np.float32)


_SYNTHS: dict[int, object] = {}


def _render_sf2(events, instrument: Instrument, *, n_samples: int, rate: int) -> np.ndarray:
    import tinysoundfont

    synth = _SYNTHS.get(rate)
    if synth is None:
        synth = tinysoundfont.Synth(samplerate=rate)
        synth.sfload(str(soundfont_path()))
        _SYNTHS[rate] = synth
    # One synth per process (loading the soundfont costs ~70 ms). Silence it and let the quick
    # release of the previous render's voices run out, so each clip depends only on its own
    # notes (and builds are byte-identical however pieces are spread over workers).
    synth.sounds_off()
    synth.generate(rate // 5)
    synth.program_select(0, 0, 0, instrument.program)
    # (time, is_on, pitch, velocity); note-offs sort before note-ons at the same instant so a
    # repeated pitch re-strikes instead of being cut by its predecessor's release.
    timeline = sorted(
        [(s, 1, p, v) for s, _, p, v in events] + [(e, 0, p, 0) for _, e, p, _ in events]
    )
    # The synth writes interleaved stereo straight into one buffer (no per-chunk arrays) and the
    # channels are averaged once at the end: the same samples as averaging chunk by chunk.
    stereo = np.zeros((n_samples, 2), dtype=np.float32)
    view = memoryview(stereo).cast("B")
    frame = 2 * 4  # bytes per stereo float32 frame
    pos = 0
    for time, is_on, pitch, velocity in timeline:
        target = min(int(round(time * rate)), n_samples)
        if target > pos:
            synth.generate(target - pos, buffer=view[pos * frame : target * frame])
            pos = target
        if is_on:
            synth.noteon(0, pitch, velocity)
        else:
            synth.noteoff(0, pitch)
    if pos < n_samples:
        synth.generate(n_samples - pos, buffer=view[pos * frame :])
    return stereo.mean(axis=1)


def _render_additive(events, instrument: Instrument, *, n_samples: int, rate: int) -> np.ndarray:
    out = np.zeros(n_samples, dtype=np.float64)
    for start, end, pitch, velocity in events:
        i0 = int(start * rate)
        release = 0.05
        i1 = min(int((end + release) * rate), n_samples)
        if i1 <= i0:
            continue
        t = np.arange(i1 - i0) / rate
        freq = 440.0 * 2 ** ((pitch - 69) / 12)
        tone = sum(
            a * np.sin(2 * np.pi * freq * (k + 1) * t)
            for k, a in enumerate(instrument.harmonics)
            if freq * (k + 1) < rate / 2
        )
        env = np.minimum(t / 0.01, 1.0)  # 10 ms attack
        if instrument.decay > 0:
            env = env * np.exp(-t / instrument.decay)
        held = end - start
        env = env * np.clip((held + release - t) / release, 0.0, 1.0)
        out[i0:i1] += (velocity / 127.0) * env * tone
    return out.astype(np.float32)


def _downsample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return wave
    import torch
    import torchaudio.functional

    with torch.no_grad():
        return torchaudio.functional.resample(torch.from_numpy(wave), rate, target).numpy()
