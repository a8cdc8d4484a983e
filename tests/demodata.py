"""Data for end-to-end runs of the recipes' tiny profiles in tests: a 60-item subset of the demo
corpus when it is cached, else a synthetic manifest (so a test never triggers the first corpus
build, which takes minutes)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _synthetic_manifest(folder: Path, n: int = 24) -> Path:
    """Two-second tones with captions naming their pitch: a stand-in when no demo corpus is cached.
    Tagged, like the demo corpus, with a genre and an instrument in every split, so the recipes'
    zero-shot and probe evaluations (checked before training) have tags to score."""
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
                     "tags": {"pitch": [pitch], "genre": [["baroque", "folk"][i % 2]], "instrument": [["piano", "organ"][(i // 2) % 2]]},
                     "split": split})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cached_demo_corpus() -> Path | None:
    """The folder of the demo corpus (default settings) when mtrun-demo is installed and the
    corpus is cached; else None."""
    try:
        from mtrun_demo import DemoSettings, corpus_dir
    except ImportError:  # core without the mtrun-demo plugin
        return None
    folder = corpus_dir(DemoSettings())
    return folder if (folder / "manifest.jsonl").is_file() else None


def demo_subset_manifest(folder: Path, n_items: int) -> Path | None:
    """A manifest of ``n_items`` items of the cached demo corpus, each split keeping its share
    (chosen by a hash of the id, like the ``demo`` source's ``n_items``), its audio paths
    pointing into the cache; None when the corpus is not cached. Read with ``type = "manifest"``,
    it needs no plugin."""
    corpus = cached_demo_corpus()
    if corpus is None:
        return None
    import hashlib

    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines() if line.strip()]
    by_split: dict[str, list[dict]] = {}
    for row in rows:
        by_split.setdefault(row.get("split", "train"), []).append(row)
    kept = []
    for items in by_split.values():
        keep = max(1, round(n_items * len(items) / len(rows)))
        chosen = {r["id"] for r in sorted(items, key=lambda r: hashlib.sha256(r["id"].encode()).digest())[:keep]}
        kept += [{**r, "audio": str(corpus / r["audio"])} for r in items if r["id"] in chosen]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return path


def data_overrides(tmp_path: Path) -> list[str]:
    """The demo corpus when it is cached (a 60-item subset); else a synthetic manifest, so this
    test never triggers the first corpus build (minutes)."""
    if cached_demo_corpus() is not None:
        return ["data.n_items=60"]
    return ["~data", "data.type=manifest", f"data.path={_synthetic_manifest(tmp_path / 'data')}"]
