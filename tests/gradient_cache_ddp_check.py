"""The gradient cache under torchrun DDP (gloo): run as
``python -m torch.distributed.run --nproc_per_node 2 tests/gradient_cache_ddp_check.py OUT``.

Each rank wraps the float64 system of ``tests/test_gradient_cache.py`` in
DistributedDataParallel, runs the gradient cache over its two micro-batches of its half of the
global batch, averages the gradients once (:func:`all_reduce_gradients`; DDP's own hooks must
stay idle, since its forward is never called) and writes the loss and gradients to
``OUT/rank{r}.json`` for the test to compare with one process's backward of the whole batch.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE / "testkit" / "src", HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def main(out: Path) -> None:
    import torch
    from torch import nn

    from mtrun import distributed
    from mtrun.train.gradient_cache import all_reduce_gradients, gradient_cache_step
    from test_gradient_cache import MICRO, N, batch_of, build, context, grads

    distributed.init_from_env("cpu")
    rank, world = distributed.rank(), distributed.world_size()
    system = build()
    ddp = nn.parallel.DistributedDataParallel(system)  # broadcasts the weights; its hooks must stay idle
    share = N // world
    micros = [batch_of(s, s + MICRO, system.text_encoder.tokenize) for s in range(rank * share, (rank + 1) * share, MICRO)]
    loss, _ = gradient_cache_step(ddp.module, micros, prepare=lambda b: b, context=context, autocast=contextlib.nullcontext)
    all_reduce_gradients(system.parameters())
    result = {"world": world, "loss": float(loss), "grads": {k: v.tolist() for k, v in grads(system).items()}}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
