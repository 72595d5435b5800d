"""What commands print: a result's summary lines, or its JSON; progress on stderr."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import click

from ..core.artifacts import payload_of


def echo_result(result, as_json: bool, indent: int | None = 1) -> None:
    """`summary_lines()` of a result, or its `to_dict()` as JSON."""
    if as_json:
        click.echo(json.dumps(payload_of(result), indent=indent, default=str))
    else:
        click.echo("\n".join(result.summary_lines()))


def echo_json(data, indent: int | None = 1) -> None:
    click.echo(json.dumps(data, indent=indent, default=str))


def say(as_json: bool = False):
    """A progress callback printing lines on stderr (None with --json: scripts read stdout only)."""
    return None if as_json else (lambda msg: click.echo(msg, err=True))


class Progress:
    """A click progress bar fed with (done, total) callbacks, on stderr."""

    def __init__(self, label: str):
        self.label, self.bar, self.done = label, None, 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar, self.done = None, 0


@contextmanager
def progress_bar(label: str):
    bar = Progress(label)
    try:
        yield bar
    finally:
        bar.close()


class StageBars:
    """`bars(label)`: the (done, total) progress bar of that label, with an ETA; opening one closes the last."""

    def __init__(self):
        self.current: Progress | None = None

    def __call__(self, label: str) -> Progress:
        if self.current is None or self.current.label != label:
            self.close()
            self.current = Progress(label)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


@contextmanager
def stage_bars():
    bars = StageBars()
    try:
        yield bars
    finally:
        bars.close()
