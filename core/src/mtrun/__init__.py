"""mtrun: a plugin-based framework for music-text representation learning.

``import mtrun`` is the public API: everything a plugin author needs is a name here (or in
:mod:`mtrun.testing`), and plugins, ours included, import nothing else from mtrun. Names are
loaded on first use, so importing mtrun stays fast (no torch until a name needs it).

:data:`API_VERSION` versions this surface. A plugin may declare the range it supports with a
module attribute ``MTRUN_API = ">=1.0,<2"`` (a PEP 440 specifier); mtrun refuses to load a
plugin whose range excludes its API version, naming the plugin and its distribution.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

API_VERSION = "1.1"
"""The version of the public API below; its major number changes when a change breaks plugins."""

_PUBLIC: dict[str, str] = {
    # plugin machinery
    "hookimpl": "mtrun.hookspecs",
    "Registry": "mtrun.registry",
    "PluginInfo": "mtrun.registry",
    # errors
    "MtrunError": "mtrun.errors",
    "PluginError": "mtrun.errors",
    "RegistrationError": "mtrun.errors",
    "RecipeError": "mtrun.errors",
    "TrainingError": "mtrun.errors",
    "BuildError": "mtrun.spec",
    # interfaces and the data that travels between components
    "AudioEncoder": "mtrun.interfaces",
    "TextEncoder": "mtrun.interfaces",
    "Projector": "mtrun.interfaces",
    "Fusion": "mtrun.interfaces",
    "FrameFeatures": "mtrun.interfaces",
    "Objective": "mtrun.interfaces",
    "Augmenter": "mtrun.interfaces",
    "Trainer": "mtrun.interfaces",
    "DataSource": "mtrun.interfaces",
    "EvalTask": "mtrun.interfaces",
    "Optimizer": "mtrun.interfaces",
    "Schedule": "mtrun.interfaces",
    "Sample": "mtrun.interfaces",
    "Batch": "mtrun.interfaces",
    "HardNegatives": "mtrun.interfaces",
    "EncoderOutput": "mtrun.interfaces",
    "StepOutputs": "mtrun.interfaces",
    "ObjectiveOutput": "mtrun.interfaces",
    "AugmentContext": "mtrun.interfaces",
    "AUGMENT_STAGES": "mtrun.interfaces",
    # the component schema and contracts
    "KINDS": "mtrun.schema",
    "SLOTS": "mtrun.schema",
    "Kind": "mtrun.schema",
    "Slot": "mtrun.schema",
    "Need": "mtrun.schema",
    "CAPABILITIES": "mtrun.schema",
    # configs
    "ComponentSpec": "mtrun.spec",
    "component_field": "mtrun.spec",
    "positive": "mtrun.config",
    "non_negative": "mtrun.config",
    "unit_interval": "mtrun.config",
    # building blocks
    "SplitSource": "mtrun.data.sources.base",
    # data sources built on core's own: a manifest table read as one (the demo corpus does),
    # and the table reader behind it (the public-dataset adapters read metadata files with it)
    "ManifestSource": "mtrun.data.sources.manifest",
    "read_table": "mtrun.data.sources.manifest",
    # split names and splits for datasets that publish none, as the manifest source decides them
    "canonical_split": "mtrun.data.sources.manifest",
    "hash_split": "mtrun.data.sources.manifest",
    "System": "mtrun.system",
    "WeightedObjective": "mtrun.system",
    "Run": "mtrun.run",
    "attention": "mtrun.nn",
    "MultiHeadAttention": "mtrun.nn",
    "TransformerBlock": "mtrun.nn",
    "sincos_table": "mtrun.nn",
    "EmaCopy": "mtrun.nn.ema",
    "cosine_ema_rate": "mtrun.nn.ema",
    "embedding_std": "mtrun.train.collapse",
    # using trained models: embed music and text (docs/using-models.md)
    "load": "mtrun.inference",
    # weight loading
    # the shared on-disk cache (plugins keep their caches under cache_root())
    "cache_root": "mtrun.cache",
    "write_atomic": "mtrun.cache",
    "LoadReport": "mtrun.weights",
    "load_matching": "mtrun.weights",
    "read_json": "mtrun.weights",
    "read_state_dict": "mtrun.weights",
    "strip_prefixes": "mtrun.weights",
    # console output that wraps only on a terminal (progress of long data builds)
    "make_console": "mtrun.console",
    # distributed training helpers
    "all_gather_with_grad": "mtrun.distributed",
    "cleanup": "mtrun.distributed",
    "init_from_env": "mtrun.distributed",
    "is_distributed": "mtrun.distributed",
    "local_only": "mtrun.distributed",
    "rank": "mtrun.distributed",
    "world_size": "mtrun.distributed",
}

__all__ = ["API_VERSION", "__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mtrun' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
