"""Evaluation sets ([[eval]] entries with their own [eval.data]) and the leakage filter.

The DuET-MC paper trains on MTG-Jamendo (tags, no captions) and evaluates text→music retrieval
on MusicCaps and Song Describer, whose tracks are MTG-Jamendo's. ``tests/fixtures/duet_mc``
holds the three datasets' metadata files in their published layouts, with one-second audio
(``make_audio.py`` there wrote it): MTG-Jamendo's train split shares two tracks with Song
Describer and its val split one, so the leakage filter must leave three items out of training.

The recipe tests use the installed plugins (MERT, CLIP-T, ...), as tests/test_duet_mc.py does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mtrun.errors import RecipeError
from mtrun.eval.sets import EvalSet, LeakageFilter, track_key
from mtrun.interfaces import Sample

pytest.importorskip("mtrun_datasets")  # the MTG-Jamendo and Song Describer adapters
from mtrun_datasets.jamendo import MTGJamendo, jamendo_track_key  # noqa: E402
from mtrun_datasets.songdescriber import SongDescriber  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "duet_mc.toml"
FIX = Path(__file__).resolve().parent / "fixtures" / "duet_mc"

POINTED = [  # recipes/duet_mc.toml pointed at the fixtures, by override keys as a user would
    f"data.data_dir={FIX / 'mtg-jamendo' / 'data'}",
    f"data.audio_root={FIX / 'mtg-jamendo' / 'audio'}",
    f"eval.0.data.csv={FIX / 'musiccaps' / 'musiccaps-public.csv'}",
    f"eval.0.data.audio_root={FIX / 'musiccaps' / 'audio'}",
    f"eval.1.data.csv={FIX / 'song-describer' / 'song_describer.csv'}",
    f"eval.1.data.audio_root={FIX / 'song-describer' / 'audio'}",
]


def jamendo() -> MTGJamendo:
    return MTGJamendo(MTGJamendo.Config(data_dir=str(FIX / "mtg-jamendo" / "data"), audio_root=str(FIX / "mtg-jamendo" / "audio")))


def song_describer() -> SongDescriber:
    return SongDescriber(SongDescriber.Config(csv=str(FIX / "song-describer" / "song_describer.csv"), audio_root=str(FIX / "song-describer" / "audio")))


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from mtrun.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------ leakage


def test_jamendo_and_song_describer_name_one_recording_with_one_track_key():
    assert jamendo_track_key("track_1051148") == jamendo_track_key("1051148") == jamendo_track_key("1051148.0") == "jamendo:1051148"
    assert jamendo_track_key("track_0014208") == jamendo_track_key("14208")
    jam = {s.id: s for s in jamendo().load("train")}
    sdd = {s.id: s for s in song_describer().load("test")}
    assert track_key(jam["track_1051148"], "mtg-jamendo") == track_key(sdd["1051148"], "song-describer")
    assert track_key(jam["track_0000214"], "mtg-jamendo") != track_key(sdd["14208"], "song-describer")


def test_leakage_filter_leaves_the_evaluation_sets_tracks_out_of_training_and_counts_them():
    base = jamendo()
    sets = [EvalSet(name="song_describer", source=song_describer(), type="song-describer", split="test", where="[[eval]][1].data", tasks=())]
    filtered = LeakageFilter(base, "mtg-jamendo", sets, ("train", "val"))
    train = [s.id for s in filtered.load("train")]
    assert "track_1051148" not in train and "track_0014208" not in train
    assert train == [s.id for s in base.load("train") if s.id not in ("track_1051148", "track_0014208")]
    assert [s.id for s in filtered.load("val")] == ["track_0033401"]  # track_1319745 is Song Describer's
    assert filtered.load("test") is base.load("test")  # not a split training reads: untouched
    counts = filtered.leakage()
    assert counts["removed"] == 3
    assert counts["splits"]["train"] == {"total": 6, "removed": 2, "by_set": {"song_describer": 2}}
    assert counts["splits"]["val"] == {"total": 2, "removed": 1, "by_set": {"song_describer": 1}}
    assert "2 of 6 'train' items" in filtered.describe() and "1 of 2 'val' items" in filtered.describe()


def test_an_evaluation_set_split_the_source_lacks_is_an_error_naming_its_key():
    from mtrun.errors import MtrunError

    sets = [EvalSet(name="song_describer", source=song_describer(), type="song-describer", split="tset", where="[[eval]][1].data", tasks=())]
    with pytest.raises(MtrunError, match=r"^\[\[eval\]\]\[1\]\.split = 'tset': the set's data source has no such split \(it has: test\)"):
        LeakageFilter(jamendo(), "mtg-jamendo", sets, ("train", "val")).load("train")


def test_sources_without_a_track_key_match_only_their_own_type_by_group():
    a = Sample(id="x1", audio="a.wav", group="piece-7")
    assert track_key(a, "demo") == "demo:piece-7"
    assert track_key(a, "demo") != track_key(Sample(id="y", audio="b.wav", group="piece-7"), "manifest")


# ---------------------------------------------------------------------------- validate


def test_retrieval_on_a_captionless_evaluation_source_fails_validate_naming_the_file_and_key(capsys):
    code, _, err = cli(capsys, "validate", str(RECIPE), 'eval.1.data={type="mtg-jamendo", data_dir="d", audio_root="a"}')
    assert code == 2
    assert f"{RECIPE}: recipe is invalid" in err
    line = next(line for line in err.splitlines() if "[[eval]][1]" in line)
    assert "needs [eval.data] to provide 'captions'" in line and "type 'mtg-jamendo' does not" in line
    assert "Traceback" not in err


def test_retrieval_on_the_captionless_training_source_fails_validate(capsys):
    # The paper-scale recipe as it was: retrieval on MTG-Jamendo's own test split.
    code, _, err = cli(capsys, "validate", str(RECIPE), 'eval=[{type="retrieval"}]')
    assert code == 2
    assert "[[eval]][0].type = 'retrieval': needs [data] to provide 'captions'" in err
    assert "[data] type 'mtg-jamendo' does not" in err


def test_evaluation_set_names_split_and_duplicates_are_checked(capsys):
    mc = '{type="musiccaps", csv="m.csv", audio_root="a"}'
    sd = '{type="song-describer", csv="s.csv", audio_root="a"}'
    code, _, err = cli(
        capsys,
        "validate",
        str(RECIPE),
        f'eval=[{{type="retrieval", name="sets", data={mc}}}, {{type="retrieval", name="sets", data={sd}}}, '
        f'{{type="zero-shot", category="genre", split="val"}}, {{type="retrieval", name="a/b", data={mc}}}, '
        f'{{type="retrieval", name="sets", data={mc}, bootstrap=10}}]',
    )
    assert code == 2
    assert "[[eval]][1].name = 'sets': evaluation set 'sets' is also [[eval]][0]'s" in err
    assert "[[eval]][2].split = 'val': split applies to the entry's own [eval.data] table" in err
    assert "[[eval]][3].name = 'a/b'" in err
    assert "[[eval]][4]: eval 'retrieval' on evaluation set 'sets' twice (also [[eval]][0])" in err


def test_runtime_refuses_retrieval_on_a_split_without_captions():
    """A source that may carry captions (a manifest) but whose split has none: an error, not counts."""
    from mtrun.eval.retrieval import Retrieval
    from mtrun.eval.run import EvalError, evaluate_run

    class NoCaptions:
        provides = frozenset({"captions"})

        def splits(self):
            return ("test",)

        def load(self, split):
            return [Sample(id="a", audio="a.wav", tags={"genre": ["rock"]})]

    source = NoCaptions()
    sets = [EvalSet(name="tags_only", source=source, type="manifest", split="test", where="[[eval]][0].data", tasks=(("retrieval", Retrieval(Retrieval.Config())),))]
    with pytest.raises(EvalError, match=r"retrieval on split 'test' of evaluation set 'tags_only' \(\[\[eval\]\]\[0\]\.data\): its items have no captions"):
        evaluate_run(object(), source, {}, sets=sets)


def test_validate_print_of_duet_mc_on_the_fixtures_lists_each_set_its_metrics_and_the_leakage(capsys):
    code, out, _ = cli(capsys, "validate", str(RECIPE), "--print", *POINTED)
    assert code == 0
    comments = [line[2:] for line in out.splitlines() if line.startswith("# ")]
    assert "eval[0]: retrieval on evaluation set 'musiccaps' (split 'test')" in comments
    assert "eval[1]: retrieval on evaluation set 'song_describer' (split 'test')" in comments
    assert "  eval[1].data: song-describer" in comments
    assert any(c.startswith("  evaluation set 'musiccaps': [[eval]][0].data (musiccaps), split 'test'") for c in comments)
    assert any(c.startswith("  training source [data] (mtg-jamendo), its test split: zero-shot") for c in comments)
    for name in ("musiccaps", "song_describer"):
        for metric in ("t2a/R@1", "t2a/R@5", "t2a/R@10", "t2a/median_rank", "a2t/R@10"):
            assert f"      {name}/retrieval/{metric}" in comments
    leak = next(c for c in comments if c.startswith("leakage filter:"))
    assert "2 of 6 'train' items (musiccaps 0, song_describer 2)" in leak
    assert "1 of 2 'val' items (musiccaps 0, song_describer 1)" in leak


def test_validate_print_without_the_datasets_says_the_leakage_was_not_counted(capsys):
    code, out, _ = cli(capsys, "validate", str(RECIPE), "--print", "data.data_dir=/nonexistent/mtg")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("# leakage filter:"))
    assert "not counted here" in line and "/nonexistent/mtg" in line and "[data].data_dir" in line


def test_a_missing_evaluation_set_file_names_the_eval_table_key_not_data(capsys):
    code, out, _ = cli(capsys, "validate", str(RECIPE), "--print", *POINTED[:2], "eval.0.data.csv=/nonexistent/mc.csv")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("# leakage filter:"))
    assert "/nonexistent/mc.csv (set by [[eval]][0].data.csv)" in line


def test_tiny_profile_evaluates_the_demo_test_split_as_a_named_set(tmp_path):
    from mtrun.plugins import get_plugins
    from mtrun.recipe import load_recipe, resolve_recipe

    resolved = resolve_recipe(load_recipe(RECIPE, profile="tiny"), get_plugins().registry, str(RECIPE))
    retrieval, zero_shot = resolved.evals
    assert retrieval.name == "retrieval" and retrieval.extras["set"] == "demo" and retrieval.extras["data"].name == "demo"
    assert zero_shot.name == "zero-shot" and "data" not in zero_shot.extras


# ---------------------------------------------------------------------- end to end


def _inline(value: Any) -> str:
    """A TOML inline value (override right-hand sides)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The paper recipe's own [[eval]] tables, pointed at the fixtures, on DuET-MC's tiny sizes
    with MTG-Jamendo (the fixture) as the training source: two steps, then the evaluation."""
    import io
    from contextlib import redirect_stdout

    from mtrun.plugins import get_plugins
    from mtrun.recipe import load_recipe
    from mtrun.runner import train

    paper_evals = load_recipe(RECIPE, overrides=POINTED)["eval"]
    out = tmp_path_factory.mktemp("duet-sets")
    overrides = [
        f"data={_inline({'type': 'mtg-jamendo', 'data_dir': str(FIX / 'mtg-jamendo' / 'data'), 'audio_root': str(FIX / 'mtg-jamendo' / 'audio')})}",
        f"eval={_inline(paper_evals)}",
        "eval.0.bootstrap=50",
        "eval.1.bootstrap=50",
        f"run.output_dir={out}",
        "run.name=sets",
        "loader.num_workers=0",
        "loader.clip_seconds=1.0",
        "trainer.batch_size=2",
        "trainer.max_steps=2",
        "trainer.eval_every=0",
        "trainer.log_every=1",
    ]
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        metrics = train(RECIPE, overrides=overrides, profile="tiny", registry=get_plugins().registry)
    return out / "sets", metrics, stdout.getvalue(), overrides


def test_tiny_run_reports_r_at_k_and_median_rank_for_each_evaluation_set(tiny_run):
    run_dir, metrics, stdout, _ = tiny_run
    report = json.loads((Path(metrics["report"]).parent / "eval.json").read_text())
    for name, items, captions in (("musiccaps", 3, 3), ("song_describer", 4, 6)):
        for direction in ("t2a", "a2t"):
            for metric in ("R@1", "R@5", "R@10", "median_rank"):
                assert isinstance(report["metrics"][f"{name}/retrieval/{direction}/{metric}"], float)
        assert report["sets"][name]["n_items"] == items and report["sets"][name]["n_captions"] == captions
        assert report["metrics"][f"{name}/retrieval/t2a/R@10"] == 100.0  # 3-4 recordings: every caption's clip is in the top 10
    assert "zero-shot/genre/accuracy" in report["metrics"]  # on the training source's test split
    assert report["split"] == "test" and report["n_samples"] == 2
    assert not any(k.startswith("retrieval/") for k in report["metrics"])  # no retrieval on MTG-Jamendo itself
    assert report["leakage"]["removed"] == 3
    run_report = (run_dir / "report.md").read_text()
    assert "musiccaps: text→music R@10 (%)" in run_report and "song_describer: text→music median rank" in run_report
    assert "Leakage filter: 3 training item(s)" in run_report
    start = next(line for line in stdout.splitlines() if line.startswith("leakage filter:"))
    assert "2 of 6 'train' items (musiccaps 0, song_describer 2)" in start


def test_trainer_validation_rounds_run_only_the_tasks_on_the_training_source(tiny_run):
    run_dir, _, _, _ = tiny_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_keys = {k for r in records for k in r if k.startswith("val/")}
    assert any(k.startswith("val/zero-shot/") for k in val_keys)
    assert not any("retrieval" in k or "musiccaps" in k for k in val_keys), sorted(val_keys)


def test_mtrun_eval_on_the_run_evaluates_the_same_sets(tiny_run):
    from mtrun.eval.commands import evaluate_target
    from mtrun.plugins import get_plugins

    run_dir, metrics, _, _ = tiny_run
    after_training = json.loads((Path(metrics["report"]).parent / "eval.json").read_text())
    again = evaluate_target(run_dir, registry=get_plugins().registry)
    assert again["sets"].keys() == {"musiccaps", "song_describer"}
    for key in ("musiccaps/retrieval/t2a/median_rank", "song_describer/retrieval/a2t/R@1"):
        assert again["metrics"][key] == pytest.approx(after_training["metrics"][key])
    assert again["leakage"]["removed"] == 3
