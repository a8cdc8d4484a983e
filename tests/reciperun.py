"""Train a recipe as `mtrun RECIPE` does, recording what each rank did; a script for torchrun.

    python tests/reciperun.py OUT RECIPE [--profile NAME] [--keep-dropout] [key=value ...]
    python -m torch.distributed.run --nproc_per_node 2 tests/reciperun.py OUT RECIPE ...

The recipe is resolved and assembled as the command line does (``mtrun.runner.prepare``,
``mtrun.assemble``) and trained with its trainer's ``fit``; the test-split evaluation after
training is left out. Two things differ from `mtrun`, for the equivalence tests of
tests/test_distributed_recipes.py:

* Dropout is switched off (``p = 0`` in every ``nn.Dropout``) unless ``--keep-dropout``: its
  masks come from each rank's own RNG and cannot match the single process's
  (docs/performance.md says so).
* Each rank writes into ``OUT`` (not the run folder) ``rank{r}.json``: the item ids of each
  micro-batch it trained on, by step, and every file-system write it made under the run folder
  (Python's audit events ``open`` for writing, ``os.mkdir``, ``os.rename``, ``os.replace``,
  ``os.remove``), so the test can check that only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _writes_under(root: Path, log: list) -> None:
    """Record file-system writes below ``root`` through an audit hook (they are few)."""
    prefix = str(root.resolve())

    def inside(path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(prefix)
        except TypeError:  # a file descriptor
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and inside(args[0]):
                log.append(["open", os.fsdecode(args[0])])
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree") and args and inside(args[0]):
            log.append([event, os.fsdecode(args[0])])

    sys.addaudithook(hook)


def main(argv: list[str]) -> int:
    out, recipe, rest = Path(argv[0]), argv[1], argv[2:]
    profile = None
    if rest[:1] == ["--profile"]:
        profile, rest = rest[1], rest[2:]
    keep_dropout = "--keep-dropout" in rest
    rest = [arg for arg in rest if arg != "--keep-dropout"]
    import torch
    from torch import nn

    from mtrun import distributed
    from mtrun.assemble import assemble
    from mtrun.runner import prepare

    rank = int(os.environ.get("RANK", "0"))
    resolved, run = prepare(recipe, rest, profile)
    if run.config.threads:
        torch.set_num_threads(run.config.threads)
    torch.manual_seed(run.config.seed)
    built = assemble(resolved, run)
    for module in built.system.modules():
        if isinstance(module, nn.Dropout) and not keep_dropout:
            module.p = 0.0

    seen: dict[int, list[list[str]]] = {}

    def record(_module, args):
        batch, context = args[0], args[1] if len(args) > 1 else None
        if context is not None and context.training:
            seen.setdefault(int(context.step), []).append(list(batch["ids"]))

    built.system.register_forward_pre_hook(record)
    writes: list = []
    out.mkdir(parents=True, exist_ok=True)
    _writes_under(Path(run.dir).parent, writes)
    metrics = built.trainer.fit()
    report = {"rank": rank, "world": distributed.world_size() if distributed.is_distributed() else int(os.environ.get("WORLD_SIZE", "1")),
              "ids": {str(k): v for k, v in sorted(seen.items())}, "writes": writes, "metrics": metrics}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
