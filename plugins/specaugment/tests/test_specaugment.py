"""SpecAugment: bounded widths, zero/mean fill, per-item and deterministic, both layouts."""

from __future__ import annotations

import pytest
import torch

import mtrun_specaugment
from mtrun import AugmentContext
from mtrun.testing import check_component, isolated_registry
from mtrun_specaugment.augmenter import SpecAugment, band_masks


def _context(seed: int = 0, training: bool = True) -> AugmentContext:
    return AugmentContext(step=0, epoch=0, steps_per_epoch=10, total_steps=100, training=training, generator=torch.Generator().manual_seed(seed))


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, width) of each run of True in a 1-D bool mask."""
    runs, start = [], None
    for i, v in enumerate(mask.tolist() + [False]):
        if v and start is None:
            start = i
        if not v and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_specaugment_honours_the_component_contract():
    aug = check_component(isolated_registry(mtrun_specaugment), "augmenter", "specaugment")
    assert aug.stage == "features"
    assert (aug.config.time_mask_width, aug.config.freq_mask_width) == (192, 48)  # FLAP


def test_single_masks_are_contiguous_and_within_bounds():
    widths = []
    for seed in range(40):
        m = band_masks(8, 1024, 1, 192, torch.Generator().manual_seed(seed))
        for row in m:
            runs = _runs(row)
            assert len(runs) <= 1
            widths += [w for _, w in runs]
            assert all(0 <= s and s + w <= 1024 for s, w in runs)
    assert max(widths) < 192 and max(widths) > 150  # uses the whole range [0, 192)


def test_masked_cells_are_zero_or_item_mean_and_the_rest_untouched():
    features = torch.randn(4, 1, 1024, 128) + 3.0
    aug = SpecAugment(SpecAugment.Config())
    out = aug(features, _context())
    covered = aug.masks(1024, 128, _context(), 4)[:, None]
    assert torch.all(out[covered] == 0) and torch.equal(out[~covered], features[~covered])
    mean = SpecAugment(SpecAugment.Config(fill="mean"))(features, _context())
    item_means = features.mean(dim=(1, 2, 3))
    for b in range(4):
        assert torch.allclose(mean[b][covered[b]], item_means[b].expand(int(covered[b].sum())))


def test_frequency_band_width_and_3d_layout():
    aug = SpecAugment(SpecAugment.Config(time_masks=0, freq_masks=2, freq_mask_width=48))
    features = torch.ones(16, 300, 128)  # [B, T, F]
    out = aug(features, _context(3))
    for item in out:
        cols = (item == 0).all(0)  # a frequency mask covers whole columns
        assert torch.equal((item == 0).any(0), cols)
        assert cols.sum() <= 2 * 47  # two bands, each narrower than 48 (they may overlap or touch)


def test_deterministic_per_generator_different_per_item_and_eval_is_identity():
    features = torch.randn(6, 1, 512, 128)
    aug = SpecAugment(SpecAugment.Config(time_mask_width=100, freq_mask_width=30, time_masks=2, freq_masks=2))
    a, b, c = aug(features, _context(0)), aug(features, _context(0)), aug(features, _context(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    zeros = [(x == 0).flatten().tolist() for x in a]
    assert len({tuple(z) for z in zeros}) == 6
    assert aug(features, _context(training=False)) is features


def test_an_items_masks_do_not_depend_on_its_batch_or_the_rank_holding_it():
    """Under torchrun each rank holds a share of the batch; with the trainer's per-item seeds an
    item's masks are those it gets in the whole batch in one process."""
    features = torch.randn(6, 1, 256, 64)
    aug = SpecAugment(SpecAugment.Config(time_mask_width=100, freq_mask_width=30, time_masks=2, freq_masks=2))
    seeds = [11, 22, 33, 44, 55, 66]

    def ctx(part, rank):
        return AugmentContext(step=3, epoch=0, steps_per_epoch=10, total_steps=100, training=True,
                              generator=torch.Generator().manual_seed(rank), item_seeds=part, batch_seed=7)

    whole = aug(features, ctx(seeds, 0))
    halves = torch.cat([aug(features[:3], ctx(seeds[:3], 0)), aug(features[3:], ctx(seeds[3:], 1))])
    assert torch.equal(whole, halves)
    assert not torch.equal(aug(features, ctx([s + 1 for s in seeds], 0)), whole)


def test_widths_are_capped_by_short_inputs():
    m = band_masks(32, 10, 1, 192, torch.Generator().manual_seed(0))
    # Widths are drawn below the cap (size 10), so no row is masked whole; an uncapped width of
    # up to 191 would cover all 10 positions in most rows.
    assert m.shape == (32, 10) and int(m.sum(1).max()) < 10 and m.any()
    with pytest.raises(ValueError):
        SpecAugment(SpecAugment.Config())(torch.zeros(2, 10), _context())
