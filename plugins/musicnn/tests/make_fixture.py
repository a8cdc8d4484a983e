"""Write ``fixtures/musicnn_tf_reference.npz``: the ORIGINAL musicnn network's outputs.

Run this only in a throwaway environment that has TensorFlow and librosa. They are never
dependencies of mtrun or of this plugin; the tests only read the file this script writes::

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu librosa "tf-keras~=2.21.0"
    /tmp/tfenv/bin/pip install --no-deps musicnn==0.1.0
    TF_USE_LEGACY_KERAS=1 /tmp/tfenv/bin/python plugins/musicnn/tests/make_fixture.py

(``tf.compat.v1.layers``, which musicnn's model code uses, needs the legacy Keras 2 package
``tf-keras`` on TensorFlow >= 2.16; ``TF_USE_LEGACY_KERAS=1`` selects it.) Made with
tensorflow-cpu 2.21.0, tf-keras 2.21.0, librosa 0.11.0, numpy 2.4.6, musicnn 0.1.0 (Python
3.11, TensorFlow's plain Eigen kernels: the script sets ``TF_ENABLE_ONEDNN_OPTS=0``, since
oneDNN's round-off changes with the batch size); the versions used are stored in the file's
``meta``.

What it does, for ``MTT_musicnn`` and ``MSD_musicnn``:

1. Builds the graph with the package's own ``musicnn.models.define_model`` (as
   ``musicnn.extractor.extractor`` does: a ``[None, 187, 96]`` placeholder, ``is_training``
   False) and restores the checkpoint shipped in the wheel with ``tf.compat.v1.train.Saver``.
2. Feeds it two seeded random log-mel patches, and the two 3 s patches of a fixed 7 s synthetic
   waveform (stored as int16) after librosa's mel spectrogram with musicnn's settings
   (16 kHz, n_fft 512, hop 256, 96 mels, ``pad_mode="reflect"``, the librosa < 0.10 default the
   published models were trained and released with), the extractor's float16 cast and
   ``log10(10000 x + 1)``.
3. Stores inputs, librosa's mel power, and the taggram (sigmoid), ``max_pool``, ``mean_pool``
   and ``penultimate`` outputs.
4. Checks that ``musicnn.extractor.extractor`` itself (which reads a WAV file and uses the
   installed librosa's default padding) gives the same outputs as the graph run in 1 on its own
   patches, so the fixture is what the package computes; the difference is printed and stored.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

SR, N_FFT, HOP, N_MELS, N_FRAMES = 16_000, 512, 256, 96, 187
MODELS = ("MTT_musicnn", "MSD_musicnn")
OUT = Path(__file__).resolve().parent / "fixtures" / "musicnn_tf_reference.npz"


def synthetic_waveform(seconds: float = 7.0, seed: int = 1234) -> np.ndarray:
    """A fixed, music-like test signal as int16: harmonic chords, a bass line and noise hits."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    y = np.zeros_like(t)
    for k, start in enumerate(np.arange(0.0, seconds, 0.5)):
        seg = (t >= start) & (t < start + 0.5)
        env = np.exp(-3.0 * (t[seg] - start))
        root = 220.0 * 2 ** (rng.integers(0, 12) / 12)
        for ratio in (1.0, 1.25, 1.5):
            for h in range(1, 6):
                y[seg] += env * np.sin(2 * np.pi * root * ratio * h * t[seg]) / (h * 6)
        y[seg] += 0.3 * env * np.sin(2 * np.pi * root / 4 * t[seg])
        if k % 2 == 0:
            hit = seg & (t < start + 0.05)
            y[hit] += 0.4 * rng.standard_normal(hit.sum()) * np.exp(-60 * (t[hit] - start))
    y = 0.5 * y / np.abs(y).max()
    return np.round(y * 32767).astype(np.int16)


def log_patches(mel_power: np.ndarray) -> np.ndarray:
    """musicnn's ``batch_data``: float16 cast, ``log10(10000 x + 1)``, non-overlapping 187-frame patches."""
    rep = np.log10(10000 * mel_power.astype(np.float16) + 1)
    starts = range(0, rep.shape[0] - N_FRAMES + 1, N_FRAMES)
    return np.stack([rep[s : s + N_FRAMES] for s in starts]).astype(np.float32)


def random_patches(n: int = 2, seed: int = 0) -> np.ndarray:
    """Seeded log-mel-like patches: exponential power with a random level per band."""
    rng = np.random.default_rng(seed)
    level = 10.0 ** rng.uniform(-4, 0, size=(n, 1, N_MELS))
    power = rng.exponential(1.0, size=(n, N_FRAMES, N_MELS)) * level
    return np.log10(10000 * power + 1).astype(np.float32)


def run_graph(tf, model: str, patches: np.ndarray) -> dict[str, np.ndarray]:
    from musicnn import models

    tf.compat.v1.reset_default_graph()
    with tf.name_scope("model"):
        x = tf.compat.v1.placeholder(tf.float32, [None, N_FRAMES, N_MELS])
        is_training = tf.compat.v1.placeholder(tf.bool)
        y, _, _, _, _, _, mean_pool, max_pool, penultimate = models.define_model(x, is_training, model, 50)
        taggram = tf.nn.sigmoid(y)
    import musicnn

    folder = os.path.dirname(musicnn.__file__) + "/" + model + "/"
    with tf.compat.v1.Session() as sess:
        tf.compat.v1.train.Saver().restore(sess, folder)
        out = sess.run([taggram, max_pool, mean_pool, penultimate], feed_dict={x: patches, is_training: False})
    return dict(zip(("taggram", "max_pool", "mean_pool", "penultimate"), out))


def main() -> None:
    # Plain Eigen kernels: oneDNN's rewrites change round-off with the batch size.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import librosa
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    import musicnn
    from musicnn.extractor import batch_data, extractor

    pcm = synthetic_waveform()
    y = pcm.astype(np.float32) / 32768.0
    mel = librosa.feature.melspectrogram(y=y, sr=SR, hop_length=HOP, n_fft=N_FFT, n_mels=N_MELS, pad_mode="reflect").T.astype(np.float32)
    data: dict[str, np.ndarray] = {
        "random_patches": random_patches(),
        "wave_int16": pcm,
        "mel_power": mel,
    }
    wave_patches = log_patches(mel)
    checks = {}
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "synthetic.wav"
        with wave.open(str(wav), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(SR)
            f.writeframes(pcm.tobytes())
        own_patches, _ = batch_data(str(wav), N_FRAMES, N_FRAMES)
        for model in MODELS:
            tag = model.split("_")[0].lower()
            for name, patches in (("random", data["random_patches"]), ("wave", wave_patches)):
                for key, value in run_graph(tf, model, patches).items():
                    data[f"{tag}_{key}_{name}"] = value.astype(np.float32)
            # The package's own end-to-end extractor vs our graph run on its patches.
            taggram, _, feats = extractor(str(wav), model=model, input_length=3, extract_features=True)
            ref = run_graph(tf, model, own_patches.astype(np.float32))
            got = {"taggram": taggram, "max_pool": feats["max_pool"], "mean_pool": feats["mean_pool"]}
            checks[model] = {k: float(np.abs(v - ref[k]).max() / max(1.0, np.abs(ref[k]).max())) for k, v in got.items()}
    # Batch size 1 (the extractor) vs a batch of patches: float32 round-off only.
    print("musicnn.extractor vs direct graph run, max abs difference / max(1, max |value|):", json.dumps(checks))
    assert all(v < 1e-5 for c in checks.values() for v in c.values()), checks
    meta = {
        "made_by": "plugins/musicnn/tests/make_fixture.py",
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "librosa": librosa.__version__,
        "numpy": np.__version__,
        "musicnn": getattr(musicnn, "__version__", "0.1.0"),
        "extractor_vs_graph_relative_max_diff": checks,
        "random_seed": 0,
        "wave_seed": 1234,
    }
    data["meta"] = np.array(json.dumps(meta))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **data)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB): {', '.join(sorted(data))}")


if __name__ == "__main__":
    main()
