"""``mtrun search INDEX QUERY...``: text → music, and ``--like FILE``: music → music.

``INDEX`` is an embeddings file written by ``mtrun embed``; queries are embedded with the model
recorded in it (or ``--model``). Scores are cosine similarities.

* **Exact** (the default): every recording is scored, in chunks of queries so memory stays at
  ``chunk × N`` scores; ties are broken by row order.
* **Approximate** (``--approximate``): a FAISS HNSW graph over the recordings' vectors
  (inner product; ``M`` = 32, ``efConstruction`` = 80, ``efSearch`` = ``--ef``, 128 by
  default). It is built on first use and cached beside the index as ``INDEX.hnsw.faiss``
  (rebuilt when the index file changes). FAISS is optional: ``pip install 'mtrun[search]'``
  (or ``faiss-cpu``). Its recall against exact search, measured by ``benchmarks/
  search_recall.py``, is in docs/using-models.md: on unstructured random vectors it is low,
  which is why exact search is the default.
* **Windows** (``--windows``, on an index made with ``mtrun embed --windows``): every window of
  every recording is scored; a recording's score is its best window's, reported with that
  window's start time ("where in the track").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import attrs
import numpy as np

from mtrun.errors import MtrunError

__all__ = ["HNSW_M", "Hit", "Index", "SearchError", "configure", "run"]

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
DEFAULT_EF = 128
_CHUNK = 64  # queries scored at once in exact search


class SearchError(MtrunError):
    """A search cannot run as asked; the message says what to do."""

    exit_code = 2


@attrs.frozen
class Hit:
    """One result: rank (1-based), cosine score, row in the index, id, path, and for window
    search the start (seconds) of the best-matching window."""

    rank: int
    score: float
    row: int
    id: str
    path: str
    start: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        if self.start is None:
            out.pop("start")
        return out


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``scores [Q, N]``: the ``k`` best columns, best first (ties: lower column first)."""
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros((scores.shape[0], 0), np.int64), np.zeros((scores.shape[0], 0), scores.dtype)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    picked = np.take_along_axis(scores, part, axis=1)
    # Sort by score descending, then by column ascending (lexsort's last key is the primary).
    order = np.lexsort((part, -picked), axis=1)
    cols = np.take_along_axis(part, order, axis=1)
    return cols, np.take_along_axis(scores, cols, axis=1)


def faiss_module() -> Any:
    """``faiss``, or a :class:`SearchError` saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise SearchError(
            "approximate search needs FAISS, which is not installed: pip install 'mtrun[search]' "
            "(or pip install faiss-cpu); without --approximate the search is exact"
        ) from None
    return faiss


class Index:
    """The recordings of an embeddings file, ready to search.

    Args:
        data: An :class:`~mtrun.inference.store.EmbeddingSet`.
        path: The file it came from (approximate indexes are cached beside it).
    """

    def __init__(self, data: Any, path: Path | None = None):
        self.data = data
        self.path = path
        self._hnsw: Any = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Index:
        from mtrun.inference.store import read_embeddings

        return cls(read_embeddings(path), Path(path).expanduser())

    def __len__(self) -> int:
        return len(self.data)

    @property
    def meta(self) -> dict[str, Any]:
        return self.data.meta

    def row_of_path(self, path: str | os.PathLike[str]) -> int | None:
        """The row of a file already in the index (by absolute path), or ``None``."""
        wanted = str(Path(path).expanduser().absolute())
        try:
            return self.data.paths.index(wanted)
        except ValueError:
            return None

    # ------------------------------------------------------------------ searching

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        approximate: bool = False,
        ef: int = DEFAULT_EF,
        windows: bool = False,
        exclude: Sequence[int | None] | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` best recordings for each query vector.

        Args:
            queries: ``[Q, D]`` (or ``[D]``) query embeddings.
            k: Results per query.
            approximate: Use the FAISS HNSW index instead of exact scoring.
            ef: HNSW's ``efSearch`` (larger: better recall, slower).
            windows: Score every window; a recording scores its best window's score.
            exclude: Per query, a row to leave out (the query's own file in music → music).
        """
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        exclude = list(exclude) if exclude is not None else [None] * len(q)
        extra = 1 if any(e is not None for e in exclude) else 0
        if windows:
            rows, scores, starts = self._search_windows(q, k + extra)
        elif approximate:
            rows, scores = self._search_hnsw(q, k + extra, ef)
            starts = None
        else:
            rows, scores = self._search_exact(q, k + extra)
            starts = None
        out = []
        for qi in range(len(q)):
            hits = []
            for j, (row, score) in enumerate(zip(rows[qi], scores[qi])):
                if row < 0 or row == exclude[qi]:
                    continue
                start = float(starts[qi][j]) if starts is not None else None
                hits.append(Hit(len(hits) + 1, float(score), int(row), self.data.ids[row], self.data.paths[row], start))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def _search_exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.data.vectors
        rows, scores = [], []
        for s in range(0, len(q), _CHUNK):
            r, sc = _top_k(q[s : s + _CHUNK] @ vectors.T, k)
            rows.append(r)
            scores.append(sc)
        if not rows:
            return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
        return np.concatenate(rows), np.concatenate(scores)

    def _search_windows(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        data = self.data
        if not data.has_windows:
            raise SearchError(
                f"{self.path}: holds no per-window vectors; embed with `mtrun embed ... --windows` to search within tracks"
            )
        order = np.argsort(data.window_row, kind="stable")
        row_of = data.window_row[order]
        firsts = np.flatnonzero(np.r_[True, row_of[1:] != row_of[:-1]]) if len(row_of) else np.zeros(0, np.int64)
        owners = row_of[firsts]
        rows, scores, starts = [], [], []
        for qi in range(len(q)):
            window_scores = data.windows[order] @ q[qi]
            best = np.maximum.reduceat(window_scores, firsts) if len(firsts) else np.zeros(0, np.float32)
            per_row = np.full(len(data), -np.inf, np.float32)
            per_row[owners] = best
            r, sc = _top_k(per_row[None], k)
            rows.append(r[0])
            scores.append(sc[0])
            # The start of the best window of each hit (its first occurrence of the maximum).
            picked = []
            for row in r[0]:
                span = np.flatnonzero(row_of == row)
                picked.append(data.window_starts[order][span[np.argmax(window_scores[span])]])
            starts.append(np.asarray(picked))
        return np.asarray(rows), np.asarray(scores), np.asarray(starts)

    def hnsw(self) -> Any:
        """The FAISS HNSW index over the recordings, loaded from its cache or built (and cached)."""
        if self._hnsw is not None:
            return self._hnsw
        faiss = faiss_module()
        vectors = np.ascontiguousarray(self.data.vectors, dtype=np.float32)
        cache = self.path.with_name(self.path.name + ".hnsw.faiss") if self.path is not None else None
        stamp = self._stamp()
        if cache is not None and cache.is_file():
            try:
                recorded = json.loads(cache.with_name(cache.name + ".json").read_text(encoding="utf-8"))
                if recorded == stamp:
                    self._hnsw = faiss.read_index(str(cache))
                    return self._hnsw
            except (OSError, ValueError, RuntimeError):
                pass  # stale or damaged: rebuilt below
        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(vectors)
        if cache is not None:
            try:
                from mtrun.cache import write_atomic

                tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
                faiss.write_index(index, str(tmp))
                os.replace(tmp, cache)
                write_atomic(cache.with_name(cache.name + ".json"), lambda f: f.write(json.dumps(stamp).encode()))
            except (OSError, RuntimeError) as exc:  # a read-only folder: search anyway, uncached
                print(f"WARNING: could not cache the FAISS index at {cache}: {exc}", file=sys.stderr)
        self._hnsw = index
        return index

    def _stamp(self) -> dict[str, Any]:
        info: dict[str, Any] = {"rows": len(self.data), "M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
        if self.path is not None and self.path.is_file():
            st = self.path.stat()
            info.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        return info

    def _search_hnsw(self, q: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.hnsw()
        index.hnsw.efSearch = max(int(ef), k)
        scores, rows = index.search(np.ascontiguousarray(q), min(k, len(self.data)))
        return rows.astype(np.int64), scores


# ------------------------------------------------------------------------------------ CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare ``mtrun search``'s arguments."""
    parser.description = "Search an embeddings file (from `mtrun embed`) by text, or by a piece of music with --like."
    parser.add_argument("index", metavar="INDEX", help="an embeddings file written by `mtrun embed` (.parquet or .npy)")
    parser.add_argument("queries", nargs="*", metavar="QUERY", help='text queries, e.g. "a mellow piano piece"')
    parser.add_argument("--like", action="append", metavar="FILE", help="music → music: recordings like this audio file (repeatable)")
    parser.add_argument("--queries-file", metavar="FILE", help="text queries, one per line")
    parser.add_argument("-k", "--top", type=int, default=10, dest="k", help="results per query (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--model", help="the model to embed queries with (default: the one recorded in INDEX)")
    parser.add_argument("--approximate", action="store_true", help="FAISS HNSW search instead of exact (needs faiss-cpu)")
    parser.add_argument("--ef", type=int, default=DEFAULT_EF, help=f"HNSW efSearch: recall vs speed (default {DEFAULT_EF})")
    parser.add_argument("--windows", action="store_true", help="score every window; report the best window's start time")
    parser.add_argument("--device", default="cpu", help="device for embedding the queries (default cpu)")


def _model_for(index: Index, override: str | None, device: str) -> Any:
    from mtrun.inference.model import load

    path = override or index.meta.get("model")
    if not path:
        raise SearchError(f"{index.path}: records no model; pass --model MODEL")
    if not Path(path).exists():
        raise SearchError(f"{index.path} was made with the model at {path}, which is not there any more; pass --model MODEL")
    model = load(path, device=device, clip_seconds=index.meta.get("clip_seconds"), hop_seconds=index.meta.get("hop_seconds"))
    recorded = index.meta.get("fingerprint")
    if recorded and model.fingerprint != recorded:
        raise SearchError(
            f"{path} is not the model that made {index.path} (its weights differ); queries would land in another "
            "embedding space. Pass the right --model, or embed the library again with this one"
        )
    return model


def run(args: argparse.Namespace) -> int:
    """Handle ``mtrun search``; returns the exit status."""
    queries: list[tuple[str, str]] = [("text", q) for q in args.queries]
    if args.queries_file:
        try:
            lines = Path(args.queries_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SearchError(f"mtrun search: cannot read {args.queries_file}: {exc.strerror or exc}") from None
        queries += [("text", line) for line in lines if line.strip()]
    queries += [("audio", f) for f in args.like or []]
    if not queries:
        raise SearchError('mtrun search: give a text query ("a mellow piano piece"), --queries-file or --like FILE')
    if args.k < 1:
        raise SearchError("mtrun search: -k must be at least 1")
    if args.approximate:
        faiss_module()  # say how to install it before any work
    index = Index.open(args.index)
    if len(index) == 0:
        raise SearchError(f"mtrun search: {args.index} holds no recordings (see its .skipped.jsonl for files that failed)")
    model = _model_for(index, args.model, args.device)
    texts = [q for kind, q in queries if kind == "text"]
    vectors = list(model.embed_text(texts)) if texts else []
    exclude: list[int | None] = [None] * len(texts)
    for kind, item in queries:
        if kind != "audio":
            continue
        row = index.row_of_path(item)
        if row is None:
            if not Path(item).is_file():
                raise SearchError(f"mtrun search: --like {item}: no such file")
            vectors.append(model.embed_audio(item))
        else:  # already in the index: its stored vector, and it is left out of its own results
            vectors.append(index.data.vectors[row])
        exclude.append(row)
    results = index.search(np.stack(vectors), args.k, approximate=args.approximate, ef=args.ef, windows=args.windows, exclude=exclude)
    ordered = [q for q in queries if q[0] == "text"] + [q for q in queries if q[0] == "audio"]
    if args.json:
        payload = [
            {"query": q, "kind": kind, "method": _method(args), "results": [h.as_dict() for h in hits]}
            for (kind, q), hits in zip(ordered, results)
        ]
        print(json.dumps(payload if len(payload) > 1 else payload[0], indent=1))
        return 0
    from rich.markup import escape
    from rich.table import Table

    from mtrun.console import make_console

    console = make_console()
    # Files embedded from folders are known by their path: no separate id column then.
    show_id = any(i != p for i, p in zip(index.data.ids, index.data.paths))
    for (kind, q), hits in zip(ordered, results):
        title = f"{'like ' if kind == 'audio' else ''}{q!r}: top {len(hits)} of {len(index)} ({_method(args)})"
        table = Table(title=escape(title))
        for column in ("rank", "score", *(["at (s)"] if args.windows else []), *(["id"] if show_id else []), "path"):
            table.add_column(column, justify="right" if column in ("rank", "score", "at (s)") else "left")
        for h in hits:
            cells = [str(h.rank), f"{h.score:.4f}", *([f"{h.start:.1f}"] if args.windows else []), *([escape(h.id)] if show_id else []), escape(h.path)]
            table.add_row(*cells)
        console.print(table)
    return 0


def _method(args: argparse.Namespace) -> str:
    if args.windows:
        return "exact, per window"
    return f"approximate, FAISS HNSW efSearch {args.ef}" if args.approximate else "exact"
