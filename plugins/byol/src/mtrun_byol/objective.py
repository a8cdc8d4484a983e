"""BYOL across modalities (SLAP): predict the target arms' projections, no negatives.

Per modality the *online arm* is the system's encoder and projector followed by this
objective's predictor; the *target arm* is an EMA copy (:class:`mtrun.EmaCopy`) of the online
encoder and projector. With ``q`` the online predictions, ``z̄`` the target projections and
``d(u, v) = 2 - 2 cos(u, v)``::

    loss = λ (d(q_A, z̄_T) + d(q_T, z̄_A)) + (1 - λ) (d(q_A, z̄_A) + d(q_T, z̄_T))

each term the mean over the batch. Every item's loss is its own (no negatives, no batch-wide
softmax), so accumulating micro-batches gives the gradient of the whole batch; that is how
SLAP reaches large batches on one GPU. The cross-modal terms align audio with text; the
intra-modal ones keep each arm from collapsing (with λ = 1 it collapses, as the paper reports).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
from torch import nn
from torch.nn import functional as F

import mtrun
from mtrun import EmaCopy, EncoderOutput, ObjectiveOutput, StepOutputs

__all__ = ["Byol", "byol_distance"]


def byol_distance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(prediction, target)`` per row ``[B]``: the squared distance of the unit vectors."""
    return 2.0 - 2.0 * (F.normalize(prediction, dim=-1) * F.normalize(target, dim=-1)).sum(-1)


def _as_encoded(embedding: torch.Tensor) -> EncoderOutput:
    """An embedding ``[B, D]`` as the one-token :class:`~mtrun.EncoderOutput` a projector reads."""
    mask = torch.ones(embedding.shape[0], 1, dtype=torch.bool, device=embedding.device)
    return EncoderOutput(tokens=embedding[:, None], pooled=embedding, mask=mask)


class _Predictor(nn.Module):
    """A projector component applied to an embedding: the online arm's last stage."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.projector(_as_encoded(embedding))


class Byol(nn.Module):
    """SLAP's BYOL objective: online predictors, EMA target arms, four distance terms.

    Metrics: the four terms (``audio_to_text`` = ``d(q_A, z̄_T)``, ``text_to_audio``,
    ``audio_to_audio``, ``text_to_text``), the EMA rate in use (``ema_rate``) and the spread of
    the predictions (``embedding_std/audio_prediction``, ``.../text_prediction``), which the
    trainer's collapse monitor watches.

    The target arms see exactly what the online arms saw this step (the augmented features,
    kept tokens and token ids), run in the same train/eval mode, without gradients, and are
    updated once per optimizer step in :meth:`on_step_end`. A frozen encoder is its own target
    (:class:`mtrun.EmaCopy` shares it), and its online output is reused rather than computed
    again.

    Args:
        config: The recipe settings.
        audio_encoder, text_encoder, audio_projector, text_projector: The system's online
            modules (injected; followed by the target arms, not owned here).
    """

    @attrs.frozen
    class Config:
        cross_weight: float = attrs.field(
            default=0.5,
            validator=mtrun.unit_interval,
            metadata={"help": "λ: weight of the cross-modal terms; the intra-modal ones get 1 - λ (SLAP: 0.5)"},
        )
        ema_rate: float = attrs.field(
            default=0.95,
            validator=mtrun.unit_interval,
            metadata={"help": "τ in θ̄ ← τ θ̄ + (1 - τ) θ (SLAP's best: constant 0.95); the start value τ₀ of the cosine schedule"},
        )
        ema_schedule: Literal["constant", "cosine"] = attrs.field(
            default="constant",
            validator=attrs.validators.in_(("constant", "cosine")),
            metadata={"help": "constant τ, or BYOL's cosine schedule from ema_rate to 1 over the run"},
        )
        retrieval_embedding: Literal["prediction", "projection"] = attrs.field(
            default="prediction",
            validator=attrs.validators.in_(("prediction", "projection")),
            metadata={"help": "what retrieval and `mtrun eval` embed with: the online predictions q (SLAP) or the projections z"},
        )
        audio_predictor: mtrun.ComponentSpec = mtrun.component_field(
            "projector", default="mlp",
            help="the audio arm's predictor, a projector over its projection ([objective.audio_predictor]; SLAP: mlp 512 → 4096 → 512)",
        )
        text_predictor: mtrun.ComponentSpec = mtrun.component_field(
            "projector", default="mlp",
            help="the text arm's predictor ([objective.text_predictor]; SLAP: mlp 512 → 4096 → 512)",
        )

    def __init__(
        self,
        config: Config,
        *,
        audio_encoder: nn.Module,
        text_encoder: nn.Module,
        audio_projector: nn.Module,
        text_projector: nn.Module,
    ):
        super().__init__()
        self.config = config
        self.audio_predictor = _Predictor(_build_predictor(config.audio_predictor, audio_projector, "audio"))
        self.text_predictor = _Predictor(_build_predictor(config.text_predictor, text_projector, "text"))
        self.audio_target_encoder = EmaCopy(audio_encoder)
        self.audio_target_projector = EmaCopy(audio_projector)
        self.text_target_encoder = EmaCopy(text_encoder)
        self.text_target_projector = EmaCopy(text_projector)
        # The rate of the next update, for the logs; a buffer, so a resumed run logs it right.
        self.register_buffer("rate", torch.tensor(float(config.ema_rate)))

    def targets(self) -> tuple[EmaCopy, ...]:
        """The four EMA copies, audio encoder and projector first."""
        return (self.audio_target_encoder, self.audio_target_projector, self.text_target_encoder, self.text_target_projector)

    def embedding_heads(self) -> dict[str, nn.Module]:
        """The online predictors when ``retrieval_embedding = "prediction"`` (SLAP retrieves with q)."""
        if self.config.retrieval_embedding == "projection":
            return {}
        return {"audio": self.audio_predictor, "text": self.text_predictor}

    def _target_projections(self, outputs: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        batch = outputs.batch
        audio = outputs.audio if self.audio_target_encoder.shares_online else self.audio_target_encoder(
            batch.features, keep_index=batch.get("audio_keep_index")
        )
        inputs = batch.text_inputs
        text = outputs.text if self.text_target_encoder.shares_online else self.text_target_encoder(
            inputs["input_ids"], inputs["attention_mask"]
        )
        return self.audio_target_projector(audio).detach(), self.text_target_projector(text).detach()

    def forward(self, outputs: StepOutputs) -> ObjectiveOutput:
        """The weighted sum of the four terms, in float32 or wider whatever the training precision."""
        q_audio = self.audio_predictor(outputs.audio_embedding)
        q_text = self.text_predictor(outputs.text_embedding)
        z_audio, z_text = self._target_projections(outputs)
        lam = self.config.cross_weight
        with torch.autocast(device_type=q_audio.device.type, enabled=False):
            # float32 at least (bf16 autocast outputs are cast up; float64 stays float64)
            q_audio, q_text, z_audio, z_text = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in (q_audio, q_text, z_audio, z_text))
            terms = {
                "audio_to_text": byol_distance(q_audio, z_text).mean(),
                "text_to_audio": byol_distance(q_text, z_audio).mean(),
                "audio_to_audio": byol_distance(q_audio, z_audio).mean(),
                "text_to_text": byol_distance(q_text, z_text).mean(),
            }
            loss = lam * (terms["audio_to_text"] + terms["text_to_audio"]) + (1.0 - lam) * (
                terms["audio_to_audio"] + terms["text_to_text"]
            )
        metrics: dict[str, Any] = {name: value.detach() for name, value in terms.items()}
        metrics["ema_rate"] = self.rate.detach().clone()
        if q_audio.shape[0] > 1:
            metrics["embedding_std/audio_prediction"] = mtrun.embedding_std(q_audio)
            metrics["embedding_std/text_prediction"] = mtrun.embedding_std(q_text)
        return ObjectiveOutput(loss=loss, metrics=metrics)

    def ema_rate_at(self, step: int, total_steps: int) -> float:
        """τ for the update after optimizer step ``step`` (1-based) of ``total_steps``."""
        if self.config.ema_schedule == "cosine":
            return mtrun.cosine_ema_rate(self.config.ema_rate, step, total_steps)
        return self.config.ema_rate

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Move every target arm towards its online arm, once per optimizer step."""
        rate = self.ema_rate_at(step, total_steps)
        for target in self.targets():
            target.update(rate)
        self.rate.fill_(self.ema_rate_at(step + 1, total_steps))


def _build_predictor(spec: mtrun.ComponentSpec | None, projector: nn.Module, arm: str) -> nn.Module:
    if spec is None:
        raise ValueError(f"no {arm}_predictor: give [objective.{arm}_predictor] a type (a projector, e.g. 'mlp')")
    predictor = spec.build(in_features=projector.output_dim)
    if predictor.output_dim != projector.output_dim:
        raise ValueError(
            f"{arm}_predictor outputs {predictor.output_dim} features but the {arm} projector's (and so its "
            f"target's) width is {projector.output_dim}; set [objective.{arm}_predictor].dim = {projector.output_dim}"
        )
    return predictor
