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
