"""Evaluation sets: ``[[eval]]`` entries with a data source of their own, and the leakage filter.

An ``[[eval]]`` entry with an ``[eval.data]`` table evaluates that source's ``split`` (``test``
by default) instead of the training source's, and reports under the set's ``name`` (default:
the data type): ``musiccaps/retrieval/t2a/R@10``. Entries that share a name share one source
and one embedding pass. Entries without ``[eval.data]`` evaluate the training source as before:
on its validation split while training, on its test split after.

Leakage: a set's recordings may also be in the training source (Song Describer's tracks are
MTG-Jamendo's). The training source is wrapped in a :class:`LeakageFilter` that leaves every
item sharing a track with an evaluation set out of the splits training reads, and counts them.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable, Iterator, Sequence

import attrs

from mtrun.interfaces import Sample

__all__ = ["EvalSet", "EvalSets", "LeakageFilter", "bind_eval_sets", "needs_captions", "plan_lines", "track_key"]

log = logging.getLogger(__name__)


def track_key(sample: Sample, source_type: str) -> str:
    """The recording a sample is, comparable across sources.

    ``extra["track_key"]`` when the adapter knows the recording's catalogue id (MTG-Jamendo and
    Song Describer write ``jamendo:214``, MusicCaps ``youtube:ytid``); otherwise the source type
    with the item's group (or id), which only ever matches items of a source of the same type.
    """
    extra = sample.extra if isinstance(sample.extra, dict) else {}
    key = extra.get("track_key")
    return str(key) if key else f"{source_type}:{sample.group or sample.id}"


def needs_captions(task: Any) -> bool:
    """Whether an eval task declares that its source must provide captions (retrieval does)."""
    from mtrun.schema import declared_requires

    try:
        needs = declared_requires(type(task), getattr(task, "config", None))
    except Exception:  # noqa: BLE001 - a plugin's requires(config) that fails: no check here
        return False
    return any(n.capability == "captions" for n in needs)


@contextlib.contextmanager
def set_errors(where: str) -> Iterator[None]:
    """Reword an adapter's error inside an evaluation set's source: its message names the
    ``[data]`` key to fix, which here is a key of ``where`` (``[[eval]][1].data.csv``)."""
    from mtrun.errors import MtrunError

    try:
        yield
    except MtrunError as exc:
        if "[data]." not in str(exc):
            raise
        raise MtrunError(str(exc).replace("[data].", f"{where}.")) from None


def load_set(source: Any, split: str, where: str) -> Sequence[Sample]:
    """``source.load(split)`` with :func:`set_errors`; a split the source lacks (the data source
    contract's ``KeyError``) is an error naming the set's ``split`` key."""
    from mtrun.errors import MtrunError

    with set_errors(where):
        try:
            return source.load(split)
        except KeyError:
            have = ", ".join(source.splits()) or "none"
            raise MtrunError(f"{where.removesuffix('.data')}.split = {split!r}: the set's data source has no such split (it has: {have})") from None


@attrs.frozen
class EvalSet:
    """One evaluation set: a built source, the split to evaluate and the tasks run on it.

    Attributes:
        name: The set's name; its metrics are ``NAME/<task metric>``.
        source: The built data source.
        type: Its registered data type (for track keys and messages).
        split: The split evaluated.
        where: The recipe table that declared it (``[[eval]][0].data``), for messages.
        tasks: ``(label, task)`` pairs; the label is the task's type.
    """

    name: str
    source: Any
    type: str
    split: str
    where: str
    tasks: tuple[tuple[str, Any], ...]


class LeakageFilter:
    """The training source without the evaluation sets' recordings in the splits training reads.

    Computed on first use of each filtered split (so building it, and ``mtrun validate``, read
    nothing), then kept: :meth:`leakage` gives the counts for the start-up line, ``eval.json``,
    the run report and ``mtrun validate --print``. Other splits, and every other attribute,
    are the wrapped source's.
    """

    def __init__(self, base: Any, base_type: str, sets: Sequence[EvalSet], splits: Iterable[str]):
        self.base = base
        self.base_type = base_type
        self.sets = tuple(sets)
        self.filtered_splits = tuple(dict.fromkeys(splits))
        self._kept: dict[str, list[Sample]] = {}
        self._removed: dict[str, dict[str, int]] = {}
        self._totals: dict[str, int] = {}
        self._keys: dict[str, str] | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "base":  # not set yet (copy, pickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def splits(self) -> Sequence[str]:
        return self.base.splits()

    def load(self, split: str) -> Sequence[Sample]:
        if split not in self.filtered_splits:
            return self.base.load(split)
        if split not in self._kept:
            self._filter(split)
        return self._kept[split]

    def _set_keys(self) -> dict[str, str]:
        """Track key -> the first set holding it."""
        if self._keys is None:
            keys: dict[str, str] = {}
            for s in self.sets:
                for sample in load_set(s.source, s.split, s.where):
                    keys.setdefault(track_key(sample, s.type), s.name)
            self._keys = keys
        return self._keys

    def _filter(self, split: str) -> None:
        keys = self._set_keys()
        kept, removed = [], {s.name: 0 for s in self.sets}
        samples = self.base.load(split)
        for sample in samples:
            owner = keys.get(track_key(sample, self.base_type))
            if owner is None:
                kept.append(sample)
            else:
                removed[owner] += 1
        self._kept[split] = kept
        self._removed[split] = removed
        self._totals[split] = len(samples)
        log.info("leakage filter: %d of %d %r items left out of training (%s)", sum(removed.values()), len(samples), split, removed)

    def leakage(self) -> dict[str, Any]:
        """``{"removed": N, "splits": {split: {"total", "removed", "by_set": {name: n}}}}`` over
        the filtered splits the source has (each computed now if it was not yet)."""
        present = set(self.base.splits())
        out: dict[str, Any] = {"removed": 0, "splits": {}}
        for split in self.filtered_splits:
            if split not in present:
                continue
            self.load(split)
            by_set = self._removed[split]
            out["splits"][split] = {"total": self._totals[split], "removed": sum(by_set.values()), "by_set": dict(by_set)}
            out["removed"] += sum(by_set.values())
        return out

    def describe(self, split: str | None = None) -> str:
        """One line: how many training items were left out, and for which sets."""
        info = self.leakage()
        splits = [split] if split else list(info["splits"])
        parts = []
        for name in splits:
            entry = info["splits"].get(name)
            if entry is None:
                continue
            shared = ", ".join(f"{s} {n}" for s, n in entry["by_set"].items())
            parts.append(f"{entry['removed']} of {entry['total']} {name!r} items ({shared})")
        names = ", ".join(s.name for s in self.sets)
        return (
            "leakage filter: left out of training the items that share a recording with the evaluation "
            f"sets ({names}): " + ("; ".join(parts) or "no training split to filter")
        )


@attrs.frozen
class EvalSets:
    """What the ``[[eval]]`` entries ask for, bound to built sources.

    Attributes:
        training_tasks: ``(label, task)`` of the entries without ``[eval.data]``: they evaluate
            the training source (the trainer's validation rounds, the test split after).
        sets: The named evaluation sets, in recipe order.
        training_data: The training source, wrapped in a :class:`LeakageFilter` when there are
            sets (else the source itself).
    """

    training_tasks: tuple[tuple[str, Any], ...]
    sets: tuple[EvalSet, ...]
    training_data: Any

    def leakage(self) -> dict[str, Any] | None:
        """The filter's counts (:meth:`LeakageFilter.leakage`), or ``None`` without sets."""
        data = self.training_data
        return data.leakage() if isinstance(data, LeakageFilter) else None

    def describe_leakage(self) -> str | None:
        """The start-up line about the leakage filter, or ``None`` without sets."""
        data = self.training_data
        return data.describe() if isinstance(data, LeakageFilter) else None


def _label(spec: Any, taken: dict[str, Any]) -> str:
    label, n = spec.label, 2
    while label in taken:
        label, n = f"{spec.label}-{n}", n + 1
    return label


def bind_eval_sets(resolved: Any, available: dict[str, Any]) -> EvalSets:
    """Build each evaluation set's source (once per distinct ``[eval.data]`` table) and wrap the
    training source in the leakage filter. Called by assembly right after the ``[[eval]]``
    tasks are built; ``available`` holds them (``evals``), ``data`` and ``run``.

    Raises:
        BuildError: A set's source could not be built; the message names its table.
    """
    from mtrun.spec import construct

    specs, built = resolved.evals, tuple(available.get("evals", ()))
    training: dict[str, Any] = {}
    named: dict[str, dict[str, Any]] = {}
    sources: list[tuple[Any, Any]] = []  # (data spec, built source): equal tables share one
    for i, (spec, task) in enumerate(zip(specs, built)):
        data_spec = spec.extras.get("data")
        if data_spec is None:
            training[_label(spec, training)] = task
            continue
        name = spec.extras.get("set") or data_spec.name
        entry = named.get(name)
        if entry is None:
            source = next((b for s, b in sources if s == data_spec), None)
            if source is None and data_spec == resolved.components.get("data"):
                source = available["data"]  # the training source itself (its test split, say): read once
            if source is None:
                source = construct(data_spec, {"run": available.get("run")}, resolved.source)
                sources.append((data_spec, source))
            entry = named[name] = {
                "source": source,
                "type": data_spec.name,
                "split": spec.extras.get("split", "test"),
                "where": f"[[eval]][{i}].data",
                "tasks": [],
            }
        entry["tasks"].append((spec.name, task))
    sets = tuple(
        EvalSet(name=n, source=e["source"], type=e["type"], split=e["split"], where=e["where"], tasks=tuple(e["tasks"]))
        for n, e in named.items()
    )
    data = available["data"]
    if sets:
        trainer = resolved.components.get("trainer")
        config = getattr(trainer, "config", None)
        splits = (getattr(config, "train_split", "train"), getattr(config, "val_split", "val"))
        data = LeakageFilter(data, resolved.components["data"].name, sets, splits)
    return EvalSets(training_tasks=tuple(training.items()), sets=sets, training_data=data)


def _reports(spec: Any) -> tuple[str, ...]:
    """The headline metric names a task declares (``reports(config)``), else none."""
    reports = getattr(spec.cls, "reports", None)
    if not callable(reports):
        return ()
    try:
        return tuple(reports(spec.config))
    except Exception:  # noqa: BLE001 - a plugin's reports() that fails only loses the preview
        return ()


def plan_lines(resolved: Any, *, count_leakage: bool = True) -> list[str]:
    """What the evaluation after training will do, for ``mtrun validate --print``: each set
    (name, table, type, split), its tasks and the metrics they report, and how many training
    items the leakage filter leaves out.

    Counting the leakage reads the sources' metadata files (not their audio); when they cannot
    be read (a recipe pointing at datasets this machine lacks) the line says why instead.
    """
    from pathlib import Path

    from mtrun.errors import MtrunError
    from mtrun.run import Run
    from mtrun.spec import construct

    data_spec = resolved.components.get("data")
    lines = ["Evaluation after training (and by `mtrun eval`); metrics named as listed:"]
    training, named = [], {}
    for i, spec in enumerate(resolved.evals):
        own = spec.extras.get("data")
        if own is None:
            training.append((i, spec))
        else:
            named.setdefault(spec.extras.get("set") or own.name, []).append((i, spec))
    if training or not named:
        tasks = ", ".join(f"{s.label} ([[eval]][{i}])" for i, s in training) or "retrieval (default: no [[eval]] table)"
        lines.append(f"  training source [data] ({data_spec.name if data_spec else '?'}), its test split: {tasks}")
        for _, spec in training:
            for metric in _reports(spec):
                lines.append(f"      {metric}")
    for name, entries in named.items():
        first_i, first = entries[0]
        own = first.extras["data"]
        split = first.extras.get("split", "test")
        tasks = ", ".join(f"{s.name} ([[eval]][{i}])" for i, s in entries)
        lines.append(f"  evaluation set {name!r}: [[eval]][{first_i}].data ({own.name}), split {split!r}: {tasks}")
        for _, spec in entries:
            for metric in _reports(spec):
                lines.append(f"      {name}/{metric}")
    if not named:
        return lines
    if not count_leakage:
        return lines
    try:
        run = Run(
            dir=Path(resolved.run.output_dir) / resolved.run.name,
            config=resolved.run,
            loader=resolved.loader,
            recipe=dict(resolved.data),
            recipe_path=resolved.source,
        )
        available = {"run": run, "data": construct(data_spec, {"run": run}, resolved.source), "evals": (None,) * len(resolved.evals)}
        sets = bind_eval_sets(resolved, available)
        lines.append(sets.describe_leakage() or "leakage filter: no evaluation sets")
    except (MtrunError, OSError, KeyError, ValueError) as exc:
        lines.append(f"leakage filter: not counted here, the metadata could not be read: {exc}")
    return lines
