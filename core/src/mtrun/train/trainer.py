"""The default trainer: one readable loop for single-process and torchrun DDP training.

Features switch on by config, not by subclass: gradient accumulation (or, with
``gradient_cache``, an exact large batch in the memory of a micro-batch:
:mod:`mtrun.train.gradient_cache`), bf16 autocast, gradient clipping, the optimizer and
learning-rate schedule of ``[trainer.optimizer]`` and ``[trainer.schedule]``, periodic
evaluation with best-checkpoint tracking, step-level atomic checkpoints and exact resume.

Exact resume rests on one rule: no random draw depends on what ran before. Data order, crops,
captions and sample augmentation are seeded per (epoch, item) by the loader; batch-level
augmenters draw per item from seeds of (step, item id) (``AugmentContext.item_rand``), so an
item gets the same masks on any rank of a torchrun job, with the step's generator per (step,
micro-batch, rank) kept for draws that need no such guarantee; and the global
Python/NumPy/torch RNGs (dropout) are re-seeded at the start of every step from (seed, step,
rank) (:func:`_seed_step`). A run killed at
any step and resumed from its last checkpoint therefore continues bit-for-bit on the path of
an uninterrupted run on the same hardware.

Host syncs: a step reads back one small tensor (its loss and the spread metrics the collapse
monitor watches, averaged over ranks) to check it before the optimizer step; the other metrics
stay on the device and are summed, averaged over ranks and read back only on log steps.

Non-finite numbers: by default a non-finite loss or gradient norm stops training before the
optimizer step (``[trainer].nonfinite = "stop"``). With ``nonfinite = "skip"`` such a step is
skipped and counted instead, up to ``max_nonfinite_steps`` in the run (see
:meth:`DefaultTrainer._skip`).

Collapse: every step the spread of the embeddings (``embedding_std/...`` metrics) is watched;
``collapse_patience`` steps in a row below ``collapse_threshold`` warn, or stop training with
``on_collapse = "stop"`` (:mod:`mtrun.train.collapse`).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import attrs
import numpy as np
import torch
from torch import nn

from mtrun import distributed
from mtrun.config import non_negative, positive
from mtrun.data.loader import BatchLoader
from mtrun.devices import pick_device
from mtrun.errors import ResumeError, TrainingError
from mtrun.interfaces import AugmentContext, Batch, DataSource, EvalTask
from mtrun.run import Run
from mtrun.spec import ComponentSpec, component_field, label
from mtrun.system import System
from mtrun.train.checkpoint import (
    Checkpoint,
    CheckpointManager,
    CheckpointWriteError,
    CorruptCheckpointError,
    read_checkpoint,
    resolve_resume,
    step_dir_name,
)
from mtrun.train.collapse import CollapseMonitor, is_spread_metric
from mtrun.train.gradient_cache import (
    KEY as GRADIENT_CACHE,
    all_reduce_gradients,
    gradient_cache_problems,
    gradient_cache_step,
)
from mtrun.train.interrupts import StopRequests
from mtrun.train.metrics import MetricsLogger, console_lines
from mtrun.train.optim import AdamW
from mtrun.train.progress import Progress
from mtrun.train.rng import capture_rng, derive_seed, restore_rng, seed_everything
from mtrun.train.schedule import Cosine, lambda_lr

__all__ = [
    "DefaultTrainer",
    "TrainState",
    "cpu_bf16_hardware",
    "cpu_has_fast_bf16",
    "precision_for_ratio",
    "resolve_precision",
    "settle_precision",
    "time_cpu_precisions",
    "timed_auto_precision",
]

def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16).

    Without either, oneDNN and PyTorch's CPU kernels convert bf16 to float32 and back around
    every matmul and attention block, so ``precision = "bf16"`` costs time instead of saving it
    (measured 2.6-3.4x slower per ViT training step on an AVX512 Xeon without them; see
    ``benchmarks/masking.py --bf16``).
    """
    found = cpu_bf16_hardware()
    if found is None:  # cannot tell (not Linux, no probe in this torch): assume yes rather than warn wrongly
        return True
    return found["amx"] or found["avx512_bf16"]


def cpu_bf16_hardware() -> dict[str, bool] | None:
    """``{"amx": ..., "avx512_bf16": ...}`` for this CPU, or ``None`` where it cannot be told.

    Asks torch's CPU probes where this build has them (torch 2.10 does; 2.11 dropped them),
    else the kernel's CPU flags in ``/proc/cpuinfo`` (``amx_tile``, ``avx512_bf16``).
    """
    cpu = getattr(torch._C, "_cpu", None)
    amx, avx = getattr(cpu, "_is_amx_tile_supported", None), getattr(cpu, "_is_avx512_bf16_supported", None)
    if amx is not None and avx is not None:
        return {"amx": bool(amx()), "avx512_bf16": bool(avx())}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    return {"amx": "amx_tile" in flags, "avx512_bf16": "avx512_bf16" in flags}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` where the hardware does bfloat16 fast (a CUDA GPU that supports it, a
    CPU with AMX or AVX512-BF16), else ``fp32``; ``fp32`` and ``bf16`` are returned as they are.
    On such a CPU the trainer then times both on the model (:func:`time_cpu_precisions`)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"


AUTO_BF16_MARGIN = 0.9
"""On a CPU, ``auto`` keeps bf16 only where it took less than this fraction of fp32's time: a near
tie keeps fp32, which rounds less and gives the same numbers on every CPU."""


def time_cpu_precisions(system: System, *, batch_size: int, clip_samples: int, repeats: int = 2) -> float:
    """bf16 time / fp32 time of the encoders' forward + backward on this CPU (below 1: bf16 is faster).

    Why measure: fast bf16 hardware (AMX, AVX512-BF16) speeds up large matmuls, but a small
    model's step is casts, LayerNorms and attention backward (slower in bf16 on CPUs), so the
    quickstart's tiny model trains 1.6x *slower* in bf16 on an AMX Xeon while ViT-B trains 1.6x
    faster on an AVX512-BF16 EPYC (docs/performance.md, "bf16 and fp32"). Synthetic inputs of
    the training clip length, ``min(batch_size, 8)`` items; the system in eval mode (no dropout
    draws, no batch-norm statistics moved), the global RNGs restored and the gradients cleared
    afterwards, so training then starts exactly as it would have.
    """
    from mtrun.encoder_cache import EncoderCache

    audio, text = system.audio_encoder, system.text_encoder
    n = max(1, min(batch_size, 8))
    was_training = system.training
    cache = getattr(system, "encoder_cache", None)
    if cache is not None:  # time the encoders, not cache lookups, and store no synthetic entries
        EncoderCache.detach(audio)
        EncoderCache.detach(text)
    params = [p for p in system.parameters() if p.requires_grad]
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with torch.random.fork_rng(devices=[]):
        system.eval()
        try:
            with torch.no_grad():
                waves = 0.1 * torch.randn(n, clip_samples, generator=torch.Generator().manual_seed(0))
                features = audio.preprocess(waves)
            tokens = text.tokenize(["a slow piano ballad with soft strings and a warm voice"] * n)

            def step(precision: str) -> None:
                cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
                with cast:
                    out = audio(features).pooled.float().sum() + text(tokens["input_ids"], tokens["attention_mask"]).pooled.float().sum()
                if out.requires_grad:
                    out.backward()

            for round_ in range(repeats + 1):  # round 0 warms both up
                for precision, seen in times.items():
                    start = time.perf_counter()
                    step(precision)
                    if round_:
                        seen.append(time.perf_counter() - start)
        finally:
            for p in params:
                p.grad = None
            system.train(was_training)
            if cache is not None:
                cache.attach(audio, "[audio_encoder]")
                cache.attach(text, "[text_encoder]")
    return min(times["bf16"]) / min(times["fp32"])


def precision_for_ratio(ratio: float) -> str:
    """``auto``'s choice on a fast-bf16 CPU from :func:`time_cpu_precisions`' bf16 / fp32 time ratio."""
    return "bf16" if ratio < AUTO_BF16_MARGIN else "fp32"


def settle_precision(precision: str, device: torch.device, system: System, *, batch_size: int, clip_samples: int) -> str:
    """The precision the trainer would train ``system`` in: :func:`resolve_precision`, then, for
    ``auto`` on a fast-bf16 CPU, the timed choice (:func:`timed_auto_precision`). For benchmarks
    and tools that run a System outside the trainer; call it before training (it times steps)."""
    chosen = resolve_precision(precision, device)
    if precision == "auto" and device.type == "cpu" and chosen == "bf16":
        chosen, _ = timed_auto_precision(system, batch_size=batch_size, clip_samples=clip_samples)
    return chosen


def timed_auto_precision(
    system: System, *, batch_size: int, clip_samples: int, reduce: Callable[[float], float] = float
) -> tuple[str, str]:
    """``auto``'s choice on a CPU whose hardware does bf16, and why: bf16 only where the timed
    forward + backward (:func:`time_cpu_precisions`) takes under :data:`AUTO_BF16_MARGIN` of
    fp32's time. ``reduce`` combines the ranks' ratios (the trainer's mean over ranks); an
    encoder that cannot be timed on synthetic inputs, on any rank, keeps the hardware's bf16."""
    why = ""
    try:
        ratio = time_cpu_precisions(system, batch_size=batch_size, clip_samples=clip_samples)
    except Exception as exc:  # noqa: BLE001 - an encoder that rejects synthetic inputs: keep the hardware's answer
        ratio = math.nan
        why = f", as the hardware suggests: timing the encoders failed ({type(exc).__name__}: {exc})"
    ratio = float(reduce(ratio))  # NaN if any rank failed: then all keep bf16
    if math.isnan(ratio):
        return "bf16", why or ", as the hardware suggests: another rank could not time the encoders"
    return precision_for_ratio(ratio), f": bf16 took {ratio:.2f}x fp32's time for the encoders' forward + backward here"


def _seed_step(seed: int) -> None:
    """:func:`~mtrun.train.rng.seed_everything` for the training loop, a seventh of its cost:
    torch's CPU generator is seeded directly, and CUDA's only once CUDA is initialised (the
    device is chosen before the loop, so it is by the first step that uses it), rather than
    through ``torch.manual_seed``, which also visits every other backend (~70 µs a step)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def loader_frame_features(system: System, loader: Any) -> Any:
    """The audio encoder's ``frame_features`` when ``[loader] cache = "features"``, else ``None``.

    Raises:
        TrainingError: The encoder declares none, or a ``waveform`` augmenter must act first
            (the message names the recipe key and what to set instead).
    """
    if getattr(loader, "cache", "off") != "features":
        return None
    from mtrun.data.feature_cache import frame_features_for
    from mtrun.errors import MtrunError

    try:
        encoder = system.audio_encoder
        return frame_features_for(encoder, system.augmenters, encoder_label=label(encoder, "[audio_encoder]"))
    except MtrunError as exc:
        raise TrainingError(str(exc)) from None


def loader_preprocess(system: System, device: torch.device | str) -> Any:
    """The audio encoder's ``preprocess`` for the data loader to run, or ``None``.

    Only when training on the CPU, the encoder declares ``preprocess_in_loader`` (its features
    are a fixed function of the waveform: no parameters it learns, no randomness) and no
    ``waveform`` augmenter has to act before it. The loader's workers then compute the features
    beside the training step, on the other cores. On a GPU the step computes them, on the GPU:
    faster than any CPU worker, and the encoder's constants live there (a worker process cannot
    touch CUDA tensors).
    """
    if torch.device(device).type != "cpu":
        return None
    encoder = system.audio_encoder
    if not getattr(encoder, "preprocess_in_loader", False):
        return None
    if any(a.stage == "waveform" for a in system.augmenters):
        return None
    return encoder.preprocess


@attrs.define
class TrainState:
    """Where training is; saved in every checkpoint as ``trainer_state.json``.

    Attributes:
        step: Optimizer steps done.
        epoch: Epoch of the next global batch.
        batch: Index of the next global batch within ``epoch``.
        best_value: Best value of the best metric so far (``None`` before any evaluation).
        best_checkpoint: Folder name of the checkpoint holding it.
        evals_since_best: Evaluations since the best metric last improved (early stopping).
        stopped_early: Training ended by early stopping; a resumed run does not continue.
        nonfinite_skipped: Steps skipped so far for a non-finite loss or gradient
            (``[trainer].nonfinite = "skip"``); checkpoints written before this field existed
            load with 0.
        evaluation_due: The evaluation due at ``step`` failed, and the step was saved before
            the error reached the user: a resumed run evaluates it first.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    best_value: float | None = None
    best_checkpoint: str | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    nonfinite_skipped: int = 0
    evaluation_due: bool = False


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, Batch):
        return Batch({k: _to_device(v, device) for k, v in value.items()})
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _scalar(value: Any, device: torch.device) -> torch.Tensor:
    """A logged number as a detached float32 0-d tensor on ``device`` (packed for one all-reduce)."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).detach()


def _float(value: Any) -> float:
    return float(value.detach().float().item()) if torch.is_tensor(value) else float(value)



@attrs.define
class _Window:
    """Training metrics of the steps since the last log line.

    ``steps`` counts the applied steps the means are over; ``skipped`` the steps skipped for a
    non-finite loss or gradient, whose numbers are left out of the means (one NaN would make
    them all NaN) but whose samples count in the throughput. The loss (already averaged over
    ranks, read back every step for the finiteness check) is summed as a float; the other
    metrics are kept as this rank's detached device tensors and summed, averaged over ranks and
    read back once, in :meth:`means` (every rank logs at the same steps).
    """

    loss: float = 0.0
    steps: int = 0
    skipped: int = 0
    metrics: list[dict[str, torch.Tensor]] = attrs.field(factory=list)
    grad_norm: float | None = None
    lr: float = 0.0
    start: float = attrs.field(factory=time.perf_counter)

    def add(self, loss: float, metrics: dict[str, torch.Tensor], grad_norm: float | None, lr: float) -> None:
        self.loss += loss
        self.steps += 1
        self.lr = lr  # the rate the latest step ran at
        self.metrics.append(metrics)
        if grad_norm is not None:
            self.grad_norm = (self.grad_norm or 0.0) + grad_norm

    def skip(self, lr: float) -> None:
        self.skipped += 1
        self.lr = lr

    def means(self, epoch: int, batch_size: int) -> dict[str, float]:
        """The log record: means over the window's applied steps (none when every step in it
        was skipped), and its throughput."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": self.lr,
            "samples_per_s": (self.steps + self.skipped) * batch_size / elapsed,
        }
        if self.steps:
            record["loss"] = self.loss / self.steps
            keys = sorted({k for step in self.metrics for k in step})
            if keys:
                sums = torch.stack([torch.stack([step[k] for step in self.metrics if k in step]).sum() for k in keys])
                record.update(zip(keys, (distributed.all_reduce_mean(sums) / self.steps).tolist()))
            if self.grad_norm is not None:
                record["grad_norm"] = self.grad_norm / self.steps
        return record


@attrs.define(eq=False)
class _Fit:
    """What one call of :meth:`DefaultTrainer.fit` works with; made by ``_set_up``.

    Attributes:
        model: The system, or its DDP wrapper when training on several ranks.
        optimizer, scheduler: ``None`` when nothing is trainable.
        manager: Writes checkpoints; rank 0 only.
        start_step: The step training (re)started at.
        last_checkpoint: The latest checkpoint folder written or resumed from (error messages).
        saved_at, evaluated_at: The last step checkpointed and evaluated (-1 = none).
        final: The latest logged training metrics.
        last_val: The latest evaluation's results.
    """

    device: torch.device
    rank: int
    world: int
    run_dir: Path
    system: System
    model: nn.Module
    loader: BatchLoader
    val_loader: BatchLoader | None
    val_samples: Sequence[Any] | None
    steps_per_epoch: int
    total: int
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR | None
    manager: CheckpointManager | None
    logger: MetricsLogger
    progress: Progress
    start_step: int
    last_checkpoint: str | None
    saved_at: int = -1
    evaluated_at: int = -1
    final: dict[str, Any] = attrs.field(factory=dict)
    last_val: dict[str, float] = attrs.field(factory=dict)
    window: _Window = attrs.field(factory=_Window)
    collapse: CollapseMonitor | None = None
    parameters: list[nn.Parameter] = attrs.field(factory=list)
    """The system's parameters, listed once (walking the module tree costs ~1 ms a step)."""

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"


class DefaultTrainer:
    """Trains a :class:`~mtrun.system.System` with the optimizer and schedule of its
    ``[trainer.optimizer]`` and ``[trainer.schedule]`` tables; single process or torchrun DDP.

    Files it writes (rank 0) in ``run.dir``: ``metrics.jsonl``, ``tensorboard/`` and
    ``checkpoints/`` (see :mod:`mtrun.train.checkpoint`). Resuming follows
    ``run.config.resume``: ``"latest"`` continues from ``run.dir/checkpoints`` (or starts fresh
    when there is none yet), a path continues from that checkpoint folder.

    Step numbers: ``AugmentContext.step`` is the 0-based index of the step being computed;
    ``system.on_step_end(step, total)`` receives the number of optimizer steps done (1 after
    the first), so ``step / total`` reaches 1 on the last step (BYOL's cosine EMA rate); logs
    and checkpoint folders use the same count. The logged ``loss`` is the mean over the steps
    since the previous log line, over micro-batches and over ranks.

    A non-finite loss or gradient norm stops training with a :class:`TrainingError` before the
    optimizer step, naming the step and the last good checkpoint. With ``nonfinite = "skip"``
    the step is skipped instead (see :meth:`_skip`), the log records carry the running count
    ``nonfinite_skipped``, and the ``max_nonfinite_steps + 1``-th skip stops the same way.

    Ctrl-C or SIGTERM (single process) lets the step in progress finish, checkpoints it and
    then raises ``KeyboardInterrupt``, so the command line can print how to resume; a second
    signal stops at once.

    Args:
        config: The ``[trainer]`` table.
        system: The assembled model.
        data: The data source; ``config.train_split`` is required, ``config.val_split`` is
            used when the source has it.
        run: The run folder, seed, device and resolved recipe.
        evals: Evaluation tasks run on the validation split at every evaluation.
    """

    @attrs.frozen
    class Config:
        batch_size: int = attrs.field(
            default=32, validator=positive,
            metadata={"help": "global batch size: items per optimizer step over all ranks and micro-batches"},
        )
        grad_accum: int = attrs.field(
            default=1, validator=positive,
            metadata={"help": "micro-batches per optimizer step (gradient accumulation)"},
        )
        gradient_cache: bool = attrs.field(
            default=False,
            metadata={
                "help": "exact large-batch contrastive steps in a micro-batch's memory: embed the grad_accum "
                "micro-batches without a graph, compute the loss over the whole batch, then re-run each "
                "micro-batch with its embeddings' gradients (one extra forward per step); needs objectives "
                "that declare embedding_only (infonce) and no batch normalisation"
            },
        )
        epochs: int = attrs.field(
            default=1, validator=non_negative,
            metadata={"help": "epochs to train when max_steps is 0"},
        )
        max_steps: int = attrs.field(
            default=0, validator=non_negative,
            metadata={"help": "optimizer steps to train; when > 0 it wins over epochs"},
        )
        optimizer: ComponentSpec = component_field(
            "optimizer", default=("adamw", AdamW),
            help="the optimizer, its peak lr, weight decay and per-component lr_scale ([trainer.optimizer])",
        )
        schedule: ComponentSpec = component_field(
            "schedule", default=("cosine", Cosine),
            help="the learning-rate schedule: warm-up, then its decay ([trainer.schedule])",
        )
        grad_clip: float = attrs.field(
            default=0.0, validator=non_negative,
            metadata={"help": "clip the global gradient norm to this (0 = off)"},
        )
        nonfinite: str = attrs.field(
            default="stop", validator=attrs.validators.in_(("stop", "skip")),
            metadata={"help": "on a non-finite loss or gradient: stop (raise before the optimizer step) or skip the step's update and count it"},
        )
        max_nonfinite_steps: int = attrs.field(
            default=10, validator=non_negative,
            metadata={"help": "with nonfinite = 'skip': stop when more than this many steps of the run were skipped"},
        )
        collapse_threshold: float = attrs.field(
            default=0.05, validator=non_negative,
            metadata={"help": "collapse monitor: a watched embedding_std metric (1 = embeddings spread over the sphere, 0 = all the same) below this counts as collapsed; 0 = off"},
        )
        collapse_patience: int = attrs.field(
            default=20, validator=positive,
            metadata={"help": "collapse monitor: steps in a row below collapse_threshold before on_collapse acts"},
        )
        on_collapse: str = attrs.field(
            default="warn", validator=attrs.validators.in_(("warn", "stop")),
            metadata={"help": "collapse monitor: warn (once per collapse) or stop training with an error"},
        )
        precision: str = attrs.field(
            default="fp32", validator=attrs.validators.in_(("fp32", "bf16", "auto")),
            metadata={"help": "fp32, bf16 (torch.autocast on CPU and CUDA), or auto: bf16 on CUDA GPUs that support it; on CPUs with AMX/AVX512-BF16, bf16 if a timed forward + backward of the encoders at the start is at least 10% faster in it (a resumed run keeps its choice); else fp32"},
        )
        eval_every: int = attrs.field(
            default=0, validator=non_negative,
            metadata={"help": "evaluate every N steps (0 = only at the end)"},
        )
        checkpoint_every: int = attrs.field(
            default=1000, validator=non_negative,
            metadata={"help": "write a checkpoint every N steps (0 = only at the end and at new bests)"},
        )
        keep_last: int = attrs.field(
            default=3, validator=positive,
            metadata={"help": "step checkpoints to keep (the best is kept in addition)"},
        )
        best_metric: str = attrs.field(
            default="val/loss",
            metadata={"help": "evaluation metric that picks the best checkpoint"},
        )
        best_mode: str = attrs.field(
            default="min", validator=attrs.validators.in_(("min", "max")),
            metadata={"help": "min or max: whether smaller or larger best_metric is better"},
        )
        early_stopping_patience: int = attrs.field(
            default=0, validator=non_negative,
            metadata={"help": "stop when best_metric has not improved for this many evaluations in a row (0 = off)"},
        )
        log_every: int = attrs.field(
            default=10, validator=positive,
            metadata={"help": "log training metrics every N steps"},
        )
        train_split: str = attrs.field(default="train", metadata={"help": "split to train on"})
        val_split: str = attrs.field(
            default="val",
            metadata={"help": "split to evaluate on (skipped when the source lacks it)"},
        )
        find_unused_parameters: bool = attrs.field(
            default=False,
            metadata={"help": "DDP: allow parameters that get no gradient in a step (slower)"},
        )

    def __init__(
        self,
        config: DefaultTrainer.Config,
        *,
        system: System,
        data: DataSource,
        run: Run,
        evals: Sequence[EvalTask] = (),
    ):
        self.config = config
        self.system = system
        self.data = data
        self.run = run
        self.evals = list(evals)
        self.state = TrainState()
        self._precision = "fp32" if config.precision == "auto" else config.precision  # resolved in _fit
        self._precision_note = ""

    # ------------------------------------------------------------------ public

    def fit(self) -> dict[str, float]:
        """Train to ``max_steps`` (or ``epochs``) and return the final metrics.

        Joins the torchrun process group when launched by torchrun (and leaves it again if
        this call joined it).

        Raises:
            TrainingError: Non-finite loss or gradient (with ``nonfinite = "skip"``: more than
                ``max_nonfinite_steps`` of them), or a resume that cannot be honoured.
            KeyboardInterrupt: Ctrl-C or SIGTERM, after the step in progress was checkpointed.
        """
        joined = distributed.launched_by_torchrun() and not torch.distributed.is_initialized()
        device = distributed.init_from_env(pick_device(self.run.config.device, key=f"{self.run.recipe_path}: [run].device"))
        try:
            return self._fit(device)
        finally:
            if joined:
                distributed.cleanup()

    def _fit(self, device: torch.device) -> dict[str, float]:
        fit = self._set_up(device)
        stop = StopRequests(enabled=fit.world == 1)
        try:
            stop.install()
            if self.state.evaluation_due:
                self._evaluate_resumed_step(fit)
            try:
                self._loop(fit, stop)
            except RuntimeError as exc:
                # torch reports a DataLoader worker that the same Ctrl-C stopped as a RuntimeError
                # ("exited unexpectedly"), possibly mid-step: still a clean stop.
                if not stop.requested or stop.forced:
                    raise
                self._save_on_stop(fit, stop)
                raise KeyboardInterrupt from exc
            if stop.requested:  # also when it came during the last step
                self._save_on_stop(fit, stop)
                raise KeyboardInterrupt
            if self._finished(fit) and fit.evaluated_at != self.state.step and fit.saved_at != self.state.step:
                # Resumed a run that had already finished: report its final evaluation.
                fit.last_val = self._evaluate(fit, self.state.epoch)
        finally:
            stop.restore()
            fit.progress.close()
            fit.logger.close()
        distributed.barrier()
        result = {k: float(v) for k, v in fit.final.items() if isinstance(v, (int, float))}
        result.update(fit.last_val)
        result["step"] = float(self.state.step)
        if self.state.stopped_early:
            result["stopped_early"] = 1.0
        return result

    # ------------------------------------------------------------------ the loop

    def _loop(self, fit: _Fit, stop: StopRequests) -> None:
        """Train from ``self.state`` until the last step, early stopping or a stop request."""
        state = self.state
        while not self._finished(fit) and not stop.requested:
            for b, micros in fit.loader.global_batches(state.epoch, state.batch):
                epoch = state.epoch
                self._step(fit, b, micros)
                done = state.step >= fit.total
                self._log(fit, epoch, done)
                try:
                    improved = self._evaluate_if_due(fit, epoch, done)
                except Exception:
                    state.evaluation_due = True  # saved with the step: --resume evaluates it first
                    self._save_before_failing(fit, "the evaluation")
                    raise
                self._stop_early_if_due(fit, done)
                self._checkpoint_if_due(fit, improved, last=done or state.stopped_early)
                if self._finished(fit) or stop.requested:
                    break

    def _evaluate_resumed_step(self, fit: _Fit) -> None:
        """The checkpoint resumed from was saved when its step's evaluation failed: evaluate
        that step now, then stop early or save it again (now as the best, if it is), in the
        loop's order, so its metrics, the best checkpoint and early stopping count it."""
        state = self.state
        epoch = state.epoch - 1 if state.batch == 0 and state.epoch > 0 else state.epoch  # the step's own epoch
        done = state.step >= fit.total
        improved = self._evaluate_if_due(fit, epoch, True)
        state.evaluation_due = False
        self._stop_early_if_due(fit, done)
        self._checkpoint_if_due(fit, improved, last=True)

    def _finished(self, fit: _Fit) -> bool:
        return self.state.step >= fit.total or self.state.stopped_early

    def _step(self, fit: _Fit, b: int, micros: list[Batch]) -> None:
        """One optimizer step on global batch ``b`` of the current epoch, and its bookkeeping."""
        state = self.state
        step, epoch = state.step, state.epoch
        _seed_step(derive_seed(self.run.config.seed, "step", step, fit.rank))
        lr = fit.optimizer.param_groups[0]["lr"] if fit.optimizer is not None else 0.0
        loss, spreads, metrics, grad_norm = self._forward_backward(fit, micros, step=step, epoch=epoch)
        what = self._nonfinite(loss, grad_norm)
        if what is None:
            if fit.optimizer is not None:
                fit.optimizer.step()
                fit.scheduler.step()
            fit.window.add(loss, metrics, grad_norm, lr)
        else:
            source = self._nonfinite_source({k: _float(v) for k, v in metrics.items()}) if what == "loss" else ""
            self._skip(fit, what, lr, source)
        state.step += 1
        state.epoch, state.batch = (epoch + 1, 0) if b + 1 == fit.steps_per_epoch else (epoch, b + 1)
        if what is None:
            fit.system.on_step_end(state.step, fit.total)
            self._watch_collapse(fit, spreads)

    def _watch_collapse(self, fit: _Fit, metrics: dict[str, float]) -> None:
        """Feed the step's spread metrics (averaged over ranks) to the collapse monitor
        (:mod:`mtrun.train.collapse`);
        with ``on_collapse = "stop"`` a collapse stops training before this step is saved."""
        message = fit.collapse.observe(self.state.step, metrics)
        if message is not None and self.config.on_collapse == "stop":
            raise TrainingError(
                f"{message}; stopped ([trainer].on_collapse = 'stop'). Last checkpoint: "
                f"{fit.last_checkpoint or 'none written yet'}"
            )

    def _nonfinite(self, loss: float, grad_norm: float | None) -> str | None:
        """What in this step is non-finite (``"loss"``, ``"gradient norm"``, ``"gradient"``),
        or ``None``.

        The gradient norm is known only when clipping. With ``nonfinite = "skip"`` and no
        clipping the gradients are checked too (one fused norm over them), so an Inf gradient
        behind a finite loss is never applied. Loss and gradients are the same on every rank
        (the loss is all-reduced, DDP averages the gradients), so every rank decides alike.
        """
        if not math.isfinite(loss):
            return "loss"
        if grad_norm is not None:
            return None if math.isfinite(grad_norm) else "gradient norm"
        if self.config.nonfinite == "skip":
            grads = [p.grad for p in self.system.parameters() if p.grad is not None]
            if grads and not math.isfinite(float(torch.nn.utils.get_total_norm(grads))):
                return "gradient"
        return None

    def _nonfinite_source(self, metrics: dict[str, float]) -> str:
        """Where a non-finite loss came from, read off the step's metrics (no extra work): the
        embeddings whose spread is not finite name their encoder and projector, objectives
        whose own loss is not finite name themselves."""
        system, parts = self.system, []
        for modality in ("audio", "text"):
            value = metrics.get(f"embedding_std/{modality}")
            if value is not None and not math.isfinite(value):
                encoder, projector = getattr(system, f"{modality}_encoder"), getattr(system, f"{modality}_projector")
                parts.append(
                    f"the {modality} embeddings ({label(encoder, f'[{modality}_encoder]')}, "
                    f"{label(projector, f'[{modality}_projector]')})"
                )
        objectives = [key[: -len("/loss")] for key, value in metrics.items() if key.endswith("/loss") and not math.isfinite(value)]
        if objectives:
            parts.append("objective " + ", ".join(repr(name) for name in sorted(objectives)))
        return f"; non-finite: {'; '.join(parts)}" if parts else ""

    def _skip(self, fit: _Fit, what: str, lr: float, source: str = "") -> None:
        """Handle a step whose ``what`` is non-finite: stop, or skip its update and count it
        (the caller then advances the step counter and data position).

        Stops with a :class:`TrainingError` (before any optimizer step, so the weights are those
        of the last good step) under ``nonfinite = "stop"``, and under ``"skip"`` when this skip
        would be more than ``max_nonfinite_steps`` in the run (counted over resumes).

        A skipped step drops its gradients and makes no optimizer step, so no
        ``system.on_step_end`` either: those hooks follow an optimizer step (BYOL's EMA target
        would move towards unchanged weights; a clamp has nothing new to clamp). The step
        counter, the data position and the learning-rate schedule still advance, as after any
        step: all randomness of a step is seeded by its index, so computing the same step
        again would meet the same non-finite number; the run keeps its planned length and
        schedule, and a checkpoint's step still names the data position it resumes from.
        """
        cfg, state = self.config, self.state
        step, epoch = state.step, state.epoch
        last_good = fit.last_checkpoint or "none written yet"
        if cfg.nonfinite == "stop":
            raise TrainingError(
                f"non-finite {what} at step {step + 1} (epoch {epoch}){source}; stopped before the optimizer step. "
                f"Last good checkpoint: {last_good}"
            )
        skipped = state.nonfinite_skipped + 1
        if skipped > cfg.max_nonfinite_steps:
            raise TrainingError(
                f"non-finite {what} at step {step + 1} (epoch {epoch}){source}; stopped before the optimizer step: "
                f"{skipped} steps of this run had a non-finite loss or gradient, more than "
                f"[trainer].max_nonfinite_steps = {cfg.max_nonfinite_steps}. Last good checkpoint: {last_good}"
            )
        for p in self.system.parameters():
            p.grad = None
        if fit.scheduler is not None:
            with warnings.catch_warnings():
                # torch warns when a schedule's first step comes before any optimizer step: here on purpose.
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                fit.scheduler.step()
        state.nonfinite_skipped = skipped
        fit.window.skip(lr)
        fit.progress.message(
            f"warning: non-finite {what} at step {step + 1} (epoch {epoch}){source}; skipped its optimizer step "
            f"({skipped} skipped in this run, at most {cfg.max_nonfinite_steps})"
        )

    # ------------------------------------------------------------------ due after a step

    def _log(self, fit: _Fit, epoch: int, done: bool) -> None:
        """Advance the progress display; every ``log_every`` steps and at the end, log the window."""
        step = self.state.step
        if step % self.config.log_every == 0 or done:
            record = fit.window.means(epoch, self.config.batch_size)
            if self.config.nonfinite == "skip":
                record["nonfinite_skipped"] = self.state.nonfinite_skipped
            fit.final.update(fit.logger.log(step, record))
            fit.progress.update(step, epoch, record)
            fit.window = _Window()
        else:
            fit.progress.update(step, epoch)

    def _evaluate_if_due(self, fit: _Fit, epoch: int, done: bool) -> bool:
        """Evaluate every ``eval_every`` steps and at the end; returns whether the best improved."""
        cfg, state = self.config, self.state
        if not ((cfg.eval_every and state.step % cfg.eval_every == 0) or done):
            return False
        fit.last_val = self._evaluate(fit, epoch)
        fit.evaluated_at = state.step
        if not fit.last_val:
            return False
        fit.logger.log(state.step, {"epoch": epoch, **fit.last_val})
        fit.progress.message("\n".join(console_lines(state.step, fit.last_val)))
        improved = self._update_best(fit.last_val)
        if cfg.best_metric in fit.last_val:
            state.evals_since_best = 0 if improved else state.evals_since_best + 1
        return improved

    def _stop_early_if_due(self, fit: _Fit, done: bool) -> None:
        cfg, state = self.config, self.state
        patience = cfg.early_stopping_patience
        if patience and not done and state.evals_since_best >= patience:
            state.stopped_early = True
            fit.progress.message(
                f"early stopping at step {state.step}: {cfg.best_metric} has not improved for "
                f"{patience} evaluations (best {state.best_value}, {state.best_checkpoint})"
            )

    def _checkpoint_if_due(self, fit: _Fit, improved: bool, *, last: bool) -> None:
        """Checkpoint every ``checkpoint_every`` steps, at the last step and at every new best."""
        every, step = self.config.checkpoint_every, self.state.step
        if not ((every and step % every == 0) or last or improved):
            return
        if improved:
            self.state.best_checkpoint = step_dir_name(step)
        folder = self._save(fit)
        if improved and fit.manager is not None:
            fit.manager.mark_best(folder)

    def _save_unsaved(self, fit: _Fit) -> Path | None:
        """Checkpoint ``state.step`` unless it is already saved (or nothing was trained since the
        start): the folder written, else ``None``."""
        step = self.state.step
        return self._save(fit) if step > fit.start_step and fit.saved_at != step else None

    def _save_before_failing(self, fit: _Fit, what: str) -> None:
        """Keep the steps trained so far when ``what`` fails after them (a misspelt evaluation
        setting found at the last step must not cost the run)."""
        folder = self._save_unsaved(fit)
        if folder is not None:
            fit.progress.message(f"{what} failed after step {self.state.step}; saved {folder} first (continue with --resume latest)")

    def _save_on_stop(self, fit: _Fit, stop: StopRequests) -> None:
        """After Ctrl-C or SIGTERM: the weights are those after ``state.step`` (the optimizer
        only runs at the end of a step), so that step is saved unless it already was."""
        folder = self._save_unsaved(fit)
        if folder is not None:
            fit.progress.message(f"{stop.signal_name} after step {self.state.step}: saved {folder}")

    def _save(self, fit: _Fit) -> Path:
        """Checkpoint the current step (rank 0 writes; every rank remembers the folder).

        A write that fails (full disk, read-only folder) stops training with a
        :class:`CheckpointWriteError` that names the last good checkpoint."""
        cfg, state = self.config, self.state
        folder = fit.ckpt_root / step_dir_name(state.step)
        if fit.manager is not None:
            rng_tensors, rng_plain = capture_rng()
            try:
                fit.manager.save(
                    state.step,
                    model_state=fit.system.state_dict(),
                    optimizer_state=fit.optimizer.state_dict() if fit.optimizer is not None else None,
                    scheduler_state=fit.scheduler.state_dict() if fit.scheduler is not None else None,
                    trainer_state={
                        **attrs.asdict(state),
                        "batch_size": cfg.batch_size,
                        "grad_accum": cfg.grad_accum,
                        "world_size": fit.world,
                        "total_steps": fit.total,
                        "steps_per_epoch": fit.steps_per_epoch,
                        "seed": self.run.config.seed,
                        "precision": self._precision,
                    },
                    rng_tensors=rng_tensors,
                    rng_plain=rng_plain,
                    recipe=self.run.recipe,
                )
            except CheckpointWriteError as exc:
                raise CheckpointWriteError(
                    f"{exc}\nTraining stopped after step {state.step}. Last good checkpoint: "
                    f"{fit.last_checkpoint or 'none written yet'}; make room (or fix the folder) and "
                    "continue from it with --resume latest.",
                    folder=exc.folder,
                    reason=exc.reason,
                    needed=exc.needed,
                    free=exc.free,
                ) from exc.__cause__
        fit.last_checkpoint = str(folder)
        fit.saved_at = state.step
        return folder

    # ------------------------------------------------------------------ set-up

    def _set_up(self, device: torch.device) -> _Fit:
        """Everything the loop needs, in an order that keeps resume exact: data loaders, the
        checkpoint's weights, the DDP wrap, optimizer and schedule, their saved states and
        the saved RNG states last."""
        rank, world = distributed.rank(), distributed.world_size()
        seed_everything(derive_seed(self.run.config.seed, "setup", rank))
        run_dir = Path(self.run.dir)
        system = self._prepare_system(device, main=rank == 0)
        loader, val_loader, val_samples = self._data_loaders(system, run_dir, rank, world, device)
        resume_from, checkpoint = self._resume(system, run_dir)
        self._settle_auto_precision(system, loader, device, world, checkpoint)
        model = self._wrap(system, device, world)
        optimizer, scheduler = self._optimizer(system, loader)
        if checkpoint is not None:
            if optimizer is not None and checkpoint.optimizer is not None:
                optimizer.load_state_dict(checkpoint.optimizer)
            if scheduler is not None and checkpoint.scheduler is not None:
                scheduler.load_state_dict(checkpoint.scheduler)
            restore_rng(checkpoint.rng_tensors, checkpoint.rng_plain)
        fit = _Fit(
            device=device,
            rank=rank,
            world=world,
            run_dir=run_dir,
            system=system,
            model=model,
            loader=loader,
            val_loader=val_loader,
            val_samples=val_samples,
            steps_per_epoch=loader.steps_per_epoch,
            total=loader.total_steps,
            optimizer=optimizer,
            scheduler=scheduler,
            manager=CheckpointManager(run_dir / "checkpoints", keep_last=self.config.keep_last) if rank == 0 else None,
            logger=MetricsLogger(run_dir, enabled=rank == 0, resume_step=self.state.step if checkpoint is not None else None),
            progress=Progress(loader.total_steps, start_step=self.state.step, enabled=rank == 0, log_every=self.config.log_every),
            start_step=self.state.step,
            last_checkpoint=str(resume_from) if resume_from is not None else None,
        )
        fit.parameters = list(system.parameters())
        fit.collapse = CollapseMonitor(
            self.config.collapse_threshold, self.config.collapse_patience, say=lambda text: fit.progress.message("warning: " + text)
        )
        if self.config.precision == "auto":
            fit.progress.message(f"precision: {self._precision} ([trainer].precision = 'auto' on {device.type}{self._precision_note})")
        if checkpoint is not None:
            fit.progress.message(f"resumed from {resume_from} at step {self.state.step}")
        elif self.run.config.resume == "latest":
            fit.progress.message(f"no checkpoint in {fit.ckpt_root} yet; starting fresh")
        return fit

    def _prepare_system(self, device: torch.device, *, main: bool) -> System:
        """The system on ``device`` in training mode, with the precision resolved."""
        cfg = self.config
        system = self.system.to(device)
        system.train()
        if cfg.gradient_cache:  # after train(): a batch norm kept in eval mode is harmless
            problems = gradient_cache_problems(system)
            if problems:
                raise TrainingError(
                    f"{GRADIENT_CACHE} cannot give this system exact full-batch gradients:\n"
                    + "\n".join(f"  - {p}" for p in problems)
                    + "\nSet gradient_cache = false: grad_accum then computes the loss of each "
                    "micro-batch on its own."
                )
        self._precision = resolve_precision(cfg.precision, device)
        if cfg.precision == "bf16" and device.type == "cpu" and main and not cpu_has_fast_bf16():
            warnings.warn(
                "[trainer].precision = 'bf16' on a CPU without AMX or AVX512-BF16: bfloat16 matmuls and "
                "attention are emulated there and run 2-3x slower than float32; use precision = 'fp32'",
                RuntimeWarning,
                stacklevel=4,
            )
        return system

    def _settle_auto_precision(self, system: System, loader: BatchLoader, device: torch.device, world: int, checkpoint: Any) -> None:
        """``auto`` on a CPU with fast bf16 hardware: keep bf16 only where it measures faster.

        A resumed run keeps its checkpoint's choice (a run does not switch precision midway); all
        ranks decide on the mean of their measurements, so they agree. With several ranks, every
        rank first says whether its CPU does bf16 fast: where one does not, all train in fp32,
        even a resumed bf16 run, now on CPUs that would emulate it (a rank that skipped the
        timing would otherwise leave the others waiting in its all-reduce, and ranks would train
        in different precisions).
        """
        self._precision_note = ""
        if self.config.precision != "auto" or device.type != "cpu":
            return
        if world > 1:
            lacking = float(distributed.all_reduce_mean(0.0 if self._precision == "bf16" else 1.0))
            if lacking > 0:
                self._precision = "fp32"
                self._precision_note = f": {lacking * world:.0f} of {world} ranks' CPUs lack fast bf16, so all train in fp32"
                return
        if self._precision != "bf16":
            return
        if checkpoint is not None:  # a run never switches precision midway
            saved = checkpoint.trainer_state.get("precision")
            if saved in ("fp32", "bf16"):
                self._precision, self._precision_note = saved, ", as in the checkpoint"
            else:  # written before auto timed anything: it trained in the hardware's bf16
                self._precision_note = ", as before the resume (the checkpoint predates timed auto)"
            return
        micro = max(1, self.config.batch_size // (self.config.grad_accum * world))
        self._precision, self._precision_note = timed_auto_precision(
            system, batch_size=micro, clip_samples=loader.clip_samples, reduce=lambda r: float(distributed.all_reduce_mean(r))
        )

    @property
    def precision(self) -> str:
        """The precision training runs in (``fp32`` or ``bf16``), ``auto`` resolved once ``fit`` set up."""
        return self._precision

    def _data_loaders(
        self, system: System, run_dir: Path, rank: int, world: int, device: torch.device
    ) -> tuple[BatchLoader, BatchLoader | None, Sequence[Any] | None]:
        """The training loader (which also fixes ``steps_per_epoch`` and the run's total
        steps), the validation loader and the validation samples (``None`` without a split)."""
        cfg, run = self.config, self.run
        splits = list(self.data.splits())
        if cfg.train_split not in splits:
            raise TrainingError(f"the data source has no split {cfg.train_split!r} to train on (it has: {', '.join(splits)})")
        train_samples = self.data.load(cfg.train_split)
        val_samples = self.data.load(cfg.val_split) if cfg.val_split in splits else None
        if val_samples and self.evals:
            self._warn_unservable_evals(val_samples)
        if cfg.batch_size % (cfg.grad_accum * world) != 0:
            raise TrainingError(
                f"[trainer].batch_size = {cfg.batch_size} must be divisible by grad_accum × ranks = "
                f"{cfg.grad_accum} × {world}, so every rank gets an equal share of every micro-batch"
            )
        common = dict(
            config=run.loader,
            sample_rate=system.audio_encoder.sample_rate,
            tokenize=system.text_encoder.tokenize,
            seed=run.config.seed,
        )
        frame_features = loader_frame_features(system, run.loader)
        if frame_features is not None:
            common["frame_features"] = frame_features
        else:
            common["preprocess"] = loader_preprocess(system, device)
        loader = BatchLoader(
            train_samples,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            training=True,
            augmenters=system.sample_augmenters,
            rank=rank,
            world_size=world,
            run_dir=run_dir,
            split=cfg.train_split,
            **common,
        )
        steps_per_epoch = loader.num_batches
        if steps_per_epoch == 0:
            raise TrainingError(f"split {cfg.train_split!r} has {len(train_samples)} items, fewer than one batch of {cfg.batch_size}")
        total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
        loader.steps_per_epoch, loader.total_steps = steps_per_epoch, total
        loader.served_items = system.served_items  # clips the encoder cache serves are not decoded
        val_loader = None
        if val_samples is not None and len(val_samples) > 0:
            val_loader = BatchLoader(
                val_samples,
                batch_size=max(1, cfg.batch_size // cfg.grad_accum),
                training=False,
                augmenters=system.sample_augmenters,
                steps_per_epoch=steps_per_epoch,
                total_steps=total,
                run_dir=run_dir,
                split=cfg.val_split,
                **common,
            )
        return loader, val_loader, val_samples

    def _warn_unservable_evals(self, val_samples: Sequence[Any]) -> None:
        """Say at set-up which validation tasks the val split cannot serve. A warning, not an
        error: the test split (checked by the runner) may serve them, a small val split may
        simply lack a rare tag, and a task that cannot run stops the run at its first round."""
        from mtrun.eval.run import EvalError, check_tasks

        for task in self.evals:
            try:
                check_tasks([task], val_samples, self.config.val_split, "the data source ([data])")
            except EvalError as exc:
                if distributed.rank() == 0:
                    warnings.warn(f"{self.run.recipe_path}: {exc}; its validation rounds will fail or report no metric", RuntimeWarning, stacklevel=2)

    def _resume(self, system: System, run_dir: Path) -> tuple[Path | None, Checkpoint | None]:
        """Read the checkpoint ``run.config.resume`` points at, load its weights (before DDP
        wraps and broadcasts them) and its position into ``self.state``."""
        cfg = self.config
        quiet = {"say": None} if distributed.rank() else {}  # rank 0 reports a fallback
        try:
            resume_from = resolve_resume(self.run.config.resume, run_dir, **quiet)
        except FileNotFoundError as exc:
            raise ResumeError(f"{self.run.recipe_path}: [run].{exc}") from None
        except CorruptCheckpointError as exc:
            raise ResumeError(f"cannot resume: {exc}; resume from an older checkpoint folder instead") from None
        if resume_from is None:
            return None, None
        from safetensors import SafetensorError

        try:
            checkpoint = read_checkpoint(resume_from, verify=False)  # resolve_resume verified it
        except (OSError, ValueError, KeyError, SafetensorError) as exc:  # damage in a checkpoint without checksums
            raise ResumeError(f"cannot resume from {resume_from}: it cannot be read ({type(exc).__name__}: {exc})") from None
        saved = checkpoint.trainer_state
        if int(saved.get("batch_size", cfg.batch_size)) != cfg.batch_size:
            raise ResumeError(
                f"cannot resume from {resume_from}: it was trained with batch_size {saved['batch_size']}, "
                f"the recipe now says {cfg.batch_size} (the data position is counted in global batches)"
            )
        system.load_state_dict(checkpoint.model)
        self.state = TrainState(
            step=int(saved["step"]),
            epoch=int(saved["epoch"]),
            batch=int(saved["batch"]),
            best_value=saved.get("best_value"),
            best_checkpoint=saved.get("best_checkpoint"),
            evals_since_best=int(saved.get("evals_since_best", 0)),
            stopped_early=bool(saved.get("stopped_early", False)),
            nonfinite_skipped=int(saved.get("nonfinite_skipped", 0)),
            evaluation_due=bool(saved.get("evaluation_due", False)),
        )
        return resume_from, checkpoint

    def _wrap(self, system: System, device: torch.device, world: int) -> nn.Module:
        """The system in DistributedDataParallel on several ranks (when it has trainable
        parameters); the system itself otherwise. On several ranks BatchNorm layers first
        become synchronised ones, so they normalise over the whole micro-batch as one process
        does (:func:`mtrun.distributed.sync_batch_norm`)."""
        if world > 1:
            distributed.sync_batch_norm(system, device)
        if world == 1 or not any(p.requires_grad for p in system.parameters()):
            return system
        return nn.parallel.DistributedDataParallel(
            system,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=self.config.find_unused_parameters,
        )

    def _optimizer(self, system: System, loader: BatchLoader) -> tuple[Any, torch.optim.lr_scheduler.LambdaLR | None]:
        """The ``[trainer.optimizer]`` over the system and the ``[trainer.schedule]`` as a
        ``LambdaLR``; both ``None`` when nothing is trainable (torch refuses empty optimizers)."""
        if not any(p.requires_grad for p in system.parameters()):
            return None, None
        optimizer = self.config.optimizer.build(model=system)
        schedule = self.config.schedule.build(total_steps=loader.total_steps, steps_per_epoch=loader.steps_per_epoch)
        return optimizer, lambda_lr(optimizer, schedule)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self._precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ one step, evaluation

    def _forward_backward(
        self, fit: _Fit, micros: list[Batch], *, step: int, epoch: int
    ) -> tuple[float, dict[str, float], dict[str, torch.Tensor], float | None]:
        """Forward/backward over the micro-batches of one step.

        Returns:
            The step's loss and the spread metrics the collapse monitor watches, averaged over
            ranks (and over micro-batches, unless the gradient cache computed one loss for all
            of them) and read back as floats; every metric as this rank's detached 0-d device
            tensor (the log window averages them over ranks); the gradient norm when clipping.
        """
        cfg, device = self.config, fit.device
        seed = self.run.config.seed
        if not fit.system.training:  # after an evaluation (which restores the mode); a full walk costs ~1 ms
            fit.model.train()
        for p in fit.parameters:
            p.grad = None

        def context(m: int) -> AugmentContext:
            # A fresh, equally seeded generator per call: the gradient cache's re-run replays it.
            return AugmentContext(
                step=step,
                epoch=epoch,
                steps_per_epoch=fit.steps_per_epoch,
                total_steps=fit.total,
                training=True,
                generator=torch.Generator().manual_seed(derive_seed(seed, "augment-step", step, m, fit.rank)),
                # Rank-free seeds: an item's noise is the same on any rank (DDP == one process).
                item_seeds=[derive_seed(seed, "augment-item", step, i) for i in micros[m]["ids"]],
                batch_seed=derive_seed(seed, "augment-batch", step, m),
            )

        if cfg.gradient_cache and len(micros) > 1:
            loss, metrics = gradient_cache_step(
                fit.system,
                micros,
                prepare=lambda micro: _to_device(micro, device),
                context=context,
                autocast=lambda: self._autocast(device),
            )
            # DDP's own hooks stayed idle (its forward was not called): average once here.
            all_reduce_gradients(fit.parameters)
        else:
            loss, metrics = self._accumulate(fit, micros, context)
        metrics = {k: _scalar(v, device) for k, v in metrics.items()}
        # The one read-back of a step: what must be known before the optimizer step.
        watching = fit.collapse is not None and fit.collapse.threshold > 0
        watched = sorted(k for k in metrics if is_spread_metric(k)) if watching else []
        packed = torch.stack([_scalar(loss, device)] + [metrics[k] for k in watched])
        values = distributed.all_reduce_mean(packed).tolist()
        grad_norm = None
        if cfg.grad_clip > 0:
            params = [p for p in fit.parameters if p.grad is not None]
            if params:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        return values[0], dict(zip(watched, values[1:])), metrics, grad_norm

    def _accumulate(
        self, fit: _Fit, micros: list[Batch], context: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Gradient accumulation: each micro-batch's loss on its own, backwarded at ``1/n`` of
        its weight; DDP synchronises gradients on the last. Returns the micro-batch means."""
        device, model = fit.device, fit.model
        n = len(micros)
        loss_sum = torch.zeros((), device=device)
        metric_sums: dict[str, torch.Tensor] = {}
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        for m, micro in enumerate(micros):
            batch = _to_device(micro, device)
            sync = model.no_sync() if ddp and m < n - 1 else contextlib.nullcontext()
            with sync:
                with self._autocast(device):
                    loss, metrics = model(batch, context(m))
                if loss.requires_grad:
                    (loss.float() / n).backward()
            loss_sum = loss_sum + loss.detach().float()
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + _scalar(value, device)
        return loss_sum / n, {k: v / n for k, v in metric_sums.items()}

    def _update_best(self, val: dict[str, float]) -> bool:
        value = val.get(self.config.best_metric)
        if value is None or not math.isfinite(value):
            return False
        best = self.state.best_value
        better = best is None or (value < best if self.config.best_mode == "min" else value > best)
        if better:
            self.state.best_value = float(value)
        return better

    def _evaluate(self, fit: _Fit, epoch: int) -> dict[str, float]:
        """Mean validation loss and metrics (no training augmentation, no gradients) and each
        evaluation task's results, all prefixed ``val/``.

        Every rank evaluates the whole split with gathering switched off: the numbers then
        equal the single-process ones, and no rank waits on a collective the others skip.
        """
        if fit.val_samples is None:
            return {}
        from mtrun.eval.embed import EvalCache

        system, loader, step = fit.system, fit.val_loader, self.state.step
        results: dict[str, float] = {}
        was_training = system.training
        system.eval()
        try:
            with torch.no_grad(), distributed.local_only(), self._autocast(fit.device):
                if loader is not None:
                    loss_sum, count, sums = 0.0, 0, {}
                    for i, batch in enumerate(loader):
                        size = len(batch["ids"])
                        context = AugmentContext(
                            step=step,
                            epoch=epoch,
                            steps_per_epoch=fit.steps_per_epoch,
                            total_steps=fit.total,
                            training=False,
                            generator=torch.Generator().manual_seed(derive_seed(self.run.config.seed, "eval", i)),
                        )
                        loss, metrics = system(_to_device(batch, fit.device), context)
                        loss_sum += _float(loss) * size
                        count += size
                        for key, value in metrics.items():
                            sums[key] = sums.get(key, 0.0) + _float(value) * size
                    if count:
                        results["val/loss"] = loss_sum / count
                        results.update({f"val/{k}": v / count for k, v in sums.items()})
                cache = EvalCache()  # one embedding pass per round, shared by the tasks
                for task in self.evals:
                    for key, value in task.evaluate(system, fit.val_samples, cache=cache).items():
                        results[f"val/{key}"] = float(value)
        finally:
            system.train(was_training)
        return results
