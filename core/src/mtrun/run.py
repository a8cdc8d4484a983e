"""The ``[run]`` and ``[loader]`` tables, and the run a trainer works in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

__all__ = ["LoaderConfig", "Run", "RunConfig"]


@attrs.frozen
class RunConfig:
    """The ``[run]`` table: what this run is called, its seed and where it writes."""

    name: str = attrs.field(default="run", metadata={"help": "run name; the run folder is OUTPUT_DIR/NAME"})
    seed: int = attrs.field(default=0, metadata={"help": "seed for parameters, data order and augmentation"})
    output_dir: str = attrs.field(default="runs", metadata={"help": "parent folder of run folders (relative to the working directory)"})
    resume: str = attrs.field(
        default="",
        metadata={"help": "'' starts fresh, 'latest' continues from the run folder's latest checkpoint, or a checkpoint path"},
    )
    device: str = attrs.field(default="auto", metadata={"help": "'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'"})
    threads: int = attrs.field(
        default=0,
        validator=attrs.validators.ge(0),
        metadata={"help": "CPU threads for PyTorch's operators (torch.set_num_threads); 0 = PyTorch's default, one per core. "
                  "1 is faster for tiny models on a small machine other jobs share"},
    )


@attrs.frozen
class LoaderConfig:
    """The ``[loader]`` table: how samples become batches."""

    clip_seconds: float = attrs.field(default=10.0, metadata={"help": "length of each training clip in seconds"})
    crop: str = attrs.field(
        default="random",
        validator=attrs.validators.in_(("random", "center", "start")),
        metadata={"help": "how longer audio is cut to clip_seconds in training: random, center or start"},
    )
    num_workers: int = attrs.field(default=0, metadata={"help": "DataLoader worker processes"})
    pad: str = attrs.field(
        default="repeat",
        validator=attrs.validators.in_(("repeat", "zero")),
        metadata={"help": "how shorter audio is filled to clip_seconds: repeat (tile it, no silent tail) or zero"},
    )
    max_bad_fraction: float = attrs.field(
        default=0.05,
        validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)],
        metadata={"help": "stop with an error when more than this fraction of a split's files is broken "
                  "(missing, truncated, silent, ...); fewer are skipped and listed in RUN_DIR/skipped.jsonl"},
    )
    probe_items: int = attrs.field(
        default=64,
        validator=attrs.validators.ge(0),
        metadata={"help": "items decoded at start (a seeded random subset) to catch a mostly broken dataset "
                  "early, e.g. a wrong audio_root; 0 turns the probe off"},
    )


@attrs.frozen
class Run:
    """A run folder and the recipe that made it; handed to the trainer by injection.

    Attributes:
        dir: The run folder (checkpoints, metrics, the resolved recipe).
        config: The ``[run]`` table.
        loader: The ``[loader]`` table.
        recipe: The fully resolved recipe as plain TOML data.
        recipe_path: The file the recipe was read from, for messages.
    """

    dir: Path
    config: RunConfig
    loader: LoaderConfig
    recipe: dict[str, Any]
    recipe_path: str = "<recipe>"
