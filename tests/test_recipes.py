"""Every recipe in recipes/ — and every profile it carries — validates with the installed plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtrun.cli import main
from mtrun.recipe.loader import _load_with_extends  # profiles as seen after `extends`

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _cases() -> list[tuple[str, str | None]]:
    cases: list[tuple[str, str | None]] = []
    for path in sorted(RECIPES.glob("*.toml")):
        cases.append((path.name, None))
        for name in sorted(_load_with_extends(path, ()).get("profile", {})):
            cases.append((path.name, name))
    return cases


def test_there_are_recipes():
    assert {"duet_mc.toml", "duet_mc_htsat.toml", "duet_mc_mt5.toml"} <= {p.name for p in RECIPES.glob("*.toml")}


@pytest.mark.parametrize("recipe, profile", _cases(), ids=lambda v: str(v))
def test_recipe_validates(recipe, profile, capsys):
    args = ["validate", str(RECIPES / recipe)] + (["--profile", profile] if profile else [])
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, f"mtrun {' '.join(args)} exited {code}:\n{captured.out}\n{captured.err}"


def test_paper_recipes_have_a_tiny_profile():
    for path in sorted(RECIPES.glob("*.toml")):
        if path.stem.startswith("duet_mc"):
            assert "tiny" in _load_with_extends(path, ()).get("profile", {}), path.name


def test_flap_recon_uses_audiomae_per_patch_normalised_targets():
    # AudioMAE's AudioSet pretraining (main_pretrain.py set_defaults(norm_pix_loss=True);
    # submit_pretrain_audioset2M.sh --norm_pix_loss True) reconstructs per-patch normalised patches.
    recipe = _load_with_extends(RECIPES / "flap_recon.toml", ())
    for objectives in (recipe["objective"], recipe["profile"]["tiny"]["objective"]):
        recon = [o for o in objectives if o["type"] == "mae-recon"]
        assert len(recon) == 1 and recon[0].get("norm_pix_loss") is True


def _comment_sentences(path: Path) -> list[str]:
    text = " ".join(line.split("#", 1)[1].strip() for line in path.read_text().splitlines() if "#" in line)
    return [s for s in text.split(". ") if s]


def test_flap_recipes_cite_the_row_they_reproduce():
    # The paper's 40.4 belongs to the system WITH LLM caption augmentation (larger batch); the
    # 2-D masking row these recipes reproduce reports 37.5 (issue 14).
    for name in ("flap.toml", "flap_recon.toml"):
        sentences = _comment_sentences(RECIPES / name)
        assert any("37.5" in s for s in sentences), name
        for s in sentences:
            if "40.4" in s:
                assert "llm" in s.lower(), f"{name}: 40.4 cited without its LLM caption augmentation: {s!r}"


def test_duet_mc_fixes_temperature_003_for_every_variant_and_the_ablation_doc_says_so():
    # The paper applies τ = 0.03 to every variant (HTS-AT from scratch too); only the tiny CPU
    # profile deviates (learnable from 0.07), and the ablation doc must not say otherwise.
    for path in sorted(RECIPES.glob("duet_mc*.toml")):
        infonce = [o for o in _load_with_extends(path, ())["objective"] if o["type"] == "infonce"]
        assert infonce and all(o["temperature"] == 0.03 and not o.get("learnable", False) for o in infonce), path.name
    doc = " ".join((RECIPES.parent / "docs" / "duet_mc_ablation.md").read_text().split())
    assert "0.03 for every variant" in doc and "from scratch" in doc
    assert "0.03 for *pretrained* encoders" not in doc
