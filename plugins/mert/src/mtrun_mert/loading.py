"""Reading MERT-v1 checkpoints into a plain ``transformers.HubertModel``.

MERT's hub repositories ship custom code (``model_type: "mert_model"``) that subclasses
HuBERT. For the v1 checkpoints that code builds exactly HuBERT's modules (same names), as long
as the CQT front end and DeepNorm are off, so we never run it: we translate ``config.json``
into a :class:`~transformers.HubertConfig`, build ``HubertModel`` and load the state dict by
hand, renaming keys and insisting that every key is matched.

Key renames (checkpoint -> module):

========================================  ==============================================
checkpoint key                             module key
========================================  ==============================================
``module.`` / ``model.`` / ``hubert.`` /   (prefix dropped)
``mert_model.`` + key
``...pos_conv_embed.conv.weight_g``        ``...pos_conv_embed.conv.parametrizations.weight.original0``
``...pos_conv_embed.conv.weight_v``        ``...pos_conv_embed.conv.parametrizations.weight.original1``
========================================  ==============================================

(and the reverse when the running torch builds the legacy ``weight_g``/``weight_v`` names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from mtrun.errors import MtrunError

__all__ = [
    "LoadReport",
    "hubert_config_from_dict",
    "load_backbone",
    "load_state_dict_exact",
    "read_state_dict",
    "rename_mert_keys",
    "resolve_folder",
]

# HubertConfig fields that only matter for pre-training or CTC heads; safe to take as given.
_DROP_KEYS = {"architectures", "auto_map", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}
_PREFIXES = ("module.", "mert_model.", "hubert.", "model.")
_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


@attrs.frozen
class LoadReport:
    """What a state-dict load did; every module key matched when ``missing`` and
    ``unexpected`` are empty (a load that leaves either non-empty raises instead)."""

    matched: int
    renamed: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()


def resolve_folder(pretrained: str, patterns: list[str]) -> Path:
    """A local folder as is; otherwise a hub snapshot with only the files we read.

    Raises:
        MtrunError: the name is neither a folder nor downloadable (offline, no cache, typo).
    """
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return path
    if path.exists() or pretrained.startswith((".", "/", "~")):
        raise MtrunError(f"pretrained={pretrained!r}: not a folder; pass a folder holding config.json and the weights")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=pretrained, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise MtrunError(
            f"pretrained={pretrained!r}: could not download it from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}). Without network access, download it elsewhere and pass "
            "the local folder as `pretrained`."
        ) from exc


def read_state_dict(folder: Path) -> dict[str, Any]:
    """Tensors from ``model.safetensors`` or ``pytorch_model.bin`` (single or sharded).

    ``.bin`` files are read with ``torch.load(weights_only=True)``: no pickled code runs.
    """
    import torch
    from safetensors.torch import load_file

    for index_name, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [single]
        if not all((folder / f).is_file() for f in files):
            continue
        state: dict[str, Any] = {}
        for name in files:
            if name.endswith(".safetensors"):
                state.update(load_file(str(folder / name)))
            else:
                state.update(torch.load(folder / name, map_location="cpu", weights_only=True))
        return state
    raise MtrunError(f"{folder}: no model.safetensors or pytorch_model.bin found")


def hubert_config_from_dict(values: dict[str, Any]) -> Any:
    """A ``HubertConfig`` from a MERT (``mert_model``) or HuBERT ``config.json``.

    MERT-only switches are checked: the CQT front end and DeepNorm residual scaling have no
    HuBERT equivalent, so such checkpoints are refused rather than silently mis-run.
    ``attention_relax`` only rescales logits before a max-subtraction, which softmax is
    invariant to, so it is ignored. The positional conv always uses weight norm in MERT
    (``conv_pos_batch_norm=False``). SpecAugment and LayerDrop are switched off: masking is
    an augmenter's job in mtrun, and a dropped layer would feed the layer aggregator a
    duplicated hidden state.
    """
    from transformers import HubertConfig

    problems = []
    if values.get("feature_extractor_cqt"):
        problems.append("feature_extractor_cqt=true (MERT's CQT front end) has no HuBERT equivalent")
    if values.get("deepnorm"):
        problems.append("deepnorm=true (scaled residuals) has no HuBERT equivalent")
    if problems:
        raise MtrunError("this MERT checkpoint cannot run as HubertModel: " + "; ".join(problems))
    known = set(HubertConfig().to_dict())
    kwargs = {k: v for k, v in values.items() if k in known and k not in _DROP_KEYS}
    kwargs.update(conv_pos_batch_norm=False, apply_spec_augment=False, layerdrop=0.0)
    return HubertConfig(**kwargs)


def rename_mert_keys(state: dict[str, Any], target_keys: set[str]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Map checkpoint key names onto the module's (see the module docstring's table)."""
    out: dict[str, Any] = {}
    renamed: list[tuple[str, str]] = []
    for key, value in state.items():
        new = key
        stripped = True
        while stripped and new not in target_keys:
            stripped = False
            for prefix in _PREFIXES:
                if new.startswith(prefix):
                    new, stripped = new[len(prefix) :], True
                    break
        for old, modern in _WEIGHT_NORM.items():
            if new.endswith("." + old) and new not in target_keys:
                candidate = new[: -len(old)] + modern
                if candidate in target_keys:
                    new = candidate
            elif new.endswith("." + modern) and new not in target_keys:
                candidate = new[: -len(modern)] + old
                if candidate in target_keys:
                    new = candidate
        if new != key:
            renamed.append((key, new))
        out[new] = value
    return out, renamed


def load_state_dict_exact(module: Any, state: dict[str, Any], *, what: str, ignored: tuple[str, ...] = (), renamed: list[tuple[str, str]] | None = None) -> LoadReport:
    """Load ``state`` into ``module`` with every key and shape matched, or raise listing all.

    Raises:
        MtrunError: missing keys, unexpected keys or shape mismatches, each listed.
    """
    target = module.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}" for k in sorted(set(state) & set(target)) if tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:

        def listing(label: str, items: list[str]) -> str:
            shown = "".join(f"\n    {k}" for k in items[:20])
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {label} ({len(items)}):{shown}{more}" if items else ""

        raise MtrunError(
            f"{what}: the checkpoint does not match the model"
            + listing("missing from the checkpoint", missing)
            + listing("unexpected in the checkpoint", unexpected)
            + listing("shape mismatches", shapes)
        )
    module.load_state_dict(state, strict=True)
    return LoadReport(matched=len(target), renamed=tuple(renamed or ()), ignored=tuple(ignored))


def load_backbone(pretrained: str) -> tuple[Any, LoadReport, dict[str, Any]]:
    """Build a ``HubertModel`` from a MERT/HuBERT hub name or folder and load its weights.

    Returns:
        The model, the load report, and the folder's ``preprocessor_config.json`` (``{}`` when absent).
    """
    from transformers import HubertModel

    folder = resolve_folder(pretrained, ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model.bin", "pytorch_model*.bin", "pytorch_model.bin.index.json"])
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MtrunError(f"pretrained={pretrained!r}: {folder} has no config.json")
    values = json.loads(config_path.read_text())
    state = read_state_dict(folder)
    if not any(k == "masked_spec_embed" or k.endswith(".masked_spec_embed") for k in state):
        # MERT creates this SpecAugment vector only when masking probabilities are > 0; match it.
        values = {**values, "mask_time_prob": 0.0, "mask_feature_prob": 0.0}
    model = HubertModel(hubert_config_from_dict(values))
    state, renamed = rename_mert_keys(state, set(model.state_dict()))
    report = load_state_dict_exact(model, state, what=f"pretrained={pretrained!r}", renamed=renamed)
    pre = folder / "preprocessor_config.json"
    return model, report, (json.loads(pre.read_text()) if pre.is_file() else {})
