"""The musicnn network (Pons & Serra, 2019) in PyTorch, and its TensorFlow weight mapping.

A port of ``build_musicnn`` in ``musicnn/models.py`` (musicnn 0.1.0) for one 3 s log-mel patch
``[187 frames, 96 mels]``:

* **front end** (musically motivated filters on the batch-normalised input): two *timbral*
  blocks, vertical filters 7 frames x 38 / 67 mel bands (40 % / 70 % of 96), 204 filters each,
  the input zero-padded by 3 frames in time; three *temporal* blocks, horizontal filters 128 /
  64 / 32 frames x 1 band, 51 filters each, TensorFlow ``same`` padding. Each block is conv ->
  ReLU -> batch norm -> max over frequency: 2 x 204 + 3 x 51 = 561 channels per frame.
* **mid end**: three 1-D convolutions over time (7 frames, 64 filters, zero padding 3), each
  conv -> ReLU -> batch norm, the 2nd and 3rd with a residual connection. The front end and
  the three mid-end outputs are concatenated (dense connection): 561 + 3 x 64 = 753 channels.
* **back end**: max and mean over time (753 + 753 = 1506 values; TensorFlow flattens the pair
  interleaved, ``[max_0, mean_0, max_1, ...]``), batch norm, dropout 0.5, dense 200 + ReLU,
  batch norm, dropout 0.5, dense 50 (tag logits).

Batch norms are TensorFlow's (``epsilon`` 1e-3, moving-average momentum 0.99).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["BN_EPS", "SHAPES", "TF_EXCLUDED", "TF_LAYERS", "MusicnnNet", "MusicnnOutput", "Shape", "is_excluded", "tf_to_torch"]

BN_EPS = 1e-3
"""``tf.compat.v1.layers.batch_normalization``'s default epsilon."""

N_FRAMES, N_MELS = 187, 96


class Shape(NamedTuple):
    """The widths of a musicnn network."""

    timbral: int  # filters per timbral block (2 blocks)
    temporal: int  # filters per temporal block (3 blocks)
    midend: int  # filters per mid-end layer (3 layers)
    backend: int  # units of the penultimate dense layer
    classes: int  # tags


SHAPES: dict[str, Shape] = {
    # MTT_musicnn and MSD_musicnn: build_musicnn(num_filt_frontend=1.6, num_filt_midend=64,
    # num_units_backend=200): int(1.6*128) = 204 timbral, int(1.6*32) = 51 temporal filters.
    "musicnn": Shape(204, 51, 64, 200, 50),
    # MSD_musicnn_big (only in the musicnn source repository, not in the wheel): 512 / 500.
    "musicnn-big": Shape(204, 51, 512, 500, 50),
    # CPU tests: the same kernels and 187x96 input, a few filters.
    "tiny": Shape(8, 4, 8, 16, 50),
}


class MusicnnOutput(NamedTuple):
    """Per-patch outputs: ``max_pool``/``mean_pool`` ``[N, 753]``, ``penultimate``, ``logits``."""

    max_pool: torch.Tensor
    mean_pool: torch.Tensor
    penultimate: torch.Tensor
    logits: torch.Tensor


def _bn(channels: int) -> nn.Module:
    # TF momentum 0.99 = PyTorch momentum 0.01 (PyTorch weighs the new batch).
    return nn.BatchNorm1d(channels, eps=BN_EPS, momentum=0.01)


class _FrontBlock(nn.Module):
    """conv2d -> ReLU -> batch norm -> max over all frequency positions: ``[N, C, frames]``."""

    def __init__(self, filters: int, kernel: tuple[int, int], time_pad: tuple[int, int]):
        super().__init__()
        self.time_pad = time_pad
        self.conv = nn.Conv2d(1, filters, kernel)
        self.norm = nn.BatchNorm2d(filters, eps=BN_EPS, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, (0, 0, *self.time_pad))  # [N, 1, frames + pad, mels]
        return self.norm(torch.relu(self.conv(x))).amax(dim=3)


class _MidLayer(nn.Module):
    """1-D conv over time (7 frames, zero padding 3) -> ReLU -> batch norm."""

    def __init__(self, in_channels: int, filters: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, filters, 7, padding=3)
        self.norm = _bn(filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.relu(self.conv(x)))


def _same_pad(kernel: int) -> tuple[int, int]:
    # TensorFlow "same" at stride 1 puts the odd padding sample after: 128 -> (63, 64).
    return (kernel - 1) // 2, kernel // 2


class MusicnnNet(nn.Module):
    """musicnn for log-mel patches ``[N, 187, 96]`` (any number of frames works; 187 = 3 s).

    Module names (and the TensorFlow variables they load from, see :data:`TF_LAYERS`):
    ``input_norm``, ``timbral.{0,1}``, ``temporal.{0,1,2}``, ``midend.{0,1,2}``, ``pool_norm``,
    ``dense``, ``dense_norm``, ``classifier``.
    """

    def __init__(self, shape: Shape = SHAPES["musicnn"], n_mels: int = N_MELS):
        super().__init__()
        self.shape = shape
        self.input_norm = nn.BatchNorm2d(1, eps=BN_EPS, momentum=0.01)
        self.timbral = nn.ModuleList(
            _FrontBlock(shape.timbral, (7, int(share * n_mels)), (3, 3)) for share in (0.4, 0.7)
        )
        self.temporal = nn.ModuleList(
            _FrontBlock(shape.temporal, (k, 1), _same_pad(k)) for k in (128, 64, 32)
        )
        front = 2 * shape.timbral + 3 * shape.temporal
        self.midend = nn.ModuleList(_MidLayer(front if i == 0 else shape.midend, shape.midend) for i in range(3))
        self.feature_dim = front + 3 * shape.midend
        self.pool_norm = _bn(2 * self.feature_dim)
        self.dense = nn.Linear(2 * self.feature_dim, shape.backend)
        self.dense_norm = _bn(shape.backend)
        self.classifier = nn.Linear(shape.backend, shape.classes)
        self.dropout = nn.Dropout(0.5)

    def forward(self, patches: torch.Tensor) -> MusicnnOutput:
        """Run ``[N, frames, mels]`` log-mel patches; see :class:`MusicnnOutput`."""
        x = self.input_norm(patches.unsqueeze(1))  # [N, 1, frames, mels]
        front = torch.cat([block(x) for block in (*self.timbral, *self.temporal)], dim=1)  # [N, 561, frames]
        mid1 = self.midend[0](front)
        mid2 = self.midend[1](mid1) + mid1
        mid3 = self.midend[2](mid2) + mid2
        features = torch.cat([front, mid1, mid2, mid3], dim=1)  # [N, 753, frames]
        max_pool, mean_pool = features.amax(dim=2), features.mean(dim=2)
        flat = torch.stack([max_pool, mean_pool], dim=2).flatten(1)  # TF's interleaved flatten
        hidden = self.dense_norm(torch.relu(self.dense(self.dropout(self.pool_norm(flat)))))
        logits = self.classifier(self.dropout(hidden))
        return MusicnnOutput(max_pool, mean_pool, hidden, logits)


TF_LAYERS: dict[str, str] = {
    # TensorFlow scope (tf.compat.v1.layers' automatic names, in graph-building order) -> module
    "batch_normalization": "input_norm",
    "conv2d": "timbral.0.conv",
    "batch_normalization_1": "timbral.0.norm",
    "conv2d_1": "timbral.1.conv",
    "batch_normalization_2": "timbral.1.norm",
    "conv2d_2": "temporal.0.conv",
    "batch_normalization_3": "temporal.0.norm",
    "conv2d_3": "temporal.1.conv",
    "batch_normalization_4": "temporal.1.norm",
    "conv2d_4": "temporal.2.conv",
    "batch_normalization_5": "temporal.2.norm",
    "conv2d_5": "midend.0.conv",
    "batch_normalization_6": "midend.0.norm",
    "conv2d_6": "midend.1.conv",
    "batch_normalization_7": "midend.1.norm",
    "conv2d_7": "midend.2.conv",
    "batch_normalization_8": "midend.2.norm",
    "batch_normalization_9": "pool_norm",
    "dense": "dense",
    "batch_normalization_10": "dense_norm",
    "dense_1": "classifier",
}
"""Every layer of a musicnn checkpoint and the :class:`MusicnnNet` module it loads into."""

_BN_PARAMS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}

TF_EXCLUDED: tuple[str, ...] = (
    r".+/Adam(_1)?$",  # Adam's first/second moment slots of every trainable variable
    r"beta1_power$",  # Adam's running beta powers
    r"beta2_power$",
    r"global_step$",  # the step counter (absent from musicnn's files, excluded if present)
)
"""Checkpoint variables of the optimizer, not of the network (``re.match`` patterns)."""


def tf_to_torch(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The :class:`MusicnnNet` state-dict key and tensor for a TensorFlow variable.

    Kernels are transposed: conv2d ``[h, w, in, out]`` -> ``[out, in, h, w]``; the mid end's
    conv2d over the whole channel axis ``[7, C, 1, out]`` -> Conv1d ``[out, C, 7]``; dense
    ``[in, out]`` -> ``[out, in]``. Names outside :data:`TF_LAYERS` come back unchanged, so a
    strict load reports them.
    """
    scope, _, leaf = name.rpartition("/")
    module = TF_LAYERS.get(scope)
    if module is None:
        return name, value
    if scope.startswith("batch_normalization"):
        return f"{module}.{_BN_PARAMS.get(leaf, leaf)}", value
    if leaf == "bias":
        return f"{module}.bias", value
    if leaf != "kernel":
        return name, value
    if module.startswith("midend."):
        return f"{module}.weight", value[:, :, 0, :].permute(2, 1, 0).contiguous()
    if value.ndim == 4:
        return f"{module}.weight", value.permute(3, 2, 0, 1).contiguous()
    return f"{module}.weight", value.t().contiguous()


def is_excluded(name: str) -> bool:
    """Whether a checkpoint variable is one of :data:`TF_EXCLUDED` (optimizer state)."""
    return any(re.match(p, name) for p in TF_EXCLUDED)
