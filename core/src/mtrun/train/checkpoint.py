"""Step checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Layout of ``RUN/checkpoints/``::

    step-000120/            complete checkpoints (model, optimizer, scheduler, RNG, state,
    step-000123/            recipe, provenance, COMPLETE marker)
    step-000126.tmp-4711/   a write in progress (or killed); never read
    latest                  text: the folder name of the newest checkpoint
    best                    text: the folder name of the best checkpoint (never pruned)

A checkpoint is written into ``step-N.tmp-PID/``; every file is fsynced, the ``COMPLETE``
marker is written and fsynced last, the folder is renamed to ``step-N`` and only then is the
``latest`` pointer replaced (temp file + ``os.replace``). A folder counts as complete only
when it holds ``COMPLETE``. Rename atomicity alone would suffice on a local POSIX file system,
but not on some network and object-store mounts, nor for run folders copied by rsync or a
cloud sync that can stop half-way; the marker makes completeness checkable from the folder
itself. Nothing here unpickles: tensors are safetensors, the rest is JSON.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import shutil
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "complete",
    "find_latest",
    "flatten_state",
    "provenance",
    "read_checkpoint",
    "read_model_state",
    "resolve_resume",
    "unflatten_state",
    "write_checkpoint",
]

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------- file helpers


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors refuses views of shared storage (tied weights) and non-contiguous tensors;
    # an owned contiguous CPU copy of each tensor side-steps both, and loading copies the same
    # values back into every tied name.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
    _fsync_path(path)


def _replace_pointer(path: Path, value: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_text(tmp, value + "\n")
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _read_pointer(path: Path) -> str | None:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return value or None


# ------------------------------------------------------------------- nested state <-> files


def flatten_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested state (an optimizer's ``state_dict``) into JSON-able data and tensors.

    Tensors become ``{"__tensor__": key}`` references into the returned dict; dicts whose keys
    are not all strings (optimizer state is keyed by int) become ``{"__items__": [[k, v]]}``
    and tuples ``{"__tuple__": [...]}`` so :func:`unflatten_state` restores them exactly.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if torch.is_tensor(value):
            tensors[key] = value
            return {"__tensor__": key}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {k: walk(v, f"{key}.{k}" if key else k) for k, v in value.items()}
            return {"__items__": [[k, walk(v, f"{key}.{k}" if key else str(k))] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(value)]
        return value

    return walk(state, prefix), tensors


def unflatten_state(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(data, dict):
        if set(data) == {"__tensor__"}:
            return tensors[data["__tensor__"]]
        if set(data) == {"__items__"}:
            return {k: unflatten_state(v, tensors) for k, v in data["__items__"]}
        if set(data) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in data["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in data.items()}
    if isinstance(data, list):
        return [unflatten_state(v, tensors) for v in data]
    return data


# ------------------------------------------------------------------------------ provenance


@functools.lru_cache(maxsize=1)
def _static_provenance() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in ("torch", "mtrun", "numpy", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    plugins: dict[str, dict[str, str | None]] = {}
    for ep in metadata.entry_points(group="mtrun"):
        dist = getattr(ep, "dist", None)
        plugins[ep.name] = {
            "value": ep.value,
            "distribution": dist.name if dist is not None else None,
            "version": dist.version if dist is not None else None,
        }
    commit = None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=os.getcwd())
        if out.returncode == 0:
            commit = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"packages": versions, "plugins": plugins, "git_commit": commit, "hostname": socket.gethostname()}


def provenance() -> dict[str, Any]:
    """What produced a checkpoint: package and plugin versions, git commit, host, time."""
    info = dict(_static_provenance())
    info["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    return info


# ------------------------------------------------------------------------------ the folder


@attrs.define
class Checkpoint:
    """The contents of one checkpoint folder, as plain objects.

    Attributes:
        path: The folder.
        model: The system's state dict.
        optimizer: The optimizer's state dict (``None`` when nothing was trainable).
        scheduler: The scheduler's state dict.
        trainer_state: Step, epoch, position and best metric (see ``DefaultTrainer``).
        rng_tensors, rng_plain: Process RNG states of rank 0 (:mod:`mtrun.train.rng`).
    """

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    trainer_state: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    rng_plain: dict[str, Any]


def complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished checkpoint (it holds the ``COMPLETE`` marker)."""
    return (folder / COMPLETE).is_file()


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def write_checkpoint(
    folder: Path,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    scheduler_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    rng_tensors: dict[str, torch.Tensor],
    rng_plain: dict[str, Any],
    recipe: dict[str, Any],
) -> Path:
    """Write a checkpoint to ``folder`` atomically (via ``folder.tmp-PID`` and a rename).

    An existing ``folder`` (the same step written again after resuming from an older
    checkpoint) is replaced only after the new one is complete.
    """
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _write_tensors(tmp / "model.safetensors", model_state)
    if optimizer_state is not None:
        data, tensors = flatten_state(optimizer_state)
        _write_tensors(tmp / "optimizer.safetensors", tensors)
        _write_json(tmp / "optimizer.json", data)
    _write_json(tmp / "scheduler.json", scheduler_state)
    _write_tensors(tmp / "rng.safetensors", rng_tensors)
    _write_json(tmp / "trainer_state.json", {**trainer_state, "rng": rng_plain})
    try:
        import tomli_w

        _write_text(tmp / "recipe.toml", tomli_w.dumps(recipe))
    except (ImportError, TypeError, ValueError):
        _write_json(tmp / "recipe.json", recipe)
    _write_json(tmp / "provenance.json", provenance())
    _write_text(tmp / COMPLETE, "ok\n")
    _fsync_path(tmp)
    old = None
    if folder.exists():
        old = folder.with_name(f"{folder.name}.tmp-old-{os.getpid()}")
        os.rename(folder, old)
    os.rename(tmp, folder)
    _fsync_path(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def read_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """Only the system's state dict (for evaluation or export)."""
    return load_file(str(Path(folder) / "model.safetensors"))


def read_checkpoint(folder: Path) -> Checkpoint:
    """Read a complete checkpoint folder.

    Raises:
        FileNotFoundError: ``folder`` is missing or incomplete.
    """
    folder = Path(folder)
    if not complete(folder):
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {COMPLETE} marker)")
    optimizer = None
    if (folder / "optimizer.json").is_file():
        data = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
        optimizer = unflatten_state(data, load_file(str(folder / "optimizer.safetensors")))
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    rng_plain = state.pop("rng", {})
    return Checkpoint(
        path=folder,
        model=read_model_state(folder),
        optimizer=optimizer,
        scheduler=json.loads((folder / "scheduler.json").read_text(encoding="utf-8")),
        trainer_state=state,
        rng_tensors=load_file(str(folder / "rng.safetensors")),
        rng_plain=rng_plain,
    )


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """Complete ``step-N`` folders under ``root``, oldest first (``*.tmp-*`` never match)."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir() and complete(child):
                found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (a run's ``checkpoints/`` folder).

    Follows the ``latest`` pointer when it names a complete folder; otherwise (pointer
    missing, empty, or naming a folder that is gone or incomplete) falls back to the complete
    ``step-N`` folder with the largest N. ``*.tmp-*`` folders are never considered.
    """
    root = Path(root)
    name = _read_pointer(root / "latest")
    if name and _STEP_DIR.match(name) and complete(root / name):
        return root / name
    folders = _step_folders(root)
    return folders[-1][1] if folders else None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint folder a ``[run].resume`` value names.

    ``""`` → ``None`` (start fresh); ``"latest"`` → :func:`find_latest` of
    ``run_dir/checkpoints`` (``None`` when the run has none yet, so a job script can always
    pass ``latest``); anything else is a checkpoint folder path.

    Raises:
        FileNotFoundError: An explicit path that is not a complete checkpoint.
    """
    if not resume:
        return None
    if resume == "latest":
        return find_latest(Path(run_dir) / "checkpoints")
    folder = Path(resume)
    if not complete(folder):
        raise FileNotFoundError(f"resume = {resume!r}: not a complete checkpoint folder (missing or no {COMPLETE} marker)")
    return folder


class CheckpointManager:
    """Saves step checkpoints into ``root``, keeps the last ``keep_last`` plus the best.

    Only rank 0 should construct one for writing; reading helpers are module functions.
    """

    def __init__(self, root: Path, *, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = max(1, int(keep_last))

    def save(self, step: int, **contents: Any) -> Path:
        """Write ``step-N`` with :func:`write_checkpoint`, point ``latest`` at it, prune."""
        self.root.mkdir(parents=True, exist_ok=True)
        folder = write_checkpoint(self.root / step_dir_name(step), **contents)
        _replace_pointer(self.root / "latest", folder.name)
        self.prune()
        return folder

    def mark_best(self, folder: Path) -> None:
        """Point ``best`` at ``folder`` (a complete checkpoint under ``root``)."""
        _replace_pointer(self.root / "best", Path(folder).name)

    @property
    def best(self) -> Path | None:
        name = _read_pointer(self.root / "best")
        return self.root / name if name and complete(self.root / name) else None

    def prune(self) -> None:
        """Delete complete step folders beyond the newest ``keep_last`` (never the best or
        the one ``latest`` names), and temp folders that earlier, dead processes left."""
        keep = {p for _, p in _step_folders(self.root)[-self.keep_last :]}
        for pointer in ("best", "latest"):
            name = _read_pointer(self.root / pointer)
            if name:
                keep.add(self.root / name)
        for _, folder in _step_folders(self.root):
            if folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)
        own = f".tmp-{os.getpid()}"
        for child in self.root.iterdir():
            if ".tmp-" in child.name and child.is_dir() and not child.name.endswith(own):
                shutil.rmtree(child, ignore_errors=True)
