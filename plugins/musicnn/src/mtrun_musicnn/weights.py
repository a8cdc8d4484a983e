"""Finding and loading musicnn's published TensorFlow checkpoints.

The ``musicnn`` wheel (0.1.0, ISC licence) ships its trained models as TensorFlow checkpoints in
``musicnn/MTT_musicnn/`` and ``musicnn/MSD_musicnn/`` (prefix ``folder/``: files ``.index`` and
``.data-00000-of-00001``). Install it with ``pip install --no-deps musicnn==0.1.0``: its declared
TensorFlow and librosa requirements are not needed to read the files, and importing ``musicnn``
may import TensorFlow, so the folder is found with ``importlib.util.find_spec`` instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from mtrun import LoadReport, MtrunError, load_matching
from mtrun_musicnn.network import TF_EXCLUDED, MusicnnNet, tf_to_torch
from mtrun_musicnn.tf_checkpoint import checkpoint_prefix, read_checkpoint

__all__ = ["MSD_TAGS", "MTT_TAGS", "PUBLISHED", "load_tf_weights", "musicnn_folder", "resolve_weights", "tags_for"]

PUBLISHED = ("MTT_musicnn", "MSD_musicnn")
"""The musicnn models in the wheel that this port runs (the VGG baselines are other networks)."""

MTT_TAGS: tuple[str, ...] = (
    # musicnn/configuration.py MTT_LABELS: the 50 most frequent MagnaTagATune tags, model order
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast", "piano",
    "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male", "singing",
    "vocals", "no vocals", "harpsichord", "loud", "quiet", "flute", "woman", "male vocal", "no vocal", "pop",
    "soft", "sitar", "solo", "man", "classic", "choir", "voice", "new age", "dance", "male voice",
    "female vocal", "beats", "harp", "cello", "no voice", "weird", "country", "metal", "female voice", "choral",
)  # fmt: skip

MSD_TAGS: tuple[str, ...] = (
    # musicnn/configuration.py MSD_LABELS: the 50 most frequent Last.fm tags of the Million Song Dataset
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s", "alternative rock", "jazz",
    "beautiful", "metal", "chillout", "male vocalists", "classic rock", "soul", "indie rock", "Mellow", "electronica", "80s",
    "folk", "90s", "chill", "instrumental", "punk", "oldies", "blues", "hard rock", "ambient", "acoustic",
    "experimental", "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country", "easy listening", "sexy", "catchy",
    "funk", "electro", "heavy metal", "Progressive rock", "60s", "rnb", "indie pop", "sad", "House", "happy",
)  # fmt: skip

_INSTALL = "pip install --no-deps musicnn==0.1.0"


def musicnn_folder() -> Path:
    """The installed ``musicnn`` package folder, found without importing it.

    Raises:
        MtrunError: The package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec("musicnn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MtrunError(f"the musicnn package (which ships the weights) is not installed; install it with `{_INSTALL}`")
    return Path(locations[0])


def resolve_weights(weights: str) -> str:
    """The checkpoint prefix for a ``weights`` setting: a published model's name or a path."""
    if weights in PUBLISHED:
        folder = musicnn_folder() / weights
        if not (folder / ".index").is_file():
            raise MtrunError(f"weights={weights!r}: {folder} holds no checkpoint; reinstall with `{_INSTALL}`")
        return str(folder) + "/"
    if not Path(weights).expanduser().exists() and not Path(weights + ".index").expanduser().is_file():
        raise MtrunError(f"weights={weights!r}: neither {', '.join(PUBLISHED)} nor an existing checkpoint path")
    return checkpoint_prefix(weights)


def tags_for(weights: str, classes: int) -> tuple[str, ...]:
    """Tag names of a model's outputs, ``tag_0``, ``tag_1``, ... unless known.

    As ``musicnn.extractor`` does, a model is an MTT or MSD one by its name: the innermost
    part of the ``weights`` path that contains ``MTT`` or ``MSD`` decides.
    """
    for part in reversed(Path(weights).parts if weights else ()):
        for key, tags in (("MTT", MTT_TAGS), ("MSD", MSD_TAGS)):
            if key in part and len(tags) == classes:
                return tags
    return tuple(f"tag_{i}" for i in range(classes))


def load_tf_weights(net: MusicnnNet, weights: str) -> LoadReport:
    """Load a musicnn TensorFlow checkpoint into ``net``, every variable accounted for.

    Every checkpoint variable must map to a parameter or buffer of ``net``
    (:data:`~mtrun_musicnn.network.TF_LAYERS`) or be optimizer state
    (:data:`~mtrun_musicnn.network.TF_EXCLUDED`, reported as ignored); every parameter and
    batch-norm statistic of ``net`` must come from the checkpoint. Only PyTorch's
    ``num_batches_tracked`` counters, which TensorFlow has no counterpart of, keep their value.

    Raises:
        MtrunError: Missing, unexpected or mis-shaped variables, listed; ``net`` is unchanged.
    """
    prefix = resolve_weights(weights)
    state = dict(tf_to_torch(name, torch.from_numpy(value)) for name, value in read_checkpoint(prefix).items())
    counters = [k for k in net.state_dict() if k.endswith("num_batches_tracked")]
    return load_matching(
        net,
        state,
        ignore=TF_EXCLUDED,
        optional=counters,
        what=f"weights={weights!r}",
        hint=" (a musicnn checkpoint of another size? check the preset)",
    )
