"""Audio files in formats the tests need and soundfile cannot write."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_aac(path: Path, data: np.ndarray, rate: int) -> Path:
    """Mono float32 ``data`` as an AAC ``.m4a`` through PyAV (a format only FFmpeg reads here)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(data.astype("float32")[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            out.mux(packet)
    return path


def refuse_reading(monkeypatch, path) -> None:
    """Make ``path`` unreadable to mtrun's audio readers, even for root, for whom ``chmod 000``
    stops no read: Python's ``open`` of it (in :mod:`mtrun.data.audio`) and libsndfile's own
    open in C both fail as the kernel fails them for another user. Call after ``chmod(0)``."""
    import errno
    import os

    import soundfile

    import mtrun.data.audio as audio_module

    if os.geteuid() != 0:
        return  # chmod 000 already does it
    target = os.path.realpath(path)

    def refused(file) -> bool:
        return isinstance(file, (str, os.PathLike)) and os.path.realpath(os.fspath(file)) == target

    def guarded_open(file, *args, **kwargs):
        if refused(file):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return open(file, *args, **kwargs)

    real_soundfile = soundfile.SoundFile

    def guarded_soundfile(file, *args, **kwargs):
        if refused(file):
            raise soundfile.LibsndfileError(2, f"Error opening {file!r}: ")  # SF_ERR_SYSTEM, as for EACCES
        return real_soundfile(file, *args, **kwargs)

    monkeypatch.setattr(audio_module, "open", guarded_open, raising=False)
    monkeypatch.setattr(soundfile, "SoundFile", guarded_soundfile)
