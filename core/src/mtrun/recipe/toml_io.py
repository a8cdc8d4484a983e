"""Reading and writing TOML, with errors that name the file and the line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mtrun.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["TOMLDecodeError", "dump_recipe", "parse_value", "read_toml"]

TOMLDecodeError = tomllib.TOMLDecodeError


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse one TOML file.

    Raises:
        RecipeError: The file is missing, unreadable, or not valid TOML. The problem carries
            tomllib's "(at line L, column C)" so the user can jump to the mistake.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(str(path), [f"no such file: {path}"]) from None
    except IsADirectoryError:
        raise RecipeError(str(path), [f"{path} is a directory, not a TOML recipe"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(str(path), [f"cannot read the file: {exc}"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(str(path), [f"TOML syntax error: {exc}"]) from None


def parse_value(text: str) -> Any:
    """Parse the right-hand side of a ``key=value`` override as a TOML value.

    Anything that is not valid TOML is taken as a bare string, so ``run.name=my-run`` works
    without shell-quoting the quotes (``run.name='"my-run"'``).
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def dump_recipe(data: dict[str, Any]) -> str:
    """Render a resolved recipe as TOML text, for the run folder and ``mtrun validate --print``.

    Reading the text back with :func:`read_toml` gives an equal dict. ``None`` has no TOML
    spelling, so keys holding it are left out (they mean "use the default").
    """
    import tomli_w

    return tomli_w.dumps(_drop_none(data))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value if v is not None]
    return value
