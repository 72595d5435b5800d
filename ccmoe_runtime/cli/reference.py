"""The command reference, `docs/cli.md`, rendered from the commands' own `--help` (a test keeps the file current).

Regenerate with `python -m ccmoe_runtime.cli.reference --write docs/cli.md`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import click

from . import main as cli_main

WIDTH = 110
HEADER = """# Command reference

Generated from `ccmoe-run --help` by `python -m ccmoe_runtime.cli.reference --write docs/cli.md`; do not edit by
hand (`tests/test_cli.py` fails when this page and the commands disagree). Exit codes: 0 success, 1 internal
error, 2 bad input, 3 engine missing or lacking a feature, 4 not enough memory or disk, 5 the server failed,
6 `bench` found a regression.
"""


def _commands(group: click.Group, ctx: click.Context) -> list[tuple[click.Command, click.Context]]:
    """Every visible command under `group`, depth first, in name order, each with its own context."""
    found = []
    for name in sorted(group.list_commands(ctx)):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub = click.Context(command, info_name=name, parent=ctx, terminal_width=WIDTH, max_content_width=WIDTH)
        found.append((command, sub))
        if isinstance(command, click.Group):
            found.extend(_commands(command, sub))
    return found


def _help_text(command: click.Command, ctx: click.Context) -> str:
    return command.get_help(ctx).rstrip() + "\n"


def render_reference() -> str:
    """The whole reference page as Markdown: the group's help, then one section per command."""
    settings = {**cli_main.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    root = click.Context(cli_main, info_name="ccmoe-run", **settings)
    parts = [HEADER, "## ccmoe-run\n", "```\n" + _help_text(cli_main, root) + "```\n"]
    for command, ctx in _commands(cli_main, root):
        parts.append(f"## {ctx.command_path}\n")
        parts.append("```\n" + _help_text(command, ctx) + "```\n")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the page here instead of printing it")
    args = parser.parse_args()
    text = render_reference()
    if args.write:
        args.write.write_text(text, encoding="utf-8")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
