"""Specification of the TensorFlow checkpoint reader, on the checkpoints the musicnn wheel ships."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from mtrun import MtrunError
from mtrun_musicnn.tf_checkpoint import checkpoint_prefix, crc32c, read_checkpoint, read_index
from mtrun_musicnn.weights import musicnn_folder


@pytest.fixture(scope="module")
def mtt():
    return str(musicnn_folder() / "MTT_musicnn") + "/"


def test_crc32c_matches_the_published_check_value():
    # RFC 3720 appendix B.4 / the CRC catalogue's check value for "123456789".
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA


def test_index_lists_every_tensor_with_dtype_and_shape(mtt):
    index = read_index(mtt)
    assert len(index) == 150
    assert index["conv2d/kernel"].shape == (7, 38, 1, 204)  # 7 frames x 40 % of 96 mel bands
    assert index["conv2d_5/kernel"].shape == (7, 561, 1, 64)
    assert index["dense/kernel"].shape == (1506, 200)
    assert index["batch_normalization/moving_mean"].shape == (1,)
    assert index["beta1_power"].shape == ()
    assert all(info.dtype == 1 and info.shards == 1 for info in index.values())  # DT_FLOAT, one shard
    sizes = sorted((info.offset, info.size) for info in index.values())
    assert all(a + s <= b for (a, s), (b, _) in zip(sizes, sizes[1:]))  # tensors do not overlap


def test_prefix_index_file_and_folder_name_the_same_checkpoint(mtt):
    folder = mtt.rstrip("/")
    assert checkpoint_prefix(folder) == checkpoint_prefix(mtt + ".index") == checkpoint_prefix(mtt) == mtt


def test_tensors_come_back_with_their_shapes_and_checksums(mtt):
    index = read_index(mtt)
    small = [name for name, info in index.items() if info.size < 8192]
    values = read_checkpoint(mtt, small, verify=True)
    assert set(values) == set(small)
    assert values["batch_normalization_9/moving_variance"].shape == (1506,)
    assert np.all(values["batch_normalization_9/moving_variance"] > 0)  # variances
    kernel = read_checkpoint(mtt, ["dense_1/kernel"])["dense_1/kernel"]
    assert kernel.shape == (200, 50) and kernel.dtype == np.float32 and kernel.flags.writeable


def _copy(src: str, dst) -> str:
    dst.mkdir()
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copyfile(src + suffix, str(dst) + "/" + suffix)
    return str(dst) + "/"


def test_a_damaged_index_is_refused(mtt, tmp_path):
    prefix = _copy(mtt, tmp_path / "ckpt")
    raw = bytearray(open(prefix + ".index", "rb").read())
    raw[100] ^= 0xFF
    open(prefix + ".index", "wb").write(bytes(raw))
    with pytest.raises(MtrunError, match="checksum mismatch"):
        read_index(prefix)
    open(prefix + ".index", "wb").write(bytes(raw[:-8]) + bytes(8))
    with pytest.raises(MtrunError, match="bad magic"):
        read_index(prefix)


def test_damaged_tensor_bytes_are_caught_when_verifying(mtt, tmp_path):
    prefix = _copy(mtt, tmp_path / "ckpt")
    info = read_index(prefix)["batch_normalization_1/gamma"]
    with open(prefix + ".data-00000-of-00001", "r+b") as f:
        f.seek(info.offset + 3)
        byte = f.read(1)
        f.seek(info.offset + 3)
        f.write(bytes([byte[0] ^ 0x01]))
    read_checkpoint(prefix, [info.name])  # no verification: reads the damaged value
    with pytest.raises(MtrunError, match="checksum mismatch"):
        read_checkpoint(prefix, [info.name], verify=True)


def test_missing_files_and_names_are_clear_errors(mtt, tmp_path):
    with pytest.raises(MtrunError, match="no TensorFlow checkpoint there"):
        read_index(tmp_path)
    with pytest.raises(MtrunError, match="no tensor named nope"):
        read_checkpoint(mtt, ["nope"])
    prefix = _copy(mtt, tmp_path / "ckpt")
    (tmp_path / "ckpt" / ".data-00000-of-00001").unlink()
    with pytest.raises(MtrunError, match="data file .data-00000-of-00001 is missing"):
        read_checkpoint(prefix, ["dense/bias"])
