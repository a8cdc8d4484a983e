"""The CLIP text tower (``transformers.CLIPTextModelWithProjection``) as an mtrun text encoder.

Pooling is done here, at the first end-of-text token of each row, rather than read from
``CLIPTextModel``'s pooler. The reason is a quirk of transformers (checked in 5.23): when a
config says ``eos_token_id == 2`` (the value in older hub configs such as
openai/clip-vit-base-patch32's) the pooler takes the position of the *largest id* in the row,
which is the end-of-text token only for vocabularies that put it last; otherwise it takes the
first position of ``config.eos_token_id``. Using the tokenizer's own end-of-text id gives the
same vector as the pooler on the real checkpoints and stays right for any tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from mtrun import MtrunError
from mtrun_hf_text.base import HFTextEncoderBase

if TYPE_CHECKING:
    from transformers import CLIPTextConfig

__all__ = ["PRESETS", "ClipTextEncoder"]

#: Text-tower sizes of the hub checkpoints (``text_config`` of each), plus the test-size ``tiny``.
#: Each entry: the hub repository whose tokenizer the preset uses, and CLIPTextConfig values.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit-b-32": (
        "openai/clip-vit-base-patch32",
        dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, projection_dim=512),
    ),
    "vit-b-16": (
        "openai/clip-vit-base-patch16",
        dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, projection_dim=512),
    ),
    "vit-l-14": (
        "openai/clip-vit-large-patch14",
        dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
    ),
    "tiny": ("", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)),
}

# Shared by every preset (CLIP's text tower): 77 positions, quick-GELU, LayerNorm eps 1e-5.
_COMMON = dict(max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)

# Keys of a full CLIPModel checkpoint that the text tower does not use.
_OTHER_TOWER_PREFIXES = ("vision_model.", "visual_projection.", "logit_scale")


class ClipTextEncoder(HFTextEncoderBase):
    """CLIP text transformer: causal, 77 positions, pooled at the end-of-text token.

    ``tokens`` is the final-layer-normed last hidden state ``[B, L, width]``; ``pooled`` is the
    end-of-text vector passed through ``text_projection`` (= transformers' ``text_embeds``, the
    vector CLIP compares with images) when ``use_projection`` is true, else the un-projected
    pooler output. With ``use_projection`` the projection width must equal the tower width
    (true of every OpenAI and LAION ViT checkpoint), since tokens and pooled share ``output_dim``.
    """

    @attrs.frozen
    class Config:
        preset: str = attrs.field(
            default="vit-b-32",
            validator=attrs.validators.in_(tuple(PRESETS)),
            metadata={"help": f"Model size for random init: one of {', '.join(PRESETS)}. Ignored when `pretrained` is set."},
        )
        pretrained: str = attrs.field(
            default="",
            metadata={
                "help": "'' = random init from `preset`; else a hub name (e.g. openai/clip-vit-base-patch32) "
                "or a local folder written by save_pretrained. A full CLIPModel checkpoint works: its "
                "vision tower is ignored."
            },
        )
        tokenizer: str = attrs.field(
            default="",
            metadata={
                "help": "Where the tokenizer comes from: '' = the `pretrained` folder/name, or for random init "
                "the preset's hub tokenizer (the built-in offline tokenizer for `tiny`)."
            },
        )
        use_projection: bool = attrs.field(
            default=True,
            metadata={"help": "pooled = text_projection(end-of-text state) (CLIP's text_embeds) if true, else the un-projected end-of-text state."},
        )
        max_length: int = attrs.field(
            default=77,
            validator=[attrs.validators.instance_of(int), attrs.validators.ge(2)],
            metadata={"help": "Tokens per caption incl. start/end tokens; longer captions are truncated (CLIP: 77, the position table's size)."},
        )
        frozen: bool = attrs.field(
            default=False,
            metadata={"help": "No gradients for the tower and eval mode always (DuET-MC freezes CLIP-T)."},
        )

    plugin = "clip-text"

    def __init__(self, config: Config):
        super().__init__(config)
        self.tokenizer = self.load_tokenizer(hub_name=PRESETS[config.preset][0], tiny="clip", tokenizer_class="CLIPTokenizer")
        self.model = self._load_model(config)
        text_cfg = self.model.config
        if config.max_length > text_cfg.max_position_embeddings:
            raise MtrunError(
                f"clip-text: max_length={config.max_length} exceeds the model's "
                f"{text_cfg.max_position_embeddings} positions"
            )
        if config.use_projection and text_cfg.projection_dim != text_cfg.hidden_size:
            raise MtrunError(
                f"clip-text: use_projection=true needs projection_dim == hidden_size so tokens and pooled "
                f"share one width (got {text_cfg.projection_dim} vs {text_cfg.hidden_size}); set use_projection = false"
            )
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self.output_dim = int(text_cfg.hidden_size)
        self.finish_init(config.max_length)

    # ------------------------------------------------------------------ building

    def _load_model(self, config: Config) -> nn.Module:
        from transformers import CLIPTextModelWithProjection

        if not config.pretrained:
            return CLIPTextModelWithProjection(self.preset_config(config.preset, self.tokenizer))
        return self.load_pretrained(
            CLIPTextModelWithProjection,
            whole="a complete CLIP text tower",
            part="text tower",
            unused=lambda key: key.startswith(_OTHER_TOWER_PREFIXES),
        )

    @staticmethod
    def preset_config(preset: str, tokenizer: Any) -> CLIPTextConfig:
        """The ``CLIPTextConfig`` of a preset, with special-token ids taken from ``tokenizer``."""
        from transformers import CLIPTextConfig

        values = {**_COMMON, **PRESETS[preset][1]}
        values.setdefault("vocab_size", len(tokenizer))
        return CLIPTextConfig(
            **values,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    # ------------------------------------------------------------------ running

    def end_of_text_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Position of the first end-of-text token per row (pads may share its id, so the first).

        A row without one (ids built by hand) falls back to its last real token.
        """
        is_eos = input_ids == self.eos_token_id
        first = is_eos.int().argmax(dim=-1)
        last_real = attention_mask.long().sum(dim=-1).clamp(min=1) - 1
        return torch.where(is_eos.any(dim=-1), first, last_real)

    def run_model(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool) -> Any:
        return self.model.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)

    def pool(self, out: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = out.last_hidden_state
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        pooled = tokens[rows, self.end_of_text_index(input_ids, mask).to(tokens.device)]
        return self.model.text_projection(pooled) if self.config.use_projection else pooled
