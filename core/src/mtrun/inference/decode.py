"""Decoding recordings into windows inside DataLoader worker processes (``mtrun embed``)."""

from __future__ import annotations

from typing import Any, Iterator

import torch

__all__ = ["DecodeFiles", "worker_init"]


class DecodeFiles(torch.utils.data.IterableDataset):
    """Decode events for a list of files, the files shared out among DataLoader workers.

    Each worker streams its files one at a time (:func:`mtrun.data.audio.stream_windows`), so
    a worker holds one block of audio and one window, whatever the length of the file.

    Events:
        ``(0, index, start, window)``: a window of file ``index`` starting at sample ``start``;
        ``(1, index, samples, "")``: the file is done (``samples`` at the model's rate);
        ``(2, index, kind, message)``: the file failed, after any of its windows.
    """

    def __init__(self, files: list[tuple[int, str]], rate: int, length: int, hop: int):
        super().__init__()
        self.files, self.rate, self.length, self.hop = files, rate, length, hop

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        from mtrun.data.audio import AudioDecodeError, stream_windows

        info = torch.utils.data.get_worker_info()
        mine = self.files if info is None else self.files[info.id :: info.num_workers]
        for index, path in mine:
            stats: dict[str, Any] = {}
            try:
                for start, window in stream_windows(path, self.rate, self.length, self.hop, stats=stats):
                    yield 0, index, start, window
                yield 1, index, int(stats.get("samples", 0)), ""
            except AudioDecodeError as exc:
                yield 2, index, exc.kind, str(exc)
            except Exception as exc:  # noqa: BLE001 - one odd file must not stop a library run
                yield 2, index, "error", f"audio file {path!r}: {type(exc).__name__}: {exc}"


def worker_init(_: int) -> None:
    """One PyTorch thread per worker: the workers resample side by side."""
    torch.set_num_threads(1)
