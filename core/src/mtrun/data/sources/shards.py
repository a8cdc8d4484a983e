"""WebDataset tar shards: the ``webdataset`` data source and the ``mtrun data shard`` converter.

A shard is an uncompressed tar whose members come in pairs sharing a key: ``KEY.flac`` (or
``.wav``/``.mp3``/``.ogg``/...) holding the audio file's original bytes, and ``KEY.json``
holding ``{"id", "captions", "tags", "group", "extra"}`` — the WebDataset convention, so the
shards also stream through the ``webdataset`` library and other tools.

**Map-style over local shards, streaming as an extra.** The :class:`~mtrun.interfaces.DataSource`
protocol is map-style, and the loader's guarantees (a seeded permutation per epoch, exact DDP
shares, resume at a global batch) rest on ``len`` and integer indexing. So :meth:`load` scans
each shard's tar headers once (a seek per member, no audio read), reads the small JSON members,
and returns a list of samples whose ``audio`` is a :class:`TarMember` — a byte range in the
shard. The audio is then decoded inside DataLoader workers like any file, with random access.
:meth:`WebDatasetSource.stream` reads shards sequentially with the ``webdataset`` library (any
URL it accepts, e.g. ``pipe:`` or HTTP); use it for one pass over data that is not local.

The converter (:func:`write_shards`) decodes every file first and excludes the ones that fail
(listed in the index and printed), so a sharded dataset holds only usable audio.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import attrs

from mtrun.errors import MtrunError
from mtrun.interfaces import Sample

__all__ = ["INDEX_FILE", "TarMember", "WebDatasetSource", "expand_pattern", "read_shard", "sample_from_metadata", "write_shards"]

INDEX_FILE = "index.json"
AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "m4a", "aac", "aiff", "aif", "au", "wv")


@attrs.frozen
class TarMember:
    """An audio file stored inside an uncompressed tar: ``open()`` gives its bytes.

    Picklable and small, so samples holding it cross into DataLoader workers cheaply; each
    ``open`` reads only this member's byte range.
    """

    tar: str
    offset: int
    size: int
    member: str

    @property
    def name(self) -> str:
        return f"{self.tar}#{self.member}"

    @property
    def suffix(self) -> str:
        return Path(self.member).suffix

    def open(self) -> io.BytesIO:
        with open(self.tar, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            from mtrun.data.audio import AudioDecodeError

            raise AudioDecodeError(f"audio {self.name!r}: truncated shard ({len(data)} of {self.size} bytes)", kind="truncated", path=self.name)
        return io.BytesIO(data)


def expand_pattern(pattern: str, *, base: Path | None = None) -> list[str]:
    """Shard files named by a brace pattern (``train-{000000..000009}.tar``) and/or a glob.

    Relative patterns are taken from ``base`` (the working directory when ``None``). The
    result is sorted, so the sample order — and with it every seeded choice — is stable.
    """
    import braceexpand  # a dependency of webdataset

    out: list[str] = []
    for expanded in braceexpand.braceexpand(pattern):
        path = Path(expanded).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)]
        out += matches
    return sorted(dict.fromkeys(out))


def _key_and_ext(member: str) -> tuple[str, str]:
    # WebDataset: the key is the path up to the first dot of the file name.
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_shard(path: str | Path) -> list[Sample]:
    """The samples of one local shard, audio as :class:`TarMember` references.

    Raises:
        MtrunError: The shard is missing or not a tar file, or a key has metadata but no
            audio member (or the reverse); the message names the shard and the key.
    """
    file = str(path)
    if not os.path.isfile(file):
        raise MtrunError(f"shard not found: {file}")
    groups: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    try:
        with tarfile.open(file, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _key_and_ext(info.name)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                if ext == "json":
                    handle = tar.extractfile(info)
                    try:
                        groups[key]["json"] = json.loads(handle.read().decode("utf-8")) if handle else {}
                    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                        raise MtrunError(f"{file}: member {info.name!r} is not valid JSON: {exc}") from None
                elif ext.rpartition(".")[2] in AUDIO_EXTENSIONS:
                    groups[key]["audio"] = TarMember(file, info.offset_data, info.size, info.name)
    except tarfile.TarError as exc:
        raise MtrunError(f"{file}: not a readable (uncompressed) tar shard: {exc}") from None
    samples = []
    for key in order:
        group = groups[key]
        if "audio" not in group or "json" not in group:
            what = "audio" if "audio" not in group else "json metadata"
            raise MtrunError(f"{file}: key {key!r} has no {what} member")
        samples.append(sample_from_metadata(group["json"], key, group["audio"]))
    return samples


def sample_from_metadata(meta: dict[str, Any], key: str, audio: Any, sample_rate: int | None = None) -> Sample:
    """A :class:`Sample` from a shard member's JSON; one reading for files and streams."""
    captions = meta.get("captions")
    if captions is None:
        captions = [meta["caption"]] if meta.get("caption") else []
    return Sample(
        id=str(meta.get("id", key)),
        audio=audio,
        sample_rate=sample_rate,
        captions=[str(c) for c in captions],
        tags={str(k): [str(v) for v in vs] for k, vs in (meta.get("tags") or {}).items()},
        group=meta.get("group"),
        extra=dict(meta.get("extra") or {}),
    )


class WebDatasetSource:
    """Audio + JSON tar shards (WebDataset layout), e.g. written by ``mtrun data shard``.

    Either ``path`` names a folder written by the converter (its ``index.json`` lists the
    shards of each split; without an index, ``SPLIT-*.tar`` files are grouped by split), or
    ``splits`` maps each split to a brace/glob pattern of shard files.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"captions"})  # text-to-music retrieval needs them

    @attrs.frozen
    class Config:
        path: str = attrs.field(
            default="", metadata={"help": "folder of shards written by `mtrun data shard` (holds index.json)"}
        )
        splits: dict[str, str] = attrs.field(
            factory=dict,
            metadata={"help": "split -> shard pattern (brace and/or glob), e.g. {train = \"shards/train-{000000..000009}.tar\"}; "
                      "relative to `path` when set, else to the working directory"},
        )

    def __init__(self, config: Config):
        self.config = config
        self._cache: dict[str, list[Sample]] = {}

    def _base(self) -> Path | None:
        return Path(self.config.path).expanduser() if self.config.path else None

    def shard_files(self) -> dict[str, list[str]]:
        """Split → shard files, in order."""
        base = self._base()
        if self.config.splits:
            return {split: expand_pattern(pattern, base=base) for split, pattern in self.config.splits.items()}
        if base is None:
            raise MtrunError("webdataset: set [data].path (a folder written by `mtrun data shard`) or [data].splits")
        if not base.is_dir():
            raise MtrunError(f"webdataset: shard folder not found: {base} (set by [data].path)")
        index = base / INDEX_FILE
        if index.is_file():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                return {split: [str(base / name) for name in entry["shards"]] for split, entry in data["splits"].items()}
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise MtrunError(
                    f"webdataset: {index} is not a valid shard index ({type(exc).__name__}: {exc}); "
                    f"rewrite it with `mtrun data shard`, or delete it to list the folder's SPLIT-NNNNNN.tar files"
                ) from None
        found: dict[str, list[str]] = {}
        for shard in sorted(base.glob("*.tar")):
            split = shard.name.rsplit("-", 1)[0]
            found.setdefault(split, []).append(str(shard))
        if not found:
            raise MtrunError(f"webdataset: no {INDEX_FILE} and no SPLIT-NNNNNN.tar shards in {base}")
        return found

    def splits(self) -> Sequence[str]:
        return tuple(self.shard_files())

    def load(self, split: str) -> Sequence[Sample]:
        if split not in self._cache:
            files = self.shard_files()
            if split not in files:
                raise KeyError(f"no split {split!r}; these shards have: {', '.join(files) or 'none'}")
            if not files[split]:
                raise MtrunError(f"webdataset: split {split!r} matches no shard files")
            self._cache[split] = [sample for shard in files[split] for sample in read_shard(shard)]
        return self._cache[split]

    def stream(self, split: str) -> Iterator[Sample]:
        """One sequential pass over a split's shards with the ``webdataset`` library, samples
        carrying decoded waveforms. For data too remote or too large for :meth:`load`."""
        import webdataset

        from mtrun.data.audio import decode

        files = self.shard_files()
        if split not in files:
            raise MtrunError(f"webdataset: no split {split!r}; these shards have: {', '.join(files) or 'none'}")
        urls = files[split]
        dataset = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False)
        for item in dataset:
            if "json" not in item:
                raise MtrunError(f"webdataset: key {item.get('__key__')!r} in {item.get('__url__')} has no json metadata member")
            meta = json.loads(item["json"])
            audio_ext = next((k for k in item if k.rpartition(".")[2] in AUDIO_EXTENSIONS), None)
            if audio_ext is None:
                raise MtrunError(f"webdataset: key {item.get('__key__')!r} in {item.get('__url__')} has no audio member")
            wave, rate = decode(_BytesAudio(item[audio_ext], f"{item.get('__url__')}#{item.get('__key__')}.{audio_ext}"))
            yield sample_from_metadata(meta, item["__key__"], wave, rate)


@attrs.frozen
class _BytesAudio:
    data: bytes
    name: str

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)


# ----------------------------------------------------------------------------- converter


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same input gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    splits: Mapping[str, Sequence[Sample]],
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    source: str = "",
    progress: Callable[[str, int], Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Check that every sample decodes, then write ``OUT/{split}-{i:06d}.tar`` and an index.

    Each item's audio file is stored byte for byte (no re-encoding, no quality loss); an item
    whose audio fails to decode, is silent or holds NaN is excluded and listed in the index's
    ``excluded`` with the reason. Items holding waveforms instead of files are written as FLAC.

    Args:
        splits: ``{split: samples}``.
        out_dir: The output folder (created).
        shard_size: Items per shard.
        source: Where the samples came from, recorded in the index.
        progress: Called with ``(split, items done)`` after each item (for a progress bar).
        overwrite: Replace the shards an earlier run wrote in ``OUT``. Without it such a folder
            is refused: shards are rewritten in place, so a crash part-way would leave the old
            index pointing at half-written tars.

    Returns:
        The index written to ``OUT/index.json``: ``splits`` (shards and counts per split),
        ``excluded`` ([{id, path, reason}]).
    """
    import torch

    from mtrun.data.audio import AudioDecodeError, check_waveform, decode, describe_audio, to_mono

    if shard_size <= 0:
        raise MtrunError(f"shard size must be positive (got {shard_size})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    earlier = sorted(p for p in out.iterdir() if p.name == INDEX_FILE or p.suffix == ".tar")
    if earlier and not overwrite:
        raise MtrunError(f"{out} already holds shards ({len(earlier)} files, e.g. {earlier[0].name}); pick another folder, or pass --force to replace them")
    for old in sorted(earlier, key=lambda p: p.name != INDEX_FILE):  # the index first: never one pointing at new tars
        old.unlink()
    index: dict[str, Any] = {"format": "mtrun-webdataset", "version": 1, "source": source, "splits": {}, "excluded": []}
    for split, samples in splits.items():
        shards: list[str] = []
        count = 0
        tar: tarfile.TarFile | None = None
        try:
            for done, sample in enumerate(samples, 1):
                try:
                    if torch.is_tensor(sample.audio):
                        wave = torch.as_tensor(sample.audio).float()
                        check_waveform(to_mono(wave), f"sample {sample.id!r}")
                        payload, ext = _flac_bytes(wave, int(sample.sample_rate)), "flac"
                    else:
                        wave, rate = decode(sample.audio)
                        check_waveform(to_mono(wave), f"sample {sample.id!r} ({describe_audio(sample.audio)})")
                        ext = Path(describe_audio(sample.audio)).suffix.lower().lstrip(".")
                        if ext in AUDIO_EXTENSIONS:
                            with (open(sample.audio, "rb") if isinstance(sample.audio, (str, os.PathLike)) else sample.audio.open()) as handle:
                                payload = handle.read()
                        else:  # an extension readers would not recognise: store FLAC instead
                            payload, ext = _flac_bytes(wave, rate), "flac"
                except AudioDecodeError as exc:
                    index["excluded"].append(
                        {"id": sample.id, "split": split, "path": describe_audio(sample.audio), "kind": exc.kind, "reason": str(exc)}
                    )
                    if progress:
                        progress(split, done)
                    continue
                if tar is None or count % shard_size == 0:
                    if tar is not None:
                        tar.close()
                    name = f"{split}-{len(shards):06d}.tar"
                    shards.append(name)
                    tar = tarfile.open(out / name, mode="w", format=tarfile.PAX_FORMAT)
                key = f"s{count:09d}"
                meta = {
                    "id": sample.id,
                    "captions": list(sample.captions),
                    "tags": {k: list(v) for k, v in sample.tags.items()},
                    "group": sample.group,
                    "extra": _jsonable(sample.extra),
                }
                _add_member(tar, f"{key}.{ext}", payload)
                _add_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
                count += 1
                if progress:
                    progress(split, done)
        finally:
            if tar is not None:
                tar.close()
        index["splits"][split] = {"shards": shards, "count": count}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return index


def _flac_bytes(wave: Any, rate: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    array = (wave if wave.dim() == 2 else wave[None]).T.clamp(-1, 1).numpy()
    soundfile.write(buffer, array, rate, format="FLAC", subtype="PCM_24")
    return buffer.getvalue()


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return str(value)
