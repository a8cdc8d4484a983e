"""What most data sources share: samples built once per source, grouped by split."""

from __future__ import annotations

from typing import Sequence

from mtrun.interfaces import Sample

__all__ = ["SplitSource"]


class SplitSource:
    """A data source whose items are built in one pass and then grouped by split.

    Subclasses implement :meth:`build` returning ``{split: [Sample, ...]}``; it runs once, on
    first use, so constructing the component (``mtrun validate``, assembly) stays cheap.
    """

    def build(self) -> dict[str, list[Sample]]:
        raise NotImplementedError

    def _items(self) -> dict[str, list[Sample]]:
        cached = self.__dict__.get("_built")
        if cached is None:
            cached = self.__dict__["_built"] = self.build()
        return cached

    def splits(self) -> Sequence[str]:
        return tuple(self._items())

    def load(self, split: str) -> Sequence[Sample]:
        items = self._items()
        if split not in items:
            raise KeyError(f"no split {split!r}; this source has: {', '.join(items) or 'none'}")
        return items[split]
