"""Step checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Layout of ``RUN/checkpoints/``::

    step-000120/            complete checkpoints (model, optimizer, scheduler, RNG, state,
    step-000123/            recipe, provenance, checksums.json, COMPLETE marker)
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

``checksums.json`` records the sha256 and size of every other file in the folder; it is written
just before ``COMPLETE``. Readers verify the files they load against it, because a file damaged
after the write (a flipped bit on disk, a bad copy) would otherwise be loaded without a word.
Checkpoints written before checksums existed have no such file and load unverified; every
reader still checks that the files each checkpoint needs are there (model, scheduler, RNG,
trainer state, and the optimizer's two files together or neither), so a deleted file is
reported by name, never read as "no optimizer state". ``--resume latest`` passes over a
``step-N`` folder without ``COMPLETE`` (mtrun never renames one into place, so it is a copy that
stopped half-way or a deleted marker) and says so, like a damaged one.

A write that fails (a full disk, a read-only or vanished folder) removes its temporary folder
and raises :class:`CheckpointWriteError` with the reason and the space the checkpoint needs;
the checkpoints written before it are untouched. Temporary folders left by processes that are
gone (killed mid-write) are removed when the next :class:`CheckpointManager` is created.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import attrs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtrun.errors import MtrunError, TrainingError

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "complete",
    "find_best",
    "find_latest",
    "flatten_state",
    "provenance",
    "read_checkpoint",
    "read_model_state",
    "resolve_resume",
    "unflatten_state",
    "verify_checkpoint",
    "write_checkpoint",
]

COMPLETE = "COMPLETE"
CHECKSUMS = "checksums.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^(step-\d+)\.tmp-(old-|gone-)?(\d+)$")
_TMP_POINTER = re.compile(r"^\.latest\.tmp-(\d+)$")
_CHUNK = 1 << 20
# Files every checkpoint holds (whatever its age); the optimizer's two files come as a pair.
_REQUIRED = ("model.safetensors", "scheduler.json", "rng.safetensors", "trainer_state.json")
_OPTIMIZER_PAIR = ("optimizer.json", "optimizer.safetensors")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- errors


class CorruptCheckpointError(MtrunError):
    """A checkpoint file does not match the checksum recorded when it was written.

    Attributes:
        folder: The checkpoint folder.
        file: The file's name inside it.
        problem: What is wrong, starting with the file's name.
    """

    def __init__(self, folder: Path, file: str, problem: str):
        self.folder = Path(folder)
        self.file = file
        self.problem = problem
        super().__init__(f"checkpoint {self.folder}: {problem}")


class CheckpointWriteError(TrainingError):
    """Writing a checkpoint failed (full disk, read-only or vanished folder, no permission).

    The partial temporary folder has been removed; earlier checkpoints are untouched.

    Attributes:
        folder: The checkpoint folder that was being written.
        reason: The operating system's reason (``"No space left on device"``).
        needed: Bytes the checkpoint needs (its tensors; the JSON files are small).
        free: Bytes free on that file system after the failure (``None`` if unknown).
    """

    def __init__(self, message: str, *, folder: Path, reason: str, needed: int, free: int | None):
        self.folder, self.reason, self.needed, self.free = Path(folder), reason, needed, free
        super().__init__(message)


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


def _sha256(path: Path) -> tuple[str, int]:
    """The file's sha256 (hex) and size, read in 1 MiB chunks into one reused buffer."""
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def _tensor_bytes(*groups: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for group in groups for t in group.values())


def _human(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _reason(exc: BaseException) -> str:
    """The operating system's words for a failed write (safetensors wraps them in its own
    error: ``IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })``)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    match = re.search(r'message: "([^"]+)"', str(exc))
    return match.group(1) if match else str(exc)


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
    opt_data, opt_tensors = flatten_state(optimizer_state) if optimizer_state is not None else (None, {})
    needed = _tensor_bytes(model_state, opt_tensors, rng_tensors)
    old = None
    current = tmp.name
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        current = "model.safetensors"
        _write_tensors(tmp / current, model_state)
        if optimizer_state is not None:
            current = "optimizer.safetensors"
            _write_tensors(tmp / current, opt_tensors)
            current = "optimizer.json"
            _write_json(tmp / current, opt_data)
        current = "scheduler.json"
        _write_json(tmp / current, scheduler_state)
        current = "rng.safetensors"
        _write_tensors(tmp / current, rng_tensors)
        current = "trainer_state.json"
        _write_json(tmp / current, {**trainer_state, "rng": rng_plain})
        try:
            import tomli_w

            current = "recipe.toml"
            _write_text(tmp / current, tomli_w.dumps(recipe))
        except (ImportError, TypeError, ValueError):
            (tmp / "recipe.toml").unlink(missing_ok=True)
            current = "recipe.json"
            _write_json(tmp / current, recipe)
        current = "provenance.json"
        _write_json(tmp / current, provenance())
        current = CHECKSUMS
        files = {}
        for path in sorted(tmp.iterdir()):
            digest, size = _sha256(path)
            files[path.name] = {"sha256": digest, "bytes": size}
        _write_json(tmp / CHECKSUMS, {"algorithm": "sha256", "files": files})
        current = COMPLETE
        _write_text(tmp / COMPLETE, "ok\n")
        _fsync_path(tmp)
        current = f"the rename of {tmp.name} to {folder.name}"
        if folder.exists():
            old = folder.with_name(f"{folder.name}.tmp-old-{os.getpid()}")
            os.rename(folder, old)
        os.rename(tmp, folder)
        _fsync_path(folder.parent)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not folder.exists():
            try:  # put the checkpoint that was being replaced back in place
                os.rename(old, folder)
            except OSError:
                pass
        reason, free = _reason(exc), _free_bytes(folder.parent)
        during = current if current.startswith("the ") else f"writing {current}"
        raise CheckpointWriteError(
            f"could not write checkpoint {folder}: {reason} (during {during}). "
            f"It needs about {_human(needed)}; {_human(free)} free on the file system of {folder.parent}. "
            f"The partial folder {tmp.name} was removed; the checkpoints written before it are untouched.",
            folder=folder,
            reason=reason,
            needed=needed,
            free=free,
        ) from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _recorded_checksums(folder: Path) -> dict[str, dict[str, Any]] | None:
    """``checksums.json``'s ``files`` table; ``None`` for a checkpoint written before checksums.

    Raises:
        CorruptCheckpointError: The file exists but cannot be read as a checksum table.
    """
    path = folder / CHECKSUMS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("not a sha256 table")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(folder, CHECKSUMS, f"{CHECKSUMS} is damaged and cannot be read ({exc})") from None
    return files


def _check_present(folder: Path, names: Any = None) -> None:
    """Raise :class:`CorruptCheckpointError` for a file every checkpoint needs that is missing
    (of ``names`` only, when given), or for one of the optimizer's two files without the other."""
    required = [n for n in _REQUIRED if names is None or n in names]
    for name in required:
        if not (folder / name).is_file():
            raise CorruptCheckpointError(folder, name, f"{name} is missing (every checkpoint holds one)")
    present = [n for n in _OPTIMIZER_PAIR if (folder / n).is_file()]
    if len(present) == 1 and (names is None or any(n in names for n in _OPTIMIZER_PAIR)):
        absent = next(n for n in _OPTIMIZER_PAIR if n not in present)
        raise CorruptCheckpointError(folder, absent, f"{absent} is missing (the checkpoint holds {present[0]}, written with it)")


def verify_checkpoint(folder: Path, names: Any = None) -> bool:
    """Check the files of a checkpoint against the checksums recorded when it was written.

    Args:
        folder: A checkpoint folder.
        names: The files to check (those a reader is about to load); default: every recorded
            file. Names the checkpoint did not record are skipped.

    Returns:
        ``True`` when the files were verified, ``False`` for a checkpoint written before
        checksums existed (nothing to verify).

    Raises:
        CorruptCheckpointError: A file is missing (one the checksums list, or one every
            checkpoint holds), or its size or sha256 differs from the recorded one.
    """
    folder = Path(folder)
    recorded = _recorded_checksums(folder)
    _check_present(folder, names)
    if recorded is None:
        return False
    for name in sorted(recorded) if names is None else names:
        expected = recorded.get(name)
        if expected is None:
            continue
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpointError(folder, name, f"{name} is missing (it is listed in {CHECKSUMS})")
        size = path.stat().st_size
        if size != expected.get("bytes", size):
            raise CorruptCheckpointError(
                folder, name, f"{name} does not match its recorded checksum ({size} bytes on disk, {expected['bytes']} written)"
            )
        digest, _ = _sha256(path)
        if digest != expected.get("sha256"):
            raise CorruptCheckpointError(
                folder,
                name,
                f"{name} does not match its recorded checksum (sha256 {digest[:12]}…, written as {str(expected.get('sha256'))[:12]}…)",
            )
    return True


def read_model_state(folder: Path, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """Only the system's state dict (for evaluation or export).

    Raises:
        CorruptCheckpointError: ``model.safetensors`` does not match its recorded checksum
            (skipped with ``verify=False``, when the caller has just verified the folder).
    """
    if verify:
        verify_checkpoint(Path(folder), ["model.safetensors"])
    return load_file(str(Path(folder) / "model.safetensors"))


def read_checkpoint(folder: Path, *, verify: bool = True) -> Checkpoint:
    """Read a complete checkpoint folder.

    Raises:
        FileNotFoundError: ``folder`` is missing or incomplete.
        CorruptCheckpointError: A file does not match its recorded checksum (skipped with
            ``verify=False``, when the caller has just verified the folder).
    """
    folder = Path(folder)
    if not complete(folder):
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {COMPLETE} marker)")
    if verify:
        verify_checkpoint(folder)
    else:
        _check_present(folder)  # cheap: a deleted optimizer file is never read as "no optimizer"
    optimizer = None
    if (folder / "optimizer.json").is_file():
        data = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
        optimizer = unflatten_state(data, load_file(str(folder / "optimizer.safetensors")))
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    rng_plain = state.pop("rng", {})
    return Checkpoint(
        path=folder,
        model=read_model_state(folder, verify=False),
        optimizer=optimizer,
        scheduler=json.loads((folder / "scheduler.json").read_text(encoding="utf-8")),
        trainer_state=state,
        rng_tensors=load_file(str(folder / "rng.safetensors")),
        rng_plain=rng_plain,
    )


def _step_folders(root: Path, *, require_complete: bool = True) -> list[tuple[int, Path]]:
    """``step-N`` folders under ``root`` (complete ones only, by default), oldest first
    (``*.tmp-*`` never match)."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir() and (complete(child) or not require_complete):
                found.append((int(match.group(1)), child))
    return sorted(found)


def find_best(root: Path) -> Path | None:
    """The complete checkpoint the ``best`` pointer names, or ``None``. Reads only: readers
    (``mtrun eval``, the end-of-run report) must not construct a :class:`CheckpointManager`,
    which cleans the folder of other processes' partial writes."""
    name = _read_pointer(Path(root) / "best")
    return Path(root) / name if name and complete(Path(root) / name) else None


def _resume_candidates(root: Path) -> list[Path]:
    """``step-N`` folders that ``--resume latest`` tries, newest first, complete or not: from the
    one ``latest`` names (or the largest N when it names no folder) down, never past the pointer."""
    every = _step_folders(root, require_complete=False)
    if not every:
        return []
    name = _read_pointer(root / "latest")
    first = every[-1][0]
    if name and _STEP_DIR.match(name) and (root / name).is_dir():
        first = int(_STEP_DIR.match(name).group(1))
    return [p for n, p in reversed(every) if n <= first]


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


def resolve_resume(resume: str, run_dir: Path, *, say: Callable[[str], None] | None = _say) -> Path | None:
    """The checkpoint folder a ``[run].resume`` value names, verified against its checksums.

    ``""`` → ``None`` (start fresh); ``"latest"`` → :func:`find_latest` of
    ``run_dir/checkpoints`` (``None`` when the run has none yet, so a job script can always
    pass ``latest``); anything else is a checkpoint folder path.

    With ``"latest"``, a checkpoint that lacks its ``COMPLETE`` marker or a file, or whose files
    do not match their recorded checksums, is passed over for the next older one; ``say`` is
    told which file of which checkpoint failed and which checkpoint is used instead.

    Raises:
        FileNotFoundError: An explicit path that is not a complete checkpoint.
        CorruptCheckpointError: An explicit path whose files do not match their checksums.
        TrainingError: ``"latest"``, and no ``step-N`` folder is an intact checkpoint (never a
            silent fresh start over a damaged run).
    """
    if not resume:
        return None
    if resume == "latest":
        root = Path(run_dir) / "checkpoints"
        candidates = _resume_candidates(root)
        if not candidates:
            return None
        failures: list[CorruptCheckpointError] = []
        for candidate in candidates:
            try:
                if not complete(candidate):
                    raise CorruptCheckpointError(
                        candidate,
                        COMPLETE,
                        f"it has no {COMPLETE} marker (mtrun renames a checkpoint into place only after "
                        "writing it, so the folder was copied in part or the marker deleted)",
                    )
                verify_checkpoint(candidate)
            except CorruptCheckpointError as exc:
                failures.append(exc)
                continue
            if failures and say is not None:
                for exc in failures:
                    say(f"WARNING: {exc}; not resuming from it")
                say(f"resuming from the previous intact checkpoint, {candidate}, instead")
            return candidate
        problems = "\n".join(f"  - {exc}" for exc in failures)
        raise TrainingError(
            f"resume = 'latest': no checkpoint in {root} is intact:\n{problems}\n"
            "Their files changed, went missing or were never completed after they were written (disk "
            "or copy damage). Move the damaged folders away and run again to start fresh, or set "
            "[run].resume to a checkpoint you trust."
        )
    folder = Path(resume).expanduser()
    if not complete(folder):
        import difflib

        why = "no such folder" if not folder.exists() else f"not a complete checkpoint folder (no {COMPLETE} marker)"
        hint = "; did you mean 'latest'?" if difflib.get_close_matches(resume, ["latest"], cutoff=0.6) else ""
        raise FileNotFoundError(f"resume = {resume!r}: {why}{hint} ('latest' continues the run folder's newest checkpoint; "
                                "'' starts fresh)")
    verify_checkpoint(folder)
    return folder


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs here. This process counts as gone: no write of its own
    is in flight while a manager is being created, and a container restart reuses its pid."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but belongs to someone else
        return False
    return False


class CheckpointManager:
    """Saves step checkpoints into ``root``, keeps the last ``keep_last`` plus the best.

    Only rank 0 should construct one for writing; reading helpers are module functions.
    Creating one removes the temporary folders (``step-N.tmp-PID``) that processes which are
    gone left in ``root``, and tells ``say`` about each.
    """

    def __init__(self, root: Path, *, keep_last: int = 3, say: Callable[[str], None] | None = _say):
        self.root = Path(root)
        self.keep_last = max(1, int(keep_last))
        self._say = say
        self.clean_stale()

    def clean_stale(self) -> list[Path]:
        """Remove temporary folders (and ``latest`` pointer temp files) whose writing process is
        gone; return what was removed.

        A ``step-N.tmp-old-PID`` folder is the complete checkpoint a rewrite of ``step-N`` had
        moved aside; when ``step-N`` itself is missing it is moved back instead.
        """
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for child in sorted(self.root.iterdir()):
            pointer = _TMP_POINTER.match(child.name)
            if pointer and child.is_file() and _process_gone(int(pointer.group(1))):
                # A ``latest`` pointer update killed between its write and its rename.
                child.unlink(missing_ok=True)
                removed.append(child)
                continue
            match = _TMP_DIR.match(child.name)
            if not match or not child.is_dir() or not _process_gone(int(match.group(3))):
                continue
            target = self.root / match.group(1)
            if match.group(2) == "old-" and complete(child) and not target.exists():
                try:
                    os.rename(child, target)
                except OSError:
                    continue
                self._tell(f"restored {target} from {child.name}, left by process {match.group(3)} (gone) mid-rewrite")
                continue
            shutil.rmtree(child, ignore_errors=True)
            if not child.exists():
                removed.append(child)
                self._tell(f"removed {child}: a partial checkpoint left by process {match.group(3)}, which is gone")
        return removed

    def _tell(self, text: str) -> None:
        if self._say is not None:
            self._say(text)

    def save(self, step: int, **contents: Any) -> Path:
        """Write ``step-N`` with :func:`write_checkpoint`, point ``latest`` at it, prune.

        Raises:
            CheckpointWriteError: The folder or the ``latest`` pointer could not be written.
        """
        folder = self.root / step_dir_name(step)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointWriteError(
                f"could not write checkpoint {folder}: cannot create {self.root}: {_reason(exc)}",
                folder=folder,
                reason=_reason(exc),
                needed=0,
                free=_free_bytes(self.root),
            ) from exc
        folder = write_checkpoint(folder, **contents)
        try:
            _replace_pointer(self.root / "latest", folder.name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                (self.root / f".latest.tmp-{os.getpid()}").unlink(missing_ok=True)
            raise CheckpointWriteError(
                f"checkpoint {folder} was written, but {self.root / 'latest'} could not be updated to name it: "
                f"{_reason(exc)}; {_human(_free_bytes(self.root))} free there",
                folder=folder,
                reason=_reason(exc),
                needed=0,
                free=_free_bytes(self.root),
            ) from exc
        self.prune()
        return folder

    def mark_best(self, folder: Path) -> None:
        """Point ``best`` at ``folder`` (a complete checkpoint under ``root``)."""
        _replace_pointer(self.root / "best", Path(folder).name)

    @property
    def best(self) -> Path | None:
        return find_best(self.root)

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
                # Renamed out of the step-N namespace first: a kill mid-delete then leaves a
                # temporary folder (cleaned at the next start), never a step folder that still
                # has its COMPLETE marker but lacks files.
                gone = folder.with_name(f"{folder.name}.tmp-gone-{os.getpid()}")
                try:
                    os.rename(folder, gone)
                    _fsync_path(self.root)
                except OSError:
                    continue
                shutil.rmtree(gone, ignore_errors=True)
        self.clean_stale()
