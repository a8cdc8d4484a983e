"""What view dropout costs per sample and step: drawing the views vs the memoised lookup.

The augmenter runs on every training sample at every step. Its ten views depend only on the
seeds, the item id and the tags. So it draws them once per item and then only picks one. This
times both on demo-corpus-like tags (7 categories) and prints the ratio, measured in the same
run.

    python benchmarks/view_dropout.py [--items 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from mtrun.interfaces import AugmentContext, Sample
from mtrun_view_dropout.augmenter import ViewDropout

TAGS = {
    "genre": ["jig"], "instrument": ["fiddle"], "tempo": ["fast"], "key": ["D major"],
    "mode": ["major"], "metre": ["6/8"], "region": ["Ireland"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="calls per item (steps)")
    args = parser.parse_args()
    aug = ViewDropout(ViewDropout.Config())
    samples = [Sample(id=f"item{i}", audio="unused.wav", captions=[], tags=TAGS) for i in range(args.items)]
    context = AugmentContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, training=True, generator=torch.Generator().manual_seed(0))
    calls = args.items * args.repeats

    start = time.perf_counter()
    for sample in samples:
        for _ in range(args.repeats):
            aug._draw_views(sample)  # what every call cost before the memo
    redraw = (time.perf_counter() - start) / calls

    for sample in samples:  # first epoch: fills the memo
        aug(sample, context)
    start = time.perf_counter()
    for sample in samples:
        for _ in range(args.repeats):
            aug(sample, context)
    memoised = (time.perf_counter() - start) / calls
    print(f"per sample and step: drawing the views {redraw * 1e6:.0f} us, memoised call {memoised * 1e6:.0f} us; "
          f"ratio {redraw / memoised:.1f}")


if __name__ == "__main__":
    main()
