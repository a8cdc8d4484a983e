"""mtrun: a plugin-based framework for music-text representation learning."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
