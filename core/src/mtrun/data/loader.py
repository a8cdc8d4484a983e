"""From a sequence of samples to collated batches, reproducibly and shardable over ranks.

The order of an epoch is a permutation seeded by ``(seed, epoch)``; a *global* batch is a
contiguous slice of it. A global batch splits into ``grad_accum`` contiguous micro-batches and
each micro-batch into ``world_size`` contiguous shares, so N ranks each taking their share of
every micro-batch see exactly the items a single process would see in that micro-batch, and
resuming at global batch ``b`` of an epoch yields exactly the batches that were left. Every
random choice for an item (crop offset, caption, sample augmentation) comes from a generator
seeded by ``(seed, epoch, item index)``, independent of workers, ranks and what ran before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from mtrun.errors import MtrunError
from mtrun.interfaces import AugmentContext, Augmenter, Batch, Sample
from mtrun.run import LoaderConfig
from mtrun.train.rng import derive_seed

__all__ = ["AudioDecodeError", "BatchLoader", "load_audio", "prepare_waveform", "sample_text"]


class AudioDecodeError(MtrunError):
    """An audio file could not be read; names the sample and the file."""


def load_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Decode an audio file to a float ``[channels, time]`` tensor and its sample rate.

    soundfile (libsndfile) is preferred when installed because it needs no codec libraries
    beyond its wheel; torchaudio is the fallback.

    Raises:
        AudioDecodeError: The file is missing or cannot be decoded.
    """
    path = str(path)
    try:
        try:
            import soundfile
        except ImportError:
            soundfile = None
        if soundfile is not None:
            data, rate = soundfile.read(path, dtype="float32", always_2d=True)
            return torch.from_numpy(data.T.copy()), int(rate)
        import torchaudio

        wave, rate = torchaudio.load(path)
        return wave.float(), int(rate)
    except Exception as exc:  # noqa: BLE001 - every decoder failure means the same to the user
        raise AudioDecodeError(
            f"cannot decode audio file {path!r}: {type(exc).__name__}: {exc} "
            "(is the file present and a format libsndfile reads, e.g. WAV/FLAC/OGG? "
            "`pip install soundfile` if neither soundfile nor a torchaudio backend is installed)"
        ) from exc


def prepare_waveform(
    sample: Sample,
    *,
    sample_rate: int,
    clip_samples: int,
    crop: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A mono float ``[clip_samples]`` waveform at ``sample_rate`` for one sample.

    Channels are averaged; the audio is resampled when its rate differs from the encoder's;
    longer audio is cropped by ``crop`` (``random`` draws the offset from ``generator``,
    ``center``, ``start``) and shorter audio is zero-padded at the end.
    """
    if isinstance(sample.audio, (str, Path)):
        try:
            wave, rate = load_audio(sample.audio)
        except AudioDecodeError as exc:
            raise AudioDecodeError(f"sample {sample.id!r}: {exc}") from exc
    else:
        wave = torch.as_tensor(sample.audio)
        if sample.sample_rate is None:
            raise MtrunError(f"sample {sample.id!r} holds a waveform but no sample_rate")
        rate = int(sample.sample_rate)
    wave = wave.float()
    if wave.dim() == 2:
        wave = wave.mean(0)
    elif wave.dim() != 1:
        raise MtrunError(f"sample {sample.id!r}: audio must be [channels, time] or [time] (got shape {tuple(wave.shape)})")
    if rate != sample_rate:
        import torchaudio.functional

        wave = torchaudio.functional.resample(wave, orig_freq=rate, new_freq=sample_rate)
    length = wave.shape[0]
    if length > clip_samples:
        if crop == "random":
            offset = int(torch.randint(0, length - clip_samples + 1, (), generator=generator))
        elif crop == "center":
            offset = (length - clip_samples) // 2
        elif crop == "start":
            offset = 0
        else:
            raise ValueError(f"unknown crop policy {crop!r}")
        wave = wave[offset : offset + clip_samples]
    elif length < clip_samples:
        wave = torch.nn.functional.pad(wave, (0, clip_samples - length))
    return wave.contiguous()


def sample_text(sample: Sample, *, training: bool, generator: torch.Generator | None = None) -> str:
    """The text paired with a sample: a random caption in training (the first in evaluation),
    or the tags joined with commas when there is no caption."""
    if sample.captions:
        if training and len(sample.captions) > 1:
            return sample.captions[int(torch.randint(0, len(sample.captions), (), generator=generator))]
        return sample.captions[0]
    return ", ".join(tag for tags in sample.tags.values() for tag in tags)


def _identity(x: Any) -> Any:
    return x


class _MicroBatches(torch.utils.data.Dataset):
    """Item ``i`` is the ``i``-th planned micro-batch, already collated (runs in workers)."""

    def __init__(self, loader: BatchLoader, plan: list[tuple[int, int, int, list[int]]]):
        self.loader = loader
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[int, int, Batch]:
        epoch, b, micro, indices = self.plan[i]
        return b, micro, self.loader.make_batch(indices, epoch=epoch, batch_index=b)


class BatchLoader:
    """Plans and builds the batches of one split.

    Args:
        samples: The split.
        config: The ``[loader]`` table (clip length, crop policy, workers).
        sample_rate: The audio encoder's rate; waveforms are resampled to it.
        tokenize: The text encoder's ``tokenize`` (must be picklable for workers).
        batch_size: The global batch size (over all ranks and micro-batches).
        grad_accum: Micro-batches per global batch.
        seed: The run seed.
        training: Shuffle, drop the last partial batch, random crops/captions, sample
            augmenters; otherwise split order, every item, deterministic crops, first caption.
        augmenters: ``sample``-stage augmenters (training only unless ``applies_in_eval``).
        rank, world_size: This rank's share of each micro-batch.
        steps_per_epoch, total_steps: Handed to augmenters through :class:`AugmentContext`.
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

    def plan(self, epoch: int, start: int = 0) -> list[tuple[int, int, int, list[int]]]:
        """``(epoch, batch, micro, indices)`` for this rank from global batch ``start`` on."""
        order = self.order(epoch)
        out = []
        for b in range(start, self.num_batches):
            indices = self.global_batch(epoch, b, order)
            for m in range(self.grad_accum):
                out.append((epoch, b, m, self.shard(indices, m)))
        return out

    # ------------------------------------------------------------------ building

    def make_batch(self, indices: Sequence[int], *, epoch: int = 0, batch_index: int = 0) -> Batch:
        """Load, augment, crop and collate the samples at ``indices``."""
        step = epoch * self.steps_per_epoch + batch_index
        waves, texts, ids, tags, groups = [], [], [], [], []
        for index in indices:
            sample = self.samples[index]
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
            crop_gen = torch.Generator().manual_seed(derive_seed(self.seed, "crop", epoch, index))
            text_gen = torch.Generator().manual_seed(derive_seed(self.seed, "caption", epoch, index))
            waves.append(
                prepare_waveform(sample, sample_rate=self.sample_rate, clip_samples=self.clip_samples, crop=self.crop, generator=crop_gen)
            )
            texts.append(sample_text(sample, training=self.training, generator=text_gen))
            ids.append(sample.id)
            tags.append(sample.tags)
            groups.append(sample.group)
        waveforms = torch.stack(waves) if waves else torch.zeros(0, self.clip_samples)
        return Batch(
            ids=ids,
            waveforms=waveforms,
            texts=texts,
            tags=tags,
            groups=groups,
            text_inputs=self.tokenize(texts),
        )

    # ------------------------------------------------------------------ iterating

    def micro_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """``(batch index, micro index, batch)`` for this rank, in order, from global batch
        ``start`` of ``epoch``; built by a DataLoader with ``config.num_workers`` workers."""
        plan = self.plan(epoch, start)
        if not plan:
            return iter(())
        workers = max(0, int(self.config.num_workers))
        loader = torch.utils.data.DataLoader(
            _MicroBatches(self, plan),
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=2 if workers else None,
        )
        return iter(loader)

    def global_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, list[Batch]]]:
        """``(batch index, [micro-batches])`` per global batch, from ``start`` on."""
        current: list[Batch] = []
        for b, micro, batch in self.micro_batches(epoch, start):
            current.append(batch)
            if micro == self.grad_accum - 1:
                yield b, current
                current = []
        if current:  # evaluation: the last global batch may have fewer micro-batches
            yield b, current

    def __iter__(self) -> Iterator[Batch]:
        """Every micro-batch of epoch 0 (what evaluation iterates)."""
        for _, _, batch in self.micro_batches(0):
            yield batch
