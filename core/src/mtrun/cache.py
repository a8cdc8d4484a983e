"""The on-disk cache every run shares: where it lives, how entries are keyed and written.

Entries are content-keyed (a hash of everything that determines them), written to a temporary
sibling, fsynced and renamed into place, so concurrent runs never see a half-written entry and
two runs computing the same entry at once both end with the same complete file. A crash leaves
at most a ``.tmp-PID`` file, which :func:`clean_stale` removes. Nothing in the cache is ever
needed to reproduce a result: deleting the folder only costs recomputation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["cache_root", "clean_stale", "entry_key", "write_atomic"]


def cache_root() -> Path:
    """``$MTRUN_CACHE`` or ``~/.cache/mtrun``."""
    return Path(os.environ.get("MTRUN_CACHE") or Path.home() / ".cache" / "mtrun").expanduser()


def entry_key(*parts: Any) -> str:
    """A 32-hex-digit key for JSON-serialisable ``parts`` (dict order does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Call ``write(binary file)`` on a temporary sibling of ``path``, fsync, rename it into place.

    On any failure (a full disk included) the temporary file is removed and the error re-raised;
    an existing ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def clean_stale(folder: Path) -> int:
    """Remove ``.*.tmp-PID`` files under ``folder`` whose process no longer runs; their count."""
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
