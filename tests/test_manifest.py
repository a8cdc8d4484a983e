"""The manifest source: CSV/JSONL/Parquet layouts, several captions, tags by category, splits."""

from __future__ import annotations

import json

import pytest

from mtrun.data.sources.manifest import ManifestSource, canonical_split, hash_split, read_table, split_map
from mtrun.errors import MtrunError

EXPECTED = {
    "a": dict(split="train", captions=["a fast reel", "fiddle tune"], tags={"genre": ["reel"], "instrument": ["fiddle", "flute"]}, group="t1"),
    "b": dict(split="val", captions=["slow air"], tags={"genre": ["air"]}, group=None),
    "c": dict(split="test", captions=["a jig", "six eight", "lively"], tags={}, group="t3"),
}


def rows():
    return [
        {"id": "a", "audio": "audio/a.flac", "captions": ["a fast reel", "fiddle tune"], "tags": {"genre": ["reel"], "instrument": ["fiddle", "flute"]}, "split": "train", "group": "t1", "licence": "CC0"},
        {"id": "b", "audio": "audio/b.flac", "captions": ["slow air"], "tags": {"genre": ["air"]}, "split": "validation", "group": None, "licence": "CC0"},
        {"id": "c", "audio": "audio/c.flac", "captions": ["a jig", "six eight", "lively"], "tags": {}, "split": "evaluation", "group": "t3", "licence": "CC0"},
    ]


def write_jsonl(path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))


def write_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = [dict(r, tags=json.dumps(r["tags"])) for r in rows()]  # tags as JSON text is accepted too
    pq.write_table(pa.Table.from_pylist(table), path)


def write_csv_pipes(path):
    path.write_text(
        "id,audio,caption,tag_genre,tag_instrument,split,group,licence\n"
        "a,audio/a.flac,a fast reel|fiddle tune,reel,fiddle;flute,train,t1,CC0\n"
        "b,audio/b.flac,slow air,air,,valid,,CC0\n"
        "c,audio/c.flac,a jig|six eight|lively,,,test,t3,CC0\n"
    )


def write_csv_numbered(path):
    path.write_text(
        "id,audio,caption_1,caption_2,caption_3,tags,split,group,licence\n"
        'a,audio/a.flac,a fast reel,fiddle tune,,"{""genre"": [""reel""], ""instrument"": [""fiddle"", ""flute""]}",train,t1,CC0\n'
        'b,audio/b.flac,slow air,,,"{""genre"": [""air""]}",val,,CC0\n'
        "c,audio/c.flac,a jig,six eight,lively,,test,t3,CC0\n"
    )


@pytest.mark.parametrize(
    ("name", "writer"),
    [("m.jsonl", write_jsonl), ("m.parquet", write_parquet), ("m.csv", write_csv_pipes), ("numbered.csv", write_csv_numbered)],
)
def test_every_layout_gives_the_same_samples(tmp_path, name, writer):
    path = tmp_path / name
    writer(path)
    source = ManifestSource(ManifestSource.Config(path=str(path)))
    assert sorted(source.splits()) == ["test", "train", "val"]
    seen = {}
    for split in source.splits():
        for sample in source.load(split):
            seen[sample.id] = sample
            expected = EXPECTED[sample.id]
            assert split == expected["split"]
            assert sample.captions == expected["captions"]
            assert sample.tags == expected["tags"]
            assert sample.group == expected["group"]
            assert sample.audio == str(tmp_path.resolve() / "audio" / f"{sample.id}.flac")
            assert sample.extra == {"licence": "CC0"}
    assert set(seen) == {"a", "b", "c"}


def test_audio_root_relative_to_the_manifest_and_absolute(tmp_path):
    write_jsonl(tmp_path / "m.jsonl")
    rel = ManifestSource(ManifestSource.Config(path=str(tmp_path / "m.jsonl"), audio_root="elsewhere"))
    assert rel.load("train")[0].audio == str(tmp_path.resolve() / "elsewhere" / "audio" / "a.flac")
    absolute = ManifestSource(ManifestSource.Config(path=str(tmp_path / "m.jsonl"), audio_root="/data"))
    assert absolute.load("train")[0].audio == "/data/audio/a.flac"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("audio,caption\nx.wav,hi\n", r"m\.csv: manifest lacks the required column 'id'; it has: audio, caption"),
        ("id,caption\n1,hi\n", r"lacks the required column 'audio'"),
        ("id\taudio\tcaption\n1\tx.wav\thi\n", r"lacks the required column 'id'; it has: 'id\\taudio\\tcaption' \(it looks tab-separated: set the manifest's format = 'tsv'"),
        ("id,audio,licence\n1,x.wav,CC0\n", r"no text column"),
        ("id,audio,caption\n1,x.wav,hi\n1,y.wav,ho\n", r"m\.csv:3: id '1' already used on line 2"),
        ("id,audio,caption\n1,,hi\n", r"m\.csv:2: item '1' has an empty 'audio' path"),
        ('id,audio,tags\n1,x.wav,"not json"\n', r"m\.csv:2: column 'tags' must be a JSON object"),
    ],
)
def test_bad_manifests_name_the_file_and_the_column(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(MtrunError, match=message):
        ManifestSource(ManifestSource.Config(path=str(tmp_path / "m.csv"))).load("train")


def test_read_table_reads_tsv_json_and_reports_bad_lines(tmp_path):
    (tmp_path / "t.tsv").write_text("id\tcaption\n1\thello, world\n")
    assert read_table(tmp_path / "t.tsv") == [{"id": "1", "caption": "hello, world"}]
    (tmp_path / "t.json").write_text(json.dumps({"x": {"caption": "c"}}))
    assert read_table(tmp_path / "t.json") == [{"id": "x", "caption": "c"}]
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(MtrunError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        read_table(tmp_path / "bad.jsonl")
    with pytest.raises(MtrunError, match="table not found"):
        read_table(tmp_path / "missing.csv")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a quote never closed: every later row would be one long caption
        ('id,audio,caption\nx,a.wav,"12 inch\ny,b.wav,world\nz,c.wav,third\n', r"record that starts on line 2 is not valid CSV"),
        # closed by the next quoted field, rows between swallowed
        ('id,audio,caption\nx,a.wav,"12 inch\ny,b.wav,world\nz,c.wav,"third"\n', r"record that starts on line 2 is not valid CSV"),
        # closed cleanly at a row's end: the inner line is a row of its own
        ('id,audio,caption\nw,a.wav,ok\nx,a.wav,"12 inch\ny,b.wav,world"\nz,c.wav,third\n', r"t\.csv: line 3: a quoted field runs over 2 lines that look like rows"),
    ],
)
def test_a_stray_quote_is_refused_not_swallowing_rows(tmp_path, text, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(MtrunError, match=message):
        read_table(tmp_path / "t.csv")


def test_a_quoted_caption_may_span_lines(tmp_path):
    (tmp_path / "t.csv").write_text('id,audio,caption\nx,a.wav,"two\nlines, fine"\ny,b.wav,"say ""hi"""\n')
    assert read_table(tmp_path / "t.csv") == [{"id": "x", "audio": "a.wav", "caption": "two\nlines, fine"},
                                              {"id": "y", "audio": "b.wav", "caption": 'say "hi"'}]


def test_a_misspelled_split_is_warned_of_and_a_split_named_on_purpose_is_not(tmp_path, caplog):
    rows = ["id,audio,caption,split", "a,a.wav,x,trian", "b,b.wav,y,train", "c,c.wav,z,valdation", "d,d.wav,w,train2",
            "e,e.wav,v,fold1", "f,f.wav,u,trian"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    source = ManifestSource(ManifestSource.Config(path=str(tmp_path / "m.csv")))
    with caplog.at_level("WARNING"):
        splits = source.build()
    assert sorted(splits) == ["fold1", "train", "train2", "trian", "valdation"]  # kept, as before
    warned = [r.getMessage() for r in caplog.records]
    assert any("2 rows have the split 'trian', which is not a split name mtrun knows; did you mean 'train'?" in m for m in warned)
    assert any("1 row has the split 'valdation'" in m and "did you mean 'validation'?" in m for m in warned)
    assert not any("train2" in m or "fold1" in m for m in warned) and len(warned) == 2


def test_split_helpers_normalise_names_and_refuse_leaks():
    assert [canonical_split(s) for s in ("Training", "valid", "evaluation", "development", "fold1")] == ["train", "val", "test", "train", "fold1"]
    assert split_map({"train": ["a", "b"], "validation": ["c"]}) == {"a": "train", "b": "train", "c": "val"}
    with pytest.raises(MtrunError, match=r"'a' is in both 'train' and 'test'"):
        split_map({"train": ["a"], "test": ["a"]}, where="splits.tsv")
    assignments = [hash_split(f"track{i}") for i in range(2000)]
    assert hash_split("track7") == hash_split("track7")
    assert 0.75 < assignments.count("train") / 2000 < 0.85
    assert set(assignments) == {"train", "val", "test"}


def test_manifest_is_a_registered_data_source_that_honours_the_contract(registry, tmp_path):
    from mtrun.testing import check_component

    write_jsonl(tmp_path / "m.jsonl")
    comp = registry.get("data", "manifest")
    check_component(registry, "data", "manifest", config=comp.config_class(path=str(tmp_path / "m.jsonl")))
