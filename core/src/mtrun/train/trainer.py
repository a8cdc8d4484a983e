"""The default trainer: one readable loop for single-process and torchrun DDP training.

Features switch on by config, not by subclass: gradient accumulation, bf16 autocast, gradient
clipping, warm-up + cosine schedule, periodic evaluation with best-checkpoint tracking,
step-level atomic checkpoints and exact resume.

Exact resume rests on one rule: no random draw depends on what ran before. Data order, crops,
captions and sample augmentation are seeded per (epoch, item) by the loader; the step's
augmentation generator per (step, micro-batch, rank); and the global Python/NumPy/torch RNGs
(dropout) are re-seeded at the start of every step from (seed, step, rank). A run killed at
any step and resumed from its last checkpoint therefore continues bit-for-bit on the path of
an uninterrupted run on the same hardware.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import attrs
import torch
from torch import nn

from mtrun import distributed
from mtrun.data.loader import BatchLoader
from mtrun.errors import TrainingError
from mtrun.interfaces import AugmentContext, Batch, DataSource, EvalTask
from mtrun.run import Run
from mtrun.system import System
from mtrun.train.checkpoint import CheckpointManager, read_checkpoint, resolve_resume, step_dir_name
from mtrun.train.interrupts import StopRequests
from mtrun.train.metrics import MetricsLogger, console_view
from mtrun.train.progress import Progress
from mtrun.train.rng import capture_rng, derive_seed, restore_rng, seed_everything
from mtrun.train.schedule import warmup_cosine

__all__ = ["DefaultTrainer", "TrainState", "cpu_has_fast_bf16", "pick_device", "resolve_precision"]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16).

    Without either, oneDNN and PyTorch's CPU kernels convert bf16 to float32 and back around
    every matmul and attention block, so ``precision = "bf16"`` costs time instead of saving it
    (measured 2.6-3.4x slower per ViT training step on an AVX512 Xeon without them; see
    ``benchmarks/masking.py --bf16``).
    """
    cpu = getattr(torch._C, "_cpu", None)
    if cpu is None:  # an old or stripped build: assume yes rather than warn wrongly
        return True
    return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` where bfloat16 is fast (a CUDA GPU that supports it, a CPU with AMX or
    AVX512-BF16), else ``fp32``; ``fp32`` and ``bf16`` are returned as they are."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value <= 0:
        raise ValueError(f"must be positive (got {value})")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value < 0:
        raise ValueError(f"must be zero or positive (got {value})")


def _two_floats(value: Any) -> tuple[float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"must be two numbers (got {list(value)})")
    return values  # type: ignore[return-value]


def pick_device(name: str) -> torch.device:
    """``'auto'`` → CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    best_value: float | None = None
    best_checkpoint: str | None = None
    evals_since_best: int = 0
    stopped_early: bool = False


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, Batch):
        return Batch({k: _to_device(v, device) for k, v in value.items()})
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _float(value: Any) -> float:
    return float(value.detach().float().item()) if torch.is_tensor(value) else float(value)


class DefaultTrainer:
    """Trains a :class:`~mtrun.system.System` with AdamW; single process or torchrun DDP.

    Files it writes (rank 0) in ``run.dir``: ``metrics.jsonl``, ``tensorboard/`` and
    ``checkpoints/`` (see :mod:`mtrun.train.checkpoint`). Resuming follows
    ``run.config.resume``: ``"latest"`` continues from ``run.dir/checkpoints`` (or starts fresh
    when there is none yet), a path continues from that checkpoint folder.

    Step numbers: ``AugmentContext.step`` is the 0-based index of the step being computed;
    ``system.on_step_end(step, total)`` receives the number of optimizer steps done (1 after
    the first), so ``step / total`` reaches 1 on the last step (BYOL's cosine EMA rate); logs
    and checkpoint folders use the same count. The logged ``loss`` is the mean over the steps
    since the previous log line, over micro-batches and over ranks.

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
            default=32, validator=_positive,
            metadata={"help": "global batch size: items per optimizer step over all ranks and micro-batches"},
        )
        grad_accum: int = attrs.field(
            default=1, validator=_positive,
            metadata={"help": "micro-batches per optimizer step (gradient accumulation)"},
        )
        epochs: int = attrs.field(
            default=1, validator=_non_negative,
            metadata={"help": "epochs to train when max_steps is 0"},
        )
        max_steps: int = attrs.field(
            default=0, validator=_non_negative,
            metadata={"help": "optimizer steps to train; when > 0 it wins over epochs"},
        )
        lr: float = attrs.field(
            default=1e-3, validator=_positive,
            metadata={"help": "peak learning rate (AdamW)"},
        )
        weight_decay: float = attrs.field(
            default=0.01, validator=_non_negative,
            metadata={"help": "AdamW weight decay; biases, norms and other 1-D parameters get none"},
        )
        betas: tuple[float, float] = attrs.field(
            default=(0.9, 0.999), converter=_two_floats,
            metadata={"help": "AdamW betas [beta1, beta2]"},
        )
        eps: float = attrs.field(
            default=1e-8, validator=_positive,
            metadata={"help": "AdamW epsilon"},
        )
        warmup_steps: int = attrs.field(
            default=0, validator=_non_negative,
            metadata={"help": "linear warm-up steps; when 0, warmup_epochs is used"},
        )
        warmup_epochs: float = attrs.field(
            default=0.0, validator=_non_negative,
            metadata={"help": "linear warm-up in epochs (used when warmup_steps is 0)"},
        )
        min_lr_ratio: float = attrs.field(
            default=0.0, validator=_non_negative,
            metadata={"help": "floor of the cosine decay as a fraction of lr"},
        )
        grad_clip: float = attrs.field(
            default=0.0, validator=_non_negative,
            metadata={"help": "clip the global gradient norm to this (0 = off)"},
        )
        precision: str = attrs.field(
            default="fp32", validator=attrs.validators.in_(("fp32", "bf16", "auto")),
            metadata={"help": "fp32, bf16 (torch.autocast on CPU and CUDA), or auto: bf16 where the device has fast bf16 (CUDA; CPUs with AMX/AVX512-BF16), else fp32"},
        )
        eval_every: int = attrs.field(
            default=0, validator=_non_negative,
            metadata={"help": "evaluate every N steps (0 = only at the end)"},
        )
        checkpoint_every: int = attrs.field(
            default=1000, validator=_non_negative,
            metadata={"help": "write a checkpoint every N steps (0 = only at the end and at new bests)"},
        )
        keep_last: int = attrs.field(
            default=3, validator=_positive,
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
            default=0, validator=_non_negative,
            metadata={"help": "stop when best_metric has not improved for this many evaluations in a row (0 = off)"},
        )
        log_every: int = attrs.field(
            default=10, validator=_positive,
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

    # ------------------------------------------------------------------ public

    def fit(self) -> dict[str, float]:
        """Train to ``max_steps`` (or ``epochs``) and return the final metrics.

        Joins the torchrun process group when launched by torchrun (and leaves it again if
        this call joined it).

        Raises:
            TrainingError: Non-finite loss or gradient, or a resume that cannot be honoured.
        """
        joined = distributed.launched_by_torchrun() and not torch.distributed.is_initialized()
        device = distributed.init_from_env(pick_device(self.run.config.device))
        try:
            return self._fit(device)
        finally:
            if joined:
                distributed.cleanup()

    # ------------------------------------------------------------------ setup

    def _param_groups(self, system: nn.Module) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, param in system.named_parameters():
            if not param.requires_grad:
                continue
            # Biases, norm gains and scalars (temperatures) are not weights to shrink.
            if param.ndim <= 1 or name.endswith(".bias") or "norm" in name.lower():
                no_decay.append(param)
            else:
                decay.append(param)
        groups = []
        if decay:
            groups.append({"params": decay, "weight_decay": self.config.weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self._precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ the loop

    def _fit(self, device: torch.device) -> dict[str, float]:
        cfg, run = self.config, self.run
        rank, world = distributed.rank(), distributed.world_size()
        main = rank == 0
        seed = run.config.seed
        seed_everything(derive_seed(seed, "setup", rank))
        run_dir = Path(run.dir)
        ckpt_root = run_dir / "checkpoints"

        system = self.system.to(device)
        system.train()
        self._precision = resolve_precision(cfg.precision, device)
        if cfg.precision == "bf16" and device.type == "cpu" and main and not cpu_has_fast_bf16():
            warnings.warn(
                "[trainer].precision = 'bf16' on a CPU without AMX or AVX512-BF16: bfloat16 matmuls and "
                "attention are emulated there and run 2-3x slower than float32; use precision = 'fp32'",
                RuntimeWarning,
                stacklevel=2,
            )
        splits = list(self.data.splits())
        if cfg.train_split not in splits:
            raise TrainingError(f"the data source has no split {cfg.train_split!r} to train on (it has: {', '.join(splits)})")
        train_samples = self.data.load(cfg.train_split)
        val_samples = self.data.load(cfg.val_split) if cfg.val_split in splits else None
        if cfg.batch_size % (cfg.grad_accum * world) != 0:
            raise TrainingError(
                f"[trainer].batch_size = {cfg.batch_size} must be divisible by grad_accum × ranks = "
                f"{cfg.grad_accum} × {world}, so every rank gets an equal share of every micro-batch"
            )
        common = dict(config=run.loader, sample_rate=system.audio_encoder.sample_rate, tokenize=system.text_encoder.tokenize, seed=seed)
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
        warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else round(cfg.warmup_epochs * steps_per_epoch)
        loader.steps_per_epoch, loader.total_steps = steps_per_epoch, total
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

        # Resume: model weights before DDP wraps (and broadcasts) them.
        try:
            resume_from = resolve_resume(run.config.resume, run_dir)
        except FileNotFoundError as exc:
            raise TrainingError(str(exc)) from exc
        checkpoint = read_checkpoint(resume_from) if resume_from is not None else None
        if checkpoint is not None:
            saved = checkpoint.trainer_state
            if int(saved.get("batch_size", cfg.batch_size)) != cfg.batch_size:
                raise TrainingError(
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
            )

        trainable = [p for p in system.parameters() if p.requires_grad]
        model: nn.Module = system
        if world > 1 and trainable:
            model = nn.parallel.DistributedDataParallel(
                system,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        optimizer = scheduler = None
        if trainable:
            optimizer = torch.optim.AdamW(self._param_groups(system), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
            scheduler = warmup_cosine(optimizer, warmup_steps=warmup, total_steps=total, min_lr_ratio=cfg.min_lr_ratio)
        if checkpoint is not None:
            if optimizer is not None and checkpoint.optimizer is not None:
                optimizer.load_state_dict(checkpoint.optimizer)
            if scheduler is not None and checkpoint.scheduler is not None:
                scheduler.load_state_dict(checkpoint.scheduler)
            restore_rng(checkpoint.rng_tensors, checkpoint.rng_plain)

        state = self.state
        last_checkpoint: str | None = str(resume_from) if resume_from is not None else None
        manager = CheckpointManager(ckpt_root, keep_last=cfg.keep_last) if main else None
        logger = MetricsLogger(run_dir, enabled=main, resume_step=state.step if checkpoint is not None else None)
        progress = Progress(total, start_step=state.step, enabled=main, log_every=cfg.log_every)
        if cfg.precision == "auto":
            progress.message(f"precision: {self._precision} ([trainer].precision = 'auto' on {device.type})")
        if checkpoint is not None:
            progress.message(f"resumed from {resume_from} at step {state.step}")
        elif run.config.resume == "latest":
            progress.message(f"no checkpoint in {ckpt_root} yet; starting fresh")

        def save(step: int) -> str:
            nonlocal last_checkpoint
            folder = ckpt_root / step_dir_name(step)
            if manager is not None:
                rng_tensors, rng_plain = capture_rng()
                manager.save(
                    step,
                    model_state=system.state_dict(),
                    optimizer_state=optimizer.state_dict() if optimizer is not None else None,
                    scheduler_state=scheduler.state_dict() if scheduler is not None else None,
                    trainer_state={
                        **attrs.asdict(state),
                        "batch_size": cfg.batch_size,
                        "grad_accum": cfg.grad_accum,
                        "world_size": world,
                        "total_steps": total,
                        "steps_per_epoch": steps_per_epoch,
                        "seed": seed,
                    },
                    rng_tensors=rng_tensors,
                    rng_plain=rng_plain,
                    recipe=run.recipe,
                )
            last_checkpoint = str(folder)
            return folder.name

        window_loss, window_steps, window_metrics = 0.0, 0, {}
        window_start = time.perf_counter()
        final: dict[str, float] = {}
        last_val: dict[str, float] = {}
        evaluated_at = saved_at = -1
        start_step = state.step
        stop_requests = StopRequests(enabled=world == 1)
        try:
            stop_requests.install()
            while state.step < total and not state.stopped_early and not stop_requests.requested:
                for b, micros in loader.global_batches(state.epoch, state.batch):
                    step, epoch = state.step, state.epoch
                    seed_everything(derive_seed(seed, "step", step, rank))
                    lr = optimizer.param_groups[0]["lr"] if optimizer is not None else 0.0
                    loss_value, metrics, grad_norm = self._train_step(
                        model, micros, device, step=step, epoch=epoch, steps_per_epoch=steps_per_epoch, total=total, rank=rank
                    )
                    if not math.isfinite(loss_value) or (grad_norm is not None and not math.isfinite(grad_norm)):
                        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                        raise TrainingError(
                            f"non-finite {what} at step {step + 1} (epoch {epoch}); stopped before the optimizer step. "
                            f"Last good checkpoint: {last_checkpoint or 'none written yet'}"
                        )
                    if optimizer is not None:
                        optimizer.step()
                        scheduler.step()
                    state.step += 1
                    state.epoch, state.batch = (epoch + 1, 0) if b + 1 == steps_per_epoch else (epoch, b + 1)
                    system.on_step_end(state.step, total)

                    window_loss += loss_value
                    window_steps += 1
                    for key, value in metrics.items():
                        window_metrics[key] = window_metrics.get(key, 0.0) + value
                    if grad_norm is not None:
                        window_metrics["grad_norm"] = window_metrics.get("grad_norm", 0.0) + grad_norm
                    done = state.step >= total
                    if state.step % cfg.log_every == 0 or done:
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        record = {
                            "epoch": epoch,
                            "lr": lr,
                            "loss": window_loss / window_steps,
                            "samples_per_s": window_steps * cfg.batch_size / elapsed,
                            **{k: v / window_steps for k, v in window_metrics.items()},
                        }
                        final.update(logger.log(state.step, record))
                        progress.update(state.step, epoch, record)
                        window_loss, window_steps, window_metrics = 0.0, 0, {}
                        window_start = time.perf_counter()
                    else:
                        progress.update(state.step, epoch)

                    improved = False
                    if (cfg.eval_every and state.step % cfg.eval_every == 0) or done:
                        last_val = self._evaluate(system, val_loader, val_samples, device, state.step, epoch, steps_per_epoch, total)
                        evaluated_at = state.step
                        if last_val:
                            logger.log(state.step, {"epoch": epoch, **last_val})
                            progress.message(f"step {state.step}: " + "  ".join(f"{k} {v:.4g}" for k, v in console_view(last_val).items()))
                            improved = self._update_best(last_val)
                            if cfg.best_metric in last_val:
                                state.evals_since_best = 0 if improved else state.evals_since_best + 1
                    patience = cfg.early_stopping_patience
                    if patience and not done and state.evals_since_best >= patience:
                        state.stopped_early = True
                        progress.message(
                            f"early stopping at step {state.step}: {cfg.best_metric} has not improved for "
                            f"{patience} evaluations (best {state.best_value}, {state.best_checkpoint})"
                        )
                    stop = done or state.stopped_early
                    if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or stop or improved:
                        if improved:
                            state.best_checkpoint = step_dir_name(state.step)
                        name = save(state.step)
                        saved_at = state.step
                        if improved and manager is not None:
                            manager.mark_best(ckpt_root / name)
                    if stop or stop_requests.requested:
                        break
            if stop_requests.requested:  # also when it came during the last step
                raise KeyboardInterrupt
            if (state.step >= total or state.stopped_early) and evaluated_at != state.step and saved_at != state.step:
                # Resumed a run that had already finished: report its final evaluation.
                last_val = self._evaluate(system, val_loader, val_samples, device, state.step, state.epoch, steps_per_epoch, total)
        except BaseException as exc:
            if not stop_requests.requested or stop_requests.forced:
                raise
            # Ctrl-C or SIGTERM: the weights are those after step state.step (the optimizer only
            # runs at the end of a step), so that step is saved unless it already was. The error
            # may also be a loader worker that the same Ctrl-C stopped.
            if state.step > start_step and saved_at != state.step:
                name = save(state.step)
                progress.message(f"{stop_requests.signal_name} after step {state.step}: saved {ckpt_root / name}")
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise KeyboardInterrupt from exc
        finally:
            stop_requests.restore()
            progress.close()
            logger.close()
        distributed.barrier()
        result = {k: float(v) for k, v in final.items() if isinstance(v, (int, float))}
        result.update(last_val)
        result["step"] = float(state.step)
        if state.stopped_early:
            result["stopped_early"] = 1.0
        return result

    def _train_step(
        self,
        model: nn.Module,
        micros: list[Batch],
        device: torch.device,
        *,
        step: int,
        epoch: int,
        steps_per_epoch: int,
        total: int,
        rank: int,
    ) -> tuple[float, dict[str, float], float | None]:
        """Forward/backward over the micro-batches of one step; returns the step's loss and
        metrics averaged over micro-batches and ranks, and the gradient norm when clipping."""
        cfg = self.config
        seed = self.run.config.seed
        model.train()
        for p in self.system.parameters():
            p.grad = None
        n = len(micros)
        loss_sum = torch.zeros((), device=device)
        metric_sums: dict[str, torch.Tensor] = {}
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        for m, micro in enumerate(micros):
            batch = _to_device(micro, device)
            context = AugmentContext(
                step=step,
                epoch=epoch,
                steps_per_epoch=steps_per_epoch,
                total_steps=total,
                training=True,
                generator=torch.Generator().manual_seed(derive_seed(seed, "augment-step", step, m, rank)),
            )
            sync = model.no_sync() if ddp and m < n - 1 else contextlib.nullcontext()
            with sync:
                with self._autocast(device):
                    loss, metrics = model(batch, context)
                if loss.requires_grad:
                    (loss.float() / n).backward()
            loss_sum = loss_sum + loss.detach().float()
            for key, value in metrics.items():
                value = torch.as_tensor(value, dtype=torch.float32, device=device).detach()
                metric_sums[key] = metric_sums.get(key, torch.zeros((), device=device)) + value
        keys = sorted(metric_sums)
        packed = torch.stack([loss_sum] + [metric_sums[k] for k in keys]) / n
        packed = distributed.all_reduce_mean(packed)
        values = packed.tolist()
        grad_norm = None
        if cfg.grad_clip > 0:
            params = [p for p in self.system.parameters() if p.grad is not None]
            if params:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        return values[0], dict(zip(keys, values[1:])), grad_norm

    def _update_best(self, val: dict[str, float]) -> bool:
        value = val.get(self.config.best_metric)
        if value is None or not math.isfinite(value):
            return False
        best = self.state.best_value
        better = best is None or (value < best if self.config.best_mode == "min" else value > best)
        if better:
            self.state.best_value = float(value)
        return better

    def _evaluate(
        self,
        system: System,
        loader: BatchLoader | None,
        samples: Sequence[Any] | None,
        device: torch.device,
        step: int,
        epoch: int,
        steps_per_epoch: int,
        total: int,
    ) -> dict[str, float]:
        """Mean validation loss and metrics (no training augmentation, no gradients) and each
        evaluation task's results, all prefixed ``val/``.

        Every rank evaluates the whole split with gathering switched off: the numbers then
        equal the single-process ones, and no rank waits on a collective the others skip.
        """
        if samples is None:
            return {}
        from mtrun.eval.embed import EvalCache

        results: dict[str, float] = {}
        was_training = system.training
        system.eval()
        try:
            with torch.no_grad(), distributed.local_only(), self._autocast(device):
                if loader is not None:
                    loss_sum, count, sums = 0.0, 0, {}
                    for i, batch in enumerate(loader):
                        size = len(batch["ids"])
                        context = AugmentContext(
                            step=step,
                            epoch=epoch,
                            steps_per_epoch=steps_per_epoch,
                            total_steps=total,
                            training=False,
                            generator=torch.Generator().manual_seed(derive_seed(self.run.config.seed, "eval", i)),
                        )
                        loss, metrics = system(_to_device(batch, device), context)
                        loss_sum += _float(loss) * size
                        count += size
                        for key, value in metrics.items():
                            sums[key] = sums.get(key, 0.0) + _float(value) * size
                    if count:
                        results["val/loss"] = loss_sum / count
                        results.update({f"val/{k}": v / count for k, v in sums.items()})
                cache = EvalCache()  # one embedding pass per round, shared by the tasks
                for task in self.evals:
                    for key, value in task.evaluate(system, samples, cache=cache).items():
                        results[f"val/{key}"] = float(value)
        finally:
            system.train(was_training)
        return results
