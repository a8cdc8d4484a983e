"""LLM generation settings shared with plugins that generate text the same way (llm-enrich).

One definition of what enters a cache key and of the value checks, so two plugins that cache
LLM output cannot drift apart on either.
"""

from __future__ import annotations

from typing import Any

from mtrun import positive, unit_interval

__all__ = ["generation_settings"]


def generation_settings(config: Any) -> dict[str, Any]:
    """What besides the model and the input decides a generated text (part of the cache key).

    ``config`` has ``prompt``, ``use_chat_template``, ``max_new_tokens``, ``do_sample`` and,
    used only when sampling, ``temperature``, ``top_p`` and ``seed``.
    """
    settings: dict[str, Any] = {
        "prompt": config.prompt,
        "chat": config.use_chat_template,
        "max_new_tokens": config.max_new_tokens,
        "do_sample": config.do_sample,
    }
    if config.do_sample:
        settings.update(temperature=config.temperature, top_p=config.top_p, seed=config.seed)
    return settings
