"""Stage processes forked from one warm interpreter, for the local runner.

Every component of a local run starts ``medsight stage run`` in a fresh interpreter, and each stage
that builds a model then spends ~5 s of one core importing torch, transformers, open_clip,
DeepSpeed and DVC before its first step: ~40 s of a tiny DAG that computes for ~200 s. The local
runner starts this server once, in the background; it imports those libraries and then waits on
a Unix socket. A KFP component (``kfp_component.run_component``) that finds it sends the stage's
command line, environment, working folder and its own stdin/stdout/stderr, and the server forks:
the child starts with everything imported, runs the same CLI command as the subprocess would, and
reports its exit status on the connection.

The child takes the component's environment and folder (settings read when a stage runs, such as
the store, MLflow and run ids, come from the component; the server was started with the local
runner's environment, so libraries that read settings at import time see the same ones). It runs
in its own process group; when the component goes away (Ctrl-C, a killed task) the connection
closes and the child interrupts itself and its helpers. Without the server (a cluster, where each
component is its own pod, or before the server has finished importing) components start the stage
as a subprocess, as before. The server itself never runs a torch operation, so no thread pool is
forked half-used.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from medsight.platform.fast_exit import flush_streams

SERVER_ENV = "MEDSIGHT_STAGE_SERVER"  # the server's socket; set by the local runner
READY_SUFFIX = ".ready"  # written once the libraries are imported: before it, components don't wait
CLI_MODULE = "medsight.cli"
# Imported before the server listens: what a stage process would import on its own.
PRELOAD = ("torch._dynamo", "deepspeed", "dvc.repo", "scipy.optimize", "medsight.model.inference",
           "medsight.platform.component_runtime", "medsight.cli", "medsight.data.cli", "medsight.platform.cli",
           "medsight.importers.cli", "medsight.eval.cli", "medsight.serve.cli", "medsight.platform.registry_cli")
_MAX_REQUEST = 1 << 20


def run_stage_command(command: Sequence[str]) -> int:
    """Run ``python -m medsight.cli ...`` through the stage server when one is ready, else as a
    subprocess (same environment, folder and streams either way); returns its exit status."""
    socket_path = os.environ.get(SERVER_ENV, "")
    if socket_path and list(command[1:3]) == ["-m", CLI_MODULE] and Path(socket_path + READY_SUFFIX).exists():
        returncode = _run_forked(socket_path, list(command[3:]), dict(os.environ))
        if returncode is not None:
            return returncode
    return subprocess.run(list(command), check=False).returncode


def _run_forked(socket_path: str, args: list[str], env: dict[str, str]) -> int | None:
    """None: the server did not take the request (gone, refused), so the caller runs a subprocess."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with connection:
        try:
            connection.connect(socket_path)
            request = json.dumps({"args": args, "env": env, "cwd": os.getcwd()}).encode() + b"\n"
            flush_streams()
            socket.send_fds(connection, [request], [0, 1, 2])
        except OSError:
            return None
        with connection.makefile("r") as replies:
            if not replies.readline():  # {"started": pid} once forked
                return None
            # {"returncode": n} when the command ends; a connection closed without it means the
            # child died (killed, crashed): a failure.
            line = replies.readline()
    return int(json.loads(line)["returncode"]) if line else 1


def serve(socket_path: Path) -> None:
    """Import the stage libraries, then fork one child per request until terminated."""
    # Ctrl-C in the terminal reaches the whole process group; the server stops with the runner.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, lambda *_: _reap())  # children are reaped as they end
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    from medsight.config.schema import EncoderConfig
    from medsight.model.encoder import open_clip_module
    from medsight.stages.registry import STAGES

    for spec in STAGES:
        spec.load()
    open_clip_module(EncoderConfig().model_name)  # imported by the stages when they build the encoder
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socket_path.unlink(missing_ok=True)
    listener.bind(str(socket_path))
    listener.listen(8)
    Path(str(socket_path) + READY_SUFFIX).write_text(str(os.getpid()))
    while True:
        connection, _ = listener.accept()
        try:
            request, fds = _receive(connection)
        except (OSError, ValueError):
            connection.close()
            continue
        flush_streams()  # or the child would write the server's buffered output again
        pid = os.fork()
        if pid == 0:
            listener.close()
            _child(connection, fds, request)  # never returns
        connection.close()
        for fd in fds:
            os.close(fd)


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    """One request: a JSON line, sent with the component's stdin, stdout and stderr."""
    message, fds, _, _ = socket.recv_fds(connection, _MAX_REQUEST, 3)
    while not message.endswith(b"\n"):
        more = connection.recv(_MAX_REQUEST)
        if not more or len(message) > _MAX_REQUEST:
            for fd in fds:
                os.close(fd)
            raise ValueError("incomplete request")
        message += more
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request comes with three file descriptors")
    return json.loads(message), fds


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child(connection: socket.socket, fds: list[int], request: dict) -> None:
    """In the forked child: become the component's stage process, run the command, report, exit."""
    code = 1
    finished = threading.Event()
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setpgid(0, 0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        connection.sendall(json.dumps({"started": os.getpid()}).encode() + b"\n")
        threading.Thread(target=_interrupt_when_closed, args=(connection, finished), daemon=True).start()
        code = _run_cli(request["args"])
    except BaseException:  # noqa: BLE001 - set-up failed; reported as a failed command
        import traceback

        traceback.print_exc()
    finally:
        finished.set()
        flush_streams()
        try:
            connection.sendall(json.dumps({"returncode": code}).encode() + b"\n")
        except OSError:
            pass
        try:
            atexit._run_exitfuncs()  # what an interpreter's exit would run (the stage's fast exit)
        finally:
            os._exit(code)


def _run_cli(args: list[str]) -> int:
    """``medsight.cli.main`` on ``args``: the same entry point, error reporting and exit codes as
    ``python -m medsight.cli``."""
    from medsight import cli

    sys.argv = ["medsight", *args]
    try:
        cli.main()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except KeyboardInterrupt:
        return 130
    return 0


def _interrupt_when_closed(connection: socket.socket, finished: threading.Event) -> None:
    """The component is gone (the read ends with nothing): interrupt this process group, as the
    terminal's Ctrl-C would have; the stage then ends its MLflow run FAILED and keeps checkpoints."""
    try:
        connection.recv(1)
    except OSError:
        pass
    if finished.is_set():
        return
    os.killpg(0, signal.SIGINT)
    if not finished.wait(30):
        os.killpg(0, signal.SIGKILL)


class StageServer:
    """The server as the local runner's child: ``start`` returns at once (it imports meanwhile, and
    components start subprocesses until it is ready); ``stop`` ends it and removes its socket."""

    def __init__(self, log: Path) -> None:
        self.log = Path(log)
        # A short private folder: socket paths are limited to ~107 bytes, and only this user may connect.
        self.folder = Path(tempfile.mkdtemp(prefix="medsight-stages-"))
        self.socket = self.folder / "stages.sock"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", __name__, str(self.socket)],
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def main() -> None:
    serve(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
