"""Recipe text shared by the tests that train the testkit's toy system end to end."""

from __future__ import annotations

TOY_MODEL = """
[audio_encoder]
type = "toy-audio"

[text_encoder]
type = "toy-text"

[audio_projector]
type = "toy-linear"

[text_projector]
type = "toy-linear"

[[objective]]
type = "toy-contrastive"
"""
"""The toy encoders, projectors and objective (tests/testkit), as recipe tables."""
