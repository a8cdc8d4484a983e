"""caption-swap, mlm-mask and mam-mask: what they change, what they record, and their odds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import mtrun_mulap
import mulap_toys as toys
from mtrun import Batch, EncoderOutput
from mtrun.testing import check_component, isolated_registry
from mtrun_mulap.caption_swap import CaptionSwap
from mtrun_mulap.masking import MamMask, MlmMask


@pytest.fixture(scope="module")
def registry():
    return isolated_registry(mtrun_mulap, toys)


@pytest.fixture(scope="module")
def text_encoder():
    return toys.ToyBert(toys.ToyBert.Config(vocab_size=97, max_length=12))


# ----------------------------------------------------------------------------- caption-swap


def test_caption_swap_honours_the_contract(registry):
    swap = check_component(registry, "augmenter", "caption-swap")
    assert swap.stage == "batch" and swap.applies_in_eval is False


def test_caption_swap_moves_texts_ids_and_masks_together(text_encoder):
    texts = toys.CAPTIONS
    swap = CaptionSwap(CaptionSwap.Config(p=0.5))
    for seed in range(20):
        batch = swap(toys.text_batch(text_encoder, texts), toys.context(seed))
        ids, mask = batch.text_inputs["input_ids"], batch.text_inputs["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == len(texts)
        for i, text in enumerate(
            batch.texts
        ):  # each row's tokens are its new text, tokenized afresh
            alone = text_encoder.tokenize([text])
            length = alone["input_ids"].shape[1]
            assert (
                torch.equal(ids[i, :length], alone["input_ids"][0])
                and (ids[i, length:] == toys.PAD).all()
            )
            assert (
                torch.equal(mask[i, :length], alone["attention_mask"][0])
                and (mask[i, length:] == 0).all()
            )
        assert batch.matched.dtype == torch.bool and batch.matched.shape == (len(texts),)
        for i, text in enumerate(batch.texts):
            assert text in texts
            assert bool(batch.matched[i]) == (text == texts[i])


def test_caption_swap_never_gives_an_item_its_own_caption_even_with_duplicates(text_encoder):
    texts = ["piano", "piano", "rock guitar", "piano", "jazz", "rock guitar"]
    swap = CaptionSwap(CaptionSwap.Config(p=1.0))
    for seed in range(200):
        batch = swap(toys.text_batch(text_encoder, texts), toys.context(seed))
        assert all(new != old for new, old in zip(batch.texts, texts)), batch.texts
        assert not batch.matched.any()


def test_caption_swap_keeps_a_pair_when_every_caption_is_the_same(text_encoder):
    batch = CaptionSwap(CaptionSwap.Config(p=1.0))(
        toys.text_batch(text_encoder, ["piano"] * 4), toys.context()
    )
    assert batch.matched.all() and batch.texts == ["piano"] * 4


def test_caption_swap_replaces_about_p_of_the_captions_uniformly(text_encoder):
    texts = toys.CAPTIONS
    swap = CaptionSwap(CaptionSwap.Config(p=0.3))
    swapped, draws, partners = 0, 400, torch.zeros(len(texts), len(texts))
    for seed in range(draws):
        batch = swap(toys.text_batch(text_encoder, texts), toys.context(seed))
        swapped += int((~batch.matched).sum())
        for i, text in enumerate(batch.texts):
            partners[i, texts.index(text)] += 1
    share = swapped / (draws * len(texts))
    assert abs(share - 0.3) < 0.03  # 2400 Bernoulli(0.3): sd 0.0094
    off_diagonal = partners[~torch.eye(len(texts), dtype=torch.bool)]
    assert off_diagonal.min() > 0.5 * off_diagonal.mean()  # every other caption is drawn


def test_caption_swap_is_reproducible_from_the_context_generator(text_encoder):
    swap = CaptionSwap(CaptionSwap.Config())
    a = swap(toys.text_batch(text_encoder, toys.CAPTIONS), toys.context(7))
    b = swap(toys.text_batch(text_encoder, toys.CAPTIONS), toys.context(7))
    assert a.texts == b.texts and torch.equal(a.matched, b.matched)


# ----------------------------------------------------------------------------- mlm-mask


def test_mlm_mask_honours_the_contract(registry, text_encoder):
    mask = check_component(registry, "augmenter", "mlm-mask", text_encoder=text_encoder)
    assert mask.stage == "text_tokens" and "mlm_labels" in mask.provides
    assert mask.vocabulary.mask_id == toys.MASK and mask.vocabulary.size == 97


def test_mlm_mask_refuses_a_text_encoder_without_a_mask_vocabulary():
    plain = toys.PlainText(toys.PlainText.Config())
    with pytest.raises(ValueError, match=r"mlm-mask .* text encoder PlainText lacks tokenizer"):
        MlmMask(MlmMask.Config(), text_encoder=plain)
    with pytest.raises(ValueError, match="no text_encoder was given"):
        MlmMask(MlmMask.Config())


def test_mlm_mask_follows_berts_rule(text_encoder):
    """Counts per caption, never special or padding tokens, and 80/10/10 over many draws."""
    texts = toys.CAPTIONS
    clean = text_encoder.tokenize(texts)
    ids, real = clean["input_ids"], clean["attention_mask"].bool()
    ordinary = real & (ids > toys.MASK)  # the toy's special ids are 0..4
    expected_count = torch.clamp(torch.floor(ordinary.sum(1) * 0.15 + 0.5), min=1)
    augment = MlmMask(MlmMask.Config(), text_encoder=text_encoder)
    outcome = {"mask": 0, "random": 0, "same": 0}
    for seed in range(300):
        batch = augment(toys.text_batch(text_encoder, texts), toys.context(seed))
        labels, new = batch.mlm_labels, batch.text_inputs["input_ids"]
        chosen = labels != -100
        assert labels.dtype == torch.long and labels.shape == ids.shape
        assert torch.equal(chosen.sum(1), expected_count.long())
        assert not (chosen & ~ordinary).any()  # never [CLS], [SEP] or padding
        assert torch.equal(labels[chosen], ids[chosen])  # labels are the original ids
        assert torch.equal(new[~chosen], ids[~chosen])  # nothing else changes
        assert torch.equal(batch.text_inputs["attention_mask"], clean["attention_mask"])
        changed = new[chosen]
        outcome["mask"] += int((changed == toys.MASK).sum())
        outcome["same"] += int((changed == ids[chosen]).sum())
        random = changed[(changed != toys.MASK) & (changed != ids[chosen])]
        assert (random > toys.MASK).all() and (random < 97).all()  # random ids are ordinary tokens
        outcome["random"] += int(random.numel())
    total = sum(outcome.values())
    # A random id equal to the original counts as "same": 1/92 of the 10 %.
    assert abs(outcome["mask"] / total - 0.8) < 0.03
    assert abs(outcome["random"] / total - 0.1 * 91 / 92) < 0.025
    assert abs(outcome["same"] / total - (0.1 + 0.1 / 92)) < 0.025


def test_mlm_mask_clears_the_labels_of_swapped_captions_but_still_masks_them(text_encoder):
    augment = MlmMask(MlmMask.Config(mask_prob=1.0, random_prob=0.0), text_encoder=text_encoder)
    batch = toys.text_batch(text_encoder, toys.CAPTIONS)
    batch.matched = torch.tensor([True, False, True, False, False, True])
    batch = augment(batch, toys.context())
    assert (batch.mlm_labels[~batch.matched] == -100).all()
    assert ((batch.mlm_labels[batch.matched] != -100).sum(1) >= 1).all()
    assert (
        (batch.text_inputs["input_ids"] == toys.MASK).sum(1) >= 1
    ).all()  # every row masked alike


def test_mlm_mask_reads_a_real_bert_vocabulary():
    hf_text = pytest.importorskip("mtrun_hf_text")
    encoder = hf_text.HFTextEncoder(hf_text.HFTextEncoder.Config(preset="tiny-bert", max_length=16))
    augment = MlmMask(MlmMask.Config(), text_encoder=encoder)
    tokenizer = encoder.tokenizer
    assert augment.vocabulary.mask_id == tokenizer.mask_token_id
    assert augment.vocabulary.special_ids >= set(
        tokenizer.all_special_ids
    ) and augment.vocabulary.size == len(tokenizer)
    batch = Batch(texts=toys.CAPTIONS, text_inputs=encoder.tokenize(toys.CAPTIONS))
    original = batch.text_inputs["input_ids"].clone()
    batch = augment(batch, toys.context())
    chosen = batch.mlm_labels != -100
    assert not torch.isin(original[chosen], torch.tensor(tokenizer.all_special_ids)).any()


# ----------------------------------------------------------------------------- mam-mask


def encoded_batch(b=4, n=7, d=5, seed=0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, d, generator=gen) + 3.0  # no feature is zero by chance
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 4:] = False  # padded chunks
    mask[2, 2:] = False  # one chunk only
    return Batch(audio_encoded=EncoderOutput(tokens=tokens, pooled=tokens.mean(1), mask=mask))


def test_mam_mask_honours_the_contract(registry):
    mask = check_component(registry, "augmenter", "mam-mask")
    assert mask.stage == "encoded" and "masked_audio_features" in mask.provides


def test_mam_mask_zeroes_real_chunks_and_keeps_the_originals_as_targets():
    augment = MamMask(MamMask.Config(ratio=0.3))
    for seed in range(50):
        original = encoded_batch(seed=seed)
        before = original.audio_encoded
        tokens, real = before.tokens.clone(), before.mask.clone()
        batch = augment(original, toys.context(seed))
        chosen, after = batch.mam_mask, batch.audio_encoded
        assert chosen.dtype == torch.bool and chosen.shape == real.shape
        assert (
            not (chosen & ~real).any() and not chosen[:, 0].any()
        )  # real chunks only, never token 0
        candidates = (real & (torch.arange(7) > 0)).sum(1)
        assert torch.equal(
            chosen.sum(1), torch.clamp(torch.floor(candidates * 0.3 + 0.5), min=1).long()
        )
        assert torch.equal(batch.mam_target, tokens) and not batch.mam_target.requires_grad
        assert (after.tokens[chosen] == 0).all() and torch.equal(
            after.tokens[~chosen], tokens[~chosen]
        )
        assert torch.equal(after.pooled, before.pooled) and torch.equal(after.mask, real)


def test_mam_mask_may_mask_the_first_token_when_told():
    augment = MamMask(MamMask.Config(ratio=0.3, skip_first=False))
    firsts = sum(
        int(augment(encoded_batch(seed=s), toys.context(s)).mam_mask[:, 0].sum()) for s in range(50)
    )
    assert firsts > 0


def test_mam_mask_keeps_the_gradient_to_the_unmasked_features():
    batch = encoded_batch()
    tokens = batch.audio_encoded.tokens.requires_grad_(True)
    batch = MamMask(MamMask.Config())(batch, toys.context())
    batch.audio_encoded.tokens.sum().backward()
    assert torch.equal(tokens.grad[..., 0], (~batch.mam_mask).float())


def test_masks_of_an_item_do_not_depend_on_its_batch_padding_or_rank(text_encoder):
    """Under torchrun each rank holds (and pads) a share of the batch: with the trainer's
    per-item seeds, every item's MLM and MAM masks are those it gets in the whole batch."""
    from mtrun import AugmentContext

    seeds = [101, 102, 103, 104, 105, 106]

    def ctx(part):
        return AugmentContext(step=1, epoch=0, steps_per_epoch=10, total_steps=100, training=True,
                              generator=torch.Generator().manual_seed(len(part)), item_seeds=part, batch_seed=3)

    def real_tokens(batch, name):
        values, real = getattr(batch, name) if name != "ids" else batch.text_inputs["input_ids"], batch.text_inputs["attention_mask"].bool()
        return [row[keep].tolist() for row, keep in zip(values, real)]

    mlm = MlmMask(MlmMask.Config(), text_encoder=text_encoder)
    whole = mlm(toys.text_batch(text_encoder, toys.CAPTIONS), ctx(seeds))
    shares = [mlm(toys.text_batch(text_encoder, toys.CAPTIONS[a:b]), ctx(seeds[a:b])) for a, b in ((0, 3), (3, 6))]
    for name in ("ids", "mlm_labels"):
        assert real_tokens(whole, name) == real_tokens(shares[0], name) + real_tokens(shares[1], name)

    mam = MamMask(MamMask.Config(ratio=0.3))
    full = mam(encoded_batch(b=6), ctx(seeds)).mam_mask
    halves = [mam(Batch(audio_encoded=EncoderOutput(tokens=e.tokens[a:b], pooled=e.pooled[a:b], mask=e.mask[a:b])), ctx(seeds[a:b])).mam_mask
              for e in [encoded_batch(b=6).audio_encoded] for a, b in ((0, 3), (3, 6))]
    assert torch.equal(full, torch.cat(halves))
