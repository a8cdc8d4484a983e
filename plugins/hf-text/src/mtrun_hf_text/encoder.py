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

import contextlib
import logging
import re
from typing import Any, Iterator, Sequence

import attrs
import torch
from torch import nn

from mtrun.errors import MtrunError
from mtrun.interfaces import EncoderOutput

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


class HFTokenize:
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
        f"hf-text: could not load the {what} from {name!r} ({type(exc).__name__}: {exc}). "
        f"If {name!r} is a hub name, the hub may be unreachable (or HF_HUB_OFFLINE is set) and it is "
        "not in the local cache: download it where there is a network, or pass a local folder "
        "written by save_pretrained (config.json, model.safetensors and the tokenizer files)."
    )


def _layer_count_key(config: Any) -> str:
    return "num_layers" if config.model_type in _T5_LIKE else "num_hidden_layers"


class HFTextEncoder(nn.Module):
    """A transformers encoder with its tokenizer; ``tokens`` are the final hidden states.

    Attributes:
        tokenizer: The transformers tokenizer (``mask_token_id``, ``len(tokenizer)`` for MLM).
        model: The transformers encoder (``BertModel``, ``RobertaModel``, ``T5EncoderModel``...).
        family: ``config.model_type`` of the model (``bert``, ``roberta``, ``t5``, ...).
        loading_info: transformers' report of missing/unexpected keys when loaded.
    """

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

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.loading_info: dict[str, Any] | None = None
        self.tokenizer = self._load_tokenizer(config)
        self.model = self._load_model(config)
        model_config = self.model.config
        self.family = str(model_config.model_type)
        self.output_dim = int(model_config.d_model if self.family in _T5_LIKE else model_config.hidden_size)
        self.vocab_size = int(model_config.vocab_size)
        self.mask_token_id = self.tokenizer.mask_token_id
        self.max_length = int(config.max_length)
        capacity = self._position_capacity(model_config)
        if capacity is not None and self.max_length > capacity:
            raise MtrunError(f"hf-text: max_length={self.max_length} exceeds the model's {capacity} positions")
        # Shadows the ``tokenize`` method: the loader pickles ``encoder.tokenize`` for its
        # workers, and this object carries the tokenizer only, not the weights.
        self.tokenize = HFTokenize(self.tokenizer, self.max_length)
        if config.frozen:
            self.model.requires_grad_(False)
            self.model.eval()

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

    @staticmethod
    def _load_tokenizer(config: Config) -> Any:
        from transformers import AutoTokenizer

        family, hub_name, _ = PRESETS[config.preset]
        source = config.tokenizer or config.pretrained or hub_name
        if not source:
            from mtrun_hf_text.tiny_tokenizers import build_tiny_tokenizer

            return build_tiny_tokenizer(family)
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise _load_error("tokenizer", source, exc) from exc

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
                raise _load_error("config", config.pretrained, exc) from exc
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
        try:
            with _quiet_transformers_load_report():
                model, info = model_class.from_pretrained(
                    config.pretrained, config=model_config, dtype=torch.float32, output_loading_info=True,
                    trust_remote_code=False, **extra,
                )
        except (OSError, ValueError) as exc:
            raise _load_error("model", config.pretrained, exc) from exc
        self.loading_info = info
        self._check_keys(info, keep)
        return model

    def _check_keys(self, info: dict[str, Any], keep: int) -> None:
        """Every weight the encoder uses must come from the checkpoint (the pooler excepted, see
        the module docstring); unused checkpoint keys are fine when expected (heads, decoder,
        dropped layers, an unused pooler) and reported otherwise."""
        name = self.config.pretrained
        missing = sorted(info.get("missing_keys") or ())
        mismatched = sorted(info.get("mismatched_keys") or ())
        fresh_pooler = [k for k in missing if _POOLER_KEYS.search(k)]
        missing = [k for k in missing if k not in fresh_pooler]
        if missing or mismatched:
            raise MtrunError(
                f"hf-text: {name!r} does not hold every weight of the encoder: "
                + "; ".join(f"{label}: {keys[:8]}" for label, keys in (("missing", missing), ("mismatched", mismatched)) if keys)
            )
        if fresh_pooler:
            if self.config.frozen:
                raise MtrunError(
                    f"hf-text: {name!r} has no pooler weights (RoBERTa checkpoints usually have none), so "
                    "pooling='pooler' with frozen=true would use a random pooler; use pooling='cls' or 'mean', or unfreeze"
                )
            log.warning("hf-text: %s has no pooler weights; the pooler starts random and is trained", name)

        def expected(key: str) -> bool:
            layer = _LAYER_KEYS.search(key)
            return bool(_HEAD_KEYS.search(key) or _POOLER_KEYS.search(key) or (layer and int(layer.group(3)) >= keep))

        surprising = [k for k in info.get("unexpected_keys") or () if not expected(k)]
        if surprising:
            log.warning("hf-text: %s has keys the encoder does not use: %s", name, surprising[:8])

    # ------------------------------------------------------------------ running

    def train(self, mode: bool = True) -> HFTextEncoder:
        """Switch modes, except that a frozen encoder stays in eval (no dropout)."""
        super().train(mode)
        if self.config.frozen:
            self.model.eval()
        return self

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:  # shadowed per instance, see __init__
        """Tokenize, pad to the longest caption and truncate to ``max_length``."""
        return HFTokenize(self.tokenizer, self.max_length)(texts)

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
            if self.config.pooling == "pooler":
                pooled = out.pooler_output
            elif self.config.pooling == "cls":
                pooled = tokens[:, 0]
            else:
                weights = mask.to(tokens.dtype).unsqueeze(-1)
                pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return EncoderOutput(
            tokens=tokens,
            pooled=pooled,
            mask=mask,
            hidden_states=tuple(out.hidden_states) if output_hidden_states else None,
        )
