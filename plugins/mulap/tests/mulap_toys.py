"""Tiny components for mtrun-mulap's tests: a chunked audio encoder shaped like musicnn's
output ([mean of chunks, chunk_1..n]), a BERT-like text encoder with a [MASK] vocabulary, a
linear projector, and step-building helpers. Registered as a plugin of their own."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import attrs
import mtrun
import torch
from mtrun import AugmentContext, Batch, EncoderOutput, StepOutputs
from torch import nn

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = (PAD, UNK, CLS, SEP, MASK)


class WordTokenizer:
    """BERT's layout without WordPiece: [CLS] words [SEP], padded with [PAD]; words hashed."""

    mask_token_id = MASK
    pad_token_id = PAD
    all_special_ids = SPECIAL

    def __init__(self, vocab_size: int, max_length: int):
        self.vocab_size = vocab_size
        self.max_length = max_length

    def __len__(self) -> int:
        return self.vocab_size

    def word_id(self, word: str) -> int:
        return len(SPECIAL) + zlib.crc32(word.encode()) % (self.vocab_size - len(SPECIAL))

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [
            [CLS, *[self.word_id(w) for w in t.lower().split()][: self.max_length - 2], SEP]
            for t in texts
        ]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), PAD, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class ToyBert(nn.Module):
    """Embedding + one linear layer; pooled = the [CLS] token."""

    provides = frozenset({"masked_lm_vocabulary"})  # it has a [MASK] id (see tokenizer below)

    @attrs.frozen
    class Config:
        vocab_size: int = attrs.field(default=97, metadata={"help": "token ids"})
        width: int = attrs.field(default=16, metadata={"help": "token width"})
        max_length: int = attrs.field(default=12, metadata={"help": "tokens per caption"})

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.output_dim = config.width
        self.max_length = config.max_length
        self.vocab_size = config.vocab_size
        self.tokenizer = WordTokenizer(config.vocab_size, config.max_length)
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.mix = nn.Linear(config.width, config.width)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts)

    def forward(self, input_ids, attention_mask, *, output_hidden_states=False) -> EncoderOutput:
        tokens = torch.tanh(self.mix(self.embed(input_ids)))
        return EncoderOutput(tokens=tokens, pooled=tokens[:, 0], mask=attention_mask.bool())


class PlainText(ToyBert):
    """A text encoder without a tokenizer to read a vocabulary from (CLIP-like for MLM)."""

    def __init__(self, config: ToyBert.Config):
        super().__init__(config)
        self._tokenize = self.tokenizer
        del self.tokenizer

    def tokenize(self, texts):
        return self._tokenize(texts)


class ToyChunks(nn.Module):
    """Chunks of ``frame`` samples -> Linear features; tokens = [mean of chunks, chunks] (musicnn's layout)."""

    @attrs.frozen
    class Config:
        frame: int = attrs.field(default=400, metadata={"help": "samples per chunk"})
        width: int = attrs.field(default=12, metadata={"help": "feature width"})

    sample_rate = 8000
    token_grid = None

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.output_dim = config.width
        self.proj = nn.Linear(config.frame, config.width)

    def preprocess(self, waveforms: torch.Tensor) -> torch.Tensor:
        n = waveforms.shape[-1] // self.config.frame
        return waveforms[:, : n * self.config.frame].reshape(
            waveforms.shape[0], n, self.config.frame
        )

    def forward(self, features, *, keep_index=None, output_hidden_states=False) -> EncoderOutput:
        chunks = self.proj(features)
        tokens = torch.cat([chunks.mean(1, keepdim=True), chunks], dim=1)
        return EncoderOutput(
            tokens=tokens, pooled=tokens[:, 0], mask=torch.ones(tokens.shape[:2], dtype=torch.bool)
        )


class PooledLinear(nn.Module):
    """Linear over the pooled vector."""

    @attrs.frozen
    class Config:
        dim: int = attrs.field(default=8, metadata={"help": "embedding width"})

    def __init__(self, config: Config, *, in_features: int):
        super().__init__()
        self.output_dim = config.dim
        self.linear = nn.Linear(in_features, config.dim)

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        return self.linear(encoded.pooled)


@mtrun.hookimpl
def mtrun_register_components(registry) -> None:
    registry.audio_encoder("toy-chunks", ToyChunks)
    registry.text_encoder("toy-bert", ToyBert)
    registry.text_encoder("toy-plain-text", PlainText)
    registry.projector("toy-pooled", PooledLinear)


# ----------------------------------------------------------------------------- helpers

CAPTIONS = [
    "a calm piano melody with soft strings",
    "loud rock guitar and drums",
    "a jazz trio with brushed drums",
    "ambient synth pads",
    "a folk ballad with fiddle and acoustic guitar",
    "fast dance beat",
]


def context(seed: int = 0, training: bool = True) -> AugmentContext:
    return AugmentContext(
        step=0,
        epoch=0,
        steps_per_epoch=10,
        total_steps=100,
        training=training,
        generator=torch.Generator().manual_seed(seed),
    )


def text_batch(encoder: ToyBert, texts: Sequence[str]) -> Batch:
    return Batch(texts=list(texts), text_inputs=encoder.tokenize(list(texts)))


def step_outputs(
    batch: Batch,
    audio: EncoderOutput,
    text: EncoderOutput,
    *,
    audio_embedding=None,
    text_embedding=None,
    fused=(None, None),
) -> StepOutputs:
    """The outputs an objective receives; embeddings default to the encoders' pooled vectors."""
    return StepOutputs(
        batch=batch,
        audio=audio,
        text=text,
        audio_embedding=audio.pooled if audio_embedding is None else audio_embedding,
        text_embedding=text.pooled if text_embedding is None else text_embedding,
        fused_audio=fused[0],
        fused_text=fused[1],
    )
