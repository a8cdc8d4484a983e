"""The assembled joint model: two encoders, two projectors, the objectives and augmenters.

A :class:`System` runs one training step's forward pass in a fixed order that every system in
the project fits into::

    batch augmenters -> waveform augmenters -> preprocess -> feature augmenters
      -> audio-token augmenters (keep_index) -> text-token augmenters
      -> encoders -> encoded augmenters -> projectors (and the fusion, if any)
      -> objectives (weighted sum)

Embeddings for retrieval and evaluation (:meth:`System.embed_audio`, :meth:`System.embed_text`)
are the projections, unless an objective supplies a head to put on top of them
(``embedding_heads``: BYOL's online predictors, as SLAP retrieves with them).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from mtrun.errors import ComponentOutputError, MtrunError
from mtrun.interfaces import (
    AudioEncoder,
    AugmentContext,
    Augmenter,
    Batch,
    EncoderOutput,
    Objective,
    Projector,
    StepOutputs,
    TextEncoder,
)
from mtrun.spec import label
from mtrun.train.collapse import embedding_std

if TYPE_CHECKING:
    from mtrun.encoder_cache import EncoderCache

__all__ = ["System", "WeightedObjective"]


class WeightedObjective(nn.Module):
    """An objective with its recipe weight and the name its metrics are logged under."""

    def __init__(self, name: str, weight: float, objective: Objective):
        super().__init__()
        self.name = name
        self.weight = float(weight)
        self.objective = objective


class System(nn.Module):
    """Everything with parameters that a trainer optimises and checkpoints.

    Args:
        audio_encoder, text_encoder, audio_projector, text_projector: The built components.
        objectives: Weighted objectives; the loss is their weighted sum.
        augmenters: Augmenters of every stage; ``sample``-stage ones are handed to the data
            loader (:attr:`sample_augmenters`), the rest run in :meth:`encode`.
        **modules: Components of further model slots declared in :mod:`mtrun.schema`, held
            (and trained and saved) under their slot name: ``system.fusion``.
        encoder_cache: An :class:`mtrun.encoder_cache.EncoderCache` to attach to both encoders:
            what is frozen in them is computed once per input item and reused (training and
            evaluation alike); nothing else changes. ``None``: every call computes.
    """

    def __init__(
        self,
        *,
        audio_encoder: AudioEncoder,
        text_encoder: TextEncoder,
        audio_projector: Projector,
        text_projector: Projector,
        objectives: Sequence[WeightedObjective] = (),
        augmenters: Sequence[Augmenter] = (),
        encoder_cache: EncoderCache | None = None,
        **modules: Any,
    ):
        super().__init__()
        self.fusion = None  # the optional [fusion] slot; set from ``modules`` when the recipe has one
        for name, module in modules.items():
            # An array slot's components are trained and saved like any other module.
            setattr(self, name, nn.ModuleList(module) if isinstance(module, (list, tuple)) else module)
        self.audio_encoder = audio_encoder
        self.text_encoder = text_encoder
        self.audio_projector = audio_projector
        self.text_projector = text_projector
        self.objectives = nn.ModuleList(objectives)
        # Augmenters may own modules (or not); keep them out of the state dict either way.
        self._augmenters = list(augmenters)
        self._heads = _embedding_heads(self.objectives)
        self.encoder_cache = encoder_cache
        #: Modules whose outputs ``encoder_cache`` serves (``[audio_encoder].backbone``).
        self.cached_modules: list[str] = []
        if encoder_cache is not None:
            self.cached_modules = [
                *encoder_cache.attach(audio_encoder, "[audio_encoder]"),
                *encoder_cache.attach(text_encoder, "[text_encoder]"),
            ]

    @property
    def augmenters(self) -> list[Augmenter]:
        return list(self._augmenters)

    @property
    def sample_augmenters(self) -> list[Augmenter]:
        """Augmenters that act on single samples inside DataLoader workers."""
        return [a for a in self._augmenters if a.stage == "sample"]

    # ------------------------------------------------------------------ stages

    def _active(self, context: AugmentContext) -> list[Augmenter]:
        """The augmenters that act in this context (training, or marked ``applies_in_eval``)."""
        return [a for a in self._augmenters if context.training or getattr(a, "applies_in_eval", False)]

    def _augment(self, stage: str, value: Any, context: AugmentContext | None) -> Any:
        if context is None:
            return value
        for aug in self._active(context):
            if aug.stage == stage:
                before = value
                value = aug(value, context)
                if torch.is_tensor(before) and not (torch.is_tensor(value) and value.shape == before.shape):
                    # waveform and features stages: a new shape would fail later, in the encoder,
                    # naming the encoder (or, for a waveform crop, not fail at all)
                    raise ComponentOutputError(
                        f"{label(aug, 'augmenter')} ({stage} stage) returned {_shape(value)}; it must keep the "
                        f"shape of what it received, {_shape(before)}"
                    )
        return value

    @property
    def served_items(self) -> Any:
        """For the training loader: a :class:`mtrun.encoder_cache.ServedItems` listing the clips
        whose frozen audio-encoder outputs the encoder cache holds, so the loader sends zeros
        instead of decoding them; ``None`` when there is no cache, nothing of the audio encoder
        is cached, or an augmenter may change the audio after the loader (``waveform``,
        ``features`` and ``audio_tokens`` stages; a ``batch`` augmenter that replaces the
        waveforms is caught at its first step, see :meth:`encode`)."""
        if self.encoder_cache is None or not any(m.startswith("[audio_encoder]") for m in self.cached_modules):
            return None
        if any(a.stage in ("waveform", "features", "audio_tokens") for a in self._augmenters):
            return None
        from mtrun.encoder_cache import ServedItems

        return ServedItems(self.encoder_cache)

    def encode(self, batch: Batch, context: AugmentContext | None = None) -> StepOutputs:
        """Run augmenters, encoders and projectors on a collated batch (already on device)."""
        loaded = _state(batch.get("waveforms"))  # item keys hold while the audio is untouched
        batch = self._augment("batch", batch, context)
        if batch.get("clean_features") is None:
            batch.waveforms = self._augment("waveform", batch.waveforms, context)
            # Kept before the ``features`` augmenters so an objective can use the un-augmented
            # features as its target (mae-recon must not learn to rebuild SpecAugment's zeroed bands).
            batch.clean_features = self._preprocess(batch)
        elif context is not None and any(a.stage == "waveform" for a in self._active(context)):
            raise RuntimeError(
                "the batch arrived with its features computed by the loader, but a waveform augmenter must act "
                "before them; the loader may run preprocess only for systems without waveform augmenters"
            )
        batch.features = self._augment("features", batch.clean_features, context)
        batch.token_grid = getattr(self.audio_encoder, "token_grid", None)
        batch = self._augment("audio_tokens", batch, context)
        batch = self._augment("text_tokens", batch, context)
        n = len(batch.text_inputs["input_ids"])
        with self._items(batch, loaded):
            audio = self.audio_encoder(batch.features, keep_index=batch.get("audio_keep_index"))
        batch.audio_encoded = _encoded(audio, self.audio_encoder, "[audio_encoder]", n)
        batch.text_encoded = _encoded(self.text_encoder(batch.text_inputs["input_ids"], batch.text_inputs["attention_mask"]), self.text_encoder, "[text_encoder]", n)
        batch = self._augment("encoded", batch, context)
        audio, text = batch.audio_encoded, batch.text_encoded
        fused_audio, fused_text = self.fusion(audio, text) if self.fusion is not None else (None, None)
        return StepOutputs(
            batch=batch,
            audio=audio,
            text=text,
            audio_embedding=_projected(self.audio_projector(audio), self.audio_projector, "[audio_projector]", n),
            text_embedding=_projected(self.text_projector(text), self.text_projector, "[text_projector]", n),
            fused_audio=fused_audio,
            fused_text=fused_text,
        )

    def _preprocess(self, batch: Batch) -> torch.Tensor:
        """The audio encoder's ``preprocess``; when every clip came as zeros (the encoder cache
        serves them all), one row's features repeated: what the encoder reads is served anyway."""
        items, waveforms = batch.get("audio_items"), batch.waveforms
        if items is not None and self.encoder_cache is not None and waveforms.shape[0] > 1 and all(items["served"]):
            one = self.audio_encoder.preprocess(waveforms[:1])
            return one.expand(waveforms.shape[0], *one.shape[1:])
        return self.audio_encoder.preprocess(waveforms)

    def _items(self, batch: Batch, loaded: tuple[Any, int]) -> Any:
        """The encoder cache's item-key context for the audio encoder call when the loader
        named the clips (``audio_items``) and nothing changed them since: the same waveform
        tensor, unmodified, no ``features`` augmenter (features are the clean ones), no token
        drop. A batch with clips sent as zeros that was changed is an error."""
        items = batch.get("audio_items")
        if items is None or self.encoder_cache is None:
            return contextlib.nullcontext()
        intact = (
            _same(_state(batch.get("waveforms")), loaded)
            and batch.features is batch.clean_features and batch.get("audio_keep_index") is None
        )
        if not intact:
            if any(items["served"]):
                raise RuntimeError(
                    "the loader sent some clips as zeros (the encoder cache holds their outputs), but an augmenter "
                    "changed the audio before the encoder; such a recipe cannot skip decoding"
                )
            return contextlib.nullcontext()
        return self.encoder_cache.items(items["keys"], items["served"], batch.features)

    def forward(self, batch: Batch, context: AugmentContext | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Weighted sum of the objectives' losses, and the metrics to log (detached)."""
        return self.loss(self.encode(batch, context))

    def loss(self, outputs: StepOutputs) -> tuple[torch.Tensor, dict[str, Any]]:
        """The objectives on ``outputs`` (from :meth:`encode`, or assembled from embeddings
        computed elsewhere, as the gradient cache does): their weighted sum and the metrics."""
        total: torch.Tensor | None = None
        metrics: dict[str, Any] = {}
        for entry in self.objectives:
            result = entry.objective(outputs)
            loss = getattr(result, "loss", None)
            if not (torch.is_tensor(loss) and loss.numel() == 1):
                got = f"loss of shape {list(loss.shape)}" if torch.is_tensor(loss) else type(result).__name__
                raise ComponentOutputError(
                    f"{label(entry.objective, f'objective {entry.name!r}')} returned {got}; an objective returns "
                    "mtrun.ObjectiveOutput with a scalar loss tensor"
                )
            weighted = entry.weight * result.loss
            total = weighted if total is None else total + weighted
            metrics[f"{entry.name}/loss"] = result.loss.detach()
            for key, value in result.metrics.items():
                metrics[f"{entry.name}/{key}"] = value.detach() if torch.is_tensor(value) else value
        if outputs.audio_embedding.shape[0] > 1:  # the collapse monitor's input (mtrun.train.collapse)
            metrics["embedding_std/audio"] = embedding_std(outputs.audio_embedding)
            metrics["embedding_std/text"] = embedding_std(outputs.text_embedding)
        if total is None:
            raise RuntimeError("the system has no objectives; add an [[objective]] table to the recipe")
        return total, metrics

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Per-step callbacks of objectives and augmenters (BYOL's EMA update), after the optimizer step."""
        for entry in self.objectives:
            hook = getattr(entry.objective, "on_step_end", None)
            if hook is not None:
                hook(step, total_steps)
        for aug in self._augmenters:
            hook = getattr(aug, "on_step_end", None)
            if hook is not None:
                hook(step, total_steps)

    # ------------------------------------------------------------------ inference

    @property
    def embedding_heads(self) -> dict[str, str]:
        """Which objective's head each modality's embeddings pass through (empty: none)."""
        return {modality: owner for modality, (owner, _) in self._heads.items()}

    def project(self, modality: str, encoded: EncoderOutput) -> torch.Tensor:
        """The embedding of ``encoded`` that retrieval uses, before L2 normalisation: the
        modality's projector, then the objective's head when one offers it (``audio``/``text``)."""
        projected = (self.audio_projector if modality == "audio" else self.text_projector)(encoded)
        head = self._heads.get(modality)
        return projected if head is None else head[1](projected)

    @torch.no_grad()
    def embed_audio(self, waveforms: torch.Tensor) -> torch.Tensor:
        """L2-normalised audio embeddings ``[B, D]`` for waveforms at the encoder's rate."""
        encoded = self.audio_encoder(self.audio_encoder.preprocess(waveforms))
        return nn.functional.normalize(self.project("audio", encoded).float(), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, D]``."""
        device = next(self.parameters()).device
        inputs = {k: v.to(device) for k, v in self.text_encoder.tokenize(list(texts)).items()}
        encoded = self.text_encoder(inputs["input_ids"], inputs["attention_mask"])
        return nn.functional.normalize(self.project("text", encoded).float(), dim=-1)


def _embedding_heads(objectives: Sequence[WeightedObjective]) -> dict[str, tuple[str, Any]]:
    """Modality (``audio``, ``text``) -> (objective name, head) from the objectives'
    optional ``embedding_heads()``; two objectives offering a head for one modality is an error."""
    heads: dict[str, tuple[str, Any]] = {}
    for entry in objectives:
        offer = getattr(entry.objective, "embedding_heads", None)
        for modality, head in (offer() if offer is not None else {}).items():
            if modality not in ("audio", "text"):
                raise MtrunError(
                    f"objective {entry.name!r}: embedding_heads() names {modality!r}; the modalities are 'audio' and 'text'"
                )
            if modality in heads:
                raise MtrunError(
                    f"objectives {heads[modality][0]!r} and {entry.name!r} both put a head on the {modality} "
                    "embeddings used for retrieval; switch one off in its [[objective]] table"
                )
            heads[modality] = (entry.name, head)
    return heads


def _state(t: torch.Tensor | None) -> tuple[Any, int]:
    """The tensor ``t`` (held, so its id is not reused) and how often it was changed in place."""
    return (t, t._version if t is not None else 0)


def _same(a: tuple[Any, int], b: tuple[Any, int]) -> bool:
    return a[0] is b[0] and a[1] == b[1]


def _shape(value: Any) -> str:
    return str(list(value.shape)) if torch.is_tensor(value) else type(value).__name__


def _encoded(out: Any, encoder: Any, slot: str, n: int) -> EncoderOutput:
    """``out`` if it is the EncoderOutput the interface promises for ``n`` items (a few shape
    comparisons, no device sync); else a ComponentOutputError naming the recipe table."""
    width = getattr(encoder, "output_dim", None)
    problem = None
    if not isinstance(out, EncoderOutput):
        problem = f"returned {type(out).__name__}, not mtrun.EncoderOutput"
    elif not (torch.is_tensor(out.tokens) and out.tokens.ndim == 3 and out.tokens.shape[0] == n):
        problem = f"returned tokens of shape {_shape(out.tokens)}; expected [B={n}, N, D]"
    elif not (torch.is_tensor(out.pooled) and tuple(out.pooled.shape) == (n, width)):
        problem = f"returned pooled of shape {_shape(out.pooled)}; expected [B, output_dim] = [{n}, {width}]"
    elif not (torch.is_tensor(out.mask) and tuple(out.mask.shape) == tuple(out.tokens.shape[:2])):
        problem = f"returned mask of shape {_shape(out.mask)}; expected tokens' [B, N] = {list(out.tokens.shape[:2])}"
    if problem:
        raise ComponentOutputError(f"{label(encoder, slot)} {problem}")
    return out


def _projected(out: Any, projector: Any, slot: str, n: int) -> torch.Tensor:
    width = getattr(projector, "output_dim", None)
    if not (torch.is_tensor(out) and tuple(out.shape) == (n, width)):
        raise ComponentOutputError(f"{label(projector, slot)} returned {_shape(out)}; expected [B, output_dim] = [{n}, {width}]")
    return out
