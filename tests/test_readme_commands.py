"""Every `dpbr …` command in the README's shell blocks parses: its options exist and take the values given.

The commands are parsed by the CLI's own command tree (Typer's Click core (``make_context``: options, arguments and
their types, without running the command)), so a renamed option, a removed argument or a positional
argument the command does not take fails here instead of in a user's terminal.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.exceptions import TyperException

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """The ``dpbr …`` commands of the README's fenced ``bash`` blocks (continuations joined, ``&&`` split,
    trailing ``#`` comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0] == "dpbr":
                    commands.append(shlex.join(words))
    return commands


def parse(words: list[str]) -> None:
    """Resolve the sub-command chain of ``dpbr`` for ``words`` and parse the last one's arguments."""
    from dpbr.cli import app

    command, name, args = typer.main.get_command(app), "dpbr", list(words)
    while hasattr(command, "commands"):  # a group: descend into the named sub-command
        assert args and args[0] in command.commands, f"{name}: no sub-command {args[:1]}"
        name, args = args[0], args[1:]
        command = command.commands[name]
    command.make_context(name, args)


COMMANDS = readme_commands()


def test_the_readme_has_dpbr_commands():
    names = {shlex.split(c)[1] for c in COMMANDS}
    assert {"train", "vn", "reconstruct", "aggregate", "plot", "data"} <= names


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    try:
        parse(shlex.split(command)[1:])
    except TyperException as exc:  # a wrong option, an extra argument, a bad value of a typed option
        pytest.fail(f"{command!r}: {exc}")


def test_a_wrong_command_is_caught():
    with pytest.raises(TyperException):
        parse(["plot", "results/summary"])  # plot takes --summary-dir, not a positional folder
    with pytest.raises(TyperException):
        parse(["train", "--batchsize", "10"])
