"""SIGKILL the toy run at chosen moments, resume it each time, and judge the outcome.

Shared by ``tests/reliability/test_kills.py`` (one kill of each kind in CI) and
``benchmarks/faults_kills.py`` (the full sweep), so both inject the same faults and apply the
same checks. The run is ``tests/toyrun.py`` (20 steps, a checkpoint every step, augmentation
on, grad_accum 2) with an evaluation every ``EVAL_EVERY`` steps, started and watched with the
helpers of ``tests/test_trainer.py``.

Kills come in chains, as a preemptible job meets them: the run is started, killed at the
chain's first moment, resumed with ``--resume latest``, killed at the next moment, ... and
finally resumed to the end without a kill. A chain costs one process per kill plus one, where
isolated kills would cost two each. The kinds of :class:`Moment`:

* ``step``: at a random point of the step after step ``k`` (mostly its compute and the toy's
  0.12 s step delay, sometimes its log line or checkpoint);
* ``checkpoint``: while step ``k``'s checkpoint is being written, i.e. within a write's time
  (about 10 ms) of its ``step-k.tmp-PID`` folder appearing;
* ``eval``: during the evaluation after step ``k`` (a multiple of ``EVAL_EVERY``), i.e. within
  an evaluation's time of step ``k``'s training line being logged;
* ``startup``: at a random point of the process's start-up (import, reading and verifying the
  checkpoint, removing partial folders, rewriting ``metrics.jsonl``, its first step); a resume
  unless it is the chain's first kill.

Every kill is checked at once (the process died of the SIGKILL, not before, and printed no
traceback; every ``step-N`` folder with a ``COMPLETE`` marker reads back with its checksums
verified), and again when the next process is killed or finishes (the training losses and
``val/loss`` values logged so far equal the reference run's, each step once). At the end the
final weights and optimizer state must equal the reference's bit for bit, and no partial
checkpoint folder may be left. :class:`Outcome` holds, per kill, where it landed and what went
wrong: ``lost`` (data lost: a differing or failed resume, an unreadable checkpoint, a partial
folder left behind) and ``tracebacks`` (SIGKILL prints none, so every traceback is a bug).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
for _path in (TESTS / "testkit" / "src", TESTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from test_trainer import logged_steps, start_toy, wait_until_logged  # noqa: E402
from toyrun import run_toy  # noqa: E402

__all__ = ["EVAL_EVERY", "KINDS", "RUN_ARGS", "STEPS", "Moment", "Outcome", "draw_chains", "kill_chain", "reference"]

STEPS = 20
EVAL_EVERY = 3
RUN_ARGS = ("--eval-every", str(EVAL_EVERY))
"""Arguments of every run, the reference's included (20 steps and a checkpoint every step are
toyrun's defaults)."""
KINDS = ("step", "checkpoint", "eval", "startup")
STEP_DELAY = 0.12  # start_toy's --step-delay
WRITE_WINDOW = 0.008  # a toy checkpoint write takes about 10 ms on a 2-core machine
EVAL_WINDOW = 0.010  # so does an evaluation
TRACEBACK = "Traceback (most recent call last)"


@dataclass(frozen=True)
class Moment:
    """When to kill: ``kind`` (one of :data:`KINDS`), the step ``k`` it refers to (0 for
    ``startup``), and ``fraction`` in [0, 1) of the kind's window (a step, a write, an
    evaluation, a start-up) to wait before the kill."""

    kind: str
    k: int
    fraction: float

    def __str__(self) -> str:
        at = f" k={self.k}" if self.kind != "startup" else ""
        return f"{self.kind}{at} fraction={self.fraction:.3f}"


def draw_chains(seed: int, kills: int) -> list[list[Moment]]:
    """``kills`` moments drawn from ``seed``, in chains of one kill of each kind (in random
    order; the last chain may be shorter and then holds random kinds).

    The steps of a chain's ``step``/``checkpoint``/``eval`` kills fall in disjoint bands of
    steps 2..17, in order, at least three steps apart: a ``step`` kill may land after step
    ``k + 1`` was logged and a ``startup`` kill after the resumed run's first step, and the next
    kill must still be ahead of both.
    """
    rng = random.Random(seed)
    chains = []
    while kills > 0:
        kinds = list(KINDS) if kills >= len(KINDS) else rng.sample(KINDS, kills)
        rng.shuffle(kinds)
        kills -= len(kinds)
        stepped = [kind for kind in kinds if kind != "startup"]
        width = (STEPS - 2) // max(1, len(stepped))
        bands = iter((2 + i * width, i * width + width - 1) for i in range(len(stepped)))
        chain = []
        for kind in kinds:
            k = 0
            if kind != "startup":
                low, high = next(bands)
                choices = [s for s in range(low, high + 1) if kind != "eval" or s % EVAL_EVERY == 0]
                k = rng.choice(choices)
            chain.append(Moment(kind, k, rng.random()))
        chains.append(chain)
    return chains


@dataclass
class Outcome:
    """What one kill did (``landed``: what was in flight) and what went wrong after it."""

    moment: Moment
    landed: str = "?"
    lost: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)

    @property
    def survived(self) -> bool:
        return not self.lost and not self.tracebacks

    def report(self) -> str:
        lines = [f"kill at {self.moment}: landed {self.landed}"]
        lines += [f"  data lost: {p}" for p in self.lost]
        lines += [f"  bare traceback: {t}" for t in self.tracebacks]
        return "\n".join(lines)


def reference(run_dir: Path) -> tuple[Path, float]:
    """The uninterrupted run every resumed run must reproduce, and its start-up time in seconds
    (from its start until step 1 was logged: the window of a ``startup`` kill)."""
    began = time.monotonic()
    proc = start_toy(run_dir, *RUN_ARGS, stdout=subprocess.DEVNULL)
    try:
        wait_until_logged(proc, run_dir, 1)
        startup = time.monotonic() - began
        _, err = proc.communicate(timeout=120)
    finally:
        _kill(proc)
    assert proc.returncode == 0, f"the reference run failed ({proc.returncode}):\n{err}"
    return run_dir, startup


def kill_chain(run_dir: Path, chain: list[Moment], reference_dir: Path, startup_window: float) -> list[Outcome]:
    """Start the toy run in ``run_dir``, SIGKILL it at each moment of ``chain`` in turn
    (resuming in between), resume it to the end and compare it with ``reference_dir``.

    ``startup_window``: seconds over which a ``startup`` kill is spread (the reference's
    start-up time, see :func:`reference`).
    """
    expected = _records(reference_dir)
    outcomes: list[Outcome] = []
    reported: set[str] = set()
    for i, moment in enumerate(chain):
        outcome = Outcome(moment)
        args = RUN_ARGS if i == 0 else (*RUN_ARGS, "--resume", "latest")
        proc = start_toy(run_dir, *args, stdout=subprocess.DEVNULL)
        try:
            outcome.landed = _kill_at(proc, run_dir, moment, startup_window)
        except AssertionError as exc:  # the run ended (or hung) before the moment came
            outcome.landed = f"nowhere: {exc}"
            outcome.lost.append(f"the moment never came: {exc}")
            if TRACEBACK in str(exc):  # wait_until_logged put the run's stderr in its message
                outcome.tracebacks.append(str(exc)[str(exc).index(TRACEBACK) :].strip()[-2000:])
        finally:
            _kill(proc)
        if outcomes:  # the records this process logged come from resuming after the last kill
            outcomes[-1].lost += _compare_records(run_dir, expected)
        _check_killed(proc, outcome)
        outcome.lost += _new(_unreadable_checkpoints(run_dir), reported)
        outcomes.append(outcome)
    last = outcomes[-1] if outcomes else Outcome(Moment("none", 0, 0.0))
    _finish(run_dir, last)
    last.lost += _compare_records(run_dir, expected, final=True)
    last.lost += _new(_unreadable_checkpoints(run_dir), reported)
    last.lost += _compare_final_state(run_dir, reference_dir)
    return outcomes


def _new(problems: list[str], reported: set[str]) -> list[str]:
    """``problems`` not yet blamed on an earlier kill of the chain (a damaged folder stays
    until it is pruned)."""
    fresh = [p for p in problems if p not in reported]
    reported.update(fresh)
    return fresh


def _kill_at(proc: subprocess.Popen, run_dir: Path, moment: Moment, startup_window: float) -> str:
    """SIGKILL ``proc`` at ``moment``; say where the kill landed."""
    kind, k = moment.kind, moment.k
    root = run_dir / "checkpoints"
    if kind == "startup":
        log = run_dir / "metrics.jsonl"
        before = _stat(log)
        time.sleep(moment.fraction * startup_window)
        _kill(proc)
        if _stat(log) == before:
            return f"{moment.fraction * startup_window:.2f} s into start-up, before metrics.jsonl was opened"
        return f"{moment.fraction * startup_window:.2f} s into start-up, " + _kill_now(proc, run_dir)
    if kind == "step":
        wait_until_logged(proc, run_dir, k)
        time.sleep(moment.fraction * STEP_DELAY)
        return _kill_now(proc, run_dir)
    if kind == "checkpoint":
        wait_until_logged(proc, run_dir, k - 1)
        prefix = f"step-{k:06d}.tmp-{proc.pid}"
        _poll(proc, lambda: any(name.startswith(prefix) for name in _names(root)), f"a {prefix} folder")
        time.sleep(moment.fraction * WRITE_WINDOW)
        return _kill_now(proc, run_dir)
    if kind == "eval":
        wait_until_logged(proc, run_dir, k - 1)
        _poll(proc, lambda: any(r["step"] == k and "loss" in r for r in _records(run_dir)), f"step {k} logged")
        time.sleep(moment.fraction * EVAL_WINDOW)
        where = _kill_now(proc, run_dir)
        evaluated = any(r["step"] == k and "val/loss" in r for r in _records(run_dir))
        return f"{where}, {'after' if evaluated else 'during'} the evaluation at step {k}"
    raise ValueError(f"unknown kill kind {kind!r}; known: {', '.join(KINDS)}")


def _kill_now(proc: subprocess.Popen, run_dir: Path) -> str:
    """SIGKILL ``proc`` now and say how far it had got."""
    _kill(proc)
    partial = [n for n in _names(run_dir / "checkpoints") if f".tmp-{proc.pid}" in n]
    where = f"after step {logged_steps(run_dir)} was logged"
    return where + (f", mid-write of {', '.join(sorted(partial))}" if partial else "")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _poll(proc: subprocess.Popen, condition, what: str, timeout: float = 60) -> None:
    """Wait for ``condition()``, polling every half millisecond (``wait_until_logged`` polls
    every 10 ms: as long as a whole checkpoint write or evaluation)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.0005)


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_mtime_ns, info.st_size


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _records(run_dir: Path) -> list[dict]:
    """``metrics.jsonl`` without a last line that a kill cut short."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _check_killed(proc: subprocess.Popen, outcome: Outcome) -> None:
    err = proc.stderr.read()
    proc.stderr.close()
    if TRACEBACK in err:
        outcome.tracebacks.append(err[err.index(TRACEBACK) :].strip()[-2000:])
    if proc.returncode != -signal.SIGKILL:
        outcome.lost.append(f"the run ended with {proc.returncode} before it was killed: {err.strip()[-2000:]}")


def _unreadable_checkpoints(run_dir: Path) -> list[str]:
    """Every ``step-N`` folder with a COMPLETE marker must read back (checksums verified)."""
    from mtrun.train.checkpoint import complete, read_checkpoint

    problems = []
    root = run_dir / "checkpoints"
    for name in sorted(_names(root)):
        if name.startswith("step-") and ".tmp-" not in name and complete(root / name):
            try:
                read_checkpoint(root / name)
            except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
                problems.append(f"complete checkpoint {name} cannot be read: {type(exc).__name__}: {exc}")
    return problems


def _finish(run_dir: Path, outcome: Outcome) -> None:
    """Resume to the end; the partial folders the killed processes left must then be gone."""
    try:
        proc = run_toy(run_dir, *RUN_ARGS, "--resume", "latest")
    except AssertionError as exc:  # run_toy's report of a failed run, with its output
        text = str(exc)
        if TRACEBACK in text:
            outcome.tracebacks.append(f"the final resume: {text[text.index(TRACEBACK) :].strip()[-2000:]}")
        outcome.lost.append(f"the final resume failed: {text.strip()[-2000:]}")
        return
    if TRACEBACK in proc.stderr:
        outcome.tracebacks.append(f"the final resume: {proc.stderr[proc.stderr.index(TRACEBACK) :].strip()[-2000:]}")
    root = run_dir / "checkpoints"
    leftovers = sorted(n for n in _names(root) if ".tmp-" in n and (root / n).is_dir())
    if leftovers:
        outcome.lost.append(f"partial checkpoint folders left after the final resume: {', '.join(leftovers)}")


def _compare_records(run_dir: Path, expected: list[dict], *, final: bool = False) -> list[str]:
    """The training losses and ``val/loss`` values logged so far (all of them when ``final``)
    equal the reference's, each step once."""
    problems = []
    records = _records(run_dir)
    for key in ("loss", "val/loss"):
        got = [(r["step"], r[key]) for r in records if key in r]
        want = dict((r["step"], r[key]) for r in expected if key in r)
        steps = [step for step, _ in got]
        if len(set(steps)) != len(steps):
            problems.append(f"metrics.jsonl holds a {key} record twice for a step: steps {steps}")
        if final and sorted(steps) != sorted(want):
            problems.append(f"metrics.jsonl has {key} for steps {steps}, the reference for {sorted(want)}")
        differ = [step for step, value in got if want.get(step) != value]
        if differ:
            problems.append(f"{key} differs from the reference at steps {differ}")
    return problems


def _compare_final_state(run_dir: Path, reference_dir: Path) -> list[str]:
    """The last checkpoint's weights and optimizer state equal the reference's, bit for bit."""
    import torch
    from safetensors.torch import load_file

    problems = []
    last = f"checkpoints/step-{STEPS:06d}"
    for name in ("model", "optimizer"):
        try:
            resumed = load_file(str(run_dir / last / f"{name}.safetensors"))
        except (OSError, RuntimeError, ValueError) as exc:
            problems.append(f"{last}/{name}.safetensors cannot be read: {exc}")
            continue
        want = load_file(str(reference_dir / last / f"{name}.safetensors"))
        differ = sorted(key for key in want if key not in resumed or not torch.equal(want[key], resumed[key]))
        if differ or resumed.keys() != want.keys():
            problems.append(f"final {name} state differs from the reference in {differ[:5] or 'its keys'}")
    return problems
