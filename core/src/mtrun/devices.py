"""Device names in recipes and on the command line, and the device they pick."""

from __future__ import annotations

import re
from typing import Any

from mtrun.errors import MtrunError

__all__ = ["DEVICE_NAMES", "check_device_name", "pick_device"]

DEVICE_NAMES = "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str) -> None:
    """Refuse a device name mtrun does not run on (``gpu``, ``cuda0``) before anything is built.

    Raises:
        ValueError: The name is not one of :data:`DEVICE_NAMES`.
    """
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ValueError(f"{name!r} is not a device; use {DEVICE_NAMES}")


def pick_device(name: str | None, *, key: str = "device") -> Any:
    """The ``torch.device`` for ``name`` (``None`` and ``''`` mean ``auto``).

    Raises:
        MtrunError: A name that is not a device, or a CUDA device this machine does not have;
            the message starts with ``key`` (``[run].device``, ``--device``).
    """
    import torch

    name = name or "auto"
    try:
        check_device_name(name)
    except ValueError as exc:
        raise MtrunError(f"{key}: {exc}") from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise MtrunError(f"{key} = {name!r}: no CUDA device is available here (torch {torch.__version__}, {build}); "
                             "use 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MtrunError(f"{key} = {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    return device
