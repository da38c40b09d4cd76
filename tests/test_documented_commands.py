"""Every command in README.md and docs/ works as written: each is parsed by the program it calls
(a dry run: click/typer or DVC's own argument parser; make's target list; Python's module finder),
the repository paths it names exist, and the cheap ones run for real.

Commands are taken from ```bash blocks and from inline `code` that starts with a known program.
Placeholders (RUN_ID, <id>, "...", REGISTRY, $(...)) are given sample values first.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

try:  # typer >= 0.20 carries its own copy of click; mlflow's CLI uses the real one
    from typer._click.exceptions import UsageError as TyperUsageError
    from typer.exceptions import Exit as TyperExit
except ImportError:  # pragma: no cover - older typer: the same click
    TyperUsageError, TyperExit = click.UsageError, click.exceptions.Exit
EXITS = (click.exceptions.Exit, TyperExit)
USAGE_ERRORS = (click.UsageError, TyperUsageError)

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHECKED = {"medsight", "dvc", "make", "python", "mlflow"}
# Programs this machine cannot or should not run in a test (clusters, images, shells); their
# repository paths are still checked, and test_manifests.py renders and validates the manifests.
EXTERNAL = {"kubectl", "docker", "kind", "kustomize", "hadolint", "git", "source", "export", "cd", "openssl",
            "less", "base64", "dvc-repro-note", "huggingface-cli"}
REAL_RUNS = (["--help"], ["--version"], ["stage", "list"], ["variants", "list"], ["config", "show", "--preset", "full"])


def _shell_commands(text: str) -> list[str]:
    """Commands of ```bash blocks (continuations joined, comments dropped) and inline code."""
    found: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for code in re.findall(r"`([^`\n]+)`", prose):
        words = code.split()
        if len(words) > 1 and (words[0] in CHECKED or words[0].endswith("/medsight")):
            found.append(code)
    return found


def _simple_commands(line: str) -> list[list[str]]:
    """``a && b | c; d`` -> [[a...], [b...], ...], placeholders replaced by sample values."""
    line = re.sub(r"\$\((?:[^()]|\([^()]*\))*\)", "VALUE", line)  # $(date +%Y%m%d), $(kubectl ...)
    line = line.replace("<id>", "0123abcd").replace("<KFP URL>", "https://kfp.example.org")
    line = re.sub(r"<([^>]+)>", lambda m: m.group(1).replace(" ", "-"), line)
    line = re.sub(r"\[(--[^\]]+)\]", r"\1", line)  # optional flags shown in brackets
    commands = []
    for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
        if part.strip() and not part.strip().endswith("&"):
            commands.append(shlex.split(part))
        elif part.strip().endswith("&"):
            commands.append(shlex.split(part.strip()[:-1]))
    return [c for c in commands if c]


def documented() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for line in _shell_commands(doc.read_text()):
            for argv in _simple_commands(line):
                while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # VAR=value prefix
                    argv = argv[1:]
                if argv:
                    found.append((f"{doc.name}: {' '.join(argv)}", argv))
    return found


@functools.cache
def _medsight_app() -> typer.Typer:
    from medsight.cli import _mount_optional_apps, app

    _mount_optional_apps()
    return app


@functools.cache
def _medsight_command() -> click.Command:
    return typer.main.get_command(_medsight_app())


def _dry_parse(command: click.Command, args: list[str], mention: bool = False) -> None:
    """Parse ``args`` as the CLI would, resolving subcommands, without running anything.

    ``mention``: the docs name a command in prose (``medsight eval run``) without its options;
    the command must exist, its required options may be left out."""
    try:
        context = command.make_context("medsight", list(args), resilient_parsing=False)
    except EXITS as done:  # --help / --version
        assert done.exit_code == 0
        return
    except USAGE_ERRORS as error:
        # Named in prose without its arguments: a command with required ones, or a group.
        if mention and type(error).__name__ in ("MissingParameter", "NoArgsIsHelpError"):
            return
        raise
    if hasattr(command, "resolve_command"):  # a group
        rest = [*getattr(context, "_protected_args", []), *context.args]
        if rest:
            name, sub, remaining = command.resolve_command(context, rest)
            assert sub is not None, f"no command {name!r}"
            _dry_parse(sub, remaining, mention)


def _repo_paths(argv: list[str]) -> list[Path]:
    tops = {p.name for p in ROOT.iterdir()}
    paths = []
    for arg in argv:
        value = arg.split("=", 1)[-1]
        first = value.split("/", 1)[0]
        if "/" in value and first in tops and first not in {"runs"} and "VALUE" not in value:
            paths.append(ROOT / value)
    return paths


COMMANDS = documented()


def test_the_docs_hold_the_commands_this_test_checks() -> None:
    programs = {argv[0].rsplit("/", 1)[-1] for _, argv in COMMANDS}
    assert {"medsight", "dvc", "make"} <= programs
    assert sum(argv[0].endswith("medsight") for _, argv in COMMANDS) >= 25
    unknown = programs - CHECKED - EXTERNAL
    assert not unknown, f"documented programs this test does not know how to check: {unknown}"


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where: str, argv: list[str]) -> None:
    program = argv[0].rsplit("/", 1)[-1]
    for path in _repo_paths(argv):
        assert path.exists(), f"{where}: names {path.relative_to(ROOT)}, which does not exist"
    if program == "medsight":
        mention = all(not arg.startswith("-") for arg in argv[1:])  # e.g. `medsight eval run` in prose
        _dry_parse(_medsight_command(), argv[1:], mention)
    elif program == "dvc":
        from dvc.cli import parse_args

        parse_args(argv[1:])
    elif program == "make":
        targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
        assert set(argv[1:]) <= targets, f"{where}: no such make target"
    elif program == "python" and argv[1] == "-m":
        assert importlib.util.find_spec(argv[2]) is not None, where
    elif program == "python":  # a script of this repository (bench/...)
        assert argv[1].endswith(".py") and (ROOT / argv[1]).is_file(), where
    elif program == "mlflow":
        from mlflow.cli import cli

        _dry_parse(cli, argv[1:])
    else:
        assert program in EXTERNAL, where


@pytest.mark.parametrize("args", REAL_RUNS, ids=[" ".join(a) for a in REAL_RUNS])
def test_cheap_documented_commands_run(args: list[str]) -> None:
    result = CliRunner().invoke(_medsight_app(), args)
    assert result.exit_code == 0, result.output


def test_a_broken_command_is_caught() -> None:
    """The dry run fails for what a user would hit: an unknown command, option or variant file."""
    command = _medsight_command()
    with pytest.raises(USAGE_ERRORS):
        _dry_parse(command, ["submit", "x.yaml"])  # `medsight submit` (the old docs) does not exist
    with pytest.raises(USAGE_ERRORS):
        _dry_parse(command, ["platform", "pull", "--nope"])
    assert not (ROOT / "pipelines" / "compiled" / "medsight_pipeline.yaml").exists()


def test_make_targets_are_real() -> None:
    done = subprocess.run(["make", "-n", "-C", str(ROOT), "pipeline", "test"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
