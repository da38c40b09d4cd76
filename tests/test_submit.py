"""Pipeline submission with an injected fake KFP client (no backend is reachable here)."""

# No `from __future__ import annotations`: kfp reads the component annotations as real types.

import socket
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from medsight.platform import submit
from medsight.platform.submit import (
    SubmitError,
    load_pipeline_package,
    parse_params,
    resolve_token,
    submit_command,
    submit_pipeline,
)

HOST = "https://kfp.example.org"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real compiled pipeline, so the checks run against the IR the compiler writes."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")
    def echo(preset: str, epochs: int, lr: float, flag: bool, stages: list) -> str:
        return f"{preset}{epochs}{lr}{flag}{stages}"

    @dsl.pipeline(name="medsight-test")
    def pipeline(preset: str = "tiny", epochs: int = 1, lr: float = 0.1, flag: bool = False, stages: list = []) -> None:  # noqa: B006
        echo(preset=preset, epochs=epochs, lr=lr, flag=flag, stages=stages)

    path = tmp_path_factory.mktemp("compiled") / "medsight-test.yaml"
    compiler.Compiler().compile(pipeline, str(path))
    return path


class FakeRun:
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id


class FakeClient:
    instances: list["FakeClient"] = []

    def __init__(self, host: str, token: str | None, namespace: str | None, error: BaseException | None = None):
        self.host, self.token, self.namespace, self.error = host, token, namespace, error
        self.runs: list[dict[str, Any]] = []
        FakeClient.instances.append(self)

    def create_run_from_pipeline_package(self, pipeline_file: str, **kw: Any) -> FakeRun:
        if self.error:
            raise self.error
        self.runs.append({"pipeline_file": pipeline_file, **kw})
        return FakeRun("run-123")


def test_submit_with_typed_params_returns_id_and_url(package: Path) -> None:
    clients: list[FakeClient] = []

    def factory(host: str, token: str | None, namespace: str | None) -> FakeClient:
        clients.append(FakeClient(host, token, namespace))
        return clients[-1]

    result = submit_pipeline(
        package,
        host=HOST,
        experiment="ablations",
        run_name="no-stage-3",
        params=["preset=full", "epochs=3", "lr=2e-5", "flag=true", "stages=[v2t, t2v]"],
        namespace="medsight",
        service_account="medsight-pipeline-runner",
        token="tok",
        client_factory=factory,
    )
    assert result.run_id == "run-123"
    assert result.run_url == f"{HOST}/#/runs/details/run-123"
    assert (result.experiment, result.run_name) == ("ablations", "no-stage-3")
    [client] = clients
    assert (client.host, client.token, client.namespace) == (HOST, "tok", "medsight")
    [run] = client.runs
    assert run["pipeline_file"] == str(package)
    assert run["arguments"] == {"preset": "full", "epochs": 3, "lr": 2e-5, "flag": True, "stages": ["v2t", "t2v"]}
    assert run["experiment_name"] == "ablations" and run["run_name"] == "no-stage-3"
    assert run["service_account"] == "medsight-pipeline-runner"


def test_run_name_defaults_to_pipeline_and_ui_host(package: Path) -> None:
    result = submit_pipeline(
        package, host=HOST + "/", ui_host="https://ui.example.org", client_factory=lambda *a: FakeClient(*a)
    )
    assert result.run_name == "medsight-test"
    assert result.run_url == "https://ui.example.org/#/runs/details/run-123"


def test_missing_invalid_and_foreign_yaml(tmp_path: Path) -> None:
    with pytest.raises(SubmitError, match=r"nope\.yaml does not exist"):
        load_pipeline_package(tmp_path / "nope.yaml")
    with pytest.raises(SubmitError, match="is not a file"):
        load_pipeline_package(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("root: [unclosed\n")
    with pytest.raises(SubmitError, match=r"bad\.yaml is not valid YAML"):
        load_pipeline_package(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SubmitError, match="empty"):
        load_pipeline_package(empty)
    foreign = tmp_path / "deploy.yaml"
    foreign.write_text("apiVersion: v1\nkind: ConfigMap\n")
    with pytest.raises(SubmitError, match="not a compiled KFP pipeline: missing pipelineInfo, root, deploymentSpec"):
        load_pipeline_package(foreign)
    # The fake client is never built for a bad package.
    with pytest.raises(SubmitError):
        submit_pipeline(foreign, host=HOST, client_factory=lambda *a: pytest.fail("client built"))


def test_param_errors_name_the_key(package: Path) -> None:
    pkg = load_pipeline_package(package)
    assert pkg.parameters["epochs"] == "NUMBER_INTEGER"
    with pytest.raises(SubmitError, match="'epoch' is not an input of pipeline medsight-test.*known: epochs, flag, lr"):
        parse_params(["epoch=3"], pkg)
    with pytest.raises(SubmitError, match="epochs='three': not a valid NUMBER_INTEGER"):
        parse_params(["epochs=three"], pkg)
    with pytest.raises(SubmitError, match="flag='maybe': not a valid BOOLEAN"):
        parse_params(["flag=maybe"], pkg)
    with pytest.raises(SubmitError, match="expected KEY=VALUE"):
        parse_params(["epochs"], pkg)


def test_token_from_env_or_file(tmp_path: Path) -> None:
    assert resolve_token(environ={"KFP_BEARER_TOKEN": "test-env-token"}) == "test-env-token"
    assert resolve_token(environ={}) is None
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert resolve_token(token_file, environ={"KFP_BEARER_TOKEN": "test-env-token"}) == "from-file"
    token_file.write_text("")
    with pytest.raises(SubmitError, match="is empty"):
        resolve_token(token_file)
    with pytest.raises(SubmitError, match="token file"):
        resolve_token(tmp_path / "missing")


def test_bad_host_scheme(package: Path) -> None:
    with pytest.raises(SubmitError, match="must start with http"):
        submit_pipeline(package, host="kfp.example.org", client_factory=lambda *a: FakeClient(*a))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_with_real_kfp_client(package: Path) -> None:
    host = f"http://127.0.0.1:{_closed_port()}"
    with pytest.warns(FutureWarning), pytest.raises(SubmitError, match=f"KFP endpoint {host} is unreachable"):
        submit_pipeline(package, host=host, token="t0ken-value")


def test_unauthorized_mentions_token_but_never_prints_it(package: Path) -> None:
    from kfp_server_api.exceptions import ApiException

    leaked = "s3cret-" + "bearer-value"
    with pytest.raises(SubmitError, match="HTTP 401.*KFP_BEARER_TOKEN") as info:
        submit_pipeline(
            package,
            host=HOST,
            token=leaked,
            client_factory=lambda h, t, n: FakeClient(h, t, n, error=ApiException(status=401, reason="Unauthorized")),
        )
    assert leaked not in str(info.value)


def test_unexpected_errors_are_not_swallowed(package: Path) -> None:
    with pytest.raises(ZeroDivisionError):
        submit_pipeline(package, host=HOST, client_factory=lambda *a: FakeClient(*a, error=ZeroDivisionError()))


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("submit")(submit_command)

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer from collapsing to a single-command app
        pass

    return app


def test_submit_command_cli(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeClient.instances.clear()
    monkeypatch.setattr(submit, "make_client", lambda h, t, n: FakeClient(h, t, n))
    monkeypatch.setenv("KFP_BEARER_TOKEN", "env-token")
    result = CliRunner().invoke(
        _app(), ["submit", str(package), "--host", HOST, "-p", "epochs=2", "--experiment", "exp", "--no-caching"]
    )
    assert result.exit_code == 0, result.output
    assert "run_id: run-123" in result.output
    assert f"run_url: {HOST}/#/runs/details/run-123" in result.output
    [client] = FakeClient.instances
    assert client.token == "env-token"
    assert client.runs[0]["arguments"] == {"epochs": 2} and client.runs[0]["enable_caching"] is False


def test_submit_command_cli_error_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFP_HOST", HOST)
    result = CliRunner().invoke(_app(), ["submit", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
