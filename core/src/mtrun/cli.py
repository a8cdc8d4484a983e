"""The ``mtrun`` command line.

``mtrun RECIPE [--profile NAME] [--resume] [KEY=VALUE | ~KEY ...]`` trains; subcommands
``validate``, ``plugins`` and ``components`` inspect recipes and what is installed; ``eval``,
``report``, ``export``, ``embed`` and ``search`` evaluate and use trained models; ``ablate``
runs ablations and ``new-plugin`` starts a plugin distribution. Errors that
are the user's to fix (:class:`~mtrun.errors.MtrunError`) print as a message without a
traceback and exit with the error's status; ``MTRUN_DEBUG=1`` shows the traceback instead.

Only the standard library is imported at module level, so ``mtrun --help`` and a mistyped
command never pay for importing torch. ``mtrun validate`` does: it registers every installed
component, and component modules import torch (about 2 s on a laptop-class CPU).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Sequence

from mtrun.errors import MtrunError

__all__ = ["main"]

# Commands whose parser and handler live beside the code they drive: each module has
# ``configure(parser)`` and ``run(args) -> int``, imported only when its command is used.
MODULE_COMMANDS = {
    "data": "mtrun.data.commands",
    "eval": "mtrun.eval.commands",
    "embed": "mtrun.inference.library",
    "search": "mtrun.inference.search",
    "export": "mtrun.inference.export",
    "report": "mtrun.run_report",
    "ablate": "mtrun.ablation.command",
    "new-plugin": "mtrun.scaffold",
}

SUBCOMMANDS = ("train", "validate", "plugins", "components", *MODULE_COMMANDS)

_DESCRIPTION = """\
Train and inspect music-text representation models from TOML recipes.

usage:
  mtrun RECIPE [--profile NAME] [--resume] [KEY=VALUE | ~KEY ...]
      train (alias: mtrun train ...)
  mtrun validate RECIPE [--profile NAME] [--print] [KEY=VALUE ...]
      check a recipe, build nothing
  mtrun plugins [--json]                       installed plugins
  mtrun components [KIND [NAME]]               components and their settings
  mtrun data {shard,demo} ...                  prepare data (see mtrun data -h)
  mtrun eval CHECKPOINT_OR_RECIPE [--tasks ...]
      evaluate and write a report
  mtrun report RUN                             write RUN/report.md
  mtrun export RUN -o DIR                      a self-contained model folder
  mtrun embed MODEL INPUT... -o OUT.parquet    embed files, folders, manifests
  mtrun search INDEX "a mellow piano piece" | --like FILE
      text -> music, music -> music
  mtrun ablate RECIPE --grid KEY=V1,V2 --seeds 3
      variants x seeds -> ablation table
  mtrun new-plugin NAME --kind objective       a plugin distribution to fill in

Overrides are TOML values, e.g.
  trainer.optimizer.lr=3e-4  run.name="tiny"  objective.0.weight=2  ~augmenter
"""


# ------------------------------------------------------------------------------ parsers


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtrun",
        usage="mtrun RECIPE [options] [KEY=VALUE ...] | mtrun COMMAND ...",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from mtrun import __version__

    parser.add_argument("--version", action="version", version=f"mtrun {__version__}")
    parser.add_argument("command", nargs="?", help="a recipe file, or one of: " + ", ".join(SUBCOMMANDS))
    return parser


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="the recipe TOML file")
    parser.add_argument("--profile", metavar="NAME", help="merge the recipe's [profile.NAME] table")
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],  # without it, Python 3.11 lists the overrides among the missing arguments
        metavar="KEY=VALUE | ~KEY",
        help="override a key with a TOML value (trainer.optimizer.lr=3e-4), or delete it (~augmenter)",
    )


def _command_parser(command: str) -> argparse.ArgumentParser:
    if command == "train":
        parser = argparse.ArgumentParser(allow_abbrev=False, prog="mtrun", description="Train from a recipe.")
        _add_recipe_args(parser)
        parser.add_argument(
            "--resume", action="store_true", help="continue from the run folder's latest checkpoint"
        )
    elif command == "validate":
        parser = argparse.ArgumentParser(
            allow_abbrev=False,
            prog="mtrun validate",
            description="Load and check a recipe (extends, profile, overrides, every component's "
            "settings) without building anything.",
        )
        _add_recipe_args(parser)
        parser.add_argument("--print", action="store_true", dest="print_recipe", help="print the resolved recipe as TOML")
    elif command == "plugins":
        parser = argparse.ArgumentParser(allow_abbrev=False, prog="mtrun plugins", description="List loaded plugins and their components.")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    elif command == "components":
        parser = argparse.ArgumentParser(
            allow_abbrev=False,
            prog="mtrun components",
            description="List components; with KIND NAME, show that component's settings.",
        )
        parser.add_argument("kind", nargs="?", help="a component kind (audio_encoder, objective, ...)")
        parser.add_argument("name", nargs="?", help="a registered component name")
        parser.add_argument("--markdown", action="store_true", help="print the component reference as Markdown")
        parser.add_argument("--plugin", action="append", metavar="NAME", help="with --markdown: only this plugin's components (repeatable)")
    elif command in MODULE_COMMANDS:
        parser = argparse.ArgumentParser(allow_abbrev=False, prog=f"mtrun {command}")
        importlib.import_module(MODULE_COMMANDS[command]).configure(parser)
    else:  # pragma: no cover - guarded by SUBCOMMANDS
        raise AssertionError(command)
    return parser


# ----------------------------------------------------------------------------- commands


def _registry():
    # Looked up through the module so tests can substitute an isolated plugin set.
    from mtrun import plugins

    return plugins.get_plugins().registry


def _cmd_train(args: argparse.Namespace) -> int:
    from mtrun.run_report import print_summary
    from mtrun.runner import train

    result = train(args.recipe, overrides=list(args.overrides), profile=args.profile, resume=args.resume)
    if result:
        print_summary(result)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from mtrun import schema
    from mtrun.recipe import dump_recipe, load_recipe, resolve_recipe

    data = load_recipe(args.recipe, overrides=args.overrides, profile=args.profile)
    resolved = resolve_recipe(data, _registry(), str(args.recipe))
    if data.ablation is not None:  # `mtrun ablate`'s table: its own keys, not the variants' recipes
        from mtrun.ablation.plan import plan_ablation

        plan_ablation(args.recipe, table=data.ablation, profile=args.profile)
    rows: list[tuple[str, str]] = []
    for spec in resolved.all_specs():
        desc = spec.name
        slot = schema.slot(spec.slot.split("[")[0])
        if "." not in spec.slot and slot is not None and "weight" in slot.extra_keys:
            desc += f" (weight {spec.weight:g}" + (f", name {spec.label}" if spec.label != spec.name else "") + ")"
        if "set" in spec.extras:
            desc += f" on evaluation set {spec.extras['set']!r} (split {spec.extras.get('split', 'test')!r})"
        rows.append((spec.slot, desc))
    if args.print_recipe:
        from mtrun.eval.sets import plan_lines

        # The recipe as resolved, then the component tree (nested tables included, defaults
        # filled in) and the evaluation plan as comments, so the output still loads as a recipe.
        print(dump_recipe(resolved.data), end="")
        print("\n# Components, as resolved (defaults included):")
        for slot, desc in rows:
            depth = slot.count(".")
            print(f"# {'  ' * depth}{slot}: {desc}")
        print("#")
        for line in plan_lines(resolved):
            print(f"# {line}")
        return 0
    print(f"{args.recipe}: recipe OK" + (f" (profile {args.profile})" if args.profile else ""))
    width = max(len(slot) for slot, _ in rows) if rows else 0
    for slot, desc in rows:
        print(f"  {slot:<{width}}  {desc}")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from mtrun import plugins
    from mtrun.errors import PluginError

    try:
        plugin_set = plugins.get_plugins()
    except PluginError:
        # Show what does work, and each broken plugin with its error, instead of only the first error.
        plugin_set = plugins.load_plugins(strict=False)
    broken = [
        {"name": b.info.name, "distribution": b.info.distribution, "version": b.info.version, "error": str(b.error)}
        for b in plugin_set.broken
    ]
    entries = [
        {
            "name": p.info.name,
            "distribution": p.info.distribution,
            "version": p.info.version,
            "components": [{"kind": k, "name": n} for k, n in plugin_set.components_of(p.info.name)],
        }
        for p in plugin_set.plugins
    ]
    status = 1 if broken else 0
    if args.json:
        print(json.dumps({"plugins": entries, **({"broken": broken} if broken else {})}, indent=2))
        return status
    from mtrun.console import make_console, print_table

    rows = [(e["name"], e["distribution"] or "-", e["version"] or "-",
             "\n".join(f"{c['kind']}: {c['name']}" for c in e["components"]) or "-") for e in entries]
    print_table(make_console(), "mtrun plugins", ("plugin", "distribution", "version", "components"), rows)
    for b in broken:
        print(f"broken, left out: {b['error']}", file=sys.stderr)
    if broken:
        print("Training and validation refuse to start while a plugin is broken: fix it, or skip it with "
              "MTRUN_DISABLE_PLUGINS=" + ",".join(b["name"] for b in broken), file=sys.stderr)
    return status


def _unknown(what: str, value: str, choices: Sequence[str], listing: str = "installed") -> int:
    from mtrun.registry import suggest

    hint = suggest(value, choices)
    print(
        f"mtrun components: no {what} {value!r}"
        + (f" (did you mean {hint!r}?)" if hint else "")
        + f"; {listing}: {', '.join(choices) or 'none'}",
        file=sys.stderr,
    )
    return 2


def _cmd_components(args: argparse.Namespace) -> int:
    from mtrun.console import make_console, print_table
    from rich.markup import escape

    from mtrun.schema import KINDS, SLOTS

    from mtrun.reference import default_text, field_type_text, render_markdown

    registry = _registry()
    if args.plugin and not args.markdown:
        print("mtrun components: --plugin selects what --markdown writes; add --markdown", file=sys.stderr)
        return 2
    if args.markdown:
        known = sorted({c.plugin.name for c in registry})
        for name in args.plugin or []:
            if name not in known:
                return _unknown("plugin with components", name, known)
        print(render_markdown(registry, args.plugin or None), end="")
        return 0
    console = make_console()
    kind = args.kind
    kinds = [k.name for k in KINDS]
    if kind is not None and kind not in kinds:
        # Accept slot names too: `mtrun components audio_projector` means projectors.
        slot = next((s for s in SLOTS if s.name == kind), None)
        if slot is None:
            return _unknown("component kind", kind, kinds, listing="kinds")
        kind = slot.kind
    if kind is None:
        rows = [(comp.kind, comp.name, comp.plugin.name, comp.summary) for comp in registry]
        print_table(console, "mtrun components", ("kind", "name", "plugin", "summary"), rows)
        return 0
    if args.name is None:
        rows = [(comp.name, comp.plugin.name, comp.summary) for comp in registry if comp.kind == kind]
        print_table(console, f"{kind} components", ("name", "plugin", "summary"), rows)
        return 0
    if (kind, args.name) not in registry:
        return _unknown(kind, args.name, registry.names(kind))
    import attrs

    comp = registry.get(kind, args.name)
    fields = attrs.fields(comp.config_class)
    where = f"{comp.cls.__module__}.{comp.cls.__qualname__}, {comp.plugin.describe()}"
    console.print(f"[bold]{escape(kind)} {escape(comp.name)}[/bold] ({escape(where)})")
    if comp.summary:
        console.print(escape(comp.summary))
    if not fields:
        console.print("This component takes no settings.")
        return 0
    # The recipe tables it goes in: the slot asked for, else every slot of its kind.
    tables = [s.table() for s in SLOTS if s.name == args.kind] or [s.table() for s in SLOTS if s.kind == kind] or [f"[{kind}]"]
    rows = [(f.name, field_type_text(f), default_text(f), str(f.metadata.get("help", ""))) for f in fields]
    print_table(console, f'settings: {" or ".join(tables)} type = "{comp.name}"', ("key", "type", "default", "help"), rows)
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "validate": _cmd_validate,
    "plugins": _cmd_plugins,
    "components": _cmd_components,
}


# --------------------------------------------------------------------------------- main


def _run(argv: list[str]) -> int:
    if not argv:
        _top_parser().print_help()
        return 2
    if argv[0] in ("-h", "--help", "--version"):
        _top_parser().parse_args(argv[:1])
        return 0
    if argv[0].startswith("-") and argv[0].split("=")[0] not in ("--profile", "--resume"):
        print(f"mtrun: unknown option {argv[0]}; the first argument is a recipe file or a command (mtrun --help)", file=sys.stderr)
        return 2
    if argv[0] not in SUBCOMMANDS and not os.path.exists(argv[0]) and not argv[0].endswith(".toml"):
        from mtrun.registry import suggest

        hint = suggest(argv[0], SUBCOMMANDS)
        if hint:
            print(f"mtrun: {argv[0]!r} is neither a command nor a file (did you mean `mtrun {hint}`?)", file=sys.stderr)
            return 2
    # `mtrun recipes/flap.toml ...` is the short form of `mtrun train recipes/flap.toml ...`.
    command, rest = (argv[0], argv[1:]) if argv[0] in SUBCOMMANDS else ("train", argv)
    parser = _command_parser(command)
    if command in ("train", "validate", "ablate"):
        # Options may come after the overrides: `mtrun r.toml trainer.optimizer.lr=1e-3 --profile tiny`.
        args = parser.parse_intermixed_args(rest)
    else:
        args = parser.parse_args(rest)
    if command in MODULE_COMMANDS:
        return importlib.import_module(MODULE_COMMANDS[command]).run(args)
    return _COMMANDS[command](args)


def _resume_hint(argv: list[str]) -> str:
    """For an interrupted training run: where its work is and how to continue it."""
    if argv and argv[0] == "embed":
        return "; the files embedded so far are kept: run the same command again to continue"
    if argv and argv[0] == "train":
        argv = argv[1:]
    if not argv or argv[0] in SUBCOMMANDS or argv[0].startswith("-"):
        return ""
    import shlex

    again = [a for a in argv if a != "--resume"]
    return f"; checkpoints already written are kept. Continue with: mtrun {shlex.join(again)} --resume"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mtrun`` command line and return its exit status.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when ``None``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("MTRUN_DEBUG", "") not in ("", "0")
    try:
        return _run(argv)
    except MtrunError as exc:
        if debug:
            raise
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print("mtrun: interrupted" + _resume_hint(argv), file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    except BrokenPipeError:
        # `mtrun validate R --print | head`: the reader has gone; stop quietly, as Unix tools
        # do, and keep Python from complaining again while it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe


if __name__ == "__main__":
    raise SystemExit(main())
