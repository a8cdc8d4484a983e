"""SIGKILL the toy run during a step, a checkpoint write, an evaluation and a start-up, resuming
after each: the run ends bit-identical to the uninterrupted one and no complete checkpoint is
ever unreadable.

One kill of each kind, in one chain (see ``faultkit``), drawn from a seed (``MTRUN_KILL_SEED``,
random when unset) that every report names: ``MTRUN_KILL_SEED=<seed> pytest
tests/reliability/test_kills.py`` draws the same moments again (where within a moment a kill
lands still varies with timing; each report says where it landed).
``benchmarks/faults_kills.py`` sweeps many more.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faultkit import KINDS, draw_chains, kill_chain, reference  # noqa: E402

SEED = int(os.environ.get("MTRUN_KILL_SEED") or random.randrange(2**32))
(CHAIN,) = draw_chains(SEED, len(KINDS))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """The chain of kills, each resumed, against an uninterrupted run with the same
    evaluation schedule."""
    workdir = tmp_path_factory.mktemp("kills")
    reference_dir, seconds = reference(workdir / "reference")
    return kill_chain(workdir / "run", CHAIN, reference_dir, seconds)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_killed_run_resumes_bit_identical_with_every_checkpoint_readable(outcomes, kind):
    (outcome,) = [o for o in outcomes if o.moment.kind == kind]
    print(f"MTRUN_KILL_SEED={SEED}: {outcome.report()}")
    assert outcome.survived, f"MTRUN_KILL_SEED={SEED}, chain {[str(m) for m in CHAIN]}\n{outcome.report()}"
