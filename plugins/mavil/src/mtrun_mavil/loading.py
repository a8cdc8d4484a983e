"""Loading AudioMAE / MAViL checkpoints (timm ViT key names) into :class:`MavilEncoder`.

The public checkpoints are ``torch.save`` files of ``{"model": state_dict, ...}`` written by the
MAE training scripts. Keys follow timm's ``VisionTransformer``: ``patch_embed.proj.weight``,
``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm.{weight,bias}`` (pre-training) or ``fc_norm.*`` (fine-tuned, global-pool models).
Pre-training files also hold the MAE decoder (``decoder_*``, ``mask_token``) and MAViL's hold a
video branch and fusion layers; those are ignored and listed in the report.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import torch

from mtrun import MtrunError, load_matching, read_state_dict, strip_prefixes

if TYPE_CHECKING:
    from mtrun_mavil.encoder import MavilEncoder

__all__ = ["IGNORED", "LoadReport", "find_checkpoint_file", "load_checkpoint"]

IGNORED = re.compile(
    r"^(decoder[._]|mask_token|head\.|head_dist\.|"  # MAE decoder, classifier heads
    r"video|visual|v_|.*_v\.|.*_v$|patch_embed_v|pos_embed_v|cls_token_v|blocks_v|norm_v|"  # MAViL video branch
    r"blocks_av|blocks_u|fusion|.*_av\.|.*_av$|logit_scale|.*proj_head)"  # MAViL fusion / contrastive heads
)
"""Keys that are not part of the audio encoder; they are skipped and reported."""

_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@attrs.frozen
class LoadReport:
    """What a load did: the file, keys ignored, keys renamed, whether the positions came from it."""

    path: str
    ignored: tuple[str, ...]
    renamed: tuple[tuple[str, str], ...]
    positions_from_file: bool


def find_checkpoint_file(pretrained: str) -> Path:
    """The checkpoint file named by ``pretrained`` (a file, or a folder holding exactly one)."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        preferred = path / "model.safetensors"
        if preferred.is_file():
            return preferred
        found = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES and p.is_file())
        if len(found) == 1:
            return found[0]
        raise MtrunError(
            f"mavil: pretrained={pretrained!r} is a folder with {len(found)} checkpoint files "
            f"({', '.join(p.name for p in found) or 'none'}); name the file itself"
        )
    raise MtrunError(
        f"mavil: pretrained={pretrained!r} is not a local file or folder. AudioMAE/MAViL weights are "
        "not on a model hub this machine can reach: download the checkpoint (e.g. AudioMAE's "
        "pretrained.pth) and pass its local path or folder as `pretrained`"
    )


def _strip_branch_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (``audio_encoder.``, ``encoder.``) when the audio ViT sits under one."""
    if "patch_embed.proj.weight" in state:
        return state
    prefixes = [k[: -len("patch_embed.proj.weight")] for k in state if k.endswith("patch_embed.proj.weight")]
    prefixes = [p for p in prefixes if not IGNORED.match(p)]
    if len(prefixes) != 1:
        return state
    prefix = prefixes[0]
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def load_checkpoint(model: MavilEncoder, pretrained: str) -> LoadReport:
    """Load ``pretrained`` into ``model``; every encoder key must be present with its shape.

    Raises:
        MtrunError: The file is missing or unsafe, or keys are missing, unexpected or of the
            wrong shape (all listed at once).
    """
    path = find_checkpoint_file(pretrained)
    state = _strip_branch_prefix(strip_prefixes(read_state_dict(path, what="mavil"), ("module.",)))
    # Fine-tuned AudioMAE models norm the pooled vector (fc_norm); here the same LayerNorm is
    # applied per token before pooling, the closest use of those weights.
    rename = {} if "norm.weight" in state else {f"fc_norm.{p}": f"norm.{p}" for p in ("weight", "bias")}
    report = load_matching(
        model,
        state,
        ignore=IGNORED,
        rename=rename,
        optional=("pos_embed",),
        what=f"mavil: {str(path)!r}",
        hint=f" (preset {model.config.preset!r}, target_length {model.target_length}, grid {model.token_grid})",
    )
    return LoadReport(path=str(path), ignored=report.ignored, renamed=report.renamed, positions_from_file="pos_embed" not in report.kept)
