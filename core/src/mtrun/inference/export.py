"""``mtrun export RUN -o DIR``: a self-contained model folder for :func:`mtrun.load` and ``mtrun embed``.

The folder::

    DIR/
      model.safetensors     the weights (the checkpoint's file, byte for byte)
      recipe.toml           the resolved recipe it was trained with; paths to files it needs
                            point into assets/ (relative; export.json lists them)
      preprocessing.json    sample rate, mono mix-down, resampler, window length and hop,
                            aggregation: what turns a file into model input
      export.json           marks the folder; source run, checkpoint and step, embedding
                            width, assets, anything still needed from outside
      assets/               tokenizer files (saved from the model's tokenizer) and local files
                            the recipe names (pretrained weights), or hub snapshots of them
      README.md             a model card: components, preprocessing, the evaluation table
      provenance.json       versions, commit and host that trained it
      checksums.json        sha256 and size of every file (load verifies the weights)

It is written into ``DIR.tmp-PID`` and renamed into place; an existing ``DIR`` is replaced only
with ``--force``, and only after the new folder is complete. Before the rename the export is
**verified**: it is loaded like a user would and must give bit-identical embeddings (a probe
waveform, probe texts) to the checkpoint it came from; otherwise nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from mtrun.errors import MtrunError

__all__ = ["ExportError", "configure", "export_model", "run"]


class ExportError(MtrunError):
    """An export cannot be written as asked; the message names the folder."""

    exit_code = 2


_PROBE_TEXTS = ["a mellow piano piece", "A brisk fiddle reel played on solo violin in D major.", "x"]


def _probe_wave(rate: int, seconds: float) -> Any:
    """A deterministic waveform one and a half windows long (two overlapping windows)."""
    import torch

    t = torch.arange(int(rate * seconds * 1.5)) / rate
    g = torch.Generator().manual_seed(0)
    return (0.3 * torch.sin(2 * torch.pi * 330.0 * t) + 0.05 * torch.randn(t.shape, generator=g)).float()


def _local_path(value: str) -> Path | None:
    """The existing file or folder a setting names; only values written as paths count (with a
    ``/`` or starting with ``~`` or ``.``), so ``pooling = "mean"`` never picks up a file "mean"."""
    if not value or "\n" in value or len(value) > 4096 or not ("/" in value or value.startswith(("~", "."))):
        return None
    path = Path(value).expanduser()
    try:
        return path if path.exists() and (path.is_file() or path.is_dir()) else None
    except OSError:
        return None


def _hub_snapshot(name: str) -> Path | None:
    """The local Hugging Face cache's copy of a hub repository, if it holds one."""
    if not name or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a repo name, or no huggingface_hub
        return None


def _copy(source: Path, dest: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, dest, symlinks=False)  # hub snapshots are symlinks into blobs
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)


def _walk_strings(table: Any, prefix: str):
    """``(dotted key, value)`` of every string in a recipe table, nested tables included."""
    if isinstance(table, dict):
        for key, value in table.items():
            yield from _walk_strings(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(table, list):
        for i, value in enumerate(table):
            yield from _walk_strings(value, f"{prefix}.{i}")
    elif isinstance(table, str):
        yield prefix, table


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    table: Any = data
    for part in parts[:-1]:
        table = table[part]
    table[parts[-1]] = value


def _collect_assets(model: Any, recipe: dict[str, Any], tmp: Path) -> tuple[dict[str, str], list[str]]:
    """Copy what the model slots need from outside into ``tmp/assets``; returns the recipe keys
    to point there and what could not be copied."""
    from mtrun.inference.model import INFERENCE_SLOTS

    assets: dict[str, str] = {}
    needs: list[str] = []
    # Tokenizers: saved from the built model, so the tokenizer in use is the one exported,
    # wherever it came from (a hub name, a folder, a preset's default).
    for slot in INFERENCE_SLOTS:
        component = getattr(model.system, slot, None)
        tokenizer = getattr(component, "tokenizer", None)
        table = recipe.get(slot)
        if isinstance(table, dict) and hasattr(tokenizer, "save_pretrained") and _has_field(component, "tokenizer"):
            relative = f"assets/{slot}.tokenizer"
            tokenizer.save_pretrained(str(tmp / relative))
            assets[f"{slot}.tokenizer"] = relative
    # Files and hub repositories named by the model slots' settings (pretrained weights).
    for slot in INFERENCE_SLOTS:
        for dotted, value in _walk_strings(recipe.get(slot), slot):
            if dotted in assets or dotted.endswith(".type"):
                continue
            source = _local_path(value)
            if source is None and dotted.rsplit(".", 1)[-1] in ("pretrained", "checkpoint", "weights", "tokenizer"):
                source = _hub_snapshot(value)
                if source is None and value:
                    needs.append(f"{dotted} = {value!r} (a hub name not in the local cache: loading downloads it)")
            if source is None:
                continue
            relative = f"assets/{dotted}" + (source.suffix if source.is_file() else "")
            _copy(source, tmp / relative)
            assets[dotted] = relative
    return assets, needs


def _has_field(component: Any, name: str) -> bool:
    import attrs

    config = getattr(component, "config", None)
    return config is not None and attrs.has(type(config)) and name in attrs.fields_dict(type(config))


def _eval_table(run_dir: Path | None, step: int | None) -> tuple[str, dict[str, Any] | None]:
    """The Markdown evaluation table of the run's test report for this step (newest first)."""
    from mtrun.run_report import headline_rows

    if run_dir is None or not run_dir.is_dir():
        return "No evaluation report was found for this checkpoint.", None
    candidates = sorted(run_dir.glob("eval-*/eval.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if step is not None and result.get("step") not in (step, None):
            continue
        rows = headline_rows(result.get("metrics") or {})
        if not rows:
            continue
        lines = [
            f"From `{path.parent.name}/` (split `{result.get('split')}`, {result.get('n_items', '?')} recordings, "
            f"{result.get('n_captions', '?')} captions); 95% bootstrap intervals.",
            "",
            "| metric | value | 95% CI |",
            "|---|---:|---|",
        ]
        lines += [f"| {label} | {value} | {ci} |" for label, value, ci in rows]
        return "\n".join(lines), result
    return "No evaluation report was found for this checkpoint.", None


def _model_card(name: str, located: Any, model: Any, recipe: dict[str, Any], preprocessing: dict[str, Any], table: str) -> str:
    from mtrun.inference.model import INFERENCE_SLOTS

    components = []
    for slot in INFERENCE_SLOTS:
        value = recipe.get(slot)
        entries = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
        for entry in entries:
            components.append(f"| `[{slot}]` | `{entry.get('type', '?')}` |")
    return "\n".join(
        [
            f"# {name}",
            "",
            f"A music–text embedding model trained with mtrun (step {located.step}, from `{located.weights}`). "
            "It maps audio and text into one space where cosine similarity ranks music for a text query.",
            "",
            "## Use",
            "",
            "```python",
            "import mtrun",
            f'model = mtrun.load("{name}")',
            'audio = model.embed_audio(["track.mp3"])          # [N, D], L2-normalised',
            'text = model.embed_text(["a mellow piano piece"])  # [M, D]',
            "scores = model.similarity(text, audio)             # [M, N] cosine",
            "```",
            "",
            f"`mtrun embed {name} MUSIC/ -o library.parquet` embeds a folder; "
            f'`mtrun search library.parquet "a mellow piano piece"` searches it.',
            "",
            "## Components",
            "",
            "| slot | type |",
            "|---|---|",
            *components,
            "",
            "## Preprocessing",
            "",
            f"Audio is decoded, mixed to mono and resampled to {preprocessing['sample_rate']} Hz, cut into "
            f"{preprocessing['clip_seconds']:g} s windows every {preprocessing['hop_seconds']:g} s (the last window "
            "aligned to the end; shorter audio repeat-padded to one window); the projected windows are averaged and "
            f"L2-normalised into one {preprocessing['embedding_dim']}-d vector.",
            "",
            "## Evaluation",
            "",
            table,
            "",
        ]
    )


def _checksums(folder: Path) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
        files[path.relative_to(folder).as_posix()] = {"sha256": digest.hexdigest(), "bytes": size}
    return {"algorithm": "sha256", "files": files}


def _same_embeddings(a: Any, b: Any) -> str | None:
    """Why two models' probe embeddings differ, or ``None`` when they are bit-identical."""
    import numpy as np

    wave = _probe_wave(a.sample_rate, a.clip_seconds)
    pairs = {
        "audio": (a.embed_audio(wave, sample_rate=a.sample_rate), b.embed_audio(wave, sample_rate=b.sample_rate)),
        "text": (a.embed_text(_PROBE_TEXTS), b.embed_text(_PROBE_TEXTS)),
    }
    for what, (x, y) in pairs.items():
        if x.shape != y.shape or not np.array_equal(x, y):
            diff = float(np.abs(x - y).max()) if x.shape == y.shape else float("nan")
            return f"{what} embeddings differ (largest difference {diff:.3g})"
    return None


def export_model(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    verify: bool = True,
    registry: Any = None,
) -> Path:
    """Export a run folder or checkpoint folder to ``out`` (see the module docstring).

    Returns:
        The export folder.

    Raises:
        ExportError: ``out`` exists (without ``force``), or the exported model does not give
            the source's embeddings.
        mtrun.inference.model.ModelLoadError: The source is not a loadable model.
    """
    from mtrun.inference.model import EXPORT_INFO, load, locate
    from mtrun.recipe import dump_recipe

    out = Path(out).expanduser()
    located = locate(source)
    if located.kind == "export":
        raise ExportError(f"mtrun export: {source} is already an exported model; copy the folder instead")
    if out.exists() and not force:
        raise ExportError(f"mtrun export: {out} exists; choose another folder or pass --force to replace it")
    model = load(located.path, device="cpu", registry=registry)
    try:  # models/flap-tiny: make models/, as mkdir -p would (once the model loaded: no empty folder)
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"mtrun export: cannot make the folder of {out} ({exc.strerror or exc})") from None
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        recipe = json.loads(json.dumps(model.recipe))  # a plain copy to rewrite
        shutil.copy2(located.weights / "model.safetensors", tmp / "model.safetensors")
        if (located.weights / "provenance.json").is_file():
            shutil.copy2(located.weights / "provenance.json", tmp / "provenance.json")
        assets, needs = _collect_assets(model, recipe, tmp)
        for dotted, relative in assets.items():
            _set(recipe, dotted, relative)
        (tmp / "recipe.toml").write_text(dump_recipe(recipe), encoding="utf-8")
        preprocessing = {
            "sample_rate": model.sample_rate,
            "channels": "mono (mean of the file's channels)",
            "resampler": "torchaudio windowed-sinc (Resample defaults), streamed block by block",
            "clip_seconds": model.clip_seconds,
            "hop_seconds": model.hop_seconds,
            "window_policy": "windows every hop_seconds, the last aligned to the end; shorter audio repeat-padded to one window",
            "aggregation": "mean of the projected windows, then L2 normalisation",
            "embedding_dim": model.dim,
        }
        (tmp / "preprocessing.json").write_text(json.dumps(preprocessing, indent=1) + "\n", encoding="utf-8")
        run_dir = located.weights.parent.parent if located.weights.parent.name == "checkpoints" else None
        table, evaluation = _eval_table(run_dir, located.step)
        info = {
            "format": "mtrun-export",
            "version": 1,
            "source": {"path": str(located.path.resolve()), "checkpoint": str(located.weights.resolve()), "step": located.step},
            "preprocessing": {"clip_seconds": model.clip_seconds, "hop_seconds": model.hop_seconds},
            "embedding_dim": model.dim,
            "sample_rate": model.sample_rate,
            "assets": assets,
            "needs": needs,
            "evaluation": (evaluation or {}).get("metrics"),
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(out.name, located, model, recipe, preprocessing, table), encoding="utf-8")
        (tmp / "checksums.json").write_text(json.dumps(_checksums(tmp), indent=1) + "\n", encoding="utf-8")
        if verify:
            exported = load(tmp, device="cpu", registry=registry)
            problem = _same_embeddings(model, exported)
            if problem:
                raise ExportError(f"mtrun export: the exported model does not reproduce {located.weights}: {problem}; nothing was written")
        old = None
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------ CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare ``mtrun export``'s arguments."""
    parser.description = (
        "Write a self-contained model folder (weights, recipe, preprocessing, tokenizer files, model card) "
        "that mtrun.load and mtrun embed accept without the training data."
    )
    parser.add_argument("source", metavar="RUN", help="a run folder (its best checkpoint, else its latest) or a checkpoint folder")
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip loading the export back and comparing embeddings")


def run(args: argparse.Namespace) -> int:
    """Handle ``mtrun export``; returns the exit status."""
    folder = export_model(args.source, args.out, force=args.force, verify=args.verify)
    info = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    print(f"exported {info['source']['checkpoint']} (step {info['source']['step']}) to {folder}")
    for need in info.get("needs") or []:
        print(f"  still needed from outside: {need}")
    return 0
