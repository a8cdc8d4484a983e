"""Using trained models (docs/using-models.md): mtrun.load, export, embed, search, the run report.

One toy model is trained once for the module on a demo-corpus subset (real FLAC files; a
synthetic manifest when the corpus is not cached), through the real `mtrun RECIPE` command
line, and every test reads it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import mtrun
import mtrun.plugins
from mtrun.cli import main
from mtrun.errors import MtrunError
from toyrecipes import TOY_MODEL

TESTS = Path(__file__).resolve().parent
CORE_SRC = Path(mtrun.__file__).parents[1]
ISOLATED = TESTS / "mtrun_isolated.py"

RECIPE = """
[run]
name = "lib"
seed = 1
device = "cpu"
threads = 1

[loader]
clip_seconds = 10.0
probe_items = 0
""" + TOY_MODEL + """
[[eval]]
type = "retrieval"
bootstrap = 100
subset_size = 0

[trainer]
max_steps = 6
batch_size = 16
checkpoint_every = 0
eval_every = 0
log_every = 2
precision = "fp32"
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(CORE_SRC), str(TESTS / "testkit" / "src"), str(TESTS), env.get("PYTHONPATH", "")])
    env.pop("MTRUN_DEBUG", None)
    env.update(extra)
    return env


def _data_tables(tmp_path: Path) -> str:
    """300 items of the demo corpus (30 in its test split) when it is cached, else the
    synthetic manifest of tests/demodata.py (no test here triggers the corpus build)."""
    from demodata import _synthetic_manifest, demo_subset_manifest

    subset = demo_subset_manifest(tmp_path / "demo", 300)  # absolute audio paths, into the cache
    if subset is not None:
        return f'\n[data]\ntype = "manifest"\npath = "{subset}"\nallow_outside_root = true\n'
    return f'\n[data]\ntype = "manifest"\npath = "{_synthetic_manifest(tmp_path / "data")}"\n'


@pytest.fixture(scope="module")
def plugin_set():
    from test_recipe_validation import isolated_plugins

    return isolated_plugins()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, plugin_set):
    """``mtrun RECIPE`` on the toy model: the run folder, the console output, and the System
    the training process holds at the end (the in-training model)."""
    import mtrun.assemble

    tmp = tmp_path_factory.mktemp("using")
    recipe = tmp / "lib.toml"
    recipe.write_text(RECIPE + _data_tables(tmp))
    built = []
    assemble = mtrun.assemble.assemble

    def keep(resolved, run, **options):
        built.append(assemble(resolved, run, **options))
        return built[-1]

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mtrun.plugins, "get_plugins", lambda: plugin_set)
        mp.setattr(mtrun.assemble, "assemble", keep)
        mp.delenv("MTRUN_DEBUG", raising=False)
        with contextlib.redirect_stdout(out):
            status = main([str(recipe), f'run.output_dir="{tmp / "runs"}"'])
    assert status == 0, out.getvalue()
    return SimpleNamespace(run_dir=tmp / "runs" / "lib", recipe=recipe, stdout=out.getvalue(), system=built[0].system, tmp=tmp)


@pytest.fixture
def isolated(monkeypatch, plugin_set):
    monkeypatch.setattr(mtrun.plugins, "get_plugins", lambda: plugin_set)
    monkeypatch.delenv("MTRUN_DEBUG", raising=False)


def _test_samples(trained, plugin_set):
    """The samples of the run's test split, from its own data source."""
    from mtrun.recipe import load_recipe, resolve_recipe
    from mtrun.run import Run
    from mtrun.spec import construct

    resolved = resolve_recipe(load_recipe(trained.run_dir / "recipe.toml"), plugin_set.registry, "r", slots=["data"])
    run = Run(dir=trained.run_dir, config=resolved.run, loader=resolved.loader, recipe={})
    return list(construct(resolved.components["data"], {"run": run}).load("test"))


def _manifest(samples, path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": s.id, "audio": str(s.audio), "split": "test"}) + "\n" for s in samples))
    return path


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ISOLATED), *args], capture_output=True, text=True, env=env or _env(), timeout=timeout)


# ------------------------------------------------------------------------ the run report


def test_training_ends_with_headline_metrics_with_intervals_and_where_the_reports_are(trained):
    lines = trained.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("test split, step"))
    summary = lines[start:]
    assert len(summary) <= 16, "\n".join(summary)  # a short table, not thirty metrics on a line
    text = "\n".join(summary)
    assert "text→music R@10 (%)" in text and "music→text R@1 (%)" in text
    r10 = next(line for line in summary if "text→music R@10" in line)
    assert "[" in r10 and "]" in r10  # its bootstrap interval
    paths = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in summary if line.startswith(("report:", "run report:", "checkpoint:"))}
    assert Path(paths["report"]) == next(trained.run_dir.glob("eval-test-*")) / "report.md"
    assert Path(paths["run report"]) == trained.run_dir / "report.md"
    assert Path(paths["checkpoint"]).parent == trained.run_dir / "checkpoints"
    saved = json.loads((Path(paths["report"]).parent / "eval.json").read_text())
    assert saved["checkpoint"] == paths["checkpoint"]  # which weights the evaluation after training used


def _png_series(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
        colours = len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0))
        return {"colours": colours, **json.loads(image.text["mtrun:series"])}


def test_report_pngs_plot_the_numbers_in_metrics_jsonl(trained, isolated):
    records = [json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val/retrieval/t2a/R@10" in r]
    assert len(train) == 3 and val  # log_every 2 over 6 steps; one evaluation at the end

    loss = _png_series(trained.run_dir / "curves" / "loss.png")
    assert loss["colours"] > 50  # drawn, not blank
    assert loss["lines"]["training loss"] == {"step": [r["step"] for r in train], "value": [r["loss"] for r in train]}
    assert loss["lines"]["validation loss"]["value"] == [r["val/loss"] for r in val]
    lr = _png_series(trained.run_dir / "curves" / "learning_rate.png")
    assert lr["lines"]["learning rate"]["value"] == [r["lr"] for r in train]
    # One validation round (at the end): no figure of single dots; its numbers are in the evaluation.
    assert len(val) == 1 and not (trained.run_dir / "curves" / "validation.png").exists()
    report = (trained.run_dir / "report.md").read_text()
    for name in ("loss", "learning_rate"):
        assert f"(curves/{name}.png)" in report
    assert "(curves/validation.png)" not in report
    assert "text→music R@10 (%)" in report and "retrieval_curves.png" in report

    (trained.run_dir / "report.md").unlink()
    assert main(["report", str(trained.run_dir)]) == 0
    assert (trained.run_dir / "report.md").read_text() == report


def test_curves_include_every_logged_temperature_and_skip_what_was_not_logged():
    from mtrun.run_report import curve_series

    records = [
        {"step": 10, "loss": 3.0, "lr": 1e-3, "infonce/temperature": 0.07},
        {"step": 20, "loss": 2.5, "lr": 9e-4, "infonce/temperature": 0.065},
        {"step": 20, "val/loss": 2.7, "val/retrieval/t2a/R@10": 12.5, "val/retrieval/t2a/R@10:ci_low": 9.0},
    ]
    series = curve_series(records)
    assert series["temperature"]["lines"]["infonce/temperature"] == {"step": [10, 20], "value": [0.07, 0.065]}
    assert "validation" not in series  # validation logged at one step only: single dots, no figure
    records.append({"step": 30, "val/loss": 2.5, "val/retrieval/t2a/R@10": 14.0})
    series = curve_series(records)
    assert series["validation"]["lines"] == {"retrieval/t2a/R@10": {"step": [20, 30], "value": [12.5, 14.0]}}  # no interval bounds
    assert set(curve_series([{"step": 1, "loss": 1.0}])) == {"loss"}


# ------------------------------------------------------------------------ load and export


def _probe_inputs(samples):
    import torch

    g = torch.Generator().manual_seed(5)
    waves = [torch.randn(44100 * 23, generator=g) * 0.1, torch.randn(2, 12345, generator=g) * 0.2]
    return [str(s.audio) for s in samples[:3]], waves, [c for s in samples[:3] for c in s.captions] + ["a mellow piano piece"]


def test_export_then_load_in_a_fresh_process_gives_the_in_training_models_embeddings_exactly(trained, plugin_set, tmp_path):
    from mtrun.inference.model import Model

    files, waves, texts = _probe_inputs(_test_samples(trained, plugin_set))
    spec = tmp_path / "inputs.json"
    spec.write_text(json.dumps({"files": files, "texts": texts}))
    import torch

    torch.save(waves, tmp_path / "waves.pt")
    # The System the training process ended with, behind the same inference front end.
    live = Model(trained.system, clip_seconds=10.0)
    expected = [live.embed_audio(files), live.embed_audio(waves, sample_rate=44100), live.embed_text(texts)]

    export = tmp_path / "exported"
    proc = _cli("export", str(trained.run_dir), "-o", str(export))
    assert proc.returncode == 0, proc.stderr
    assert f"to {export}" in proc.stdout
    script = (
        "import json, sys, numpy as np, torch, mtrun.plugins\n"
        "from test_recipe_validation import isolated_plugins\n"
        "ps = isolated_plugins(); mtrun.plugins.get_plugins = lambda: ps\n"
        "torch.set_num_threads(1)\n"  # as the training process ran ([run].threads = 1)
        "import mtrun\n"
        f"m = mtrun.load({str(export)!r}, device='cpu')\n"
        f"spec = json.load(open({str(spec)!r}))\n"
        f"waves = torch.load({str(tmp_path / 'waves.pt')!r})\n"
        "np.savez(sys.argv[1], files=m.embed_audio(spec['files']), waves=m.embed_audio(waves, sample_rate=44100), texts=m.embed_text(spec['texts']))\n"
    )
    out = tmp_path / "fresh.npz"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    fresh = np.load(out)
    for name, want in zip(("files", "waves", "texts"), expected):
        assert fresh[name].shape == want.shape and np.array_equal(fresh[name], want), name


def test_an_export_is_self_contained_and_refuses_damage(trained, tmp_path, isolated):
    from mtrun.inference.model import ModelLoadError

    export = tmp_path / "models" / "flap-tiny"  # models/ is made, as mkdir -p would
    assert main(["export", str(trained.run_dir), "-o", str(export)]) == 0
    names = {p.name for p in export.iterdir()}
    assert {"model.safetensors", "recipe.toml", "preprocessing.json", "export.json", "README.md", "checksums.json"} <= names
    assert not any(n.startswith(("optimizer", "rng", "trainer_state")) for n in names)
    card = (export / "README.md").read_text()
    assert "text→music R@10 (%)" in card and "mtrun.load" in card
    assert json.loads((export / "preprocessing.json").read_text())["clip_seconds"] == 10.0
    # Nothing points back into the run folder: it can move to another machine.
    moved = tmp_path / "elsewhere"
    export.rename(moved)
    model = mtrun.load(moved, device="cpu")
    assert model.source.kind == "export" and model.dim == 16 and model.sample_rate == 8000

    assert main(["export", str(trained.run_dir), "-o", str(moved)]) == 2  # exists: --force needed
    data = bytearray((moved / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (moved / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors does not match its recorded checksum"):
        mtrun.load(moved)


def test_tokenizer_files_travel_with_an_export_of_a_real_text_encoder(tmp_path):
    """The quickstart's model slots (MAViL + hf-text), as a checkpoint written straight from a
    freshly built System; the export saves its tokenizer and must reproduce its embeddings."""
    pytest.importorskip("mtrun_mavil")
    pytest.importorskip("mtrun_hf_text")
    import torch

    from mtrun.assemble import assemble_model
    from mtrun.inference.model import INFERENCE_SLOTS, Model
    from mtrun.plugins import get_plugins
    from mtrun.recipe import dump_recipe, load_recipe, resolve_recipe
    from mtrun.run import Run
    from mtrun.train.checkpoint import write_checkpoint

    registry = get_plugins().registry
    data = dict(load_recipe(TESTS.parent / "recipes" / "quickstart.toml"))
    resolved = resolve_recipe(data, registry, "quickstart", slots=INFERENCE_SLOTS)
    system = assemble_model(resolved, Run(dir=tmp_path, config=resolved.run, loader=resolved.loader, recipe=data))
    folder = write_checkpoint(
        tmp_path / "run" / "checkpoints" / "step-000001", model_state=system.state_dict(), optimizer_state=None,
        scheduler_state={}, trainer_state={"step": 1}, rng_tensors={"x": torch.zeros(1)}, rng_plain={},
        recipe=json.loads(json.dumps(data)),
    )
    (tmp_path / "run" / "recipe.toml").write_text(dump_recipe(data))
    assert main(["export", str(folder), "-o", str(tmp_path / "exported")]) == 0
    info = json.loads((tmp_path / "exported" / "export.json").read_text())
    assert info["assets"] == {"text_encoder.tokenizer": "assets/text_encoder.tokenizer"}
    assert (tmp_path / "exported" / "assets" / "text_encoder.tokenizer" / "tokenizer_config.json").is_file()
    loaded = mtrun.load(tmp_path / "exported", device="cpu")
    texts = ["A brisk fiddle reel played on solo violin in D major.", "132 bpm, D major, fast, reel"]
    assert np.array_equal(loaded.embed_text(texts), Model(system.eval(), clip_seconds=2.56).embed_text(texts))


def test_load_names_the_path_for_anything_that_is_not_a_model(tmp_path):
    from mtrun.inference.model import ModelLoadError

    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'nope'}: no such file or folder"):
        mtrun.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither a run folder"):
        mtrun.load(tmp_path / "empty")
    (tmp_path / "music").mkdir()
    (tmp_path / "music" / "a.wav").write_bytes(b"")
    assert main(["embed", str(tmp_path / "nope"), str(tmp_path / "music"), "-o", str(tmp_path / "index" / "x.parquet")]) == 1
    assert not (tmp_path / "index").exists()  # no folder made for a model that did not load


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--hop-seconds", "-1"], "--hop-seconds: must be more than 0 (got -1)"), (["--clip-seconds", "0"], "--clip-seconds: must be more than 0"),
     (["--batch-size", "x"], "--batch-size: 'x' is not a number"), (["--workers", "-1"], "--workers: must be at least 0")],
)
def test_embed_refuses_a_window_policy_or_worker_count_that_is_not_positive(tmp_path, capsys, option, message):
    assert main(["embed", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "x.parquet"), *option]) == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_audio_is_an_error_not_an_empty_index(tmp_path):
    from mtrun.inference.library import EmbedError, collect_inputs

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not audio")
    with pytest.raises(EmbedError, match=r"notes: the folder holds no audio files \(looked for \.aac, .*\.wav"):
        collect_inputs([tmp_path / "notes"])
    (tmp_path / "notes" / "a.flac").write_bytes(b"")
    assert [e.path for e in collect_inputs([tmp_path / "notes"])] == [str((tmp_path / "notes" / "a.flac").absolute())]


def test_a_window_policy_that_is_not_positive_is_an_error_naming_it(trained, isolated):
    with pytest.raises(MtrunError, match=r"positive numbers: hop_seconds = -1\.0"):
        mtrun.load(trained.run_dir, device="cpu", hop_seconds=-1)


# ------------------------------------------------------------------------ the Python API


def test_the_same_file_gives_the_same_vector_whatever_it_is_batched_with(trained, plugin_set):
    samples = _test_samples(trained, plugin_set)
    model = mtrun.load(trained.run_dir, device="cpu", registry=plugin_set.registry)
    files = [str(s.audio) for s in samples[:5]]
    together = model.embed_audio(files)
    alone = np.stack([model.embed_audio(f) for f in files])
    reversed_ = model.embed_audio(files[::-1])[::-1]
    assert np.array_equal(together, alone) and np.array_equal(together, reversed_)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)
    windowed = model.embed_audio(files[0], windows=True)
    assert np.array_equal(windowed.vector, together[0]) and windowed.windows.shape[1] == model.dim
    text = model.embed_text(samples[0].captions[0])
    assert model.similarity(text, together).shape == (1, 5)
    assert model.similarity(text, text) == pytest.approx(1.0)


def test_a_ten_minute_stereo_file_embeds_in_memory_bounded_by_the_window_not_the_file(trained, tmp_path):
    """The growth of the process's peak memory while embedding 10 min of 44.1 kHz stereo stays
    far below what decoding the whole file would take (10 min × 44.1 kHz × 2 ch × 4 B = 212 MB)."""
    import soundfile as sf

    long_file, short_file = tmp_path / "long.wav", tmp_path / "short.wav"
    rate, seconds = 44100, 600
    t = np.arange(rate * 10) / rate
    block = (0.2 * np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], 1)).astype("float32")
    with sf.SoundFile(long_file, "w", rate, 2, subtype="PCM_16") as f:
        for _ in range(seconds // 10):
            f.write(block)
    sf.write(short_file, block, rate, subtype="PCM_16")
    script = (
        "import json, sys, torch, mtrun.plugins\n"
        "from test_recipe_validation import isolated_plugins\n"
        "ps = isolated_plugins(); mtrun.plugins.get_plugins = lambda: ps\n"
        "torch.set_num_threads(1)\n"  # a shared 2-core machine: no waiting at thread barriers
        "import mtrun\n"
        "from mtrun.data.audio import load_waveform\n"
        "from mtrun.interfaces import Sample\n"
        "def kb(field):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))\n"
        "def peak_growth_mb(work):\n"
        "    open('/proc/self/clear_refs', 'w').write('5')\n"  # reset the peak (VmHWM) to the current RSS
        "    before = kb('VmRSS'); result = work(); return (kb('VmHWM') - before) / 1024, result\n"
        f"m = mtrun.load({str(trained.run_dir)!r}, device='cpu')\n"
        f"m.embed_audio({str(short_file)!r}, windows=True)\n"  # warm-up: allocator, kernels
        f"streamed, e = peak_growth_mb(lambda: m.embed_audio({str(long_file)!r}, windows=True))\n"
        f"whole, _ = peak_growth_mb(lambda: load_waveform(Sample(id='long', audio={str(long_file)!r}), 8000))\n"
        "print(json.dumps({'growth_mb': streamed, 'whole_file_mb': whole, 'seconds': e.seconds, 'windows': len(e.windows)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=180)
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip("this kernel cannot reset the peak memory counter (/proc/self/clear_refs)")
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"10-min stereo 44.1 kHz file: peak memory grew by {measured['growth_mb']:.1f} MB streamed, "
        f"{measured['whole_file_mb']:.1f} MB decoding the whole file (the evaluation's loader)"
    )
    assert measured["seconds"] == pytest.approx(600.0, abs=1e-3)
    assert measured["windows"] == (600 - 10) // 5 + 1  # 10 s windows every 5 s, the last at the end
    assert measured["whole_file_mb"] > 200  # the baseline: 212 MB of float32 samples, at least
    assert measured["growth_mb"] < 40 and measured["growth_mb"] < measured["whole_file_mb"] / 5


# ------------------------------------------------------------------------ embed and search


def _library(trained, plugin_set, folder: Path, n: int) -> list[Path]:
    folder.mkdir()
    files = []
    for s in _test_samples(trained, plugin_set)[:n]:
        link = folder / (s.id + Path(str(s.audio)).suffix)
        link.symlink_to(s.audio)
        files.append(link)
    (folder / "nested").mkdir()
    (folder / "nested" / "broken.flac").write_bytes(os.urandom(4000))
    (folder / "nested" / "empty.wav").write_bytes(b"")
    (folder / "notes.txt").write_text("not audio, not listed")
    return files


def test_embed_killed_half_way_and_run_again_gives_exactly_one_embedding_per_file(trained, plugin_set, tmp_path, isolated, capsys):
    from mtrun.inference.store import read_embeddings

    files = _library(trained, plugin_set, tmp_path / "music", 20)
    out = tmp_path / "library.parquet"
    parts = tmp_path / ".library.parquet.parts"
    # One thread everywhere: the vectors of the two runs are compared bit for bit below.
    args = ["embed", str(trained.run_dir), str(tmp_path / "music"), "-o", str(out), "--batch-size", "2", "--workers", "1", "--threads", "1"]
    proc = subprocess.Popen([sys.executable, str(ISOLATED), *args], env=_env(MTRUN_TEST_ENCODE_DELAY="0.3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while len(list(parts.glob("part-*.npz"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(parts.glob("part-*.npz")))
    assert 3 <= written < 10, "the run was not killed half-way"
    assert not out.exists()  # never half-written: nothing until the end

    assert main(args) == 0
    console = capsys.readouterr().out
    first_line = console.splitlines()[0]
    embedded = int(first_line.split()[1])
    assert 0 < embedded < 20 and "2 skipped" in first_line  # the killed run's work was kept
    assert "broken.flac" in console and "empty.wav" in console and "zero-length" in console
    table = read_embeddings(out)
    assert sorted(table.paths) == sorted(str(f.absolute()) for f in files)  # exactly one row each
    skipped = [json.loads(line) for line in (tmp_path / "library.parquet.skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(s["path"]).name for s in skipped) == ["broken.flac", "empty.wav"]
    assert all(s["reason"] for s in skipped) and not parts.exists()

    # The killed run, the second run and a clean one batched the files differently; the
    # vectors are the same.
    clean_args = ["embed", str(trained.run_dir), str(tmp_path / "music"), "-o", str(tmp_path / "clean.npy"), "--workers", "0"]
    assert main([*clean_args, "--batch-size", "2", "--threads", "1"]) == 0
    clean = read_embeddings(tmp_path / "clean.npy")
    by_path = dict(zip(clean.paths, clean.vectors))
    assert all(np.array_equal(v, by_path[p]) for p, v in zip(table.paths, table.vectors))
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("embedded 0 file(s), 20 already embedded, 2 skipped")


def test_search_with_each_caption_as_query_reproduces_eval_r_at_10(trained, plugin_set, tmp_path, isolated, capsys):
    from mtrun.eval.commands import evaluate_target

    samples = _test_samples(trained, plugin_set)
    result = evaluate_target(trained.run_dir, registry=plugin_set.registry, tasks=["retrieval"],
                             overrides=["eval.0.bootstrap=0", "eval.0.subset_size=0"], out=tmp_path / "eval")
    index = tmp_path / "indexes" / "test.parquet"  # indexes/ is made, as mkdir -p would
    assert main(["embed", str(trained.run_dir), str(_manifest(samples, tmp_path / "test.jsonl")), "-o", str(index), "--workers", "0"]) == 0
    queries = [(s.id, c) for s in samples for c in s.captions]
    (tmp_path / "queries.txt").write_text("".join(c + "\n" for _, c in queries))
    capsys.readouterr()
    assert main(["search", str(index), "--queries-file", str(tmp_path / "queries.txt"), "--json", "-k", "10"]) == 0
    answers = json.loads(capsys.readouterr().out)
    hits = [item in [h["id"] for h in a["results"]] for (item, _), a in zip(queries, answers)]
    r10 = 100.0 * sum(hits) / len(hits)
    print(f"R@10 over {len(samples)} clips, {len(queries)} captions: search {r10:.4f}, mtrun eval {result['metrics']['retrieval/t2a/R@10']:.4f}")
    assert len(answers) == len(queries) == result["metrics"]["retrieval/n_captions"]
    assert r10 == pytest.approx(result["metrics"]["retrieval/t2a/R@10"], abs=1e-9)

    # music → music: the query file itself is left out; the table names the method.
    assert main(["search", str(index), "--like", str(samples[0].audio), "-k", "3"]) == 0
    table = capsys.readouterr().out
    assert "top 3 of" in table and "(exact)" in table and f"│ {samples[0].id} " not in table
    pytest.importorskip("faiss")
    assert main(["search", str(index), "--queries-file", str(tmp_path / "queries.txt"), "--json", "-k", "10", "--approximate"]) == 0
    approximate = json.loads(capsys.readouterr().out)
    assert [[h["id"] for h in a["results"]] for a in approximate] == [[h["id"] for h in a["results"]] for a in answers]
    assert (tmp_path / "indexes" / "test.parquet.hnsw.faiss").is_file()


def test_approximate_search_without_faiss_says_how_to_install_it(trained, tmp_path, isolated, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert main(["search", str(tmp_path / "any.parquet"), "query", "--approximate"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'mtrun[search]'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_window_search_says_where_in_the_track(trained, tmp_path, isolated, capsys):
    """Two files made of different halves: the window that matches a query's half is found."""
    import soundfile as sf

    model = mtrun.load(trained.run_dir, device="cpu")
    rate = 16000
    t = np.arange(rate * 10) / rate
    low, high = 0.3 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 1760 * t)
    sf.write(tmp_path / "a.flac", np.concatenate([low, low, high]).astype("float32"), rate)
    sf.write(tmp_path / "b.flac", np.concatenate([low, low, low]).astype("float32"), rate)
    sf.write(tmp_path / "probe.flac", high.astype("float32"), rate)
    index = tmp_path / "w.npy"
    assert main(["embed", str(trained.run_dir), str(tmp_path / "a.flac"), str(tmp_path / "b.flac"), "-o", str(index), "--windows", "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["search", str(index), "--like", str(tmp_path / "probe.flac"), "--windows", "--json", "-k", "2"]) == 0
    best = json.loads(capsys.readouterr().out)["results"][0]
    assert Path(best["path"]).name == "a.flac" and best["start"] == pytest.approx(20.0)
    assert model.embed_audio(tmp_path / "probe.flac").shape == (model.dim,)
