"""Reading MERT-v1 checkpoints into a plain ``transformers.HubertModel``.

MERT's hub repositories ship custom code (``model_type: "mert_model"``) that subclasses
HuBERT. For the v1 checkpoints that code builds exactly HuBERT's modules (same names), as long
as the CQT front end and DeepNorm are off, so we never run it: we translate ``config.json``
into a :class:`~transformers.HubertConfig`, build ``HubertModel`` and load the state dict by
hand (:func:`mtrun.weights.load_matching`), renaming keys and insisting that every key is matched.

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

from pathlib import Path
from typing import Any

from mtrun import LoadReport, MtrunError, load_matching, read_json, read_state_dict

__all__ = [
    "LoadReport",
    "hubert_config_from_dict",
    "load_backbone",
    "mert_key",
    "read_state_dict",
    "resolve_folder",
]

# HubertConfig fields that only matter for pre-training or CTC heads; safe to take as given.
_DROP_KEYS = {"architectures", "auto_map", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}
_PREFIXES = ("module.", "mert_model.", "hubert.", "model.")
_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


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


def mert_key(key: str, target_keys: set[str]) -> str:
    """The module key for a checkpoint key (see the module docstring's table)."""
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
    return new


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
    what = f"pretrained={pretrained!r}"
    values = read_json(config_path, what=what)
    state = read_state_dict(folder, what=what)
    if not any(k == "masked_spec_embed" or k.endswith(".masked_spec_embed") for k in state):
        # MERT creates this SpecAugment vector only when masking probabilities are > 0; match it.
        values = {**values, "mask_time_prob": 0.0, "mask_feature_prob": 0.0}
    model = HubertModel(hubert_config_from_dict(values))
    targets = set(model.state_dict())
    report = load_matching(model, state, rename=lambda key: mert_key(key, targets), what=what)
    pre = folder / "preprocessor_config.json"
    return model, report, (read_json(pre, what=what) if pre.is_file() else {})
