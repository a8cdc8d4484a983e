"""Data for end-to-end runs of the recipes' tiny profiles in tests: a 60-item subset of the demo
corpus when it is cached, else a synthetic manifest (so a test never triggers the first corpus
build, which takes minutes)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _synthetic_manifest(folder: Path, n: int = 24) -> Path:
    """Two-second tones with captions naming their pitch: a stand-in when no demo corpus is cached."""
    import numpy as np
    import soundfile as sf

    (folder / "audio").mkdir(parents=True)
    rows = []
    for i in range(n):
        t = np.arange(32000) / 16000
        pitch = ["low", "middle", "high"][i % 3]
        wave = 0.3 * np.sin(2 * math.pi * {"low": 220, "middle": 440, "high": 880}[pitch] * (1 + 0.01 * i) * t)
        sf.write(folder / "audio" / f"t{i}.flac", wave.astype("float32"), 16000)
        split = "train" if i < 16 else ("val" if i < 20 else "test")
        rows.append({"id": f"t{i}", "audio": f"audio/t{i}.flac", "captions": [f"A {pitch} tone."],
                     "tags": {"pitch": [pitch]}, "split": split})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_overrides(tmp_path: Path) -> list[str]:
    """The demo corpus when it is cached (a 60-item subset); else a synthetic manifest, so this
    test never triggers the first corpus build (minutes)."""
    from mtrun.data.demo import DemoSettings, corpus_dir

    if (corpus_dir(DemoSettings()) / "manifest.jsonl").is_file():
        return ["data.n_items=60"]
    return ["~data", "data.type=manifest", f"data.path={_synthetic_manifest(tmp_path / 'data')}"]
