"""``mtrun.load``: a trained model for embedding music and text, without the training machinery.

:func:`load` accepts a run folder (its best checkpoint, else its latest), a checkpoint folder or
a folder written by ``mtrun export``. It reads the resolved recipe saved there, builds **only the
model slots** (encoders, projectors, any fusion, and the objectives, whose retrieval heads are
part of the embedding; no data source, augmenters, evaluations, optimizer or trainer), loads
``model.safetensors`` after checking it against its recorded checksum, and returns a
:class:`Model`.

Long recordings follow one policy (docs/using-models.md): the audio is decoded and resampled
in blocks (:func:`mtrun.data.audio.stream_windows`), cut into windows of the length the model
was trained on with a hop of half a window (the last window aligned to the end; a file shorter
than a window is repeat-padded to one), every window is encoded and projected, and the
projected windows are **mean-pooled, then L2-normalised** — the evaluation's rule. Memory is
bounded by the window and batch sizes, not by the file. The per-window vectors (each
L2-normalised) and their start times are kept on request, for "where in the track" search.

Determinism: windows are encoded in batches of a fixed shape (a partial batch is padded with
silence), so a window's vector never depends on which other windows share its batch; the
same file gives the same vector whatever else is embedded with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import attrs
import numpy as np

from mtrun import schema
from mtrun.devices import pick_device
from mtrun.errors import MtrunError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "EXPORT_INFO",
    "INFERENCE_SLOTS",
    "AudioEmbedding",
    "Located",
    "Model",
    "ModelLoadError",
    "WindowBatcher",
    "load",
    "locate",
]

EXPORT_INFO = "export.json"
"""The file that marks a folder written by ``mtrun export``."""

DEFAULT_BATCH_SIZE = 16
"""Windows per encoder call (every call has exactly this many rows; see the module docstring)."""

INFERENCE_SLOTS = tuple(s.name for s in schema.SLOTS if s.model and s.name != "augmenter")
"""The recipe slots :func:`load` builds: the model slots except augmenters (training only)."""


class ModelLoadError(MtrunError):
    """A path is not a model mtrun can load, or its files are damaged; the message names it."""


# ------------------------------------------------------------------------------ locating


@attrs.frozen
class Located:
    """Where a model's files are.

    Attributes:
        kind: ``"export"``, ``"checkpoint"`` or ``"run"`` (the path given was a run folder).
        path: The path given.
        weights: The folder holding ``model.safetensors`` (a checkpoint or export folder).
        recipe: The resolved recipe file in it (``recipe.toml`` or ``recipe.json``).
        step: The training step of the weights, when known.
        export: ``export.json``'s contents for an exported folder.
    """

    kind: str
    path: Path
    weights: Path
    recipe: Path
    step: int | None
    export: dict[str, Any] | None = None


def _step_of(folder: Path) -> int | None:
    state = folder / "trainer_state.json"
    try:
        step = json.loads(state.read_text(encoding="utf-8")).get("step")
        if isinstance(step, int):
            return step
    except (OSError, ValueError, AttributeError):
        pass
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _recipe_in(folder: Path, what: str) -> Path:
    recipe = next((folder / n for n in ("recipe.toml", "recipe.json") if (folder / n).is_file()), None)
    if recipe is None:
        raise ModelLoadError(f"{what} {folder} holds no recipe.toml or recipe.json to rebuild the model from")
    return recipe


def locate(path: str | os.PathLike[str]) -> Located:
    """Find the weights and the recipe of a run folder, checkpoint folder or exported folder.

    Raises:
        ModelLoadError: The path does not exist, or is none of the three, or lacks a file.
    """
    from mtrun.train.checkpoint import complete, find_best, find_latest

    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"{folder}: no such file or folder (expected a run folder, a checkpoint folder or an exported model)")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: is a file; expected a run folder, a checkpoint folder or an exported model folder")
    if (folder / EXPORT_INFO).is_file():
        try:
            info = json.loads((folder / EXPORT_INFO).read_text(encoding="utf-8"))
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"exported model {folder}: {EXPORT_INFO} is damaged ({exc})") from None
        if not (folder / "model.safetensors").is_file():
            raise ModelLoadError(f"exported model {folder}: model.safetensors is missing")
        step = info.get("source", {}).get("step")
        return Located("export", folder, folder, _recipe_in(folder, "exported model"), step if isinstance(step, int) else None, info)
    if (folder / "model.safetensors").is_file():
        if not complete(folder):
            raise ModelLoadError(f"checkpoint {folder} is incomplete (no COMPLETE marker); pick another checkpoint")
        return Located("checkpoint", folder, folder, _recipe_in(folder, "checkpoint"), _step_of(folder))
    if any((folder / n).exists() for n in ("COMPLETE", "trainer_state.json")):
        raise ModelLoadError(f"checkpoint {folder} has no model.safetensors (its weights are gone); pick another checkpoint")
    root = folder / "checkpoints"
    if (folder / "recipe.toml").is_file() or root.is_dir():
        best = (find_best(root) or find_latest(root)) if root.is_dir() else None
        if best is None:
            raise ModelLoadError(f"run folder {folder} holds no complete checkpoint yet (nothing in {root})")
        return Located("run", folder, best, _recipe_in(best, "checkpoint"), _step_of(best))
    raise ModelLoadError(
        f"{folder} is neither a run folder (recipe.toml, checkpoints/), a checkpoint folder (model.safetensors) "
        f"nor an exported model ({EXPORT_INFO})"
    )


def _read_recipe(located: Located) -> dict[str, Any]:
    from mtrun.recipe import read_toml

    path = located.recipe
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot be read ({exc})") from None
    else:
        data = read_toml(path)
    if located.export:
        # Files the export copied in (tokenizers, pretrained weights) are named relative to it.
        for dotted, relative in (located.export.get("assets") or {}).items():
            table: Any = data
            *parents, key = _split_key(dotted)
            for part in parents:
                table = table[part]
            table[key] = str(located.weights / relative)
    return data


def _split_key(dotted: str) -> list[Any]:
    """``"objective.0.inner.path"`` → ``["objective", 0, "inner", "path"]``."""
    return [int(p) if p.isdigit() else p for p in dotted.split(".")]


def _fingerprint(folder: Path) -> str:
    """The sha256 of ``model.safetensors``: the one ``checksums.json`` records (verified on
    load), or computed for a checkpoint written before checksums."""
    import hashlib

    try:
        entry = json.loads((folder / "checksums.json").read_text(encoding="utf-8"))["files"]["model.safetensors"]
        return str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        digest = hashlib.sha256()
        with open(folder / "model.safetensors", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()


def load(
    path: str | os.PathLike[str],
    *,
    device: str | None = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    clip_seconds: float | None = None,
    hop_seconds: float | None = None,
    registry: Any = None,
) -> Model:
    """Load a trained model for inference.

    Args:
        path: A run folder (its best checkpoint, else its latest), a checkpoint folder
            (``RUN/checkpoints/step-N``) or a folder written by ``mtrun export``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        batch_size: Audio windows per encoder call.
        clip_seconds: Window length; default: the length the model was trained on
            (``[loader].clip_seconds``; an export's ``preprocessing.json``).
        hop_seconds: Hop between windows; default half a window.
        registry: The component registry; default: the installed plugins'.

    Returns:
        A :class:`Model` in eval mode on ``device``.

    Raises:
        ModelLoadError: The path is not a model, a file is missing or damaged, or the weights do
            not fit the model the recipe builds. Recipe and plugin problems raise
            :class:`~mtrun.errors.RecipeError` / :class:`~mtrun.errors.PluginError`.
    """
    import torch
    from safetensors import SafetensorError

    from mtrun.assemble import assemble_model
    from mtrun.recipe import resolve_recipe
    from mtrun.run import Run
    from mtrun.train.checkpoint import CorruptCheckpointError, read_model_state, verify_checkpoint

    located = locate(path)
    what = "exported model" if located.kind == "export" else "checkpoint"
    try:
        verify_checkpoint(located.weights, ["model.safetensors", located.recipe.name])
    except CorruptCheckpointError as exc:
        raise ModelLoadError(f"{what} {located.weights} cannot be loaded: {exc.problem} (damaged on disk or in a copy)") from None
    if registry is None:
        from mtrun import plugins

        registry = plugins.get_plugins().registry
    data = _read_recipe(located)
    resolved = resolve_recipe(data, registry, str(located.recipe), overrides=(), slots=INFERENCE_SLOTS)
    run = Run(dir=located.weights, config=resolved.run, loader=resolved.loader, recipe=dict(data), recipe_path=str(located.recipe))
    with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
        torch.manual_seed(resolved.run.seed)
        system = assemble_model(resolved, run)
    try:
        state = read_model_state(located.weights, verify=False)  # verified above
        missing, unexpected = system.load_state_dict(state, strict=False)
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(
            f"{what} {located.weights}: model.safetensors does not fit the model its recipe builds ({exc}). "
            "Was a plugin upgraded since it was written?"
        ) from None
    if missing or unexpected:
        raise ModelLoadError(
            f"{what} {located.weights}: model.safetensors does not fit the model its recipe builds "
            f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'}). "
            "Was a plugin upgraded since it was written?"
        )
    preprocessing = (located.export or {}).get("preprocessing") or {}
    clip = float(clip_seconds or preprocessing.get("clip_seconds") or resolved.loader.clip_seconds)
    hop = float(hop_seconds or preprocessing.get("hop_seconds") or clip / 2)
    system.eval().to(pick_device(device, key="mtrun.load: device"))
    return Model(
        system,
        source=located,
        recipe=data,
        clip_seconds=clip,
        hop_seconds=hop,
        batch_size=batch_size,
        fingerprint=_fingerprint(located.weights),
    )


# ------------------------------------------------------------------------------- the model


@attrs.define
class AudioEmbedding:
    """One recording's embedding, with its windows.

    Attributes:
        vector: ``[D]`` the recording's embedding (mean of the projected windows, L2-normalised).
        windows: ``[W, D]`` each window's embedding, L2-normalised.
        starts: ``[W]`` each window's start in seconds.
        seconds: The recording's duration in seconds (at the model's rate).
    """

    vector: np.ndarray
    windows: np.ndarray
    starts: np.ndarray
    seconds: float


class _Item:
    """A recording being embedded: the running sum of its projected windows."""

    __slots__ = ("sum", "count", "windows", "starts", "pending", "decoded", "samples")

    def __init__(self) -> None:
        self.sum: Any = None
        self.count = 0
        self.windows: list[Any] = []
        self.starts: list[int] = []
        self.pending = 0  # windows queued, not encoded yet
        self.decoded = False  # every window has been queued
        self.samples = 0


class WindowBatcher:
    """Encodes windows from many recordings in fixed-shape batches and pools them per recording.

    Windows are queued with :meth:`add`; every ``batch_size`` of them are encoded together (a
    last, partial batch is padded with silence by :meth:`flush`). A recording is complete once
    :meth:`finish` was called for it and its windows are encoded; :meth:`pop_complete` hands
    back completed recordings, in the order they completed.
    """

    def __init__(self, model: Model, *, keep_windows: bool = False):
        self.model = model
        self.keep_windows = keep_windows
        self._queue: list[tuple[Any, int, Any]] = []
        self._items: dict[Any, _Item] = {}
        self._complete: list[Any] = []

    def add(self, key: Any, start: int, window: torch.Tensor) -> None:
        item = self._items.setdefault(key, _Item())
        item.pending += 1
        item.samples = max(item.samples, start + window.shape[-1])
        self._queue.append((key, start, window))
        if len(self._queue) >= self.model.batch_size:
            self._encode()

    def finish(self, key: Any, samples: int | None = None) -> None:
        """Every window of ``key`` has been added (``samples``: its length at the model's rate)."""
        item = self._items.setdefault(key, _Item())
        item.decoded = True
        if samples is not None:
            item.samples = samples
        if item.pending == 0:
            self._complete.append(key)

    def drop(self, key: Any) -> None:
        """Forget ``key`` (its audio failed part-way): its queued windows are removed."""
        self._queue = [q for q in self._queue if q[0] != key]
        self._items.pop(key, None)

    def flush(self) -> None:
        """Encode what is queued now (padded to a full batch)."""
        if self._queue:
            self._encode()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _encode(self) -> None:
        import torch

        batch, self._queue = self._queue, []
        projected = self.model.encode_windows(torch.stack([w for _, _, w in batch]))
        for (key, start, _), row in zip(batch, projected):
            item = self._items[key]
            item.sum = row.clone() if item.sum is None else item.sum + row
            item.count += 1
            item.pending -= 1
            if self.keep_windows:
                item.windows.append(row)
                item.starts.append(start)
            if item.decoded and item.pending == 0:
                self._complete.append(key)

    def pop_complete(self) -> list[tuple[Any, AudioEmbedding]]:
        import torch

        out = []
        rate = self.model.sample_rate
        for key in self._complete:
            item = self._items.pop(key, None)
            if item is None or item.count == 0:
                continue
            vector = torch.nn.functional.normalize(item.sum / item.count, dim=-1)
            if self.keep_windows:
                windows = torch.nn.functional.normalize(torch.stack(item.windows), dim=-1).numpy()
                starts = np.asarray(item.starts, dtype=np.float64) / rate
            else:
                windows, starts = np.zeros((0, vector.shape[-1]), np.float32), np.zeros(0)
            out.append((key, AudioEmbedding(vector.numpy(), windows, starts, item.samples / rate)))
        self._complete = []
        return out


def _is_waveform(value: Any) -> bool:
    import torch

    return torch.is_tensor(value) or (isinstance(value, np.ndarray))


class Model:
    """A trained music–text model: text and audio in, L2-normalised embeddings out.

    Built by :func:`load`. Embeddings are NumPy ``float32`` arrays; cosine similarity is their
    dot product.

    Attributes:
        system: The :class:`mtrun.System` (model slots only), in eval mode.
        source: Where it was loaded from (:class:`Located`).
        recipe: The resolved recipe it was built from.
        clip_seconds, hop_seconds: The window policy for audio.
        batch_size: Windows per encoder call.
        fingerprint: sha256 of ``model.safetensors``: which weights made an embedding.
    """

    def __init__(
        self,
        system: Any,
        *,
        source: Located | None = None,
        recipe: dict[str, Any] | None = None,
        clip_seconds: float = 10.0,
        hop_seconds: float | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        fingerprint: str = "",
    ):
        bad = [f"{name} = {value!r}" for name, value in (("clip_seconds", clip_seconds), ("hop_seconds", hop_seconds), ("batch_size", batch_size))
               if value is not None and not value > 0]
        if bad:
            raise MtrunError(f"the window policy needs positive numbers: {', '.join(bad)}")
        self.system = system.eval()  # inference: no dropout, batch norm on its running statistics
        self.source = source
        self.recipe = recipe or {}
        self.clip_seconds = float(clip_seconds)
        self.hop_seconds = float(hop_seconds or clip_seconds / 2)
        self.batch_size = int(batch_size)
        self.fingerprint = fingerprint

    def __repr__(self) -> str:
        where = f" from {self.source.path}" if self.source else ""
        return f"<mtrun.Model{where}: {self.dim}-d, {self.sample_rate} Hz, windows {self.clip_seconds:g} s / hop {self.hop_seconds:g} s>"

    # ------------------------------------------------------------------ properties

    @property
    def sample_rate(self) -> int:
        """The audio encoder's rate; audio is resampled to it."""
        return int(self.system.audio_encoder.sample_rate)

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.system.audio_projector.output_dim)

    @property
    def device(self) -> Any:
        import torch

        try:
            return next(self.system.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @property
    def window_samples(self) -> int:
        return max(1, int(round(self.clip_seconds * self.sample_rate)))

    @property
    def hop_samples(self) -> int:
        return max(1, int(round(self.hop_seconds * self.sample_rate)))

    def info(self) -> dict[str, Any]:
        """What identifies this model and its window policy (stored beside embeddings)."""
        return {
            "model": str(self.source.path.resolve()) if self.source else None,
            "fingerprint": self.fingerprint,
            "step": self.source.step if self.source else None,
            "dim": self.dim,
            "sample_rate": self.sample_rate,
            "clip_seconds": self.clip_seconds,
            "hop_seconds": self.hop_seconds,
            "aggregation": "mean of projected windows, then L2-normalised",
        }

    # ------------------------------------------------------------------ encoding

    def encode_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Projected (not normalised) embeddings ``[n, D]`` of mono windows ``[n, L]``, on CPU.

        Every encoder call has exactly ``batch_size`` rows, the missing ones silent, so a
        window's numbers do not depend on its neighbours in the batch.
        """
        import torch

        system, out = self.system, []
        encoder = system.audio_encoder
        with torch.no_grad():
            for s in range(0, windows.shape[0], self.batch_size):
                chunk = windows[s : s + self.batch_size]
                n = chunk.shape[0]
                if n < self.batch_size:
                    chunk = torch.cat([chunk, chunk.new_zeros(self.batch_size - n, chunk.shape[-1])])
                chunk = chunk.to(self.device)
                projected = system.project("audio", encoder(encoder.preprocess(chunk)))
                out.append(projected[:n].float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def windows_of(
        self, audio: Any, sample_rate: int | None = None, *, stats: dict[str, Any] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The ``(start, window)`` pairs of one file or waveform (see the module docstring);
        ``stats["samples"]`` is its length at the model's rate once read."""
        from mtrun.data.audio import stream_windows

        if _is_waveform(audio) and sample_rate is None:
            raise MtrunError("embed_audio: a waveform needs its rate: embed_audio(wave, sample_rate=...)")
        return stream_windows(
            audio, self.sample_rate, self.window_samples, self.hop_samples, source_rate=sample_rate, stats=stats
        )

    def embed_audio(
        self, audio: Any, sample_rate: int | None = None, *, windows: bool = False
    ) -> np.ndarray | AudioEmbedding | list[AudioEmbedding]:
        """Embed audio files or waveforms.

        Args:
            audio: A path, or a waveform (``torch.Tensor`` or ``np.ndarray``, ``[T]`` mono or
                ``[C, T]``, float in [-1, 1] or integer PCM, scaled: see
                :func:`mtrun.data.audio.as_waveform`), or a list of them (a list is always a batch).
            sample_rate: The rate of waveforms (files carry their own).
            windows: Return :class:`AudioEmbedding` objects with the per-window vectors and
                their start times instead of the bare vectors.

        Returns:
            ``[D]`` for one input, ``[N, D]`` for a list; with ``windows=True`` an
            :class:`AudioEmbedding` or a list of them.

        Raises:
            mtrun.data.audio.AudioDecodeError: A file cannot be decoded or is silent (the
                message names the file), or a waveform's layout, dtype or rate is unusable.
        """
        single = not isinstance(audio, (list, tuple))
        items = [audio] if single else list(audio)
        batcher = WindowBatcher(self, keep_windows=windows)
        done: dict[int, AudioEmbedding] = {}
        for i, item in enumerate(items):
            stats: dict[str, Any] = {}
            for start, window in self.windows_of(item, sample_rate, stats=stats):
                batcher.add(i, start, window)
            batcher.finish(i, stats.get("samples"))
            done.update(batcher.pop_complete())
        batcher.flush()
        done.update(batcher.pop_complete())
        results = [done[i] for i in range(len(items))]
        if windows:
            return results[0] if single else results
        vectors = np.stack([r.vector for r in results]) if results else np.zeros((0, self.dim), np.float32)
        return vectors[0] if single else vectors

    def embed_text(self, texts: str | Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """L2-normalised embeddings of captions or queries: ``[D]`` for a string, ``[N, D]`` for a list."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        parts = [self.system.embed_text(items[s : s + batch_size]).float().cpu().numpy() for s in range(0, len(items), batch_size)]
        vectors = np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
        return vectors[0] if single else vectors

    @staticmethod
    def similarity(a: Any, b: Any) -> np.ndarray:
        """Cosine similarity of two sets of embeddings: ``[N, M]`` (a scalar for two vectors).

        Inputs are re-normalised, so any vectors work, not only this model's.
        """
        x, y = np.atleast_2d(np.asarray(a, dtype=np.float32)), np.atleast_2d(np.asarray(b, dtype=np.float32))
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        out = x @ y.T
        return out if np.ndim(a) > 1 or np.ndim(b) > 1 else float(out[0, 0])
