"""The cross-paper recipes recombine existing components only, and each tiny profile trains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from demodata import data_overrides

ROOT = Path(__file__).resolve().parents[1]
CROSS = {
    "flap_byol.toml": {"objective": ["byol"], "augmenter": ["specaugment", "token-mask"], "audio_encoder": "mavil"},
    "mavil_atm.toml": {"objective": ["infonce", "atm"], "augmenter": ["specaugment", "token-mask"], "audio_encoder": "mavil"},
    "mert_textswap_byol.toml": {"objective": ["byol", "infonce"], "augmenter": ["view-dropout", "tag-to-caption", "textswap"], "audio_encoder": "mert"},
}


@pytest.mark.parametrize("recipe", sorted(CROSS))
def test_cross_recipe_is_made_of_the_papers_components(recipe):
    from mtrun.recipe import load_recipe

    data = load_recipe(ROOT / "recipes" / recipe, profile="tiny")
    expected = CROSS[recipe]
    assert [o["type"] for o in data["objective"]] == expected["objective"]
    assert [a["type"] for a in data["augmenter"]] == expected["augmenter"]
    assert data["audio_encoder"]["type"] == expected["audio_encoder"]
    text = (ROOT / "recipes" / recipe).read_text()
    assert text.startswith("# Cross-paper:") and "Question it asks" in text


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(CROSS))
def test_cross_recipe_tiny_profile_trains(recipe, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        sys.executable, "-m", "mtrun.cli", str(ROOT / "recipes" / recipe), "--profile", "tiny",
        "trainer.max_steps=3", "trainer.batch_size=8", "trainer.log_every=1", f"run.output_dir={tmp_path}", "run.name=run",
        *data_overrides(tmp_path),
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # three finite steps logged
    assert sorted(run_dir.glob("eval-test-*/eval.json"))
