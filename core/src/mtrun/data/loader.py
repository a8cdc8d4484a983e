"""From a sequence of samples to collated batches, reproducibly and shardable over ranks.

The order of an epoch is a permutation seeded by ``(seed, epoch)``; a *global* batch is a
contiguous slice of it. A global batch splits into ``grad_accum`` contiguous micro-batches and
each micro-batch into ``world_size`` contiguous shares, so N ranks each taking their share of
every micro-batch see exactly the items a single process would see in that micro-batch, and
resuming at global batch ``b`` of an epoch yields exactly the batches that were left. Every
random choice for an item (crop offset, caption, sample augmentation) comes from a generator
seeded by ``(seed, epoch, item index)``, independent of workers, ranks and what ran before.

Broken audio is skipped, listed in ``RUN_DIR/skipped.jsonl`` and, in training, replaced by a
deterministic refill, so batch sizes and resume are unaffected (see :class:`BatchLoader`).

Audio reaches a batch one of four ways (``[loader]`` ``cache`` and ``read``): as the audio
encoder's features, sliced in frame space from the compute-once feature cache
(:mod:`mtrun.data.feature_cache`); sliced from the decode-once waveform cache
(:mod:`mtrun.data.waveform_cache`); read as just the crop's span of the file; or decoded whole
and then cropped. Audio decoding, checks, crops and padding live in :mod:`mtrun.data.audio`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from mtrun.data.audio import (
    AudioDecodeError,
    check_waveform,
    crop_offset,
    crop_or_pad,
    decode,
    describe_audio,
    load_waveform,
    open_span,
    to_mono,
)
from mtrun.errors import MtrunError
from mtrun.interfaces import AugmentContext, Augmenter, Batch, Sample
from mtrun.run import LoaderConfig
from mtrun.train.rng import derive_seed

__all__ = [
    "SKIPPED_FILE",
    "AudioDecodeError",
    "BatchLoader",
    "SkipLog",
    "load_audio",
    "prepare_waveform",
    "sample_text",
]

SKIPPED_FILE = "skipped.jsonl"
"""Name of the run-folder file listing every skipped item, one JSON object per line."""

_log = logging.getLogger("mtrun.data")

load_audio = decode
"""Former name of :func:`mtrun.data.audio.decode`, kept for callers of the first loader."""

_CACHE_WARNED: set[str] = set()
"""Cache folders whose write failure was reported in this process (warn once)."""


def prepare_waveform(
    sample: Sample,
    *,
    sample_rate: int,
    clip_samples: int,
    crop: str,
    generator: torch.Generator | None = None,
    pad: str = "zero",
) -> torch.Tensor:
    """A mono float ``[clip_samples]`` waveform at ``sample_rate`` for one sample.

    :func:`~mtrun.data.audio.load_waveform` (decode, check, mix to mono, resample) followed by
    :func:`~mtrun.data.audio.crop_or_pad` with ``crop`` (``random`` draws the offset from
    ``generator``, ``center``, ``start``) and ``pad`` (``zero`` or ``repeat``).

    Raises:
        AudioDecodeError: The audio is missing, undecodable, silent or non-finite; the
            message names the sample and the file.
    """
    wave = load_waveform(sample, sample_rate)
    return crop_or_pad(wave, clip_samples, crop, generator=generator, pad=pad)


def inspect_sample(sample: Sample) -> None:
    """Decode and check a sample's audio at its own rate (no resampling): the probe's test.

    Raises:
        AudioDecodeError: As :func:`~mtrun.data.audio.load_waveform` would.
    """
    if torch.is_tensor(sample.audio) and sample.sample_rate is not None:
        load_waveform(sample, int(sample.sample_rate))
        return
    _decode_checked(sample)


_PART_KINDS = ("truncated", "corrupt", "non-finite")
"""Problems a whole-file decode finds that may lie outside a crop: with span reads, a file with
one of them is not remembered as bad (another crop may read fine; see :class:`BatchLoader`)."""


def _lookup(cache: Any, sample: Sample) -> Any:
    """``cache.lookup`` of the sample's audio (waveform or feature cache); a file the build found
    unusable is raised as that sample's error."""
    try:
        return cache.lookup(sample.audio)
    except AudioDecodeError as exc:
        raise exc.of_sample(sample.id) from None


def _decode_checked(sample: Sample) -> tuple[torch.Tensor, int]:
    """Mono waveform at the file's own rate, checked; errors name the sample and the file."""
    wave, rate = decode_or_raise(sample)
    mono = to_mono(wave)
    check_waveform(mono, f"sample {sample.id!r} ({describe_audio(sample.audio)})")
    return mono, rate


def decode_or_raise(sample: Sample) -> tuple[torch.Tensor, int]:
    try:
        return decode(sample.audio)
    except AudioDecodeError as exc:
        raise exc.of_sample(sample.id) from None


class SkipLog:
    """``RUN_DIR/skipped.jsonl``: each bad item once, with its path and the reason.

    Processes that write it (DataLoader workers, DDP ranks, the train and validation loaders)
    coordinate through an exclusive ``flock`` and re-read the file under the lock, so an item
    found bad by two workers at once is still listed once, across epochs and resumes too. The
    lines are also the loader's memory of known-bad items: a resumed run reloads them and does
    not decode those files again (except lines with ``"scope": "part"``, problems found in one
    crop of a file by span reads, see :class:`BatchLoader`). Delete a line to have the file
    tried again.

    The file is a report and a cache, not something training needs: when it cannot be written
    (read-only run folder, disk full, no locking on a network file system) or read, a warning
    says so, the record is kept in this process's memory, and the item is skipped all the
    same. Stopping a long run because a list could not be appended to would cost more than
    the list is worth; the warning carries each item's reason, so nothing goes unreported.

    Args:
        path: The file, or ``None`` to keep the list in memory only (no run folder).
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._memory: dict[str, dict[str, Any]] = {}
        self._read_failed = False

    def read(self) -> dict[str, dict[str, Any]]:
        """Id → its record, for every item listed so far (in the file or, where writing it
        failed, in memory)."""
        if self.path is None:
            return dict(self._memory)
        records: dict[str, dict[str, Any]] = {}
        try:
            data = self.path.read_bytes() if self.path.exists() else b""
        except OSError as exc:
            if not self._read_failed:  # once: read() runs after every batch that skipped
                self._read_failed = True
                _log.warning("could not read %s (%s); using the items skipped by this process only", self.path, exc)
            data = b""
        for record in _records(data):
            records.setdefault(str(record["id"]), record)
        for item, record in self._memory.items():
            records.setdefault(item, record)
        return records

    def ids(self) -> set[str]:
        return set(self.read())

    def remembered_ids(self) -> set[str]:
        """Ids of items bad as a whole file (every read finds them bad): the loader skips these
        without reading them. Records with ``"scope": "part"`` (a problem in one crop, see
        :class:`BatchLoader`) are listed for the report but tried again."""
        return {item for item, record in self.read().items() if record.get("scope", "file") != "part"}

    def record(self, record: dict[str, Any]) -> bool:
        """Append ``record`` (with ``id``, ``path``, ``reason``) unless its id is listed.

        A failure to write is logged as a warning naming the item and its reason; the record
        is then kept in memory (see the class docstring).

        Returns:
            True when this call added it (to the file or, failing that, to memory).
        """
        item = str(record["id"])
        if item in self._memory:
            return False
        if self.path is None:
            self._memory[item] = record
            return True
        import fcntl

        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    handle.seek(0)
                    data = handle.read()
                    if any(str(r["id"]) == item for r in _records(data)):
                        return False
                    if data and not data.endswith(b"\n"):
                        line = b"\n" + line  # an earlier write was cut short: do not glue onto it
                    handle.seek(0, os.SEEK_END)
                    handle.write(line)
                    handle.flush()
                    os.fsync(handle.fileno())
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        except OSError as exc:
            _log.warning(
                "could not record item %r in %s (%s); it is skipped anyway: %s",
                item, self.path, exc.strerror or exc, record.get("reason", ""),
            )
            self._memory[item] = record
        return True


def _records(data: bytes) -> Iterator[dict[str, Any]]:
    """The records of a ``skipped.jsonl``'s bytes; lines cut by a crash or a full disk (bad
    JSON, a multi-byte character cut in half) are ignored."""
    for raw in data.splitlines():
        try:
            record = json.loads(raw.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record:
            yield record


def sample_text(sample: Sample, *, training: bool, generator: torch.Generator | None = None) -> str:
    """The text paired with a sample: a random caption in training (the first in evaluation),
    or the tags joined with commas when there is no caption."""
    if sample.captions:
        if training and len(sample.captions) > 1:
            return sample.captions[int(torch.randint(0, len(sample.captions), (), generator=generator))]
        return sample.captions[0]
    return ", ".join(tag for tags in sample.tags.values() for tag in tags)


class _BuildProgress:
    """A cache build's progress on stderr: a rich bar (one line, drawn when done, where stderr
    is not a terminal), after a line saying what is built where."""

    def __init__(self, cache: Any, split: str, *, enabled: bool):
        self.folder, self.split, self.enabled = cache.folder, split, enabled
        self.what, self.name = cache.WHAT, cache.NAME
        self._bar = None

    def start(self, total: int) -> Callable[[], None] | None:
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from mtrun.console import make_console

        console = make_console(stderr=True)
        split = f" of split {self.split!r}" if self.split else ""
        console.print(
            f"{self.what.format(n=total, split=split)} -> {self.folder} (later runs reuse them)",
            markup=False, highlight=False, soft_wrap=True,
        )
        columns = (TextColumn(self.name), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        self._bar = Progress(*columns, console=console)
        task = self._bar.add_task("decode", total=total)
        self._bar.start()
        return lambda: self._bar.advance(task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _identity(x: Any) -> Any:
    return x


def _wilson_lower(bad: int, total: int, z: float = 2.326) -> float:
    """One-sided 99% lower confidence bound of a proportion (Wilson score interval)."""
    if total == 0:
        return 0.0
    p = bad / total
    centre = p + z * z / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, (centre - spread) / (1 + z * z / total))


class _MicroBatches(torch.utils.data.Dataset):
    """Item ``i`` is the ``i``-th planned micro-batch, already collated (runs in workers)."""

    def __init__(self, loader: BatchLoader, plan: list[tuple[int, int, int, list[int], list[int]]]):
        self.loader = loader
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[int, int, Batch]:
        epoch, b, micro, indices, slots = self.plan[i]
        return b, micro, self.loader.make_batch(indices, epoch=epoch, batch_index=b, slots=slots)


class BatchLoader:
    """Plans and builds the batches of one split, skipping broken audio.

    **Bad input.** An item whose audio is missing, unreadable, empty, truncated, not audio,
    silent or non-finite (see :mod:`mtrun.data.audio`) is skipped and listed once in
    ``RUN_DIR/skipped.jsonl`` (``{"id", "path", "kind", "reason"}``), and in training its slot
    is *refilled*: slot ``p`` of global batch ``b`` takes the item at the same slot of batch
    ``b+1`` of the epoch's permutation, then ``b+2``, ... — the first that is good. Because
    badness is a property of the file (checked on the whole file, before cropping), the
    replacement depends only on the data, not on which bad items were already known; known-bad
    ids (reloaded from ``skipped.jsonl``) only save decoding them again. So batches keep their
    size, ranks need not talk to each other, and a resumed run follows the uninterrupted
    run's trajectory exactly. Distinct slots draw from distinct positions, so two refills of one
    batch never pick the same item (short of the permutation wrapping around). In evaluation
    bad items are dropped instead: repeating an item would bias the metrics.

    **Span reads** (``config.read = "span"``) decode only the crop, so a problem inside a file
    (NaN samples, a damaged frame, a FLAC cut short) is found only by a crop that reaches it.
    Such a verdict belongs to the crop, not the file: the slot is refilled as above and the item
    listed once with ``"scope": "part"``, but the item is not remembered as bad, so whether it
    is used again depends only on its next crop, never on what was found before (resume, workers
    and ranks stay exact). What the header shows (missing, unreadable, empty, not audio, a WAV
    shorter than its header) is a property of the file and remembered as usual. A *silent* crop
    is checked against the whole file: a silent file is bad as a file; a quiet passage of a
    file with sound is used, as it would be after a whole-file decode.

    **The waveform cache** (``config.cache = "waveforms"``): at construction every file of the
    split that is not cached yet is decoded, checked, mixed to mono and resampled once, in
    ``config.num_workers`` processes with a progress bar (:mod:`mtrun.data.waveform_cache`);
    crops are then read from the entries (only their own samples), offsets drawn as above. The
    verdicts are whole-file ones, found in the build: the bad items are listed then and the
    bad fraction is checked exactly. Where the cache cannot be written, the loader warns once
    and reads the remaining files as ``config.read`` says.

    **The feature cache** (``config.cache = "features"``, given the audio encoder's
    ``frame_features``): built like the waveform cache, but each entry holds the encoder's
    features of the whole file at ``config.feature_phases`` sub-hop starting points
    (:mod:`mtrun.data.feature_cache`). A clip's frames are read at an offset drawn as above in
    units of ``hop / feature_phases`` samples, so they are the frames ``preprocess`` computes on
    the waveform cropped there; the batch arrives with
    ``clean_features`` filled and ``waveforms`` empty (``[B, 0]``). A file with fewer frames than
    a clip (or one not cached) is cropped and padded as a waveform and its frames computed on
    the clip.

    **Too much bad input** fails early. At construction a seeded random subset of
    ``config.probe_items`` items is decoded; the loader refuses to start when the probe shows,
    at 99% confidence (a one-sided Wilson bound, so a few unlucky draws from a mostly good
    dataset do not stop it), that more than ``config.max_bad_fraction`` of the split is bad —
    a wrong ``audio_root`` fails in seconds rather than after an epoch of skips. A probe as
    large as the split is an exact count. During training the number of distinct bad items
    found so far (a lower bound of the true count) is checked after every batch that skipped
    something, so a dataset that slipped past the probe still stops once it provably
    exceeds the fraction.

    Args:
        samples: The split.
        config: The ``[loader]`` table (clip length, crop and pad policies, workers, bad-input
            limits).
        sample_rate: The audio encoder's rate; waveforms are resampled to it.
        tokenize: The text encoder's ``tokenize`` (must be picklable for workers).
        batch_size: The global batch size (over all ranks and micro-batches).
        grad_accum: Micro-batches per global batch.
        seed: The run seed.
        training: Shuffle, drop the last partial batch, random crops/captions, sample
            augmenters, refill skipped slots; otherwise split order, every item, deterministic
            crops, first caption, skipped items dropped.
        augmenters: ``sample``-stage augmenters (training only unless ``applies_in_eval``).
        rank, world_size: This rank's share of each micro-batch.
        steps_per_epoch, total_steps: Handed to augmenters through :class:`AugmentContext`.
        run_dir: The run folder, where ``skipped.jsonl`` is written; ``None`` keeps the list
            in memory.
        split: The split's name, recorded with each skipped item.
        preprocess: The audio encoder's ``preprocess``, to run here (in the DataLoader workers)
            rather than on the training step, when it is a fixed function of the waveform (the
            encoder's ``preprocess_in_loader``) and no ``waveform`` augmenter must act first;
            its output goes to the batch's ``clean_features``. ``None``: the system runs it.
        frame_features: The audio encoder's ``frame_features``; required by, and used only
            with, ``config.cache = "features"`` (then ``preprocess`` is not needed).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        config: LoaderConfig,
        sample_rate: int,
        tokenize: Callable[[Sequence[str]], dict[str, torch.Tensor]],
        batch_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        training: bool = True,
        augmenters: Sequence[Augmenter] = (),
        rank: int = 0,
        world_size: int = 1,
        steps_per_epoch: int = 0,
        total_steps: int = 0,
        run_dir: str | Path | None = None,
        split: str = "",
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        frame_features: Any = None,
    ):
        if batch_size % (grad_accum * world_size) != 0:
            raise MtrunError(
                f"batch_size {batch_size} must be divisible by grad_accum × ranks "
                f"= {grad_accum} × {world_size} so every rank gets an equal share of every micro-batch"
            )
        self.samples = samples
        self.config = config
        self.sample_rate = int(sample_rate)
        self.clip_samples = max(1, round(config.clip_seconds * self.sample_rate))
        self.tokenize = tokenize
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.training = training
        self.augmenters = [a for a in augmenters if training or getattr(a, "applies_in_eval", False)]
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.crop = config.crop if training else ("center" if config.crop == "random" else config.crop)
        self.pad = config.pad
        self.split = split
        self.preprocess = preprocess
        self.skip_log = SkipLog(Path(run_dir) / SKIPPED_FILE if run_dir is not None else None)
        self.span_reads = config.read == "span"
        self._known_bad: set[str] = self.skip_log.remembered_ids()
        self._order_cache: tuple[int, list[int]] | None = None
        self._split_ids: set[str] | None = None
        self.waveform_cache = None
        self.feature_cache = None
        cache = config.cache
        self.frame_features = frame_features if cache == "features" else None
        self.clip_frames = 0
        if cache == "features":
            if frame_features is None:
                raise MtrunError(
                    '[loader].cache = "features" needs the audio encoder\'s frame_features (an encoder whose '
                    'preprocess works frame by frame); set [loader].cache = "waveforms" or "off"'
                )
            from mtrun.data.feature_cache import check_phases

            check_phases(config.feature_phases, frame_features)  # before any file is probed
            self.clip_frames = int(frame_features.num_frames(self.clip_samples))
            if self.clip_frames < 1:
                raise MtrunError(
                    f"[loader].clip_seconds = {config.clip_seconds:g} is shorter than one frame of the "
                    "audio encoder's features"
                )
        if config.probe_items > 0 and len(samples) > 0:
            self.probe()
        if cache in ("waveforms", "features") and len(samples) > 0:
            self.build_cache()

    # ------------------------------------------------------------------ planning

    @property
    def num_batches(self) -> int:
        """Global batches per epoch (the last partial one is dropped in training)."""
        n = len(self.samples)
        return n // self.batch_size if self.training else -(-n // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """Sample indices of an epoch in visiting order."""
        n = len(self.samples)
        if not self.training:
            return list(range(n))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        return torch.randperm(n, generator=generator).tolist()

    def _cached_order(self, epoch: int) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, self.order(epoch))
        return self._order_cache[1]

    def global_batch(self, epoch: int, b: int, order: list[int] | None = None) -> list[int]:
        """Indices of global batch ``b`` of ``epoch`` (all ranks, all micro-batches)."""
        order = self.order(epoch) if order is None else order
        return order[b * self.batch_size : (b + 1) * self.batch_size]

    def shard(self, indices: list[int], micro: int, rank: int | None = None) -> list[int]:
        """This rank's contiguous share of micro-batch ``micro`` of a global batch."""
        rank = self.rank if rank is None else rank
        micro_size = -(-len(indices) // self.grad_accum)
        chunk = indices[micro * micro_size : (micro + 1) * micro_size]
        share = -(-len(chunk) // self.world_size)
        return chunk[rank * share : (rank + 1) * share]

    def plan(self, epoch: int, start: int = 0) -> list[tuple[int, int, int, list[int], list[int]]]:
        """``(epoch, batch, micro, indices, slots)`` for this rank from global batch ``start``
        on; ``slots`` are the items' positions in their global batch (what refills key on)."""
        order = self.order(epoch)
        out = []
        for b in range(start, self.num_batches):
            indices = self.global_batch(epoch, b, order)
            positions = list(range(len(indices)))
            for m in range(self.grad_accum):
                slots = self.shard(positions, m)
                out.append((epoch, b, m, [indices[p] for p in slots], slots))
        return out

    # ------------------------------------------------------------------ bad input

    def _skip(self, index: int, error: AudioDecodeError) -> None:
        """List a bad item in ``skipped.jsonl`` (once) and, unless the problem was found in one
        crop only (``error.scope == "part"``), remember it as bad."""
        sample_id = self.samples[index].id
        part = getattr(error, "scope", "file") == "part"
        if not part:
            self._known_bad.add(sample_id)
        record = {
            "id": sample_id,
            "path": error.path or describe_audio(self.samples[index].audio),
            "kind": error.kind,
            "reason": str(error),
        }
        if part:
            record["scope"] = "part"
        if self.split:
            record["split"] = self.split
        if self.skip_log.record(record):
            _log.warning("skipped %s", error)

    def _usable(self, index: int) -> bool:
        """Whether the item decodes and passes the checks (decoding it once to find out)."""
        if self.samples[index].id in self._known_bad:
            return False
        try:
            inspect_sample(self.samples[index])
        except AudioDecodeError as error:
            if self.span_reads and error.kind in _PART_KINDS and not torch.is_tensor(self.samples[index].audio):
                error.scope = "part"  # a crop elsewhere in the file may read fine: see the class docstring
            self._skip(index, error)
            return False
        return True

    def probe(self) -> None:
        """Decode a seeded random subset of the split; refuse a mostly broken dataset.

        Raises:
            MtrunError: The probe shows (99% confidence) that more than
                ``config.max_bad_fraction`` of the split is bad; names counts, kinds and an
                example.
        """
        n = len(self.samples)
        k = min(int(self.config.probe_items), n)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "probe"))
        chosen = torch.randperm(n, generator=generator)[:k].tolist()
        bad = [i for i in chosen if not self._usable(i)]
        limit = float(self.config.max_bad_fraction)
        exceeded = len(bad) / n > limit if k == n else _wilson_lower(len(bad), k) > limit
        if exceeded:
            records = self.skip_log.read()
            kinds: dict[str, int] = {}
            for i in bad:
                kind = records.get(self.samples[i].id, {}).get("kind", "bad")
                kinds[kind] = kinds.get(kind, 0) + 1
            example = records.get(self.samples[bad[0]].id, {}).get("reason", "")
            raise MtrunError(
                f"{len(bad)} of {k} items probed{' (the whole split)' if k == n else ''}"
                f"{f' of split {self.split!r}' if self.split else ''} are unusable "
                f"({', '.join(f'{v} {kind}' for kind, v in sorted(kinds.items()))}), more than "
                f"[loader].max_bad_fraction = {limit:g} allows. First: {example}. "
                "Check the data source's paths (audio_root), or raise [loader].max_bad_fraction."
                + (f" Listed in {self.skip_log.path}." if self.skip_log.path else "")
            )

    def _check_fraction(self) -> None:
        if self._split_ids is None:
            self._split_ids = {s.id for s in self.samples}
        records = self.skip_log.read()
        self._known_bad |= {item for item, r in records.items() if r.get("scope", "file") != "part"}
        bad = len((self._known_bad | set(records)) & self._split_ids)  # part-file problems count too
        n = len(self._split_ids)
        if n and bad / n > self.config.max_bad_fraction:
            raise MtrunError(
                f"{bad} of {n} items{f' of split {self.split!r}' if self.split else ''} are unusable, "
                f"more than [loader].max_bad_fraction = {self.config.max_bad_fraction:g} allows"
                + (f"; see {self.skip_log.path}" if self.skip_log.path else "")
            )

    def _candidates(self, epoch: int, batch_index: int, slot: int) -> Iterator[int]:
        """Refills for ``slot`` of a global batch: the same slot in the following batches of
        the epoch's permutation (wrapping around), never an item of the batch itself."""
        order = self._cached_order(epoch)
        n = len(order)
        own = set(self.global_batch(epoch, batch_index, order))
        start = (batch_index + 1) * self.batch_size + slot
        for k in range(-(-n // max(self.batch_size, 1)) + 1):
            index = order[(start + k * self.batch_size) % n]
            if index not in own:
                yield index

    # ------------------------------------------------------------------ building

    def _prepare(self, sample: Sample, epoch: int, index: int) -> torch.Tensor:
        """The item's clip: from the waveform cache when it holds the file, else read as
        ``config.read`` says. The crop offset comes from the per-(seed, epoch, index) generator
        whichever way the audio is read."""
        crop_gen = torch.Generator().manual_seed(derive_seed(self.seed, "crop", epoch, index))
        if torch.is_tensor(sample.audio) and sample.sample_rate is not None:
            rate = int(sample.sample_rate)
            return self._clip_from_native(load_waveform(sample, rate), rate, crop_gen)  # checked, mono
        if self.waveform_cache is not None:
            cached = _lookup(self.waveform_cache, sample)
            if cached is not None:
                try:
                    return self._clip_from_cache(cached, crop_gen)
                except (OSError, ValueError) as exc:  # the entry went away (cache cleared mid-run)
                    self.waveform_cache.forget(sample.audio, exc)
                    crop_gen = torch.Generator().manual_seed(derive_seed(self.seed, "crop", epoch, index))
        if self.span_reads:
            return self._clip_from_span(sample, crop_gen)
        native, rate = _decode_checked(sample)
        return self._clip_from_native(native, rate, crop_gen)

    def _native_span(self, rate: int) -> int:
        """Samples at ``rate`` to cut before resampling: the clip plus a margin on each side, so
        the resampling filter has real context at the clip's edges (the exact crop trims it)."""
        if rate == self.sample_rate:
            return self.clip_samples
        return math.ceil(self.clip_samples * rate / self.sample_rate) + 2 * 64

    def _clip_from_native(self, native: torch.Tensor, rate: int, crop_gen: torch.Generator) -> torch.Tensor:
        """Crop a checked mono waveform at the file's own rate, then resample.

        Cropping first means only the clip is resampled (a 3-minute track costs a 10-second
        resample).
        """
        if rate != self.sample_rate:
            needed = self._native_span(rate)
            if native.shape[-1] > needed:
                native = crop_or_pad(native, needed, self.crop, generator=crop_gen)
            return self._finish_resampled(native, rate)
        return crop_or_pad(native, self.clip_samples, self.crop, generator=crop_gen, pad=self.pad)

    def _finish_resampled(self, native: torch.Tensor, rate: int) -> torch.Tensor:
        from mtrun.data.audio import resample

        wave = resample(native, rate, self.sample_rate).contiguous()
        return crop_or_pad(wave, self.clip_samples, "center" if wave.shape[-1] > self.clip_samples else self.crop, pad=self.pad)

    def _clip_from_span(self, sample: Sample, crop_gen: torch.Generator) -> torch.Tensor:
        """Decode only the crop's span of the file (the same span, hence the same samples, that
        :meth:`_clip_from_native` cuts from a whole-file decode whose length the header states)."""
        where = f"sample {sample.id!r} ({describe_audio(sample.audio)})"
        try:
            with open_span(sample.audio) as source:
                rate, total = source.rate, source.frames
                if source.whole is not None:  # decoded whole anyway (FFmpeg formats): whole-file checks
                    native = to_mono(source.whole)
                    check_waveform(native, where)
                    return self._clip_from_native(native, rate, crop_gen)
                needed = self._native_span(rate)
                offset = crop_offset(total, needed, self.crop, crop_gen)
                span = to_mono(source.read(offset, min(needed, total)))
        except AudioDecodeError as exc:
            raise exc.of_sample(sample.id) from None
        try:
            check_waveform(span, f"{where}, frames {offset}..{offset + span.shape[-1]}")
        except AudioDecodeError as exc:
            if exc.kind != "silent":
                raise AudioDecodeError(str(exc), kind=exc.kind, path=exc.path or describe_audio(sample.audio), scope="part") from None
            try:  # a silent crop: bad only when the whole file is silent (see the class docstring)
                _decode_checked(sample)
            except AudioDecodeError as whole:
                raise AudioDecodeError(str(whole), kind=whole.kind, path=whole.path, scope="file" if whole.kind == "silent" else "part") from None
        if rate != self.sample_rate:
            return self._finish_resampled(span, rate)
        return crop_or_pad(span, self.clip_samples, self.crop, pad=self.pad)

    def _prepare_frames(self, sample: Sample, epoch: int, index: int) -> torch.Tensor:
        """The item's clip as the encoder's frames ``[clip_frames, ...]``: rows of its feature
        cache entry at an offset drawn in frames, or, for a file with fewer frames than a clip
        or not cached, the frames of the waveform clip :meth:`_prepare` gives."""
        cache = self.feature_cache
        if cache is not None and not torch.is_tensor(sample.audio):
            cached = _lookup(cache, sample)
            n = cache.frames_per_phase(cached) if cached is not None else 0
            if n >= self.clip_frames:
                crop_gen = torch.Generator().manual_seed(derive_seed(self.seed, "crop", epoch, index))
                # In units of hop / phases samples: any phase of any frame whose clip fits.
                position = crop_offset(n * cache.phases, self.clip_frames * cache.phases, self.crop, crop_gen)
                try:
                    return torch.from_numpy(cache.read_crop(cached, position, self.clip_frames))
                except (OSError, ValueError) as exc:  # the entry went away (cache cleared mid-run)
                    cache.forget(sample.audio, exc)
        with torch.no_grad():
            return self.frame_features.frames(self._prepare(sample, epoch, index))[: self.clip_frames]

    def _clip_from_cache(self, entry, crop_gen: torch.Generator) -> torch.Tensor:
        """Read the clip's samples from a cache entry (already mono, checked, at the encoder's rate)."""
        offset = crop_offset(entry.length, self.clip_samples, self.crop, crop_gen)
        clip = torch.from_numpy(entry.read(offset, self.clip_samples))
        return crop_or_pad(clip, self.clip_samples, self.crop, pad=self.pad)

    # ------------------------------------------------------------------ the waveform cache

    def build_cache(self) -> None:
        """Build the waveform (or feature) cache entries this split lacks (see the class docstring).

        Rank 0 shows the progress; each DDP rank starts at its own share of the missing
        entries, so ranks building at once rarely decode the same file. Bad files found are
        listed in ``skipped.jsonl`` and the bad fraction is checked exactly.

        Raises:
            MtrunError: More than ``config.max_bad_fraction`` of the split is unusable.
        """
        from mtrun import distributed

        if self.frame_features is not None:
            from mtrun.data.feature_cache import FeatureCache

            cache = self.feature_cache = FeatureCache(
                self.sample_rate, self.frame_features, phases=self.config.feature_phases
            )
        else:
            from mtrun.data.waveform_cache import WaveformCache

            cache = self.waveform_cache = WaveformCache(self.sample_rate)
        rank, world = distributed.rank(), distributed.world_size()
        wanted = [i for i, s in enumerate(self.samples) if s.id not in self._known_bad and not torch.is_tensor(s.audio)]
        audios = [self.samples[i].audio for i in wanted]
        progress = _BuildProgress(cache, self.split, enabled=rank == 0)
        try:
            report = cache.build(
                audios,
                workers=max(0, int(self.config.num_workers)),
                order_start=(rank * len(audios)) // max(world, 1),
                progress=progress.start,
            )
        finally:
            progress.close()
        if report.failed and str(cache.folder) not in _CACHE_WARNED:
            _CACHE_WARNED.add(str(cache.folder))  # once per process: the train and val loaders both build
            _log.warning(
                "the %s could not be written in %s (%s); training goes on, reading the files that "
                "are not cached yet on every use. Free space there, or point MTRUN_CACHE at another disk; "
                "[loader].cache = \"off\" stops trying.",
                cache.NAME, cache.folder, report.failed,
            )
        if report.bad:
            for i in wanted:
                key = cache.key(self.samples[i].audio)
                if key in report.bad:
                    error = report.bad[key]
                    self._skip(i, AudioDecodeError(f"sample {self.samples[i].id!r}: {error}", kind=error.kind, path=error.path))
            self._check_fraction()

    def make_batch(
        self,
        indices: Sequence[int],
        *,
        epoch: int = 0,
        batch_index: int = 0,
        slots: Sequence[int] | None = None,
    ) -> Batch:
        """Load, augment, crop and collate the samples at ``indices``.

        ``slots`` are the items' positions in their global batch; in training a bad item's
        slot is refilled from them (see the class docstring). The batch's ``skipped`` key lists
        the ids skipped while building it.
        """
        step = epoch * self.steps_per_epoch + batch_index
        waves, texts, ids, tags, groups, skipped = [], [], [], [], [], []
        keys: list[tuple[str, bool] | None] = []  # per clip: (item key, sent as zeros); see item_key
        for position, first in enumerate(indices):
            slot = slots[position] if slots is not None else position
            candidates = self._candidates(epoch, batch_index, slot) if self.training else iter(())
            index: int | None = first
            while index is not None:
                sample = self.samples[index]
                if sample.id not in self._known_bad:
                    if self.augmenters:
                        context = AugmentContext(
                            step=step,
                            epoch=epoch,
                            steps_per_epoch=self.steps_per_epoch,
                            total_steps=self.total_steps,
                            training=self.training,
                            generator=torch.Generator().manual_seed(derive_seed(self.seed, "augment", epoch, index)),
                        )
                        for aug in self.augmenters:
                            sample = aug(sample, context)
                    try:
                        if self.frame_features is not None:
                            wave = self._prepare_frames(sample, epoch, index)
                        else:
                            wave = self._prepare_or_serve(sample, epoch, index, keys)
                        break
                    except AudioDecodeError as error:
                        self._skip(index, error)
                skipped.append(self.samples[index].id)
                index = next(candidates, None)
                if index is None and self.training:
                    raise MtrunError(
                        f"no usable item left to refill slot {slot} of batch {batch_index} (epoch {epoch}): "
                        f"every candidate is listed as bad; see {self.skip_log.path or 'the skipped items'}"
                    )
            if index is None:  # evaluation: the bad item is dropped
                continue
            text_gen = torch.Generator().manual_seed(derive_seed(self.seed, "caption", epoch, index))
            waves.append(wave)
            texts.append(sample_text(sample, training=self.training, generator=text_gen))
            ids.append(sample.id)
            tags.append(sample.tags)
            groups.append(sample.group)
        if self.frame_features is not None:  # waves holds each clip's frames
            waveforms = torch.zeros(len(waves), 0)
        else:
            waveforms = torch.stack(waves) if waves else torch.zeros(0, self.clip_samples)
        batch = Batch(
            ids=ids,
            waveforms=waveforms,
            texts=texts,
            tags=tags,
            groups=groups,
            text_inputs=self.tokenize(texts) if texts else {},
            skipped=skipped,
        )
        self._name_items(batch, keys, len(waves))
        if self.frame_features is not None and waves:
            with torch.no_grad():
                batch.clean_features = self.frame_features.assemble(torch.stack(waves))
        elif self.preprocess is not None and waves:
            # In a worker, beside the training step: the fbank is ~40% of a small model's step.
            with torch.no_grad():
                batch.clean_features = self.preprocess(waveforms)
        return batch

    # ------------------------------------------------------------------ the encoder cache

    #: The training loader's view of the encoder cache (:attr:`mtrun.system.System.served_items`,
    #: set by the trainer): clips whose frozen encoder outputs it holds are sent as zeros, not
    #: decoded. Its list is taken when an epoch's workers start (:meth:`micro_batches`).
    served_items: Any = None
    _served: frozenset[str] = frozenset()

    def item_key(self, sample: Sample, index: int) -> str | None:
        """A name for the clip this loader makes of ``sample``, the same every epoch: the file
        (path, size, modification time), the crop policy, clip length, rate, padding and read
        path. ``None`` where the clip is not a function of those: random crops, in-memory
        waveforms, audio a sample augmenter replaced."""
        original = self.samples[index]
        if self.crop == "random" or not isinstance(sample.audio, (str, os.PathLike)) or sample.audio is not original.audio:
            return None
        try:
            stat = os.stat(sample.audio)
        except OSError:
            return None  # decoding reports it
        what = [os.path.abspath(sample.audio), stat.st_size, stat.st_mtime_ns, self.sample_rate, self.clip_samples, self.crop,
                self.pad, self.config.cache, self.span_reads]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:32]

    def _prepare_or_serve(self, sample: Sample, epoch: int, index: int, keys: list[tuple[str, bool] | None]) -> torch.Tensor:
        """:meth:`_prepare`, or zeros for a clip the encoder cache serves; its key goes to ``keys``."""
        key = self.item_key(sample, index) if self.served_items is not None else None
        served = key is not None and key in self._served
        wave = torch.zeros(self.clip_samples) if served else self._prepare(sample, epoch, index)
        keys.append((key, served) if key is not None else None)
        return wave

    def _name_items(self, batch: Batch, keys: list[tuple[str, bool] | None], n: int) -> None:
        """``batch.audio_items`` (``keys``, ``served``) when every clip of the batch has an item key."""
        if n and len(keys) == n and all(k is not None for k in keys):
            batch.audio_items = {"keys": [k[0] for k in keys], "served": [k[1] for k in keys]}  # type: ignore[index]

    # ------------------------------------------------------------------ iterating

    @property
    def skipped(self) -> dict[str, dict[str, Any]]:
        """Every skipped item listed so far (id → record), this split's and others'."""
        return self.skip_log.read()

    def micro_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """``(batch index, micro index, batch)`` for this rank, in order, from global batch
        ``start`` of ``epoch``; built by a DataLoader with ``config.num_workers`` workers.

        Evaluation batches left empty by skipped items are not yielded.
        """
        plan = self.plan(epoch, start)
        if not plan:
            return iter(())
        # Workers get a copy of this loader: hand them what other processes found bad so far.
        self._known_bad |= self.skip_log.remembered_ids()
        self._served = self.served_items.served() if self.served_items is not None else frozenset()
        workers = max(0, int(self.config.num_workers))
        loader = torch.utils.data.DataLoader(
            _MicroBatches(self, plan),
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=2 if workers else None,
        )
        return self._checked(iter(loader))

    def _checked(self, batches: Iterator[tuple[int, int, Batch]]) -> Iterator[tuple[int, int, Batch]]:
        for b, micro, batch in batches:
            if batch.get("skipped"):
                self._check_fraction()
            if not self.training and not batch["ids"]:
                continue
            yield b, micro, batch

    def global_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, list[Batch]]]:
        """``(batch index, [micro-batches])`` per global batch, from ``start`` on."""
        current: list[Batch] = []
        last = None
        for b, micro, batch in self.micro_batches(epoch, start):
            if last is not None and b != last and current:  # evaluation: a batch lost a micro-batch
                yield last, current
                current = []
            last = b
            current.append(batch)
            if micro == self.grad_accum - 1:
                yield b, current
                current = []
        if current:  # evaluation: the last global batch may have fewer micro-batches
            yield last, current

    def __iter__(self) -> Iterator[Batch]:
        """Every micro-batch of epoch 0 (what evaluation iterates)."""
        for _, _, batch in self.micro_batches(0):
            yield batch
