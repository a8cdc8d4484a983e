"""The published-dataset helpers: a held-out share that never moves between machines or runs."""

from __future__ import annotations

import zlib

import pytest

from mtrun import Sample
from mtrun_datasets.published import hold_out


@pytest.mark.parametrize("fraction", [0.05, 0.1, 1 / 3])
def test_hold_out_hashes_each_group_into_the_same_share_as_a_crc32_rule(fraction):
    """The rule the adapters' validation splits were first published with: crc32(group) / 2^32 < fraction."""
    samples = [Sample(id=f"clip{i}", audio=f"{i}.wav", captions=["x"], group=f"track{i // 3}") for i in range(3000)]
    kept, held = hold_out(samples, fraction)
    expected = {s.id for s in samples if zlib.crc32((s.group or s.id).encode("utf-8")) / 2**32 < fraction}
    assert {s.id for s in held} == expected and len(kept) + len(held) == len(samples)
    assert abs(len(held) / len(samples) - fraction) < 0.05
    assert not {s.group for s in held} & {s.group for s in kept}  # a track is never on both sides
    assert hold_out(samples, 0.0) == (samples, [])
