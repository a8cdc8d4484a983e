"""Metric logging: one JSON object per logged step in ``metrics.jsonl`` and TensorBoard scalars.

Only rank 0 writes; on other ranks the logger is inert, so the training loop calls it
unconditionally.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "console_view"]


def console_view(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics worth a console line: without bootstrap bounds (``…:ci_low``/``…:ci_high``)
    and random-subset repeats (``…/subset/…``), which stay in ``metrics.jsonl``, TensorBoard and
    the evaluation report."""
    return {k: v for k, v in metrics.items() if ":ci_" not in k and "/subset/" not in k}


def _number(value: Any) -> float | int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # step and epoch stay integers
    try:
        if hasattr(value, "item"):
            value = value.item()
        return float(value)
    except (TypeError, ValueError):
        return None


class MetricsLogger:
    """Appends records to ``run_dir/metrics.jsonl`` and ``run_dir/tensorboard/``.

    Args:
        run_dir: The run folder.
        enabled: False on ranks other than 0.
        resume_step: When resuming from a checkpoint taken after this many steps, records of
            later steps (logged by the interrupted run after its last checkpoint) are dropped
            from ``metrics.jsonl`` and purged from TensorBoard, so each step appears once.
        tensorboard: Whether to write TensorBoard event files.
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= resume_step:
                        kept.append(line)
                except (ValueError, AttributeError):
                    continue  # a line cut short by a kill
            self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run in an existing folder starts a fresh log
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        """Write one record for ``step``; numbers become floats, non-numbers are kept as-is
        in the JSON (and skipped in TensorBoard). Returns the record."""
        record: dict[str, Any] = {"step": int(step)}
        for key, value in values.items():
            number = _number(value)
            record[key] = number if number is not None else value
        if not self.enabled:
            return record
        self._file.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()
        return record

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()
