"""The frozen-encoder feature cache (mtrun.encoder_cache): what it serves is what the frozen
module would compute, and whatever could make that untrue (training weights, changed weights or
config, augmented inputs, damaged files, a full disk, two writers) ends in recomputation.

Built on the tiny MERT and CLIP-T presets: MERT keeps a trainable layer aggregator over its
frozen backbone, so the cache serves the backbone's hidden states; a locked CLIP-T is frozen
throughout, so it serves the encoder's whole output.
"""

from __future__ import annotations

import copy
import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import torch

from mtrun.encoder_cache import EncoderCache, _CachedForward
from mtrun.interfaces import EncoderOutput

torch.set_num_threads(1)

SHORT, LONG = "a calm piano melody", "an upbeat rock song with distorted electric guitars, loud drums and a choir"
OTHER = "a slow waltz for strings"


def mert(**kw):
    from mtrun_mert import MertEncoder

    torch.manual_seed(0)
    return MertEncoder(MertEncoder.Config(preset="tiny", **{"frozen": True, **kw}))


def clip_text(**kw):
    from mtrun_clip_text import ClipTextEncoder

    torch.manual_seed(0)
    return ClipTextEncoder(ClipTextEncoder.Config(preset="tiny", **{"frozen": True, **kw}))


def waves(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 12_000, generator=torch.Generator().manual_seed(seed)) * 0.3


def features(enc, n: int = 3, seed: int = 0) -> torch.Tensor:
    return enc.preprocess(waves(n, seed))


def equal(a, b) -> bool:
    """Every field of two EncoderOutputs bitwise equal (hidden states included)."""
    same = all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "pooled", "mask"))
    if a.hidden_states is None or b.hidden_states is None:
        return same and a.hidden_states is b.hidden_states
    return same and len(a.hidden_states) == len(b.hidden_states) and all(map(torch.equal, a.hidden_states, b.hidden_states))


# ---------------------------------------------------------------------- what is cached


def test_mert_backbone_is_cached_and_its_trainable_aggregator_is_not(tmp_path):
    enc = mert()
    cache = EncoderCache(tmp_path)
    assert cache.attach(enc, "[audio_encoder]") == ["[audio_encoder].backbone"]
    x = features(enc)
    first = enc(x, output_hidden_states=True)
    with torch.no_grad():
        enc.aggregator.conv.weight.mul_(2.0)  # the aggregator trains: its new weights must be used
    again = enc(x, output_hidden_states=True)
    assert cache.stats["[audio_encoder].backbone"].hits == 3
    assert torch.equal(again.hidden_states[0], first.hidden_states[0])
    assert not torch.equal(again.tokens, first.tokens)
    EncoderCache.detach(enc)
    assert equal(again, enc(x, output_hidden_states=True))


def test_cached_outputs_equal_recomputation_exactly_from_memory_and_from_disk(tmp_path):
    enc = mert()
    x = features(enc)
    expected = enc(x, output_hidden_states=True)
    cache = EncoderCache(tmp_path)
    cache.attach(enc, "[audio_encoder]")
    filled = enc(x, output_hidden_states=True)
    from_memory = enc(x, output_hidden_states=True)
    cache.flush()
    cache.clear_memory()
    from_disk = enc(x, output_hidden_states=True)
    stats = cache.stats["[audio_encoder].backbone"]
    assert (stats.misses, stats.hits, stats.disk_hits) == (3, 6, 3)
    for out in (filled, from_memory, from_disk):
        assert equal(out, expected)


def test_a_memory_only_cache_serves_without_touching_the_disk(tmp_path):
    enc = mert()
    cache = EncoderCache(tmp_path, disk=False)
    cache.attach(enc, "[audio_encoder]")
    x = features(enc)
    expected = enc(x)
    assert equal(enc(x), expected) and cache.stats["[audio_encoder].backbone"].hits == 3
    cache.flush()
    assert not any(tmp_path.iterdir())


def test_locked_text_encoder_is_cached_whole_and_padding_is_restored_by_the_mask(tmp_path):
    enc = clip_text()
    cache = EncoderCache(tmp_path)
    assert cache.attach(enc, "[text_encoder]") == ["[text_encoder]"]
    # SHORT is padded to LONG's length in the first batch and to OTHER's in the second.
    first_batch = enc.tokenize([SHORT, LONG])
    second_batch = enc.tokenize([OTHER, SHORT])
    assert first_batch["input_ids"].shape[1] != second_batch["input_ids"].shape[1]
    first = enc(**first_batch, output_hidden_states=True)
    second = enc(**second_batch, output_hidden_states=True)
    assert cache.stats["[text_encoder]"].hits == 1  # SHORT, in another composition
    n = int(second_batch["attention_mask"][1].sum())
    assert torch.equal(second.mask, second_batch["attention_mask"].bool())
    assert torch.equal(second.tokens[1, :n], first.tokens[0, :n])  # served: the stored values
    assert torch.equal(second.pooled[1], first.pooled[0])
    assert all(torch.equal(h2[1, :n], h1[0, :n]) for h1, h2 in zip(first.hidden_states, second.hidden_states))
    assert not second.tokens[1, n:].any()  # re-padded with zeros, masked out
    # The same as computing the new composition afresh, at the real positions (the encoder
    # reads the mask; summation order may differ with the padded length, hence the tolerance).
    EncoderCache.detach(enc)
    fresh = enc(**second_batch, output_hidden_states=True)
    m = fresh.mask
    torch.testing.assert_close(second.tokens[m], fresh.tokens[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(second.pooled, fresh.pooled, rtol=0, atol=1e-5)
    assert equal(enc(**first_batch, output_hidden_states=True), first)


def test_bf16_text_passes_the_first_call_check_and_is_cached(tmp_path):
    # Under autocast the padded and unpadded runs round differently; that is not a reason
    # to refuse the cache (the trainer's precision = "auto" picks bf16 on CPUs with AVX512-BF16).
    enc = clip_text()
    said: list[str] = []
    cache = EncoderCache(tmp_path, say=said.append)
    cache.attach(enc, "[text_encoder]")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        enc(**enc.tokenize([SHORT, LONG]))
        enc(**enc.tokenize([OTHER, SHORT]))
    assert not said and cache.stats["[text_encoder]"].hits == 1


def test_a_batch_of_hits_in_a_new_order_is_assembled_exactly(tmp_path):
    enc = clip_text()
    cache = EncoderCache(tmp_path)
    cache.attach(enc, "[text_encoder]")
    a = enc(**enc.tokenize([SHORT, LONG, OTHER]))
    b = enc(**enc.tokenize([OTHER, SHORT, LONG]))
    assert cache.stats["[text_encoder]"].hits == 3
    for i, j in ((0, 1), (1, 2), (2, 0)):
        n = int(a.mask[i].sum())
        assert torch.equal(b.tokens[j, :n], a.tokens[i, :n]) and torch.equal(b.pooled[j], a.pooled[i])


def test_changing_a_served_output_in_place_leaves_the_cache_intact(tmp_path):
    enc = clip_text()
    EncoderCache(tmp_path).attach(enc, "[text_encoder]")
    batch = enc.tokenize([SHORT, LONG])
    first = enc(**batch)  # computed: the caller gets the encoder's own tensors
    expected = first.tokens.clone()
    first.tokens.zero_()  # an `encoded` augmenter masking tokens in place
    served = enc(**batch)
    served.tokens.zero_()
    assert torch.equal(enc(**batch).tokens[batch["attention_mask"].bool()], expected[batch["attention_mask"].bool()])


# ---------------------------------------------------------------------- what is not cached


def test_a_trainable_encoder_is_never_cached(tmp_path):
    cache = EncoderCache(tmp_path)
    assert cache.attach(mert(frozen=False), "[audio_encoder]") == []
    assert cache.attach(clip_text(frozen=False), "[text_encoder]") == []
    assert not any(tmp_path.rglob("*.safetensors"))


def test_a_frozen_module_in_train_mode_or_fed_a_gradient_runs_uncached(tmp_path):
    enc = clip_text()
    cache = EncoderCache(tmp_path)
    cache.attach(enc, "[text_encoder]")
    batch = enc.tokenize([SHORT, LONG])
    enc.model.train()  # dropout could be on: not deterministic, not cached
    enc(**batch)
    enc.model.eval()
    audio = mert()
    cache.attach(audio, "[audio_encoder]")
    x = features(audio).requires_grad_(True)  # a trainable front end upstream: keep the graph
    out = audio(x)
    assert cache.stats["[text_encoder]"].bypassed == 1 and cache.stats["[audio_encoder].backbone"].bypassed == 1
    assert cache.stats["[text_encoder]"].misses == 0 and cache.stats["[audio_encoder].backbone"].misses == 0
    assert not any(tmp_path.rglob("*.safetensors"))
    assert equal(out, audio(x.detach()))


def test_an_encoder_that_is_not_deterministic_is_reported_and_left_uncached(tmp_path):
    class Noisy(torch.nn.Module):
        """Frozen and in eval mode, yet random: dropout applied regardless of the mode."""

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8).requires_grad_(False)

        def forward(self, x):
            return torch.nn.functional.dropout(self.linear(x), 0.5, training=True)

    said: list[str] = []
    module = Noisy().eval()
    cache = EncoderCache(tmp_path, say=said.append)
    cache.attach(module, "[audio_encoder]")
    x = torch.randn(4, 8)
    module(x)
    assert len(said) == 1 and "[audio_encoder] is not cached" in said[0] and "dropout" in said[0]
    module(x)
    assert cache.stats["[audio_encoder]"].hits == 0 and not any(tmp_path.rglob("*.safetensors"))


def test_a_text_encoder_that_reads_padded_positions_is_reported_and_left_uncached(tmp_path):
    class Unmasked(torch.nn.Module):
        """Frozen and deterministic, but its pooled vector averages the padding in."""

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 8).requires_grad_(False)

        def forward(self, input_ids, attention_mask):
            tokens = self.embed(input_ids)
            return EncoderOutput(tokens=tokens, pooled=tokens.mean(1), mask=attention_mask.bool())

    said: list[str] = []
    module = Unmasked().eval()
    EncoderCache(tmp_path, say=said.append).attach(module, "[text_encoder]")
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    out = module(ids, (ids > 0).long())
    assert len(said) == 1 and "changes with the padding" in said[0] and "'.pooled'" in said[0]
    assert torch.equal(out.pooled, module.embed(ids).mean(1))


def test_augmented_input_misses_and_untouched_items_hit(tmp_path):
    enc = mert()
    cache = EncoderCache(tmp_path)
    cache.attach(enc, "[audio_encoder]")
    x = features(enc)
    enc(x)
    augmented = x.clone()
    augmented[1, 2000:3000] = 0.0  # one item masked in time, as a feature augmenter would
    out = enc(augmented, output_hidden_states=True)
    stats = cache.stats["[audio_encoder].backbone"]
    assert (stats.misses, stats.hits) == (3 + 1, 2)
    out_plain = enc(augmented)
    assert (stats.misses, stats.hits) == (4, 2 + 3)
    assert equal(out_plain, attrs.evolve(out, hidden_states=None))
    # Items 0 and 2 are the values stored from the first batch; item 1 was computed alone.
    # Matmuls may sum in another order at another batch size, hence a tolerance against a
    # fresh run of the whole batch.
    EncoderCache.detach(enc)
    fresh = enc(augmented, output_hidden_states=True)
    for a, b in zip((out.tokens, out.pooled, *out.hidden_states), (fresh.tokens, fresh.pooled, *fresh.hidden_states)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_changed_weights_config_or_precision_change_the_key(tmp_path):
    enc = mert()
    cache = EncoderCache(tmp_path)
    cache.attach(enc, "[audio_encoder]")
    wrapper = enc.backbone.__dict__["forward"]
    x = features(enc)
    enc(x)
    before = wrapper.fingerprint()
    with torch.no_grad():
        next(enc.backbone.parameters()).add_(1e-3)  # in place, as load_state_dict does
    assert wrapper.fingerprint() != before
    out = enc(x)
    assert cache.stats["[audio_encoder].backbone"].hits == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = enc(x)
    assert cache.stats["[audio_encoder].backbone"].hits == 0 and low.tokens.dtype == torch.bfloat16
    EncoderCache.detach(enc)
    assert equal(out, enc(x))

    other = mert(normalize=False)  # same weights, another Config
    other.load_state_dict(enc.state_dict())
    cache.attach(other, "[other]")
    assert other.backbone.__dict__["forward"].fingerprint() != wrapper.fingerprint()


# ---------------------------------------------------------------------- the disk


def test_a_damaged_entry_is_detected_and_recomputed(tmp_path):
    enc = mert()
    said: list[str] = []
    cache = EncoderCache(tmp_path, say=said.append)
    cache.attach(enc, "[audio_encoder]")
    x = features(enc)
    expected = enc(x, output_hidden_states=True)
    cache.flush()
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 3
    files[0].write_bytes(files[0].read_bytes()[:-100])  # truncated
    data = bytearray(files[1].read_bytes())
    data[-8] ^= 0xFF  # one value altered: the header still parses
    files[1].write_bytes(bytes(data))
    cache.clear_memory()
    out = enc(x, output_hidden_states=True)
    stats = cache.stats["[audio_encoder].backbone"]
    assert (stats.disk_hits, stats.misses) == (1, 3 + 2)
    assert len(said) == 2 and all("damaged" in s for s in said)
    assert equal(out, expected)
    cache.flush()
    cache.clear_memory()
    assert equal(enc(x, output_hidden_states=True), expected) and stats.disk_hits == 4  # rewritten whole


def test_a_full_disk_warns_once_naming_the_folder_and_training_goes_on(tmp_path, monkeypatch):
    import mtrun.encoder_cache as module

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "write_atomic", full)
    enc = mert()
    said: list[str] = []
    cache = EncoderCache(tmp_path / "cache", say=said.append)
    cache.attach(enc, "[audio_encoder]")
    x = features(enc)
    expected = enc(x)
    cache.flush()
    enc(features(enc, seed=1))
    cache.flush()
    assert len(said) == 1 and str(tmp_path / "cache") in said[0] and "No space left" in said[0]
    assert equal(enc(x), expected)  # the in-memory cache still serves
    assert cache.stats["[audio_encoder].backbone"].hits == 3


def test_an_unusable_folder_warns_once(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    enc = mert()
    said: list[str] = []
    cache = EncoderCache(blocker, say=said.append)
    cache.attach(enc, "[audio_encoder]")
    expected = enc(features(enc))
    cache.flush()
    enc(features(enc, seed=1))
    cache.flush()
    assert len(said) == 1 and str(blocker) in said[0]
    assert equal(enc(features(enc)), expected)


CONCURRENT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_encoder_cache import features, mert
    from mtrun.encoder_cache import EncoderCache
    torch.set_num_threads(1)
    enc = mert()
    cache = EncoderCache({folder!r})
    cache.attach(enc, "[audio_encoder]")
    for seed in range(4):
        enc(features(enc, n=4, seed=seed), output_hidden_states=True)
    cache.flush()
    """
)


def test_concurrent_writers_leave_only_complete_entries(tmp_path):
    # The writers compute on one thread; so must the comparison here, for bitwise equality
    # (another test may have left this process with more threads).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_concurrent_writers(tmp_path)
    finally:
        torch.set_num_threads(previous)


def _check_concurrent_writers(tmp_path):
    script = CONCURRENT.format(tests=str(Path(__file__).parent), folder=str(tmp_path))
    runs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert all(r.wait(timeout=300) == 0 for r in runs)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 16
    assert not list(tmp_path.rglob(".*.tmp-*"))
    enc = mert()
    said: list[str] = []
    cache = EncoderCache(tmp_path, say=said.append)
    cache.attach(enc, "[audio_encoder]")
    enc(features(enc, n=4, seed=9), output_hidden_states=True)  # learns the output's layout
    outs = [enc(features(enc, n=4, seed=seed), output_hidden_states=True) for seed in range(4)]
    assert cache.stats["[audio_encoder].backbone"].disk_hits == 16 and not said
    EncoderCache.detach(enc)
    assert all(equal(out, enc(features(enc, n=4, seed=seed), output_hidden_states=True)) for seed, out in enumerate(outs))


# ---------------------------------------------------------------------- in the system


def test_a_copy_of_an_encoder_runs_uncached(tmp_path):
    enc = mert()
    EncoderCache(tmp_path).attach(enc, "[audio_encoder]")
    twin = copy.deepcopy(enc)  # an EMA target, say: its weights will move
    assert not isinstance(twin.backbone.__dict__.get("forward"), _CachedForward)
    assert equal(twin(features(enc)), enc(features(enc)))
    assert enc.state_dict().keys() == mert().state_dict().keys()  # checkpoints see no wrapper


def test_duet_mc_steps_are_the_same_with_and_without_the_cache(tmp_path):
    from test_duet_mc import RECIPES, synthetic_batch

    from mtrun.assemble import assemble
    from mtrun.interfaces import AugmentContext
    from mtrun.plugins import get_plugins
    from mtrun.recipe import load_recipe, resolve_recipe
    from mtrun.run import Run

    def system(cache):
        data = load_recipe(RECIPES / "duet_mc.toml", overrides=["text_encoder.frozen=true"], profile="tiny")
        resolved = resolve_recipe(data, get_plugins().registry, "duet_mc.toml")
        run = Run(dir=tmp_path / "run", config=resolved.run, loader=resolved.loader, recipe=resolved.data)
        torch.manual_seed(0)
        return assemble(resolved, run, encoder_cache=cache).system.train()

    cache = EncoderCache(tmp_path / "cache")
    plain, cached = system(None), system(cache)
    assert cached.cached_modules == ["[audio_encoder].backbone", "[text_encoder]"]
    batch = synthetic_batch(plain)
    for step in range(2):  # step 0 fills the cache, step 1 is served from it
        results = []
        for model in (plain, cached):
            context = AugmentContext(step=step, epoch=0, steps_per_epoch=1, total_steps=10, training=True,
                                     generator=torch.Generator().manual_seed(step))
            model.zero_grad()
            loss, _ = model(copy.deepcopy(batch), context)
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (loss_a, grads_a), (loss_b, grads_b) = results
        assert torch.equal(loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert cache.stats["[audio_encoder].backbone"].hits == 6  # step 1's captions vary (the text augmenters)
