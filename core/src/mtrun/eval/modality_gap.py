"""The modality gap (SLAP): how far apart audio and text embeddings live in the joint space.

Two numbers: the Euclidean distance between the centroids of the L2-normalised audio and text
embeddings, and the held-out accuracy of a logistic regression that tells audio from text
(0.5 = the modalities are indistinguishable, 1.0 = linearly separable).
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs
import numpy as np

from mtrun.eval.embed import EmbeddingTask, EmbedSettings, EvalCache

__all__ = ["ModalityGap", "centroid_distance", "separability"]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def centroid_distance(audio: np.ndarray, text: np.ndarray) -> float:
    """``|| mean(normalise(audio)) - mean(normalise(text)) ||``."""
    return float(np.linalg.norm(_normalise(audio).mean(0) - _normalise(text).mean(0)))


def separability(
    audio: np.ndarray, text: np.ndarray, *, test_fraction: float = 0.5, seed: int = 0, l2: float = 1e-3, steps: int = 200
) -> float:
    """Held-out accuracy of a logistic regression separating audio (1) from text (0).

    The larger side is subsampled to the smaller (seeded), so chance is exactly 0.5; each
    modality is split into train and test parts with the same fraction. The model is fitted by
    L-BFGS on standardised features with a small L2 penalty.
    """
    import torch

    rng = np.random.default_rng(seed)
    n = min(len(audio), len(text))
    if n < 4:
        return float("nan")
    a = _normalise(audio)[rng.permutation(len(audio))[:n]]
    t = _normalise(text)[rng.permutation(len(text))[:n]]
    n_test = max(1, int(round(test_fraction * n)))
    x_train = np.concatenate([a[n_test:], t[n_test:]])
    y_train = np.r_[np.ones(n - n_test), np.zeros(n - n_test)]
    x_test = np.concatenate([a[:n_test], t[:n_test]])
    y_test = np.r_[np.ones(n_test), np.zeros(n_test)]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    xtr = torch.as_tensor((x_train - mean) / std, dtype=torch.float64)
    ytr = torch.as_tensor(y_train, dtype=torch.float64)
    w = torch.zeros(xtr.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xtr @ w + b, ytr) + l2 * (w * w).sum()
        loss.backward()
        return loss

    from mtrun.eval.probe import single_thread

    with single_thread():
        optimizer.step(closure)
    with torch.no_grad():
        logits = torch.as_tensor((x_test - mean) / std, dtype=torch.float64) @ w + b
    return float(((logits.numpy() > 0) == (y_test > 0.5)).mean())


class ModalityGap(EmbeddingTask):
    """SLAP's modality gap: centroid distance and audio-vs-text logistic-regression accuracy."""

    @attrs.frozen
    class Config(EmbedSettings):
        test_fraction: float = attrs.field(default=0.5, metadata={"help": "held-out share for the logistic regression"})
        seed: int = attrs.field(default=0, metadata={"help": "seed of the subsampling and the split"})

    def evaluate(self, system: Any, samples: Sequence[Any], *, cache: EvalCache | None = None) -> dict[str, float]:
        """Both gap measures on the split's clips and captions."""
        emb = self.embeddings(system, samples, cache)
        out = {"modality-gap/n": float(min(len(emb.audio), len(emb.texts)))}
        if len(emb.audio) and len(emb.texts):
            out["modality-gap/centroid_distance"] = centroid_distance(emb.audio, emb.texts)
            out["modality-gap/logreg_accuracy"] = separability(
                emb.audio, emb.texts, test_fraction=self.config.test_fraction, seed=self.config.seed
            )
        return out
