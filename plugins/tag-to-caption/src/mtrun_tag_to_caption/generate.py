"""Batched caption generation with a local causal LM through ``transformers``.

Imported only by ``TagToCaption.prepare`` when something must be generated, so training
processes never import ``transformers`` for this plugin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mtrun import MtrunError

__all__ = ["CaptionWriter"]


class CaptionWriter:
    """A causal LM and its tokenizer from a local folder, writing one caption per prompt.

    Args:
        path: The model folder (``save_pretrained`` layout, tokenizer included).
        config: ``TagToCaption.Config`` (generation settings).
        device: Torch device; default CUDA when available.
    """

    def __init__(self, path: str | Path, config: Any, *, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            # Local files only and never trust_remote_code: the folder must hold a model
            # class that transformers itself implements.
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            kwargs: dict[str, Any] = {"local_files_only": True}
            if self.device.type == "cuda":
                kwargs["dtype"] = "auto"
            self.model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise MtrunError(
                f"tag-to-caption: cannot load a causal LM and tokenizer from lm_path {str(path)!r}: {exc}; "
                "pass a local folder saved with save_pretrained (tokenizer included)"
            ) from None
        # Decoder-only models continue the right end of the prompt: pad on the left.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat = bool(config.use_chat_template and getattr(self.tokenizer, "chat_template", None))

    def _wrap(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: Sequence[str]) -> list[str]:
        """The decoded continuation of each prompt (raw; the caller cleans it)."""
        import torch

        cfg = self.config
        texts = [self._wrap(p) for p in prompts]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not self.chat).to(self.device)
        options: dict[str, Any] = {
            "max_new_tokens": cfg.max_new_tokens,
            "do_sample": cfg.do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if cfg.do_sample:
            torch.manual_seed(cfg.seed)
            options.update(temperature=cfg.temperature, top_p=cfg.top_p)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **options)
        new = out[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)
