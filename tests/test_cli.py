"""The command line speaks to a user: every command's --help works, every option and
argument says what it is for, and the examples in `keeper --help` are real commands."""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import subprocess
import sys

import pytest

from keeper import cli
from keeper.cli import MigrationProgress


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> \
        list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command's parser, with the words that reach it."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += commands(child, (*path, name))
    return found


ALL = commands(cli.build_parser())


def test_the_walk_finds_every_command() -> None:
    names = {" ".join(path) for path, _ in ALL}
    assert {"lab", "guest create", "guest journal", "domu run", "domr create", "domr delete",
            "domr run", "migrate", "demo", "hostd", "pki init", "pki issue",
            "pki list"} <= names


@pytest.mark.parametrize(("path", "parser"), ALL, ids=[" ".join(p) or "keeper" for p, _ in ALL])
def test_every_argument_has_help_and_help_runs(
        path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            missing = [c.dest for c in action._choices_actions if not c.help]
            assert not missing, f"`keeper {' '.join(path)}`: subcommands without help: {missing}"
            continue
        what = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, (
            f"`keeper {' '.join(path)}`: {what} has no help text")
        assert len(action.help) > 10, f"`keeper {' '.join(path)}` {what}: {action.help!r}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli.build_parser().parse_args([*path, "--help"])
    assert done.value.code == 0
    assert out.getvalue().startswith("usage: keeper")


def examples() -> list[str]:
    """The command lines in `keeper --help`'s description (comments stripped)."""
    doc = cli.__doc__ or ""
    return [line.split("#", 1)[0].strip() for line in doc.splitlines()
            if line.startswith("  keeper ")]


def test_the_top_level_help_speaks_to_a_user() -> None:
    text = subprocess.run([sys.executable, "-m", "keeper", "--help"], capture_output=True,
                          text=True, timeout=60).stdout
    assert "main(argv" not in text and "--moves" not in text
    assert "live-migrates" in text and "keeper COMMAND --help" in text
    assert len(examples()) >= 8


@pytest.mark.parametrize("line", examples())
def test_every_example_in_the_top_level_help_parses(line: str) -> None:
    argv = shlex.split(line)[1:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = cli.build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{line!r} does not parse: {err.getvalue().strip()} ({exc.code})")
    assert callable(args.func)


def test_migrate_progress_without_a_terminal_is_plain_lines(
        capsys: pytest.CaptureFixture[str]) -> None:
    progress = MigrationProgress("guest1", 16 << 20, live=False)
    with progress:
        progress({"phase": "start", "ms": 0.1})
        progress({"phase": "S1", "ms": 5.0})
        progress({"phase": "pre-copy", "round": 1, "pages": 4096, "dirty_now": 10})
        progress({"phase": "pre-copy", "round": 2, "pages": 10, "dirty_now": 0})
        progress({"phase": "S2", "ms": 80.0})
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and "\x1b" not in "".join(err)  # no escape codes, a line per event
    assert "S1" in err[1] and "pages=4096" in err[2]
    assert (progress.rounds, progress.bytes, progress.points, progress.phase) == (
        2, 4106 * 4096, 2, "S2")


def test_migrate_progress_on_a_terminal_is_a_bar() -> None:
    from rich.console import Console

    progress = MigrationProgress("guest1", 8 << 20, live=True)
    screen = io.StringIO()
    progress._bar.live.console = Console(file=screen, force_terminal=True, width=100)
    with progress:
        progress({"phase": "S1", "ms": 5.0})
        progress({"phase": "pre-copy", "status": "active", "transferred": 4 << 20,
                  "remaining": 4 << 20})  # a QEMU guest reports bytes, not rounds
        progress({"phase": "S3", "ms": 90.0})
    text = screen.getvalue()
    assert "guest1: S3" in text and "4.0 MiB sent" in text and "sync 2/7" in text
    assert "\x1b[" in text  # drawn for a terminal
