"""The contracts between components.

Every component is a class with a nested attrs ``Config`` and a constructor
``Component(config, *, dependency: Interface, ...)``; the recipe loader builds the config and
injects the dependencies by keyword. Plugins satisfy these protocols structurally and never
need to import or inherit from this module (they may, for type checking). Components that hold
parameters are ``torch.nn.Module`` subclasses.

The protocols are deliberately small but cover the four reproduced systems:

* FLAP drops audio tokens inside the encoder: ``AudioEncoder.forward(keep_index=...)`` and the
  ``token_grid`` declaration that masking augmenters read.
* DuET-MC aggregates all MERT layers: ``output_hidden_states=True`` fills
  ``EncoderOutput.hidden_states``.
* SLAP's BYOL objective owns predictor and EMA target modules (objectives are modules) and
  updates targets after each optimizer step (``Objective.on_step_end``).
* MuLaP's co-attention is a ``Fusion`` of the two encoders' token sequences; its MLM, MAM and
  ATM objectives read the fused streams (``StepOutputs.fused_audio``/``fused_text``) and what
  ``text_tokens``, ``encoded`` and ``batch`` augmenters leave in the ``Batch`` (masked tokens,
  masked chunk features, swapped captions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Sequence, runtime_checkable

import attrs

if TYPE_CHECKING:
    import torch

__all__ = [
    "AUGMENT_STAGES",
    "AudioEncoder",
    "AugmentContext",
    "Augmenter",
    "Batch",
    "DataSource",
    "EncoderOutput",
    "EvalTask",
    "FrameFeatures",
    "Fusion",
    "HardNegatives",
    "Objective",
    "ObjectiveOutput",
    "Optimizer",
    "Projector",
    "Sample",
    "Schedule",
    "StepOutputs",
    "TextEncoder",
    "Trainer",
]


# --------------------------------------------------------------------------------------- data


@attrs.define
class Sample:
    """One music-text item as a data source yields it.

    Attributes:
        id: Stable identifier, unique within the source.
        audio: A float waveform tensor shaped ``[channels, time]`` or ``[time]``, or a path to
            an audio file that the loader decodes.
        sample_rate: Rate of ``audio`` when it is a tensor; ``None`` for paths.
        captions: Zero or more captions (Clotho and AudioCaps have five per clip).
        tags: Labels by category, e.g. ``{"genre": ["reel"], "instrument": ["fiddle"]}``.
        group: Items sharing a group (a track cut into clips) are not negatives of each other.
        extra: Anything else a source wants to carry (licence, region, bpm, ...).
    """

    id: str
    audio: Any
    sample_rate: int | None = None
    captions: list[str] = attrs.field(factory=list)
    tags: dict[str, list[str]] = attrs.field(factory=dict)
    group: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@runtime_checkable
class DataSource(Protocol):
    """A collection of samples organised in named splits (``train``, ``val``, ``test``).

    ``load`` returns a sequence (``len`` and integer indexing), which makes the position in an
    epoch a plain integer: resuming a run continues at exactly the next batch.
    """

    def splits(self) -> Sequence[str]: ...

    def load(self, split: str) -> Sequence[Sample]: ...


@attrs.define
class HardNegatives:
    """Hard-negative captions a ``batch`` augmenter adds for a contrastive objective.

    Written to ``batch.hard_negatives`` (TextSwap); read by an objective that provides the
    ``hard_negatives`` capability (InfoNCE). Indices are local to the batch the augmenter sees
    (this rank's micro-batch); under DDP the objective converts them.

    Attributes:
        anchor: ``LongTensor [H]``: for each hard negative, the index ``0 <= anchor < B`` of
            the audio item it is a negative for (its owner row).
        replaces: ``LongTensor [H]``: the index ``j != anchor`` of the in-batch caption it
            replaces in the anchor's audio->text row, or ``-1`` to add it as an extra negative.
        texts: The ``H`` captions; the objective tokenizes them with the text encoder.
        text_inputs: Their tokenizer output (``input_ids``, ``attention_mask`` ``[H, L]``), when
            the augmenter tokenized them already; used instead of ``texts``.
    """

    anchor: torch.Tensor
    replaces: torch.Tensor
    texts: list[str] = attrs.field(factory=list)
    text_inputs: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.anchor.shape[0])


class Batch(dict):
    """A training or evaluation batch: a dict with attribute access.

    The fields below are the documented ones; a plugin may add its own keys (say which in its
    docstring) and reads them with ``batch.get(key)``.
    """

    # Filled by the core collate function:
    ids: list[str]
    """Sample ids."""
    waveforms: torch.Tensor
    """Float ``[B, T]`` mono waveforms at the audio encoder's rate."""
    texts: list[str]
    """One chosen text per item."""
    tags: list[dict[str, list[str]]]
    """Each item's tags by category."""
    groups: list[str | None]
    """Each item's group (items of one group are not negatives of each other)."""
    text_inputs: dict[str, torch.Tensor]
    """The text encoder's tokenizer output for ``texts``."""
    # Filled by the system on the way to the encoders:
    features: torch.Tensor
    """The audio encoder's ``preprocess`` output, after ``features`` augmenters."""
    clean_features: torch.Tensor
    """The same ``preprocess`` output before any ``features`` augmenter (SpecAugment), for an
    objective whose target must not carry the augmentation (mae-recon reconstructs these).
    ``features`` augmenters return a new tensor and never write into this one. The loader's
    workers fill it already when the encoder declares ``preprocess_in_loader``."""
    token_grid: tuple[int, int] | None
    """The audio encoder's token grid (``audio_tokens`` augmenters read it)."""
    # Filled by augmenters:
    audio_keep_index: torch.Tensor
    """``LongTensor [B, N']``: grid tokens to keep, ascending (``audio_tokens`` augmenters;
    the encoder must provide the ``keep_index`` capability)."""
    hard_negatives: HardNegatives
    """Hard-negative captions (``batch`` augmenters such as TextSwap)."""
    # Filled by the system after the encoders, for ``encoded`` augmenters:
    audio_encoded: EncoderOutput
    """The audio encoder's output; ``encoded`` augmenters may replace it (masked chunk
    features), and the projector and fusion then read the replacement."""
    text_encoded: EncoderOutput
    """The text encoder's output, likewise."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


# -------------------------------------------------------------------------------- encoders


@attrs.define
class EncoderOutput:
    """What an encoder returns.

    Attributes:
        tokens: Token sequence ``[B, N, D]``.
        pooled: One vector per item ``[B, D]`` (the encoder's own pooling).
        mask: ``[B, N]`` bool, True where ``tokens`` holds a real (non-padding) token.
        hidden_states: Per-layer sequences ``([B, N, D], ...)`` when asked for with
            ``output_hidden_states`` (encoders that provide the ``hidden_states`` capability).
        keep_index: ``[B, N']`` indices of the kept tokens in the full grid when tokens were
            dropped (FLAP masking; encoders that provide ``keep_index``), so a reconstruction
            decoder can restore their order.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    keep_index: torch.Tensor | None = None


@runtime_checkable
class AudioEncoder(Protocol):
    """Audio model: waveform -> features -> tokens.

    Attributes:
        sample_rate: The rate waveforms must have; the data pipeline resamples to it.
        output_dim: Width ``D`` of ``tokens`` and ``pooled``.
        token_grid: ``(time, freq)`` shape of the token grid for encoders that accept
            ``keep_index`` (patch-based ViTs); ``None`` for encoders that cannot drop tokens.

    Optional: a class attribute ``preprocess_in_loader = True`` says ``preprocess`` is a fixed
    function of the waveform (no learned parameters, no randomness), so the trainer may run it
    in the data loader's workers, beside the training step, when it trains on the CPU and no
    ``waveform`` augmenter has to act first; the batch then arrives with ``clean_features``
    filled. (On a GPU the step runs it, on the GPU.)

    Optional: an attribute ``frame_features`` (a :class:`FrameFeatures`) says ``preprocess`` is
    computed frame by frame on a fixed hop, so ``[loader] cache = "features"`` may compute each
    file's features once and crop them in frame space.
    """

    sample_rate: int
    output_dim: int
    token_grid: tuple[int, int] | None

    def preprocess(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Turn mono waveforms ``[B, T]`` into model input (fbank, mel, or raw samples).

        Runs on the training device, vectorised over the batch.
        """
        ...

    def forward(
        self,
        features: torch.Tensor,
        *,
        keep_index: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        """Encode; ``keep_index`` ``[B, N']`` keeps only those grid tokens (after positions)."""
        ...


@runtime_checkable
class FrameFeatures(Protocol):
    """An audio encoder's ``preprocess`` as frames on a fixed hop: computed once per file, cropped.

    An encoder offers it as its ``frame_features`` attribute (a small picklable object without
    learned parameters: it runs in the loader's processes). The promise, for any mono waveform
    ``w`` at the encoder's rate, a clip length ``L`` and a frame offset ``k`` whose frames lie
    in ``w`` (``k + num_frames(L) <= frames(w).shape[0]``)::

        preprocess(w[None, k * hop : k * hop + L]) == assemble(frames(w)[None, k : k + num_frames(L)])

    within float rounding: frame ``i`` depends only on the samples from ``i * hop`` on (a
    window of fixed length), never on the clip's other samples. With ``k = 0`` and ``w`` the
    clip itself it also covers clips padded to ``L``.

    Attributes:
        hop: Samples between the starts of consecutive frames.
        settings: JSON-able description of everything that decides the frames' values (window,
            bins, normalisation, an implementation version); part of the feature cache's key, so
            changing any of it recomputes the cache.
    """

    hop: int
    settings: dict[str, Any]

    def frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """The frames ``[n, ...]`` (float32) of one whole mono waveform ``[T]``."""
        ...

    def num_frames(self, num_samples: int) -> int:
        """Frames of a clip of ``num_samples`` samples that ``preprocess`` uses."""
        ...

    def assemble(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, num_frames(L), ...]`` frames of clips of ``L`` samples -> ``preprocess``'s output."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    """Text model with its tokenizer.

    ``tokenize`` must be picklable: it runs inside DataLoader workers.
    """

    output_dim: int
    max_length: int

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Return at least ``input_ids`` and ``attention_mask``, padded to a common length."""
        ...

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        output_hidden_states: bool = False,
    ) -> EncoderOutput: ...


@runtime_checkable
class Projector(Protocol):
    """Maps an encoder's output to the joint embedding space.

    Constructed with ``in_features`` (the encoder's ``output_dim``) injected by the assembler.
    """

    output_dim: int

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        """Return ``[B, output_dim]`` (un-normalised; objectives normalise as they need)."""
        ...


@runtime_checkable
class Fusion(Protocol):
    """Joint layers over both encoders' token sequences (MuLaP's ViLBERT-style co-attention).

    Optional (the ``[fusion]`` table). It is a branch beside the two towers, not in front of
    them: the projectors still embed each modality on its own, which is what retrieval and
    the evaluation tasks use, and the fused streams go to the objectives
    (``StepOutputs.fused_audio``, ``fused_text``). Constructed with ``audio_features`` and
    ``text_features`` (the encoders' widths) injected.

    Attributes:
        output_dim: Width of both fused streams' ``pooled`` vectors (a common width, so an
            objective can compare them).
        audio_width: Width of the fused audio stream's ``tokens`` (for heads on them: MAM).
        text_width: Width of the fused text stream's ``tokens`` (MLM).
    """

    output_dim: int
    audio_width: int
    text_width: int

    def forward(self, audio: EncoderOutput, text: EncoderOutput) -> tuple[EncoderOutput, EncoderOutput]:
        """Return the fused ``(audio, text)`` streams: tokens, pooled ``[B, output_dim]`` and
        masks as :class:`EncoderOutput`; padding (``mask`` False) is never attended to."""
        ...


# ------------------------------------------------------------------------------ objectives


@attrs.define
class StepOutputs:
    """Everything the model computed for one batch, handed to every objective."""

    batch: Batch
    audio: EncoderOutput
    text: EncoderOutput
    audio_embedding: torch.Tensor
    text_embedding: torch.Tensor
    extra: dict[str, Any] = attrs.field(factory=dict)
    fused_audio: EncoderOutput | None = None
    """The fusion's audio stream (``None`` without a ``[fusion]``)."""
    fused_text: EncoderOutput | None = None
    """The fusion's text stream."""


@attrs.define
class ObjectiveOutput:
    """A scalar loss to minimise and metrics to log (floats or 0-d tensors)."""

    loss: torch.Tensor
    metrics: dict[str, Any] = attrs.field(factory=dict)


@runtime_checkable
class Objective(Protocol):
    """A training loss. Objectives are modules and may own parameters (MAE decoder, BYOL
    predictors, co-attention heads); the trainer optimises them with the model.

    Optional, used when defined:
        ``on_step_end(step: int, total_steps: int)``: called after every optimizer step (never
        per micro-batch, never after a skipped step); ``step`` counts the steps done. Where
        EMA copies follow the weights (:class:`mtrun.EmaCopy`).
        ``embedding_heads() -> dict[str, Callable]``: heads (modules) for ``"audio"`` and/or
        ``"text"`` that retrieval and evaluation put on top of the projections, as SLAP
        retrieves with BYOL's online predictors. At most one objective may offer a head per
        modality.
        ``embedding_only: bool`` (a class attribute): True when the loss depends on the step
        only through ``outputs.audio_embedding``, ``outputs.text_embedding`` and the batch's
        per-item lists (``groups``, ``ids``, ``texts``, ``tags``): no token sequences, fused
        streams, input tensors or passes of its own through the encoders. Only such objectives
        may train with ``[trainer] gradient_cache = true``, which hands them the whole step's
        embeddings as leaf tensors, a batch holding just those lists, and ``None`` for
        ``audio``, ``text`` and the fused streams (:mod:`mtrun.train.gradient_cache`). Absent
        means False.

    Objectives may ask for earlier model slots in their constructor (``audio_encoder``,
    ``text_projector``, ...). Hold them by reference without registering them (a tuple
    attribute), or their weights are saved twice; modules an objective creates itself
    (predictors, decoders, :class:`mtrun.EmaCopy` targets) are registered as usual and are
    trained (if they require gradients), saved in checkpoints and restored on resume.
    """

    def forward(self, outputs: StepOutputs) -> ObjectiveOutput: ...


# ------------------------------------------------------------------------------ augmenters

AUGMENT_STAGES = ("sample", "waveform", "features", "audio_tokens", "text_tokens", "batch", "encoded")
"""Where an augmenter acts, in pipeline order.

* ``sample``: a :class:`Sample` in a DataLoader worker (view dropout, tag-to-caption).
* ``waveform``: the ``[B, T]`` waveform tensor on the device.
* ``features``: the preprocessed audio input (SpecAugment, masked audio modelling); returns a
  new tensor (never writes in place: ``batch.clean_features`` keeps the input it received).
* ``audio_tokens``: receives the batch and returns it with ``audio_keep_index`` set
  (FLAP 1-D/2-D masking); reads the encoder's ``token_grid`` from ``batch.token_grid``.
* ``text_tokens``: receives the batch after tokenisation (MLM masking).
* ``batch``: the whole collated batch (TextSwap hard negatives, MuLaP's caption swap); runs
  first on the device, before the waveform stage.
* ``encoded``: the batch after the encoders, with ``batch.audio_encoded`` and
  ``batch.text_encoded`` set; may replace them (MuLaP's masked audio modelling zeroes chunk
  features) before the projectors and the fusion read them.
"""


@attrs.frozen
class AugmentContext:
    """Where training is, so augmenters can follow a schedule and draw reproducible noise.

    **Randomness.** Draw per-item noise with :meth:`item_generators` or :meth:`item_rand`, and a
    decision shared by the whole micro-batch (one kept-token count for a dense tensor) with
    :meth:`batch_generator`. The trainer derives them from where the draw happens, never from
    the rank: item ``i``'s noise comes from ``item_seeds[i]``, a hash of (run seed, step, the
    item's id), and the micro-batch's from ``batch_seed``, a hash of (run seed, step,
    micro-batch). An item therefore gets the same masks whether it sits on rank 1 of 2 under
    torchrun, in a single process at the same global batch, or in a re-run of the step (resume,
    a gradient cache's second pass); that is what makes DDP training equal the single-process
    run (docs/performance.md, "Distributed training with torchrun").

    ``generator`` is seeded per (step, micro-batch, rank) in training and per (epoch, item) in
    DataLoader workers (the ``sample`` stage, which sees one item and needs nothing else).
    Drawing a batch's per-item noise from it in the other stages is reproducible but not
    rank-invariant: under DDP each rank's share would get different noise than the single
    process gives the same items.

    Attributes:
        step: 0-based index of the optimizer step being computed.
        epoch: Epoch of that step.
        steps_per_epoch, total_steps: For schedules.
        training: False in evaluation (augmenters with ``applies_in_eval``).
        generator: A ``torch.Generator``; see above.
        item_seeds: One 63-bit seed per item of the batch, in batch order, or ``None`` (a bare
            call, the ``sample`` stage): the helpers then derive per-item seeds from
            ``generator``.
        batch_seed: The micro-batch's seed, the same on every rank; ``None`` as above.
    """

    step: int
    epoch: int
    steps_per_epoch: int
    total_steps: int
    training: bool
    generator: Any = None
    item_seeds: Sequence[int] | None = None
    batch_seed: int | None = None

    @property
    def epoch_float(self) -> float:
        """Fractional epoch, for schedules written in epochs."""
        return self.step / max(self.steps_per_epoch, 1)

    def item_generators(self, name: str, n: int) -> list[torch.Generator]:
        """One CPU ``torch.Generator`` per item, seeded by (item seed, ``name``).

        Args:
            name: Sets this augmenter's stream apart from other augmenters' (its registered
                name, say), so SpecAugment and token masking do not draw the same numbers.
            n: Items in the batch; must equal ``len(item_seeds)`` when the trainer gave them.

        Raises:
            ValueError: ``n`` differs from the number of item seeds (an earlier stage changed
                the batch size).
        """
        import torch

        return [torch.Generator().manual_seed(seed) for seed in self._seeds(name, n)]

    def item_rand(self, name: str, n: int, *shape: int) -> torch.Tensor:
        """``[n, *shape]`` float32 uniforms in ``[0, 1)`` on the CPU, one row per item.

        Counter-based: the number at flat position ``j`` of row ``i`` is a hash (SplitMix64) of
        item ``i``'s seed, ``name`` and ``j`` alone, so a row does not depend on the other
        items of the batch, on which rank holds the item, nor on ``shape`` beyond ``j`` (a
        longer row starts with the numbers of a shorter one). Vectorised: a batch of 1024
        costs well under a millisecond, where a generator per item costs ~20 µs each.

        Raises:
            ValueError: As :meth:`item_generators`.
        """
        import numpy as np
        import torch

        count = 1
        for size in shape:
            count *= int(size)
        seeds = np.array(self._raw_seeds(n), dtype=np.uint64)
        with np.errstate(over="ignore"):
            base = _splitmix64(seeds ^ np.uint64(_mix(name)))
            counter = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
            bits = _splitmix64(base[:, None] + counter[None, :])
        # The top 24 bits: every float32 value k / 2**24 exactly, never 1.0.
        uniform = (bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
        return torch.from_numpy(uniform).reshape(n, *shape)

    def batch_generator(self, name: str) -> torch.Generator:
        """A CPU ``torch.Generator`` for draws shared by every item of the micro-batch, the
        same on every rank (seeded by ``batch_seed`` and ``name``)."""
        import torch

        if self.batch_seed is None:
            base = self._fallback_base()
            return torch.Generator().manual_seed(_mix(base, "batch", name))
        return torch.Generator().manual_seed(_mix(self.batch_seed, name))

    def _seeds(self, name: str, n: int) -> list[int]:
        return [_mix(seed, name) for seed in self._raw_seeds(n)]

    def _raw_seeds(self, n: int) -> list[int]:
        """``item_seeds``, or without them seeds derived from ``generator`` (a bare call)."""
        if self.item_seeds is None:
            base = self._fallback_base()
            return [_mix(base, "item", i) for i in range(n)]
        if len(self.item_seeds) != n:
            raise ValueError(
                f"an augmenter draws for {n} items but the context holds {len(self.item_seeds)} "
                "item seeds (an earlier stage changed the batch size?)"
            )
        return [int(seed) for seed in self.item_seeds]

    def _fallback_base(self) -> int:
        """Without the trainer's seeds: one number from ``generator`` (or the step), so a bare
        call is still reproducible."""
        if self.generator is None:
            return _mix(self.step, "bare")
        import torch

        # A clone: asking for per-item seeds does not advance the caller's generator.
        generator = torch.Generator().set_state(self.generator.get_state())
        return int(torch.randint(0, 2**62, (), generator=generator))


_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(z: Any) -> Any:
    """SplitMix64's output function on a NumPy ``uint64`` array (arithmetic modulo 2**64)."""
    import numpy as np

    z = z + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix(*parts: Any) -> int:
    """A 63-bit seed from ints and strings (blake2b of their ``repr``, as
    :func:`mtrun.train.rng.derive_seed`), stable across processes."""
    import hashlib

    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@runtime_checkable
class Augmenter(Protocol):
    """Changes the input of one stage. ``stage`` is one of :data:`AUGMENT_STAGES`.

    Augmenters run in training only unless ``applies_in_eval`` is True.
    """

    stage: ClassVar[Literal["sample", "waveform", "features", "audio_tokens", "text_tokens", "batch", "encoded"]]

    def __call__(self, value: Any, context: AugmentContext) -> Any: ...


# ------------------------------------------------------------------------- trainer and eval


@runtime_checkable
class Trainer(Protocol):
    """Runs training. Constructed with the assembled ``system``, the ``data`` source and the
    ``run`` (folder, seed, resolved recipe) injected; ``fit`` returns the final metrics."""

    def fit(self) -> dict[str, float]: ...


@runtime_checkable
class Optimizer(Protocol):
    """A torch optimizer built over the system's parameters (``[trainer.optimizer]``).

    Constructed as ``cls(config, *, model)``; a subclass of a ``torch.optim`` optimizer is the
    usual way to write one.
    """

    param_groups: list[dict[str, Any]]

    def step(self) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Schedule(Protocol):
    """The learning rate over training, as a multiplier of the peak (``[trainer.schedule]``).

    Constructed as ``cls(config, *, total_steps, steps_per_epoch)``.
    """

    def factor(self, step: int) -> float:
        """Multiplier of the peak learning rate for the 0-based optimizer step ``step``."""
        ...


@runtime_checkable
class EvalTask(Protocol):
    """An evaluation (retrieval, zero-shot, probe, modality gap) over one split.

    ``evaluate`` receives the system (with ``embed_audio``/``embed_text``) and the samples;
    returns flat metric names to numbers, each prefixed with the task's own name
    (``retrieval/t2a/R@10``). ``cache`` is an :class:`mtrun.eval.embed.EvalCache` shared by
    the tasks of one evaluation round so that they embed the samples once; a task must accept
    the keyword and may ignore it.

    Optionally ``check_samples(samples) -> None`` raises :class:`mtrun.errors.MtrunError` for
    settings that cannot work on the samples it will evaluate (a tag category none of them
    has). The runner calls it on the test split and the evaluation sets before training, and
    ``mtrun eval`` before embedding (:func:`mtrun.eval.run.check_tasks`).
    """

    def evaluate(self, system: Any, samples: Sequence[Sample], *, cache: Any = None) -> dict[str, float]: ...
