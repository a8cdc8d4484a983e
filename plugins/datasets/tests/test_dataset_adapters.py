"""Public-dataset adapters read each dataset's metadata files in their published layout.

The fixtures under ``tests/fixtures/datasets/`` are a handful of rows in each format's real
column layout (MagnaTagATune's full 188-tag, tab-separated header; MTG-Jamendo's ragged TSV
rows; MusicCaps' Python-literal aspect lists), so a parser that only works on tidy files fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import mtrun_datasets
from mtrun import MtrunError
from mtrun.testing import isolated_registry, resolve
from mtrun_datasets.audiocaps import AudioCaps
from mtrun_datasets.clotho import Clotho
from mtrun_datasets.jamendo import MTGJamendo
from mtrun_datasets.lpmusiccaps import LPMusicCaps
from mtrun_datasets.magnatagatune import MagnaTagATune
from mtrun_datasets.musiccaps import MusicCaps
from mtrun_datasets.songdescriber import SongDescriber

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
AUDIO = "/data/audio"


def by_id(samples):
    return {s.id: s for s in samples}


def relative(sample) -> str:
    return Path(sample.audio).relative_to(AUDIO).as_posix()


# ----------------------------------------------------------------------------- MusicCaps


def musiccaps(**kw):
    return MusicCaps(MusicCaps.Config(csv=str(FIXTURES / "musiccaps" / "musiccaps-public.csv"), audio_root=AUDIO, **kw))


def test_musiccaps_splits_by_is_audioset_eval_and_parses_aspect_lists():
    source = musiccaps()
    assert source.splits() == ("train", "test")
    train, test = by_id(source.load("train")), by_id(source.load("test"))
    assert set(test) == {"-0Gj8-vB1q4", "-0vPFx-wRRI", "-0xzrMun0Rs"}
    assert set(train) == {"-0SdAVK79lg", "-1LrH01Ei1w"}
    clip = test["-0Gj8-vB1q4"]
    assert clip.tags == {
        "aspect": ["low quality", "sustained strings melody", "soft female vocal", "mellow piano melody", "sad", "soulful", "ballad"]
    }
    assert len(clip.captions) == 1 and clip.captions[0].startswith("The low quality recording features a ballad")
    assert clip.group == "-0Gj8-vB1q4"
    assert relative(clip) == "-0Gj8-vB1q4.wav"
    assert clip.extra["start_s"] == 30 and clip.extra["end_s"] == 40
    assert clip.extra["audioset_labels"] == ["/m/0140xf", "/m/02cjck", "/m/04rlf"]
    assert clip.extra["author_id"] == "4" and clip.extra["is_balanced_subset"] is False


def test_musiccaps_keeps_csv_quoting_inside_captions_and_aspects():
    rock = by_id(musiccaps().load("train"))["-1LrH01Ei1w"]
    assert rock.captions == ['A rock song with a male vocalist, "punchy" drums and a distorted electric guitar riff.']
    assert '"punchy" drums' in rock.tags["aspect"]
    assert rock.extra["is_balanced_subset"] is True


def test_musiccaps_audio_pattern_and_all_test_rule():
    source = musiccaps(audio_pattern="clips/{ytid}_{start_s}-{end_s}.flac", split_rule="all-test")
    assert source.splits() == ("test",)
    assert len(source.load("test")) == 5
    assert relative(by_id(source.load("test"))["-0SdAVK79lg"]) == "clips/-0SdAVK79lg_30-40.flac"


def test_val_fraction_holds_out_the_same_items_every_time_and_only_from_train():
    first = musiccaps(val_fraction=0.3)
    second = musiccaps(val_fraction=0.3)
    val_ids = [s.id for s in first.load("val")]
    assert val_ids and val_ids == [s.id for s in second.load("val")]
    train_ids = {s.id for s in first.load("train")}
    assert not train_ids & set(val_ids)
    assert train_ids | set(val_ids) == {"-0SdAVK79lg", "-1LrH01Ei1w"}
    assert len(first.load("test")) == 3


# ------------------------------------------------------------------------- Song Describer


def song_describer(**kw):
    return SongDescriber(SongDescriber.Config(csv=str(FIXTURES / "song-describer" / "song_describer.csv"), audio_root=AUDIO, **kw))


def test_song_describer_groups_caption_rows_into_one_sample_per_track():
    source = song_describer()
    assert source.splits() == ("test",)
    tracks = by_id(source.load("test"))
    assert list(tracks) == ["1051148", "14208", "1319745"]
    guitar = tracks["14208"]
    assert len(guitar.captions) == 3
    assert guitar.captions[1] == "A calm, slow instrumental played on a nylon guitar, suitable for a rainy day."
    assert guitar.extra["caption_ids"] == ["245", "246", "247"]
    assert guitar.group == "14208"
    assert relative(guitar) == "08/14208.2min.mp3"
    assert guitar.extra["duration"] == pytest.approx(187.3)
    assert guitar.tags == {}


def test_song_describer_valid_subset_and_jamendo_tags():
    source = song_describer(valid_only=True, tags_tsv=str(FIXTURES / "song-describer" / "song_describer.mtg-jamendo.tsv"))
    tracks = by_id(source.load("test"))
    assert set(tracks) == {"1051148", "14208"}  # 1319745 has no valid caption
    assert len(tracks["1051148"].captions) == 1
    assert tracks["14208"].tags == {"genre": ["folk"], "instrument": ["acousticguitar"], "mood": ["sad"]}


# --------------------------------------------------------------------------- LP-MusicCaps


def test_lp_musiccaps_mtt_reads_splits_from_file_names_and_categorises_tags():
    source = LPMusicCaps(LPMusicCaps.Config(files=[str(FIXTURES / "lp-musiccaps" / "mtt")], audio_root=AUDIO))
    assert set(source.splits()) == {"train", "val", "test"}
    train = by_id(source.load("train"))
    assert set(train) == {"35", "71"}  # the row with neither caption nor tags is dropped
    rock = train["71"]
    assert rock.captions == [
        "A loud, fast rock song driven by crashing drums, distorted guitar and a shouted male vocal.",
        "Fast and loud rock with guitar, drums and male vocals.",
        "Distorted guitars and pounding drums back a male vocalist in this fast, loud rock track.",
    ]  # caption_attribute_prediction left out, as the dataset card advises
    assert rock.tags == {"genre": ["rock"], "instrument": ["guitar", "drums"], "mood": ["loud"], "tempo": ["fast"], "vocal": ["male vocal"]}
    assert relative(rock) == "b/electric_frankenstein-conquers_the_world-03-teenage_shutdown-30-59.mp3"
    assert rock.extra["title"] == "Teenage Shutdown"
    assert [s.id for s in source.load("val")] == ["84"]
    assert [s.id for s in source.load("test")] == ["97"]


def test_lp_musiccaps_mc_uses_ytid_ground_truth_caption_and_aspects():
    files = sorted(str(p) for p in (FIXTURES / "lp-musiccaps" / "mc").iterdir())
    source = LPMusicCaps(LPMusicCaps.Config(files=files, audio_root=AUDIO, audio_pattern="{ytid}.wav"))
    assert source.splits() == ("train", "test")
    clip = by_id(source.load("test"))["-0Gj8-vB1q4"]
    assert len(clip.captions) == 4 and clip.captions[0].startswith("The low quality recording")
    assert clip.tags["aspect"][:2] == ["low quality", "sustained strings melody"]
    assert relative(clip) == "-0Gj8-vB1q4.wav"
    assert clip.extra["start_s"] == 30 and clip.extra["is_crawled"] is False
    crawled = LPMusicCaps(LPMusicCaps.Config(files=files, audio_root=AUDIO, audio_pattern="{ytid}.wav", crawled_only=True))
    assert crawled.splits() == ("train",)


def test_lp_musiccaps_reads_the_published_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for line in (FIXTURES / "lp-musiccaps" / "mtt" / "test-00000-of-00001.jsonl").read_text().splitlines()]
    target = tmp_path / "test-00000-of-00001-dcf74b4dfad2da31.parquet"
    pq.write_table(pa.Table.from_pylist(rows), target)
    source = LPMusicCaps(LPMusicCaps.Config(files=[str(tmp_path)], audio_root=AUDIO))
    (sample,) = source.load("test")
    assert sample.id == "97" and sample.tags["genre"] == ["techno", "electronic"]


def test_lp_musiccaps_file_without_split_name_is_an_error(tmp_path):
    odd = tmp_path / "records.jsonl"
    odd.write_text(json.dumps({"track_id": "1", "caption_writing": "a song"}) + "\n")
    with pytest.raises(MtrunError, match=r"cannot tell the split.*\[data\]\.files\[0\]"):
        LPMusicCaps(LPMusicCaps.Config(files=[str(odd)], audio_root=AUDIO)).splits()


# ------------------------------------------------------------------------------ AudioCaps


def test_a_short_row_is_refused_by_line_and_a_bad_number_names_its_column(tmp_path):
    header = "audiocap_id,youtube_id,start_time,caption\n"
    for name in ("train.csv", "val.csv"):
        (tmp_path / name).write_text(header + "1,abc,20,A dog barks\n")
    (tmp_path / "test.csv").write_text(header + "3,bad,2O,Rain on a roof\n")  # "2O": letter O
    source = AudioCaps(AudioCaps.Config(metadata_dir=str(tmp_path), audio_root=AUDIO))
    with pytest.raises(MtrunError, match=r"audiocaps: test.csv: column start_time holds '2O', not a number"):
        source.load("test")
    # A row cut short would read its missing fields as empty: refused, not guessed.
    (tmp_path / "test.csv").write_text(header + "4,fine,0,Wind\n2,short\n")
    with pytest.raises(MtrunError, match=r"test\.csv \(set by \[data\]\.metadata_dir \+ files\.test\) has 1 row\(s\) with fewer fields "
                       r"than its 4 columns, on line\(s\) 3"):
        AudioCaps(AudioCaps.Config(metadata_dir=str(tmp_path), audio_root=AUDIO)).load("test")


def test_a_table_with_only_its_header_is_named_with_its_key(tmp_path):
    (tmp_path / "m.csv").write_text((FIXTURES / "musiccaps" / "musiccaps-public.csv").read_text().splitlines()[0] + "\n")
    with pytest.raises(MtrunError, match=r"musiccaps: .*m\.csv \(set by \[data\]\.csv\) has no rows below its header"):
        MusicCaps(MusicCaps.Config(csv=str(tmp_path / "m.csv"), audio_root=AUDIO)).load("train")


def test_a_musiccaps_row_cut_short_does_not_move_a_test_clip_into_training(tmp_path):
    lines = (FIXTURES / "musiccaps" / "musiccaps-public.csv").read_text().splitlines()
    eval_row = next(i for i, line in enumerate(lines) if line.rstrip().endswith("True"))
    lines[eval_row] = ",".join(lines[eval_row].split(",")[:3])  # ytid,start_s,end_s only
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(MtrunError, match=rf"fewer fields than its \d+ columns, on line\(s\) {eval_row + 1}"):
        MusicCaps(MusicCaps.Config(csv=str(tmp_path / "m.csv"), audio_root=AUDIO)).load("train")


def test_an_mtg_jamendo_row_without_its_fixed_columns_or_not_utf8_is_refused(tmp_path):
    from mtrun_datasets.jamendo import read_autotagging_tsv

    header = "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS\n"
    (tmp_path / "a.tsv").write_text(header + "track_0000214\tartist_1\talbum_1\t14/214.mp3\t212.0\tgenre---rock\n\n"
                                    "track_0000948\tartist_87\talbum_149\t48/948.mp3\n")
    with pytest.raises(MtrunError, match=r"a\.tsv \(set by \[data\]\.data_dir\) has 1 row\(s\) without the five fixed columns .* on line\(s\) 4"):
        read_autotagging_tsv(tmp_path / "a.tsv", source="mtg-jamendo", key="data_dir")
    (tmp_path / "b.tsv").write_bytes((header + "track_1\ta\tb\tc.mp3\t1.0\tgenre---caf\xe9\n").encode("latin-1"))
    with pytest.raises(MtrunError, match=r"b\.tsv \(set by \[data\]\.data_dir\) is not UTF-8 text"):
        read_autotagging_tsv(tmp_path / "b.tsv", source="mtg-jamendo", key="data_dir")


def test_two_segments_of_one_video_are_two_audiocaps_clips_in_one_group(tmp_path):
    header = "audiocap_id,youtube_id,start_time,caption\n"
    for name in ("train.csv", "val.csv"):
        (tmp_path / name).write_text(header + "1,abcdefghijk,30,Dog barks\n2,abcdefghijk,150,Engine revs\n3,zzzzzzzzzzz,0,Rain\n")
    (tmp_path / "test.csv").write_text(header + "4,yyyyyyyyyyy,0,Wind\n")
    source = AudioCaps(AudioCaps.Config(metadata_dir=str(tmp_path), audio_root=AUDIO, audio_pattern="{youtube_id}_{start_time}.wav"))
    clips = by_id(source.load("train"))
    assert {k: (v.captions, relative(v), v.group) for k, v in clips.items()} == {
        "abcdefghijk_30": (["Dog barks"], "abcdefghijk_30.wav", "abcdefghijk"),
        "abcdefghijk_150": (["Engine revs"], "abcdefghijk_150.wav", "abcdefghijk"),
        "zzzzzzzzzzz": (["Rain"], "zzzzzzzzzzz_0.wav", "zzzzzzzzzzz"),  # one segment: the video's id
    }


def test_the_leakage_filter_names_one_recording_alike_across_its_published_versions():
    """LP-MusicCaps-MC rows are MusicCaps clips, LP-MusicCaps-MTT rows MagnaTagATune clips, and
    AudioCaps and MusicCaps both cut AudioSet videos: each pair must share the track key."""
    def track_key(sample, _type):  # what the leakage filter compares: the adapter's extra["track_key"]
        return sample.extra.get("track_key")

    lp_mc = LPMusicCaps(LPMusicCaps.Config(files=[str(FIXTURES / "lp-musiccaps" / "mc")], audio_root=AUDIO, audio_pattern="{ytid}.wav"))
    mc = MusicCaps(MusicCaps.Config(csv=str(FIXTURES / "musiccaps" / "musiccaps-public.csv"), audio_root=AUDIO))
    mc_keys = {track_key(s, "musiccaps") for split in mc.splits() for s in mc.load(split)}
    lp_keys = {track_key(s, "lp-musiccaps") for split in lp_mc.splits() for s in lp_mc.load(split)}
    assert lp_keys and lp_keys <= mc_keys and all(k.startswith("youtube:") for k in lp_keys)
    lp_mtt = LPMusicCaps(LPMusicCaps.Config(files=[str(FIXTURES / "lp-musiccaps" / "mtt")], audio_root=AUDIO))
    row = next(s for split in lp_mtt.splits() for s in lp_mtt.load(split))
    assert track_key(row, "lp-musiccaps") == f"mtt:{row.id}" and row.group != row.id  # grouped by song, as magnatagatune does


def test_audiocaps_groups_rows_by_youtube_id_into_five_caption_clips():
    source = AudioCaps(
        AudioCaps.Config(metadata_dir=str(FIXTURES / "audiocaps"), audio_root=AUDIO, audio_pattern="{split}/{youtube_id}.wav")
    )
    assert source.splits() == ("train", "val", "test")
    val = by_id(source.load("val"))
    assert list(val) == ["vfY_TJq7n_U", "tdWhHV3X25Q"]
    assert all(len(s.captions) == 5 for s in val.values())
    ducks = val["vfY_TJq7n_U"]
    assert ducks.captions[3] == "Ducks are quacking, water splashes, and something rustles"
    assert ducks.group == "vfY_TJq7n_U"
    assert ducks.extra == {"start_time": 130.0, "audiocap_ids": ["97151", "97152", "97153", "97154", "97155"],
                           "track_key": "youtube:vfY_TJq7n_U"}
    assert relative(ducks) == "val/vfY_TJq7n_U.wav"
    assert [len(s.captions) for s in source.load("train")] == [1, 1, 1]
    (engine,) = source.load("test")
    assert len(engine.captions) == 5


# --------------------------------------------------------------------------------- Clotho


def test_clotho_reads_five_captions_per_clip_with_published_split_folders():
    source = Clotho(Clotho.Config(metadata_dir=str(FIXTURES / "clotho"), audio_root=AUDIO))
    assert source.splits() == ("train", "val", "test")
    train = by_id(source.load("train"))
    radio = train["Distorted AM Radio noise.wav"]
    assert len(radio.captions) == 5
    assert radio.captions[4] == "heavy static and the beginnings of a signal on a transistor radio"
    paper = train["Paper_Parchment_Rustling.wav"]
    assert paper.captions[3] == "He sighed as he turned the pages of the book, stopping to scan the information."
    assert relative(radio) == "development/Distorted AM Radio noise.wav"
    assert radio.group == "Distorted AM Radio noise.wav"
    assert relative(source.load("val")[0]) == "validation/Wind in trees.wav"
    assert all(len(s.captions) == 5 for s in source.load("test"))


def test_clotho_v1_without_validation_file():
    source = Clotho(
        Clotho.Config(
            metadata_dir=str(FIXTURES / "clotho"),
            audio_root=AUDIO,
            files={"train": "clotho_captions_development.csv", "test": "clotho_captions_evaluation.csv"},
        )
    )
    assert source.splits() == ("train", "test")


# ---------------------------------------------------------------------------- MTG-Jamendo


def test_jamendo_reads_every_tag_column_by_category():
    source = MTGJamendo(MTGJamendo.Config(data_dir=str(FIXTURES / "mtg-jamendo" / "data"), audio_root=AUDIO))
    assert source.splits() == ("train", "val", "test")
    train = by_id(source.load("train"))
    assert list(train) == ["track_0000214", "track_0000382", "track_0000948"]
    ambient = train["track_0000948"]
    assert ambient.tags == {"genre": ["ambient", "electronic"], "instrument": ["synthesizer"], "mood": ["relaxing", "meditative"]}
    assert ambient.captions == []  # tag-only: the loader or a tag-to-caption augmenter writes text
    assert relative(ambient) == "48/948.mp3"
    assert ambient.extra == {"artist_id": "artist_000087", "album_id": "album_000149", "duration": 328.0, "track_key": "jamendo:948"}
    assert train["track_0000214"].tags == {"genre": ["punkrock"]}
    busy = by_id(source.load("val"))["track_0917543"]
    assert len(busy.tags["instrument"]) == 6
    assert [s.id for s in source.load("test")] == ["track_0087483", "track_1195900"]


def test_jamendo_subset_files_and_low_quality_audio_pattern():
    source = MTGJamendo(
        MTGJamendo.Config(
            data_dir=str(FIXTURES / "mtg-jamendo" / "data"), audio_root=AUDIO, subset="moodtheme", audio_pattern="{path_stem}.low.mp3"
        )
    )
    train = source.load("train")
    assert [s.id for s in train] == ["track_0000382", "track_0000948"]
    assert train[0].tags == {"mood": ["background"]}
    assert relative(train[0]) == "82/382.low.mp3"


# -------------------------------------------------------------------------- MagnaTagATune


def mtt(**kw):
    return MagnaTagATune(
        MagnaTagATune.Config(annotations=str(FIXTURES / "magnatagatune" / "annotations_final.csv"), audio_root=AUDIO, **kw)
    )


def test_magnatagatune_splits_by_folder_and_groups_clips_of_one_song():
    source = mtt()
    assert source.splits() == ("train", "val", "test")
    assert [s.id for s in source.load("train")] == ["35", "58", "71"]  # folders 0, 3, b
    assert [s.id for s in source.load("val")] == ["84"]  # folder c
    test = by_id(source.load("test"))
    assert set(test) == {"2", "6", "97", "115"}  # d-f; clip 10 has no tag and is dropped
    assert test["2"].group == test["6"].group == "american_bach_soloists-j_s__bach_solo_cantatas-01-bwv54__i_aria"
    assert relative(test["97"]) == "d/processor-insomnia-04-night_drive-175-204.mp3"
    assert test["2"].tags == {
        "genre": ["classical", "opera"],
        "vocal": ["female", "female vocal"],
        "instrument": ["strings", "violin"],
    }
    assert test["2"].captions == []


def test_magnatagatune_top_k_keeps_the_most_frequent_tags():
    source = mtt(top_k=3, drop_untagged=False)
    kept = set()
    for split in source.splits():
        for sample in source.load(split):
            kept.update(t for tags in sample.tags.values() for t in tags)
    # Fixture counts: classical 5, guitar 3, strings 3, then a run of tags with 2 clips each.
    assert kept == {"classical", "guitar", "strings"}
    assert "10" in {s.id for s in source.load("test")}


# ----------------------------------------------------------------------- registry + errors

TESTKIT = Path(__file__).resolve().parents[3] / "tests" / "testkit" / "src"


@pytest.fixture(scope="module")
def registry():
    """This plugin's adapters beside core's toy components (``tests/testkit``, a source folder,
    not installed), which fill the recipe's other slots."""
    if str(TESTKIT) not in sys.path:
        sys.path.insert(0, str(TESTKIT))
    import mtrun_testkit

    return isolated_registry(mtrun_datasets, mtrun_testkit)


TOY = {
    "audio_encoder": {"type": "toy-audio"},
    "text_encoder": {"type": "toy-text"},
    "audio_projector": {"type": "toy-linear", "dim": 8},
    "text_projector": {"type": "toy-linear", "dim": 8},
    "objective": [{"type": "toy-contrastive"}],
}

DATA_TABLES = {
    "musiccaps": {"csv": str(FIXTURES / "musiccaps" / "musiccaps-public.csv"), "audio_root": AUDIO, "val_fraction": 0.3},
    "song-describer": {"csv": str(FIXTURES / "song-describer" / "song_describer.csv"), "audio_root": AUDIO, "valid_only": True},
    "lp-musiccaps": {"files": [str(FIXTURES / "lp-musiccaps" / "mtt")], "audio_root": AUDIO},
    "audiocaps": {"metadata_dir": str(FIXTURES / "audiocaps"), "audio_root": AUDIO, "files": {"val": "val.csv"}},
    "clotho": {"metadata_dir": str(FIXTURES / "clotho"), "audio_root": AUDIO},
    "mtg-jamendo": {"data_dir": str(FIXTURES / "mtg-jamendo" / "data"), "audio_root": AUDIO, "subset": "moodtheme"},
    "magnatagatune": {"annotations": str(FIXTURES / "magnatagatune" / "annotations_final.csv"), "audio_root": AUDIO},
}


@pytest.mark.parametrize("name", sorted(DATA_TABLES))
def test_registry_round_trip_through_a_recipe(registry, name):
    recipe = {**TOY, "data": {"type": name, **DATA_TABLES[name]}}
    spec = resolve(recipe, registry, "adapters.toml").components["data"]
    assert spec.name == name and isinstance(spec.config, spec.cls.Config)
    source = spec.cls(spec.config)
    splits = source.splits()
    assert splits and all(len(source.load(split)) > 0 for split in splits)
    assert all(str(s.audio).startswith(AUDIO) for split in splits for s in source.load(split))


def test_recipe_reports_a_misspelled_key_and_a_bad_choice(registry):
    recipe = {**TOY, "data": {"type": "mtg-jamendo", "data_dir": "x", "audio_root": "y", "subset": "top50", "split_idx": 1}}
    with pytest.raises(Exception) as info:
        resolve(recipe, registry, "adapters.toml")
    message = str(info.value)
    assert "[data].split_idx: unknown key (did you mean 'split_index'?)" in message
    assert "[data].subset" in message and "top50tags" in message


MISSING = {
    "musiccaps": (lambda d: MusicCaps(MusicCaps.Config(csv=str(d / "musiccaps-public.csv"), audio_root=AUDIO)), r"\[data\]\.csv"),
    "song-describer": (
        lambda d: SongDescriber(SongDescriber.Config(csv=str(d / "song_describer.csv"), audio_root=AUDIO)),
        r"\[data\]\.csv",
    ),
    "lp-musiccaps": (
        lambda d: LPMusicCaps(LPMusicCaps.Config(files=[str(d / "train-00000-of-00001.parquet")], audio_root=AUDIO)),
        r"\[data\]\.files\[0\]",
    ),
    "audiocaps": (lambda d: AudioCaps(AudioCaps.Config(metadata_dir=str(d), audio_root=AUDIO)), r"\[data\]\.metadata_dir \+ files\.train"),
    "clotho": (lambda d: Clotho(Clotho.Config(metadata_dir=str(d), audio_root=AUDIO)), r"\[data\]\.metadata_dir \+ files\.train"),
    "mtg-jamendo": (lambda d: MTGJamendo(MTGJamendo.Config(data_dir=str(d / "data"), audio_root=AUDIO)), r"\[data\]\.data_dir"),
    "magnatagatune": (
        lambda d: MagnaTagATune(MagnaTagATune.Config(annotations=str(d / "annotations_final.csv"), audio_root=AUDIO)),
        r"\[data\]\.annotations",
    ),
}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_metadata_file_names_the_file_and_the_config_key(tmp_path, name):
    make, key = MISSING[name]
    source = make(tmp_path)  # constructing reads nothing: `mtrun validate` stays cheap
    with pytest.raises(MtrunError, match=rf"{name}: metadata (file|folder) not found: {tmp_path}.*{key}"):
        source.splits()


def test_jamendo_missing_split_file_names_the_file(tmp_path):
    (tmp_path / "splits" / "split-0").mkdir(parents=True)
    source = MTGJamendo(MTGJamendo.Config(data_dir=str(tmp_path), audio_root=AUDIO, split_index=0))
    with pytest.raises(MtrunError, match=r"not found: .*split-0/autotagging-train\.tsv \(set by \[data\]\.data_dir"):
        source.splits()


def test_audio_pattern_with_an_unknown_field_lists_the_row_fields():
    with pytest.raises(MtrunError, match=r"\{youtube_id\}, which this dataset's rows do not have; available: \{ytid\}"):
        musiccaps(audio_pattern="{youtube_id}.wav").splits()


@pytest.mark.parametrize("pattern", ["{ytid.x}.wav", "{ytid[a]}.wav"])
def test_an_audio_pattern_reaching_into_a_field_is_a_recipe_error(pattern):
    with pytest.raises(MtrunError, match=r"\[data\]\.audio_pattern = .* is not a valid pattern"):
        musiccaps(audio_pattern=pattern).splits()


def test_lp_musiccaps_caption_fields_no_row_has_name_the_keys_and_the_row_fields():
    """A misspelled field name used to drop every row, so only 'no split train' was said later."""
    config = LPMusicCaps.Config(files=[str(FIXTURES / "lp-musiccaps" / "mtt")], audio_root=AUDIO,
                                caption_fields=["caption_writting"], tag_field="tags")
    with pytest.raises(MtrunError, match=r"no row of .* has a caption in \[data\]\.caption_fields = \['caption_writting'\] "
                                         r"or tags in \[data\]\.tag_field = 'tags'; its rows have: .*caption_writing"):
        LPMusicCaps(config).splits()


def test_wrong_file_for_a_dataset_lists_the_columns_it_has():
    with pytest.raises(MtrunError, match=r"lacks the column\(s\) ytid.*it has: file_name, caption_1"):
        MusicCaps(MusicCaps.Config(csv=str(FIXTURES / "clotho" / "clotho_captions_validation.csv"), audio_root=AUDIO)).splits()


@pytest.mark.parametrize("name", sorted(DATA_TABLES))
def test_every_adapter_passes_the_contract_check(registry, name):
    from mtrun.testing import check_component

    config = resolve({**TOY, "data": {"type": name, **DATA_TABLES[name]}}, registry, "adapters.toml").components["data"].config
    source = check_component(registry, "data", name, config=config)
    assert source.splits()
