"""Reading checkpoint state dicts safely and loading them into a module key for key.

For plugins that load pretrained weights by hand (renamed keys, foreign checkpoints): read the
tensors without running pickled code, then load them with every module key accounted for, and
report every problem at once as an :class:`~mtrun.errors.MtrunError`. Nothing here needs
transformers or the model hub.

Example::

    from mtrun.weights import load_matching, read_state_dict, strip_prefixes

    state = strip_prefixes(read_state_dict("pretrained.pth"), ("module.",))
    report = load_matching(model, state, ignore=[r"decoder\\.", r"head\\."], what="my-plugin: pretrained.pth")
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import attrs
import torch

from mtrun.errors import MtrunError

__all__ = ["WRAPPER_KEYS", "LoadReport", "load_matching", "read_json", "read_state_dict", "strip_prefixes"]

#: Keys under which training scripts nest the weights ({"model": state, "epoch": ...}).
WRAPPER_KEYS = ("model", "state_dict", "module")

# save_pretrained layouts: (index of the shards, the single file).
_FOLDER_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))

Patterns = Union[str, "re.Pattern[str]", Iterable[Union[str, "re.Pattern[str]"]]]


@attrs.frozen
class LoadReport:
    """What :func:`load_matching` did (it raises instead of loading a partial match).

    Attributes:
        matched: Module keys loaded from the checkpoint.
        ignored: Checkpoint keys skipped as not part of the module (checkpoint names, sorted).
        renamed: ``(checkpoint key, module key)`` pairs that ``rename`` changed.
        kept: Optional module keys the checkpoint lacks; they keep their current values.
    """

    matched: int
    ignored: tuple[str, ...] = ()
    renamed: tuple[tuple[str, str], ...] = ()
    kept: tuple[str, ...] = ()


def _label(what: str) -> str:
    return f"{what}: " if what else ""


def _read_file(path: Path, what: str) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report what the user can act on
        raise MtrunError(
            f"{_label(what)}cannot read {str(path)!r} with torch.load(weights_only=True) ({type(exc).__name__}: {exc}). "
            "Files that pickle arbitrary objects are refused; re-save the state dict with torch.save(model.state_dict()) or safetensors"
        ) from exc


def _folder_files(folder: Path, what: str) -> list[Path]:
    for index_name, single in _FOLDER_LAYOUTS:
        index = folder / index_name
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [single]
        if all((folder / name).is_file() for name in names):
            return [folder / name for name in names]
    raise MtrunError(f"{_label(what)}{folder}: no model.safetensors or pytorch_model.bin found")


def read_state_dict(path: str | Path, *, what: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file or ``save_pretrained`` folder, never unpickling code.

    Args:
        path: A file (``.safetensors`` by safetensors, anything else by
            ``torch.load(weights_only=True)``) or a folder holding ``model.safetensors`` or
            ``pytorch_model.bin``, single or sharded (``*.index.json``).
        what: Prefix of error messages (e.g. the plugin's name).

    A file that nests its weights under one of :data:`WRAPPER_KEYS` is unwrapped. Key names are
    returned as stored (see :func:`strip_prefixes`).

    Raises:
        MtrunError: The file is unreadable or unsafe, the folder holds no weights, or the
            result is not a mapping of names to tensors.
    """
    path = Path(path).expanduser()
    files = _folder_files(path, what) if path.is_dir() else [path]
    state: Any = {}
    for file in files:
        if not file.is_file():
            raise MtrunError(f"{_label(what)}{str(file)!r}: no such checkpoint file")
        blob = _read_file(file, what)
        for key in WRAPPER_KEYS:
            if isinstance(blob, dict) and isinstance(blob.get(key), dict):
                blob = blob[key]
                break
        if not isinstance(blob, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in blob.items()):
            raise MtrunError(
                f"{_label(what)}{str(file)!r} does not hold a state dict of tensors "
                f"(at the top level or under {' / '.join(map(repr, WRAPPER_KEYS))})"
            )
        state.update(blob)
    return state


def read_json(path: str | Path, *, what: str = "") -> dict[str, Any]:
    """A checkpoint folder's JSON settings file (``config.json``, ``preprocessor_config.json``).

    Raises:
        MtrunError: The file is unreadable, not JSON, or not a JSON object; names ``what``.
    """
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MtrunError(f"{_label(what)}{path} is not a readable JSON file ({exc})") from None
    if not isinstance(value, dict):
        raise MtrunError(f"{_label(what)}{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def strip_prefixes(state: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
    """``state`` with any of ``prefixes`` removed from the start of each key, repeatedly
    (``module.model.x`` -> ``x`` for ``("module.", "model.")``).

    Raises:
        MtrunError: Two keys become one.
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = key
        while True:
            prefix = next((p for p in prefixes if p and new.startswith(p)), None)
            if prefix is None:
                break
            new = new[len(prefix) :]
        if new in out:
            raise MtrunError(f"stripping {list(prefixes)} from the checkpoint's keys makes two of them {new!r}")
        out[new] = value
    return out


def _compile(patterns: Patterns) -> list[re.Pattern[str]]:
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    return [p if isinstance(p, re.Pattern) else re.compile(p) for p in patterns]


def _listing(label: str, items: list[str], limit: int = 20) -> str:
    if not items:
        return ""
    shown = "".join(f"\n    {k}" for k in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {label} ({len(items)}):{shown}{more}"


def load_matching(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    ignore: Patterns = (),
    rename: Mapping[str, str] | Callable[[str], str] | None = None,
    optional: Iterable[str] = (),
    what: str = "checkpoint",
    hint: str = "",
) -> LoadReport:
    """Load ``state`` into ``module`` with every key and shape matched, or raise listing all.

    Args:
        module: The module to load into.
        state: Checkpoint tensors by name.
        ignore: Regular expressions (matched at the start of a checkpoint key, ``re.match``; end
            one with ``$`` to match whole keys only) for checkpoint keys that are not part of
            the module: they are skipped and reported, unless they name a module key.
        rename: Checkpoint key -> module key, as a mapping (keys absent are kept) or a function.
        optional: Module keys the checkpoint may lack; they keep their current values.
        what: What is loaded, the start of the error message (e.g. ``pretrained='...'``).
        hint: Appended to the first line of the error (e.g. which setting to check).

    Raises:
        MtrunError: Module keys missing from the checkpoint, checkpoint keys the module does
            not have, or shape mismatches, each listed; the module is left unchanged.
    """
    patterns = _compile(ignore)
    target = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    renamed: list[tuple[str, str]] = []
    doubled: list[str] = []
    for key, value in state.items():
        new = rename(key) if callable(rename) else (rename or {}).get(key, key)
        if new not in target and any(p.match(key) for p in patterns):
            ignored.append(key)
            continue
        if new != key:
            renamed.append((key, new))
        if new in mapped:
            doubled.append(new)
        mapped[new] = value
    optional = set(optional)
    absent = sorted(set(target) - set(mapped))
    missing = [k for k in absent if k not in optional]
    unexpected = sorted(set(mapped) - set(target))
    shapes = [
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(set(mapped) & set(target))
        if tuple(mapped[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or shapes or doubled:
        raise MtrunError(
            f"{what}: the checkpoint does not match the model{hint}"
            + _listing("missing from the checkpoint", missing)
            + _listing("unexpected in the checkpoint", unexpected)
            + _listing("shape mismatches", shapes)
            + _listing("module keys given twice (after renaming)", sorted(set(doubled)))
        )
    module.load_state_dict({k: mapped.get(k, v) for k, v in target.items()}, strict=True)
    kept = tuple(k for k in absent if k in optional)
    return LoadReport(matched=len(target) - len(kept), ignored=tuple(sorted(ignored)), renamed=tuple(renamed), kept=kept)
