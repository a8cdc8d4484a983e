"""FLAP token masking: exact kept counts, no repeats, 2-D product structure, per-item determinism."""

from __future__ import annotations

import pytest
import torch

import mtrun_token_mask
from mtrun import AugmentContext, Batch, MtrunError
from mtrun.testing import check_component, isolated_registry
from mtrun_token_mask.masking import TokenMask, kept_count

GRID = (64, 8)


def _context(seed: int = 0, training: bool = True) -> AugmentContext:
    return AugmentContext(step=0, epoch=0, steps_per_epoch=10, total_steps=100, training=training, generator=torch.Generator().manual_seed(seed))


def _run(seed: int = 0, batch: int = 6, **config) -> torch.Tensor:
    b = Batch(features=torch.zeros(batch, 1, 1024, 128), token_grid=GRID)
    return TokenMask(TokenMask.Config(**config))(b, _context(seed)).audio_keep_index


def test_token_mask_honours_the_component_contract():
    aug = check_component(isolated_registry(mtrun_token_mask), "augmenter", "token-mask")
    assert aug.stage == "audio_tokens"


def test_kept_counts_follow_audiomae_floor():
    assert kept_count(512, 0.4) == 307 and kept_count(64, 0.2) == 51 and kept_count(8, 0.2) == 6
    assert kept_count(10, 0.3) == 7  # 10 * 0.7 is 6.999... in floating point
    assert kept_count(8, 0.99) == 1


@pytest.mark.parametrize("ratio", [0.0, 0.4, 0.75])
def test_1d_keeps_exactly_the_expected_count_without_repeats(ratio):
    keep = _run(mode="1d", ratio=ratio)
    n = kept_count(512, ratio)
    assert keep.shape == (6, n) and keep.dtype == torch.long
    for row in keep:
        assert len(set(row.tolist())) == n  # never a token twice
        assert torch.all(row[1:] > row[:-1]) and row.min() >= 0 and row.max() < 512


def test_2d_kept_set_is_a_product_of_groups_and_positions():
    keep = _run(mode="2d", group_ratio=0.2, position_ratio=0.2)
    assert keep.shape == (6, 51 * 6)
    for row in keep:
        groups = sorted({i // 8 for i in row.tolist()})
        positions = sorted({i % 8 for i in row.tolist()})
        assert len(groups) == 51 and len(positions) == 6
        assert row.tolist() == [g * 8 + p for g in groups for p in positions]


def test_masks_are_deterministic_per_generator_and_differ_per_item():
    for mode in ("1d", "2d"):
        a, b, c = _run(0, mode=mode), _run(0, mode=mode), _run(1, mode=mode)
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert len({tuple(r.tolist()) for r in a}) == len(a)


def test_an_items_mask_does_not_depend_on_its_batch_or_the_rank_holding_it():
    """Under torchrun each rank holds a share of a micro-batch: with the trainer's per-item and
    per-micro-batch seeds, the shares' masks are the whole batch's masks in one process."""
    seeds = [5, 6, 7, 8]
    for config in (dict(mode="1d"), dict(mode="2d", rounding="random")):
        aug = TokenMask(TokenMask.Config(**config))

        def keep(part, rank):
            ctx = AugmentContext(step=2, epoch=0, steps_per_epoch=10, total_steps=100, training=True,
                                 generator=torch.Generator().manual_seed(rank), item_seeds=part, batch_seed=9)
            return aug(Batch(features=torch.zeros(len(part), 1, 1024, 128), token_grid=GRID), ctx).audio_keep_index

        whole = keep(seeds, 0)
        assert torch.equal(whole, torch.cat([keep(seeds[:2], 0), keep(seeds[2:], 1)]))
        assert len({tuple(r.tolist()) for r in whole}) == 4


def test_eval_context_leaves_the_batch_alone_and_a_gridless_encoder_is_an_error():
    aug = TokenMask(TokenMask.Config())
    batch = Batch(features=torch.zeros(2, 1, 1024, 128), token_grid=GRID)
    assert "audio_keep_index" not in aug(batch, _context(training=False))
    with pytest.raises(MtrunError, match="token_grid"):
        aug(Batch(features=torch.zeros(2, 10), token_grid=None), _context())


def test_kept_fraction_reports_flap_defaults():
    assert TokenMask(TokenMask.Config(mode="2d")).kept_fraction(GRID) == pytest.approx(306 / 512)
    assert TokenMask(TokenMask.Config(mode="1d", ratio=0.4)).kept_fraction(GRID) == pytest.approx(307 / 512)


def test_mask_drives_a_token_dropping_encoder_end_to_end():
    """Kept indices select exactly those grid tokens in a ViT-style encoder (the interface)."""
    from mtrun import EncoderOutput

    class GridEcho(torch.nn.Module):
        token_grid = (4, 3)

        def forward(self, features, *, keep_index=None):
            tokens = torch.arange(12.0).expand(features.shape[0], -1)[..., None]
            if keep_index is not None:
                tokens = torch.gather(tokens, 1, keep_index[..., None])
            return EncoderOutput(tokens=tokens, pooled=tokens.mean(1), mask=torch.ones(tokens.shape[:2], dtype=torch.bool), keep_index=keep_index)

    batch = Batch(features=torch.zeros(3, 1), token_grid=GridEcho.token_grid)
    batch = TokenMask(TokenMask.Config(mode="2d", group_ratio=0.5, position_ratio=0.3))(batch, _context())
    out = GridEcho()(batch.features, keep_index=batch.audio_keep_index)
    assert out.tokens.shape == (3, 2 * 2, 1)
    assert torch.equal(out.tokens[..., 0].long(), batch.audio_keep_index)


def test_random_rounding_makes_the_expected_2d_kept_fraction_exact():
    """FLAP's 2-D 0.2/0.2 keeps 64 % of the tokens: floor keeps 306/512; random rounding's mean is 0.64."""
    from mtrun_token_mask.masking import sample_keep_index

    gen = torch.Generator().manual_seed(0)
    counts, shapes = [], set()
    for _ in range(3000):
        keep = sample_keep_index(3, GRID, mode="2d", group_ratio=0.2, position_ratio=0.2, rounding="random", generator=gen)
        groups = {i // 8 for i in keep[0].tolist()}
        positions = {i % 8 for i in keep[0].tolist()}
        assert keep.shape[1] == len(groups) * len(positions)  # still a product M' x K', same for every item
        shapes.add((len(groups), len(positions)))
        counts.append(keep.shape[1])
    assert shapes == {(51, 6), (51, 7), (52, 6), (52, 7)}
    # Independent: E[M'] = 0.8 * 64 = 51.2 and E[K'] = 0.8 * 8 = 6.4, drawn independently.
    mean = sum(counts) / len(counts)
    sd = torch.tensor(counts, dtype=torch.float64).std().item()
    assert abs(mean - 0.64 * 512) < 4 * sd / len(counts) ** 0.5
    assert abs(mean - 306) > 10  # what floor gives
    aug = TokenMask(TokenMask.Config(mode="2d", rounding="random"))
    assert aug.kept_fraction(GRID) == pytest.approx(0.64)
    assert TokenMask(TokenMask.Config(mode="1d", ratio=0.4, rounding="random")).kept_fraction(GRID) == pytest.approx(0.6)


def test_random_rounding_in_1d_has_the_exact_expected_count_and_floor_is_unchanged():
    from mtrun_token_mask.masking import sample_keep_index

    gen = torch.Generator().manual_seed(1)
    counts = [sample_keep_index(2, GRID, mode="1d", ratio=0.4, rounding="random", generator=gen).shape[1] for _ in range(3000)]
    assert set(counts) == {307, 308}
    assert sum(counts) / len(counts) == pytest.approx(0.6 * 512, abs=0.05)  # 307.2: P(308) = 0.2
    assert _run(mode="2d").shape == (6, 306)  # the default stays AudioMAE's floor
