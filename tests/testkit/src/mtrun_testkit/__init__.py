"""Tiny components for mtrun's tests: fast on a CPU, deterministic, and small enough to read."""

from __future__ import annotations

import math
import zlib
from typing import ClassVar, Sequence

import attrs
import torch
from torch import nn

from mtrun.distributed import all_gather_with_grad
from mtrun.hookspecs import hookimpl
from mtrun.interfaces import AugmentContext, EncoderOutput, ObjectiveOutput, Sample, StepOutputs

SAMPLE_RATE = 8000


class ToyTones:
    """Sine tones in ``n_classes`` pitch classes; each caption names the class."""

    provides: ClassVar[frozenset[str]] = frozenset({"captions"})  # text-to-music retrieval needs them

    @attrs.frozen
    class Config:
        n_items: int = attrs.field(default=64, metadata={"help": "items per split"})
        n_classes: int = attrs.field(default=4, metadata={"help": "number of pitch classes"})
        seconds: float = attrs.field(default=0.5, metadata={"help": "length of each tone"})

    def __init__(self, config: Config):
        self.config = config

    def splits(self) -> Sequence[str]:
        return ("train", "val", "test")

    def load(self, split: str) -> Sequence[Sample]:
        cfg = self.config
        offset = {"train": 0, "val": 1, "test": 2}[split]
        gen = torch.Generator().manual_seed(1000 + offset)
        t = torch.arange(int(cfg.seconds * SAMPLE_RATE)) / SAMPLE_RATE
        items = []
        for i in range(cfg.n_items):
            c = i % cfg.n_classes
            freq = 220.0 * 2 ** (c * 3 / 12)
            phase = float(torch.rand((), generator=gen)) * 2 * math.pi
            wave = 0.5 * torch.sin(2 * math.pi * freq * t + phase) + 0.05 * torch.randn(t.shape, generator=gen)
            items.append(
                Sample(
                    id=f"{split}-{i}",
                    audio=wave,
                    sample_rate=SAMPLE_RATE,
                    captions=[f"a tone of class {c}", f"pitch class number {c}"],
                    tags={"pitch": [f"class-{c}"]},
                )
            )
        return items


class ToyAudio(nn.Module):
    """Frames the waveform into non-overlapping windows, one linear layer, mean pooling."""

    @attrs.frozen
    class Config:
        frame: int = attrs.field(default=200, metadata={"help": "samples per token"})
        width: int = attrs.field(default=32, metadata={"help": "token width"})
        sample_rate: int = attrs.field(default=SAMPLE_RATE, metadata={"help": "input sample rate"})

    token_grid = None

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.sample_rate = config.sample_rate
        self.output_dim = config.width
        self.proj = nn.Linear(config.frame, config.width)

    def preprocess(self, waveforms: torch.Tensor) -> torch.Tensor:
        n = waveforms.shape[-1] // self.config.frame
        return waveforms[..., : n * self.config.frame].reshape(waveforms.shape[0], n, self.config.frame)

    def forward(self, features, *, keep_index=None, output_hidden_states=False) -> EncoderOutput:
        tokens = torch.tanh(self.proj(features))
        if keep_index is not None:
            tokens = torch.gather(tokens, 1, keep_index[..., None].expand(-1, -1, tokens.shape[-1]))
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens=tokens, pooled=tokens.mean(1), mask=mask, keep_index=keep_index)


class HashTokenizer:
    """Word ids by CRC32 hashing: picklable, deterministic, no vocabulary file."""

    def __init__(self, vocab_size: int, max_length: int):
        self.vocab_size = vocab_size
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [[1 + zlib.crc32(w.encode()) % (self.vocab_size - 1) for w in t.lower().split()][: self.max_length] for t in texts]
        length = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class ToyText(nn.Module):
    """Hashed word ids, an embedding table, masked mean pooling."""

    @attrs.frozen
    class Config:
        vocab_size: int = attrs.field(default=512, metadata={"help": "hash buckets"})
        width: int = attrs.field(default=32, metadata={"help": "embedding width"})
        max_length: int = attrs.field(default=16, metadata={"help": "tokens kept per text"})

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.output_dim = config.width
        self.max_length = config.max_length
        self.tokenizer = HashTokenizer(config.vocab_size, config.max_length)
        self.embed = nn.Embedding(config.vocab_size, config.width)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts)

    def forward(self, input_ids, attention_mask, *, output_hidden_states=False) -> EncoderOutput:
        tokens = self.embed(input_ids)
        mask = attention_mask.bool()
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return EncoderOutput(tokens=tokens, pooled=pooled, mask=mask)


class ToyLinear(nn.Module):
    """One linear layer over the encoder's pooled vector."""

    @attrs.frozen
    class Config:
        dim: int = attrs.field(default=16, metadata={"help": "embedding width"})

    def __init__(self, config: Config, *, in_features: int):
        super().__init__()
        self.output_dim = config.dim
        self.linear = nn.Linear(in_features, config.dim)

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        return self.linear(encoded.pooled)


class ToyContrastive(nn.Module):
    """Symmetric InfoNCE with the negatives of every rank (gathered with gradient)."""

    @attrs.frozen
    class Config:
        temperature: float = attrs.field(default=0.1, metadata={"help": "softmax temperature"})

    def __init__(self, config: Config):
        super().__init__()
        self.config = config

    def forward(self, outputs: StepOutputs) -> ObjectiveOutput:
        a = nn.functional.normalize(outputs.audio_embedding.float(), dim=-1)
        t = nn.functional.normalize(outputs.text_embedding.float(), dim=-1)
        a, t = all_gather_with_grad(a), all_gather_with_grad(t)
        logits = a @ t.T / self.config.temperature
        target = torch.arange(len(a), device=a.device)
        loss = 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))
        accuracy = (logits.argmax(1) == target).float().mean()
        return ObjectiveOutput(loss=loss, metrics={"accuracy": accuracy})


class ToyGain:
    """Multiplies each waveform by a random gain in [low, high]."""

    @attrs.frozen
    class Config:
        low: float = attrs.field(default=0.5, metadata={"help": "smallest gain"})
        high: float = attrs.field(default=1.5, metadata={"help": "largest gain"})

    stage: ClassVar[str] = "waveform"

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, waveforms: torch.Tensor, context: AugmentContext) -> torch.Tensor:
        u = torch.rand(waveforms.shape[0], 1, generator=context.generator).to(waveforms.device)
        return waveforms * (self.config.low + (self.config.high - self.config.low) * u)


@hookimpl
def mtrun_register_components(registry) -> None:
    registry.data("toy-tones", ToyTones)
    registry.audio_encoder("toy-audio", ToyAudio)
    registry.text_encoder("toy-text", ToyText)
    registry.projector("toy-linear", ToyLinear)
    registry.objective("toy-contrastive", ToyContrastive)
    registry.augmenter("toy-gain", ToyGain)
