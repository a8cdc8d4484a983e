"""MuLaP and the locked-musicnn DuET-MC variant: their tiny profiles train and evaluate end to
end, and the MuLaP recipe is what the paper describes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from demodata import data_overrides

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mtrun_musicnn", reason="needs the installed musicnn and mulap plugins (./scripts/install.sh)")
pytest.importorskip("mtrun_mulap")


def run_tiny(tmp_path: Path, recipe: str, *extra: str) -> Path:
    args = [
        sys.executable, "-m", "mtrun.cli", str(ROOT / "recipes" / recipe), "--profile", "tiny",
        f"run.output_dir={tmp_path / 'runs'}", "trainer.max_steps=2", "trainer.batch_size=4",
        "trainer.schedule.warmup_steps=1", *extra, *data_overrides(tmp_path),
    ]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "MTRUN_DEBUG": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def logged(run_dir: Path) -> set[str]:
    return set().union(*(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()))


def test_mulap_tiny_trains_all_three_objectives_and_probes_the_backbone(tmp_path):
    run_dir = run_tiny(tmp_path, "mulap.toml", "eval.0.seeds=1", "eval.0.max_epochs=3")
    assert {"atm/loss", "atm/accuracy", "mlm/loss", "mam/loss"} <= logged(run_dir)
    (report,) = run_dir.glob("eval-test-*/eval.json")
    assert "probe/instrument/accuracy" in json.loads(report.read_text())["metrics"]


def test_duet_mc_musicnn_tiny_trains_on_the_published_weights(tmp_path):
    run_dir = run_tiny(tmp_path, "duet_mc_musicnn.toml", "eval.0.bootstrap=0", "eval.0.subset_size=0", "~eval.1")
    recipe = (run_dir / "recipe.toml").read_text()
    assert 'weights = "MTT_musicnn"' in recipe and 'type = "musicnn"' in recipe
    (report,) = run_dir.glob("eval-test-*/eval.json")
    assert "demo/retrieval/t2a/R@10" in json.loads(report.read_text())["metrics"]  # the demo evaluation set


def test_the_paper_scale_mulap_recipe_has_the_papers_weights_and_sizes():
    from mtrun.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "mulap.toml")
    assert {o["type"]: o["weight"] for o in recipe["objective"]} == {"atm": 2.0, "mlm": 0.1, "mam": 4.0}
    assert recipe["text_encoder"]["num_layers"] == 6 and recipe["text_encoder"]["max_length"] == 64
    assert recipe["fusion"] == {"type": "co-attention", "audio_width": 256, "audio_layers": 6, "audio_heads": 8, "co_layers": 2}
    assert recipe["audio_encoder"]["max_seconds"] == 20.0 and recipe["trainer"]["batch_size"] == 64
    assert recipe["trainer"]["optimizer"]["lr"] == 1e-4 and recipe["trainer"]["schedule"]["type"] == "linear"
