"""The README's main job: `mtrun recipes/quickstart.toml` trains, evaluates and says where the
report and the checkpoint are; and it stays the FLAP recipe's tiny profile."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

pytest.importorskip("mtrun_mavil", reason="the quickstart needs the installed FLAP plugins (./scripts/install.sh)")
pytest.importorskip("mtrun_hf_text")
pytest.importorskip("mtrun_token_mask")

from demodata import data_overrides  # noqa: E402


def test_quickstart_trains_evaluates_and_prints_where_the_report_and_checkpoint_are(tmp_path):
    args = [
        sys.executable, "-m", "mtrun.cli", str(RECIPES / "quickstart.toml"),
        f"run.output_dir={tmp_path / 'runs'}", "trainer.max_steps=3", "trainer.batch_size=8", "trainer.schedule.warmup_steps=1",
        "eval.0.bootstrap=0", "eval.0.subset_size=0", *data_overrides(tmp_path),
    ]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MTRUN_DEBUG": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = re.search(r"^report:\s+(\S+)$", proc.stdout, re.MULTILINE)
    checkpoint = re.search(r"^checkpoint:\s+(\S+)$", proc.stdout, re.MULTILINE)
    assert report and checkpoint, proc.stdout[-3000:]
    run_dir = tmp_path / "runs" / "quickstart"
    report_path, checkpoint_path = Path(report.group(1)), Path(checkpoint.group(1))
    assert report_path.is_file() and report_path.parent.parent == run_dir
    assert "R@10" in report_path.read_text()
    metrics = json.loads((report_path.parent / "eval.json").read_text())["metrics"]
    assert 0.0 <= metrics["retrieval/t2a/R@10"] <= 100.0 and metrics["retrieval/n_items"] > 0
    assert checkpoint_path.parent == run_dir / "checkpoints" and (checkpoint_path / "model.safetensors").is_file()
    assert (run_dir / "recipe.toml").is_file()


def test_quickstart_is_the_flap_tiny_profile_with_a_cpu_training_budget():
    """The model, data and augmentation of the quickstart are FLAP's tiny profile, token masking
    aside (off at this size, docs/flap_masking.md); otherwise only the run and the training budget
    (steps, lr, betas, warm-up, logging) may differ."""
    from mtrun.recipe.loader import load_recipe

    quick = load_recipe(RECIPES / "quickstart.toml")
    tiny = load_recipe(RECIPES / "flap.toml", profile="tiny")
    quick, tiny = (getattr(r, "data", r) for r in (quick, tiny))
    for table in ("data", "audio_encoder", "text_encoder", "audio_projector", "text_projector",
                  "objective", "eval", "loader"):
        assert quick[table] == tiny[table], table
    assert quick["augmenter"] == [a for a in tiny["augmenter"] if a["type"] != "token-mask"]
    budget = {"max_steps", "lr", "betas", "warmup_steps", "log_every", "warmup_epochs", "epochs"}

    def without_budget(table):
        return {k: without_budget(v) if isinstance(v, dict) else v for k, v in table.items() if k not in budget}

    assert without_budget(quick["trainer"]) == without_budget(tiny["trainer"])


def test_flap_recipes_validate_with_and_without_the_tiny_profile(capsys):
    from mtrun.cli import main

    for recipe, profiles in (("flap.toml", [[], ["--profile", "tiny"]]), ("flap_recon.toml", [[], ["--profile", "tiny"]]),
                             ("quickstart.toml", [[]])):
        for profile in profiles:
            assert main(["validate", str(RECIPES / recipe), *profile]) == 0, (recipe, profile, capsys.readouterr())
