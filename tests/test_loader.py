"""The batch loader: reproducible order and crops, exact DDP shards, resume, resampling."""

from __future__ import annotations

import math

import pytest
import torch

from mtrun.data.loader import AudioDecodeError, BatchLoader, prepare_waveform, sample_text
from mtrun.interfaces import Sample
from mtrun.run import LoaderConfig


def tones(n: int = 24, rate: int = 8000, seconds: float = 0.5) -> list[Sample]:
    t = torch.arange(int(rate * seconds)) / rate
    return [
        Sample(
            id=f"s{i}",
            audio=torch.sin(2 * math.pi * (200 + 10 * i) * t + i),
            sample_rate=rate,
            captions=[f"tone {i} first", f"tone {i} second", f"tone {i} third"],
            tags={"genre": [f"g{i % 3}"], "mood": ["calm"]},
        )
        for i in range(n)
    ]


def tokenize(texts):
    ids = torch.tensor([[len(t), len(t.split())] for t in texts], dtype=torch.long).reshape(len(texts), 2)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def make(samples=None, **kw) -> BatchLoader:
    defaults = dict(config=LoaderConfig(clip_seconds=0.25, crop="random"), sample_rate=8000, tokenize=tokenize, batch_size=8, seed=3)
    defaults.update(kw)
    return BatchLoader(tones() if samples is None else samples, **defaults)


def flatten(loader: BatchLoader, epoch: int, start: int = 0):
    return [(b, m, batch) for b, m, batch in loader.micro_batches(epoch, start)]


def assert_batches_equal(a, b):
    assert a["ids"] == b["ids"]
    assert a["texts"] == b["texts"]
    assert torch.equal(a["waveforms"], b["waveforms"])
    assert all(torch.equal(a["text_inputs"][k], b["text_inputs"][k]) for k in a["text_inputs"])


def test_batches_have_the_collated_keys_and_shapes():
    (_, _, batch), *_ = flatten(make(), 0)
    assert set(batch) >= {"ids", "waveforms", "texts", "tags", "groups", "text_inputs"}
    assert batch.waveforms.shape == (8, 2000) and batch.waveforms.dtype == torch.float32
    assert len(batch.texts) == len(batch.tags) == len(batch.groups) == 8
    assert batch.text_inputs["input_ids"].shape[0] == 8


def test_same_seed_and_epoch_give_identical_batches_and_epochs_differ():
    first, second = flatten(make(), 1), flatten(make(), 1)
    for (_, _, a), (_, _, b) in zip(first, second):
        assert_batches_equal(a, b)
    assert make().order(0) != make().order(1)
    assert sorted(make().order(0)) == list(range(24))
    assert make(seed=4).order(0) != make().order(0)


def test_workers_build_the_same_batches_as_the_main_process():
    in_process = flatten(make(), 0)
    with_workers = flatten(make(config=LoaderConfig(clip_seconds=0.25, crop="random", num_workers=2)), 0)
    assert len(in_process) == len(with_workers) == 3
    for (_, _, a), (_, _, b) in zip(in_process, with_workers):
        assert_batches_equal(a, b)


@pytest.mark.parametrize(("world", "accum"), [(2, 1), (2, 2), (4, 2)])
def test_rank_shares_partition_each_global_batch_exactly(world, accum):
    single = make(batch_size=16, grad_accum=accum)
    ranks = [make(batch_size=16, grad_accum=accum, rank=r, world_size=world) for r in range(world)]
    for b in range(single.num_batches):
        global_batch = single.global_batch(0, b)
        assert len(global_batch) == 16
        # Micro-batch m of the single process is the rank shares of micro-batch m, in rank order.
        for m in range(accum):
            joined = sum((loader.shard(global_batch, m) for loader in ranks), [])
            assert joined == single.shard(global_batch, m)
        pieces = [loader.shard(global_batch, m) for m in range(accum) for loader in ranks]
        assert sorted(sum(pieces, [])) == sorted(global_batch)
        assert len({len(p) for p in pieces}) == 1
    # The built batches agree too: same crops and captions whatever the rank.
    single_batches = flatten(single, 0)
    per_rank = [flatten(loader, 0) for loader in ranks]
    for i, (_, _, whole) in enumerate(single_batches):
        ids = sum((per_rank[r][i][2]["ids"] for r in range(world)), [])
        waves = torch.cat([per_rank[r][i][2]["waveforms"] for r in range(world)])
        assert ids == whole["ids"]
        assert torch.equal(waves, whole["waveforms"])


def test_indivisible_batch_is_refused_with_the_numbers():
    with pytest.raises(Exception, match="divisible"):
        make(batch_size=6, grad_accum=2, world_size=2)


def test_resuming_at_a_global_batch_yields_exactly_the_remaining_batches():
    loader = make(grad_accum=2)
    full = flatten(loader, 2)
    resumed = flatten(loader, 2, start=1)
    assert [(b, m) for b, m, _ in resumed] == [(b, m) for b, m, _ in full if b >= 1]
    for (_, _, a), (_, _, b) in zip(resumed, [x for x in full if x[0] >= 1]):
        assert_batches_equal(a, b)


def test_training_drops_the_partial_batch_and_evaluation_keeps_every_item():
    assert make(batch_size=10).num_batches == 2
    evaluation = make(batch_size=10, training=False)
    assert evaluation.num_batches == 3
    assert sum(len(b["ids"]) for b in evaluation) == 24
    assert evaluation.order(0) == list(range(24))


def test_resampling_to_the_encoder_rate_reproduces_the_tone():
    rate_in, rate_out, freq = 16000, 8000, 440.0
    t_in = torch.arange(rate_in) / rate_in
    sample = Sample(id="a", audio=torch.sin(2 * math.pi * freq * t_in), sample_rate=rate_in)
    wave = prepare_waveform(sample, sample_rate=rate_out, clip_samples=rate_out, crop="start")
    t_out = torch.arange(rate_out) / rate_out
    expected = torch.sin(2 * math.pi * freq * t_out)
    # Away from the edges (filter transients) the resampled tone is the tone at the new rate.
    assert wave.shape == (rate_out,)
    assert torch.allclose(wave[200:-200], expected[200:-200], atol=2e-3)
    loader = make(samples=[sample] * 8, sample_rate=rate_out, config=LoaderConfig(clip_seconds=0.5, crop="center"))
    batch = flatten(loader, 0)[0][2]
    assert batch.waveforms.shape == (8, 4000)


def test_stereo_is_averaged_short_audio_padded_and_crops_follow_the_policy():
    stereo = Sample(id="st", audio=torch.stack([torch.ones(10), 3 * torch.ones(10)]), sample_rate=10)
    assert torch.equal(prepare_waveform(stereo, sample_rate=10, clip_samples=12, crop="start"), torch.tensor([2.0] * 10 + [0.0] * 2))
    ramp = Sample(id="r", audio=torch.arange(10.0), sample_rate=10)
    assert prepare_waveform(ramp, sample_rate=10, clip_samples=4, crop="start").tolist() == [0, 1, 2, 3]
    assert prepare_waveform(ramp, sample_rate=10, clip_samples=4, crop="center").tolist() == [3, 4, 5, 6]
    offsets = {
        int(prepare_waveform(ramp, sample_rate=10, clip_samples=4, crop="random", generator=torch.Generator().manual_seed(s))[0])
        for s in range(50)
    }
    assert offsets == set(range(7))  # every valid offset is reachable


def test_random_crops_and_captions_are_reproducible_per_seed_epoch_and_item():
    a, b = make(), make()
    assert torch.equal(a.make_batch([0, 1, 2], epoch=5)["waveforms"], b.make_batch([0, 1, 2], epoch=5)["waveforms"])
    assert a.make_batch([0, 1, 2], epoch=5)["texts"] == b.make_batch([0, 1, 2], epoch=5)["texts"]
    # Over epochs an item gets different crops and every caption.
    texts = {a.make_batch([0], epoch=e)["texts"][0] for e in range(30)}
    assert texts == {"tone 0 first", "tone 0 second", "tone 0 third"}
    crops = {a.make_batch([0], epoch=e)["waveforms"][0, 0].item() for e in range(10)}
    assert len(crops) > 1


def test_tags_are_joined_when_there_is_no_caption_and_evaluation_uses_the_first_caption():
    bare = Sample(id="x", audio=torch.zeros(4), sample_rate=4, tags={"genre": ["reel", "jig"], "instrument": ["fiddle"]})
    assert sample_text(bare, training=True) == "reel, jig, fiddle"
    assert sample_text(tones()[0], training=False) == "tone 0 first"


def test_sample_augmenters_see_the_step_and_change_the_sample():
    seen = []

    class Shout:
        stage = "sample"

        def __call__(self, sample, context):
            seen.append((context.step, context.epoch, context.training, context.generator is not None))
            return Sample(id=sample.id, audio=sample.audio, sample_rate=sample.sample_rate, captions=[sample.captions[0].upper()])

    loader = make(augmenters=[Shout()], steps_per_epoch=3, total_steps=9)
    batches = flatten(loader, 1)
    assert all(t.isupper() for t in batches[0][2]["texts"])
    assert seen[0] == (3, 1, True, True) and seen[-1][0] == 5
    evaluation = make(augmenters=[Shout()], training=False)
    assert not any(t.isupper() for t in next(iter(evaluation))["texts"])


def test_an_undecodable_file_names_the_sample_and_the_path(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio at all")
    sample = Sample(id="broken-1", audio=str(bad))
    with pytest.raises(AudioDecodeError, match=r"broken-1.*broken\.wav"):
        prepare_waveform(sample, sample_rate=8000, clip_samples=100, crop="start")
