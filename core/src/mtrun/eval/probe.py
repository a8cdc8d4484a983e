"""Probes on frozen audio representations, by the MuLaP protocol.

MuLaP proves its audio backbone by training a small probe on its frozen output: an MLP with
one hidden layer of 512 units (ReLU), Adam at lr 1e-3 with weight decay, the learning rate
halved when the validation metric stops improving, training stopped early on that validation
metric, and the test metric reported as the mean over seeds. Targets: the tags of one
category (single-label → accuracy; multi-label → ROC-AUC / PR-AUC) or a number in
``Sample.extra`` (→ R²). ``hidden = 0`` gives a linear probe.

What the paper does not pin down and we chose: the weight decay (1e-4), the plateau patience
(half the early-stopping patience) and factor (0.5), the train/validation/test split of an
unsplit set (60/20/20), and standardising the features on the training part.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import attrs
import numpy as np

from mtrun.errors import MtrunError
from mtrun.eval import metrics
from mtrun.eval.embed import EmbeddingTask, EmbedSettings, EvalCache
from mtrun.eval.zeroshot import label_matrix

__all__ = ["Probe", "single_thread", "train_probe"]


@contextlib.contextmanager
def single_thread():
    """Run tiny models on one CPU thread (restored afterwards).

    A probe's matrices are a few hundred wide: thread start-up and contention cost far more
    than the arithmetic, and on a busy machine the default thread count made a probe 20x
    slower than one thread.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _validation_score(kind: str, logits: Any, y: Any) -> float:
    """The validation metric early stopping follows (higher is better): accuracy, macro
    ROC-AUC, or R² (on standardised targets); NaN when it cannot be computed."""
    out = logits.detach().numpy()
    y = y.numpy()
    if kind == "single":
        return metrics.accuracy(out, y)
    if kind == "multi":
        return metrics.roc_auc_macro(out, y)
    return metrics.r2_score(out, y)


def train_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray,
    *,
    kind: str,
    seed: int,
    hidden: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    max_epochs: int = 200,
    patience: int = 10,
    stop_on: str = "metric",
) -> np.ndarray:
    """Train one probe and return its outputs on ``x_test``.

    Args:
        kind: ``"single"`` (``y`` int classes; cross-entropy; returns softmax probabilities),
            ``"multi"`` (``y`` 0/1 matrix; binary cross-entropy; returns sigmoid
            probabilities) or ``"regression"`` (``y`` floats ``[N, K]``; MSE on standardised
            targets; returns predictions in the original units).
        seed: Seeds initialisation and batch order. The global torch RNG is left untouched,
            so probing in the middle of training does not change the training trajectory.
        hidden: Units of the hidden layer; 0 = a linear probe.
        weight_decay: Adam's L2 penalty.
        patience: Epochs without a better validation score before stopping; the learning
            rate is halved after ``patience // 2`` of them.
        stop_on: ``"metric"`` (the paper: accuracy, ROC-AUC or R² on the validation part; the
            loss where the metric is undefined, e.g. a class missing there) or ``"loss"``.

    Returns:
        ``[N_test, C]`` probabilities or ``[N_test, K]`` predictions.
    """
    import torch
    from torch import nn

    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # features standardised on train only
    xs = [torch.as_tensor((x - mean) / std, dtype=torch.float32) for x in (x_train, x_val, x_test)]
    if kind == "single":
        n_out = int(max(y_train.max(), y_val.max() if len(y_val) else 0)) + 1
        ys = [torch.as_tensor(y, dtype=torch.long) for y in (y_train, y_val)]
        loss_fn: Any = nn.CrossEntropyLoss()
    elif kind == "multi":
        n_out = y_train.shape[1]
        ys = [torch.as_tensor(y, dtype=torch.float32) for y in (y_train, y_val)]
        loss_fn = nn.BCEWithLogitsLoss()
    else:
        y_mean, y_std = y_train.mean(0), y_train.std(0) + 1e-9
        n_out = y_train.shape[1]
        ys = [torch.as_tensor((y - y_mean) / y_std, dtype=torch.float32) for y in (y_train, y_val)]
        loss_fn = nn.MSELoss()

    # Evaluation during training runs under no_grad and autocast: the probe trains in float32
    # with gradients whatever the caller's context.
    with torch.random.fork_rng(devices=[]), single_thread(), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        torch.manual_seed(seed)
        width = xs[0].shape[1]
        layers = [nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, n_out)] if hidden else [nn.Linear(width, n_out)]
        model = nn.Sequential(*layers)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=max(patience // 2, 1))
        generator = torch.Generator().manual_seed(seed)
        best, best_state, waited = -float("inf"), None, 0
        for _ in range(max_epochs):
            model.train()
            order = torch.randperm(len(xs[0]), generator=generator)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                optimizer.zero_grad()
                loss_fn(model(xs[0][idx]), ys[0][idx]).backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                if len(xs[1]):
                    logits = model(xs[1])
                    score = _validation_score(kind, logits, ys[1]) if stop_on == "metric" else float("nan")
                    if not np.isfinite(score):
                        score = -float(loss_fn(logits, ys[1]))
                else:
                    score = 0.0
            plateau.step(score)
            if score > best + 1e-6:
                best, waited = score, 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
                if waited >= patience:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        with torch.no_grad():
            out = model(xs[2])
    if kind == "single":
        return out.softmax(-1).numpy()
    if kind == "multi":
        return out.sigmoid().numpy()
    return out.numpy() * y_std + y_mean


def _split(n: int, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


class Probe(EmbeddingTask):
    """MuLaP-protocol probe on the frozen audio backbone (512 hidden, Adam 1e-3, weight decay, early stopping on the validation metric)."""

    @attrs.frozen
    class Config(EmbedSettings):
        category: str = attrs.field(default="genre", metadata={"help": "tag category to predict (Sample.tags key)"})
        regression_key: str = attrs.field(
            default="", metadata={"help": "predict the number Sample.extra[KEY] instead (R²); '' = classify tags"}
        )
        features: str = attrs.field(
            default="encoder",
            validator=attrs.validators.in_(("embedding", "encoder")),
            metadata={"help": "'encoder': the audio backbone's pooled output (MuLaP's protocol); 'embedding': the joint audio embedding"},
        )
        mode: str = attrs.field(
            default="auto",
            validator=attrs.validators.in_(("auto", "single", "multi")),
            metadata={"help": "single-label, multi-label, or auto from the data"},
        )
        train_split: str = attrs.field(
            default="",
            metadata={"help": "train the probe on this split of the data source and test on the evaluated one; "
                      "'' = split the evaluated items into train/val/test parts"},
        )
        train_fraction: float = attrs.field(default=0.6, metadata={"help": "share of items to train on (when train_split = '')"})
        val_fraction: float = attrs.field(default=0.2, metadata={"help": "share of items for early stopping"})
        seeds: int = attrs.field(default=3, validator=attrs.validators.ge(1), metadata={"help": "probes trained and averaged"})
        hidden: int = attrs.field(default=512, validator=attrs.validators.ge(0), metadata={"help": "hidden units (MuLaP: 512); 0 = a linear probe"})
        lr: float = attrs.field(default=1e-3, metadata={"help": "Adam learning rate"})
        weight_decay: float = attrs.field(default=1e-4, validator=attrs.validators.ge(0.0), metadata={"help": "Adam weight decay (MuLaP uses some; the value is our choice)"})
        stop_on: str = attrs.field(
            default="metric",
            validator=attrs.validators.in_(("metric", "loss")),
            metadata={"help": "early stopping and LR halving follow the validation 'metric' (MuLaP: accuracy, ROC-AUC or R²) or 'loss'"},
        )
        probe_batch_size: int = attrs.field(default=64, validator=attrs.validators.ge(1), metadata={"help": "probe minibatch"})
        max_epochs: int = attrs.field(default=200, validator=attrs.validators.ge(1), metadata={"help": "epoch limit"})
        patience: int = attrs.field(default=10, validator=attrs.validators.ge(1), metadata={"help": "epochs without val improvement before stopping"})
        seed: int = attrs.field(default=0, metadata={"help": "seed of the item split; probe seeds are seed, seed+1, ..."})

    def __init__(self, config: Config, *, run: Any = None, data: Any = None) -> None:
        super().__init__(config, run=run)
        self._data = data
        self._train_samples: Sequence[Any] | None = None

    # ------------------------------------------------------------------ targets

    def _targets(self, samples: Sequence[Any], classes: list[str] | None) -> tuple[str, np.ndarray, np.ndarray, list[str]]:
        """``(kind, y, usable, classes)`` for the rows of ``samples``."""
        cfg = self.config
        if cfg.regression_key:
            values = [s.extra.get(cfg.regression_key) for s in samples]
            usable = _numbers(samples, cfg.regression_key)
            y = np.array([np.atleast_1d(np.asarray(v, dtype=np.float64)) if u else np.zeros(1) for v, u in zip(values, usable)])
            return "regression", y, usable, []
        tags = [list(s.tags.get(cfg.category, [])) for s in samples]
        classes = classes if classes is not None else sorted({t for ts in tags for t in ts})
        if not classes:
            present = sorted({key for s in samples for key in s.tags})
            raise MtrunError(
                f"[eval] probe: category = {cfg.category!r} labels none of the {len(samples)} items; their tag "
                f"categories are: {', '.join(present) or 'none'} (set category to one of them, or regression_key)"
            )
        labels = label_matrix(tags, classes)
        multi = cfg.mode == "multi" or (cfg.mode == "auto" and any(len(set(ts)) > 1 for ts in tags))
        if multi:
            return "multi", labels.astype(np.float64), labels.any(1), classes
        return "single", labels.argmax(1), labels.sum(1) == 1, classes

    def check_samples(self, samples: Sequence[Any]) -> None:
        """Raise now, before training or embedding, when the target labels none of ``samples``
        (with ``train_split``: none of them and that split's items) or that split is missing."""
        cfg = self.config
        self._check_train_split()
        rows = list(samples)
        if cfg.train_split and self._data is not None:
            rows += list(self._fit_samples())
        if cfg.regression_key:
            if not _numbers(rows, cfg.regression_key).any():
                present = sorted({key for s in rows for key in s.extra})
                raise MtrunError(
                    f"[eval] probe: regression_key = {cfg.regression_key!r} is a number in none of the {len(rows)} items; "
                    f"their extra keys are: {', '.join(present) or 'none'}"
                )
        else:
            self._targets(rows, None)  # raises when the category labels none of them

    def _fit_samples(self) -> Sequence[Any]:
        """``train_split``'s items, loaded once (the set-up check and every validation round use them)."""
        if self._train_samples is None:
            self._train_samples = self._data.load(self.config.train_split)
        return self._train_samples

    def _check_train_split(self) -> None:
        cfg = self.config
        if cfg.train_split and self._data is not None:
            splits = list(self._data.splits())
            if cfg.train_split not in splits:
                raise MtrunError(f"[eval] probe: train_split {cfg.train_split!r} is not a split of the data source (it has: {', '.join(splits)})")

    def _features(self, emb: Any) -> np.ndarray:
        return emb.audio if self.config.features == "embedding" else emb.audio_features

    # ----------------------------------------------------------------- evaluate

    def evaluate(self, system: Any, samples: Sequence[Any], *, cache: EvalCache | None = None) -> dict[str, float]:
        """Fit the probes and report their held-out metrics (means over seeds)."""
        cfg = self.config
        target = cfg.regression_key or cfg.category
        prefix = f"probe/{target}"
        self._check_train_split()  # before any embedding work
        emb = self.embeddings(system, samples, cache)
        x = self._features(emb)
        rows = emb.samples(samples)
        if cfg.train_split and self._data is not None:
            train_samples = self._fit_samples()
            train_emb = self.embeddings(system, train_samples, cache)
            train_rows = train_emb.samples(train_samples)
            # One class list for both sets, so a class index means the same in train and test.
            _, _, _, classes = self._targets(list(rows) + list(train_rows), None)
            kind, y, usable, classes = self._targets(rows, classes)
            _, y_fit, fit_usable, _ = self._targets(train_rows, classes)
            x_fit, y_fit = self._features(train_emb)[fit_usable], y_fit[fit_usable]
            x_test, y_test = x[usable], y[usable]
            fit_idx, val_idx, _ = _split(len(x_fit), (1.0 - cfg.val_fraction, cfg.val_fraction), cfg.seed)
            parts = (x_fit[fit_idx], y_fit[fit_idx], x_fit[val_idx], y_fit[val_idx], x_test, y_test)
        else:
            kind, y, usable, classes = self._targets(rows, None)
            x_all, y_all = x[usable], y[usable]
            tr, va, te = _split(len(x_all), (cfg.train_fraction, cfg.val_fraction), cfg.seed)
            parts = (x_all[tr], y_all[tr], x_all[va], y_all[va], x_all[te], y_all[te])
        out = {f"{prefix}/n_train": float(len(parts[0])), f"{prefix}/n_test": float(len(parts[4]))}
        if len(parts[0]) < 2 or len(parts[4]) < 1 or (kind != "regression" and not classes):
            return out
        results: dict[str, list[float]] = {}
        for s in range(cfg.seeds):
            pred = train_probe(
                *parts[:5],
                kind=kind,
                seed=cfg.seed + s,
                hidden=cfg.hidden,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                stop_on=cfg.stop_on,
                batch_size=cfg.probe_batch_size,
                max_epochs=cfg.max_epochs,
                patience=cfg.patience,
            )
            y_test = parts[5]
            if kind == "single":
                found = {"accuracy": metrics.accuracy(_pad_columns(pred, len(classes)), y_test)}
            elif kind == "multi":
                found = {"roc_auc": metrics.roc_auc_macro(pred, y_test), "pr_auc": metrics.pr_auc_macro(pred, y_test)}
            else:
                found = {"r2": metrics.r2_score(pred, y_test)}
            for key, value in found.items():
                results.setdefault(key, []).append(value)
        for key, values in results.items():
            out[f"{prefix}/{key}"] = float(np.mean(values))
            out[f"{prefix}/{key}:std"] = float(np.std(values))
        return out


def _numbers(samples: Sequence[Any], key: str) -> np.ndarray:
    """Per sample: whether ``extra[key]`` is a number (or a vector of them) to regress on."""
    values = [s.extra.get(key) for s in samples]
    return np.array([isinstance(v, (int, float, list, tuple)) and not isinstance(v, bool) for v in values], dtype=bool)


def _pad_columns(probs: np.ndarray, n: int) -> np.ndarray:
    """Classes never seen in training get probability 0 (the probe had no output for them)."""
    if probs.shape[1] >= n:
        return probs
    return np.concatenate([probs, np.zeros((len(probs), n - probs.shape[1]))], axis=1)
