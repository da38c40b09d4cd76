"""The local runner's stage server: components' stage commands forked from a warm interpreter.

Each requester runs in its own interpreter (as a KFP component does), so its stdout, stderr and
exit status are what the forked child produced on the descriptors it was handed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from medsight.platform.stage_server import READY_SUFFIX, SERVER_ENV, StageServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StageServer]:
    log = tmp_path_factory.mktemp("stage-server") / "server.log"
    stages = StageServer(log)
    stages.start()
    ready = Path(str(stages.socket) + READY_SUFFIX)
    deadline = time.monotonic() + 180
    while not ready.exists():
        assert stages.process is not None and stages.process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the stage server did not become ready"
        time.sleep(0.2)
    yield stages
    stages.stop()
    assert not stages.folder.exists()


def _requester(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """A component's executor: runs ``python -m medsight.cli ARGS`` through run_stage_command."""
    code = textwrap.dedent(f"""
        import sys
        from medsight.platform.stage_server import run_stage_command
        sys.exit(run_stage_command([sys.executable, "-m", "medsight.cli", *{args!r}]))
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _forked_children(stages: StageServer) -> list[psutil.Process]:
    assert stages.process is not None
    return psutil.Process(stages.process.pid).children()


def test_command_runs_forked_with_the_components_folder_env_and_streams(server: StageServer, tmp_path: Path) -> None:
    env = {**os.environ, SERVER_ENV: str(server.socket), "KFP_RUN_ID": "forked-run-7"}
    requester = _requester(["stage", "run", "synth-data", "--out", "out", "--set", "data.train_images=6",
                            "--set", "data.val_images=3", "--set", "data.test_images=3"], tmp_path, env)
    out, err = requester.communicate(timeout=300)
    assert requester.returncode == 0, err[-3000:]
    # The requester's own folder (a relative --out) and environment (the run id in the lineage).
    stage = json.loads((tmp_path / "out" / "stage.json").read_text())
    assert stage["run"]["run_id"] == "forked-run-7"
    assert json.loads(out)["train_images"] == 6.0  # the metrics the child printed on the requester's stdout
    # A command that fails reports its own exit status and message through the requester.
    failing = _requester(["stage", "run", "synth-data"], tmp_path, env)
    out, err = failing.communicate(timeout=120)
    assert failing.returncode == 2 and "give --out DIR" in err
    # Children are forked (the server's), not started from scratch, and none is left behind.
    deadline = time.monotonic() + 30
    while _forked_children(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [c for c in _forked_children(server) if c.status() != psutil.STATUS_ZOMBIE]


def test_child_is_interrupted_when_its_component_dies(server: StageServer, tmp_path: Path) -> None:
    """A killed component (its task cancelled, Ctrl-C) interrupts the stage it started: here a
    long-running command, the S3 server, which stops its SeaweedFS process on the interrupt."""
    env = {**os.environ, SERVER_ENV: str(server.socket)}
    (tmp_path / "s3").mkdir()
    requester = _requester(["platform", "s3-serve", "--dir", str(tmp_path / "s3")], tmp_path, env)
    deadline = time.monotonic() + 120
    while not (tmp_path / "s3" / "client.env").exists():
        assert requester.poll() is None, requester.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "s3-serve did not start"
        time.sleep(0.2)
    children = _forked_children(server)
    assert len(children) == 1
    stage_group = [children[0], *children[0].children(recursive=True)]
    requester.send_signal(signal.SIGKILL)
    requester.wait()
    gone, alive = psutil.wait_procs(stage_group, timeout=60)
    assert not alive, [p.cmdline() for p in alive]


def test_without_a_ready_server_commands_run_as_subprocesses(tmp_path: Path) -> None:
    """Before the server has imported its libraries, or after it stopped, a component starts its
    stage the usual way."""
    socket_path = tmp_path / "gone.sock"
    Path(str(socket_path) + READY_SUFFIX).write_text("1")  # ready once, its socket since gone
    env = {**os.environ, SERVER_ENV: str(socket_path)}
    requester = _requester(["stage", "list"], tmp_path, env)
    out, err = requester.communicate(timeout=120)
    assert requester.returncode == 0, err[-3000:]
    assert "perceiver-pretrain" in out
