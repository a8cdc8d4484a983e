"""The ``tag-to-caption`` augmenter for mtrun: captions written from tags (DuET-MC).

Registered through the ``tag-to-caption`` entry point in the ``mtrun`` group. Templates by
default; with ``lm_path`` set, captions from a local causal LM, generated once by
:meth:`mtrun_tag_to_caption.augmenter.TagToCaption.prepare` (or :func:`prepare_captions`) and
read from a disk cache during training.
"""

from __future__ import annotations

from mtrun import hookimpl

__all__ = ["mtrun_register_components", "prepare_captions"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


def prepare_captions(config, samples, **kwargs):
    """Pre-generate the LLM captions of ``samples`` for a ``TagToCaption.Config``; see
    :meth:`~mtrun_tag_to_caption.augmenter.TagToCaption.prepare`."""
    from mtrun_tag_to_caption.augmenter import TagToCaption

    return TagToCaption(config).prepare(samples, **kwargs)


@hookimpl
def mtrun_register_components(registry) -> None:
    from mtrun_tag_to_caption.augmenter import TagToCaption

    registry.augmenter("tag-to-caption", TagToCaption)
