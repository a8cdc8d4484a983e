"""Every ``mtrun`` command shown in the docs still runs as written, up to the point of training.

The commands are read from the shell code blocks (``sh``, ``bash``, ``console``, ``shell`` or no
language) of every page under ``docs/`` and of ``README.md``, and from the header comments of
``recipes/*.toml`` (``#   mtrun recipes/flap.toml --profile tiny``). Each one is checked in-process,
without training or evaluating anything:

* the subcommand exists and argparse accepts the arguments (the real ``mtrun`` parsers);
* a recipe path under ``recipes/`` exists;
* for ``mtrun RECIPE`` / ``mtrun train`` / ``mtrun validate``: the profile exists and every
  ``key=value`` / ``~key`` override applies to that recipe and leaves it valid — the override
  must not add a problem that the recipe without it does not have (a recipe that is itself
  invalid is tests/test_recipes.py's business);
* for ``mtrun ablate``: every variant of the sweep validates (``--emit`` is added, which checks
  them all and prints the run commands instead of running them).

A synopsis line — one with an upper-case placeholder (``RECIPE.toml``, ``KEY=V1,V2``) or an
optional part in brackets (``[--print]``) — is not a command: only its subcommand and the
option names it shows are checked.

A failure names the page, the line and the command.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from mtrun import cli

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = {"", "sh", "bash", "console", "shell", "shell-session"}
_FENCE = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
# `mtrun`, `.venv/bin/mtrun`, `./.venv/bin/mtrun` as a command word.
_MTRUN = re.compile(r"^(?:\S*/)?mtrun$")
_PLACEHOLDER = re.compile(r"(^|[=\[,])[A-Z][A-Z0-9_]{1,}(\.\.\.|\.toml|\b)")
RECIPE_COMMANDS = {"train", "validate"}


def pages(root: Path = ROOT) -> list[Path]:
    return sorted((root / "docs").rglob("*.md")) + [root / "README.md"]


def _logical_lines(code: str, first_line: int) -> list[tuple[int, str]]:
    """Lines of a code block with backslash continuations joined, with their line numbers."""
    out: list[tuple[int, str]] = []
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        number, line = first_line + i, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        out.append((number, line))
        i += 1
    return out


def _mtrun_argv(words: list[str]) -> list[str] | None:
    """The arguments after the ``mtrun`` word of one simple command, or None."""
    for i, word in enumerate(words):
        if _MTRUN.match(word):
            return words[i + 1 :]
    return None


def _shell_blocks(root: Path):
    """``(file, first line, code)`` of the shell code blocks of the docs and the README, and of
    each recipe's header comment (its "how to run and override" lines)."""
    for page in pages(root):
        text = page.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            if match.group(1) in SHELL_LANGUAGES:
                yield page, text.count("\n", 0, match.start(2)) + 1, match.group(2)
    for recipe in sorted((root / "recipes").glob("*.toml")):
        header = []
        for line in recipe.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            header.append(line[1:])
        # Only the command lines: `#   mtrun ...` and their backslash continuations.
        kept, going = [], False
        for line in header:
            going = bool(re.match(r"\s*(\S*/)?mtrun\s", line)) or (going and kept[-1].rstrip().endswith("\\"))
            kept.append(line if going else "")
        yield recipe, 1, "\n".join(kept) + "\n"


def doc_commands(root: Path = ROOT) -> list[tuple[str, int, str, list[str]]]:
    """``(file, line, command text, argv after mtrun)`` for every mtrun command shown."""
    found = []
    for page, first, code in _shell_blocks(root):
        rel = str(page.relative_to(root))
        for number, line in _logical_lines(code, first):
            line = re.sub(r"^\s*\$\s+", "", line)
            try:
                words = shlex.split(line, comments=True)
            except ValueError as exc:  # unbalanced quotes: report it as a broken command
                if re.search(r"(^|[\s/])mtrun(\s|$)", line):
                    found.append((rel, number, line.strip(), ["<shlex error>", str(exc)]))
                continue
            # One entry per simple command: split on && || ; | and stop at a redirection.
            command: list[str] = []
            for word in words + ["&&"]:
                if word in ("&&", "||", ";", "|") or word.startswith(">"):
                    argv = _mtrun_argv(command)
                    if argv is not None:
                        found.append((rel, number, shlex.join(command), argv))
                    command = [] if not word.startswith(">") else ["#redirect"]
                elif command[:1] != ["#redirect"]:
                    command.append(word)
    return found


COMMANDS = doc_commands()


def _is_synopsis(argv: list[str]) -> bool:
    return any(_PLACEHOLDER.search(a) or a.startswith("[") for a in argv)


def _parser_for(argv: list[str]):
    command, rest = (argv[0], argv[1:]) if argv and argv[0] in cli.SUBCOMMANDS else ("train", argv)
    return command, rest, cli._command_parser(command)


def _parse(parser, command: str, rest: list[str]):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if command in ("train", "validate", "ablate"):
                return parser.parse_intermixed_args(rest), ""
            return parser.parse_args(rest), ""
    except SystemExit:
        return None, stderr.getvalue().strip()


def _recipe_problems(recipe: str, overrides: list[str], profile: str | None) -> list[str]:
    from mtrun.errors import RecipeError
    from mtrun.plugins import get_plugins
    from mtrun.recipe import load_recipe, resolve_recipe

    try:
        data = load_recipe(ROOT / recipe, overrides=overrides, profile=profile)
        resolve_recipe(data, get_plugins().registry, recipe)
    except RecipeError as exc:
        return [re.sub(r" \(from override [^)]*\)", "", p) for p in exc.problems]
    return []


def test_the_docs_show_mtrun_commands():
    # The extraction works: the README's main command and the pages' examples are found.
    assert any(page == "README.md" and argv == ["recipes/quickstart.toml"] for page, _, _, argv in COMMANDS)
    assert len({page for page, *_ in COMMANDS}) >= 5


@pytest.mark.parametrize("page, line, text, argv", COMMANDS, ids=[f"{p}:{n}" for p, n, _, _ in COMMANDS])
def test_documented_command_still_runs(page, line, text, argv):
    check_command(page, line, text, argv)


def check_command(page: str, line: int, text: str, argv: list[str]) -> None:
    """Fail (naming page, line and command) unless ``mtrun *argv`` would start as documented."""
    where = f"{page}:{line}: `{text}`"
    assert argv[:1] != ["<shlex error>"], f"{where}: cannot be split into words ({argv[1]})"
    if not argv:
        return  # bare `mtrun` prints the usage
    if argv[0].startswith("-"):
        _, problem = _parse(cli._top_parser(), "top", argv)
        assert not problem, f"{where}: {problem}"
        return
    if argv[0] not in cli.SUBCOMMANDS and not argv[0].endswith(".toml") and not _is_synopsis(argv[:1]):
        pytest.fail(f"{where}: {argv[0]!r} is neither a subcommand ({', '.join(cli.SUBCOMMANDS)}) nor a recipe")
    command, rest, parser = _parser_for(argv)

    if _is_synopsis(argv):
        known = set(parser._option_string_actions)
        options = {re.sub(r"[\[\]]", "", a).split("=")[0] for a in rest if re.sub(r"^\[", "", a).startswith("-")}
        unknown = sorted(o for o in options if o not in known)
        assert not unknown, f"{where}: `mtrun {command}` has no option {', '.join(unknown)} (it has {', '.join(sorted(known))})"
        return

    args, problem = _parse(parser, command, rest)
    assert args is not None, f"{where}: `mtrun {command}` rejects these arguments: {problem}"

    recipe = getattr(args, "recipe", None)
    if recipe and recipe.startswith("recipes/"):
        assert (ROOT / recipe).is_file(), f"{where}: no recipe {recipe} in the repository"
    else:
        return  # a user's own file (a run folder, a checkpoint, bad.toml): nothing to resolve here

    if command in RECIPE_COMMANDS:
        from mtrun.recipe.loader import _load_with_extends

        if args.profile:
            profiles = _load_with_extends(ROOT / recipe, ()).get("profile", {})
            assert args.profile in profiles, f"{where}: {recipe} has no profile {args.profile!r} (it has {sorted(profiles)})"
        baseline = set(_recipe_problems(recipe, [], args.profile))
        problems = [p for p in _recipe_problems(recipe, list(args.overrides), args.profile) if p not in baseline]
        assert not problems, f"{where}: its overrides do not apply to {recipe}:\n  - " + "\n  - ".join(problems)
    elif command == "ablate":
        from mtrun.errors import MtrunError

        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                status = cli._run(["ablate", *rest, "--emit"])
        except MtrunError as exc:
            pytest.fail(f"{where}: the sweep does not validate:\n{exc}")
        assert status == 0, f"{where}: `mtrun ablate ... --emit` exited {status}"
        assert out.getvalue().count("mtrun ") >= 1, f"{where}: the sweep has no runs"


def test_a_broken_command_is_caught(tmp_path):
    """The check itself works: a renamed option, a missing recipe and a stale key all fail."""
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text(
        "Try:\n\n```sh\n"
        "mtrun validate recipes/quickstart.toml --prnt\n"
        "mtrun recipes/no-such.toml\n"
        "mtrun recipes/quickstart.toml trainer.batch_sise=8\n"
        "mtrun validate recipes/quickstart.toml trainer.batch_size=8   # fine\n"
        "```\n"
    )
    (tmp_path / "README.md").write_text("")
    commands = doc_commands(tmp_path)
    assert [(p, n) for p, n, _, _ in commands] == [("docs/page.md", i) for i in (4, 5, 6, 7)]
    outcomes = []
    for cmd in commands:
        try:
            check_command(*cmd)
            outcomes.append("ok")
        except (AssertionError, pytest.fail.Exception) as exc:
            outcomes.append(str(exc).splitlines()[0])
    assert outcomes[0].startswith("docs/page.md:4: `mtrun validate recipes/quickstart.toml --prnt`: ")
    assert "rejects these arguments" in outcomes[0]
    assert "no recipe recipes/no-such.toml" in outcomes[1]
    assert outcomes[2].startswith("docs/page.md:6:") and "do not apply" in outcomes[2]
    assert outcomes[3] == "ok"
