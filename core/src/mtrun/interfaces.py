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
    ``features`` augmenters return a new tensor and never write into this one."""
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
    """Where training is, so augmenters can follow a schedule and draw reproducible noise."""

    step: int
    epoch: int
    steps_per_epoch: int
    total_steps: int
    training: bool
    generator: Any = None  # torch.Generator seeded from (seed, step) or, in workers, (seed, epoch, item)

    @property
    def epoch_float(self) -> float:
        """Fractional epoch, for schedules written in epochs."""
        return self.step / max(self.steps_per_epoch, 1)


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
    """

    def evaluate(self, system: Any, samples: Sequence[Sample], *, cache: Any = None) -> dict[str, float]: ...
