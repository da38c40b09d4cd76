"""Every CLI failure as one clear line and the right exit code, never a traceback.

``run_app`` wraps a typer app. Usage errors (a wrong option, a bad ``--set``) exit 2; runtime and
data errors (a bad file, a failed stage, an unreachable store) exit 1. The project's errors are
``ValueError``/``OSError``/``RuntimeError`` subclasses whose messages already name the file, key
or stage, so the line is ``error: <message>``. Anything else is a bug: it is still one line,
with its type, and ``MEDSIGHT_DEBUG=1`` shows the full traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click
import typer

DEBUG_ENV = "MEDSIGHT_DEBUG"
USAGE = 2
FAILURE = 1


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _flat(text: str) -> str:
    """One line: messages that span lines (a wrapped library error) are joined."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def error_message(error: BaseException) -> str:
    """The user-facing text of ``error``, closing quotes and all."""
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
        return _flat(error.args[0])  # str(KeyError) would wrap the message in quotes
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        target = f" -> {error.filename2}" if error.filename2 is not None else ""
        return f"{error.filename}{target}: {error.strerror.lower()}"
    return _flat(str(error)) or type(error).__name__


def _is_known(error: BaseException) -> bool:
    """Errors that carry a message for the user (as opposed to a bug)."""
    from_project = type(error).__module__.split(".")[0] == "medsight"
    return from_project or isinstance(error, (ValueError, OSError, KeyError))


def _is_usage(error: BaseException) -> bool:
    """A click exception (typer ships its own click copy, so by shape rather than by class)."""
    return isinstance(getattr(error, "exit_code", None), int) and callable(getattr(error, "format_message", None))


def _close_progress_bars() -> None:
    """A progress bar cut short by the error would share its line; close (clear) it first."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


def report(error: BaseException) -> int:
    """Print ``error`` as one line on stderr; return the exit code."""
    _close_progress_bars()
    if _is_usage(error):
        if type(error).__name__ == "NoArgsIsHelpError":
            return error.exit_code  # typer has printed the help already
        ctx = getattr(error, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        click.secho(f"error: {_flat(error.format_message())}{where}", fg="red", err=True)
        return error.exit_code
    if isinstance(error, (click.Abort, typer.Abort)):
        click.secho("error: aborted", fg="red", err=True)
        return FAILURE
    if _is_known(error):
        click.secho(f"error: {error_message(error)}", fg="red", err=True)
    else:
        click.secho(
            f"error: internal error ({type(error).__name__}: {error_message(error)}); rerun with "
            f"{DEBUG_ENV}=1 for the traceback and report it",
            fg="red", err=True,
        )
    return FAILURE


def run_app(app: Any, prog_name: str, args: list[str] | None = None) -> int:
    """Run a typer app (on ``args``, default ``sys.argv[1:]``); return its exit code after
    reporting any failure in one line."""
    try:
        code = app(args=args, prog_name=prog_name, standalone_mode=False)
    except SystemExit as exit_:  # typer.Exit inside a callback, or sys.exit in a command
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else FAILURE)
    except KeyboardInterrupt:
        click.secho("error: interrupted", fg="red", err=True)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place every failure is reported
        if _debug() and not (_is_usage(error) or isinstance(error, (click.Abort, typer.Abort))):
            raise
        return report(error)
    return code if isinstance(code, int) else 0


def main_for(app: Any, prog_name: str) -> None:
    sys.exit(run_app(app, prog_name))
