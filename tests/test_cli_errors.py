"""Every CLI failure is one clear line with the right exit code; a traceback only on request."""

from __future__ import annotations

import pytest
import typer

from medsight.cli_errors import DEBUG_ENV, error_message, run_app
from medsight.config import ConfigError
from medsight.data.errors import DataError


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def fail(kind: str) -> None:
        if kind == "data":
            raise DataError("scan.png: cannot decode image (image file is truncated)")
        if kind == "config":
            raise ConfigError("data.train_images: expected an integer, got 'many'")
        if kind == "missing":
            open("/nonexistent/medsight/file.json")
        if kind == "key":
            raise KeyError("unknown stage 'percever'")
        if kind == "bug":
            print(1 / 0)
        if kind == "usage":
            raise typer.Exit(2)

    @app.command()
    def other() -> None:
        pass

    return app


@pytest.mark.parametrize("kind,code,line", [
    ("data", 1, "error: scan.png: cannot decode image (image file is truncated)"),
    ("config", 1, "error: data.train_images: expected an integer, got 'many'"),  # the closing quote stays
    ("missing", 1, "error: /nonexistent/medsight/file.json: no such file or directory"),
    ("key", 1, "error: unknown stage 'percever'"),
    ("bug", 1, "error: internal error (ZeroDivisionError: division by zero); rerun with MEDSIGHT_DEBUG=1"),
])
def test_each_failure_is_one_line(kind, code, line, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert run_app(_app(), "medsight", ["fail", kind]) == code
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1 and "Traceback" not in err, err


def test_usage_errors_exit_2_in_one_line(capsys):
    assert run_app(_app(), "medsight", ["fail"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: Missing argument 'kind'. (see `medsight fail --help`)"), err
    assert run_app(_app(), "medsight", ["fail", "usage"]) == 2
    assert run_app(_app(), "medsight", ["other"]) == 0


def test_debug_env_shows_the_traceback(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ZeroDivisionError):
        run_app(_app(), "medsight", ["fail", "bug"])


def test_messages_keep_their_quotes():
    assert error_message(KeyError("unknown variant 'x'")) == "unknown variant 'x'"
    assert error_message(ValueError('got "a"')) == 'got "a"'
    assert error_message(ValueError("two\nlines")) == "two lines"
