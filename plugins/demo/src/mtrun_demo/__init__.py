"""The demo corpus for mtrun: real compositions from music21's corpus rendered with GM timbres.

Registered through the ``demo`` entry point in the ``mtrun`` group as the ``demo`` data source
(``[data] type = "demo"``), which reads the corpus straight from the cache, building it on first
use. ``write_demo(OUT)`` (``mtrun data demo OUT/``, through :meth:`DemoCorpus.write`) writes it
as a manifest + FLAC files. See ``docs/data.md`` ("Demo corpus") for what it contains and how
tags and captions are made.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import attrs

from mtrun import ManifestSource, MtrunError, Sample, SplitSource, hookimpl
from mtrun_demo.build import DemoSettings, build_corpus, cache_root, corpus_dir

__all__ = [
    "DemoCorpus",
    "DemoSettings",
    "build_corpus",
    "cache_root",
    "corpus_dir",
    "mtrun_register_components",
    "subset",
    "write_demo",
]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""

_FILES = ("manifest.jsonl", "corpus.json", "README.md")


def write_demo(out_dir: Path, *, force: bool = False) -> Path:
    """Write the demo corpus (manifest, FLAC clips, README.md, corpus.json) into ``out_dir``.

    The corpus is built once into the cache (a few minutes on two cores) and then hard-linked
    (copied across file systems) into ``out_dir``, so a second call is near-instant.

    Args:
        out_dir: Destination folder; created if missing.
        force: Replace a corpus already in ``out_dir`` (without it, an existing manifest is an
            error rather than silently mixed with new files).

    Returns:
        The path of ``manifest.jsonl`` in ``out_dir``.

    Raises:
        MtrunError: ``out_dir`` already holds a manifest and ``force`` is false.
    """
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.jsonl"
    if manifest.exists() and not force:
        raise MtrunError(f"{manifest} already exists; pass --force to replace it")
    source = build_corpus()
    out_dir.mkdir(parents=True, exist_ok=True)
    if force and (out_dir / "audio").exists():
        shutil.rmtree(out_dir / "audio")
    for path in sorted((source / "audio").rglob("*.flac")):
        dest = out_dir / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(path, dest)
    for name in _FILES:  # the manifest last: its presence marks a complete copy
        if name != "manifest.jsonl":
            shutil.copyfile(source / name, out_dir / name)
    tmp = out_dir / ".manifest.jsonl.tmp"
    shutil.copyfile(source / "manifest.jsonl", tmp)
    os.replace(tmp, manifest)
    return manifest


def _link_or_copy(src: Path, dest: Path) -> None:
    if dest.exists():
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


class DemoCorpus(SplitSource):
    """The demo corpus (music21 scores rendered with GM timbres), built on first use."""

    provides: ClassVar[frozenset[str]] = frozenset({"captions"})  # text-to-music retrieval needs them

    @attrs.frozen
    class Config:
        root: str = attrs.field(
            default="",
            metadata={"help": "folder holding the corpus' manifest.jsonl ('' = build or reuse the cache)"},
        )
        n_items: int = attrs.field(
            default=0,
            validator=attrs.validators.ge(0),
            metadata={"help": "keep at most this many items, a fixed subset spread over the splits (0 = all)"},
        )
        clip_seconds: float = attrs.field(
            default=10.0,
            validator=attrs.validators.gt(0),
            metadata={"help": "length of each rendered clip when building (a new length is a new build)"},
        )
        scale: float = attrs.field(
            default=1.0,
            validator=attrs.validators.gt(0),
            metadata={"help": "fraction of each collection's pieces to build (1.0 = the full corpus)"},
        )

    def __init__(self, config: Config):
        self.config = config

    def folder(self) -> Path:
        """Where the corpus is, building it into the cache when ``root`` is empty."""
        if self.config.root:
            return Path(self.config.root).expanduser()
        return build_corpus(DemoSettings(clip_seconds=self.config.clip_seconds, scale=self.config.scale))

    @classmethod
    def write(cls, out_dir: Path, *, force: bool = False) -> Path:
        """Write the corpus into ``out_dir`` for ``mtrun data demo OUT``; see :func:`write_demo`."""
        return write_demo(out_dir, force=force)

    def build(self) -> dict[str, list[Sample]]:
        folder = self.folder()
        manifest = folder / "manifest.jsonl"
        if not manifest.is_file():
            raise MtrunError(f"{folder}: no manifest.jsonl; write one with `mtrun data demo {folder}`")
        splits = ManifestSource(ManifestSource.Config(path=str(manifest))).build()
        if self.config.n_items:
            splits = subset(splits, self.config.n_items)
        return splits


def subset(splits: dict[str, list[Sample]], n_items: int) -> dict[str, list[Sample]]:
    """At most ``n_items`` items in total, each split keeping its share (at least one item).

    Items are chosen by a hash of their id, so the subset is the same on every machine and a
    larger ``n_items`` only adds items.
    """
    import hashlib

    total = sum(len(v) for v in splits.values())
    out: dict[str, list[Sample]] = {}
    for split, items in splits.items():
        keep = max(1, round(n_items * len(items) / max(total, 1)))
        ranked = sorted(items, key=lambda s: hashlib.sha256(s.id.encode()).digest())[:keep]
        order = {id(s): i for i, s in enumerate(items)}
        out[split] = sorted(ranked, key=lambda s: order[id(s)])
    return out


@hookimpl
def mtrun_register_components(registry: Any) -> None:
    registry.data("demo", DemoCorpus)
