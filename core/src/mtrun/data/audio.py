"""Audio in: decode any file to float samples, mix to mono, resample, crop, pad and window.

Decoding uses **soundfile** (libsndfile; its pip wheel bundles WAV, FLAC, OGG/Vorbis/Opus and
MP3 support, so no system package is needed). What libsndfile does not recognise at all
(AAC/M4A, WMA, video containers) falls back to **PyAV**, whose pip wheels bundle FFmpeg's
libraries — again no system package. ``audioread``/``pydub`` were not chosen because they shell
out to an ``ffmpeg`` binary that a pip-only machine does not have. The fallback is used only
when libsndfile *does not know the format*; a file libsndfile knows but finds malformed is
reported as broken, because FFmpeg would often decode its first half and hide the damage.

Every failure is an :class:`AudioDecodeError` whose message names the file and the reason, and
whose :attr:`~AudioDecodeError.kind` is a short machine-readable category (``missing``,
``unreadable``, ``zero-length``, ``truncated``, ``not-audio``, ``silent``, ``non-finite``, ...).
The loader uses these to skip bad items and list them in ``skipped.jsonl``.

For files of any length, :func:`open_stream` decodes in blocks, :class:`StreamResampler`
resamples block by block (the same sinc kernel as :func:`resample`, with the context each output
sample needs carried over from the previous block), and :func:`stream_windows` cuts the stream
into the windows :func:`sliding_windows` would cut from the whole file. Memory is then bounded by
the block and window sizes, not the file: inference on a ten-minute track needs as much as on a
ten-second one.

A training crop needs only its span of the file: :func:`open_span` reads spans through
libsndfile's seeking (the samples a whole-file decode has there), checking at open what the
header can tell and leaving damage inside the file to the read that reaches it.

Besides paths, :func:`decode` accepts any *audio reference*: an object with an ``open()``
method returning a binary file object, and optionally ``name`` and ``suffix`` attributes
(:class:`mtrun.data.sources.shards.TarMember` is one: a byte range inside a tar shard).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from mtrun.errors import MtrunError

if TYPE_CHECKING:
    import torch

    from mtrun.interfaces import Sample

_T = TypeVar("_T")

__all__ = [
    "CROP_POLICIES",
    "PAD_POLICIES",
    "SILENCE_THRESHOLD",
    "AudioDecodeError",
    "AudioSpans",
    "StreamResampler",
    "check_waveform",
    "crop_offset",
    "crop_or_pad",
    "decode",
    "describe_audio",
    "load_waveform",
    "open_span",
    "open_stream",
    "resample",
    "sliding_windows",
    "stream_windows",
    "to_mono",
]

CROP_POLICIES = ("random", "center", "start")
"""How audio longer than a clip is cut: a seeded random offset, the middle, or the start."""

PAD_POLICIES = ("repeat", "zero")
"""How audio shorter than a clip is filled: tiled (CLAP's "repeatpad") or zeros at the end."""

SILENCE_THRESHOLD = 1e-6
"""Peak amplitude at or below which a waveform counts as silent (about -120 dBFS: below one
step of 16-bit audio, so a file with any real content, even dithered near-silence, passes)."""

# A file whose header promises noticeably more frames than can be decoded was cut short. MP3
# frame counts are estimates and codecs pad a little, hence the tolerance.
_TRUNCATION_TOLERANCE = 0.02
_SHOULD_BE = re.compile(r"^\s*data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_SF_UNRECOGNISED_FORMAT = 1  # libsndfile's SF_ERR_UNRECOGNISED_FORMAT


class AudioDecodeError(MtrunError):
    """An audio file or waveform cannot be used; the message names the item and the reason.

    Attributes:
        kind: Short category of the problem: ``missing``, ``unreadable``, ``zero-length``,
            ``truncated``, ``not-audio``, ``corrupt``, ``silent``, ``non-finite``, ``empty``
            or ``bad-shape``.
        path: The file concerned, when there is one.
        scope: ``file`` when every read of the file reaches this verdict (it can be
            remembered), ``part`` when it was found in a span of the file and a read of
            another span may not see it (see :func:`open_span`).
    """

    def __init__(self, message: str, *, kind: str = "corrupt", path: str | None = None, scope: str = "file"):
        super().__init__(message)
        self.kind = kind
        self.path = path
        self.scope = scope

    def of_sample(self, sample_id: str, *, path: str | None = None) -> AudioDecodeError:
        """This error with its message led by ``sample {sample_id!r}: `` (once), for raising
        where the sample is known; kind, scope and path (or ``path`` where it has none) kept."""
        message, lead = str(self), f"sample {sample_id!r}"
        if not message.startswith(lead):
            message = f"{lead}: {message}"
        return AudioDecodeError(message, kind=self.kind, path=self.path or path, scope=self.scope)

    def __reduce__(self):  # keep kind, path and scope when raised inside a DataLoader worker
        return (_rebuild_decode_error, (str(self), self.kind, self.path, self.scope))


def _rebuild_decode_error(message: str, kind: str, path: str | None, scope: str = "file") -> AudioDecodeError:
    return AudioDecodeError(message, kind=kind, path=path, scope=scope)


def describe_audio(audio: Any) -> str:
    """A printable name for a sample's audio: the path, a reference's name, or ``<waveform>``."""
    if isinstance(audio, (str, os.PathLike)):
        return str(audio)
    name = getattr(audio, "name", None)
    if name is not None:
        return str(name)
    return "<waveform>"


# ---------------------------------------------------------------------------------- decoding


def decode(path: Any) -> tuple[torch.Tensor, int]:
    """Decode an audio file to float32 ``[channels, time]`` and its sample rate.

    Any channel count and rate; WAV, FLAC, OGG and MP3 through libsndfile, other formats
    through PyAV when it is installed (see the module docstring).

    Args:
        path: A file path, or an audio reference with ``open()`` (see the module docstring).

    Raises:
        AudioDecodeError: The file is missing, empty, cut short, not audio, or otherwise
            undecodable. The message names the file and the reason.
    """
    import torch

    name = describe_audio(path)
    data, rate = _diagnosed(path, name, lambda: _soundfile_or_pyav(name, lambda: _decode_soundfile(path), lambda: _decode_pyav(path)))
    wave = torch.from_numpy(data.T.copy())
    if wave.shape[-1] == 0:
        raise AudioDecodeError(f"audio file {name!r}: holds no audio frames", kind="empty", path=name)
    return wave, int(rate)


def _diagnosed(path: Any, name: str, read: Callable[[], _T]) -> _T:
    """``read()``, and when it fails on a path, the cause :func:`_precheck` can name (missing, a
    folder, empty, unreadable) rather than a decoder's guess ("not audio").

    Checked only after a failure: the check is half a dozen system calls per file, a tenth of
    the span reads' non-decoding time in a loader worker, and a file that decodes needs none of it.
    """
    if not isinstance(path, (str, os.PathLike)):
        _precheck(path, name)  # a reference without open(): refused before any decoder sees it
        return read()
    try:
        return read()
    except Exception:
        try:
            _precheck(path, name)
        except AudioDecodeError as cause:
            raise cause from None  # the cause alone, not the decoder's guess as its context
        raise


def _precheck(path: Any, name: str) -> None:
    """Refuse what no decoder can read: a missing, empty or unreadable path, or a non-reference."""
    if isinstance(path, (str, os.PathLike)):
        file = Path(path)
        if not file.exists():
            raise AudioDecodeError(f"audio file {name!r}: missing (no such file)", kind="missing", path=name)
        if file.is_dir():
            raise AudioDecodeError(f"audio file {name!r}: is a folder, not a file", kind="not-audio", path=name)
        if file.stat().st_size == 0:
            raise AudioDecodeError(f"audio file {name!r}: zero-length (the file is empty)", kind="zero-length", path=name)
        _check_readable(file, name)
    elif not callable(getattr(path, "open", None)):
        raise AudioDecodeError(f"cannot decode {path!r}: expected a path or an object with open()", kind="bad-shape")


def _check_readable(file: Path, name: str) -> None:
    """Open the file once, so a permission or I/O error is reported as such.

    Without this, libsndfile's failure to open it falls through to the "not audio" path and
    the message would blame the file's content.
    """
    try:
        with open(file, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise AudioDecodeError(f"audio file {name!r}: unreadable ({reason})", kind="unreadable", path=name) from None


class _Unrecognised(Exception):
    """libsndfile does not know the format; another decoder may."""


def _open_binary(path: Any):
    return open(path, "rb") if isinstance(path, (str, os.PathLike)) else path.open()


def _soundfile_or_pyav(name: str, with_soundfile: Callable[[], Any], with_pyav: Callable[[], Any]) -> Any:
    """``with_soundfile()``; for a format libsndfile does not recognise, ``with_pyav()`` (FFmpeg),
    with one message when neither can read the file (or PyAV is not installed)."""
    try:
        return with_soundfile()
    except _Unrecognised as unrecognised:
        try:
            return with_pyav()
        except ImportError:
            raise AudioDecodeError(
                f"audio file {name!r}: not audio, or a format libsndfile does not read "
                f"({unrecognised}); install PyAV (`pip install av`) to decode AAC/M4A and other FFmpeg formats",
                kind="not-audio",
                path=name,
            ) from None
        except AudioDecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - FFmpeg's errors all mean "cannot read this"
            raise AudioDecodeError(
                f"audio file {name!r}: not audio (neither libsndfile nor FFmpeg recognises it: {exc})",
                kind="not-audio",
                path=name,
            ) from None



def _check_data_chunk(extra: str | None, name: str, stack: Any = None) -> None:
    """WAV: libsndfile silently shortens a data chunk that runs past the end of the file and
    notes "data : N (should be M)" in its log; that is a file cut short. ``stack`` (the open
    file's exit stack) is closed before raising."""
    match = _SHOULD_BE.search(extra or "")
    if match and int(match.group(2)) < int(match.group(1)):
        if stack is not None:
            stack.close()
        raise AudioDecodeError(
            f"audio file {name!r}: truncated (its header declares {match.group(1)} bytes of audio, "
            f"only {match.group(2)} are present)",
            kind="truncated",
            path=name,
        )

def _decode_soundfile(path: Any):
    import numpy as np
    import soundfile

    name = describe_audio(path)
    try:
        with contextlib.ExitStack() as stack:
            # libsndfile reads a path directly (faster than through Python file callbacks).
            source = str(path) if isinstance(path, (str, os.PathLike)) else stack.enter_context(path.open())
            handle = stack.enter_context(soundfile.SoundFile(source))
            declared = handle.frames
            extra = handle.extra_info
            rate = handle.samplerate
            data = handle.read(dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as exc:
        # libsndfile picks MP3 by extension and then reports odd errors for a text file named
        # .mp3; a file that does not start like any audio format it reads is "not audio".
        if getattr(exc, "code", None) == _SF_UNRECOGNISED_FORMAT or not _has_audio_magic(path):
            raise _Unrecognised(exc.error_string) from None
        kind = "truncated" if _looks_truncated(exc.error_string) else "corrupt"
        raise AudioDecodeError(
            f"audio file {name!r}: {'truncated or ' if kind == 'truncated' else ''}corrupt ({exc.error_string})",
            kind=kind,
            path=name,
        ) from None
    except (RuntimeError, ValueError, TypeError) as exc:
        raise AudioDecodeError(f"audio file {name!r}: corrupt ({exc})", kind="corrupt", path=name) from None
    _check_data_chunk(extra, name)
    if declared > 0 and len(data) < declared * (1 - _TRUNCATION_TOLERANCE):
        raise AudioDecodeError(
            f"audio file {name!r}: truncated (its header declares {declared} frames, only {len(data)} decode)",
            kind="truncated",
            path=name,
        )
    return np.ascontiguousarray(data), rate


_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"ID3", b"FORM", b".snd", b"caff", b"wvpk", b"MAC ")


def _has_audio_magic(path: Any) -> bool:
    """Whether the file starts like a format libsndfile reads (WAV, FLAC, OGG, MP3, AIFF, ...)."""
    try:
        with _open_binary(path) as handle:
            head = handle.read(4)
    except OSError:
        return False
    if head.startswith(_MAGIC):
        return True
    # A bare MPEG audio frame: 11 sync bits set.
    return len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0


def _looks_truncated(message: str) -> bool:
    text = message.lower()
    return any(s in text for s in ("lost sync", "end of file", "malformed", "unexpected end", "short read"))


def _decode_pyav(path: Any):
    import av  # PyAV: FFmpeg's libraries inside the wheel
    import numpy as np

    name = describe_audio(path)
    with _open_binary(path) as raw:
        with av.open(raw) as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"audio file {name!r}: not audio (the container has no audio stream)", kind="not-audio", path=name)
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp")  # planar float32, channels kept
            chunks = []
            rate = stream.rate
            for frame in container.decode(stream):
                rate = frame.sample_rate or rate
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    if not chunks:
        raise AudioDecodeError(f"audio file {name!r}: holds no audio frames", kind="empty", path=name)
    data = np.concatenate(chunks, axis=1).astype("float32", copy=False)  # [C, T]
    return np.ascontiguousarray(data.T), int(rate)


# ------------------------------------------------------------------------------------ spans


class AudioSpans:
    """An open audio file that reads spans of frames without decoding the rest.

    Made by :func:`open_span`. ``frames`` is what the header declares; ``whole`` holds the
    decoded file (``[C, T]``) when it had to be decoded entirely (formats only FFmpeg reads, or
    a header with no frame count), and then ``read`` slices it. Use as a context manager.

    Each read after the first reopens the file: libsndfile's Ogg Vorbis reader lands up to a
    block away from the frame asked for when it seeks after a read (measured: 128 frames off),
    while a seek on a fresh handle is exact.
    """

    def __init__(self, name: str, rate: int, frames: int, *, handle: Any = None, stack: Any = None, whole: Any = None,
                 reopen: Callable[[], tuple[Any, Any]] | None = None):
        self.name, self.rate, self.frames = name, int(rate), int(frames)
        self.whole = whole
        self._handle, self._stack, self._reopen = handle, stack, reopen
        self._used = False

    def read(self, start: int, count: int) -> torch.Tensor:
        """Frames ``[start, start + count)`` as float32 ``[channels, n]``.

        Raises:
            AudioDecodeError: The span cannot be decoded, or the file ends well before the end
                its header promised; ``scope`` is ``part`` (other spans may read fine).
        """
        import numpy as np
        import soundfile
        import torch

        if self.whole is not None:
            return self.whole[:, start : start + count]
        try:
            if self._used and self._reopen is not None:
                self.close()
                self._handle, self._stack = self._reopen()
            self._used = True
            self._handle.seek(start)
            data = _read_once(self._handle, count)
        except soundfile.LibsndfileError as exc:
            error = _sf_error(self.name, exc)
            raise AudioDecodeError(str(error), kind=error.kind, path=self.name, scope="part") from None
        except (RuntimeError, ValueError, TypeError) as exc:
            raise AudioDecodeError(f"audio file {self.name!r}: corrupt ({exc})", kind="corrupt", path=self.name, scope="part") from None
        # MP3 frame counts are estimates: a span at the very end may come up a little short.
        if len(data) < count and start + count <= self.frames * (1 - _TRUNCATION_TOLERANCE):
            raise AudioDecodeError(
                f"audio file {self.name!r}: truncated (its header declares {self.frames} frames, "
                f"frames {start}..{start + count} do not all decode)",
                kind="truncated",
                path=self.name,
                scope="part",
            )
        return torch.from_numpy(np.ascontiguousarray(data.T))  # mono: a view, no copy

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = self._handle = None

    def __enter__(self) -> AudioSpans:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _libsndfile_binding() -> tuple[Any, Any] | None:
    """soundfile's libsndfile library and cffi handle, where this soundfile release has them."""
    import soundfile

    lib, ffi = getattr(soundfile, "_snd", None), getattr(soundfile, "_ffi", None)
    return (lib, ffi) if hasattr(lib, "sf_readf_float") and hasattr(ffi, "cast") else None


def _read_once(handle: Any, count: int) -> Any:
    """Up to ``count`` float32 frames ``[n, channels]`` from where a read-only ``handle`` stands.

    soundfile's ``read`` seeks to where each read ended (which a file open for reading and
    writing needs), and on FLAC that is a real seek: about a tenth of a 2.56 s span's read
    (``benchmarks/span_reads.py``). So call libsndfile's reader directly through soundfile's
    binding, and fall back to ``read`` where a soundfile release does not expose it.
    """
    import numpy as np
    import soundfile

    binding, file = _libsndfile_binding(), getattr(handle, "_file", None)
    if binding is None or file is None:
        return handle.read(frames=count, dtype="float32", always_2d=True)
    lib, ffi = binding
    count = max(0, min(count, handle.frames - handle.tell()))
    data = np.empty((count, handle.channels), dtype=np.float32)
    got = lib.sf_readf_float(file, ffi.cast("float *", data.ctypes.data), count)
    code = lib.sf_error(file)
    if code:
        raise soundfile.LibsndfileError(code)
    return data[:got]


def open_span(path: Any) -> AudioSpans:
    """Open an audio file to read spans of it (a crop) without decoding the whole file.

    libsndfile seeks to the span (WAV, FLAC, OGG and MP3); formats only FFmpeg reads are
    decoded whole through PyAV, as :func:`decode` does. What can be checked without reading the
    samples is checked here and raises with ``scope="file"``: missing, unreadable, empty, not
    audio, and a WAV whose header promises more data than the file holds. Damage inside the
    file is found only by a read that reaches it (:meth:`AudioSpans.read`, ``scope="part"``).

    Raises:
        AudioDecodeError: As :func:`decode`, for what the header shows.
    """
    name = describe_audio(path)

    def whole() -> AudioSpans:
        data, rate = _decode_pyav(path)
        return _whole_spans(name, data, rate)

    return _diagnosed(path, name, lambda: _soundfile_or_pyav(name, lambda: _open_span_soundfile(path), whole))


def _whole_spans(name: str, data: Any, rate: int) -> AudioSpans:
    import torch

    wave = torch.from_numpy(data.T.copy())
    if wave.shape[-1] == 0:
        raise AudioDecodeError(f"audio file {name!r}: holds no audio frames", kind="empty", path=name)
    return AudioSpans(name, rate, wave.shape[-1], whole=wave)


def _open_soundfile(path: Any) -> tuple[Any, contextlib.ExitStack]:
    import soundfile

    stack = contextlib.ExitStack()
    try:
        source = str(path) if isinstance(path, (str, os.PathLike)) else stack.enter_context(path.open())
        return stack.enter_context(soundfile.SoundFile(source)), stack
    except BaseException:
        stack.close()
        raise


def _open_span_soundfile(path: Any) -> AudioSpans:
    import soundfile

    name = describe_audio(path)
    try:
        handle, stack = _open_soundfile(path)
    except soundfile.LibsndfileError as exc:
        if getattr(exc, "code", None) == _SF_UNRECOGNISED_FORMAT or not _has_audio_magic(path):
            raise _Unrecognised(exc.error_string) from None
        raise _sf_error(name, exc) from None
    except (RuntimeError, ValueError, TypeError) as exc:
        raise AudioDecodeError(f"audio file {name!r}: corrupt ({exc})", kind="corrupt", path=name) from None
    _check_data_chunk(handle.extra_info, name, stack)
    frames = int(handle.frames)
    if frames <= 0 or not handle.seekable():
        # No frame count (or no seeking): read it all, as decode() would.
        try:
            data = handle.read(dtype="float32", always_2d=True)
        except soundfile.LibsndfileError as exc:
            raise _sf_error(name, exc) from None
        finally:
            stack.close()
        return _whole_spans(name, data, int(handle.samplerate))
    return AudioSpans(name, int(handle.samplerate), frames, handle=handle, stack=stack, reopen=lambda: _open_soundfile(path))


# ------------------------------------------------------------------------------- validation


def check_waveform(wave: torch.Tensor, where: str, *, silence_threshold: float = SILENCE_THRESHOLD) -> None:
    """Refuse audio that would train nothing or poison the loss.

    The loader checks the whole file (before cropping, or once in the waveform cache's build),
    so the verdict is a property of the file and not of the crop drawn: a loader that skips on
    it stays deterministic. With span reads it checks the crop instead, and a problem found
    there is treated as the crop's (see :class:`mtrun.data.loader.BatchLoader`).

    Args:
        wave: Waveform of any shape.
        where: What the waveform is (sample id and file), for the message.
        silence_threshold: Peak amplitude at or below which the audio is silent.

    Raises:
        AudioDecodeError: ``non-finite`` (NaN or infinity present) or ``silent``.
    """
    import torch

    if wave.numel() == 0:
        raise AudioDecodeError(f"{where}: holds no audio frames", kind="empty")
    # One pass: the peak is NaN or infinite exactly when some sample is; count only then.
    peak = float(wave.abs().max())
    if not math.isfinite(peak):
        bad = int((~torch.isfinite(wave)).sum())
        raise AudioDecodeError(f"{where}: non-finite audio ({bad} NaN or infinite values)", kind="non-finite")
    if peak <= silence_threshold:
        raise AudioDecodeError(f"{where}: silent (peak amplitude {peak:.3g})", kind="silent")


# ---------------------------------------------------------------------------- conversions


def to_mono(wave: torch.Tensor) -> torch.Tensor:
    """``[C, T]`` or ``[T]`` → ``[T]`` by averaging channels (what every encoder here expects)."""
    if wave.dim() == 2:
        # One channel: a view. Averaging a [1, T] tensor is a reduction over a length-1 axis
        # that PyTorch's CPU kernel parallelises badly (measured 18 ms per 10 s clip with 2
        # threads on a busy 2-core machine, against 0.004 ms for the view).
        return wave[0] if wave.shape[0] == 1 else wave.mean(0)
    if wave.dim() == 1:
        return wave
    raise AudioDecodeError(f"audio must be [channels, time] or [time] (got shape {tuple(wave.shape)})", kind="bad-shape")


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited (windowed sinc) resampling along the last axis; a no-op at equal rates.

    torchaudio's resampler is pure torch, so it needs none of torchaudio's I/O backends and
    runs inside DataLoader workers; one resampler per rate pair is kept (per process).
    """
    if int(orig_rate) == int(new_rate):
        return wave
    import torch

    with torch.no_grad():
        return _resampler(int(orig_rate), int(new_rate))(wave)


@functools.lru_cache(maxsize=32)
def _resampler(orig_rate: int, new_rate: int):
    # ``transforms.Resample`` computes its sinc kernel once; the functional form recomputes it
    # on every call, which costs more than the resampling itself (0.2 s for 44.1 → 8 kHz).
    import torchaudio.transforms

    return torchaudio.transforms.Resample(orig_freq=orig_rate, new_freq=new_rate)


#: Full scale of integer PCM samples, by dtype name: what soundfile and scipy hand back.
_PCM_FULL_SCALE = {"int8": 128.0, "int16": 32768.0, "int32": 2147483648.0}


def as_waveform(audio: Any, sample_rate: Any, where: str) -> tuple[torch.Tensor, int]:
    """An in-memory waveform as float32 ``[C, T]`` or ``[T]`` on the CPU, with its rate.

    Integer PCM (int8, int16, int32; uint8 centred on 128) is scaled to [-1, 1] as a decoder
    would; other integer types have no agreed full scale and are refused. A 2-D array with more
    rows than columns is refused too: it is almost surely ``[time, channels]`` (soundfile's and
    scipy's layout), which read as ``[channels, time]`` would embed silently wrong audio.

    Raises:
        AudioDecodeError: ``bad-shape``: no or no usable rate, an unusable dtype or layout.
    """
    import numbers

    import torch

    if sample_rate is None:
        raise AudioDecodeError(f"{where}: a waveform needs its sample rate (sample_rate=...)", kind="bad-shape")
    if (isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not math.isfinite(sample_rate)
            or sample_rate <= 0 or sample_rate != int(sample_rate)):
        raise AudioDecodeError(f"{where}: the sample rate must be a positive whole number of samples a second (got {sample_rate!r})",
                               kind="bad-shape")
    wave = torch.as_tensor(audio).detach().cpu()
    name = str(wave.dtype).removeprefix("torch.")
    if name == "uint8":
        wave = (wave.float() - 128.0) / 128.0
    elif name in _PCM_FULL_SCALE:
        wave = wave.float() / _PCM_FULL_SCALE[name]
    elif not wave.is_floating_point():
        raise AudioDecodeError(f"{where}: samples of type {name} have no agreed full scale; pass floats in [-1, 1], "
                               "or int16/int32 PCM", kind="bad-shape")
    if wave.dim() == 2 and wave.shape[0] > wave.shape[1]:
        raise AudioDecodeError(
            f"{where}: a waveform of shape {tuple(wave.shape)} has more channels than samples; waveforms are "
            "[channels, time] (pass wave.T for the [time, channels] of soundfile.read)", kind="bad-shape")
    return wave.float(), int(sample_rate)


def load_waveform(sample: Sample, sample_rate: int, *, check: bool = True) -> torch.Tensor:
    """The whole of a sample's audio as mono float32 ``[T]`` at ``sample_rate``.

    Args:
        sample: Its ``audio`` is a tensor ``[C, T]``/``[T]`` at ``sample.sample_rate``, a path,
            or an audio reference.
        sample_rate: The rate to return (the audio encoder's).
        check: Refuse silent and non-finite audio (:func:`check_waveform`).

    Raises:
        AudioDecodeError: The audio cannot be decoded or is unusable; the message starts
            with the sample id and names the file.
    """
    import torch

    audio = sample.audio
    where = f"sample {sample.id!r}"
    try:
        if torch.is_tensor(audio) or hasattr(audio, "__array__") and not isinstance(audio, (str, os.PathLike)):
            wave, rate = as_waveform(audio, sample.sample_rate, f"{where}'s waveform")
        else:
            wave, rate = decode(audio)
            where = f"{where} ({describe_audio(audio)})"
        wave = to_mono(wave.float())
        if check:
            check_waveform(wave, where)
    except AudioDecodeError as exc:
        raise exc.of_sample(sample.id, path=_path_of(audio)) from None
    return resample(wave, rate, sample_rate).contiguous()


def _path_of(audio: Any) -> str | None:
    name = describe_audio(audio)
    return None if name == "<waveform>" else name


# ------------------------------------------------------------------------ crops and windows


def crop_or_pad(
    wave: torch.Tensor,
    length: int,
    policy: str = "random",
    generator: torch.Generator | None = None,
    pad: str = "repeat",
) -> torch.Tensor:
    """Cut or fill a waveform to exactly ``length`` samples along its last axis.

    Args:
        wave: ``[..., T]``.
        length: Samples wanted.
        policy: Cropping of longer audio: ``random`` (offset drawn from ``generator``, every
            offset reachable), ``center`` or ``start``.
        generator: Seeded generator for ``random``; the loader seeds it per (epoch, item) so
            crops do not depend on worker or rank.
        pad: Filling of shorter audio: ``repeat`` tiles the audio (no silent tail for the
            encoder to learn as a shortcut; CLAP's "repeatpad") or ``zero``.
    """
    import torch

    if policy not in CROP_POLICIES:
        raise ValueError(f"unknown crop policy {policy!r}; expected one of {', '.join(CROP_POLICIES)}")
    if pad not in PAD_POLICIES:
        raise ValueError(f"unknown pad policy {pad!r}; expected one of {', '.join(PAD_POLICIES)}")
    if length <= 0:
        raise ValueError(f"length must be positive (got {length})")
    total = wave.shape[-1]
    if total > length:
        offset = crop_offset(total, length, policy, generator)
        return wave[..., offset : offset + length].contiguous()
    if total < length:
        if pad == "zero" or total == 0:
            return torch.nn.functional.pad(wave, (0, length - total)).contiguous()
        repeats = -(-length // total)
        return wave.repeat(*([1] * (wave.dim() - 1)), repeats)[..., :length].contiguous()
    return wave.contiguous()


def crop_offset(total: int, length: int, policy: str = "random", generator: torch.Generator | None = None) -> int:
    """Where :func:`crop_or_pad` starts a ``length``-sample crop of ``total`` samples.

    The same draw from ``generator`` whether the crop is then cut from a decoded waveform, read
    as a span of a file or sliced from the waveform cache, so all three give the same offset.
    ``total <= length`` gives 0 without drawing.
    """
    import torch

    if total <= length:
        return 0
    if policy == "random":
        return int(torch.randint(0, total - length + 1, (), generator=generator))
    if policy == "center":
        return (total - length) // 2
    if policy == "start":
        return 0
    raise ValueError(f"unknown crop policy {policy!r}; expected one of {', '.join(CROP_POLICIES)}")


def sliding_windows(wave: torch.Tensor, length: int, hop: int | None = None) -> torch.Tensor:
    """Deterministic windows ``[W, length]`` that together cover the whole of a mono ``[T]``.

    For inference: embed every window and mean-pool, so a file always gives the same
    embedding. Windows start at ``0, hop, 2·hop, ...``; the last window is aligned to the end
    of the file (so no audio is lost and no window is padded); a file shorter than ``length``
    gives one repeat-padded window.

    Args:
        wave: Mono waveform ``[T]``.
        length: Window length in samples.
        hop: Step between window starts (default ``length``: no overlap).
    """
    import torch

    hop = length if hop is None else int(hop)
    if length <= 0 or hop <= 0:
        raise ValueError(f"length and hop must be positive (got {length}, {hop})")
    wave = to_mono(wave)
    total = wave.shape[-1]
    if total <= length:
        return crop_or_pad(wave, length, "start", pad="repeat").unsqueeze(0)
    starts = list(range(0, total - length + 1, hop))
    if starts[-1] != total - length:
        starts.append(total - length)
    return torch.stack([wave[s : s + length] for s in starts])


# ------------------------------------------------------------------------------ streaming

DEFAULT_BLOCK_FRAMES = 1 << 16
"""Frames decoded per block when streaming (1.5 s at 44.1 kHz; 0.5 MB of stereo float32)."""


def open_stream(path: Any, block_frames: int = DEFAULT_BLOCK_FRAMES) -> tuple[int, Iterator[torch.Tensor]]:
    """Open an audio file for decoding block by block.

    The file is opened and its format checked at once, so a missing, empty, unreadable or
    unknown file fails here; damage further in (a cut-off end, a corrupt frame) fails while the
    blocks are read. The errors are those of :func:`decode`.

    Args:
        path: A file path, or an audio reference with ``open()``.
        block_frames: Frames per block (the last block may be shorter).

    Returns:
        ``(sample_rate, blocks)``: the file's rate and an iterator of float32 ``[channels, n]``
        tensors that closes the file when exhausted.
    """
    name = describe_audio(path)
    return _diagnosed(path, name, lambda: _soundfile_or_pyav(name, lambda: _stream_soundfile(path, block_frames), lambda: _stream_pyav(path, block_frames)))


def _sf_error(name: str, exc: Exception) -> AudioDecodeError:
    text = getattr(exc, "error_string", None) or str(exc)
    kind = "truncated" if _looks_truncated(text) else "corrupt"
    return AudioDecodeError(
        f"audio file {name!r}: {'truncated or ' if kind == 'truncated' else ''}corrupt ({text})", kind=kind, path=name
    )


def _stream_soundfile(path: Any, block_frames: int) -> tuple[int, Iterator[torch.Tensor]]:
    import soundfile

    name = describe_audio(path)
    stack = contextlib.ExitStack()
    try:
        source = str(path) if isinstance(path, (str, os.PathLike)) else stack.enter_context(path.open())
        handle = stack.enter_context(soundfile.SoundFile(source))
    except soundfile.LibsndfileError as exc:
        stack.close()
        if getattr(exc, "code", None) == _SF_UNRECOGNISED_FORMAT or not _has_audio_magic(path):
            raise _Unrecognised(exc.error_string) from None
        raise _sf_error(name, exc) from None
    except (RuntimeError, ValueError, TypeError) as exc:
        stack.close()
        raise AudioDecodeError(f"audio file {name!r}: corrupt ({exc})", kind="corrupt", path=name) from None
    _check_data_chunk(handle.extra_info, name, stack)
    return int(handle.samplerate), _soundfile_blocks(handle, stack, name, block_frames)


def _soundfile_blocks(handle: Any, stack: contextlib.ExitStack, name: str, block_frames: int) -> Iterator[torch.Tensor]:
    import soundfile
    import torch

    with stack:
        declared, read = handle.frames, 0
        while True:
            try:
                data = handle.read(frames=block_frames, dtype="float32", always_2d=True)
            except soundfile.LibsndfileError as exc:
                raise _sf_error(name, exc) from None
            except (RuntimeError, ValueError, TypeError) as exc:
                raise AudioDecodeError(f"audio file {name!r}: corrupt ({exc})", kind="corrupt", path=name) from None
            if len(data) == 0:
                break
            read += len(data)
            yield torch.from_numpy(data.T.copy())
        if read == 0:
            raise AudioDecodeError(f"audio file {name!r}: holds no audio frames", kind="empty", path=name)
        if declared > 0 and read < declared * (1 - _TRUNCATION_TOLERANCE):
            raise AudioDecodeError(
                f"audio file {name!r}: truncated (its header declares {declared} frames, only {read} decode)",
                kind="truncated",
                path=name,
            )


def _stream_pyav(path: Any, block_frames: int) -> tuple[int, Iterator[torch.Tensor]]:
    import av

    name = describe_audio(path)
    stack = contextlib.ExitStack()
    raw = stack.enter_context(_open_binary(path))
    try:
        container = stack.enter_context(av.open(raw))
    except BaseException:
        stack.close()
        raise
    if not container.streams.audio:
        stack.close()
        raise AudioDecodeError(f"audio file {name!r}: not audio (the container has no audio stream)", kind="not-audio", path=name)
    stream = container.streams.audio[0]
    return int(stream.rate), _pyav_blocks(container, stream, stack, name, block_frames)


def _pyav_blocks(container: Any, stream: Any, stack: contextlib.ExitStack, name: str, block_frames: int) -> Iterator[torch.Tensor]:
    import av
    import numpy as np
    import torch

    with stack:
        resampler = av.AudioResampler(format="fltp")  # planar float32, channels kept
        pending: list[Any] = []
        count = total = 0

        def frames():
            try:
                for frame in container.decode(stream):
                    yield from resampler.resample(frame)
                yield from resampler.resample(None)
            except av.error.FFmpegError as exc:
                raise AudioDecodeError(f"audio file {name!r}: corrupt ({exc})", kind="corrupt", path=name) from None

        for out in frames():
            array = out.to_ndarray()
            pending.append(array)
            count += array.shape[1]
            if count >= block_frames:
                total += count
                yield torch.from_numpy(np.concatenate(pending, axis=1).astype("float32", copy=False))
                pending, count = [], 0
        if pending:
            total += count
            yield torch.from_numpy(np.concatenate(pending, axis=1).astype("float32", copy=False))
        if total == 0:
            raise AudioDecodeError(f"audio file {name!r}: holds no audio frames", kind="empty", path=name)


class StreamResampler:
    """Resample a mono stream block by block to the numbers :func:`resample` gives on the whole.

    torchaudio's resampler convolves the zero-padded signal with a polyphase sinc kernel: each
    group of output samples reads a fixed span of input around its position. This class keeps
    the input a group still needs between blocks, so the output equals whole-signal resampling
    up to float rounding (tested within 1e-6) while holding one block and the kernel's width.
    """

    def __init__(self, orig_rate: int, new_rate: int):
        import torch

        self.orig_rate, self.new_rate = int(orig_rate), int(new_rate)
        self.identity = self.orig_rate == self.new_rate
        self.consumed = 0  # input samples pushed
        self.produced = 0  # output samples returned
        if self.identity:
            return
        transform = _resampler(self.orig_rate, self.new_rate)
        self.kernel, self.width = transform.kernel, int(transform.width)
        gcd = math.gcd(self.orig_rate, self.new_rate)
        self.o, self.n = self.orig_rate // gcd, self.new_rate // gcd
        self._buffer = torch.zeros(self.width)  # the left zero padding
        self._start = -self.width  # input index of _buffer[0]
        self._group = 0  # next output group (n samples each)

    def _groups(self, last: int) -> torch.Tensor:
        """Output groups ``self._group .. last`` (inclusive) from the buffer."""
        import torch

        count = last - self._group + 1
        if count <= 0:
            return torch.zeros(0)
        lo = self._group * self.o - self.width - self._start
        hi = lo + (count - 1) * self.o + 2 * self.width + self.o
        segment = self._buffer[lo:hi]
        with torch.no_grad():
            out = torch.nn.functional.conv1d(segment[None, None], self.kernel, stride=self.o)  # [1, n, count]
        out = out[0].transpose(0, 1).reshape(-1)
        self._group += count
        keep = self._group * self.o - self.width - self._start
        self._buffer = self._buffer[keep:]
        self._start += keep
        return out

    def push(self, block: torch.Tensor) -> torch.Tensor:
        """Feed mono input ``[n]``; returns the output samples it completes."""
        import torch

        self.consumed += block.shape[-1]
        if self.identity:
            self.produced += block.shape[-1]
            return block
        self._buffer = torch.cat([self._buffer, block.float()])
        end = self._start + self._buffer.shape[-1]
        out = self._groups((end - self.width - self.o) // self.o)
        self.produced += out.shape[-1]
        return out

    def flush(self) -> torch.Tensor:
        """The remaining output once the input has ended (the right zero padding applied)."""
        import torch

        if self.identity:
            return torch.zeros(0)
        target = -(-self.n * self.consumed // self.o)  # ceil: torchaudio's output length
        self._buffer = torch.cat([self._buffer, torch.zeros(self.width + self.o)])
        out = self._groups(-(-target // self.n) - 1)
        out = out[: max(0, target - self.produced)]
        self.produced += out.shape[-1]
        return out


def stream_windows(
    audio: Any,
    sample_rate: int,
    length: int,
    hop: int | None = None,
    *,
    source_rate: int | None = None,
    block_frames: int = DEFAULT_BLOCK_FRAMES,
    check: bool = True,
    stats: dict[str, Any] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The windows :func:`sliding_windows` cuts, from audio decoded and resampled in blocks.

    Windows start at ``0, hop, 2·hop, ...``; the last one is aligned to the end of the audio
    and audio shorter than one window gives one repeat-padded window, exactly as
    :func:`sliding_windows` does on the whole waveform. At most about ``length + hop`` output
    samples and one input block are held at any time, whatever the length of the file.

    Args:
        audio: A path, an audio reference with ``open()``, or a waveform ``[C, T]``/``[T]``
            (then ``source_rate`` is required).
        sample_rate: The rate of the windows (the encoder's).
        length: Window length in samples at ``sample_rate``.
        hop: Samples between window starts (default ``length``).
        source_rate: The rate of a waveform given as ``audio``.
        block_frames: Frames decoded per block.
        check: Refuse non-finite audio (at the first bad block) and silent audio (at the end,
            after its windows were yielded: callers discard a file that raises).
        stats: When given, ``stats["samples"]`` is set to the audio's length at
            ``sample_rate`` once it has been read.

    Yields:
        ``(start, window)``: the window's first sample (at ``sample_rate``) and a mono float32
        ``[length]`` tensor.

    Raises:
        AudioDecodeError: As :func:`decode` and :func:`check_waveform`, naming the file.
    """
    import numpy as np
    import torch

    hop = length if hop is None else int(hop)
    if length <= 0 or hop <= 0:
        raise ValueError(f"length and hop must be positive (got {length}, {hop})")
    where = describe_audio(audio)
    if torch.is_tensor(audio) or (hasattr(audio, "__array__") and not isinstance(audio, (str, os.PathLike))):
        wave, rate = as_waveform(audio, source_rate, "a waveform")
        wave = wave if wave.dim() == 2 else to_mono(wave)[None]
        blocks: Iterator[torch.Tensor] = (wave[:, i : i + block_frames] for i in range(0, wave.shape[-1], block_frames))
    else:
        rate, blocks = open_stream(audio, block_frames)
        where = f"audio file {where!r}"
        if rate <= 0:  # FFmpeg guessed a container but no stream rate: random bytes, mostly
            for _ in blocks:  # "holds no audio frames" when there are none, which is the usual case
                break
            raise AudioDecodeError(f"{where}: not audio (no sample rate)", kind="not-audio", path=_path_of(audio))
    resampler = StreamResampler(rate, sample_rate)
    buffer = torch.zeros(0)
    buffer_start = 0  # output index of buffer[0]
    next_start, last_start, peak = 0, -1, 0.0

    def cut(new: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        nonlocal buffer, buffer_start, next_start, last_start
        buffer = torch.cat([buffer, new]) if buffer.numel() else new
        end = buffer_start + buffer.shape[-1]
        while next_start + length <= end:
            offset = next_start - buffer_start
            yield next_start, buffer[offset : offset + length].clone()
            last_start = next_start
            next_start += hop
        # Keep what the next window needs, and at least the last window's worth for the end.
        drop = min(next_start, end - length) - buffer_start
        if drop > 0:
            buffer = buffer[drop:]
            buffer_start += drop

    for block in blocks:
        # Mix-down and peak in NumPy, one thread: on a busy machine PyTorch's two-thread
        # reductions over a [2, 65536] block wait for a core most of the time (8x slower).
        # Summing the channels and dividing is what ``to_mono``'s mean computes.
        array = block.numpy()
        mono_array = array[0] if array.shape[0] == 1 else array.sum(axis=0, dtype=np.float32) / np.float32(array.shape[0])
        if check and mono_array.size:
            block_peak = float(np.abs(mono_array).max())
            if not math.isfinite(block_peak):
                bad = int((~np.isfinite(mono_array)).sum())
                raise AudioDecodeError(f"{where}: non-finite audio ({bad} NaN or infinite values)", kind="non-finite", path=_path_of(audio))
            peak = max(peak, block_peak)
        yield from cut(resampler.push(torch.from_numpy(np.ascontiguousarray(mono_array))))
    yield from cut(resampler.flush())
    total = resampler.produced
    if stats is not None:
        stats["samples"] = total
    if total == 0:
        raise AudioDecodeError(f"{where}: holds no audio frames", kind="empty", path=_path_of(audio))
    if last_start < 0:  # shorter than one window
        yield 0, crop_or_pad(buffer, length, "start", pad="repeat")
    elif last_start != total - length:
        yield total - length, buffer[-length:].clone()
    if check and peak <= SILENCE_THRESHOLD:
        raise AudioDecodeError(f"{where}: silent (peak amplitude {peak:.3g})", kind="silent", path=_path_of(audio))
