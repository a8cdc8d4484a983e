"""``mtrun data``: prepare data — shard a manifest, write the demo corpus.

``mtrun data shard MANIFEST OUT/ [--audio-root DIR] [--shard-size N] [--force]`` decodes every file the
manifest lists, excludes (and reports) the broken ones, and writes WebDataset tar shards
``OUT/{split}-{i:06d}.tar`` with ``OUT/index.json``; train on them with
``[data] type = "webdataset"`` and ``path = "OUT"``. A folder holding earlier shards is refused
unless ``--force`` replaces them.

``mtrun data demo OUT/ [--force]`` builds the demo corpus (manifest + audio) and prints the
manifest's path. The corpus is a plugin (``mtrun-demo``), so core does not import it: the
command looks up the ``demo`` data source in the registry and calls its class's
``write(out_dir, *, force)`` classmethod, which returns the manifest's path.

Heavy imports happen inside the handlers, so ``mtrun data -h`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``shard`` and ``demo`` subcommands to ``parser``."""
    parser.description = "Prepare data: shard a manifest into WebDataset tars, or write the demo corpus."
    sub = parser.add_subparsers(dest="data_command", metavar="{shard,demo}", required=True)

    shard = sub.add_parser(
        "shard",
        help="check every file of a manifest decodes and write WebDataset tar shards",
        description="Decode every audio file a manifest lists (broken ones are reported and left out), "
        "then write OUT/{split}-{i:06d}.tar shards (audio bytes as they are + JSON metadata) and OUT/index.json.",
    )
    shard.add_argument("manifest", help="the manifest (.csv, .tsv, .jsonl, .json or .parquet)")
    shard.add_argument("out", help="output folder for the shards")
    shard.add_argument("--audio-root", default="", help="folder the manifest's audio paths are relative to (default: the manifest's folder)")
    shard.add_argument("--shard-size", type=int, default=1000, metavar="N", help="items per shard (default 1000)")
    shard.add_argument("--force", action="store_true", help="replace the shards an earlier run wrote in OUT")

    demo = sub.add_parser(
        "demo",
        help="build the demo corpus (manifest + audio) in OUT",
        description="Build the built-in demo music-text corpus as a manifest and audio files; prints the manifest path.",
    )
    demo.add_argument("out", help="output folder")
    demo.add_argument("--force", action="store_true", help="rebuild even when OUT already holds the corpus")


def run(args: argparse.Namespace) -> int:
    """Run the chosen ``mtrun data`` subcommand; returns the exit status."""
    if args.data_command == "shard":
        return _shard(args)
    if args.data_command == "demo":
        print(_write_corpus("demo", Path(args.out), force=args.force))
        return 0
    raise AssertionError(args.data_command)  # pragma: no cover - argparse enforces the choice


def _write_corpus(name: str, out: Path, *, force: bool) -> Path:
    """Have the registered data source ``name`` write its corpus into ``out``."""
    from mtrun.errors import MtrunError
    from mtrun.plugins import get_plugins

    registry = get_plugins().registry
    if ("data", name) not in registry:
        raise MtrunError(
            f"mtrun data {name}: no data source {name!r} is installed; it comes with the "
            f"mtrun-{name} plugin (./scripts/install.sh installs it). See `mtrun plugins`."
        )
    component = registry.get("data", name)
    write = getattr(component.cls, "write", None)
    if not callable(write):
        raise MtrunError(
            f"mtrun data {name}: the data source {name!r} of {component.plugin.describe()} "
            "cannot write its corpus to a folder (its class has no write(out_dir, *, force) method)"
        )
    return Path(write(out, force=force))


def _shard(args: argparse.Namespace) -> int:
    from mtrun.console import make_console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mtrun.data.sources.manifest import ManifestSource
    from mtrun.data.sources.shards import write_shards
    from mtrun.errors import MtrunError

    if args.shard_size <= 0:
        raise MtrunError(f"mtrun data shard: --shard-size must be positive (got {args.shard_size})")
    if not Path(args.manifest).is_file():
        raise MtrunError(f"mtrun data shard: MANIFEST {args.manifest} is not a file (expected a CSV, JSONL or Parquet manifest)")
    source = ManifestSource(ManifestSource.Config(path=args.manifest, audio_root=args.audio_root))
    splits = {split: source.load(split) for split in source.splits()}
    console = make_console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks = {split: bar.add_task(f"shard {split}", total=len(items)) for split, items in splits.items()}

        def advance(split: str, done: int) -> None:
            bar.update(tasks[split], completed=done)

        index = write_shards(splits, args.out, shard_size=args.shard_size, source=str(args.manifest), progress=advance, overwrite=args.force)
    out = Path(args.out)
    for split, entry in index["splits"].items():
        print(f"{split}: {entry['count']} items in {len(entry['shards'])} shard(s)")
    excluded = index["excluded"]
    if excluded:
        console.print(f"[yellow]excluded {len(excluded)} item(s) whose audio is unusable:[/yellow]")
        for record in excluded:
            console.print(f"  {escape(record['id'])}: {escape(record['reason'])}")
    print(f"wrote {out / 'index.json'}")
    return 0
