"""Serving frozen encoder outputs by item key (mtrun.encoder_cache.ItemStore, the loader's
``served_items``): from the second epoch a clip whose outputs the cache holds is not decoded,
and the step computes what it computes on the decoded clip; whatever could make a served clip
wrong (a changed file, another crop, an augmenter on the audio, a lost entry) decodes again or
stops with an error.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrun.encoder_cache import EncoderCache, ItemStore
from mtrun.interfaces import AugmentContext, Sample

torch.set_num_threads(1)

RATE = 24_000  # MERT's: the loader does not resample
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def mert():
    from mtrun_mert import MertEncoder

    torch.manual_seed(0)
    return MertEncoder(MertEncoder.Config(preset="tiny", frozen=True))


def wav_files(folder: Path, n: int, seconds: float = 1.0) -> list[Path]:
    import soundfile

    g = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"clip{i}.wav"
        soundfile.write(path, (g.standard_normal(int(RATE * seconds)) * 0.2).astype("float32"), RATE)
        paths.append(path)
    return paths


def duet_mc(tmp_path: Path, cache: EncoderCache | None):
    from test_duet_mc import RECIPES

    from mtrun.assemble import assemble
    from mtrun.plugins import get_plugins
    from mtrun.recipe import load_recipe, resolve_recipe
    from mtrun.run import Run

    data = load_recipe(RECIPES / "duet_mc.toml", overrides=["text_encoder.frozen=true"], profile="tiny")
    resolved = resolve_recipe(data, get_plugins().registry, "duet_mc.toml")
    run = Run(dir=tmp_path / "run", config=resolved.run, loader=resolved.loader, recipe=resolved.data)
    torch.manual_seed(0)
    return assemble(resolved, run, encoder_cache=cache).system.train()


def loader_for(system, paths: list[Path], crop: str = "start", clip_seconds: float = 0.5):
    from mtrun.data.loader import BatchLoader
    from mtrun.run import LoaderConfig

    samples = [
        Sample(id=f"s{i}", audio=path, captions=[f"a piece for instrument {i}"], tags={"genre": ["folk"], "instrument": [f"i{i}"]})
        for i, path in enumerate(paths)
    ]
    loader = BatchLoader(
        samples,
        batch_size=len(samples),
        training=True,
        augmenters=system.sample_augmenters,
        config=LoaderConfig(clip_seconds=clip_seconds, crop=crop, probe_items=0),
        sample_rate=system.audio_encoder.sample_rate,
        tokenize=system.text_encoder.tokenize,
        steps_per_epoch=1,
        total_steps=4,
    )
    loader.served_items = system.served_items
    return loader


def context(step: int) -> AugmentContext:
    return AugmentContext(step=step, epoch=step, steps_per_epoch=1, total_steps=4, training=True,
                          generator=torch.Generator().manual_seed(step))


def step(system, batch, at: int):
    system.zero_grad()
    loss, _ = system(copy.deepcopy(batch), context(at))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None}


def count_decodes(loader, monkeypatch) -> list[int]:
    calls = [0]
    original = type(loader)._prepare

    def counting(self, *args, **kwargs):
        calls[0] += self is loader
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(loader), "_prepare", counting)
    return calls


# ---------------------------------------------------------------------- the loop


@pytest.mark.parametrize("disk", [False, True], ids=["memory", "disk"])
def test_from_the_second_epoch_served_clips_are_not_decoded_and_the_step_is_unchanged(tmp_path, monkeypatch, disk):
    paths = wav_files(tmp_path, 4)
    cache = EncoderCache(tmp_path / "cache", disk=disk)
    cached, plain = duet_mc(tmp_path, cache), duet_mc(tmp_path, None)
    loader, reference = loader_for(cached, paths), loader_for(plain, paths)
    assert reference.served_items is None  # no cache: nothing to serve
    decodes = count_decodes(loader, monkeypatch)
    for epoch in range(3):
        (_, micros), = list(loader.global_batches(epoch))
        (_, real), = list(reference.global_batches(epoch))
        batch = micros[0]
        served = batch["audio_items"]["served"]
        assert served == [epoch > 0] * 4  # epoch 0 fills; the list is taken when an epoch starts
        if epoch > 0:
            assert not batch.waveforms.any()  # zeros in place of the clips
        # The same step as a plain system on the decoded clips (same texts: same seeds).
        assert batch.texts == real[0].texts
        (loss_a, grads_a), (loss_b, grads_b) = step(plain, real[0], epoch), step(cached, batch, epoch)
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-5)
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-3, atol=1e-5)
    assert decodes[0] == 4  # epoch 0 only (the DataLoader runs in this process: num_workers = 0)
    stats = cache.stats["[audio_encoder].backbone"]
    assert (stats.misses, stats.hits, stats.undecoded) == (4, 8, 8)
    assert stats.disk_hits == (8 if disk else 0)


def test_a_new_run_on_the_disk_store_computes_one_item_and_skips_decoding_from_its_second_epoch(tmp_path, monkeypatch):
    paths = wav_files(tmp_path, 4)
    first = duet_mc(tmp_path, EncoderCache(tmp_path / "cache"))
    (_, micros), = list(loader_for(first, paths).global_batches(0))
    step(first, micros[0], 0)  # fills the store on disk
    cache = EncoderCache(tmp_path / "cache")  # another run: the store is read from disk
    system = duet_mc(tmp_path, cache)
    loader = loader_for(system, paths)
    decodes = count_decodes(loader, monkeypatch)
    for epoch in range(2):
        (_, micros), = list(loader.global_batches(epoch))
        step(system, micros[0], epoch)
    stats = cache.stats["[audio_encoder].backbone"]
    # Epoch 0 decodes and computes one item (the output's structure), the rest are read; epoch 1 decodes nothing.
    assert (stats.misses, stats.hits, stats.disk_hits, stats.undecoded) == (1, 7, 7, 4)
    assert decodes[0] == 4


# ---------------------------------------------------------------------- what may not be served


def test_item_keys_name_the_file_the_crop_and_the_clip(tmp_path):
    paths = wav_files(tmp_path, 2)
    system = duet_mc(tmp_path, EncoderCache(tmp_path / "cache", disk=False))
    loader = loader_for(system, paths)
    a, b = (loader.item_key(loader.samples[i], i) for i in range(2))
    assert a and b and a != b
    assert loader.item_key(loader.samples[0], 0) == a  # the same every epoch
    assert loader_for(system, paths, clip_seconds=0.25).item_key(loader.samples[0], 0) != a
    assert loader_for(system, paths, crop="center").item_key(loader.samples[0], 0) != a
    assert loader_for(system, paths, crop="random").item_key(loader.samples[0], 0) is None  # a new clip every epoch
    replaced = copy.copy(loader.samples[0])
    object.__setattr__(replaced, "audio", paths[0].with_name("other.wav"))  # as an augmenter swapping the audio would
    assert loader.item_key(replaced, 0) is None
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was rewritten
    assert loader.item_key(loader.samples[0], 0) != a


def test_an_augmenter_on_the_audio_turns_serving_off(tmp_path):
    system = duet_mc(tmp_path, EncoderCache(tmp_path / "cache", disk=False))
    assert system.served_items is not None

    class Gain:
        stage = "waveform"

        def __call__(self, waveforms, ctx):
            return waveforms * 0.5

    system._augmenters.append(Gain())
    assert system.served_items is None  # a waveform augmenter acts after the loader
    assert duet_mc(tmp_path, None).served_items is None


class Mix:
    """A ``batch`` augmenter that replaces the waveforms (mixup-like): zeros cannot stand for its output."""

    stage = "batch"

    def __call__(self, batch, ctx):
        batch.waveforms = batch.waveforms.flip(0)
        return batch


class Louder:
    """The same, in place."""

    stage = "batch"

    def __call__(self, batch, ctx):
        batch.waveforms.mul_(2.0)
        return batch


@pytest.mark.parametrize("augmenter", [Mix, Louder])
def test_a_batch_augmenter_that_changes_served_zeros_stops_with_an_error(tmp_path, augmenter):
    paths = wav_files(tmp_path, 4)
    cache = EncoderCache(tmp_path / "cache", disk=False)
    system = duet_mc(tmp_path, cache)
    loader = loader_for(system, paths)
    for epoch in range(2):
        (_, micros), = list(loader.global_batches(epoch))
        if epoch == 0:
            step(system, micros[0], epoch)
    batch = micros[0]
    assert all(batch["audio_items"]["served"])
    step(system, batch, 1)  # without the augmenter: served
    system._augmenters.append(augmenter())
    with pytest.raises(RuntimeError, match="changed the audio"):
        step(system, batch, 1)
    # Decoded clips with keys, changed the same way: keyed by content as before, no error.
    fresh = copy.deepcopy(batch)
    fresh["audio_items"]["served"] = [False] * 4
    fresh.waveforms = torch.randn_like(fresh.waveforms)
    before = cache.stats["[audio_encoder].backbone"].misses
    step(system, fresh, 1)
    assert cache.stats["[audio_encoder].backbone"].misses == before + 4


def test_a_clip_sent_as_zeros_whose_outputs_are_gone_is_an_error(tmp_path):
    enc = mert()
    cache = EncoderCache(tmp_path, disk=False)
    cache.attach(enc, "[audio_encoder]")
    x = enc.preprocess(torch.randn(2, 12_000) * 0.3)
    with cache.items(["k0", "k1"], [False, False], x):
        enc(x)
    assert cache.served() == {"k0", "k1"}
    zeros = torch.zeros_like(x)
    from mtrun.errors import TrainingError

    with cache.items(["k0", "k2"], [True, True], zeros), pytest.raises(TrainingError, match="no longer has them"):
        enc(zeros)


def test_outputs_served_by_item_key_equal_recomputation(tmp_path):
    enc = mert()
    x = enc.preprocess(torch.randn(3, 12_000, generator=torch.Generator().manual_seed(0)) * 0.3)
    expected = enc(x, output_hidden_states=True)
    for disk in (False, True):
        cache = EncoderCache(tmp_path / str(disk), disk=disk)
        cache.attach(enc, "[audio_encoder]")
        keys = ["a", "b", "c"]
        with cache.items(keys, [False] * 3, x):
            enc(x, output_hidden_states=True)
        zeros = torch.zeros_like(x)
        with cache.items(keys[::-1], [True] * 3, zeros):  # another order, no input
            out = enc(zeros, output_hidden_states=True)
        for got, want in zip((out.tokens, *out.hidden_states), (expected.tokens, *expected.hidden_states)):
            assert torch.equal(got, want.flip(0))
        # Some held, one new: the read rows and the computed one, each in its place.
        y = enc.preprocess(torch.randn(1, 12_000, generator=torch.Generator().manual_seed(1)) * 0.3)
        mixed = torch.cat([y, x[2:], x[:1]])
        with cache.items(["d", "c", "a"], [False] * 3, mixed):
            out = enc(mixed, output_hidden_states=True)
        EncoderCache.detach(enc)
        want = enc(mixed, output_hidden_states=True)
        for got, ref in zip((out.tokens, *out.hidden_states), (want.tokens, *want.hidden_states)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert cache.stats["[audio_encoder].backbone"].misses == 3 + 1


def test_a_row_cut_short_on_disk_is_not_listed(tmp_path):
    store = ItemStore("ns", tmp_path / "ns")
    store.add(["a", "b"], {"x": torch.arange(8.0).reshape(2, 4)})
    data = tmp_path / "ns" / "0.bin"
    data.write_bytes(data.read_bytes()[:-3])  # a crash in the middle of the second row
    again = ItemStore("ns", tmp_path / "ns")
    assert set(again.index) == {"a"}
    assert torch.equal(again.read([0])["x"], torch.arange(4.0)[None])


def test_a_training_run_with_the_cache_decodes_its_clips_in_the_first_epoch_only(tmp_path, monkeypatch):
    from demodata import _synthetic_manifest

    from mtrun.data.loader import BatchLoader
    from mtrun.runner import train

    monkeypatch.setenv("MTRUN_CACHE", str(tmp_path / "mtrun-cache"))
    decoded: list[str] = []
    original = BatchLoader._prepare

    def counting(self, sample, epoch, index):
        if self.training:
            decoded.append(f"{epoch}:{sample.id}")
        return original(self, sample, epoch, index)

    monkeypatch.setattr(BatchLoader, "_prepare", counting)
    manifest = _synthetic_manifest(tmp_path / "data")  # 16 training items
    train(
        RECIPES_DIR / "duet_mc.toml",
        [
            "~data", "data.type=manifest", f"data.path={manifest}", "~eval", f'run.output_dir="{tmp_path / "runs"}"',
            'run.encoder_cache="memory"', 'loader.crop="start"', "loader.num_workers=0", "text_encoder.frozen=true",
            "trainer.batch_size=8", "trainer.max_steps=6", "trainer.eval_every=0", "trainer.log_every=1",
        ],
        profile="tiny",
    )
    epochs = [int(d.split(":")[0]) for d in decoded]
    assert epochs.count(0) == 16 and epochs.count(1) == 0 and epochs.count(2) == 0


def test_an_index_line_cut_short_is_not_read_as_another_row(tmp_path):
    """A killed run can leave "c\t1" of "c\t12": that line must not map c to row 1."""
    store = ItemStore("ns", tmp_path / "ns")
    store.add(["a", "b"], {"x": torch.arange(8.0).reshape(2, 4)})
    index = tmp_path / "ns" / "index.tsv"
    index.write_text(index.read_text() + "c\t1")  # no newline: the write stopped there
    assert ItemStore("ns", tmp_path / "ns").index == {"a": 0, "b": 1}


def test_a_damaged_layout_is_reported_and_the_store_is_not_used(tmp_path):
    store = ItemStore("ns", tmp_path / "ns")
    store.add(["a"], {"x": torch.ones(1, 4)})
    (tmp_path / "ns" / "layout.json").write_text('{"x": ["not_a_dtype", [4]]}')
    said: list[str] = []
    again = ItemStore("ns", tmp_path / "ns", say=said.append)
    assert again.index == {} and again.folder is None
    assert len(said) == 1 and "layout.json is damaged" in said[0]
    again.add(["b"], {"x": torch.full((1, 4), 2.0)})  # kept in memory, nothing written over the file
    assert torch.equal(again.read([again.index["b"]])["x"], torch.full((1, 4), 2.0))
    assert (tmp_path / "ns" / "layout.json").read_text() == '{"x": ["not_a_dtype", [4]]}'


def test_a_store_emptied_during_the_run_forgets_its_rows_and_a_lost_file_is_a_clear_error(tmp_path):
    import shutil

    from mtrun.errors import TrainingError

    said: list[str] = []
    store = ItemStore("ns", tmp_path / "ns", say=said.append)
    store.add(["a", "b"], {"x": torch.arange(8.0).reshape(2, 4)})
    assert torch.equal(store.read([1])["x"], torch.arange(4.0, 8.0)[None])
    shutil.rmtree(tmp_path / "ns")
    with pytest.raises(TrainingError, match="can no longer be read.*deleted during the run"):
        store._maps.clear()  # a fresh map of the file, as a later, longer read makes
        store.read([1])
    store.add(["c"], {"x": torch.full((1, 4), 9.0)})  # written at row 0 of the new files
    assert "was emptied during the run" in said[-1]
    assert store.index == {"c": 0}  # a and b are no longer served from rows that now hold c
    assert torch.equal(store.read([0])["x"], torch.full((1, 4), 9.0))


def test_a_folder_another_process_emptied_and_refilled_is_an_error_for_every_store_on_it(tmp_path):
    """DDP ranks share a store: the rank that did not write after the deletion must not serve the
    other rank's new rows under its old keys, nor an index error."""
    import shutil

    from mtrun.errors import TrainingError

    said: list[str] = []
    reader = ItemStore("ns", tmp_path / "ns", say=said.append)
    reader.add(["a", "b", "c"], {"x": torch.arange(12.0).reshape(3, 4)})
    assert torch.equal(reader.read([2])["x"], torch.arange(8.0, 12.0)[None]) and not said
    shutil.rmtree(tmp_path / "ns")
    writer = ItemStore("ns", tmp_path / "ns", say=lambda text: None)  # another rank, after the deletion
    writer.add(["d", "e", "f", "g"], {"x": torch.full((4, 4), 7.0)})
    reader._maps.clear()  # a fresh map of the file, as a later, longer read makes
    with pytest.raises(TrainingError, match="can no longer be read.*replaced"):
        reader.read([2])
    reader.add(["h"], {"x": torch.full((1, 4), 5.0)})  # its own next write notices it too
    assert "was emptied during the run" in said[-1] and reader.index == {"h": 4}
    assert torch.equal(reader.read([4])["x"], torch.full((1, 4), 5.0))


def test_an_unreadable_layout_is_reported_and_nothing_is_appended_to_it(tmp_path):
    said: list[str] = []
    folder = tmp_path / "ns"
    folder.mkdir()
    (folder / "layout.json").write_text("{not json")
    (folder / "index.tsv").write_text("")
    store = ItemStore("ns", folder, say=said.append)
    assert "this store is not used" in said[-1] and store.folder is None
    store.add(["a"], {"x": torch.ones(1, 4)})
    assert torch.equal(store.read(store.rows(["a"]))["x"], torch.ones(1, 4))  # kept in memory
    assert sorted(f.name for f in folder.iterdir()) == ["index.tsv", "layout.json"]


def test_the_memory_store_never_holds_more_than_its_budget_and_serves_what_it_took():
    """Rows past the budget are not stored; growing the slabs never allocates past it either."""
    row_bytes = 4 * 10 + 2 * 3  # a float32 [10] leaf and a bfloat16 [3] leaf
    store = ItemStore("m", None, memory_bytes=100 * row_bytes)
    generator = torch.Generator().manual_seed(0)
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for batch in range(8):  # 8 x 30 rows offered, 100 fit
        keys = [f"item{batch}-{i}" for i in range(30)]
        a, b = torch.randn(30, 10, generator=generator), torch.randn(30, 3, generator=generator).bfloat16()
        store.add(keys, {"a": a, "b": b})
        kept.update({k: (a[i], b[i]) for i, k in enumerate(keys) if k in store.index})
        assert sum(slab.numel() * slab.element_size() for slab in store._slabs.values()) <= store.memory_bytes
    assert len(kept) == 100 and sorted(store.index.values()) == list(range(100))
    keys = sorted(kept)
    served = store.read(store.rows(keys))
    assert torch.equal(served["a"], torch.stack([kept[k][0] for k in keys]))
    assert torch.equal(served["b"], torch.stack([kept[k][1] for k in keys]))
