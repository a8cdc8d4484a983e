"""Read TensorFlow (V2, "tensor bundle") checkpoints without TensorFlow.

A checkpoint with prefix ``P`` is two kinds of file:

* ``P.index``: an immutable sorted string table in LevelDB's table format
  (https://github.com/google/leveldb/blob/main/doc/table_format.md, as copied into
  ``tensorflow/core/lib/io/table*``). It ends in a 48-byte footer: the block handles
  (two varint64 pairs ``offset, size``) of the metaindex and index blocks, zero padding, and the
  magic number ``0xdb4775248b80fb57``. The index block maps keys to the handles of the data
  blocks. Every block is followed by a 5-byte trailer: a compression byte (TensorFlow writes
  bundles uncompressed, 0) and the masked CRC-32C of block and compression byte. A block holds
  prefix-compressed entries ``varint32 shared, varint32 non_shared, varint32 value_length,
  key[shared:], value``, then ``uint32`` restart offsets and their ``uint32`` count.
* ``P.data-SSSSS-of-NNNNN``: the tensors' raw bytes, little-endian, C order, back to back.

In the table, the empty key holds a ``BundleHeaderProto`` (``num_shards`` = 1,
``endianness`` = 2) and each tensor's name holds a ``BundleEntryProto``
(``tensorflow/core/protobuf/tensor_bundle.proto``): ``dtype`` = 1 (a ``DataType`` enum,
``tensorflow/core/framework/types.proto``), ``shape`` = 2 (``TensorShapeProto``: repeated
``dim`` = 2, each with ``size`` = 1), ``shard_id`` = 3, ``offset`` = 4, ``size`` = 5,
``crc32c`` = 6 (fixed32, masked) and ``slices`` = 7 (partitioned variables, not supported here).
Those few protobuf fields are decoded by hand below, so no ``protobuf`` package is needed.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mtrun import MtrunError

__all__ = ["TensorInfo", "checkpoint_prefix", "crc32c", "read_checkpoint", "read_index"]

_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48
_TRAILER = 5

_DTYPES: dict[int, str] = {
    # tensorflow/core/framework/types.proto: DataType enum value -> numpy dtype (little-endian)
    1: "<f4",  # DT_FLOAT
    2: "<f8",  # DT_DOUBLE
    3: "<i4",  # DT_INT32
    4: "u1",  # DT_UINT8
    5: "<i2",  # DT_INT16
    6: "i1",  # DT_INT8
    9: "<i8",  # DT_INT64
    10: "?",  # DT_BOOL
    17: "<u2",  # DT_UINT16
    19: "<f2",  # DT_HALF
    22: "<u4",  # DT_UINT32
    23: "<u8",  # DT_UINT64
}


class TensorInfo(NamedTuple):
    """Where one tensor lives in a checkpoint, as its ``BundleEntryProto`` says."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard: int
    shards: int
    offset: int
    size: int
    crc32c: int | None


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; pure Python, fine for kilobytes."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    # LevelDB/TensorFlow store checksums "masked" so that a CRC of data holding CRCs stays strong.
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """``(field number, value)`` of a protobuf message: ints for varint/fixed, bytes otherwise."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            (value,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value = bytes(buf[pos : pos + length])
            pos += length
        elif wire == 5:
            (value,) = struct.unpack_from("<I", buf, pos)
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, value))
    return out


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _entry(name: str, buf: bytes) -> TensorInfo:
    dtype, shard, offset, size, crc = 0, 0, 0, 0, None
    shape: list[int] = []
    for number, value in _fields(buf):
        if number == 1:
            dtype = int(value)
        elif number == 2:
            for dim_number, dim in _fields(value):  # TensorShapeProto
                if dim_number == 2:
                    sizes = [_int64(int(v)) for n, v in _fields(dim) if n == 1]
                    shape.append(sizes[0] if sizes else 0)
                elif dim_number == 3 and value:
                    raise ValueError(f"{name}: tensor of unknown rank")
        elif number == 3:
            shard = int(value)
        elif number == 4:
            offset = int(value)
        elif number == 5:
            size = int(value)
        elif number == 6:
            crc = int(value)
        elif number == 7:
            raise ValueError(f"{name}: partitioned (sliced) variables are not supported")
    return TensorInfo(name, dtype, tuple(shape), shard, 1, offset, size, crc)


def _block(data: bytes, handle: bytes | tuple[int, int], what: str) -> bytes:
    if isinstance(handle, bytes):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
    else:
        offset, size = handle
    if offset + size + _TRAILER > len(data):
        raise ValueError(f"{what}: block at {offset} (+{size}) runs past the end of the file")
    block = data[offset : offset + size]
    kind = data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if _masked(crc32c(data[offset : offset + size + 1])) != stored:
        raise ValueError(f"{what}: checksum mismatch in the block at {offset}")
    if kind != 0:
        raise ValueError(f"{what}: compressed blocks (type {kind}) are not supported")
    return block


def _entries(block: bytes) -> list[tuple[bytes, bytes]]:
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * restarts
    out: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        out.append((key, block[pos : pos + length]))
        pos += length
    return out


def checkpoint_prefix(path: str | Path) -> str:
    """The prefix ``P`` of the checkpoint at ``path`` (``P``, ``P.index`` or a folder holding one).

    A folder with exactly one ``*.index`` file names that checkpoint; musicnn's folders hold the
    prefix ``folder/`` itself (files ``.index`` and ``.data-00000-of-00001``), which is why the
    prefix is a string: a ``Path`` would drop the trailing separator.
    """
    path = Path(path).expanduser()
    text = str(path)
    if text.endswith(".index") and path.is_file():
        return text[: -len(".index")]
    if Path(text + ".index").is_file():
        return text
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.endswith(".index") and p.is_file())
        if len(found) == 1:
            return str(found[0])[: -len(".index")]
        if len(found) > 1:
            raise MtrunError(f"{path}: several checkpoints ({', '.join(p.name for p in found)}); pass one prefix")
    raise MtrunError(f"{path}: no TensorFlow checkpoint there (expected {path}.index or a folder with one *.index file)")


def _index_file(prefix: str) -> Path:
    return Path(prefix + ".index")


def read_index(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint: name -> dtype, shape, shard, offset and size (no data read).

    Args:
        path: The checkpoint prefix, its ``.index`` file, or a folder holding one checkpoint.

    Raises:
        MtrunError: The files are missing or not a tensor bundle (bad magic, checksum, ...).
    """
    prefix = checkpoint_prefix(path)
    index = _index_file(prefix)
    data = index.read_bytes()
    try:
        if len(data) < _FOOTER or struct.unpack_from("<Q", data, len(data) - 8)[0] != _MAGIC:
            raise ValueError("not a LevelDB table (bad magic number)")
        footer = data[len(data) - _FOOTER :]
        _, pos = _varint(footer, 0)  # metaindex handle: unused by tensor bundles
        _, pos = _varint(footer, pos)
        offset, pos = _varint(footer, pos)
        size, _ = _varint(footer, pos)
        header: list[tuple[int, int | bytes]] | None = None
        infos: dict[str, TensorInfo] = {}
        for _, handle in _entries(_block(data, (offset, size), str(index))):
            for key, value in _entries(_block(data, handle, str(index))):
                if key == b"":
                    header = _fields(value)
                else:
                    name = key.decode("utf-8")
                    infos[name] = _entry(name, value)
        if header is None:
            raise ValueError("no bundle header (empty key)")
        head = dict(header)
        if head.get(2, 0) != 0:
            raise ValueError("big-endian bundles are not supported")
        shards = int(head.get(1, 1))
        for info in infos.values():
            if info.shard >= shards:
                raise ValueError(f"{info.name}: shard {info.shard} of {shards}")
    except (ValueError, struct.error, IndexError, UnicodeDecodeError) as exc:
        raise MtrunError(f"{index}: not a readable TensorFlow checkpoint index ({exc})") from exc
    return {name: info._replace(shards=shards) for name, info in infos.items()}


def _data_file(prefix: str, info: TensorInfo) -> Path:
    return Path(f"{prefix}.data-{info.shard:05d}-of-{info.shards:05d}")


def read_checkpoint(path: str | Path, names: list[str] | None = None, *, verify: bool = False) -> dict[str, np.ndarray]:
    """Read tensors of a TensorFlow checkpoint as numpy arrays (copies, writable).

    Args:
        path: The checkpoint prefix, its ``.index`` file, or a folder holding one checkpoint.
        names: Only these tensors (default: all).
        verify: Also check each tensor's CRC-32C (pure Python: about a second per few MB).

    Raises:
        MtrunError: A file is missing or damaged, a name is absent, or a dtype is unsupported.
    """
    prefix = checkpoint_prefix(path)
    infos = read_index(prefix)
    wanted = list(infos) if names is None else list(names)
    missing = [n for n in wanted if n not in infos]
    if missing:
        raise MtrunError(f"{prefix}: no tensor named {', '.join(missing)}")
    blobs: dict[int, bytes] = {}
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        info = infos[name]
        file = _data_file(prefix, info)
        if info.shard not in blobs:
            if not file.is_file():
                raise MtrunError(f"{prefix}: the data file {file.name} is missing")
            blobs[info.shard] = file.read_bytes()
        blob = blobs[info.shard]
        if info.dtype not in _DTYPES:
            raise MtrunError(f"{prefix}: {name} has TensorFlow dtype {info.dtype}, which this reader does not decode")
        dtype = np.dtype(_DTYPES[info.dtype])
        count = int(np.prod(info.shape, dtype=np.int64))
        if count * dtype.itemsize != info.size or info.offset + info.size > len(blob):
            raise MtrunError(f"{prefix}: {name}: {info.size} bytes at {info.offset} do not hold a {dtype} tensor of shape {info.shape}")
        raw = blob[info.offset : info.offset + info.size]
        if verify and info.crc32c is not None and _masked(crc32c(raw)) != info.crc32c:
            raise MtrunError(f"{prefix}: {name}: checksum mismatch (damaged data file?)")
        out[name] = np.frombuffer(raw, dtype=dtype).reshape(info.shape).astype(dtype.newbyteorder("="), copy=True)
    return out
