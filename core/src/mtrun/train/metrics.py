"""Metric logging: one JSON object per logged step in ``metrics.jsonl`` and TensorBoard scalars.

Only rank 0 writes; on other ranks the logger is inert, so the training loop calls it
unconditionally.

The metrics are a log, not the run's result: a write that fails (a full disk, a read-only or
vanished folder) is reported once, naming the file and the operating system's reason, and that
log is not written again in this run; training, checkpoints and the other log carry on. A
half-written record would otherwise be followed by whole ones on the same line, and a
traceback here would stop a run whose checkpoints are still being written fine.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Callable

__all__ = ["MetricsLogger", "console_lines", "console_view"]


def console_view(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics worth a console line: without bootstrap bounds (``…:ci_low``/``…:ci_high``),
    random-subset repeats (``…/subset/…``) and the counts of what was evaluated (``…/n_items``),
    which stay in ``metrics.jsonl``, TensorBoard and the evaluation report."""
    return {k: v for k, v in metrics.items() if ":ci_" not in k and "/subset/" not in k and not re.search(r"/n_\w+$", k)}


def console_lines(step: int, metrics: dict[str, Any]) -> list[str]:
    """An evaluation's :func:`console_view` as a few short lines, one per task: ``step 1200:
    val/loss 1.78`` then ``  val/retrieval: t2a/R@1 22.9  t2a/R@10 55.7 ...``."""
    groups: dict[str, list[str]] = {}
    for key, value in console_view(metrics).items():
        parts = key.split("/")
        group, name = ("/".join(parts[:2]), "/".join(parts[2:])) if len(parts) > 2 else ("", key)
        groups.setdefault(group, []).append(f"{name} {value:.4g}")
    head = f"step {step}:" + "".join(f"  {item}" for item in groups.pop("", []))
    return [head] + [f"  {group}: " + "  ".join(items) for group, items in groups.items()]


def _number(value: Any) -> float | int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # step and epoch stay integers
    try:
        if hasattr(value, "item"):
            value = value.item()
        return float(value)
    except (TypeError, ValueError):
        return None


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


class MetricsLogger:
    """Appends records to ``run_dir/metrics.jsonl`` and ``run_dir/tensorboard/``.

    Args:
        run_dir: The run folder.
        enabled: False on ranks other than 0.
        resume_step: When resuming from a checkpoint taken after this many steps, records of
            later steps (logged by the interrupted run after its last checkpoint) are dropped
            from ``metrics.jsonl`` and purged from TensorBoard, so each step appears once.
        tensorboard: Whether to write TensorBoard event files.
        say: Where the one warning per failed log goes (default: standard error).

    Attributes:
        failed: ``{path: reason}`` of the logs that could not be written and were given up.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = True,
        say: Callable[[str], None] = _say,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard_dir = Path(run_dir) / "tensorboard"
        self.failed: dict[Path, str] = {}
        self._say = say
        self._file = None
        self._writer = None
        if not enabled:
            return
        try:
            self._file = self._open_jsonl(resume_step)
        except OSError as exc:
            self._give_up(self.path, exc, None)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = resume_step + 1 if resume_step is not None else None
                self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=purge)
            except OSError as exc:
                self._give_up(self.tensorboard_dir, exc, None)
            else:
                self._catch_writer_thread_errors()

    def _catch_writer_thread_errors(self) -> None:
        """TensorBoard writes its event file in a thread of its own; a full disk there would
        print that thread's traceback. Report it as this log's one warning instead."""
        previous = threading.excepthook

        def hook(args: Any) -> None:
            if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
                self._give_up(self.tensorboard_dir, args.exc_value, self._tensorboard_step)
                return
            previous(args)

        threading.excepthook = hook
        self._thread_hook = (hook, previous)
        self._tensorboard_step: int | None = None

    def _open_jsonl(self, resume_step: int | None):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= resume_step:
                        kept.append(line)
                except (ValueError, AttributeError):
                    continue  # a line cut short by a kill
            # Via a temporary file: a full disk mid-rewrite must not cut the earlier log short.
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write("".join(k + "\n" for k in kept))
                os.replace(tmp, self.path)
            except OSError:
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass
                raise
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run in an existing folder starts a fresh log
        return open(self.path, "a", encoding="utf-8")

    def _give_up(self, path: Path, exc: OSError, step: int | None) -> None:
        """Report a log that cannot be written, once, and stop writing it."""
        if path in self.failed:
            return
        self.failed[path] = _reason(exc)
        when = f" at step {step}" if step is not None else ""
        self._say(
            f"WARNING: cannot write {path}{when}: {_reason(exc)}. Training continues; later metrics are "
            "not written to it in this run (checkpoints are written as before)."
        )

    def log(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        """Write one record for ``step``; numbers become floats, non-numbers are kept as-is
        in the JSON (and skipped in TensorBoard). Returns the record.

        Never raises for a failed write: the first failure of each log is reported through
        ``say`` and that log is closed (see the module docstring)."""
        record: dict[str, Any] = {"step": int(step)}
        for key, value in values.items():
            number = _number(value)
            record[key] = number if number is not None else value
        if not self.enabled:
            return record
        if self._file is not None:
            line = json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}) + "\n"
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as exc:
                self._give_up(self.path, exc, step)
                self._close_jsonl()
        if self._writer is not None:
            self._tensorboard_step = step  # what a failure in TensorBoard's writer thread was writing
            try:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                        self._writer.add_scalar(key, value, global_step=step)
                self._writer.flush()
            except OSError as exc:
                self._give_up(self.tensorboard_dir, exc, step)
                self._close_tensorboard()
        return record

    def _close_jsonl(self) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.close()
        except OSError as exc:  # the last buffered record could not be flushed
            self._give_up(self.path, exc, None)

    def _close_tensorboard(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except OSError as exc:
            self._give_up(self.tensorboard_dir, exc, None)
        hook = getattr(self, "_thread_hook", None)
        if hook is not None and threading.excepthook is hook[0]:  # leave a later hook in place
            threading.excepthook = hook[1]

    def close(self) -> None:
        """Close both logs; a failure to flush them is reported, never raised (this runs in the
        trainer's ``finally``, where raising would hide the error that ended training)."""
        if not self.enabled:
            return
        self._close_jsonl()
        self._close_tensorboard()
