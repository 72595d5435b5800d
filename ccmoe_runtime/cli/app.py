"""The `ccmoe-run` group: every failure ends in one line `ccmoe-run: error: <problem>; <fix>` and its exit code."""

from __future__ import annotations

import os
import signal
import sys

import click

from .. import __version__
from ..core.errors import EXIT_RESOURCE, EXIT_USAGE, CcmoeError
from ..core.files import disk_full_error

INTERNAL_ERROR = 1


def fail(message: str, code: int) -> None:
    click.echo(f"ccmoe-run: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def _command_path(ctx: click.Context | None) -> str:
    return ctx.command_path if ctx else "ccmoe-run"


class Cli(click.Group):
    """Turns every error (ours, click's usage errors, the environment's) into one line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name or "ccmoe-run", complete_var, standalone_mode=False, **extra)
        except CcmoeError as e:
            fail(e.one_line(), e.exit_code)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.UsageError as e:
            msg = e.format_message().rstrip(".")
            fail(f"{msg[:1].lower()}{msg[1:]}; see `{_command_path(e.ctx)} --help`", EXIT_USAGE)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code or EXIT_USAGE)
        except (click.Abort, KeyboardInterrupt):
            fail("interrupted; nothing was left half-written", 128 + signal.SIGINT)
        except OSError as e:          # the environment: a full disk, a read-only folder, a vanished file
            err = disk_full_error(e.filename or "a file", e)
            fail(err.one_line(), err.exit_code if err.exit_code == EXIT_RESOURCE else EXIT_USAGE)
        except Exception as e:        # noqa: BLE001 - a bug still ends in one line; CCMOE_DEBUG=1 shows the traceback
            if os.environ.get("CCMOE_DEBUG"):
                raise
            fail(f"internal error {type(e).__name__}: {e}; please report it (CCMOE_DEBUG=1 shows the traceback)",
                 INTERNAL_ERROR)
        sys.exit(rv if isinstance(rv, int) else 0)


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary files are removed and child processes stopped."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="ccmoe-run")
def main() -> None:
    """Deploy pre-pruned Mixture-of-Experts models on small machines with llama.cpp."""
    _exit_on_sigterm()
