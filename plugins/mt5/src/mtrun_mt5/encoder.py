"""The mT5 encoder (``transformers.MT5EncoderModel``) as an mtrun text encoder.

mT5 has no pooler and no [CLS] token, so ``pooled`` is the mean of the final hidden states over
real (non-padding) tokens; the whole token sequence is exposed too, for projectors that attend
over it (DuET-MC's Transformer projector). Its SentencePiece vocabulary covers the 101
languages of mC4, which is what lets one recipe train on English captions and evaluate on
captions in other languages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from torch import nn

from mtrun_hf_text.base import HFTextEncoderBase, masked_mean  # masked_mean: re-exported

if TYPE_CHECKING:
    from transformers import MT5Config

__all__ = ["PRESETS", "MT5TextEncoder", "masked_mean"]

#: Sizes of google/mt5-{small,base,large} (gated-GELU feed-forward, untied head, 250,112
#: pieces) and the test-size ``tiny``. Each entry: the hub repository of its tokenizer, and
#: MT5Config values.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "small": ("google/mt5-small", dict(vocab_size=250112, d_model=512, d_ff=1024, d_kv=64, num_layers=8, num_heads=6)),
    "base": ("google/mt5-base", dict(vocab_size=250112, d_model=768, d_ff=2048, d_kv=64, num_layers=12, num_heads=12)),
    "large": ("google/mt5-large", dict(vocab_size=250112, d_model=1024, d_ff=2816, d_kv=64, num_layers=24, num_heads=16)),
    "tiny": ("", dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4)),
}

_COMMON = dict(
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    dropout_rate=0.1,
    tie_word_embeddings=False,
    is_encoder_decoder=False,
    use_cache=False,
)

# Keys of a full MT5ForConditionalGeneration checkpoint that the encoder does not use.
_DECODER_PREFIXES = ("decoder.", "lm_head.")


class MT5TextEncoder(HFTextEncoderBase):
    """mT5 encoder stack: tokens = final hidden states, pooled = their masked mean.

    Runs in float32: mT5's activations are known to overflow in float16 (bf16 autocast is fine).
    """

    @attrs.frozen
    class Config:
        preset: str = attrs.field(
            default="base",
            validator=attrs.validators.in_(tuple(PRESETS)),
            metadata={"help": f"Model size for random init: one of {', '.join(PRESETS)}. Ignored when `pretrained` is set."},
        )
        pretrained: str = attrs.field(
            default="",
            metadata={
                "help": "'' = random init from `preset`; else a hub name (e.g. google/mt5-base) or a local folder "
                "written by save_pretrained. A full MT5ForConditionalGeneration checkpoint works: its decoder is ignored."
            },
        )
        tokenizer: str = attrs.field(
            default="",
            metadata={
                "help": "Where the tokenizer comes from: '' = the `pretrained` folder/name, or for random init the "
                "preset's hub tokenizer (the built-in offline multilingual tokenizer for `tiny`)."
            },
        )
        max_length: int = attrs.field(
            default=128,
            validator=[attrs.validators.instance_of(int), attrs.validators.ge(2)],
            metadata={"help": "Tokens per caption incl. the closing </s>; longer captions are truncated (relative positions: no hard limit)."},
        )
        frozen: bool = attrs.field(
            default=False,
            metadata={"help": "No gradients for the encoder and eval mode always."},
        )

    plugin = "mt5"

    def __init__(self, config: Config):
        super().__init__(config)
        self.tokenizer = self.load_tokenizer(hub_name=PRESETS[config.preset][0], tiny="mt5")
        self.model = self._load_model(config)
        self.output_dim = int(self.model.config.d_model)
        self.finish_init(config.max_length)

    # ------------------------------------------------------------------ building

    def _load_model(self, config: Config) -> nn.Module:
        from transformers import MT5EncoderModel

        if not config.pretrained:
            return MT5EncoderModel(self.preset_config(config.preset, self.tokenizer))
        return self.load_pretrained(
            MT5EncoderModel, whole="a complete mT5 encoder", unused=lambda key: key.startswith(_DECODER_PREFIXES)
        )

    @staticmethod
    def preset_config(preset: str, tokenizer: Any) -> MT5Config:
        """The ``MT5Config`` of a preset, with special-token ids taken from ``tokenizer``."""
        from transformers import MT5Config

        values = {**_COMMON, **PRESETS[preset][1]}
        values.setdefault("vocab_size", len(tokenizer))
        return MT5Config(**values, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
