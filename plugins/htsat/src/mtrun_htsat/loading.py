"""Reading HTS-AT weights into ``transformers.ClapAudioModel``.

Two sources:

* **Hugging Face CLAP folders or hub names** saved by ``ClapModel`` (keys
  ``audio_model.audio_encoder.*`` plus the text tower and projections),
  ``ClapAudioModelWithProjection`` (``audio_model.audio_encoder.*`` + ``audio_projection.*``) or
  ``ClapAudioModel`` (``audio_encoder.*``). The audio tower is loaded; the text tower, both
  projections and the logit scales are not part of this encoder (mtrun's projectors replace
  the CLAP projection) and are listed in the report as ignored.
* **LAION-CLAP ``.pt`` checkpoints** (``torch.load(weights_only=True)``; the tensors live under
  ``state_dict``, usually with DDP's ``module.`` prefix). Their HTS-AT keys are renamed with
  :data:`LAION_TO_HF`, ``attn.qkv`` is split into query/key/value, and the keys listed in
  :data:`LAION_IGNORED` (the STFT/mel front end, which our ``preprocess`` replaces; the AudioSet
  head; Swin's cached attention masks; the text side) are dropped. These towers were trained
  contrastively on audio–text pairs, at 48 kHz.
* **HTS-AT's own AudioSet classifier checkpoints** (``HTSAT_AudioSet_Saved_*.ckpt``, PyTorch
  Lightning files whose ``state_dict`` holds the network under ``sed_model.``): the same
  network class as LAION-CLAP's ``audio_branch``, so the same mapping applies after the prefix;
  they were trained to classify AudioSet's 527 classes at 32 kHz and need
  ``front_end = "audioset"``.

:func:`checkpoint_kind` tells the two ``.pt`` kinds apart, and a checkpoint paired with the
other kind's front end is refused: the log-mels would not be those the weights were trained on.

Every module key must be matched: missing, unexpected and mis-shaped keys raise, all listed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs

from mtrun import LoadReport, MtrunError, load_matching, read_json, read_state_dict

__all__ = ["CHECKPOINT_KINDS", "LAION_IGNORED", "LAION_TO_HF", "LoadReport", "audio_config_from_dict", "checkpoint_kind", "laion_to_hf_state_dict", "load_audio_tower"]

LAION_TO_HF: tuple[tuple[str, str], ...] = (
    # (LAION-CLAP key pattern, ClapAudioModel key); ``{i}``/``{j}`` = stage / block index.
    ("audio_branch.bn0.*", "audio_encoder.batch_norm.*"),
    ("audio_branch.patch_embed.proj.*", "audio_encoder.patch_embed.proj.*"),
    ("audio_branch.patch_embed.norm.*", "audio_encoder.patch_embed.norm.*"),
    ("audio_branch.layers.{i}.blocks.{j}.norm1.*", "audio_encoder.layers.{i}.blocks.{j}.layernorm_before.*"),
    ("audio_branch.layers.{i}.blocks.{j}.attn.qkv.*", "audio_encoder.layers.{i}.blocks.{j}.attention.self.{query,key,value}.* (rows split in 3)"),
    ("audio_branch.layers.{i}.blocks.{j}.attn.relative_position_bias_table", "audio_encoder.layers.{i}.blocks.{j}.attention.self.relative_position_bias_table"),
    ("audio_branch.layers.{i}.blocks.{j}.attn.relative_position_index", "audio_encoder.layers.{i}.blocks.{j}.attention.self.relative_position_index"),
    ("audio_branch.layers.{i}.blocks.{j}.attn.proj.*", "audio_encoder.layers.{i}.blocks.{j}.attention.output.dense.*"),
    ("audio_branch.layers.{i}.blocks.{j}.norm2.*", "audio_encoder.layers.{i}.blocks.{j}.layernorm_after.*"),
    ("audio_branch.layers.{i}.blocks.{j}.mlp.fc1.*", "audio_encoder.layers.{i}.blocks.{j}.intermediate.dense.*"),
    ("audio_branch.layers.{i}.blocks.{j}.mlp.fc2.*", "audio_encoder.layers.{i}.blocks.{j}.output.dense.*"),
    ("audio_branch.layers.{i}.downsample.reduction.*", "audio_encoder.layers.{i}.downsample.reduction.*"),
    ("audio_branch.layers.{i}.downsample.norm.*", "audio_encoder.layers.{i}.downsample.norm.*"),
    ("audio_branch.norm.*", "audio_encoder.norm.*"),
)
"""The documented LAION-CLAP -> ``ClapAudioModel`` key mapping (also in the README)."""

LAION_IGNORED: tuple[str, ...] = (
    r"audio_branch\.spectrogram_extractor\..*",  # STFT as conv weights; preprocess computes it
    r"audio_branch\.logmel_extractor\..*",  # mel filterbank; preprocess computes it
    r"audio_branch\.layers\.\d+\.blocks\.\d+\.attn_mask",  # cached shifted-window mask
    r"audio_branch\.tscam_conv\..*",  # AudioSet framewise head
    r"audio_branch\.head\..*",  # AudioSet classifier
    r"text_branch\..*",
    r"text_transform\..*",
    r"text_projection\..*",
    r"audio_transform\..*",
    r"audio_projection\..*",
    r"logit_scale_[at]",
)
"""LAION-CLAP keys that are not part of the HTS-AT audio tower we run."""

_HF_IGNORED = (r"text_model\.", r"text_projection\.", r"audio_projection\.", r"logit_scale_[at]$")

_BLOCK_RULES = (
    ("norm1.", "layernorm_before."),
    ("attn.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("attn.relative_position_index", "attention.self.relative_position_index"),
    ("attn.proj.", "attention.output.dense."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)


CHECKPOINT_KINDS: dict[str, tuple[str, str]] = {
    # kind: (what it is, the front end it was trained with)
    "laion-clap": ("a LAION-CLAP audio tower (trained contrastively on audio-text pairs, 48 kHz)", "clap"),
    "htsat-audioset": ("an HTS-AT AudioSet classifier (trained on AudioSet's 527 labels, 32 kHz)", "audioset"),
}
"""The ``.pt`` checkpoint kinds this plugin reads, named for what they are."""

_CLASSIFIER_PREFIX = "sed_model."


def checkpoint_kind(state: dict[str, Any]) -> str:
    """``htsat-audioset`` when the keys live under HTS-AT's ``sed_model.``, else ``laion-clap``."""
    keys = [k.removeprefix("module.") for k in state]
    return "htsat-audioset" if keys and all(k.startswith(_CLASSIFIER_PREFIX) for k in keys) else "laion-clap"


def laion_to_hf_state_dict(state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Rename a LAION-CLAP (or HTS-AT classifier) state dict to ``ClapAudioModel`` keys; return
    it and the ignored keys.

    Keys that neither map nor are known-ignorable are kept as they are, so the exact load
    reports them as unexpected instead of dropping them silently.
    """
    out: dict[str, Any] = {}
    ignored: list[str] = []
    block = re.compile(r"^audio_branch\.layers\.(\d+)\.blocks\.(\d+)\.(.*)$")
    for raw, value in state.items():
        key = raw[len("module.") :] if raw.startswith("module.") else raw
        if key.startswith(_CLASSIFIER_PREFIX):  # HTS-AT's own network is LAION-CLAP's audio_branch
            key = "audio_branch." + key[len(_CLASSIFIER_PREFIX) :]
        if any(re.fullmatch(p, key) for p in LAION_IGNORED):
            ignored.append(raw)
            continue
        m = block.match(key)
        if m:
            i, j, rest = m.groups()
            prefix = f"audio_encoder.layers.{i}.blocks.{j}."
            if rest.startswith("attn.qkv."):
                suffix = rest[len("attn.qkv.") :]
                q, k, v = value.chunk(3, dim=0)
                for name, part in (("query", q), ("key", k), ("value", v)):
                    out[f"{prefix}attention.self.{name}.{suffix}"] = part.clone()
                continue
            for old, new in _BLOCK_RULES:
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            out[prefix + rest] = value
            continue
        if key.startswith("audio_branch.bn0."):
            key = "audio_encoder.batch_norm." + key[len("audio_branch.bn0.") :]
        elif key.startswith("audio_branch."):
            # patch_embed.*, layers.{i}.downsample.*, norm.* keep their names
            key = "audio_encoder." + key[len("audio_branch.") :]
        out[key] = value
    return out, ignored


def audio_config_from_dict(values: dict[str, Any]) -> Any:
    """A ``ClapAudioConfig`` from a ``ClapConfig`` (``audio_config`` inside) or audio config dict."""
    from transformers import ClapAudioConfig

    if values.get("model_type") == "clap" or "audio_config" in values:
        values = values.get("audio_config") or {}
    known = set(ClapAudioConfig().to_dict())
    config = ClapAudioConfig(**{k: v for k, v in values.items() if k in known and k not in ("model_type", "transformers_version", "architectures")})
    if config.enable_fusion:
        raise MtrunError("fusion CLAP checkpoints (enable_fusion=true) are not supported; use an unfused checkpoint such as laion/clap-htsat-unfused")
    return config


def _resolve(pretrained: str) -> Path:
    path = Path(pretrained).expanduser()
    if path.exists():
        return path
    if pretrained.startswith((".", "/", "~")) or pretrained.endswith((".pt", ".ckpt", ".pth")):
        raise MtrunError(f"pretrained={pretrained!r}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=pretrained, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"]))
    except Exception as exc:  # noqa: BLE001
        raise MtrunError(
            f"pretrained={pretrained!r}: could not download it from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}). Without network access, download it elsewhere and pass "
            "the local folder (or LAION-CLAP .pt file) as `pretrained`."
        ) from exc


def load_audio_tower(pretrained: str, preset_config: Any, front_end: str = "clap") -> tuple[Any, LoadReport]:
    """Build a ``ClapAudioModel`` and load HF CLAP, LAION-CLAP or HTS-AT classifier weights
    into it exactly.

    Args:
        pretrained: Hub name, HF folder, or a LAION-CLAP / HTS-AT AudioSet ``.pt``/``.ckpt`` file.
        preset_config: The ``ClapAudioConfig`` to build for ``.pt`` files, which carry no config.
        front_end: The encoder's front end; it must be the one the weights were trained with.
    """
    from transformers import ClapAudioModel

    what = f"pretrained={pretrained!r}"
    hint = " (HTS-AT; check the preset for .pt files)"
    path = _resolve(pretrained)
    if path.is_file():
        state = read_state_dict(path, what=what)
        if any("fusion_model" in k or "mel_conv2d" in k for k in state):
            raise MtrunError(f"{what}: a fusion LAION-CLAP checkpoint; only unfused HTS-AT checkpoints are supported")
        _check_front_end(what, checkpoint_kind(state), front_end)
        state, ignored = laion_to_hf_state_dict(state)
        model = ClapAudioModel(preset_config)
        report = load_matching(model, state, what=what, hint=hint)
        return model, attrs.evolve(report, ignored=tuple(sorted(ignored)))
    config_path = path / "config.json"
    if not config_path.is_file():
        raise MtrunError(f"{what}: {path} has no config.json")
    _check_front_end(what, "laion-clap", front_end)  # HF CLAP folders hold LAION-CLAP towers
    model = ClapAudioModel(audio_config_from_dict(read_json(config_path, what=what)))
    state = read_state_dict(path, what=what)
    return model, load_matching(model, state, ignore=_HF_IGNORED, rename=_strip_audio_model, what=what, hint=hint)


def _strip_audio_model(key: str) -> str:
    return key.removeprefix("audio_model.")


def _check_front_end(what: str, kind: str, front_end: str) -> None:
    description, needed = CHECKPOINT_KINDS[kind]
    if front_end != needed:
        raise MtrunError(
            f"{what} is {description}; set audio_encoder.front_end = {needed!r} "
            f"(it is {front_end!r}), so the log-mels are the ones these weights were trained on"
        )
