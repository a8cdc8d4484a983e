"""Loading transformers text models and tokenizers by hub name or local folder.

Shared by the ``hf-text``, ``clip-text`` and ``mt5`` plugins: every hub or folder failure
becomes one :class:`~mtrun.errors.MtrunError` that says what to do offline, transformers' own
key table is held back while loading, and the checkpoint's key report is checked here instead
(every weight the encoder uses must come from the checkpoint; unused keys are fine when
expected, e.g. a decoder or the other tower, and logged otherwise).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import torch

from mtrun import MtrunError

__all__ = ["check_loading_info", "from_pretrained", "load_error", "load_tokenizer", "quiet_transformers_load_report"]

log = logging.getLogger(__name__)


def load_error(plugin: str, what: str, name: str, exc: BaseException) -> MtrunError:
    """The error for a ``what`` (tokenizer, config, model) that could not be loaded from ``name``."""
    return MtrunError(
        f"{plugin}: could not load the {what} from {name!r} ({type(exc).__name__}: {exc}). "
        f"If {name!r} is a hub name, the hub may be unreachable (or HF_HUB_OFFLINE is set) and it is "
        "not in the local cache: download it where there is a network, or pass a local folder "
        "written by save_pretrained (config.json, model.safetensors and the tokenizer files)."
    )


@contextlib.contextmanager
def quiet_transformers_load_report() -> Iterator[None]:
    """Hold back transformers' own key table while loading: it lists every expected unused key
    (heads, decoder, dropped layers) as UNEXPECTED; :func:`check_loading_info` reports what matters."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_tokenizer(source: str, *, plugin: str, tiny: str, tokenizer_class: str = "") -> Any:
    """The tokenizer at ``source`` (hub name or folder), or the built-in tiny one when it is ''.

    Args:
        source: Hub name or local folder; ``''`` builds the offline tokenizer of family ``tiny``
            (see :func:`mtrun_hf_text.tiny_tokenizers.build_tiny_tokenizer`).
        plugin: Prefix of error messages.
        tiny: Tiny tokenizer family.
        tokenizer_class: A transformers class name (``"CLIPTokenizer"``); '' = ``AutoTokenizer``
            without remote code.
    """
    if not source:
        from mtrun_hf_text.tiny_tokenizers import build_tiny_tokenizer

        return build_tiny_tokenizer(tiny)
    import transformers

    try:
        if tokenizer_class:
            return getattr(transformers, tokenizer_class).from_pretrained(source)
        return transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise load_error(plugin, "tokenizer", source, exc) from exc


def from_pretrained(model_class: Any, name: str, *, plugin: str, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``model_class.from_pretrained(name)`` in float32, quietly; returns the model and
    transformers' loading info (``missing_keys``, ``unexpected_keys``, ``mismatched_keys``)."""
    try:
        with quiet_transformers_load_report():
            return model_class.from_pretrained(name, dtype=torch.float32, output_loading_info=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a folder of another model fails with many exception types
        raise load_error(plugin, "model", name, exc) from exc


def check_loading_info(
    info: dict[str, Any],
    *,
    plugin: str,
    name: str,
    whole: str,
    part: str = "encoder",
    unused: Callable[[str], bool] | None = None,
    optional: Callable[[str], bool] | None = None,
    logger: logging.Logger | None = None,
) -> None:
    """Refuse a checkpoint that lacks weights of the encoder; log keys it holds but should not.

    Args:
        info: transformers' loading info.
        plugin: Prefix of messages.
        name: The checkpoint's hub name or folder.
        whole: What a complete checkpoint holds, for the error ("a complete mT5 encoder").
        part: What uses the weights, for the warning ("text tower").
        unused: True for checkpoint keys the encoder is expected to leave unused (decoder, heads).
        optional: True for missing keys that are allowed (the caller handles them).
        logger: Where the warning goes (default: this module's logger).

    Raises:
        MtrunError: Missing (not optional) or mis-shaped weights, the first few listed.
    """
    missing = sorted(k for k in info.get("missing_keys") or () if not (optional and optional(k)))
    bad = {"missing_keys": missing, "mismatched_keys": sorted(info.get("mismatched_keys") or ())}
    if any(bad.values()):
        raise MtrunError(f"{plugin}: {name!r} does not hold {whole}: " + "; ".join(f"{k}: {v[:8]}" for k, v in bad.items() if v))
    surprising = [k for k in info.get("unexpected_keys") or () if not (unused and unused(k))]
    if surprising:
        (logger or log).warning("%s: %s has keys the %s does not use: %s", plugin, name, part, surprising[:8])
