"""A stage's MLflow run held by a helper process, so the stage computes while MLflow loads.

Importing MLflow and opening a run on its store takes a stage process ~2 s of one core (the
client, SQLAlchemy, the schema check), before the first training step. A stage's own start-up
(pulling inputs, importing torch and the stage's modules) is single-threaded, so on a two-core
machine the other core is idle meanwhile: the helper started first does the MLflow work there.
A thread would not do: both would hold the same GIL.

``TrackerProcess`` implements the ``Tracker`` protocol (plus ``run_id``, ``log_lineage`` and
``close``) by sending each call as one JSON line to ``python -m medsight.platform.tracking_process``,
which forwards it to an ``MLflowTracker``. Calls that log are not waited on; ``run_id``,
``log_artifact`` (its file may be gone right after) and ``close`` are, and any error the helper
met so far is raised there, as ``TrackingError``, so a failing MLflow still fails the stage
before it computes (the runner asks for the run id first). If the stage process dies without
closing, the helper sees its input end and marks the run FAILED.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from medsight.platform.fast_exit import exit_now
from medsight.platform.tracking import TrackingError, config_params, flatten, run_arguments

# The Tracker calls the helper forwards as they are: {"op": name, "args": keyword arguments}.
_FORWARDED = frozenset({"log_params", "log_metrics", "set_tags", "log_lineage", "log_artifact"})


class TrackerProcess:
    """``MLflowTracker`` of a stage, in a helper process (see the module docstring)."""

    def __init__(self, stage: str, config: Any = None, *, tags: Mapping[str, str] | None = None) -> None:
        arguments = run_arguments(stage, config, tags=tags)  # no URI: TrackingError, no helper started
        self.tracking_uri: str = arguments["tracking_uri"]
        self._run_id: str | None = None
        self._closed = False
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._send("open", arguments=arguments, params=config_params(config) if config is not None else {})
        atexit.register(self._close_at_exit)

    # -- Tracker protocol ---------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        # As text here: JSON would turn a tuple into a list, and MLflow would show "[...]".
        self._send("log_params", params={k: str(v) for k, v in flatten(params).items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._send("log_metrics", metrics={k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send("set_tags", tags={str(k): str(v) for k, v in tags.items()})

    def log_lineage(self, lineage: Mapping[str, Any]) -> None:
        self._send("log_lineage", lineage=lineage)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_final_model(self, model_dir: Path, base_dir: Path, lineage: Mapping[str, Any],
                        metrics: Mapping[str, float]) -> None:
        """``final_model.log_final_model`` into this run, where MLflow is already loaded. Its
        failure raises ``TrackingError`` but leaves the run usable (the caller decides)."""
        reply = self._call("log_final_model", model_dir=str(Path(model_dir).resolve()),
                           base_dir=str(Path(base_dir).resolve()), lineage=lineage, metrics=dict(metrics))
        if reply.get("op_error"):
            raise TrackingError(reply["op_error"])

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            self._run_id = str(self._call("run_id")["run_id"])
        return self._run_id

    def close(self, status: str = "FINISHED") -> None:
        if self._closed:
            return
        self._closed = True
        try:
            reply = self._call("close", status=status)
            self._run_id = self._run_id or reply.get("run_id")
        except TrackingError as error:
            if status == "FINISHED":
                raise
            # Closing a failed stage's run: the stage's own error is the one to report.
            print(f"warning: its MLflow run was not closed: {error}", file=sys.stderr)
        finally:
            self._finish_process()

    # -- plumbing -------------------------------------------------------------------------
    def _send(self, op: str, reply: bool = False, **args: Any) -> None:
        if self._closed and op != "close":
            raise TrackingError(f"MLflow run already closed; cannot {op}")
        stdin = self._process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps({"op": op, "args": args, "reply": reply}) + "\n")
        except (BrokenPipeError, OSError, ValueError):
            raise TrackingError(self._exit_message()) from None

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        self._send(op, reply=True, **args)
        stdout = self._process.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            raise TrackingError(self._exit_message())
        reply = json.loads(line)
        if reply.get("error"):
            raise TrackingError(reply["error"])
        return reply

    def _exit_message(self) -> str:
        code = self._process.poll()
        return (f"the MLflow helper process exited (code {code}); its error is printed above"
                if code is not None else "the MLflow helper process stopped answering")

    def _finish_process(self) -> None:
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()

    def _close_at_exit(self) -> None:
        # Stages and CLIs that never call close() still leave a FINISHED run (as MLflowTracker does).
        if not self._closed:
            try:
                self.close()
            except TrackingError as error:
                print(f"warning: {error}", file=sys.stderr)


def serve(requests: IO[str], replies: IO[str]) -> None:
    """The helper's loop: one MLflowTracker, fed one JSON request per line until ``close`` or EOF."""
    from medsight.platform.tracking import MLflowTracker

    tracker: MLflowTracker | None = None
    error: str | None = None  # the first failure; every later reply carries it
    for line in requests:
        request = json.loads(line)
        op, args = request["op"], request["args"]
        if op == "log_final_model":
            replies.write(json.dumps({"error": error, "op_error": _log_final_model(tracker, args)}) + "\n")
            replies.flush()
            continue
        try:
            if error is None and op == "open":
                tracker = MLflowTracker(**args["arguments"])
                tracker.log_params(args["params"])
            elif error is None and op in _FORWARDED and tracker is not None:
                getattr(tracker, op)(**args)
            if op == "close" and tracker is not None:
                tracker.close(args["status"])
        except Exception as failure:  # noqa: BLE001 - reported to the stage at its next waited call
            error = error or (str(failure) if isinstance(failure, TrackingError)
                              else f"MLflow {op} failed: {type(failure).__name__}: {failure}")
        if request.get("reply"):
            replies.write(json.dumps({"error": error, "run_id": getattr(tracker, "run_id", None)}) + "\n")
            replies.flush()
        if op == "close":
            return
    if tracker is not None:
        tracker.close("FAILED")  # the stage process ended without closing: it crashed


def _log_final_model(tracker: Any, args: dict[str, Any]) -> str | None:
    """Package and log the evaluated model; its error as text (the run itself stays usable)."""
    if tracker is None:
        return "no MLflow run to log the model into"
    try:
        tracker.log_final_model(**args)
    except Exception as failure:  # noqa: BLE001 - reported to the caller, which decides
        return f"{type(failure).__name__}: {failure}"
    return None


def main() -> None:
    # Ctrl-C reaches the whole process group; the stage process decides how its run ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Replies go on a private copy of stdout; anything a library prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, replies)
    # The run is ended and every MLflow call was synchronous: nothing is left to write. Tearing
    # down the interpreter with MLflow and SQLAlchemy loaded took ~0.6 s, which the stage waited
    # out after closing its run (its last step before the component ends).
    exit_now(0, replies)


if __name__ == "__main__":
    main()
