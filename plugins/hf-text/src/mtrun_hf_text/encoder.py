"""A general transformers text encoder: RoBERTa, BERT and T5 encoders by hub name or folder.

One component serves FLAP (RoBERTa-base, 77 tokens), SLAP (RoBERTa-base pooler output, 128
tokens) and MuLaP (BERT-base, first 6 layers of bert-base-uncased, 64 tokens); the recipe picks
the checkpoint, the pooling, the length and the depth.

Pooling:

* ``cls``: the final hidden state of the first token (BERT ``[CLS]``, RoBERTa ``<s>``).
* ``mean``: mean of the final hidden states over real tokens (the default; the only choice for
  T5, which has neither a [CLS] token nor a pooler).
* ``pooler``: the model's pooler, ``tanh(W h_cls + b)`` (LAION-CLAP's and hence SLAP's text
  vector). BERT's pooler was trained (next-sentence prediction). RoBERTa was not, and
  roberta-base's checkpoint is widely reported to lack ``pooler.*`` weights, so transformers
  initialises them randomly; this encoder allows exactly that gap (with a warning) when the
  pooler is trained, and refuses it when ``frozen`` would leave a random pooler in place.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from mtrun import MtrunError

from mtrun_hf_text.base import HFTextEncoderBase, HFTokenize  # HFTokenize: re-exported
from mtrun_hf_text.loading import load_error

__all__ = ["POOLINGS", "PRESETS", "HFTextEncoder", "HFTokenize"]

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "pooler")

#: Random-init sizes: (family, hub repository of the tokenizer, config values). The hub sizes
#: are those of FacebookAI/roberta-base, google-bert/bert-base-uncased and google-t5/t5-base.
PRESETS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "roberta-base": (
        "roberta",
        "FacebookAI/roberta-base",
        dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
    ),
    "bert-base-uncased": (
        "bert",
        "google-bert/bert-base-uncased",
        dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12),
    ),
    "t5-base": (
        "t5",
        "google-t5/t5-base",
        dict(vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12, feed_forward_proj="relu"),
    ),
    "tiny-roberta": (
        "roberta",
        "",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=130,
             type_vocab_size=1, layer_norm_eps=1e-5),
    ),
    "tiny-bert": (
        "bert",
        "",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
             type_vocab_size=2, layer_norm_eps=1e-12),
    ),
    "tiny-t5": ("t5", "", dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, feed_forward_proj="relu")),
}

# Model types whose encoder-only class is not what AutoModel returns.
_T5_LIKE = ("t5", "mt5", "umt5")
# Model types whose constructor takes ``add_pooling_layer`` (we skip the pooler unless used, so
# an unused trainable pooler never leaves DDP with parameters that get no gradient).
_HAS_POOLER = ("bert", "roberta", "xlm-roberta", "camembert")

# Checkpoint keys an encoder legitimately leaves unused: MLM/NSP heads and seq2seq decoders.
_HEAD_KEYS = re.compile(r"(^|\.)(cls|lm_head|decoder|qa_outputs|classifier)\.")
_POOLER_KEYS = re.compile(r"(^|\.)pooler\.")
_LAYER_KEYS = re.compile(r"(^|\.)encoder\.(layer|block)\.(\d+)\.")


def family_of(config: Any) -> str | None:
    """The model family a config will build, known without loading anything: the preset's for
    random init, a local folder's ``config.json`` ``model_type``, else guessed from a hub name
    (``None`` when the name does not tell)."""
    if not config.pretrained:
        return PRESETS[config.preset][0]
    folder = Path(config.pretrained).expanduser()
    if (folder / "config.json").is_file():
        try:
            return str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") or "") or None
        except (OSError, ValueError):
            return None
    name = config.pretrained.lower().rsplit("/", 1)[-1]
    return next((family for family in ("t5", "roberta", "bert") if family in name), None)


def _layer_count_key(config: Any) -> str:
    return "num_layers" if config.model_type in _T5_LIKE else "num_hidden_layers"


class HFTextEncoder(HFTextEncoderBase):
    """A transformers encoder with its tokenizer; ``tokens`` are the final hidden states.

    Attributes:
        tokenizer: The transformers tokenizer (``mask_token_id``, ``len(tokenizer)`` for MLM).
        model: The transformers encoder (``BertModel``, ``RobertaModel``, ``T5EncoderModel``...).
        family: ``config.model_type`` of the model (``bert``, ``roberta``, ``t5``, ...).
        loading_info: transformers' report of missing/unexpected keys when loaded.
    """

    @staticmethod
    def provides(config: Any) -> frozenset[str]:
        """``hidden_states`` always; ``masked_lm_vocabulary`` (a mask token for MuLaP's MLM)
        unless the family is T5-like, which has sentinel tokens instead. A hub name that does not
        tell its family is taken to have one; building the MLM components checks for real."""
        return frozenset({"hidden_states"}) | (frozenset() if family_of(config) in _T5_LIKE else frozenset({"masked_lm_vocabulary"}))

    @attrs.frozen
    class Config:
        pretrained: str = attrs.field(
            default="",
            metadata={
                "help": "'' = random init from `preset`; else a hub name (FacebookAI/roberta-base, "
                "google-bert/bert-base-uncased, google-t5/t5-base, ...) or a local folder written by save_pretrained."
            },
        )
        preset: str = attrs.field(
            default="roberta-base",
            validator=attrs.validators.in_(tuple(PRESETS)),
            metadata={"help": f"Model size for random init: one of {', '.join(PRESETS)}. Ignored when `pretrained` is set."},
        )
        tokenizer: str = attrs.field(
            default="",
            metadata={
                "help": "Where the tokenizer comes from: '' = the `pretrained` folder/name, or for random init the "
                "preset's hub tokenizer (a built-in offline tokenizer for the tiny-* presets)."
            },
        )
        pooling: str = attrs.field(
            default="mean",
            validator=attrs.validators.in_(POOLINGS),
            metadata={"help": "pooled vector: 'mean' over real tokens, 'cls' (first token's state) or 'pooler' (tanh dense on it; SLAP). T5: mean only."},
        )
        max_length: int = attrs.field(
            default=77,
            validator=[attrs.validators.instance_of(int), attrs.validators.ge(2)],
            metadata={"help": "Tokens per caption incl. special tokens; longer ones are truncated (FLAP 77, SLAP 128, MuLaP 64)."},
        )
        num_layers: int = attrs.field(
            default=0,
            validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)],
            metadata={"help": "Keep only the first N transformer layers (MuLaP: 6 of bert-base-uncased); 0 = all."},
        )
        frozen: bool = attrs.field(
            default=False,
            metadata={"help": "No gradients for the encoder and eval mode always."},
        )

    plugin = "hf-text"

    def __init__(self, config: Config):
        super().__init__(config)
        family, hub_name, _ = PRESETS[config.preset]
        self.tokenizer = self.load_tokenizer(hub_name=hub_name, tiny=family)
        self.model = self._load_model(config)
        model_config = self.model.config
        self.family = str(model_config.model_type)
        self.output_dim = int(model_config.d_model if self.family in _T5_LIKE else model_config.hidden_size)
        self.vocab_size = int(model_config.vocab_size)
        self.mask_token_id = self.tokenizer.mask_token_id
        capacity = self._position_capacity(model_config)
        if capacity is not None and config.max_length > capacity:
            raise MtrunError(f"hf-text: max_length={config.max_length} exceeds the model's {capacity} positions")
        self.finish_init(config.max_length)

    # ------------------------------------------------------------------ building

    @staticmethod
    def _position_capacity(model_config: Any) -> int | None:
        if model_config.model_type in _T5_LIKE:
            return None  # relative position buckets: no table to run past
        positions = getattr(model_config, "max_position_embeddings", None)
        if positions is None:
            return None
        if model_config.model_type in ("roberta", "xlm-roberta", "camembert"):
            # RoBERTa numbers positions from pad_token_id + 1 (514 rows hold 512 tokens).
            positions -= (model_config.pad_token_id or 0) + 1
        return int(positions)

    def _model_class(self, model_type: str) -> Any:
        import transformers

        if model_type in _T5_LIKE:
            return {"t5": transformers.T5EncoderModel, "mt5": transformers.MT5EncoderModel, "umt5": transformers.UMT5EncoderModel}[model_type]
        return transformers.AutoModel

    def _check_pooling(self, model_type: str) -> None:
        if model_type in _T5_LIKE and self.config.pooling != "mean":
            raise MtrunError(f"hf-text: pooling={self.config.pooling!r} needs a [CLS] token; {model_type} has none, use pooling = 'mean'")

    def preset_config(self) -> Any:
        """The transformers config of the preset, with token ids from the tokenizer."""
        from transformers import BertConfig, RobertaConfig, T5Config

        family, _, values = PRESETS[self.config.preset]
        tok = self.tokenizer
        values = {**values, "vocab_size": values.get("vocab_size", len(tok))}
        if family == "t5":
            return T5Config(**values, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            decoder_start_token_id=tok.pad_token_id, is_encoder_decoder=False, use_cache=False)
        cls = RobertaConfig if family == "roberta" else BertConfig
        ids = dict(pad_token_id=tok.pad_token_id)
        if family == "roberta":
            ids.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        return cls(**values, **ids)

    def _load_model(self, config: Config) -> nn.Module:
        from transformers import AutoConfig

        if config.pretrained:
            try:
                model_config = AutoConfig.from_pretrained(config.pretrained, trust_remote_code=False)
            except (OSError, ValueError) as exc:
                raise load_error("hf-text", "config", config.pretrained, exc) from exc
        else:
            model_config = self.preset_config()
        model_type = model_config.model_type
        self._check_pooling(model_type)
        depth_key = _layer_count_key(model_config)
        depth = getattr(model_config, depth_key)
        if config.num_layers > depth:
            raise MtrunError(f"hf-text: num_layers={config.num_layers} but the model has only {depth} layers")
        keep = config.num_layers or depth
        setattr(model_config, depth_key, keep)
        extra = {"add_pooling_layer": config.pooling == "pooler"} if model_type in _HAS_POOLER else {}
        model_class = self._model_class(model_type)

        if not config.pretrained:
            if model_type in _T5_LIKE:
                return model_class(model_config)
            return model_class.from_config(model_config, **extra)

        def expected(key: str) -> bool:  # unused checkpoint keys: heads, decoder, dropped layers, pooler
            layer = _LAYER_KEYS.search(key)
            return bool(_HEAD_KEYS.search(key) or _POOLER_KEYS.search(key) or (layer and int(layer.group(3)) >= keep))

        model = self.load_pretrained(
            model_class, whole="every weight of the encoder", unused=expected, optional=lambda k: bool(_POOLER_KEYS.search(k)),
            config=model_config, trust_remote_code=False, **extra,
        )
        self._check_pooler()
        return model

    def _check_pooler(self) -> None:
        """A checkpoint without pooler weights (RoBERTa's, see the module docstring) is fine only
        when the pooler is trained."""
        name = self.config.pretrained
        if not any(_POOLER_KEYS.search(k) for k in self.loading_info.get("missing_keys") or ()):
            return
        if self.config.frozen:
            raise MtrunError(
                f"hf-text: {name!r} has no pooler weights (RoBERTa checkpoints usually have none), so "
                "pooling='pooler' with frozen=true would use a random pooler; use pooling='cls' or 'mean', or unfreeze"
            )
        log.warning("hf-text: %s has no pooler weights; the pooler starts random and is trained", name)

    # ------------------------------------------------------------------ running

    def pool(self, out: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "pooler":
            return out.pooler_output
        if self.config.pooling == "cls":
            return out.last_hidden_state[:, 0]
        return super().pool(out, input_ids, mask)
