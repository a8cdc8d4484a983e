"""The mT5 encoder (``transformers.MT5EncoderModel``) as an mtrun text encoder.

mT5 has no pooler and no [CLS] token, so ``pooled`` is the mean of the final hidden states over
real (non-padding) tokens; the whole token sequence is exposed too, for projectors that attend
over it (DuET-MC's Transformer projector). Its SentencePiece vocabulary covers the 101
languages of mC4, which is what lets one recipe train on English captions and evaluate on
captions in other languages.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import attrs
import torch
from torch import nn

from mtrun.errors import MtrunError
from mtrun.interfaces import EncoderOutput

if TYPE_CHECKING:
    from transformers import MT5Config

__all__ = ["PRESETS", "MT5TextEncoder", "MT5Tokenize", "masked_mean"]

log = logging.getLogger(__name__)

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


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens [B, N, D]`` over the positions where ``mask [B, N]`` is true."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


@contextlib.contextmanager
def _quiet_transformers_load_report() -> Iterator[None]:
    """Hold back transformers' own key table while loading: it lists every expected unused key
    (heads, decoder, dropped layers) as UNEXPECTED; the checks here report what matters."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class MT5Tokenize:
    """The picklable tokenizing callable handed to DataLoader workers (no weights inside)."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _load_error(what: str, name: str, exc: BaseException) -> MtrunError:
    return MtrunError(
        f"mt5: could not load the {what} from {name!r} ({type(exc).__name__}: {exc}). "
        f"If {name!r} is a hub name, the hub may be unreachable (or HF_HUB_OFFLINE is set) and it is "
        "not in the local cache: download it where there is a network, or pass a local folder "
        "written by save_pretrained (config.json, model.safetensors and the tokenizer files)."
    )


class MT5TextEncoder(nn.Module):
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

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.loading_info: dict[str, Any] | None = None  # transformers' report when `pretrained` is set
        self.tokenizer = self._load_tokenizer(config)
        self.model = self._load_model(config)
        self.output_dim = int(self.model.config.d_model)
        self.max_length = int(config.max_length)
        # Shadows the ``tokenize`` method: the loader pickles ``encoder.tokenize`` for its
        # workers, and this object carries the tokenizer only, not the weights.
        self.tokenize = MT5Tokenize(self.tokenizer, self.max_length)
        if config.frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    # ------------------------------------------------------------------ building

    @staticmethod
    def _load_tokenizer(config: Config) -> Any:
        from transformers import AutoTokenizer

        source = config.tokenizer or config.pretrained or PRESETS[config.preset][0]
        if not source:
            from mtrun_mt5.tiny_tokenizer import build_tiny_mt5_tokenizer

            return build_tiny_mt5_tokenizer()
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise _load_error("tokenizer", source, exc) from exc

    def _load_model(self, config: Config) -> nn.Module:
        from transformers import MT5EncoderModel

        if not config.pretrained:
            return MT5EncoderModel(self.preset_config(config.preset, self.tokenizer))
        try:
            with _quiet_transformers_load_report():
                model, info = MT5EncoderModel.from_pretrained(config.pretrained, dtype=torch.float32, output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise _load_error("model", config.pretrained, exc) from exc
        bad = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "mismatched_keys")}
        if any(bad.values()):
            raise MtrunError(
                f"mt5: {config.pretrained!r} does not hold a complete mT5 encoder: "
                + "; ".join(f"{k}: {v[:8]}" for k, v in bad.items() if v)
            )
        unexpected = [k for k in info.get("unexpected_keys") or () if not k.startswith(_DECODER_PREFIXES)]
        if unexpected:
            log.warning("mt5: %s has keys the encoder does not use: %s", config.pretrained, unexpected[:8])
        self.loading_info = info
        return model

    @staticmethod
    def preset_config(preset: str, tokenizer: Any) -> MT5Config:
        """The ``MT5Config`` of a preset, with special-token ids taken from ``tokenizer``."""
        from transformers import MT5Config

        values = {**_COMMON, **PRESETS[preset][1]}
        values.setdefault("vocab_size", len(tokenizer))
        return MT5Config(**values, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)

    # ------------------------------------------------------------------ running

    def train(self, mode: bool = True) -> MT5TextEncoder:
        """Switch modes, except that a frozen encoder stays in eval (no dropout)."""
        super().train(mode)
        if self.config.frozen:
            self.model.eval()
        return self

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:  # shadowed per instance, see __init__
        """Tokenize, pad to the longest caption and truncate to ``max_length``."""
        return MT5Tokenize(self.tokenizer, self.max_length)(texts)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.frozen):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
            tokens = out.last_hidden_state
            mask = attention_mask.bool()
            pooled = masked_mean(tokens, mask)
        return EncoderOutput(
            tokens=tokens,
            pooled=pooled,
            mask=mask,
            hidden_states=tuple(out.hidden_states) if output_hidden_states else None,
        )
