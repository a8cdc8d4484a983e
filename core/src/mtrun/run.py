"""The ``[run]`` and ``[loader]`` tables, and the run a trainer works in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from mtrun.devices import DEVICE_NAMES, check_device_name

__all__ = ["LoaderConfig", "Run", "RunConfig"]


def _check_run_name(name: str) -> None:
    """A run folder under OUTPUT_DIR: '' or '.' would write the run's files into OUTPUT_DIR itself."""
    text = str(name)
    if not text.strip() or Path(text).is_absolute() or any(part in ("", ".", "..") for part in text.strip("/").split("/")):
        raise ValueError(f"{name!r} is not a run name: it must name a folder under output_dir (e.g. 'flap-seed1')")


@attrs.frozen
class RunConfig:
    """The ``[run]`` table: what this run is called, its seed and where it writes."""

    name: str = attrs.field(default="run", validator=lambda _i, _a, value: _check_run_name(value),
                            metadata={"help": "run name; the run folder is OUTPUT_DIR/NAME"})
    seed: int = attrs.field(default=0, metadata={"help": "seed for parameters, data order and augmentation"})
    output_dir: str = attrs.field(default="runs", metadata={"help": "parent folder of run folders (relative to the working directory)"})
    resume: str = attrs.field(
        default="",
        metadata={"help": "'' starts fresh, 'latest' continues from the run folder's latest checkpoint, or a checkpoint path"},
    )
    device: str = attrs.field(default="auto", validator=lambda _i, _a, value: check_device_name(value), metadata={"help": DEVICE_NAMES})
    threads: int = attrs.field(
        default=0,
        validator=attrs.validators.ge(0),
        metadata={"help": "CPU threads for PyTorch's operators (torch.set_num_threads); 0 = auto: the cores this process "
                  "may use (affinity, cgroup quota) shared among the local ranks, minus [loader].num_workers, at least 1 "
                  "(docs/performance.md); OMP_NUM_THREADS, when set, wins over auto"},
    )
    encoder_cache: str = attrs.field(
        default="off",
        validator=attrs.validators.in_(("off", "memory", "disk")),
        metadata={"help": "reuse what frozen encoders (or their frozen backbones) compute: each input's output is computed "
                  "once, then served from memory or (disk) $MTRUN_CACHE/encoders; losses are unchanged. Pays only when "
                  "inputs repeat: [loader].crop = 'start' or 'center', not 'random' (docs/performance.md)"},
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
    num_workers: int = attrs.field(default=0, validator=attrs.validators.ge(0), metadata={"help": "DataLoader worker processes"})
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
    cache: str = attrs.field(
        default="off",
        validator=attrs.validators.in_(("features", "waveforms", "off")),
        metadata={"help": "waveforms: decode, check, mix to mono and resample every file once, before the first "
                  "step, into one .npy per file under $MTRUN_CACHE/waveforms (reused by later runs; each crop "
                  "reads only its own samples); features: the same, then the audio encoder's features of each whole "
                  "file into $MTRUN_CACHE/features at feature_phases starting points per hop, cropped in frame space "
                  "(needs an encoder that declares frame_features, e.g. mavil, and no waveform augmenter); off: decode "
                  "on every use (see read)"},
    )
    feature_phases: int = attrs.field(
        default=4,
        validator=attrs.validators.ge(1),
        metadata={"help": "with cache = 'features': each file's features are computed this many times, each copy "
                  "started hop / feature_phases samples later, so crops start every 2.5 ms (MAViL, 4) instead of every "
                  "10 ms; 1 (the 10 ms grid alone) cost the quickstart 8.6 points of test R@10 against waveforms (3 seeds), "
                  "4 cost it 3.8 (6 seeds). Each phase adds one copy of the corpus' features to the cache's build time "
                  "and disk"},
    )
    read: str = attrs.field(
        default="whole",
        validator=attrs.validators.in_(("whole", "span")),
        metadata={"help": "how audio that is not cached is read on each use: whole (decode and check the whole "
                  "file, then crop) or span (decode only the crop; damage outside it goes unseen, and a silent "
                  "crop is checked against the whole file)"},
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
